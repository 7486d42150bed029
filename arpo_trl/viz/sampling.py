"""Roll a model out with tools outside any trainer, keeping every sampled token's entropy.

The rollout itself is ARPO's (`arpo_trl.rollout.engine.TreeRollout`), so tool calls, results, limits and masking
are exactly those of training; only the backend differs from the trainer's `TransformersGenerator`:

- `HFGenerator` calls ``model.generate`` directly (no trainer, accelerator or distributed wrapping) and reads each
  step's entropy H_t = −Σ_j p_{t,j} log p_{t,j}, p_t = softmax(z_t / T), with the same LM-head hook
  (`EntropyRecorder`), so no extra forward pass is made;
- `EntropyTracking` wraps the tool protocol and keeps, per slot, the entropy of every completion token (NaN on
  tool-result tokens), including the prefix a branch inherits from its parent.

With ``branching=True`` (α, β as given) this produces real rollout trees with per-token entropies, which
`render_tree` can draw; with ``branching=False`` it is plain trajectory-level sampling (the entropy analyser).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria

from ..rollout.branching import BranchPolicy
from ..rollout.engine import RolloutSettings, RolloutStats, Segment, TreeRollout
from ..rollout.entropy import EntropyRecorder, output_logit_transform
from ..rollout.generation import _FirstStop, split_segments
from ..rollout.protocols import TagProtocol
from ..rollout.tree import DUPLICATE, Trajectory
from ..tools import ToolCall, ToolExecutor, ToolResult

NAN = float("nan")


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class HFGenerator:
    """`Generator` for `TreeRollout` on a plain transformers model: batched, left-padded ``generate``.

    Args:
        model: a causal LM (its output embeddings get the entropy hook until `close`).
        tokenizer: its tokenizer (pads on the left here).
        stop_strings: strings that end a segment (the tools' closing tags).
        temperature: T of p = softmax(z / T); 0 samples greedily and measures entropy at T = 1.
        top_p, top_k: sampling filters (they do not change the measured entropy, which is over the full
            vocabulary, as in the trainer).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        stop_strings: Sequence[str] | None,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        scale, softcap = output_logit_transform(model.config.get_text_config())
        self.recorder = EntropyRecorder(temperature if temperature > 0 else 1.0, logit_scale=scale, softcap=softcap)
        self._handle = model.get_output_embeddings().register_forward_hook(self.recorder)
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.pad_id = pad
        sampling = temperature > 0
        self.config = GenerationConfig(
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=top_k if sampling else None,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
        )
        self.stop = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop_strings)) if stop_strings else None
        self.calls = 0

    def close(self) -> None:
        """Remove the LM-head hook."""
        self._handle.remove()

    def __call__(
        self, prefixes: list[list[int]], max_new_tokens: list[int], need_entropy: list[bool] | None = None
    ) -> list[Segment]:
        # The analyser measures every token of every row, so `need_entropy` is ignored.
        if not prefixes:
            return []
        self.calls += 1
        device = self.model.device
        width = max(map(len, prefixes))
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prefixes], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
        config = GenerationConfig(**self.config.to_dict())
        config.max_new_tokens = max(1, max(max_new_tokens))
        criteria = StoppingCriteriaList()
        first_stop = _FirstStop(self.stop) if self.stop is not None else None
        if first_stop is not None:
            criteria.append(first_stop)
        self.recorder.arm()
        try:
            with torch.no_grad():
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    stopping_criteria=criteria,
                )
        finally:
            entropies = self.recorder.disarm()
        return split_segments(output[:, width:], entropies, max_new_tokens, self.eos_ids, first_stop, width)


class EntropyTracking:
    """Wraps a tool protocol; records each slot's per-token entropies, aligned with its ``completion_ids``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.stop_strings = getattr(inner, "stop_strings", None)
        self.entropies: dict[int, list[float]] = {}

    def _row(self, traj: Trajectory) -> list[float]:
        row = self.entropies.get(traj.slot)
        if row is None:
            inherited: list[float] = []
            if traj.parent is not None and traj.fork_position is not None:
                inherited = self.entropies.get(traj.parent, [])[: traj.fork_position]
            row = self.entropies[traj.slot] = list(inherited)
        return row

    def calls(self, traj: Trajectory, segment: Segment) -> list[ToolCall]:
        row = self._row(traj)
        start = len(traj.completion_ids) - len(segment.ids)  # `traj` already holds the segment
        del row[start:]
        row.extend([NAN] * (start - len(row)))  # tool results (and environment EOS) since the last segment
        row.extend(segment.entropies)
        return self.inner.calls(traj, segment)

    def result_ids(self, traj: Trajectory, calls: list[ToolCall], results: list[ToolResult]) -> list[int]:
        return self.inner.result_ids(traj, calls, results)

    def limit_notice_ids(self, traj: Trajectory, calls: list[ToolCall], limit: int) -> list[int]:
        return self.inner.limit_notice_ids(traj, calls, limit)

    def completion(self, traj: Trajectory, conversational: bool) -> Any:
        return self.inner.completion(traj, conversational)

    def finalize(self, trajectories: Sequence[Trajectory]) -> list[list[float]]:
        """Per trajectory, one entropy per completion token (NaN where the environment wrote it)."""
        out = []
        for traj in trajectories:
            if traj.kind == DUPLICATE and traj.slot not in self.entropies and traj.parent is not None:
                row = list(self.entropies.get(traj.parent, []))
            else:
                row = list(self.entropies.get(traj.slot, []))
            row = row[: len(traj.completion_ids)]
            row += [NAN] * (len(traj.completion_ids) - len(row))
            out.append([NAN if not m else e for e, m in zip(row, traj.tool_mask)])
        return out


@dataclass
class RecordedBatch:
    """One rollout batch: B trajectories in slot order, their per-token entropies and the rollout statistics."""

    prompt_ids: list[list[int]]
    trajectories: list[Trajectory]
    entropies: list[list[float]]
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

    With ``branching=False`` every completion is an independent trajectory. With ``branching=True``, N =
    `initial_rollouts` roots start and branches fork after tool results with P = clip(α + β·ΔH, 0, 1), Z =
    `branch_factor` at a time, k = `entropy_window` tokens per entropy window.
    """
    if seed is not None:
        torch.manual_seed(seed)
    names = [getattr(t, "name", None) or t.__name__ for t in tools]
    protocol = EntropyTracking(TagProtocol(tokenizer, names))
    generator = HFGenerator(model, tokenizer, protocol.stop_strings, temperature=temperature, top_p=top_p, top_k=top_k)
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
    vocab = int(model.get_output_embeddings().weight.shape[0])
    rows = [list(p) for p in prompt_ids for _ in range(samples)]
    was_training = model.training
    model.eval()
    try:
        with ToolExecutor(list(tools), timeout=tool_timeout) as executor:
            policy = BranchPolicy(alpha, beta, seed=seed)
            rollout = TreeRollout(settings, generator, protocol, executor, policy, vocab, tokenizer.eos_token_id)
            trajectories, stats = rollout.run(rows)
    finally:
        generator.close()
        model.train(was_training)
    return RecordedBatch(rows, trajectories, protocol.finalize(trajectories), stats)


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


def is_nan(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))
