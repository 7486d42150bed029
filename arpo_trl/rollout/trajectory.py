"""The state of a rollout tree: trajectories living in the M slots of their prompt's group.

A group owns slots [g·M, (g+1)·M). Slots [g·M, g·M + N) start as the N roots (trajectory-level samples); the
other M − N slots are free. A branch is a copy of a live trajectory's exact token state right after a tool
result, moved into a free slot; a fresh rollout is a new root placed in a free slot once branching can no
longer use it (with speculative fill: from the start, until a branch reclaims the slot). Each slot ends holding
exactly one finished trajectory, so the group has exactly M completions.

The M rows of a group need not share one prompt (a TRL environment's `reset` may append a random observation to
each row's prompt). A root or a fresh rollout starts from its own row's prompt (and environment); a branch
continues its parent's prompt, so a trajectory carries the prompt it was generated from (`prompt_ids`) and the row
that prompt came from (`origin`).
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .environments import fork_environment

ROOT, BRANCH, FRESH, DUPLICATE = "root", "branch", "fresh", "duplicate"


@dataclass
class ToolEvent:
    """A tool call inside a completion. `inherited` when it happened in a prefix copied from a parent."""

    position: int  # index in completion_ids where the result tokens start
    name: str
    error: bool
    timed_out: bool
    inherited: bool = False


@dataclass
class BranchEvent:
    """A branching decision taken at the tool result ending at `position` (paper: node after tool call t)."""

    position: int
    delta_h: float
    probability: float
    forked_slots: list[int]
    consecutive: int = 0  # AEPO: c, the prompt's consecutive forking rounds before this decision
    penalty: float = 0.0  # AEPO: P̂(c), the share of the branch probability the penalty took


@dataclass
class Trajectory:
    slot: int
    group: int
    kind: str = ROOT
    # The prompt this trajectory continues and the row it came from: its own slot for a root or a fresh rollout, the
    # parent's for a branch (a shared list object, not a copy: rows of one prompt hold it once).
    prompt_ids: list[int] = field(default_factory=list)
    origin: int | None = None
    completion_ids: list[int] = field(default_factory=list)
    tool_mask: list[int] = field(default_factory=list)  # 1: sampled by the model, 0: written by the environment
    token_entropies: list[float] = field(default_factory=list)  # H of each token's distribution; NaN for env tokens
    # log p of each sampled token under the sampler (vLLM; NaN when the backend gives none), 0 for env tokens
    logprobs: list[float] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat_template format: the turns so far
    tool_rounds: int = 0
    tool_events: list[ToolEvent] = field(default_factory=list)
    branch_events: list[BranchEvent] = field(default_factory=list)
    parent: int | None = None  # slot of the trajectory this one was copied from
    fork_position: int | None = None  # completion length at the fork (the shared prefix)
    can_branch: bool = True
    h_initial: float | None = None  # H of the first k tokens of this tree's root; inherited by branches
    awaiting_entropy: bool = False  # after_tool timing: the next segment's first k tokens decide branching
    # TRL environment (`environment_factory`) this trajectory's tool calls act on; a fork gets its own copy.
    env: Any = None
    # "eos", "length", "call_limit", "no_room_for_result", "stop"; "discarded": a speculative fresh rollout whose
    # slot a branch reclaimed (it leaves the group)
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def extend(
        self, ids: list[int], sampled: bool, entropies: list[float] | None = None, logprobs: list[float] | None = None
    ) -> None:
        self.completion_ids.extend(ids)
        self.tool_mask.extend([1 if sampled else 0] * len(ids))
        self.token_entropies.extend(entropies if entropies is not None else [math.nan] * len(ids))
        if logprobs is None:
            logprobs = [math.nan if sampled else 0.0] * len(ids)
        self.logprobs.extend(logprobs)

    def fork(self, slot: int) -> Trajectory:
        """A branch in `slot` sharing this trajectory's tokens exactly; the tools already run are not re-run."""
        child = Trajectory(
            slot=slot,
            group=self.group,
            kind=BRANCH,
            prompt_ids=self.prompt_ids,
            origin=self.origin,
            completion_ids=list(self.completion_ids),
            tool_mask=list(self.tool_mask),
            token_entropies=list(self.token_entropies),
            logprobs=list(self.logprobs),
            messages=copy.deepcopy(self.messages),
            tool_rounds=self.tool_rounds,
            tool_events=[dataclass_replace_inherited(e) for e in self.tool_events],
            parent=self.slot,
            fork_position=len(self.completion_ids),
            can_branch=self.can_branch,
            h_initial=self.h_initial,
            env=None if self.env is None else fork_environment(self.env),
        )
        return child

    def duplicate(self, slot: int) -> Trajectory:
        """A finished copy of this trajectory (rollout_fill='duplicate', the official padding)."""
        twin = self.fork(slot)
        twin.kind, twin.finish_reason = DUPLICATE, self.finish_reason
        twin.fork_position = len(self.completion_ids)
        return twin


def dataclass_replace_inherited(event: ToolEvent) -> ToolEvent:
    return ToolEvent(event.position, event.name, event.error, event.timed_out, inherited=True)


class SlotPool:
    """Free slots of each group, handed out lowest first (branches, then fresh rollouts).

    With speculative fill, the free slots are lent at once to fresh rollouts (`lend`); they still count as free,
    and `take` reclaims them, highest slot first, once no truly free slot is left: the caller discards the
    fresh rollout living there. The reclaimed slot is chosen by position, never by content.
    """

    def __init__(self, num_groups: int, group_size: int, initial: int) -> None:
        self._free = [deque(range(g * group_size + initial, (g + 1) * group_size)) for g in range(num_groups)]
        self._lent: list[list[int]] = [[] for _ in range(num_groups)]

    def free(self, group: int) -> int:
        return len(self._free[group]) + len(self._lent[group])

    def take(self, group: int, count: int) -> list[int]:
        taken = [self._free[group].popleft() for _ in range(min(count, len(self._free[group])))]
        while len(taken) < count and self._lent[group]:
            taken.append(self._lent[group].pop())
        return taken

    def lend(self, group: int) -> list[int]:
        """Lend every free slot of `group` to speculative fresh rollouts; they stay reclaimable by `take`."""
        slots = list(self._free[group])
        self._free[group].clear()
        self._lent[group].extend(slots)
        return slots
