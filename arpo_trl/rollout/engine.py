"""ARPO's tree rollout (paper §3.1, Algorithm 1), round by round, independent of the model backend.

One *round* is one batched call of the generator over every trajectory that needs tokens, then one concurrent
execution of every tool call those segments asked for:

1. **Initial sampling.** Each group (a prompt's M slots) starts N roots. A root's first k sampled tokens give its
   H_initial (measured afresh every batch, unlike the official code's frozen dictionary, ARPO_SPEC D2).
2. **Monitoring.** After tool result t is appended, the trajectory samples its continuation; the entropy of that
   continuation's first k tokens is H_t (``entropy_timing="after_tool"``, the paper). ``"lagged"`` instead uses
   the segment generated *before* the call, as the official code does (D1).
3. **Branching.** With ΔH = H_t − H_initial, the `BranchPolicy` decides; on a fork Z copies of the trajectory's
   state right after tool result t take free slots. They share those tokens exactly (the tool is not re-run)
   and sample their own continuations from the next round on, batched with everything else.
4. **Termination.** Branching stops when the group has no free slot. When a group has no live trajectory left
   and free slots remain, they are filled per ``rollout_fill``: ``"fresh"`` starts trajectory-level rollouts
   from the prompt (all at once), ``"duplicate"`` copies the group's last trajectory (official padding, D7).
   ``"speculative"`` starts those fresh rollouts in round 1 instead, in the free slots; a branch that finds no
   other free slot reclaims the highest such slot and its fresh rollout is discarded. Fresh rollouts do not
   depend on the tree and the discarded one is chosen by slot, not content, so the group has the distribution
   of ``"fresh"``; it needs fewer rounds (the fill no longer waits for the tree) and samples more (the
   discarded rollouts).

``speculative_forks`` removes the branch lag of ``"after_tool"`` timing: the decision at result t needs the k
tokens sampled after it, so a fork would start one round after its parent's post-tool segment. Instead, in that
segment's round, Z copies of the state after result t sample their own continuations in the same batch; the
decision then keeps them (they take their slots with that segment already sampled) or discards them. A copy's
continuation does not depend on the parent's, nor the decision on the copy's, so each kept branch has the
distribution of a fork started a round later; the discarded copies cost tokens, never tool calls. What changes is
the order in which decisions claim the last free slots: a branch reaches its next tool result a round sooner.

Entropy is computed only for the rows whose window will be read: roots in their first segment (H_initial) and
trajectories about to decide, in groups that still have a free slot; every other row reads NaN.

Every group ends with exactly M finished trajectories. In a multi-process run, `any_active` reduces the "is any
trajectory still live" flag over all processes, and a process with nothing to do still calls the generator
(with no rows) in every round, so every rank makes the same number of generate calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..tools import ToolCall, ToolExecutor, ToolResult
from .branching import BranchPolicy
from .entropy import window_entropy
from .tree import BRANCH, DUPLICATE, FRESH, ROOT, BranchEvent, SlotPool, ToolEvent, Trajectory


@dataclass
class Segment:
    """Tokens sampled for one row in one round, with the entropy of each one's distribution."""

    ids: list[int]
    entropies: list[float]
    finish: str  # "eos": ended with an EOS token; "stop": ended on a stop string; "length": hit its budget


class Generator(Protocol):
    """The backend seam: continue each prefix by at most `max_new_tokens[i]` tokens.

    Must return one `Segment` per prefix and must be called even with no prefixes when other processes still
    generate (collective backends join with a dummy batch). `need_entropy[i]` False: row i's entropies will not
    be read (a backend may return NaN for them); None: all are needed.
    """

    def __call__(
        self, prefixes: list[list[int]], max_new_tokens: list[int], need_entropy: list[bool] | None = None
    ) -> list[Segment]: ...


class ToolProtocol(Protocol):
    """How tool calls look in the token stream (tag format or chat template)."""

    def calls(self, traj: Trajectory, segment: Segment) -> list[ToolCall]:
        """The tool calls `segment` ends with (records the assistant turn in chat format)."""
        ...

    def result_ids(self, traj: Trajectory, calls: list[ToolCall], results: list[ToolResult]) -> list[int]:
        """Token ids of the results as the model sees them (records the tool turns in chat format)."""
        ...

    def limit_notice_ids(self, traj: Trajectory, calls: list[ToolCall], limit: int) -> list[int]:
        """Token ids telling the model its tool-call limit is reached (call_limit_action='message')."""
        ...


