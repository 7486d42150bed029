"""The tree logic (`arpo_trl/rollout/tree.py`) without a model. What it reads and where it stops, checked with
values (issue 11's surviving mutants):

- H_initial and H_t are the window statistic of the entropies recorded for exactly those tokens: the first k of
  the root, and the first k after tool result t (or, with lagged timing, the first k of the segment before it);
  H_initial is measured afresh in every batch.
- The budget: a completion reaches max_completion_length exactly and never exceeds it, tool tokens included; a
  result that exactly fills the budget is kept (as TRL's tool loop keeps it), one token more is not; calls that no
  result can follow are not run.
- Seeds: ranks draw different decisions, the same seed the same ones.
"""

import math
import re

import pytest
from fakes import ScriptedGenerator, scripted_segment

from arpo_trl.rollout.branching import BranchPolicy, rollout_seed
from arpo_trl.rollout.entropy import window_entropy
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.round_driver import RolloutSettings, RoundDriver, Segment
from arpo_trl.rollout.trajectory import DUPLICATE, Trajectory
from arpo_trl.rollout.tree import RolloutTree
from arpo_trl.testing import calc
from arpo_trl.tools import ToolCall, ToolExecutor, ToolResult

K = 4


def rollout(tok, generator=None, calls=2, m=4, n=2, alpha=1.0, beta=0.0, prompt=None, executor=None, **kw):
    values = dict(group_size=m, initial_rollouts=n, entropy_window=K, entropy_normalization="mean")
    values.update(kw)
    engine = RoundDriver(
        RolloutSettings(**values),
        generator or ScriptedGenerator(tok, calls),
        TagProtocol(tok, ["calc"]),
        executor or ToolExecutor([calc], timeout=5),
        BranchPolicy(alpha, beta, seed=0),
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
    )
    return engine.run([prompt or tok.encode("Add 1 and 2.")] * m)


def window(values):
    return window_entropy(values, K, "mean", 1)


def segments(traj):
    """(start, end) of each run of sampled tokens."""
    runs, start = [], None
    for i, sampled in enumerate(traj.tool_mask + [0]):
        if sampled and start is None:
            start = i
        elif not sampled and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("timing", ["after_tool", "lagged"])
def test_decisions_read_the_window_of_exactly_the_right_tokens(tokenizer, timing):
    trajs, stats = rollout(tokenizer, entropy_timing=timing, m=8, n=2)
    decisions = 0
    for t in trajs:
        root = t if t.parent is None else None
        if root is not None:
            assert t.h_initial == pytest.approx(window(t.token_entropies[:K]))  # the root's first k tokens
        for event in t.branch_events:
            decisions += 1
            runs = segments(t)
            if timing == "after_tool":  # the first k tokens sampled after the result ending at `position`
                start = event.position
                assert t.tool_mask[start - 1] == 0 and t.tool_mask[start] == 1
            else:  # the segment before the call that this result answers
                start = max(s for s, e in runs if e <= event.position)
            h_t = window(t.token_entropies[start : start + K])
            assert not any(math.isnan(x) for x in t.token_entropies[start : start + K])
            assert event.delta_h == pytest.approx(h_t - t.h_initial)
    assert decisions == len(stats.entropy_deltas) > 0
    if timing == "lagged":  # at a first call the segment before it is the root's first: ΔH = 0 exactly
        firsts = [e for t in trajs if t.parent is None for e in t.branch_events[:1]]
        assert firsts and all(e.delta_h == 0.0 for e in firsts)


def test_h_initial_is_measured_afresh_in_every_batch(tokenizer):
    first, _ = rollout(tokenizer)
    other = tokenizer.encode("Add 5, 6 and 7, please.")
    second, _ = rollout(tokenizer, prompt=other)
    _, entropies, _ = scripted_segment(tokenizer, other, 10_000, 2)
    assert second[0].h_initial == pytest.approx(window(entropies[:K]))
    assert second[0].h_initial != pytest.approx(first[0].h_initial)


