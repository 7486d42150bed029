"""AEPO's four parts as small pure functions (Agentic Entropy-Balanced Policy Optimization, Dong et al.,
arXiv 2510.14545: the ARPO authors' successor). The trainer, the branching policy and the rollout call these; the
tests check them against the formulas written here. docs/aepo.md compares the paper with the official code.

Symbols (paper → `ARPOConfig` field):

=========  ===========================================================  ==================================
k          rollout budget per prompt (ARPO's M)                          `num_generations`
m          global (trajectory-level) samples out of k                    computed per prompt
β_b        sensitivity of the budget split (paper's β in the m formula)  `aepo_budget_sensitivity`
H_root     entropy of the question (the first tokens answering it)
H̄_tool     mean entropy of the steps after tool results
α, γ       base branching probability, entropy weight                    `branch_base_probability`,
                                                                          `branch_entropy_weight`
l          consecutive forking rounds of the prompt
P̂(l)       consecutive-branch penalty, min(1, λ·l)                        λ = `branch_penalty_rate`
ε_l, ε_h   PPO clip range                                                `epsilon`, `epsilon_high` (TRL's)
a          weight of the entropy-aware advantage                         `entropy_advantage_coef`
=========  ===========================================================  ==================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------------------------
# 1. Dynamic budget split (entropy pre-monitoring)


def sigmoid(x: float) -> float:
    """σ(x), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def global_samples_paper(k: int, h_root: float, h_tool_mean: float, beta: float) -> int:
    """Paper: m = k·σ(β·(H_root − H̄_tool)), rounded to the nearest integer and kept in [1, k] (the paper gives no
    rounding; at least one global sample is needed to have a tree at all)."""
    m = k * sigmoid(beta * (h_root - h_tool_mean))
    return max(1, min(k, int(math.floor(m + 0.5))))


def global_samples_official(n: int, h_root: float, h_tool_mean: float, beta: float = 0.5) -> int:
    """Official code (`_calculate_initial_rollouts_dynamical`): int(n·σ(0.5·(H_root − H̄))) + 1, clamped to [1, n]
    (the clamp was added for RUC-NLPIR/ARPO#42). The +1 makes it round up, and n·σ → n overflows without the clamp."""
    return max(1, min(n, int(n * sigmoid(beta * (h_root - h_tool_mean))) + 1))


def segment_windows(
    tool_mask: Sequence[int], entropies: Sequence[float], window: Callable[[list[float]], float]
) -> list[float]:
    """H of each sampled segment of a trajectory, in order: the runs of sampled tokens (mask 1) between environment
    tokens, each through `window` (its first k entropies, normalised). NaN where the segment's entropy was not
    measured."""
    windows: list[float] = []
    run: list[float] = []
    for sampled, h in zip([*tool_mask, 0], [*entropies, math.nan]):
        if sampled:
            run.append(h)
        elif run:
            windows.append(window(run))
            run = []
    return windows


def probe_entropies(windows: Sequence[float], official: bool) -> tuple[float, float]:
    """(H_root, H̄) of a probe rollout from its segment windows: H_root is the first segment's; H̄ the mean over the
    segments that follow tool results (paper: the tool-call steps) or over all segments, the first one included
    (official). Without any measured step H̄ = H_root, the official fallback (then m comes from a gap of 0)."""
    finite = [w for w in windows if not math.isnan(w)]
    h_root = windows[0] if windows and not math.isnan(windows[0]) else 0.0
    steps = finite if official else [w for w in windows[1:] if not math.isnan(w)]
    return h_root, (sum(steps) / len(steps) if steps else h_root)


# ---------------------------------------------------------------------------------------------------------------
# 2. Consecutive-branch penalty


def branch_penalty(consecutive: int, rate: float) -> float:
    """P̂(l) = min(1, λ·l): the official code's linear schedule (λ = 0.05), which the paper leaves unspecified beyond
    'grows with l'. λ = 0 is ARPO (no penalty)."""
    return min(1.0, max(0.0, rate * consecutive))