@dataclass
class RolloutSettings:
    group_size: int  # M
    initial_rollouts: int  # N
    branch_factor: int = 1  # Z
    entropy_window: int = 20  # k
    entropy_timing: str = "after_tool"
    entropy_normalization: str = "sum_lnV"
    rollout_fill: str = "fresh"
    speculative_forks: bool = False
    branching: bool = True  # False: plain trajectory-level sampling (evaluation)
    max_completion_length: int = 256
    max_model_len: int | None = None  # the model's context (max_position_embeddings): prompt + completion stay below
    max_tool_rounds: int | None = None  # TRL's max_tool_calling_iterations
    call_limit_action: str = "eos"


@dataclass
class RolloutStats:
    groups: int = 0
    completions: int = 0
    branches: int = 0
    fresh: int = 0  # fresh rollouts kept in the group
    discarded: int = 0  # speculative fresh rollouts whose slot a branch reclaimed
    discarded_forks: int = 0  # speculative fork continuations sampled, then not kept (no fork decided)
    duplicates: int = 0
    rounds: int = 0
    tool_executions: int = 0  # unique: a call inside a shared prefix ran once
    tool_errors: int = 0
    tool_timeouts: int = 0
    call_limit_hits: int = 0
    entropy_deltas: list[float] = field(default_factory=list)  # ΔH at each decision
    entropy_after_tool: list[float] = field(default_factory=list)  # H_t at each decision (ΔH + H_initial)
    branch_probabilities: list[float] = field(default_factory=list)


def _no_sync(local_active: bool) -> bool:
    return local_active