class FixedLength:
    """Answers `length` model tokens at once (no call), then EOS."""

    def __init__(self, tok, length):
        self.tok, self.length = tok, length

    def __call__(self, prefixes, max_new_tokens, need_entropy=None):
        out = []
        for budget in max_new_tokens:
            ids = [self.tok.encode(" a", add_special_tokens=False)[0]] * self.length + [self.tok.eos_token_id]
            finish = "eos" if len(ids) <= budget else "length"
            out.append(Segment(ids[:budget], [1.0] * min(budget, len(ids)), finish))
        return out


@pytest.mark.parametrize("budget, reason", [(11, "eos"), (10, "length")])
def test_a_completion_reaches_the_budget_exactly_and_an_eos_on_it_is_an_eos(tokenizer, budget, reason):
    trajs, _ = rollout(tokenizer, FixedLength(tokenizer, 10), max_completion_length=budget, alpha=0.0)
    for t in trajs:
        assert len(t.completion_ids) == min(budget, 11)
        assert t.finish_reason == reason  # 10 tokens + EOS in a budget of 11 ended on its EOS, not on the length


def result_length(tok, text="3"):
    from arpo_trl.tools import format_result

    return len(tok.encode(format_result(text), add_special_tokens=False))


def first_call(tok):
    """The scripted model's first segment (a calc call) after the test prompt, and the call's result."""
    ids, _, _ = scripted_segment(tok, tok.encode("Add 1 and 2."), 10_000, 1)
    expression = tok.decode(ids).split("<calc>")[1].split("</calc>")[0]
    return ids, calc(expression)


@pytest.mark.parametrize("extra, kept", [(0, True), (-1, False)])
def test_a_result_that_fills_the_budget_exactly_is_kept(tokenizer, extra, kept):
    """The call segment, then a result of r tokens: a budget of call + r keeps it (nothing left to sample, as in
    TRL's tool loop); call + r − 1 drops it."""
    call, value = first_call(tokenizer)
    budget = len(call) + result_length(tokenizer, value) + extra
    trajs, stats = rollout(tokenizer, calls=1, n=4, alpha=0.0, max_completion_length=budget)
    for t in trajs:
        assert len(t.completion_ids) <= budget
        if kept:
            assert len(t.completion_ids) == budget and t.finish_reason == "length"
            assert t.tool_mask[-1] == 0 and len(t.tool_events) == 1
        else:
            assert t.completion_ids == call and t.finish_reason == "no_room_for_result"
    assert stats.tool_executions == 4  # the call ran in both cases (a result could have fitted)


def test_calls_that_no_result_can_follow_are_not_run(tokenizer):
    ran = []

    def counting(expression: str) -> str:
        ran.append(expression)
        return calc(expression)

    counting.__name__ = "calc"
    call, _ = first_call(tokenizer)
    shortest = result_length(tokenizer, "")
    trajs, stats = rollout(
        tokenizer, calls=1, n=4, alpha=0.0, max_completion_length=len(call) + shortest - 1,
        executor=ToolExecutor([counting], timeout=5),
    )  # fmt: skip
    assert ran == [] and stats.tool_executions == 0  # no search/API call wasted
    assert all(t.finish_reason == "no_room_for_result" for t in trajs)


def test_completions_never_exceed_the_budget_with_tool_tokens(tokenizer):
    for budget in range(8, 60, 3):
        trajs, _ = rollout(tokenizer, calls=3, m=4, n=2, max_completion_length=budget)
        assert all(len(t.completion_ids) <= budget and t.done for t in trajs)
        assert any(len(t.completion_ids) == budget for t in trajs) or all(
            t.finish_reason in ("eos", "no_room_for_result") for t in trajs
        )


