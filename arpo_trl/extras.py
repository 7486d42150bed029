"""Optional dependencies (pyproject.toml's extras), imported where they are needed.

`pip install arpo_trl` installs what training needs; DeepSpeed, wandb, matplotlib and the demo's packages are
extras. A feature that needs a missing one fails with an error naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Module -> (pip extra, what needs it). Extras are defined in pyproject.toml.
EXTRAS: dict[str, tuple[str, str]] = {
    "deepspeed": ("deepspeed", "DeepSpeed ZeRO-3 weight gathering for vLLM"),
    "wandb": ("wandb", "report_to='wandb'"),
    "matplotlib": ("viz", "plotting"),
    "reasoning_gym": ("demo", "reasoning_gym:<task> datasets and the demo"),
    "gguf": ("demo", "reading a GGUF model (embedded:<model>, the test fixtures' tokenizer)"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str) -> ModuleType:
    """Import `module` (a key of `EXTRAS`, or a submodule of one), or raise `MissingExtraError` naming its extra."""
    extra, purpose = EXTRAS[module.split(".")[0]]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # Only the package itself missing; a broken import inside an installed package keeps its own error.
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise
        raise MissingExtraError(
            f"{purpose} needs {module.split('.')[0]!r}, which is not installed: pip install 'arpo_trl[{extra}]'"
        ) from exc
