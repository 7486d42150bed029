"""Rollout trees rebuilt from recorded trajectories (the data model behind `render_tree`).

A prompt's M trajectories (its *group*) form a tree (paper §3.1, Fig. 3): the N roots start at the prompt, and a
branch shares its parent's tokens exactly up to the tool result it was forked after. When the rows of a group start
from different prompts (a TRL environment's `reset` appends a random observation to each), the group is a forest:
one tree per distinct prompt (`GroupTree.prompts`), each holding the rows that continue it (a branch continues its
parent's prompt). Here a **node** is one
*segment* of a completion: the tokens the model sampled (ending with a tool call, or with the final answer)
followed by the environment's tool-result tokens (``tool_mask == 0``). Segments end where the model resumes after
a result, which is exactly where ARPO forks, so a branch's path is its parent's path up to the fork node.

The tree is a trie over segments: two rows pass through the same node iff their prompts are equal and their
completions agree token for token up to that node's end. That is the sharing `arpo_trl.advantages.hard_attribution` averages over, so rows whose
segments coincide by chance share a node too (and a ``duplicate`` row ends on its source's leaf).

Per node the builder collects what the paper's algorithm looked at there:

- the tool call(s) whose result the node carries (name, error, timeout);
- the branching decision taken after that result (`BranchEvent`): ΔH_t = H_t − H_initial, the probability
  P_t = clip(α + β·ΔH_t, 0, 1) and the forked slots; H_t itself is H_initial + ΔH_t;
- H_initial on the first node of a root (the window of its first k tokens);
- when per-token entropies were recorded, H of the window of the node's first k sampled tokens (for the node
  that follows tool result t in the after_tool timing, that is H_t);
- the range of the hard advantages Â^hard_{i,t} over the node's sampled tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..advantages import hard_attribution
from ..rollout.entropy import window_entropy
from ..rollout.trajectory import BranchEvent, ToolEvent, Trajectory
from ..rollout.tree import prompt_keys


@dataclass
class Decision:
    """A branching decision at the end of a node, taken by trajectory `slot`."""

    slot: int
    event: BranchEvent
    h_t: float | None  # H_initial + ΔH (None when the row has no H_initial)

    @property
    def forked(self) -> bool:
        return bool(self.event.forked_slots)


@dataclass
class TreeNode:
    """One segment: sampled tokens (a tool call or the final answer), then the tool-result tokens, if any.

    Positions are indices into the completion of every row in `rows` (they agree up to `end`).
    """

    id: int
    group: int
    depth: int  # 1 = first segment after the prompt
    start: int
    end: int
    ids: list[int]
    mask: list[int]  # tool_mask over `ids`: 1 sampled by the model, 0 written by the environment
    origin_slot: int  # the row that created this node (first in slot order, i.e. creation order)
    origin_kind: str  # root / branch / fresh / duplicate
    prompt: int = 0  # index in GroupTree.prompts of the prompt its rows continue
    forked: bool = False  # first node of a branch: the edge into it is a fork
    parent: TreeNode | None = None
    children: list[TreeNode] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # slots passing through
    ending_rows: list[int] = field(default_factory=list)  # slots whose completion ends here
    tool_events: list[ToolEvent] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    h_initial: float | None = None  # set on a root's (or fresh rollout's) first node
    token_entropies: list[float] | None = None  # per token of `ids` (NaN on environment tokens)
    h_window: float | None = None  # H of the first k sampled tokens (needs token entropies)
    hard_range: tuple[float, float] | None = None  # min, max of Â^hard over the sampled tokens

    @property
    def sampled_ids(self) -> list[int]:
        return [t for t, m in zip(self.ids, self.mask) if m]

    @property
    def result_ids(self) -> list[int]:
        return [t for t, m in zip(self.ids, self.mask) if not m]


@dataclass
class Leaf:
    """One row of the group (a finished trajectory) with its reward and advantages."""

    slot: int
    kind: str
    node: TreeNode  # the node its completion ends on
    prompt: int  # index in GroupTree.prompts of the prompt it continues
    finish_reason: str | None
    parent: int | None
    fork_position: int | None
    length: int
    tool_calls: int
    reward: float
    advantage: float  # soft: Â_i on every token of the row (GRPO)
    hard_last: float  # mean Â^hard over the sampled tokens of its last node
    hard_mean: float  # mean Â^hard over all its sampled tokens


@dataclass
class GroupTree:
    """The rollout tree of one prompt: a virtual root (the prompt) whose children are the first segments. With rows
    that start from different prompts, one virtual root per distinct prompt (`prompts`, in slot order)."""

    group: int
    prompt_ids: list[int]  # the first row's prompt (= prompts[0])
    roots: list[TreeNode]
    nodes: list[TreeNode]
    leaves: list[Leaf]
    prompts: list[list[int]] = field(default_factory=list)  # the distinct prompts of the group's rows

    def __post_init__(self) -> None:
        if not self.prompts:
            self.prompts = [list(self.prompt_ids)]

    @property
    def depth(self) -> int:
        return max((n.depth for n in self.nodes), default=0)


def mask_spans(tool_mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each segment: a segment ends where the model resumes after environment tokens."""
    bounds = [0]
    for i in range(1, len(tool_mask)):
        if tool_mask[i - 1] == 0 and tool_mask[i] == 1:
            bounds.append(i)
    bounds.append(len(tool_mask))
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _as_list(values: Any, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(
                f"{name} must be one value per row (B,), got shape {tuple(values.shape)}; for hard attribution "
                "pass the sequence-level advantages Â_i (hard ones are computed here)"
            )
        return [float(v) for v in values.detach().float().cpu().tolist()]
    out = [float(v) for v in values]
    return out


def _window(values: Sequence[float], k: int, normalization: str, vocab_size: int | None) -> float | None:
    sampled = [v for v in values if not math.isnan(v)]
    if not sampled or (normalization != "mean" and not vocab_size):
        return None
    return window_entropy(sampled, k, normalization, vocab_size or 1)


def build_trees(
    trajectories: Sequence[Trajectory],
    prompt_ids: Sequence[Sequence[int]],
    rewards: Sequence[float] | torch.Tensor,
    advantages: Sequence[float] | torch.Tensor,
    *,
    groups: Sequence[int] | None = None,
    token_entropies: Sequence[Sequence[float] | None] | None = None,
    entropy_window: int = 20,
    entropy_normalization: str = "sum_lnV",
    vocab_size: int | None = None,
) -> list[GroupTree]:
    """Rebuild the rollout tree of each group from a batch's finished trajectories.

    Args:
        trajectories: B finished trajectories in slot order (``RolloutResult.trajectories``); groups are the M
            contiguous slots of one prompt.
        prompt_ids: the B prompts (``RolloutResult.prompt_ids``: each row's own, a branch's is its parent's).
        rewards: (B,) rewards R_i.
        advantages: (B,) sequence-level (soft) advantages Â_i; the hard ones, Â^hard_{i,t}, are derived here with
            `hard_attribution`.
        groups: which groups to build (default: all).
        token_entropies: per row, the entropy of every completion token's distribution (NaN or None on tool-result
            tokens). Default: each trajectory's ``token_entropies`` attribute when it has one.
        entropy_window: k, tokens per entropy window.
        entropy_normalization: how a window becomes one number (see `arpo_trl.rollout.entropy.window_entropy`).
        vocab_size: V, needed by the ``sum_lnV`` / ``sum_V`` normalizations.
    """
    b = len(trajectories)
    if b == 0:
        return []
    if [t.slot for t in trajectories] != list(range(b)):
        raise ValueError("trajectories must be the whole batch in slot order (slot i at index i)")
    if len(prompt_ids) != b:
        raise ValueError(f"{len(prompt_ids)} prompts for {b} trajectories")
    reward_list, adv_list = _as_list(rewards, "rewards"), _as_list(advantages, "advantages")
    if len(reward_list) != b or len(adv_list) != b:
        raise ValueError(f"need one reward and one advantage per row: B={b}, got {len(reward_list)}, {len(adv_list)}")
    num_groups = max(t.group for t in trajectories) + 1
    if b % num_groups:
        raise ValueError(f"{b} rows cannot form {num_groups} equal groups")
    m = b // num_groups
    if any(t.group != t.slot // m for t in trajectories):
        raise ValueError(f"row groups do not match contiguous groups of M={m}")
    if token_entropies is None:
        token_entropies = [getattr(t, "token_entropies", None) for t in trajectories]
    elif len(token_entropies) != b:
        raise ValueError(f"{len(token_entropies)} entropy rows for {b} trajectories")

    wanted = range(num_groups) if groups is None else groups
    return [
        _build_group(
            g,
            trajectories[g * m : (g + 1) * m],
            prompt_ids[g * m : (g + 1) * m],
            reward_list[g * m : (g + 1) * m],
            adv_list[g * m : (g + 1) * m],
            token_entropies[g * m : (g + 1) * m],
            entropy_window,
            entropy_normalization,
            vocab_size,
        )
        for g in wanted
    ]


def _hard_table(rows: Sequence[Trajectory], advantages: list[float], keys: Sequence[int]) -> list[list[float]]:
    """Â^hard_{i,t} for the rows of one group (tool-result tokens count as shared prefix, as in the trainer; rows of
    different prompts share nothing: `keys`, from `prompt_keys`, lead every row as the trainer's do)."""
    width = 1 + max(1, max(len(t.completion_ids) for t in rows))
    ids = torch.full((len(rows), width), -1, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.long)
    for i, t in enumerate(rows):
        ids[i, 0] = keys[i]
        ids[i, 1 : 1 + len(t.completion_ids)] = torch.tensor(t.completion_ids, dtype=torch.long)
        valid[i, : 1 + len(t.completion_ids)] = 1
    table = hard_attribution(ids, valid, torch.tensor(advantages, dtype=torch.float64), len(rows))
    return [table[i, 1 : 1 + len(t.completion_ids)].tolist() for i, t in enumerate(rows)]


def _build_group(
    g: int,
    rows: Sequence[Trajectory],
    row_prompts: Sequence[Sequence[int]],
    rewards: list[float],
    advantages: list[float],
    entropies: Sequence[Sequence[float] | None],
    k: int,
    normalization: str,
    vocab_size: int | None,
) -> GroupTree:
    keys = prompt_keys(row_prompts, len(rows))
    prompts = [list(row_prompts[j]) for j in sorted(set(keys))]  # distinct, in slot order
    which = {key: p for p, key in enumerate(sorted(set(keys)))}  # row key -> index in `prompts`
    hard = _hard_table(rows, advantages, keys)
    # (parent id, or −1 − prompt index for a first segment; segment tokens) -> node
    children: dict[tuple[int, tuple[int, ...]], TreeNode] = {}
    nodes: list[TreeNode] = []
    paths: list[list[TreeNode]] = []
    for i, (traj, ents) in enumerate(zip(rows, entropies)):  # slot order = creation order
        mask = traj.tool_mask if len(traj.tool_mask) == len(traj.completion_ids) else [1] * len(traj.completion_ids)
        prompt = which[keys[i]]
        path: list[TreeNode] = []
        parent: TreeNode | None = None
        for start, end in mask_spans(mask):
            key = (parent.id if parent else -1 - prompt, tuple(traj.completion_ids[start:end]))
            node = children.get(key)
            if node is None:
                node = TreeNode(
                    id=len(nodes),
                    group=g,
                    depth=len(path) + 1,
                    start=start,
                    end=end,
                    ids=list(traj.completion_ids[start:end]),
                    mask=list(mask[start:end]),
                    origin_slot=traj.slot,
                    origin_kind=traj.kind,
                    prompt=prompt,
                    parent=parent,
                    forked=traj.fork_position is not None and traj.fork_position == start and start > 0,
                )
                if ents is not None and len(ents) >= end:
                    node.token_entropies = [float("nan") if e is None else float(e) for e in ents[start:end]]
                    node.h_window = _window(node.token_entropies, k, normalization, vocab_size)
                if start == 0:
                    node.h_initial = traj.h_initial
                nodes.append(node)
                children[key] = node
                if parent is not None:
                    parent.children.append(node)
            node.rows.append(traj.slot)
            path.append(node)
            parent = node
        if path:
            path[-1].ending_rows.append(traj.slot)
        paths.append(path)

    # Tool calls and branching decisions, attached to the node whose span holds them.
    for traj, path in zip(rows, paths):
        for event in traj.tool_events:
            if event.inherited:
                continue  # recorded by the row that ran it
            for node in path:
                if node.start <= event.position < node.end:
                    if not any(e.position == event.position and e.name == event.name for e in node.tool_events):
                        node.tool_events.append(event)
                    break
        for event in traj.branch_events:
            for node in path:
                if node.end == event.position:
                    h_t = None if traj.h_initial is None else traj.h_initial + event.delta_h
                    node.decisions.append(Decision(traj.slot, event, h_t))
                    break

    # Hard advantages per node (identical on every row through it) and per leaf.
    leaves = []
    for i, (traj, path) in enumerate(zip(rows, paths)):
        row_hard = hard[i]
        mask = traj.tool_mask if len(traj.tool_mask) == len(traj.completion_ids) else [1] * len(traj.completion_ids)
        for node in path:
            if node.hard_range is None:
                span = [row_hard[p] for p in range(node.start, node.end) if mask[p]] or row_hard[node.start : node.end]
                node.hard_range = (min(span), max(span))
        own = [row_hard[p] for p in range(len(row_hard)) if mask[p]] or row_hard or [advantages[i]]
        last = path[-1] if path else None
        last_vals = [row_hard[p] for p in range(last.start, last.end) if mask[p]] if last else []
        if last is None:  # an empty completion: a leaf hanging on the prompt
            last = TreeNode(
                id=len(nodes),
                group=g,
                depth=1,
                start=0,
                end=0,
                ids=[],
                mask=[],
                origin_slot=traj.slot,
                origin_kind=traj.kind,
                prompt=which[keys[i]],
                rows=[traj.slot],
                ending_rows=[traj.slot],
            )
            nodes.append(last)
        leaves.append(
            Leaf(
                slot=traj.slot,
                kind=traj.kind,
                node=last,
                prompt=which[keys[i]],
                finish_reason=traj.finish_reason,
                parent=traj.parent,
                fork_position=traj.fork_position,
                length=len(traj.completion_ids),
                tool_calls=len(traj.tool_events),
                reward=rewards[i],
                advantage=advantages[i],
                hard_last=sum(last_vals) / len(last_vals) if last_vals else advantages[i],
                hard_mean=sum(own) / len(own),
            )
        )
    roots = [n for n in nodes if n.parent is None]
    return GroupTree(group=g, prompt_ids=prompts[0], roots=roots, nodes=nodes, leaves=leaves, prompts=prompts)