def test_seeds_differ_by_rank_and_repeat_by_value():
    draws = {}
    for rank in (0, 1):
        policy = BranchPolicy(0.5, 0.0, seed=0)
        policy.reseed(rollout_seed(42, rank, "train", 7, 0))
        draws[rank] = [policy.decide(0.0).fork for _ in range(64)]
    assert draws[0] != draws[1]  # ranks draw different decisions
    again = BranchPolicy(0.5, 0.0, seed=0)
    again.reseed(rollout_seed(42, 0, "train", 7, 0))
    assert [again.decide(0.0).fork for _ in range(64)] == draws[0]
    assert rollout_seed(42, 0, "train", 7, 0) != rollout_seed(42, 0, "eval", 7, 0)  # evaluation counts apart


class CallsEndingWithEos:
    """Every segment is a tool call whose turn ends with the model's EOS (as a chat-template turn does)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, prefixes, max_new_tokens, need_entropy=None):
        ids = self.tok.encode(" <calc>1+1</calc>", add_special_tokens=False) + [self.tok.eos_token_id]
        return [Segment(list(ids), [1.0] * len(ids), "stop") for _ in prefixes]


def test_the_call_limit_adds_no_second_eos_after_a_turns_own(tokenizer):
    trajs, stats = rollout(tokenizer, CallsEndingWithEos(tokenizer), n=4, alpha=0.0, max_tool_rounds=1)
    eos = tokenizer.eos_token_id
    for t in trajs:
        assert t.finish_reason == "call_limit" and stats.call_limit_hits == 4
        assert t.completion_ids[-1] == eos and t.completion_ids[-2] != eos  # the sampled EOS only
        assert t.tool_mask[-1] == 1


# -------------------------- tests written for mutants that survived `make mutate` (tests/README.md, "Mutation testing")


class Protocol:
    """Every segment ends with one call; results and limit notices are fixed token runs; arguments recorded."""

    min_result_tokens = 1

    def __init__(self, result_len=2):
        self.result_len, self.seen = result_len, []

    def calls(self, traj, segment):
        return [ToolCall("calc", "1")]

    def result_ids(self, traj, calls, results):
        self.seen.append((traj, calls, results))
        return [9] * self.result_len

    def limit_notice_ids(self, traj, calls, limit):
        self.seen.append((traj, calls, limit))
        return [8] * self.result_len


EOS = 0


def make_tree(m=4, n=1, result_len=2, alpha=1.0, **kw):
    values = dict(group_size=m, initial_rollouts=n, entropy_window=2, entropy_normalization="mean")
    values.update(kw)
    protocol = Protocol(result_len)
    tree = RolloutTree(RolloutSettings(**values), [[7]] * m, protocol, BranchPolicy(alpha, 0.0, seed=0), 10, EOS)
    return tree, protocol


def test_tool_events_record_each_results_position_name_and_outcome():
    tree, protocol = make_tree(max_completion_length=20)
    (root,) = tree.start()
    root.extend([1, 2, 3], sampled=True)
    calls = [ToolCall("calc", "1"), ToolCall("search", "q")]
    results = [ToolResult("x", error=True), ToolResult("y", error=True, timed_out=True)]
    tree.apply_results(root, calls, results, None)
    assert protocol.seen == [(root, calls, results)]
    assert [(e.position, e.name, e.error, e.timed_out) for e in root.tool_events] == [
        (3, "calc", True, False),
        (3, "search", True, True),
    ]
    assert root.completion_ids[3:] == [9, 9] and root.tool_mask[3:] == [0, 0] and root.tool_rounds == 1
    tree.apply_results(root, [calls[1]], [results[1]], None)
    assert (tree.stats.tool_timeouts, tree.stats.tool_errors, root.tool_rounds) == (2, 3, 2)


def test_a_result_that_does_not_fit_ends_the_trajectory_and_one_that_fills_it_ends_on_length():
    tree, _ = make_tree(max_completion_length=5)
    (root,) = tree.start()
    root.extend([1, 2, 3, 4], sampled=True)
    assert tree.apply_results(root, [ToolCall("calc", "1")], [ToolResult("x")], None) == []
    assert root.finish_reason == "no_room_for_result" and root.completion_ids == [1, 2, 3, 4] and not root.tool_events
    assert root.tool_rounds == 0
    tree, _ = make_tree(max_completion_length=5)
    (root,) = tree.start()
    root.extend([1, 2, 3], sampled=True)
    tree.apply_results(root, [ToolCall("calc", "1")], [ToolResult("x")], None)
    assert root.finish_reason == "length" and len(root.completion_ids) == 5 and not root.awaiting_entropy


def test_a_call_limit_notice_records_a_clean_tool_event():
    tree, protocol = make_tree(max_completion_length=20, max_tool_rounds=0, call_limit_action="message")
    (root,) = tree.start()
    root.extend([1], sampled=True)
    calls = [ToolCall("calc", "1")]
    assert tree.admit(root, calls) is False
    assert protocol.seen == [(root, calls, 0)]
    assert [(e.position, e.name, e.error, e.timed_out) for e in root.tool_events] == [(1, "calc", False, False)]
    assert root.completion_ids == [1, 8, 8] and root.tool_mask == [1, 0, 0] and not root.done


@pytest.mark.parametrize("room, ends_with_eos", [(0, False), (1, False), (1, True), (2, False)])
def test_the_call_limit_appends_one_eos_when_it_fits_and_none_after_a_sampled_eos(room, ends_with_eos):
    tree, _ = make_tree(max_completion_length=6, max_tool_rounds=0)
    (root,) = tree.start()
    ids = [1, 2, 3, 4, 5, 6][: 6 - room]
    if ends_with_eos:
        ids[-1] = EOS
    root.extend(ids, sampled=True)
    assert tree.admit(root, [ToolCall("calc", "1")]) is False and root.finish_reason == "call_limit"
    added = 1 if room > 0 and not ends_with_eos else 0
    assert root.completion_ids == ids + [EOS] * added and tree.stats.call_limit_hits == 1


def test_the_call_limit_with_a_notice_but_no_room_ends_like_eos():
    for room, reason in ((0, "call_limit"), (1, "no_room_for_result")):
        tree, _ = make_tree(max_completion_length=6, max_tool_rounds=0, call_limit_action="message")
        (root,) = tree.start()
        root.extend([1] * (6 - room), sampled=True)
        assert tree.admit(root, [ToolCall("calc", "1")]) is False
        assert root.finish_reason == reason  # room 1: the 2-token notice cannot fit


def test_a_discarded_trajectory_runs_no_calls():
    tree, _ = make_tree()
    (root,) = tree.start()
    root.finish_reason = "discarded"
    assert tree.admit(root, [ToolCall("calc", "1")]) is False


def decided_root(tree, h_initial=0.2, tokens=3):
    (root,) = tree.start()
    root.extend([1] * tokens, sampled=True)
    root.h_initial, root.awaiting_entropy = h_initial, True
    return root


def test_a_decision_records_h_t_its_probability_and_the_forked_slots():
    tree, _ = make_tree(m=4, n=1, branch_factor=2, alpha=0.25, max_completion_length=10)
    tree.policy = BranchPolicy(1.0, 0.0, seed=0)
    root = decided_root(tree)
    forks = tree.decide(root, 0.7)
    assert root.awaiting_entropy is False
    assert [f.slot for f in forks] == [1, 2] and all(tree.slots[f.slot] is f for f in forks)
    (event,) = root.branch_events
    assert (event.position, event.delta_h, event.probability, event.forked_slots) == (
        3,
        pytest.approx(0.5),
        1.0,
        [1, 2],
    )
    assert tree.stats.entropy_after_tool == [0.7] and tree.stats.branch_probabilities == [1.0]


@pytest.mark.parametrize("h_t, h_initial", [(None, 0.2), (0.5, None)])
def test_no_decision_without_either_window(h_t, h_initial):
    tree, _ = make_tree(max_completion_length=10)
    root = decided_root(tree, h_initial=h_initial)
    assert tree.decide(root, h_t) == [] and not root.branch_events and not root.awaiting_entropy


@pytest.mark.parametrize("branching, can_branch", [(False, True), (True, False)])
def test_no_decision_for_an_unbranchable_trajectory(branching, can_branch):
    tree, _ = make_tree(max_completion_length=10, branching=branching)
    root = decided_root(tree)
    root.can_branch = can_branch
    assert tree.decide(root, 0.5) == [] and not root.branch_events
    assert tree.can_still_branch(root) is False


@pytest.mark.parametrize("room, decides", [(0, False), (1, True)])
def test_a_decision_needs_a_free_slot_and_a_token_left(room, decides):
    tree, _ = make_tree(max_completion_length=3 + room)
    root = decided_root(tree)
    assert bool(tree.decide(root, 0.5)) is decides and bool(root.branch_events) is decides
    tree, _ = make_tree(m=1, max_completion_length=10)
    root = decided_root(tree)
    assert tree.decide(root, 0.5) == [] and not root.branch_events  # no free slot


def test_frozen_initial_entropy_is_read_from_the_slots_record_at_each_decision():
    tree, _ = make_tree(max_completion_length=10, initial_entropy="frozen_per_slot")
    tree.frozen_initial[0] = 0.1
    root = decided_root(tree, h_initial=0.4)
    tree.decide(root, 0.5)
    assert root.h_initial == 0.1 and root.branch_events[0].delta_h == pytest.approx(0.4)
    tree, _ = make_tree(max_completion_length=10)  # per_root: the slot's record is not consulted
    tree.frozen_initial[0] = 0.1
    root = decided_root(tree, h_initial=0.4)
    tree.decide(root, 0.5)
    assert root.h_initial == 0.4 and root.branch_events[0].delta_h == pytest.approx(0.1)
    tree, _ = make_tree(max_completion_length=10, initial_entropy="frozen_per_slot")
    root = decided_root(tree, h_initial=0.4)  # nothing recorded for the slot: its own H_initial stands
    tree.decide(root, 0.5)
    assert root.h_initial == 0.4


def test_a_fork_into_a_lent_slot_discards_the_fresh_rollout_there():
    tree, _ = make_tree(m=3, n=1, rollout_fill="speculative", max_completion_length=10)
    root, *fresh = tree.start()
    root.extend([1, 2], sampled=True)
    root.h_initial, root.awaiting_entropy = 0.2, True
    (fork,) = tree.decide(root, 0.5)
    assert fork.slot == 2 and fresh[1].finish_reason == "discarded" and fresh[0].finish_reason is None
    assert (tree.stats.fresh, tree.stats.discarded) == (1, 1)


@pytest.mark.parametrize(
    "done, room, rounds, awaiting, expected",
    [
        (True, 5, 0, False, False),
        (False, 0, 0, False, False),
        (False, 1, 0, False, True),
        (False, 5, 1, False, False),  # at the call limit: no further decision
        (False, 5, 1, True, True),  # ...unless one is pending at the last result
        (False, 5, 0, False, True),
    ],
)
def test_can_still_branch(done, room, rounds, awaiting, expected):
    tree, _ = make_tree(max_completion_length=5, max_tool_rounds=1)
    (root,) = tree.start()
    root.extend([1] * (5 - room), sampled=True)
    root.tool_rounds, root.awaiting_entropy = rounds, awaiting
    if done:
        root.finish_reason = "eos"
    assert tree.can_still_branch(root) is expected


@pytest.mark.parametrize("budget, expected", [({0: 3}, 2), ({0: 1}, 1), ({0: 0}, 0), ({}, 0), ({0: -1}, 0)])
def test_speculate_makes_at_most_z_copies_within_the_groups_budget(budget, expected):
    tree, _ = make_tree(branch_factor=2, speculative_forks=True, max_completion_length=10)
    root = decided_root(tree)
    budget = dict(budget)  # consumed in place: the parameter is not reused
    before = budget.get(0, 0)
    copies = tree.speculate(root, budget)
    assert len(copies) == expected and budget.get(0, 0) == before - expected
    assert all(c.parent == 0 and c.completion_ids == root.completion_ids for c in copies)


@pytest.mark.parametrize("field, value", [("awaiting_entropy", False), ("can_branch", False), ("h_initial", None)])
def test_speculate_copies_only_a_row_about_to_decide(field, value):
    tree, _ = make_tree(branch_factor=2, speculative_forks=True, max_completion_length=10)
    root = decided_root(tree)
    setattr(root, field, value)
    assert tree.speculate(root, {0: 3}) == []


@pytest.mark.parametrize("room, expected", [(0, 0), (1, 2)])
def test_speculate_needs_a_token_left(room, expected):
    tree, _ = make_tree(branch_factor=2, speculative_forks=True, max_completion_length=3 + room)
    root = decided_root(tree)
    assert len(tree.speculate(root, {0: 3})) == expected


@pytest.mark.parametrize("room, admitted", [(0, False), (1, True)])
def test_without_a_declared_minimum_a_one_token_result_may_still_fit(room, admitted):
    tree, protocol = make_tree(max_completion_length=5)
    del Protocol.min_result_tokens
    try:
        (root,) = tree.start()
        root.extend([1] * (5 - room), sampled=True)
        assert tree.admit(root, [ToolCall("calc", "1")]) is admitted
    finally:
        Protocol.min_result_tokens = 1


class NoCalls(Protocol):
    def calls(self, traj, segment):
        return []


def plain_tree(prompts, m, n=1, protocol=None, frozen=None, **kw):
    values = dict(group_size=m, initial_rollouts=n, entropy_window=2, entropy_normalization="mean")
    values.update(kw)
    return RolloutTree(RolloutSettings(**values), prompts, protocol or NoCalls(), BranchPolicy(1.0, 0.0, seed=0), 10,
                       EOS, frozen_initial=frozen)  # fmt: skip


def test_the_tree_names_a_batch_that_is_not_groups_of_one_prompt():
    with pytest.raises(ValueError, match=r"^5 prompts cannot form groups of M=4$"):
        plain_tree([[7]] * 5, m=4)
    tree = plain_tree([[7]] * 4 + [[8, 9]] * 4, m=4)  # each group its own prompt
    assert tree.row_prompts == [[7]] * 4 + [[8, 9]] * 4 and (tree.stats.groups, tree.stats.completions) == (2, 8)
    # Rows of a group may differ (per-row reset observations): tests/rollout/test_per_root_prompts.py


def test_the_context_guard_refuses_a_prompt_one_token_short_of_the_context_and_room_stops_one_below_it():
    """Prompt + completion stay below the model's context (TRL keeps the last position for the next token)."""
    message = "a prompt of 9 tokens leaves no room for a completion within the model's context of 10 tokens; "
    with pytest.raises(ValueError, match=f"^{re.escape(message)}shorten the prompts$"):
        plain_tree([[1] * 9] * 2, m=2, max_model_len=10)
    tree = plain_tree([[1] * 8] * 2, m=2, max_model_len=10, max_completion_length=50)
    (root,) = tree.start()
    assert tree.room(root) == 1  # 10 - 1 - 8
    root.extend([3], sampled=True)
    assert tree.room(root) == 0


