"""What a training or evaluation rollout logs, from its `RolloutResult`: TRL's completion metrics (TRL's `_generate`
logs them and ARPO replaces `_generate`), ARPO's tree and tool metrics, where the rollout's time went, the vLLM
backend's prefix-cache figures and AEPO's consecutive-branch counts.

Every process makes the same gathers whatever its trees looked like (no rank waits on a collective another skips).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .backends import RolloutResult

logger = logging.getLogger(__name__)


def log_rollout_metrics(
    metrics: dict[str, list[float]],
    accelerator: Any,
    result: RolloutResult,
    *,
    mode: str,
    eos_and_pad: set[int],
    args: Any,
    has_tools: bool,
    last_tool_error: str | None,
) -> int:
    """Append this rollout's metrics to `metrics` (TRL's `self._metrics[mode]`); return the tokens it adds to TRL's
    `num_input_tokens_seen` (prompt and model tokens over every process; counted in training only)."""
    device = accelerator.device
    trajectories, stats = result.trajectories, result.stats
    # As TRL 1.16's `GRPOTrainer._generate` (its completion metrics): lengths count model tokens only (tool_mask 1).
    prompt_lengths = accelerator.gather(torch.tensor([len(t.prompt_ids) for t in trajectories], device=device))
    lengths = accelerator.gather(torch.tensor([sum(t.tool_mask) for t in trajectories], device=device))
    truncated = accelerator.gather(
        torch.tensor([t.completion_ids[-1] not in eos_and_pad for t in trajectories], device=device)
    )
    seen = int((prompt_lengths.sum() + lengths.sum()).item()) if mode == "train" else 0
    metrics["completions/mean_length"].append(lengths.float().mean().item())
    metrics["completions/min_length"].append(lengths.float().min().item())
    metrics["completions/max_length"].append(lengths.float().max().item())
    metrics["completions/clipped_ratio"].append(truncated.float().mean().item())
    terminated = lengths[~truncated] if (~truncated).any() else torch.zeros(1, device=device)
    metrics["completions/mean_terminated_length"].append(terminated.float().mean().item())
    metrics["completions/min_terminated_length"].append(terminated.float().min().item())
    metrics["completions/max_terminated_length"].append(terminated.float().max().item())

    # ARPO: sums over all processes, then ratios.
    local = [
        stats.groups,
        stats.completions,
        stats.branches,
        stats.fresh,
        stats.discarded,
        stats.discarded_forks,
        stats.duplicates,
        stats.tool_executions,
        sum(len(t.tool_events) for t in trajectories),  # calls seen by each completion, shared ones included
        stats.tool_errors,
        stats.tool_timeouts,
        stats.call_limit_hits,
        sum(stats.entropy_deltas),
        len(stats.entropy_deltas),
        sum(stats.entropy_after_tool),
        sum(stats.branch_probabilities),
        stats.rounds,
        sum(stats.consecutive_branches),
    ]
    total = accelerator.gather(torch.tensor([local], dtype=torch.float64, device=device)).sum(0).tolist()
    (groups, completions, branches, fresh, discarded, discarded_forks, dups, execs, calls, errors, timeouts,
     limit_hits, sum_dh, n_dh, sum_h_t, sum_p, rounds, sum_c) = total  # fmt: skip
    groups, completions = max(groups, 1.0), max(completions, 1.0)
    metrics["arpo/branches_per_group"].append(branches / groups)
    metrics["arpo/fresh_rollouts_per_group"].append(fresh / groups)
    metrics["arpo/duplicate_rollouts_per_group"].append(dups / groups)
    if args.rollout_fill == "speculative":
        metrics["arpo/discarded_fresh_per_group"].append(discarded / groups)
    if args.speculative_forks:
        metrics["arpo/discarded_forks_per_group"].append(discarded_forks / groups)
    metrics["arpo/branch_decisions_per_group"].append(n_dh / groups)
    if n_dh:
        metrics["arpo/entropy_delta_mean"].append(sum_dh / n_dh)
        # The per-tool-step entropies the paper plots, in `entropy_normalization` units: H_t after the tool result
        # and H_initial of the same trajectories (ΔH = H_t − H_initial).
        metrics["arpo/entropy_after_tool_mean"].append(sum_h_t / n_dh)
        metrics["arpo/entropy_initial_mean"].append((sum_h_t - sum_dh) / n_dh)
        metrics["arpo/branch_probability_mean"].append(sum_p / n_dh)
    metrics["arpo/generation_rounds"].append(rounds / accelerator.num_processes)
    metrics["arpo/rollout_seconds"].append(result.seconds)  # wall time, tools included
    # Where this process's rollout time went (definitions per driver: RolloutStats).
    metrics["rollout/generation_seconds"].append(stats.generation_seconds)
    metrics["rollout/tool_seconds"].append(stats.tool_seconds)
    metrics["rollout/wait_seconds"].append(stats.wait_seconds)
    if result.logprobs is not None:  # the vLLM backend: its prefix cache, this process's
        metrics["vllm/prefix_cache_hit_rate"].append(stats.cached_tokens / max(stats.prompt_tokens, 1))
        metrics["tools/seconds"].append(stats.tool_seconds)
        if stats.fork_prefills:  # share of the forks' prompt tokens (their parent's prefix) read from cache
            prompt, cached = (sum(x) for x in zip(*stats.fork_prefills))
            metrics["vllm/fork_prefix_cache_hit_rate"].append(cached / max(prompt, 1))
    metrics["tools/calls_per_completion"].append(calls / completions)
    metrics["tools/executions_per_completion"].append(execs / completions)
    metrics["tools/errors"].append(errors)
    metrics["tools/timeouts"].append(timeouts)
    metrics["tools/call_limit_hits"].append(limit_hits)
    if execs and errors >= execs and accelerator.is_main_process:  # once per rollout, not per call
        logger.warning(
            "every tool call of this %s rollout failed (%d of %d); the last error: %s",
            mode, int(errors), int(execs), last_tool_error,
        )  # fmt: skip
    if has_tools:
        # TRL's own tool metrics, same definitions: calls per completion (a call in a shared prefix counts for every
        # completion holding it) and the share of executed calls that failed.
        metrics["tools/call_frequency"].append(calls / completions)
        metrics["tools/failure_frequency"].append(errors / execs if execs else 0.0)
    if args.branch_penalty_rate or args.branch_rule == "aepo_official":
        # AEPO's consecutive-branch penalty: c at each decision (mean over processes, and the max).
        top = accelerator.gather(torch.tensor([max(stats.consecutive_branches, default=0)], device=device))
        if n_dh:
            metrics["aepo/consecutive_branches_mean"].append(sum_c / n_dh)
        metrics["aepo/consecutive_branches_max"].append(float(top.max().item()))
    return seen
