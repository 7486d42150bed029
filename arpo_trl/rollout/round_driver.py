"""The round driver of ARPO's tree rollout: synchronous rounds over a batched `Generator` (transformers `generate`).

The tree logic (which trajectories start, decisions, budgets, fills, statistics) lives in `tree.RolloutTree`;
this driver feeds it round by round. One *round* is one batched call of the generator over every trajectory that
needs tokens, then one concurrent execution of every tool call those segments asked for. A fork starts in the
round after its decision, batched with everything else.

``speculative_forks`` removes the branch lag of ``"after_tool"`` timing in rounds: the decision at result t needs
the k tokens sampled after it, so a fork would start one round after its parent's post-tool segment. Instead, in
that segment's round, Z copies of the state after result t sample their own continuations in the same batch; the
decision then keeps them (they take their slots with that segment already sampled) or discards them. A copy's
continuation does not depend on the parent's, nor the decision on the copy's, so each kept branch has the
distribution of a fork started a round later; the discarded copies cost tokens, never tool calls.

Entropy is computed only for the rows whose window will be read: roots in their first segment (H_initial) and
trajectories about to decide, in groups that still have a free slot; every other row reads NaN.

In a multi-process run, `any_active` reduces the "is any trajectory still live" flag over all processes, and a
process with nothing to do still calls the generator (with no rows) in every round, so every rank makes the same
number of generate calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ..tools import ToolCall, ToolExecutor
from .branching import BranchPolicy
from .trajectory import Trajectory
from .tree import (
    RolloutSettings,
    RolloutStats,
    RolloutTree,
    Segment,
    ToolProtocol,
    TreeDriver,
)


class Generator(Protocol):
    """The batched backend seam: continue each prefix by at most `max_new_tokens[i]` tokens.

    Called as ``generator(prefixes, max_new_tokens, need_entropy)``; returns one `Segment` per prefix. It must be
    called even with no prefixes when other processes still generate (collective backends join with a dummy
    batch). `need_entropy[i]` False: row i's entropies will not be read (a backend may return NaN for them);
    None: all are needed.
    """

    def __call__(
        self, prefixes: list[list[int]], max_new_tokens: list[int], need_entropy: list[bool] | None = None
    ) -> list[Segment]: ...


def _no_sync(local_active: bool) -> bool:
    return local_active


class RoundDriver(TreeDriver):
    """Runs ARPO's rollout for a batch of groups in synchronous rounds; see the module docstring."""

    def __init__(
        self,
        settings: RolloutSettings,
        generator: Generator,
        protocol: ToolProtocol,
        executor: ToolExecutor,
        policy: BranchPolicy,
        vocab_size: int,
        eos_token_id: int,
        any_active: Callable[[bool], bool] = _no_sync,
        toolset: Callable[[Trajectory], Mapping[str, Any] | None] | None = None,
        frozen_initial: dict[int, float] | None = None,
    ) -> None:
        super().__init__(settings, protocol, executor, policy, vocab_size, eos_token_id, toolset, frozen_initial)
        self.generate = generator
        self.any_active = any_active

    def run(
        self, prompt_ids: Sequence[list[int]], environments: Sequence[Any] | None = None
    ) -> tuple[list[Trajectory], RolloutStats]:
        """Roll out `prompt_ids` (len B = groups × M, groups contiguous); return B finished trajectories in slot
        order and the rollout's statistics.

        `prompt_ids[i]` and `environments[i]` (TRL's `environment_factory`, reset for row i) are where a trajectory
        starting in slot i (a root or a fresh rollout) starts; the rows of a group may differ. A branch continues its
        parent's prompt with a copy of its parent's environment."""
        tree = self.new_tree(prompt_ids, environments)
        stats = tree.stats
        started = time.perf_counter()
        live = tree.start()
        while self.any_active(bool(live)):
            stats.rounds += 1
            budget = {g: tree.pool.free(g) for g in {t.group for t in live}}
            prepared = {id(t): tree.speculate(t, budget) for t in live}
            copies = [c for t in live for c in prepared[id(t)]]  # they share their parent's prefix
            rows = live + copies
            needs = [tree.needs_entropy(t) for t in rows]
            clock = time.perf_counter()
            segments = self.generate([tree.prefix(t) for t in rows], [tree.room(t) for t in rows], needs)
            stats.generation_seconds += time.perf_counter() - clock
            sampled = {id(c): seg for c, seg in zip(copies, segments[len(live) :], strict=True)}
            forks: list[Trajectory] = []
            calling: list[tuple[Trajectory, list[ToolCall], float | None]] = []
            for traj, seg, need in zip(live, segments[: len(live)], needs[: len(live)], strict=True):
                if traj.done:  # discarded earlier in this loop: its slot went to a branch
                    continue
                window = tree.window(seg.entropies) if need else None
                if need:
                    tree.record_initial(traj, window)
                if traj.awaiting_entropy:  # after_tool: this segment follows tool result t
                    mine = prepared[id(traj)]
                    new = tree.decide(traj, window, mine)
                    kept = [f for f in new if id(f) in sampled]
                    stats.discarded_forks += len(mine) - len(kept)
                    for fork in kept:  # already sampled their first segment in this round
                        self._absorb(tree, fork, sampled[id(fork)], None, calling)
                    forks += new
                self._absorb(tree, traj, seg, window, calling)

            # Every call of the round at once; then the results are appended (lagged timing decides there).
            runnable = [(t, calls, w) for t, calls, w in calling if tree.admit(t, calls)]
            flat = [call for _, calls, _ in runnable for call in calls]
            toolsets = [self.toolset(t) for t, calls, _ in runnable for _ in calls] if self.toolset else None
            results = []
            if flat:
                clock = time.perf_counter()
                results = self.executor.run(flat, toolsets)
                stats.tool_seconds += time.perf_counter() - clock
            offset = 0
            for traj, calls, window in runnable:
                forks += tree.apply_results(traj, calls, results[offset : offset + len(calls)], window)
                offset += len(calls)

            live = [t for t in live if not t.done] + [f for f in forks if not f.done]
            live += tree.fill()
        stats.wait_seconds = time.perf_counter() - started - stats.generation_seconds - stats.tool_seconds
        return tree.finish(), stats

    @staticmethod
    def _absorb(tree: RolloutTree, traj: Trajectory, seg: Segment, window: float | None, calling: list) -> None:
        calls = tree.absorb(traj, seg)
        if calls:
            calling.append((traj, calls, window))
