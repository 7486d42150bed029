"""ARPO's tree logic, written once and driven by both rollout drivers (paper §3.1, Algorithm 1).

`RolloutTree` holds a batch's groups (a prompt's M slots) and decides everything that does not depend on how
tokens are produced: which trajectories start, whose entropy is read, when and how many branches fork, what a
sampled segment means (tool calls, end of trajectory), the call limit and budgets, how tool results are
appended, how the unused budget is filled, and the statistics. Two drivers feed it:

- `engine.RoundDriver` runs synchronous *rounds* over a batched `Generator` (transformers `generate`);
- `stream_driver.StreamDriver` runs one request stream per trajectory on vLLM, with no rounds.

The algorithm:

1. **Initial sampling.** Each group starts N roots. A root's first k sampled tokens give its H_initial (measured
   afresh every batch, unlike the official code's frozen dictionary; docs/reproduction.md).
2. **Monitoring.** After tool result t is appended, the trajectory samples its continuation; the entropy of that
   continuation's first k tokens is H_t (``entropy_timing="after_tool"``, the paper). ``"lagged"`` uses the
   segment generated *before* the call instead, as the official code does (D1).
3. **Branching.** With ΔH = H_t − H_initial, the `BranchPolicy` decides; on a fork Z copies of the trajectory's
   state right after tool result t take free slots. They share those tokens exactly (the tool is not re-run).
4. **Termination and fill.** Branching stops when the group has no free slot. Once no live trajectory of a group
   can branch any more and free slots remain, they are filled per ``rollout_fill``: ``"fresh"`` starts
   trajectory-level rollouts from the prompt (all at once), ``"sequential"`` starts one at a time, each allowed to
   branch (the official loop), ``"duplicate"`` copies the group's last trajectory (reproduction only).
   ``"speculative"`` starts the fresh rollouts with the roots, in the free slots; a branch that finds no other
   free slot reclaims the highest such slot and its fresh rollout is discarded. Fresh rollouts do not depend on
   the tree and the discarded one is chosen by slot, not content, so the group has the distribution of
   ``"fresh"``.

Every group ends with exactly M finished trajectories, in slot order.

A group's M rows are one dataset prompt (TRL's RepeatSampler), but their prompt ids may differ: a TRL environment's
`reset` may draw a random state per row and append its observation to that row's prompt. A root or a fresh rollout
in slot i starts from row i's prompt and environment; a branch continues its parent's prompt and a copy of its
parent's environment, whatever its slot. The budget of M slots and the group advantages stay the dataset prompt's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..tools import ToolCall, ToolExecutor, ToolResult, is_empty_call
from .branching import BranchPolicy
from .entropy import window_entropy
from .trajectory import BRANCH, DUPLICATE, FRESH, ROOT, BranchEvent, SlotPool, ToolEvent, Trajectory


@dataclass
class Segment:
    """Tokens sampled for one trajectory in one generation call, with the entropy of each one's distribution."""

    ids: list[int]
    entropies: list[float]
    finish: str  # "eos": ended with an EOS token; "stop": ended on a stop string; "length": hit its budget
    logprobs: list[float] | None = None  # log p of each sampled token under the sampler (vLLM), for TRL's IS


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
    initial_rollouts: int | list[int]  # N; a list: N of each group (AEPO's dynamic budget split)
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
    # Reproduction of the official code (docs/reproduction.md):
    initial_entropy: str = "per_root"  # "frozen_per_slot": H_initial keyed by slot, frozen when first measured
    call_limit_eos_trained: bool = False  # the EOS appended at the call limit enters the loss
    empty_tool_call: str = "error"  # "end": an empty call ends the trajectory silently (no tool, no EOS)


