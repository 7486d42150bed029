"""ARPO's branching decision after a tool result (paper Eq. 5; the official rule in docs/reproduction.md), with
AEPO's consecutive-branch penalty (docs/aepo.md).

    P_t = (α + β · ΔH_t) · (1 − P̂(c)),   P̂(c) = min(1, λ·c)

c counts the consecutive rounds in which the trajectory's prompt forked (reset by a round without a fork); λ = 0
(`penalty_rate`, ARPO's default) removes the penalty.

- ``rule="bernoulli"`` (official ARPO code): fork with probability clip(P_t, 0, 1). The official code draws
  u ~ U(0, 1) and forks iff clip(u − β·ΔH, 0, 1) ≤ α, which happens with exactly this probability.
- ``rule="threshold"`` (paper text): fork iff P_t > τ. With α = τ = 0.5 this is "fork iff ΔH > 0".
- ``rule="aepo_official"`` (official AEPO code): fork iff clip((u + β·ΔH)·(1 − P̂(c)), 0, 1) ≥ α; α is a threshold
  there (higher α, fewer forks), the opposite sense to ARPO's.

A *round* is one synchronous generation round of the round driver (``rounds=True``); the asynchronous driver has
none, so there each decision of the prompt counts as its own round.

On a fork, Z copies are made (fewer when the prompt's budget M has fewer free slots).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from ..aepo import branch_penalty, official_fork, official_fork_probability, penalized_branch_probability

RULES = ("bernoulli", "threshold", "aepo_official")


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
    consecutive: int = 0  # c: consecutive forking rounds of the prompt before this decision
    penalty: float = 0.0  # P̂(c)


class BranchPolicy:
    """Decides whether a trajectory forks at a tool result, from its entropy change ΔH (and, with a penalty rate λ > 0,
    from how many consecutive rounds its prompt has forked)."""

    def __init__(
        self,
        alpha: float,
        beta: float,
        rule: str = "bernoulli",
        threshold: float = 0.5,
        seed: int | None = None,
        penalty_rate: float = 0.0,
        rounds: bool = True,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown branch rule {rule!r}")
        self.alpha, self.beta, self.rule, self.threshold = alpha, beta, rule, threshold
        self.penalty_rate, self.rounds = penalty_rate, rounds
        self.rng = random.Random(seed)
        self.reset()

    def reset(self) -> None:
        """Forget the consecutive-branch counters (a new rollout: the official code resets them every batch)."""
        self.consecutive: dict[int, int] = {}  # group → c
        self._round: int | None = None
        self._forked: set[int] = set()  # groups that forked in the open round
        self._decided: set[int] = set()  # groups that decided in the open round

    def reseed(self, seed: int) -> None:
        self.rng.seed(seed)
        self.reset()

    def _close_round(self) -> None:
        # The official update: every prompt that forked this round counts one more, every other one starts over.
        for group in self._decided | set(self.consecutive):
            self.consecutive[group] = self.consecutive.get(group, 0) + 1 if group in self._forked else 0
        self._forked.clear()
        self._decided.clear()

    def decide(self, delta_h: float, group: int | None = None, round: int | None = None) -> BranchDecision:
        """`group`: the prompt's group in this rollout (None: no penalty bookkeeping); `round`: the driver's round
        number (read when `rounds`; a decision in a later round first closes the open one)."""
        if group is not None and self.rounds and round is not None and round != self._round:
            if self._round is not None:
                self._close_round()
                if round > self._round + 1:  # rounds in between decided nothing: no prompt forked in them
                    self._close_round()
            self._round = round
        c = self.consecutive.get(group, 0) if group is not None else 0
        penalty = branch_penalty(c, self.penalty_rate)
        if self.rule == "aepo_official":
            p = official_fork_probability(delta_h, self.alpha, self.beta, c, self.penalty_rate)
            fork = official_fork(self.rng.random(), delta_h, self.alpha, self.beta, c, self.penalty_rate)
        else:
            p = penalized_branch_probability(delta_h, self.alpha, self.beta, c, self.penalty_rate)
            if self.rule == "bernoulli":
                # rng.random() < 0 never holds, and < 1 always does: α = β = 0 never forks, P = 1 always forks.
                fork = self.rng.random() < p
            else:
                fork = (self.alpha + self.beta * delta_h) * (1.0 - penalty) > self.threshold
        if group is not None:
            if self.rounds and round is not None:
                self._decided.add(group)
                if fork:
                    self._forked.add(group)
            else:  # no rounds: this decision is the prompt's round
                self.consecutive[group] = c + 1 if fork else 0
        return BranchDecision(delta_h, p, fork, c, penalty)