class TreeRollout:
    """Runs ARPO's rollout for a batch of groups; see the module docstring for the algorithm."""

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
    ) -> None:
        self.s = settings
        self.generate = generator
        self.protocol = protocol
        self.executor = executor
        self.policy = policy
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.any_active = any_active

    # ------------------------------------------------------------------ helpers
    def _window(self, entropies: Sequence[float]) -> float | None:
        if not entropies:
            return None
        return window_entropy(entropies, self.s.entropy_window, self.s.entropy_normalization, self.vocab_size)

    def _room(self, traj: Trajectory) -> int:
        """Tokens `traj` may still add: within max_completion_length, and within the model's context as TRL keeps."""
        room = self.s.max_completion_length - len(traj.completion_ids)
        if self.s.max_model_len is not None:
            room = min(room, self.s.max_model_len - 1 - self._prompt_lens[traj.group] - len(traj.completion_ids))
        return room

    def _needs_entropy(self, traj: Trajectory, pool: SlotPool) -> bool:
        """Will this round's window of `traj` be read? (Free slots only ever decrease, so no means never.)"""
        s = self.s
        if not (s.branching and traj.can_branch) or pool.free(traj.group) == 0:
            return False
        return traj.h_initial is None or traj.awaiting_entropy or s.entropy_timing == "lagged"

    def _maybe_branch(
        self,
        traj: Trajectory,
        h_t: float | None,
        pool: SlotPool,
        stats: RolloutStats,
        prepared: Sequence[Trajectory] = (),
    ) -> list[Trajectory]:
        """Decide at the tool result `traj` currently ends with; return the forks (copies of its state now).

        `prepared`: speculative copies of that state (slot not yet set), used first as the forks."""
        s = self.s
        if not (s.branching and traj.can_branch) or h_t is None or traj.h_initial is None:
            return []
        if pool.free(traj.group) == 0 or self._room(traj) <= 0:
            return []  # budget M used up (or nothing left to sample): no decision to make
        decision = self.policy.decide(h_t - traj.h_initial)
        stats.entropy_deltas.append(decision.delta_h)
        stats.entropy_after_tool.append(h_t)
        stats.branch_probabilities.append(decision.probability)
        slots = pool.take(traj.group, s.branch_factor) if decision.fork else []
        traj.branch_events.append(
            BranchEvent(len(traj.completion_ids), decision.delta_h, decision.probability, list(slots))
        )
        stats.branches += len(slots)
        for slot in slots:
            evicted = self._slots[slot]
            if evicted is not None:  # speculative fill: the slot was lent to a fresh rollout, which leaves
                evicted.finish_reason = "discarded"
                stats.fresh -= 1
                stats.discarded += 1
        forks = []
        for i, slot in enumerate(slots):
            fork = prepared[i] if i < len(prepared) else traj.fork(slot)
            fork.slot = slot
            forks.append(fork)
        return forks

    def _speculate(self, live: list[Trajectory], pool: SlotPool) -> dict[int, list[Trajectory]]:
        """Copies of the state after tool result t for rows about to decide at t (at most the free slots)."""
        s = self.s
        if not (s.speculative_forks and s.branching and s.entropy_timing == "after_tool"):
            return {}
        budget = {g: pool.free(g) for g in {t.group for t in live}}
        prepared: dict[int, list[Trajectory]] = {}
        for traj in live:
            if traj.awaiting_entropy and traj.can_branch and traj.h_initial is not None and self._room(traj) > 0:
                count = min(s.branch_factor, budget[traj.group])
                if count:
                    budget[traj.group] -= count
                    prepared[id(traj)] = [traj.fork(-1) for _ in range(count)]
        return prepared

    def _absorb(self, traj: Trajectory, seg: Segment, window: float | None, calling: list) -> None:
        """Append a sampled segment; queue its tool calls or record why the trajectory ended."""
        traj.extend(seg.ids, sampled=True, entropies=seg.entropies)
        calls = self.protocol.calls(traj, seg)
        if calls:
            calling.append((traj, calls, window))
        elif seg.finish == "length" or self._room(traj) <= 0:
            traj.finish_reason = "length"
        else:
            traj.finish_reason = "eos" if seg.finish == "eos" else "stop"

    # ------------------------------------------------------------------ main loop
    def run(self, prompt_ids: Sequence[list[int]]) -> tuple[list[Trajectory], RolloutStats]:
        """Roll out `prompt_ids` (len B = groups × M, groups contiguous); return B finished trajectories in
        slot order and the round's statistics."""
        s = self.s
        m = s.group_size
        if len(prompt_ids) % m:
            raise ValueError(f"{len(prompt_ids)} prompts cannot form groups of M={m}")
        for g in range(0, len(prompt_ids), m):
            if any(prompt_ids[i] != prompt_ids[g] for i in range(g, g + m)):
                raise ValueError(
                    f"rows {g}..{g + m - 1} should be one prompt repeated M={m} times (TRL's RepeatSampler); "
                    "ARPO forks branches inside a group, so each group must hold a single prompt"
                )
        num_groups = len(prompt_ids) // m
        self._prompt_lens = [len(prompt_ids[g * m]) for g in range(num_groups)]
        if s.max_model_len is not None and max(self._prompt_lens) >= s.max_model_len - 1:
            raise ValueError(
                f"a prompt of {max(self._prompt_lens)} tokens leaves no room for a completion within the model's "
                f"context of {s.max_model_len} tokens; shorten the prompts"
            )
        stats = RolloutStats(groups=num_groups, completions=len(prompt_ids))
        slots: list[Trajectory | None] = [None] * len(prompt_ids)
        self._slots = slots
        pool = SlotPool(num_groups, m, s.initial_rollouts)
        live: list[Trajectory] = []
        for g in range(num_groups):
            for j in range(s.initial_rollouts):
                traj = Trajectory(slot=g * m + j, group=g, kind=ROOT)
                slots[traj.slot] = traj
                live.append(traj)
            if s.rollout_fill == "speculative" and s.branching:
                for slot in pool.lend(g):
                    slots[slot] = Trajectory(slot=slot, group=g, kind=FRESH, can_branch=False)
                    live.append(slots[slot])
                    stats.fresh += 1

        while self.any_active(bool(live)):
            stats.rounds += 1
            prepared = self._speculate(live, pool)
            copies = [c for t in live for c in prepared.get(id(t), [])]  # they share their parent's prefix
            rows = live + copies
            needs = [self._needs_entropy(t, pool) for t in live] + [False] * len(copies)
            segments = self.generate(
                [list(prompt_ids[t.group * m]) + t.completion_ids for t in rows], [self._room(t) for t in rows], needs
            )
            sampled = {id(c): seg for c, seg in zip(copies, segments[len(live) :], strict=True)}
            forks: list[Trajectory] = []
            calling: list[tuple[Trajectory, list[ToolCall], float | None]] = []
            for traj, seg, need in zip(live, segments[: len(live)], needs[: len(live)], strict=True):
                if traj.done:  # discarded earlier in this loop: its slot went to a branch
                    continue
                window = self._window(seg.entropies) if need else None
                if traj.h_initial is None and need:
                    traj.h_initial = window  # the root's first k tokens
                if traj.awaiting_entropy:  # after_tool: this segment follows tool result t
                    traj.awaiting_entropy = False
                    mine = prepared.get(id(traj), [])
                    new = self._maybe_branch(traj, window, pool, stats, mine)
                    kept = [f for f in new if id(f) in sampled]
                    stats.discarded_forks += len(mine) - len(kept)
                    for fork in kept:  # already sampled their first segment in this round
                        self._absorb(fork, sampled[id(fork)], None, calling)
                    forks += new
                self._absorb(traj, seg, window, calling)

            self._run_tools(calling, pool, stats, forks)

            for fork in forks:
                slots[fork.slot] = fork
            live = [t for t in live if not t.done] + [f for f in forks if not f.done]
            live_per_group = [0] * num_groups
            for t in live:
                live_per_group[t.group] += 1
            live += self._fill(pool, live_per_group, slots, stats)

        self._pad_duplicates(pool, slots, stats)
        finished = [t for t in slots if t is not None]
        if len(finished) != len(prompt_ids):
            raise RuntimeError(f"rollout ended with {len(finished)} of {len(prompt_ids)} slots filled")
        return finished, stats

    def _run_tools(
        self,
        calling: list[tuple[Trajectory, list[ToolCall], float | None]],
        pool: SlotPool,
        stats: RolloutStats,
        forks: list[Trajectory],
    ) -> None:
        """Execute every call of the round at once; append results (mask 0); lagged timing branches here."""
        s = self.s
        runnable: list[tuple[Trajectory, list[ToolCall], float | None]] = []
        for traj, calls, window in calling:
            if traj.done:  # discarded this round (its slot went to a branch): its calls are not run
                continue
            if s.max_tool_rounds is not None and traj.tool_rounds >= s.max_tool_rounds:
                stats.call_limit_hits += 1
                if s.call_limit_action == "eos" or self._room(traj) <= 0:
                    # End here. The EOS is the environment's, not sampled: mask it out of the loss.
                    if self._room(traj) > 0:
                        traj.extend([self.eos_token_id], sampled=False)
                    traj.finish_reason = "call_limit"
                    continue
                notice = self.protocol.limit_notice_ids(traj, calls, s.max_tool_rounds)
                self._append_result(traj, notice, calls, None)
                continue
            runnable.append((traj, calls, window))

        flat = [call for _, calls, _ in runnable for call in calls]
        results = self.executor.run(flat) if flat else []
        offset = 0
        for traj, calls, window in runnable:
            mine = results[offset : offset + len(calls)]
            offset += len(calls)
            stats.tool_executions += len(calls)
            stats.tool_errors += sum(r.error for r in mine)
            stats.tool_timeouts += sum(r.timed_out for r in mine)
            if traj.done:  # lagged timing: discarded by a fork decided earlier in this loop
                continue
            ids = self.protocol.result_ids(traj, calls, mine)
            if not self._append_result(traj, ids, calls, mine):
                continue
            traj.tool_rounds += 1
            if s.entropy_timing == "lagged":
                forks += self._maybe_branch(traj, window, pool, stats)
            else:
                traj.awaiting_entropy = True

    def _append_result(
        self, traj: Trajectory, ids: list[int], calls: list[ToolCall], results: list[ToolResult] | None
    ) -> bool:
        """Append environment tokens if they fit with room to continue; else end the trajectory (as TRL does)."""
        if len(ids) >= self._room(traj):
            traj.finish_reason = "no_room_for_result"
            return False
        position = len(traj.completion_ids)
        for i, call in enumerate(calls):
            res = results[i] if results is not None else None
            traj.tool_events.append(
                ToolEvent(position, call.name, bool(res and res.error), bool(res and res.timed_out))
            )
        traj.extend(ids, sampled=False)
        return True

    def _fill(
        self, pool: SlotPool, live_per_group: list[int], slots: list[Trajectory | None], stats: RolloutStats
    ) -> list[Trajectory]:
        """rollout_fill='fresh': once a group has no live trajectory, start fresh roots in all its free slots."""
        if self.s.rollout_fill != "fresh":
            return []
        fresh: list[Trajectory] = []
        for g, n_live in enumerate(live_per_group):
            if n_live or not pool.free(g):
                continue
            for slot in pool.take(g, pool.free(g)):
                traj = Trajectory(slot=slot, group=g, kind=FRESH, can_branch=False)
                slots[slot] = traj
                fresh.append(traj)
        stats.fresh += len(fresh)
        return fresh

    def _pad_duplicates(self, pool: SlotPool, slots: list[Trajectory | None], stats: RolloutStats) -> None:
        """rollout_fill='duplicate' (official D7): repeat the group's most recent trajectory in unused slots."""
        m = self.s.group_size
        if self.s.rollout_fill != "duplicate":
            return
        for g in range(len(slots) // m):
            if not pool.free(g):
                continue
            # Slots are handed out in creation order, so the highest occupied slot is the last trajectory created.
            last = max((t for t in slots[g * m : (g + 1) * m] if t is not None), key=lambda t: t.slot)
            for slot in pool.take(g, pool.free(g)):
                slots[slot] = last.duplicate(slot)
                stats.duplicates += 1


__all__ = [
    "BRANCH",
    "DUPLICATE",
    "FRESH",
    "ROOT",
    "Generator",
    "RolloutSettings",
    "RolloutStats",
    "Segment",
    "ToolProtocol",
    "TreeRollout",
]