@dataclass
class RolloutStats:
    groups: int = 0
    completions: int = 0
    branches: int = 0
    fresh: int = 0  # fresh rollouts kept in the group
    discarded: int = 0  # speculative fresh rollouts whose slot a branch reclaimed
    discarded_forks: int = 0  # speculative fork continuations sampled, then not kept (no fork decided)
    duplicates: int = 0
    rounds: int = 0  # generation rounds (round driver) or generation requests (asynchronous driver)
    tool_executions: int = 0  # unique: a call inside a shared prefix ran once
    tool_errors: int = 0
    tool_timeouts: int = 0
    call_limit_hits: int = 0
    entropy_deltas: list[float] = field(default_factory=list)  # ΔH at each decision
    entropy_after_tool: list[float] = field(default_factory=list)  # H_t at each decision (ΔH + H_initial)
    branch_probabilities: list[float] = field(default_factory=list)
    consecutive_branches: list[int] = field(default_factory=list)  # AEPO: c at each decision
    # Where the rollout's wall time went (seconds). Round driver: inside the generator's calls / the rounds' tool
    # executions / the rest (the tree's bookkeeping). Asynchronous driver: while at least one request streamed /
    # tool calls summed over calls (they overlap generation and each other) / while no request streamed (the
    # engine idle, waiting on tools).
    generation_seconds: float = 0.0
    tool_seconds: float = 0.0
    wait_seconds: float = 0.0
    # The asynchronous driver's prefix cache: prompt tokens of every request, of which served from vLLM's prefix
    # cache, and per fork's first request (prompt tokens, served from the cache). Zero in the round driver.
    prompt_tokens: int = 0
    cached_tokens: int = 0
    fork_prefills: list[tuple[int, int]] = field(default_factory=list)