def penalized_branch_probability(delta_h: float, alpha: float, gamma: float, consecutive: int, rate: float) -> float:
    """Paper: P_t = (α + γ·ΔH_t)·(1 − P̂(l)), clipped to [0, 1] to be a probability. α here is ARPO's sense: the base
    probability of forking (higher α, more forks)."""
    return min(1.0, max(0.0, (alpha + gamma * delta_h) * (1.0 - branch_penalty(consecutive, rate))))


def official_fork(u: float, delta_h: float, alpha: float, beta: float, consecutive: int, rate: float) -> bool:
    """Official AEPO rule, one draw u ~ U(0, 1): fork iff clip((u + β·ΔH)·max(0, 1 − λ·c), 0, 1) ≥ α.

    α is a *threshold* here (higher α, fewer forks): the opposite sense to ARPO's rule, fork iff
    clip(u − β·ΔH, 0, 1) ≤ α. The two agree only at α = 0.5 (and c = 0)."""
    p = (u + beta * delta_h) * (1.0 - branch_penalty(consecutive, rate))
    return min(1.0, max(0.0, p)) >= alpha


def official_fork_probability(delta_h: float, alpha: float, beta: float, consecutive: int, rate: float) -> float:
    """P(official_fork) over u ~ U(0, 1), in closed form: clip(1 − α/f + β·ΔH, 0, 1) with f = 1 − P̂(c) > 0; with
    f = 0 the product is 0, which passes only α ≤ 0."""
    if alpha <= 0.0:
        return 1.0
    if alpha > 1.0:
        return 0.0
    f = 1.0 - branch_penalty(consecutive, rate)
    if f <= 0.0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - alpha / f + beta * delta_h))


# ---------------------------------------------------------------------------------------------------------------
# 3. Entropy-balanced clipping


def balanced_epsilon_high(log_weight: torch.Tensor, epsilon_high: float) -> torch.Tensor:
    """ε̃_h with 1 + ε̃_h = (1 + ε_h)·δ/sg(δ), δ = exp(log_weight): its value is ε_h exactly (δ/sg(δ) = 1 forward), its
    gradient (1 + ε_h)·∇log δ. Given to TRL as its upper clip, the clipped branch min(δA, clip(δ)A) keeps, for
    δ > 1 + ε_h and A > 0, the gradient (1 + ε_h)·A·∇log π instead of 0. Written as ε_h + (1 + ε_h)·(δ/sg(δ) − 1)
    so the forward value carries no rounding from the product."""
    ratio = torch.exp(log_weight - log_weight.detach())
    return epsilon_high + (1.0 + epsilon_high) * (ratio - 1.0)


def entropy_balanced_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    balanced: bool = True,
) -> torch.Tensor:
    """The per-token AEPO objective as written, for reference and tests: −min(δ·A, clip(δ, 1 − ε_l, U)·A) with
    δ = exp(log π − log π_old) and U = (1 + ε_h)·δ/sg(δ) (`balanced`) or 1 + ε_h (PPO). The lower bound stays hard."""
    ratio = torch.exp(log_prob - old_log_prob)
    upper = (1.0 + epsilon_high) * ratio / ratio.detach() if balanced else torch.full_like(ratio, 1.0 + epsilon_high)
    clipped = torch.clamp(ratio, torch.full_like(ratio, 1.0 - epsilon_low), upper)
    return -torch.min(ratio * advantages, clipped * advantages)


# ---------------------------------------------------------------------------------------------------------------
# 4. Entropy-aware advantage


