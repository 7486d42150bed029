"""A feature whose optional dependency is missing fails naming the extra that installs it (arpo_trl/extras.py).

"Missing" is made real for one test: None in sys.modules is how Python marks a module that cannot be imported.
"""

from __future__ import annotations

import sys
from importlib.metadata import metadata
from pathlib import Path

import pytest

from arpo_trl.extras import EXTRAS, MissingExtraError, require


def hide(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def test_every_extra_named_exists_in_the_package_metadata() -> None:
    meta = metadata("arpo_trl")
    assert set(meta.get_all("Provides-Extra")) >= {"deepspeed", "wandb", "viz", "demo", "vllm", "all", "dev"}
    for module, (extra, _) in EXTRAS.items():
        # The extra really brings the module's distribution (reasoning_gym's is spelt reasoning-gym).
        brings = [r for r in meta.get_all("Requires-Dist") if f'extra == "{extra}"' in r]
        assert any(r.startswith(module.replace("_", "-")) for r in brings), (module, extra, brings)


def test_require_returns_the_module_when_installed() -> None:
    import gguf

    assert require("gguf") is gguf


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        ("deepspeed", "deepspeed"),
        ("wandb", "wandb"),
        ("matplotlib", "viz"),
        ("reasoning_gym", "demo"),
        ("gguf", "demo"),
    ],
)
def test_missing_module_names_its_extra(monkeypatch: pytest.MonkeyPatch, module: str, extra: str) -> None:
    hide(monkeypatch, module)
    with pytest.raises(MissingExtraError, match=rf"pip install 'arpo_trl\[{extra}\]'"):
        require(module)


def test_a_broken_import_inside_an_installed_package_keeps_its_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # matplotlib is there, one of its own imports is not: that is not a missing extra.
    hide(monkeypatch, "matplotlib")
    monkeypatch.delitem(sys.modules, "matplotlib")
    hide(monkeypatch, "kiwisolver")
    with pytest.raises(ImportError) as raised:
        require("matplotlib")
    assert not isinstance(raised.value, MissingExtraError)


def test_reasoning_gym_dataset_names_the_demo_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from arpo_trl.data import load_questions

    hide(monkeypatch, "reasoning_gym")
    with pytest.raises(MissingExtraError, match=r"pip install 'arpo_trl\[demo\]'"):
        load_questions("reasoning_gym:basic_arithmetic", size=2)


def test_learning_curve_names_the_viz_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from arpo_trl.viz.learning_curve import plot_learning_curve

    hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError, match=r"pip install 'arpo_trl\[viz\]'"):
        plot_learning_curve([{"step": 1, "reward": 0.5}], tmp_path / "curve.png")


def test_embedded_model_conversion_names_the_demo_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from arpo_trl.models import resolve_model_path

    monkeypatch.setenv("ARPO_CACHE", str(tmp_path))  # nothing converted yet
    hide(monkeypatch, "gguf")
    with pytest.raises(MissingExtraError, match=r"pip install 'arpo_trl\[demo\]'"):
        resolve_model_path("embedded:smollm2-135m-instruct")
