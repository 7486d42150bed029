"""The trainer's weights, as the colocated vLLM engine loads them: HF names, LoRA merged, ZeRO-3 gathered once.

- `training_weights(model)` is a context manager that yields the model's current weights under their plain HF
  names. A PEFT model's adapters are merged into the base weights for the duration (vLLM serves the merged
  model: one code path for every adapter type, no LoRA kernels needed) and unmerged after; under DeepSpeed
  ZeRO-3 every parameter is gathered in one `GatheredParameters` call, which all ranks enter together (weights
  are synced at the same optimizer steps on every rank, outside the rollout).
- `export_model(model, tokenizer, path)` writes a directory vLLM can start from (config, tokenizer, weights).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch


def _hf_name(name: str) -> str | None:
    """A PEFT parameter name as the base model names it; None for adapter-only tensors."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if "lora_" in name or "original_module" in name:
        return None
    return name.replace("modules_to_save.default.", "")


def _is_peft(model: Any) -> bool:
    return hasattr(model, "merge_adapter") and hasattr(model, "get_base_model")


@contextlib.contextmanager
def training_weights(model: torch.nn.Module, zero3: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {HF name: tensor} of `model` now (see the module docstring). Leaves the model as it found it."""
    gather = contextlib.nullcontext()
    if zero3:
        from ..extras import require

        deepspeed = require("deepspeed")

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gather, torch.no_grad():
        peft = _is_peft(model)
        if peft:
            model.merge_adapter()
        try:
            weights = {}
            for name, param in model.named_parameters():
                hf = _hf_name(name) if peft else name
                if hf is not None:
                    weights[hf] = param.detach()
            yield weights
        finally:
            if peft:
                model.unmerge_adapter()


def export_model(model: torch.nn.Module, tokenizer: Any, path: str, zero3: bool = False) -> str:
    """Write `model` (merged, gathered) and `tokenizer` to `path` as a HF directory; return the path."""
    os.makedirs(path, exist_ok=True)
    base = model.get_base_model() if _is_peft(model) else model
    with training_weights(model, zero3=zero3) as weights:
        state = {name: tensor.clone() for name, tensor in weights.items()}
    if getattr(base.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shared with the embedding; vLLM ties it back
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
    base.config.save_pretrained(path)
    generation_config = getattr(base, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def autocast_mismatch(weights_dtype: str, mixed_precision: str) -> str | None:
    """Why TRL's importance-sampling ratios will be off when the trainer computes its logprobs under autocast
    while the engine samples with the weights' own (wider) dtype; None when they compute alike."""
    autocast = {"bf16": "bfloat16", "fp16": "float16"}.get(str(mixed_precision))
    if autocast is None or weights_dtype != "float32":
        return None
    return (
        f"use_vllm with {mixed_precision} mixed precision and float32 weights: the engine samples in float32, but "
        f"the trainer computes its logprobs under {autocast} autocast, so TRL's importance-sampling ratios measure "
        f"{autocast} rounding (per-sequence ratios of 0.7-1.4 on SmolLM2-135M, and sequence_mask drops those above "
        f"vllm_importance_sampling_clip_max) rather than the sampler's staleness. Set bf16=False for exact ratios "
        f"(the training step then runs in float32, slower where the CPU or GPU has fast {autocast})."
    )