@pytest.mark.parametrize(
    "finish, ids, room_left, reason",
    [("eos", [3, EOS], 5, "eos"), ("length", [3], 5, "length"), ("stop", [3], 1, "stop"), ("stop", [3], 0, "length")],
)
def test_absorb_records_why_a_segment_without_calls_ended(finish, ids, room_left, reason):
    tree = plain_tree([[7]] * 2, m=2, max_completion_length=len(ids) + room_left)
    (root,) = tree.start()
    assert tree.absorb(root, Segment(ids, [0.5] * len(ids), finish, logprobs=[-0.25] * len(ids))) == []
    assert root.finish_reason == reason
    assert root.logprobs == [-0.25] * len(ids)  # the sampler's, carried for TRL's importance sampling


def test_needs_entropy_reads_branchability_and_the_frozen_slots():
    tree = plain_tree([[7]] * 4, m=4, n=2)
    fresh = Trajectory(slot=3, group=0, kind="fresh", can_branch=False)
    assert tree.pool.free(0) and not tree.needs_entropy(fresh)  # a fresh rollout never branches: no window read
    settled = Trajectory(slot=1, group=0, h_initial=1.0)  # H_initial known, no tool result pending
    assert not tree.needs_entropy(settled)
    frozen = plain_tree([[7]] * 4, m=4, n=2, frozen={0: 0.5}, initial_entropy="frozen_per_slot")
    assert frozen.needs_entropy(settled)  # slot 1 has no frozen H yet: its first segment is measured
    assert not frozen.needs_entropy(Trajectory(slot=0, group=0, h_initial=1.0))  # slot 0's is frozen


