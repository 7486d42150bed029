"""AEPO's dynamic budget split (entropy pre-monitoring, arXiv 2510.14545; `ARPOConfig.dynamic_rollouts`): a probe
rollout per prompt on the trainer's backend, and m global samples per prompt from its entropies (`arpo_trl.aepo`'s
formulas)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..aepo import global_samples_official, global_samples_paper, probe_entropies, segment_windows
from .backends import RolloutBackend, RolloutParts
from .branching import BranchPolicy
from .entropy import window_entropy


def dynamic_initial_rollouts(
    backend: RolloutBackend, parts: RolloutParts, prompt_ids: Sequence[list[int]], m: int, args: Any, seed: int | None
) -> tuple[list[int], dict[str, float]]:
    """AEPO's dynamic budget split (`dynamic_rollouts`): one tool-using probe rollout per prompt on `backend`,
    without forks, measures H_root (the window of its first segment) and H̄ (the mean window of its steps after tool
    results; official: of all its segments); each prompt then starts m roots (`global_samples_*`) instead of N.

    `prompt_ids` holds the batch's rows (groups of `m`, each group's first row its prompt). Returns m per prompt and
    this process's probe figures (summed: prompts, probe tokens, tool calls)."""
    settings = dataclasses.replace(
        parts.settings, group_size=2, initial_rollouts=1, rollout_fill="duplicate", speculative_forks=False
    )  # two rows per prompt keep one free slot, so every step's entropy is measured; the policy never forks
    probe = RolloutParts(settings, parts.protocol, parts.executor, BranchPolicy(0.0, 0.0, seed=0), parts.eos_token_id,
                         parts.toolset)  # fmt: skip
    rows = [prompt_ids[g] for g in range(0, len(prompt_ids), m) for _ in range(2)]
    trajectories = backend.rollout(probe, rows, None, seed).trajectories
    formula = global_samples_official if args.dynamic_rollouts == "official" else global_samples_paper
    k, norm, vocab = args.entropy_window, args.entropy_normalization, backend.vocab_size
    initial, tokens, calls = [], 0, 0
    for root in trajectories[::2]:  # slot 2g: the probe of prompt g (2g + 1 duplicates it)
        windows = segment_windows(root.tool_mask, root.token_entropies, lambda h: window_entropy(h, k, norm, vocab))
        h_root, h_bar = probe_entropies(windows, official=args.dynamic_rollouts == "official")
        initial.append(formula(m, h_root, h_bar, args.aepo_budget_sensitivity))
        tokens += sum(root.tool_mask)
        calls += len(root.tool_events)
    return initial, {"prompts": len(initial), "samples": sum(initial), "tokens": tokens, "calls": calls}
