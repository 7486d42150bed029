"""Roll a model out with tools outside any trainer, keeping every sampled token's entropy.

The rollout is ARPO's own, on the rollout's own backends, so tool calls, results, limits and masking are exactly
those of training:

- `TransformersBackend` (`arpo_trl.rollout.backends`): the round driver (`RoundDriver`) over `TransformersGenerator.for_model`, the trainer's
  generator run on a plain model; each token's entropy H = −Σ_j p_j log p_j, p = softmax(z / T), is read by the
  LM-head hook during ``generate`` (no extra forward pass);
- `VLLMBackend` (the same module): the asynchronous driver (`StreamDriver`) over a `VLLMEngine`, with ``measure_every_token``:
  the engine's logits processor computes the exact entropy of every sampled token, not only ARPO's windows.

Either way the entropies come back in `Trajectory.token_entropies` (NaN on tool-result tokens; a branch carries
its parent's for the prefix it inherited). With ``branching=True`` (α, β as given) this produces real rollout
trees, which `render_tree` can draw; with ``branching=False`` it is plain trajectory-level sampling (the entropy
analyser).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..rollout.backends import RolloutParts, TransformersBackend, VLLMBackend
from ..rollout.branching import BranchPolicy
from ..rollout.protocols import TagProtocol
from ..rollout.trajectory import Trajectory
from ..rollout.tree import RolloutSettings, RolloutStats
from ..tools import ToolExecutor

__all__ = ["RecordedBatch", "rollout_with_entropies", "teacher_forced_entropies"]


@dataclass
class RecordedBatch:
    """One rollout batch: B trajectories in slot order, their per-token entropies and the rollout statistics."""

    prompt_ids: list[list[int]]
    trajectories: list[Trajectory]
    entropies: list[list[float]]  # per trajectory, one per completion token (NaN where the environment wrote it)
    stats: RolloutStats


def rollout_with_entropies(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    tools: Sequence[Any],
    *,
    samples: int,
    max_new_tokens: int = 256,
    max_tool_calls: int | None = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    branching: bool = False,
    initial_rollouts: int | None = None,
    alpha: float = 0.0,
    beta: float = 0.0,
    branch_factor: int = 1,
    entropy_window: int = 20,
    entropy_normalization: str = "sum_lnV",
    tool_timeout: float = 30.0,
    seed: int | None = None,
) -> RecordedBatch:
    """Roll `samples` completions per prompt (M = `samples`) with the paper's tag-format tools.

    `model`: a transformers model (sampled with `temperature`, `top_p`, `top_k` through a `TransformersBackend`
    made for this call) or a backend (`TransformersBackend`, `VLLMBackend`: its own sampling settings apply, and
    the three arguments must be left at their defaults).

    With ``branching=False`` every completion is an independent trajectory. With ``branching=True``, N =
    `initial_rollouts` roots start and branches fork after tool results with P = clip(α + β·ΔH, 0, 1), Z =
    `branch_factor` at a time, k = `entropy_window` tokens per entropy window.
    """
    if isinstance(model, TransformersBackend | VLLMBackend):
        if (temperature, top_p, top_k) != (1.0, 1.0, 0):
            raise ValueError("a backend samples with its own settings: set temperature/top_p/top_k on the backend")
        backend, owned = model, False
    else:
        backend = TransformersBackend(model, tokenizer, temperature=temperature, top_p=top_p, top_k=top_k)
        owned = True
    names = [getattr(t, "name", None) or t.__name__ for t in tools]
    protocol = TagProtocol(tokenizer, names)
    settings = RolloutSettings(
        group_size=samples,
        initial_rollouts=(initial_rollouts or samples) if branching else samples,
        branch_factor=branch_factor,
        entropy_window=entropy_window,
        entropy_normalization=entropy_normalization,
        branching=branching,
        max_completion_length=max_new_tokens,
        max_tool_rounds=max_tool_calls,
    )
    rows = [list(p) for p in prompt_ids for _ in range(samples)]
    try:
        with ToolExecutor(list(tools), timeout=tool_timeout) as executor:
            parts = RolloutParts(
                settings, protocol, executor, BranchPolicy(alpha, beta, seed=seed), tokenizer.eos_token_id
            )
            result = backend.rollout(parts, rows, None, seed)
    finally:
        if owned:
            backend.close()
    trajectories = result.trajectories
    entropies = [[e if m else math.nan for e, m in zip(t.token_entropies, t.tool_mask)] for t in trajectories]
    return RecordedBatch(rows, trajectories, entropies, result.stats)


def teacher_forced_entropies(
    model: Any, prompt_ids: Sequence[int], completion_ids: Sequence[int], temperature: float = 1.0
) -> list[float]:
    """H of the model's next-token distribution at every completion position, from one forward pass over
    prompt + completion (the reference the sampled entropies must match)."""
    from ..rollout.entropy import token_entropy

    ids = torch.tensor([list(prompt_ids) + list(completion_ids)], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    n = len(prompt_ids)
    h = token_entropy(logits[n - 1 : n - 1 + len(completion_ids)], temperature if temperature > 0 else 1.0)
    return [float(v) for v in h.cpu().tolist()]