def test_speculative_fresh_rollouts_start_unbranchable():
    tree = plain_tree([[7]] * 4, m=4, rollout_fill="speculative")
    started = tree.start()
    assert [t.kind for t in started] == ["root", "fresh", "fresh", "fresh"]
    assert all(t.can_branch is False for t in started[1:])


def _two_groups(fill, n=1):
    tree = plain_tree([[7]] * 2 + [[8]] * 2, m=2, n=n, rollout_fill=fill)
    return tree, tree.start()


def test_fill_reaches_every_group_whatever_the_groups_before_it():
    tree, (root0, root1) = _two_groups("fresh")
    tree.pool.take(0, 1)  # group 0's last slot went to a branch: full
    root1.finish_reason = "eos"  # group 1's tree can no longer branch
    assert [(t.slot, t.group, t.can_branch) for t in tree.fill()] == [(3, 1, False)]
    tree, (root0, root1) = _two_groups("sequential")
    root1.finish_reason = "eos"  # group 0 still has a live trajectory, group 1 none
    assert [(t.slot, t.group, t.can_branch) for t in tree.fill()] == [(3, 1, True)]
    tree = plain_tree([[7]] * 4, m=4, rollout_fill="sequential", branching=False)
    (root,) = tree.start()
    root.finish_reason = "eos"
    assert [t.can_branch for t in tree.fill()] == [False]  # without branching, no fresh rollout is branchable