class RolloutTree:
    """The groups of one batch and every decision of ARPO's rollout; see the module docstring."""

    def __init__(
        self,
        settings: RolloutSettings,
        prompt_ids: Sequence[list[int]],
        protocol: ToolProtocol,
        policy: BranchPolicy,
        vocab_size: int,
        eos_token_id: int,
        environments: Sequence[Any] | None = None,
        frozen_initial: dict[int, float] | None = None,
    ) -> None:
        s = self.s = settings
        m = s.group_size
        if len(prompt_ids) % m:
            raise ValueError(f"{len(prompt_ids)} prompts cannot form groups of M={m}")
        self.num_groups = len(prompt_ids) // m
        # Row i's prompt: the rows of a group may differ (an environment's reset observation); rows with equal
        # prompts share one list, so a group of one repeated prompt holds it once.
        # (Reconstructed from the compiled module after the working copy was lost; comments may differ.)
        self.row_prompts: list[list[int]] = []
        for g in range(self.num_groups):
            distinct: dict[tuple[int, ...], list[int]] = {}
            for i in range(g * m, (g + 1) * m):
                self.row_prompts.append(distinct.setdefault(tuple(prompt_ids[i]), list(prompt_ids[i])))
        longest = max(map(len, self.row_prompts), default=0)
        if s.max_model_len is not None and longest >= s.max_model_len - 1:
            raise ValueError(
                f"a prompt of {longest} tokens leaves no room for a completion within the "
                f"model's context of {s.max_model_len} tokens; shorten the prompts"
            )
        self.protocol = protocol
        self.policy = policy
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.environments = environments
        # initial_entropy="frozen_per_slot": slot → H of the first segment ever measured in it; the caller keeps the
        # dictionary across batches, as the official worker does (D2).
        self.frozen_initial = frozen_initial if frozen_initial is not None else {}
        self.stats = RolloutStats(groups=self.num_groups, completions=len(prompt_ids))
        self.slots: list[Trajectory | None] = [None] * len(prompt_ids)
        n = s.initial_rollouts
        self.initial = list(n) if isinstance(n, (list, tuple)) else [n] * self.num_groups  # N of each group
        if len(self.initial) != self.num_groups or not all(1 <= x <= m for x in self.initial):
            raise ValueError(f"initial_rollouts {n!r}: one N in [1, M={m}] per group ({self.num_groups} groups)")
        self.pool = SlotPool(self.num_groups, m, 0)
        for g, roots in enumerate(self.initial):
            self.pool.take(g, roots)  # the root slots [g·M, g·M + N_g): the lowest, taken first

    # ------------------------------------------------------------------ reading the state
    def prefix(self, traj: Trajectory) -> list[int]:
        """Prompt + completion so far: what the model continues."""
        return traj.prompt_ids + traj.completion_ids

    def room(self, traj: Trajectory) -> int:
        """Tokens `traj` may still add: within max_completion_length, and within the model's context as TRL keeps."""
        room = self.s.max_completion_length - len(traj.completion_ids)
        if self.s.max_model_len is not None:
            room = min(room, self.s.max_model_len - 1 - len(traj.prompt_ids) - len(traj.completion_ids))
        return room

    def window(self, entropies: Sequence[float]) -> float | None:
        """H of a segment: its first k token entropies, normalised."""
        if not entropies:
            return None
        return window_entropy(entropies, self.s.entropy_window, self.s.entropy_normalization, self.vocab_size)

    def needs_entropy(self, traj: Trajectory) -> bool:
        """Will the window of `traj`'s next segment be read? (Free slots only ever decrease: no means never.)"""
        s = self.s
        if traj.slot < 0:  # a speculative copy not yet placed: its parent decides, and it has no slot to freeze
            return False
        if not (s.branching and traj.can_branch) or self.pool.free(traj.group) == 0:
            return False
        if s.initial_entropy == "frozen_per_slot" and traj.slot not in self.frozen_initial:
            return True
        return traj.h_initial is None or traj.awaiting_entropy or s.entropy_timing == "lagged"

    def can_still_branch(self, traj: Trajectory) -> bool:
        """Could `traj` still fork a branch (live, branchable, allowed another tool call, tokens left)?"""
        s = self.s
        if traj.done or not (s.branching and traj.can_branch) or self.room(traj) <= 0:
            return False
        return s.max_tool_rounds is None or traj.tool_rounds < s.max_tool_rounds or traj.awaiting_entropy

    # ------------------------------------------------------------------ starting
    def start(self) -> list[Trajectory]:
        """The N roots of every group (and, with speculative fill, fresh rollouts in the free slots)."""
        m, started = self.s.group_size, []
        for g in range(self.num_groups):
            for j in range(self.initial[g]):
                started.append(self._place(Trajectory(slot=g * m + j, group=g, kind=ROOT)))
            if self.s.rollout_fill == "speculative" and self.s.branching:
                for slot in self.pool.lend(g):
                    started.append(self._place(Trajectory(slot=slot, group=g, kind=FRESH, can_branch=False)))
                    self.stats.fresh += 1
        return started

    def _place(self, traj: Trajectory) -> Trajectory:
        """Put `traj` in its slot. One that starts from the prompt (a root, a fresh rollout) takes that row's prompt and
        environment; a branch keeps its parent's (the row's own freshly reset environment is set aside)."""
        if traj.kind in (ROOT, FRESH):
            traj.prompt_ids, traj.origin = self.row_prompts[traj.slot], traj.slot
            if self.environments is not None and traj.env is None:
                traj.env = self.environments[traj.slot]
        self.slots[traj.slot] = traj
        return traj

    # ------------------------------------------------------------------ a sampled segment
    def record_initial(self, traj: Trajectory, window: float | None) -> None:
        if window is None:
            return
        if self.s.initial_entropy == "frozen_per_slot":
            # The first segment measured in this slot, in this process's lifetime, for every later occupant.
            traj.h_initial = self.frozen_initial.setdefault(traj.slot, window)
        elif traj.h_initial is None:
            traj.h_initial = window  # the root's first k tokens

    def decide(self, traj: Trajectory, h_t: float | None, prepared: Sequence[Trajectory] = ()) -> list[Trajectory]:
        """Decide at the tool result `traj` currently ends with; return the forks (copies of its state now), already
        in their slots. `prepared`: speculative copies of that state (slot not yet set), used first as the forks."""
        s, stats, pool = self.s, self.stats, self.pool
        traj.awaiting_entropy = False
        if not (s.branching and traj.can_branch) or h_t is None or traj.h_initial is None:
            return []
        if pool.free(traj.group) == 0 or self.room(traj) <= 0:
            return []  # budget M used up (or nothing left to sample): no decision to make
        if s.initial_entropy == "frozen_per_slot":
            traj.h_initial = self.frozen_initial.get(traj.slot, traj.h_initial)
        decision = self.policy.decide(h_t - traj.h_initial, group=traj.group, round=stats.rounds)  # AEPO penalty
        stats.entropy_deltas.append(decision.delta_h)
        stats.entropy_after_tool.append(h_t)
        stats.branch_probabilities.append(decision.probability)
        stats.consecutive_branches.append(decision.consecutive)
        slots = pool.take(traj.group, s.branch_factor) if decision.fork else []
        traj.branch_events.append(
            BranchEvent(
                len(traj.completion_ids),
                decision.delta_h,
                decision.probability,
                list(slots),
                decision.consecutive,
                decision.penalty,
            )  # fmt: skip
        )
        stats.branches += len(slots)
        for slot in slots:
            evicted = self.slots[slot]
            if evicted is not None:  # speculative fill: the slot was lent to a fresh rollout, which leaves
                evicted.finish_reason = "discarded"
                stats.fresh -= 1
                stats.discarded += 1
        forks = []
        for i, slot in enumerate(slots):
            fork = prepared[i] if i < len(prepared) else traj.fork(slot)
            fork.slot = slot
            forks.append(self._place(fork))
        return forks

    def speculate(self, traj: Trajectory, budget: dict[int, int]) -> list[Trajectory]:
        """Speculative forks: copies of the state after tool result t for a row about to decide at t (at most the
        group's remaining `budget`, which this consumes). Until `decide` places them, copy i has slot −1 − i."""
        s = self.s
        if not (s.speculative_forks and s.branching and s.entropy_timing == "after_tool"):
            return []
        if not (traj.awaiting_entropy and traj.can_branch and traj.h_initial is not None and self.room(traj) > 0):
            return []
        count = max(0, min(s.branch_factor, budget.get(traj.group, 0)))  # the asynchronous driver's may be < 0
        budget[traj.group] = budget.get(traj.group, 0) - count
        return [traj.fork(-1 - i) for i in range(count)]

    def absorb(self, traj: Trajectory, seg: Segment) -> list[ToolCall]:
        """Append a sampled segment; return its tool calls, or record why the trajectory ended."""
        traj.extend(seg.ids, sampled=True, entropies=seg.entropies, logprobs=seg.logprobs)
        calls = self.protocol.calls(traj, seg)
        if calls and self.s.empty_tool_call == "end" and all(is_empty_call(c) for c in calls):
            traj.finish_reason = "empty_call"
            return []
        if calls:
            return calls
        if seg.finish == "eos":
            traj.finish_reason = "eos"  # even when it filled the budget exactly
        elif seg.finish == "length" or self.room(traj) <= 0:
            traj.finish_reason = "length"
        else:
            traj.finish_reason = "stop"
        return []

    # ------------------------------------------------------------------ tool calls
    def admit(self, traj: Trajectory, calls: list[ToolCall]) -> bool:
        """Should `calls` run? Handles the call limit (ending the trajectory or answering with a notice); a
        trajectory with no room left for any result ends without running them (no wasted tool calls)."""
        s = self.s
        if traj.done:  # discarded (its slot went to a branch): its calls are not run
            return False
        if s.max_tool_rounds is not None and traj.tool_rounds >= s.max_tool_rounds:
            self.stats.call_limit_hits += 1
            if s.call_limit_action == "eos" or self.room(traj) <= 0:
                # End here. The EOS is the environment's, not sampled: masked out of the loss (unless
                # call_limit_eos_trained, as the official code). A chat-template turn already ends with its sampled
                # EOS: nothing is added then.
                if self.room(traj) > 0 and (not traj.completion_ids or traj.completion_ids[-1] != self.eos_token_id):
                    traj.extend([self.eos_token_id], sampled=s.call_limit_eos_trained)
                traj.finish_reason = "call_limit"
                return False
            self.append_result(traj, self.protocol.limit_notice_ids(traj, calls, s.max_tool_rounds), calls, None)
            return False
        if self.room(traj) < getattr(self.protocol, "min_result_tokens", 1):  # no result can fit: do not run them
            traj.finish_reason = "no_room_for_result"
            return False
        return True

    def apply_results(
        self, traj: Trajectory, calls: list[ToolCall], results: list[ToolResult], window: float | None
    ) -> list[Trajectory]:
        """Append the results (mask 0); with lagged timing decide here (returns the forks), else await H_t."""
        stats = self.stats
        stats.tool_executions += len(calls)
        stats.tool_errors += sum(r.error for r in results)
        stats.tool_timeouts += sum(r.timed_out for r in results)
        if traj.done:  # discarded by a fork decided while its tools ran
            return []
        ids = self.protocol.result_ids(traj, calls, results)
        if not self.append_result(traj, ids, calls, results):
            return []
        traj.tool_rounds += 1
        if self.room(traj) <= 0:  # the result filled the budget exactly: nothing left to sample (TRL keeps it too)
            traj.finish_reason = "length"
            return []
        if self.s.entropy_timing == "lagged":
            return self.decide(traj, window)
        traj.awaiting_entropy = True
        return []

    def append_result(
        self, traj: Trajectory, ids: list[int], calls: list[ToolCall], results: list[ToolResult] | None
    ) -> bool:
        """Append environment tokens if they fit in the budget (up to filling it, as TRL's tool loop keeps a result
        that ends exactly at max_completion_length); else end the trajectory without them (as TRL drops them)."""
        if len(ids) > self.room(traj):
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

    # ------------------------------------------------------------------ filling and finishing
    def fill(self, groups: Iterable[int] | None = None) -> list[Trajectory]:
        """Fresh rollouts for groups whose tree can no longer use its free slots (no live trajectory can branch):
        all at once (`fresh`), or one branchable root at a time while the group has nothing live (`sequential`).
        `groups`: only those (the asynchronous driver asks for the group whose trajectory just changed); None: all.
        Each group costs its own M slots, whatever the batch size."""
        fill = self.s.rollout_fill
        if fill not in ("fresh", "sequential"):
            return []
        started: list[Trajectory] = []
        m = self.s.group_size
        for g in range(self.num_groups) if groups is None else groups:
            if not self.pool.free(g):
                continue
            mine = [t for t in self.slots[g * m : (g + 1) * m] if t is not None and not t.done]
            if fill == "sequential":
                if mine:
                    continue
                slot = self.pool.take(g, 1)[0]
                started.append(self._place(Trajectory(slot=slot, group=g, kind=FRESH, can_branch=self.s.branching)))
            elif not any(self.can_still_branch(t) for t in mine):
                for slot in self.pool.take(g, self.pool.free(g)):
                    started.append(self._place(Trajectory(slot=slot, group=g, kind=FRESH, can_branch=False)))
        self.stats.fresh += len(started)
        return started

    def finish(self) -> list[Trajectory]:
        """Pad with duplicates if asked (`duplicate`), check every slot holds a finished trajectory, return them."""
        m = self.s.group_size
        if self.s.rollout_fill == "duplicate":
            for g in range(self.num_groups):
                if not self.pool.free(g):
                    continue
                # Slots are handed out in creation order: the highest occupied slot is the last trajectory created.
                last = max((t for t in self.slots[g * m : (g + 1) * m] if t is not None), key=lambda t: t.slot)
                for slot in self.pool.take(g, self.pool.free(g)):
                    self.slots[slot] = last.duplicate(slot)
                    self.stats.duplicates += 1
        finished = [t for t in self.slots if t is not None and t.done]
        if len(finished) != len(self.slots):
            raise RuntimeError(f"rollout ended with {len(finished)} of {len(self.slots)} slots finished")
        return finished