def standardized_entropy(entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z(H): token entropies standardized over the valid tokens (`mask` = 1), detached. Unbiased std as the official
    code; a std that is 0 or undefined (fewer than two valid tokens) counts as 1, so z is H − mean there. Invalid
    tokens get 0."""
    entropies = entropies.detach().float()
    valid = mask.bool()
    if not valid.any():
        return torch.zeros_like(entropies)
    values = entropies[valid]
    mean = values.mean()
    std = values.std() if values.numel() > 1 else torch.ones((), device=values.device)
    if not torch.isfinite(std) or std == 0:
        std = torch.ones((), device=values.device)
    return torch.where(valid, (entropies - mean) / std, torch.zeros_like(entropies))


def entropy_aware_advantages(
    advantages: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor, coef: float
) -> torch.Tensor:
    """Ã_{i,t} = A_i·(1 + a·z(H_{i,t})), (B, T). `advantages`: (B,) sequence advantages or (B, T) token ones.
    a = 0 returns A broadcast unchanged (the official runs' behaviour: their entropy was never computed)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    z = standardized_entropy(entropies, mask).to(advantages.dtype)
    return advantages * (1.0 + coef * z)


__all__ = [
    "balanced_epsilon_high",
    "branch_penalty",
    "entropy_aware_advantages",
    "entropy_balanced_clip_loss",
    "global_samples_official",
    "global_samples_paper",
    "official_fork",
    "official_fork_probability",
    "penalized_branch_probability",
    "probe_entropies",
    "segment_windows",
    "sigmoid",
    "standardized_entropy",
]


# ---------------------------------------------------------------------------------------------------------------
# The trainer's side of parts 3 and 4: the loss hook (part 1's probe rollout: rollout/dynamic_budget.py)


def balance_loss_inputs(
    inputs: dict[str, Any],
    logps: torch.Tensor,
    entropies: torch.Tensor | None,
    *,
    args: Any,
    epsilon_low: float,
    epsilon_high: float,
    sequence_level: bool,
    share: Callable[[torch.Tensor, torch.Tensor], float],
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, float]]:
    """Parts 3 and 4 inside TRL's loss, after its forward: replaces ``inputs["advantages"]`` with Ã (B, T) when
    `entropy_advantage_coef` is on, and with `entropy_balanced_clipping` returns the clip bounds to hand TRL
    (tensors: the upper one's value is ε_h and its gradient AEPO's; else None, None). `share(flags, mask)` is the
    share of valid tokens flagged over every process (a collective: every rank calls it). Also returns the metrics."""
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    figures: dict[str, float] = {}
    if args.entropy_advantage_coef:
        if entropies is None:
            raise RuntimeError("entropy_advantage_coef needs the token entropies of TRL's loss forward, got None")
        advantages = entropy_aware_advantages(advantages, entropies, mask, args.entropy_advantage_coef)
        inputs["advantages"] = advantages
        # 1 + a·z < 0 turns a token's advantage around (z below −1/a): rare at a = 0.2, worth seeing.
        flips = 1 + args.entropy_advantage_coef * standardized_entropy(entropies, mask) < 0
        figures["aepo/advantage_sign_flip_share"] = share(flips, mask)
    if not args.entropy_balanced_clipping:
        return None, None, figures
    if sequence_level:  # TRL's sequence weight: the masked mean of the token log-ratios
        log_weight = (((logps - logps.detach()) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_weight = logps
    # torch.clamp takes two numbers or two tensors: both bounds become tensors (values unchanged).
    high = balanced_epsilon_high(log_weight, epsilon_high)
    low = torch.tensor(float(epsilon_low), dtype=logps.dtype, device=logps.device)
    # Tokens above the upper clip with A > 0: zero gradient under PPO, (1 + ε_h)·A·∇log π here.
    old = inputs.get("old_per_token_logps")
    log_ratio = torch.zeros_like(logps) if old is None else logps.detach() - old
    if sequence_level:
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    kept = (torch.exp(log_ratio) > 1 + epsilon_high) & (advantages > 0)
    figures["aepo/clipped_gradient_kept_share"] = share(kept, mask)
    return low, high, figures