def _finished(traj, ids):
    traj.extend(ids, sampled=True)
    traj.finish_reason = "eos"
    return traj


@pytest.mark.parametrize("full_group", [0, 1])
def test_duplicate_fill_copies_each_groups_own_last_trajectory(full_group):
    tree, roots = _two_groups("duplicate")
    for g, root in enumerate(roots):
        _finished(root, [4 + g, EOS])
    full = roots[full_group]
    (slot,) = tree.pool.take(full_group, 1)
    tree.slots[slot] = _finished(full.fork(slot), [6])
    done = tree.finish()
    assert [t.slot for t in done] == [0, 1, 2, 3]
    other = 1 - full_group
    copy = done[2 * other + 1]
    assert copy.kind == DUPLICATE and copy.group == other and copy.completion_ids == roots[other].completion_ids


def test_finish_names_a_rollout_that_left_slots_unfinished():
    tree = plain_tree([[7]] * 2, m=2, n=2)
    first, _ = tree.start()
    first.finish_reason = "eos"
    with pytest.raises(RuntimeError, match=r"^rollout ended with 1 of 2 slots finished$"):
        tree.finish()


def test_extend_marks_missing_logprobs_nan_for_sampled_tokens_and_zero_for_environment_tokens():
    traj = Trajectory(slot=0, group=0)
    traj.extend([1, 2], sampled=True)
    traj.extend([3], sampled=False)
    assert [math.isnan(x) for x in traj.logprobs[:2]] == [True, True] and traj.logprobs[2] == 0.0
