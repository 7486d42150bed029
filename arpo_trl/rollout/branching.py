"""ARPO's branching decision after a tool result (paper Eq. 5; the official rule in docs/reproduction.md).

    P_t = α + β · ΔH_t

- ``rule="bernoulli"`` (official code): fork with probability clip(P_t, 0, 1). The official code draws
  u ~ U(0, 1) and forks iff clip(u − β·ΔH, 0, 1) ≤ α, which happens with exactly this probability.
- ``rule="threshold"`` (paper text): fork iff P_t > τ. With α = τ = 0.5 this is "fork iff ΔH > 0".

On a fork, Z copies are made (fewer when the prompt's budget M has fewer free slots).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass


def rollout_seed(seed: int, process_index: int, mode: str, step: int, calls: int) -> int:
    """The seed of one rollout's branching draws (and of its vLLM requests): distinct per process, so ranks draw
    different decisions; a function of the step and of the rollouts already made at that step in this mode, so the
    same seed gives the same trees and a resumed run the trees of the uninterrupted one."""
    return zlib.crc32(f"{seed}/{process_index}/{mode}/{step}/{calls}".encode())


def branch_probability(delta_h: float, alpha: float, beta: float) -> float:
    """clip(α + β·ΔH, 0, 1)."""
    return min(1.0, max(0.0, alpha + beta * delta_h))


@dataclass
class BranchDecision:
    delta_h: float
    probability: float
    fork: bool


class BranchPolicy:
    """Decides whether a trajectory forks at a tool result, from its entropy change ΔH."""

    def __init__(
        self, alpha: float, beta: float, rule: str = "bernoulli", threshold: float = 0.5, seed: int | None = None
    ) -> None:
        if rule not in ("bernoulli", "threshold"):
            raise ValueError(f"unknown branch rule {rule!r}")
        self.alpha, self.beta, self.rule, self.threshold = alpha, beta, rule, threshold
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng.seed(seed)

    def decide(self, delta_h: float) -> BranchDecision:
        p = branch_probability(delta_h, self.alpha, self.beta)
        if self.rule == "bernoulli":
            # rng.random() < 0 never holds, and < 1 always does: α = β = 0 never forks, P = 1 always forks.
            fork = self.rng.random() < p
        else:
            fork = self.alpha + self.beta * delta_h > self.threshold
        return BranchDecision(delta_h, p, fork)