def prompt_keys(prompt_ids: Sequence[Sequence[int]], group_size: int) -> list[int]:
    """For each row, the position within its group of the first row with an equal prompt: rows whose keys differ share
    no prefix, whatever their completions (hard attribution, the tree pages)."""
    keys: list[int] = []
    for g in range(0, len(prompt_ids), group_size):
        first: dict[tuple[int, ...], int] = {}
        for j, ids in enumerate(prompt_ids[g : g + group_size]):
            keys.append(first.setdefault(tuple(ids), j))
    return keys


class TreeDriver:
    """What both drivers of the tree hold: the round driver (`engine.RoundDriver`) and the asynchronous one
    (`stream_driver.StreamDriver`). The settings, the parts every batch's `RolloutTree` is built from, the tool
    executor, and `toolset`: the tools a trajectory's calls run against (its own environment's methods; None: the
    executor's tools)."""

    def __init__(
        self,
        settings: RolloutSettings,
        protocol: ToolProtocol,
        executor: ToolExecutor,
        policy: BranchPolicy,
        vocab_size: int,
        eos_token_id: int,
        toolset: Callable[[Trajectory], Mapping[str, Any] | None] | None = None,
        frozen_initial: dict[int, float] | None = None,
    ) -> None:
        self.s = settings
        self.protocol = protocol
        self.executor = executor
        self.policy = policy
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.toolset = toolset
        self.frozen_initial = frozen_initial  # initial_entropy="frozen_per_slot": kept by the caller across batches

    def new_tree(self, prompt_ids: Sequence[list[int]], environments: Sequence[Any] | None) -> RolloutTree:
        return RolloutTree(
            self.s,
            prompt_ids,
            self.protocol,
            self.policy,
            self.vocab_size,
            self.eos_token_id,
            environments,
            self.frozen_initial,
        )


__all__ = [
    "BRANCH",
    "DUPLICATE",
    "FRESH",
    "ROOT",
    "RolloutSettings",
    "RolloutStats",
    "RolloutTree",
    "Segment",
    "ToolProtocol",
    "TreeDriver",
    "prompt_keys",
]
