"""Tests written for mutants that survived `make mutate` (tests/README.md, "Mutation testing"): each checks a
behaviour of the model-free rollout core or of the advantages that no other test pinned down."""

import asyncio
import math
import re
import threading
import time
import zlib

import pytest
import torch
from fakes import CountingGenerator, ScriptedEngine, rollout, scripted_segment, settings
from transformers import PythonBackend

from arpo_trl.advantages import hard_attribution
from arpo_trl.rollout.branching import BranchPolicy
from arpo_trl.rollout.entropy import (
    EntropyRecorder,
    output_logit_transform,
    token_entropy,
    truncated_entropy,
    truncated_token_entropy,
    window_entropy,
)
from arpo_trl.rollout.environments import NOT_TOOLS, check_forkable, environment_tools, fork_environment
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.stream_driver import StreamDriver
from arpo_trl.rollout.trajectory import DUPLICATE, SlotPool, ToolEvent, Trajectory
from arpo_trl.rollout.tree import RolloutSettings, RolloutTree, Segment
from arpo_trl.rollout.vllm_engine import StreamUpdate
from arpo_trl.testing import calc
from arpo_trl.tools import ToolCall, ToolExecutor, ToolResult

# ---------------------------------------------------------------------------------------------- advantages.py


@pytest.mark.parametrize("ids_shape, mask_shape", [((2, 3), (2, 4)), ((2, 3, 1), (2, 3, 1))])
def test_hard_attribution_names_both_shapes_when_ids_and_mask_disagree(ids_shape, mask_shape):
    """Either condition alone is refused (2-D but different shapes; same shapes but not 2-D), and the message
    gives both shapes."""
    ids, mask = torch.zeros(ids_shape, dtype=torch.long), torch.ones(mask_shape)
    expected = f"must both be (B, T); got {tuple(ids_shape)} and {tuple(mask_shape)}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        hard_attribution(ids, mask, torch.zeros(2), group_size=2)


def test_hard_attribution_returns_on_the_advantages_device_whatever_the_default_device():
    """The output is allocated where the advantages live (on GPU: the trainer's device), not on torch's default."""
    ids = torch.tensor([[1, 2], [1, 3]])
    advantages = torch.tensor([1.0, -1.0])
    with torch.device("meta"):
        out = hard_attribution(ids, torch.ones(2, 2, device="cpu"), advantages, group_size=2)
    assert out.device == advantages.device
    assert out.tolist() == [[0.0, 1.0], [0.0, -1.0]]


# ---------------------------------------------------------------------------------------------- trajectory.py


def test_a_duplicate_takes_its_slot_and_shares_the_whole_completion():
    last = Trajectory(slot=1, group=0, completion_ids=[5, 6, 7], tool_mask=[1, 0, 1], finish_reason="eos")
    twin = last.duplicate(3)
    assert (twin.slot, twin.parent, twin.kind, twin.finish_reason) == (3, 1, DUPLICATE, "eos")
    assert (
        twin.fork_position == 3 and twin.completion_ids == [5, 6, 7] and twin.completion_ids is not last.completion_ids
    )


# ---------------------------------------------------------------------------------------------- environments.py


class Counter:
    """A stateful environment: its tool answers with its name and how often it was called."""

    limit = 3  # a class attribute, not a tool

    def __init__(self, name):
        self.name, self.count = name, 0

    def calc(self, expression: str) -> str:
        """Count a call."""
        self.count += 1
        return f"{self.name}{self.count - 1}"

    def reset(self, **kwargs):
        return None

    def get_reward(self):
        return 0.0

    def _private(self):
        return None


def test_fork_environment_prefers_fork_then_clone_then_deepcopy():
    class Both(Counter):
        def fork(self):
            return Counter("forked")

        def clone(self):
            return Counter("cloned")

    class CloneOnly(Counter):
        def clone(self):
            return Counter("cloned")

    assert fork_environment(Both("x")).name == "forked"
    assert fork_environment(CloneOnly("x")).name == "cloned"
    env = Counter("x")
    env.count = 3
    twin = fork_environment(env)
    assert twin is not env and (twin.name, twin.count) == ("x", 3)
    twin.calc("1")
    assert env.count == 3  # independent state


@pytest.mark.parametrize("method", ["fork", "clone"])
def test_a_fork_or_clone_returning_the_same_object_is_refused(method):
    env = type("Selfish", (Counter,), {method: lambda self: self})("x")
    with pytest.raises(ValueError, match=re.escape(f"Selfish.{method}() returned the same object; it must return")):
        fork_environment(env)


def test_check_forkable_trusts_fork_and_clone_and_explains_an_uncopyable_environment():
    class Uncopyable(Counter):
        def __deepcopy__(self, memo):
            raise TypeError("holds a socket")

    def needs_reset(self):
        raise RuntimeError("reset() opens the connection this copies")

    for method in ("fork", "clone"):  # trusted: not probed before reset (the probe would fail)
        check_forkable(type("Own", (Uncopyable,), {method: needs_reset})("x"))
    check_forkable(Counter("x"))  # deep-copyable: accepted
    with pytest.raises(ValueError) as error:
        check_forkable(Uncopyable("x"))
    message = str(error.value)
    assert message.startswith("environment_factory returned a Uncopyable that cannot be copied for a branch ")
    assert "(TypeError: holds a socket)" in message
    assert message.endswith(
        "define a fork() (or clone()) method that returns an independent copy of the environment's state, or "
        "make it deep-copyable."
    )
    assert isinstance(error.value.__cause__, TypeError)


def test_environment_tools_are_the_standalone_tools_and_the_public_methods_bound_to_the_instance():
    def search(query: str) -> str:
        """Search."""
        return query

    env = Counter("x")
    tools = environment_tools(env, [search])
    assert sorted(tools) == ["calc", "search"]  # not reset/get_reward/fork/clone, nor _private
    assert set(NOT_TOOLS) == {"reset", "get_reward", "fork", "clone"}
    assert tools["search"] is search and tools["calc"]("1") == "x0" and env.count == 1


def test_environment_copy_hooks_are_not_offered_as_tools():
    class Hooks(Counter):
        def fork(self):
            return Hooks(self.name)

        def clone(self):
            return Hooks(self.name)

    assert sorted(environment_tools(Hooks("x"), [])) == ["calc"]


# ---------------------------------------------------------------------------------------------- stream_driver.py


def test_truncated_entropy_skips_impossible_candidates():
    """A -inf logprob (p = 0) contributes 0, not NaN (0 · -inf)."""
    value = truncated_entropy({1: -math.inf, 2: math.log(0.5), 3: math.log(0.25)})
    assert value == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(4))


class Recording(ScriptedEngine):
    """The scripted engine, recording each request's stop strings."""

    def __init__(self, tok, calls, delay=0.0):
        super().__init__(tok, calls, delay)
        self.stops = []

    async def stream(self, request_id, prompt_ids, max_tokens, stop, **kw):
        self.stops.append(stop)
        async for update in super().stream(request_id, prompt_ids, max_tokens, stop, **kw):
            yield update


def async_rollout(tok, m=2, n=2, calls=2, tools=(calc,), engine=None, max_workers=16, alpha=0.0, protocol=None, **kw):
    protocol = protocol or TagProtocol(tok, ["calc"])
    options = {
        k: kw.pop(k)
        for k in ("stop", "entropy_estimator", "toolset", "frozen_initial", "measure_every_token")
        if k in kw
    }
    options.setdefault("stop", protocol.stop_strings)
    rollout = StreamDriver(
        settings(m, n, **kw), engine or Recording(tok, calls), protocol,
        ToolExecutor(list(tools), timeout=5, max_workers=max_workers), BranchPolicy(alpha, 0.0, seed=0),
        len(tok), tok.eos_token_id, **options,
    )  # fmt: skip
    return rollout


def test_the_async_driver_refuses_unknown_estimators_with_a_clear_message(tokenizer):
    with pytest.raises(ValueError, match=re.escape("entropy_estimator must be 'exact' or 'top_k', got 'top_p'")):
        async_rollout(tokenizer, entropy_estimator="top_p")


@pytest.mark.parametrize("stop, sent", [(None, None), ([], None), (["</calc>"], ["</calc>"])])
def test_the_async_driver_sends_its_stop_strings_with_every_request(tokenizer, stop, sent):
    engine = Recording(tokenizer, calls=1)
    async_rollout(tokenizer, engine=engine, stop=stop).run([tokenizer.encode("Add 1 and 2.")] * 2)
    assert engine.stops and all(s == sent for s in engine.stops)


def test_the_async_driver_runs_each_trajectorys_calls_on_its_own_environment(tokenizer):
    envs = [Counter("a"), Counter("b")]
    seen = []

    def toolset(traj):
        seen.append(traj.slot)
        return environment_tools(traj.env, [])

    rollout = async_rollout(tokenizer, calls=2, toolset=toolset)
    trajs, stats = rollout.run([tokenizer.encode("Add 1 and 2.")] * 2, environments=envs)
    for t, name in zip(trajs, "ab", strict=True):
        assert t.env is envs[t.slot]
        text = tokenizer.decode(t.completion_ids)
        assert f"{name}0" in text and f"{name}1" in text  # its own state: the second call sees the first
    assert sorted(seen) == [0, 0, 1, 1] and [e.count for e in envs] == [2, 2]


def test_the_async_driver_keeps_the_callers_frozen_initial_entropies(tokenizer):
    frozen = {}
    rollout = async_rollout(tokenizer, frozen_initial=frozen, initial_entropy="frozen_per_slot", alpha=1.0, m=4)
    trajs, _ = rollout.run([tokenizer.encode("Add 1 and 2.")] * 4)
    assert {0, 1} <= set(frozen) and all(t.h_initial == frozen[t.slot] for t in trajs if t.slot in (0, 1))


def test_measure_every_token_records_the_entropy_of_every_sampled_token(tokenizer):
    trajs, _ = async_rollout(tokenizer, measure_every_token=True).run([tokenizer.encode("Add 1 and 2.")] * 2)
    for t in trajs:
        sampled = [h for h, mask in zip(t.token_entropies, t.tool_mask, strict=True) if mask]
        assert len(sampled) > 4 and not any(math.isnan(h) for h in sampled)


def test_tool_seconds_sum_the_calls_and_tools_run_in_the_bounded_pool(tokenizer):
    running, most, lock = [0], [0], threading.Lock()

    def slow(expression: str) -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return "3"

    slow.__name__ = "calc"
    rollout = async_rollout(tokenizer, m=4, n=4, calls=2, tools=(slow,), max_workers=1)
    rollout.run([tokenizer.encode("Add 1 and 2.")] * 4)
    assert most[0] == 1  # max_workers=1: one call at a time, across trajectories
    assert 8 * 0.05 <= rollout.tool_seconds < 30  # 8 calls, each timed from submission (queued ones wait longer)


# ---------------------------------------------------------------------------------------------- trajectory.py: forks


def test_a_fork_copies_every_field_of_the_state_and_forks_the_environment():
    parent = Trajectory(slot=0, group=0, can_branch=False, h_initial=0.5, env=Counter("a"))
    parent.extend([1, 2], sampled=True, entropies=[0.1, 0.2], logprobs=[-0.1, -0.2])
    parent.messages.append({"role": "assistant", "content": "x"})
    parent.tool_rounds = 2
    parent.tool_events.append(ToolEvent(1, "calc", True, False))
    parent.tool_events.append(ToolEvent(2, "search", False, True))
    child = parent.fork(5)
    assert (child.slot, child.group, child.parent, child.fork_position) == (5, 0, 0, 2)
    assert (child.logprobs, child.tool_rounds, child.can_branch, child.h_initial) == ([-0.1, -0.2], 2, False, 0.5)
    assert child.messages == parent.messages
    child.messages[0]["content"] = "changed"
    assert parent.messages[0]["content"] == "x"  # a deep copy: the parent's turns are untouched
    assert isinstance(child.env, Counter) and child.env is not parent.env and child.env.name == "a"
    assert [(e.position, e.name, e.error, e.timed_out, e.inherited) for e in child.tool_events] == [
        (1, "calc", True, False, True),
        (2, "search", False, True, True),
    ]
    assert parent.tool_events[0].inherited is False
    assert Trajectory(slot=0, group=0).fork(1).env is None


def test_slot_pool_reclaims_only_as_many_lent_slots_as_asked():
    pool = SlotPool(1, 4, 1)
    assert pool.lend(0) == [1, 2, 3]
    assert pool.take(0, 1) == [3] and pool.free(0) == 2


# ---------------------------------------------------------------------------------------------- tree.py


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


# ---------------------------------------------------------------------------------------------- entropy.py


def _entropy_by_definition(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    p = torch.softmax(logits.double() / temperature, dim=-1)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1).float()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_token_entropy_divides_by_any_temperature(temperature):
    logits = torch.randn(3, 50) * 3
    torch.testing.assert_close(token_entropy(logits, temperature), _entropy_by_definition(logits, temperature))


def test_token_entropy_is_stable_for_large_logits_and_rows_of_different_scales():
    """Each row is shifted by its own maximum: logits of ±1e3 (past exp's float32 range) and a batch mixing such a
    row with an ordinary one both give the exact entropies."""
    big = torch.tensor([[1000.0, 1000.0, 0.0, -1000.0]])
    assert token_entropy(big).item() == pytest.approx(math.log(2), abs=1e-6)
    mixed = torch.stack([torch.tensor([2000.0, 2000.0, 1999.0, 0.0]), torch.tensor([0.0, 0.5, 1.0, 1.5])])
    torch.testing.assert_close(token_entropy(mixed), _entropy_by_definition(mixed))


def test_truncated_token_entropy_skips_masked_tokens_and_judges_each_row_apart():
    """A vocabulary smaller than k (or masked tokens) leaves -inf among the top k: those terms are 0, not NaN or
    1; whether the sampled token is counted again is decided per row."""
    logprobs = torch.log_softmax(torch.tensor([[2.0, 1.0, float("-inf")]]), dim=-1)
    p = logprobs.exp()[0, :2]
    expected = -(p * p.log()).sum()
    got = truncated_token_entropy(logprobs, torch.tensor([0]), k=3)
    torch.testing.assert_close(got, expected.view(1))
    # Row 0 samples a top-2 token, row 1 a token outside its top 2: only row 1 adds the sampled token's term.
    rows = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]]), dim=-1)
    got = truncated_token_entropy(rows, torch.tensor([1, 3]), k=2)
    q = rows.exp()
    top2 = -(q[0, :2] * rows[0, :2]).sum()
    torch.testing.assert_close(got, torch.stack([top2, top2 - q[1, 3] * rows[1, 3]]))


def test_window_entropy_names_what_is_wrong():
    with pytest.raises(ValueError, match="^cannot measure the entropy of an empty window$"):
        window_entropy([], 3, "mean", 100)
    with pytest.raises(ValueError, match="^unknown entropy normalization 'max'$"):
        window_entropy([1.0], 3, "max", 100)


@pytest.mark.parametrize(
    "model_type, fields, expected",
    [
        ("falcon_h1", {"lm_head_multiplier": 0.5}, 0.5),  # FalconH1ForCausalLM multiplies by it
        ("muse_glimmer", {"text_config": {"output_multiplier": 0.25}}, 0.25),  # multiplies before its soft-cap
        ("hyperclovax", {"logits_scaling": 4.0}, 4.0),  # multiplies (Granite divides)
        ("granite", {"logits_scaling": 4.0}, 0.25),
    ],
)
def test_output_logit_transform_reads_each_familys_real_config(model_type, fields, expected):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **fields).get_text_config()
    assert output_logit_transform(config)[0] == pytest.approx(expected)


@pytest.mark.parametrize("estimator", ["exact", "top_k"])
def test_an_attached_recorder_leaves_unarmed_forwards_alone(tokenizer, estimator):
    """Training forwards run through the hooked LM head: disarmed, the recorder records and raises nothing."""
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer).eval()
    recorder = EntropyRecorder(1.0, estimator=estimator)
    recorder.attach(model)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    assert recorder.disarm() is None


def test_recorder_applies_a_logit_scale_of_two():
    logits = torch.randn(2, 1, 30)
    recorder = EntropyRecorder(1.0, logit_scale=2.0)
    recorder.arm()
    recorder(None, (), logits)
    torch.testing.assert_close(recorder.disarm()[:, 0], token_entropy(2.0 * logits[:, -1]))


def test_top_k_recorder_tolerates_ids_that_stop_at_the_resolved_steps():
    """`disarm(new_ids)` resolves the last step from the generated ids only when they reach past the steps already
    resolved; ids that stop there (a caller that trimmed them) leave that step out instead of raising."""
    logits = torch.randn(1, 1, 30)
    recorder = EntropyRecorder(1.0, estimator="top_k")
    recorder.arm()
    for token in (4, 7):
        recorder(None, (), logits)
        recorder.see_inputs(None, (torch.tensor([[token]]),))
    recorder(None, (), logits)  # step 3: its token is only in the generated ids
    lp = torch.log_softmax(logits[:, -1], dim=-1)
    two = recorder.disarm(torch.tensor([[4, 7]]))
    torch.testing.assert_close(two[0], torch.cat([truncated_token_entropy(lp, torch.tensor([t])) for t in (4, 7)]))


# ---------------------------------------------------------------------------------------------- branching.py


def test_threshold_rule_defaults_to_one_half_and_unknown_rules_are_named():
    policy = BranchPolicy(0.3, 0.2, rule="threshold")
    assert policy.decide(1.1).fork and not policy.decide(0.9).fork  # α + β·ΔH = 0.52 and 0.48 against 0.5
    with pytest.raises(ValueError, match="^unknown branch rule 'coin'$"):
        BranchPolicy(0.3, 0.2, rule="coin")


# ---------------------------------------------------------------------------------------------- round_driver.py (rounds)


def _round_driver(tok, m, n, alpha=0.0, toolset=None, generator=None, z=1, **kw):
    from arpo_trl.rollout.round_driver import RoundDriver

    s = RolloutSettings(group_size=m, initial_rollouts=n, branch_factor=z, entropy_window=4, max_completion_length=200,
                        **kw)  # fmt: skip
    return RoundDriver(
        s, generator or CountingGenerator(tok, calls=2), TagProtocol(tok, ["calc"]),
        ToolExecutor([calc], timeout=5), BranchPolicy(alpha, 0.0, seed=0), len(tok), tok.eos_token_id,
        toolset=toolset,
    )  # fmt: skip


def test_the_round_driver_runs_each_trajectorys_calls_on_its_own_environment(tokenizer):
    """Three trajectories call in the same rounds: each gets the results of its own environment's calls (the
    round's calls run as one batch, and its results are handed back in order)."""
    envs = [Counter("a"), Counter("b"), Counter("c")]
    seen = []

    def toolset(traj):
        seen.append(traj.slot)
        return environment_tools(traj.env, [])

    driver = _round_driver(tokenizer, m=3, n=3, toolset=toolset)
    trajs, _ = driver.run([tokenizer.encode("Add 1 and 2.")] * 3, environments=envs)
    for t, name in zip(trajs, "abc", strict=True):
        assert t.env is envs[t.slot]
        text = tokenizer.decode(t.completion_ids)
        assert f"<result>\n{name}0\n</result>" in text and f"<result>\n{name}1\n</result>" in text
    assert sorted(seen) == [0, 0, 1, 1, 2, 2] and [e.count for e in envs] == [2, 2, 2]


@pytest.mark.parametrize("m, z", [(2, 1), (3, 2)])
def test_speculative_forks_are_sampled_without_measuring_their_entropy(tokenizer, m, z):
    """A speculative copy's window is never read (it is its parent's next segment, decided on the parent's):
    its row asks the generator for no entropy, however many copies the decision has."""
    gen = CountingGenerator(tokenizer, calls=2)
    _round_driver(tokenizer, m=m, n=1, alpha=1.0, generator=gen, z=z, speculative_forks=True).run(
        [tokenizer.encode("Add 1 and 2.")] * m
    )
    assert gen.call_log[:2] == [1, 1 + z]  # round 2: the root after its first result, and its speculative copies
    assert gen.need_log[1] == [True] + [False] * z


def test_groups_do_not_slow_each_other_down(tokenizer):
    """Identical groups take as many rounds together as one alone, also when a branch evicts a speculative fresh
    rollout of the first group while the second group's rows wait later in the same round."""
    rounds = []
    for groups in (1, 2):
        gen = CountingGenerator(tokenizer, calls=2)
        _, stats = rollout(tokenizer, m=8, n=2, alpha=1.0, fill="speculative", generator=gen, groups=groups)
        assert stats.discarded == groups * 6
        rounds.append(len(gen.call_log))
    assert rounds[0] == rounds[1]


# ---------------------------------------------------------------------------------------------- tree.py: 2


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


# ---------------------------------------------------------------------------------------------- stream_driver.py: 2


class Observed(ScriptedEngine):
    """The script, two tokens per update, each token its own logprob; records every request's arguments, the
    tokens each stream has delivered when a request arrives, and what is forgotten. `cached(prompt)` is what the
    engine reports as read from its prefix cache; `finish` replaces the script's last finish reason."""

    def __init__(self, tok, calls, cached=lambda prompt: 0, no_reason=False, unfinished=False, delay=0.0):
        super().__init__(tok, calls, delay)
        self.cached, self.no_reason, self.unfinished = cached, no_reason, unfinished
        self.args, self.delivered, self.forgotten, self.arrivals = {}, {}, [], {}

    async def stream(self, request_id, prompt_ids, max_tokens, stop, entropy_tokens=0, top_logprobs=0, seed=None):
        self.args[request_id] = dict(prompt=list(prompt_ids), seed=seed, top=top_logprobs, entropy=entropy_tokens)
        self.arrivals[request_id] = dict(self.delivered)
        self.delivered[request_id] = 0
        ids, entropies, finish = scripted_segment(self.tok, list(prompt_ids), max_tokens, self.calls)
        if entropy_tokens:
            self.entropy[request_id] = entropies[:entropy_tokens]
        cached = self.cached(list(prompt_ids))
        for i in range(0, len(ids), 2):
            await asyncio.sleep(self.delay)
            chunk = ids[i : i + 2]
            last = i + 2 >= len(ids) and not self.unfinished
            reason = finish if last and not self.no_reason else None
            top = [{t: -entropies[i + j], t + 1: -1.0} for j, t in enumerate(chunk)] if top_logprobs else []
            self.delivered[request_id] += len(chunk)
            yield StreamUpdate(chunk, [-0.01 * (i + j + 1) for j in range(len(chunk))], last, reason, cached, top)

    def forget(self, request_ids):
        self.forgotten.extend(request_ids)
        super().forget(request_ids)


def test_the_async_driver_seeds_each_request_from_the_rollout_seed_slot_kind_and_position(tokenizer):
    engine = Observed(tokenizer, calls=2)
    async_rollout(tokenizer, engine=engine, m=4, n=2, alpha=1.0).run([tokenizer.encode("Add 1 and 2.")] * 4, seed=11)
    for request_id, args in engine.args.items():
        batch, key = request_id.removeprefix("arpo-").split("-", 1)
        assert args["seed"] == zlib.crc32(f"11-{key}".encode()) & 0x7FFFFFFF
    unseeded = Observed(tokenizer, calls=2)
    async_rollout(tokenizer, engine=unseeded).run([tokenizer.encode("Add 1 and 2.")] * 2)
    assert all(args["seed"] is None for args in unseeded.args.values())
    # Request ids name the batch: two rollouts on one engine never reuse an id (entropy tables are keyed by it).
    assert not set(engine.args) & set(unseeded.args)
    assert {r.split("-")[1] for r in engine.args} != {r.split("-")[1] for r in unseeded.args}


def test_the_async_driver_counts_requests_prompt_and_cached_tokens_and_forks_prefills(tokenizer):
    prompt = tokenizer.encode("Add 1 and 2.")
    engine = Observed(tokenizer, calls=2, cached=lambda p: 0 if len(p) == len(prompt) else len(p) // 2)
    rollout = async_rollout(tokenizer, engine=engine, m=4, n=2, alpha=1.0)
    trajs, stats = rollout.run([prompt] * 4)
    prompts = [len(a["prompt"]) for a in engine.args.values()]
    assert stats.rounds == len(engine.args)  # one request per segment
    assert rollout.prompt_tokens == sum(prompts)
    assert rollout.cached_tokens == sum(n // 2 for n in prompts if n != len(prompt)) > 0
    # One entry per fork, for its first request (the parent's prefix): (its prompt tokens, of those cached).
    forks = [t for t in trajs if t.kind == "branch"]
    assert stats.branches == len(forks) > 0
    expected = sorted((len(prompt) + t.fork_position, (len(prompt) + t.fork_position) // 2) for t in forks)
    assert sorted(rollout.fork_prefills) == expected


def test_the_async_driver_keeps_every_tokens_sampling_logprob(tokenizer):
    engine = Observed(tokenizer, calls=2)
    trajs, _ = async_rollout(tokenizer, engine=engine).run([tokenizer.encode("Add 1 and 2.")] * 2)
    for t in trajs:
        assert len(t.logprobs) == len(t.completion_ids)
        sampled = [lp for lp, mask in zip(t.logprobs, t.tool_mask, strict=True) if mask]
        assert all(lp < 0 for lp in sampled) and len(set(sampled)) > 2  # the engine's own, token by token
        assert all(lp == 0.0 for lp, mask in zip(t.logprobs, t.tool_mask, strict=True) if not mask)


@pytest.mark.parametrize("ending", ["no_reason", "unfinished"])
def test_a_stream_that_ends_without_a_reason_ends_on_the_budget(tokenizer, ending):
    engine = Observed(tokenizer, calls=0, **{ending: True})
    trajs, _ = async_rollout(tokenizer, engine=engine, calls=0).run([tokenizer.encode("Add 1 and 2.")] * 2)
    assert [t.finish_reason for t in trajs] == ["length", "length"]


def test_no_trajectory_is_left_awaiting_a_decision(tokenizer):
    """Fresh rollouts (never branchable) also reach tool results: the driver records that no decision is made
    there, so none is left waiting for one."""
    trajs, stats = async_rollout(tokenizer, m=4, n=2, calls=2).run([tokenizer.encode("Add 1 and 2.")] * 4)
    assert stats.fresh == 2 and any(t.kind == "fresh" and t.tool_rounds for t in trajs)
    assert not any(t.awaiting_entropy for t in trajs)


def test_tool_seconds_are_zero_without_tool_calls(tokenizer):
    rollout = async_rollout(tokenizer, calls=0)
    rollout.run([tokenizer.encode("Add 1 and 2.")] * 2)
    assert rollout.tool_seconds == 0.0


def test_an_aborted_request_stops_the_rollout_at_once_with_its_id(tokenizer):
    """vLLM aborts requests when it shuts down: the rollout raises, naming the request, without waiting for the
    tools other trajectories are running."""
    finished, started = threading.Event(), []

    def slow(expression: str) -> str:
        started.append(expression)
        time.sleep(3)
        finished.set()
        return "3"

    slow.__name__ = "calc"
    slow.thread_safe = True  # in a worker thread, so the failing rollout need not wait for it

    class AbortsOne(Observed):
        async def stream(self, request_id, prompt_ids, max_tokens, stop, **kw):
            abort = request_id.endswith("-1-root-0")
            if abort:  # let slot 0 reach its tool first
                await asyncio.sleep(0.5)
            async for update in super().stream(request_id, prompt_ids, max_tokens, stop, **kw):
                yield StreamUpdate(update.token_ids, update.logprobs, update.finished,
                                   "abort" if abort and update.finished else update.finish_reason, 0, [])  # fmt: skip

    # One tool at a time: slot 0's call runs, slot 2's waits behind it.
    rollout = async_rollout(tokenizer, engine=AbortsOne(tokenizer, calls=1), m=3, n=3, calls=1, tools=(slow,),
                            max_workers=1)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^vLLM aborted request arpo-\d+-1-root-0 \(engine shut down\?\)$"):
        rollout.run([tokenizer.encode("Add 1 and 2.")] * 3)
    assert not finished.is_set()  # slot 0's tool was still running
    finished.wait(timeout=10)
    time.sleep(0.5)
    assert len(started) == 1  # the queued call was cancelled, not run after the failure


def test_the_decision_is_taken_when_exactly_k_tokens_have_streamed(tokenizer):
    """Forks start the moment the k-th token after the result is in: their first request arrives while the
    parent's stream has delivered k tokens, not k + 1 (k = 4; the engine delivers two tokens per update)."""
    engine = Observed(tokenizer, calls=2, delay=0.01)
    trajs, _ = async_rollout(tokenizer, engine=engine, m=4, n=1, alpha=1.0).run([tokenizer.encode("Add 1 and 2.")] * 4)
    forks = [t for t in trajs if t.kind == "branch"]
    assert forks
    for fork in forks:
        first = next(r for r in engine.args if r.endswith(f"-{fork.slot}-branch-{fork.fork_position}"))
        parent = next(r for r in engine.args if re.search(f"-{fork.parent}-[a-z]+-{fork.fork_position}$", r))
        assert engine.arrivals[first][parent] == 4


def test_top_logprobs_are_asked_only_to_measure_a_window_with_the_top_k_estimator(tokenizer):
    for estimator in ("exact", "top_k"):
        engine = Observed(tokenizer, calls=2)
        async_rollout(tokenizer, engine=engine, m=4, n=2, alpha=1.0, entropy_estimator=estimator).run(
            [tokenizer.encode("Add 1 and 2.")] * 4
        )
        measuring = [a for a in engine.args.values() if a["entropy"] or a["top"]]
        assert measuring and len(measuring) < len(engine.args)  # some segments have no window to measure
        for a in engine.args.values():
            if estimator == "exact":
                assert a["top"] == 0
            else:
                assert a["entropy"] == 0 and a["top"] in (0, 10)
        if estimator == "top_k":
            assert {a["top"] for a in engine.args.values()} == {0, 10}


def test_top_k_entropies_are_kept_for_the_window_only(tokenizer):
    trajs, _ = async_rollout(tokenizer, engine=Observed(tokenizer, calls=2), entropy_estimator="top_k",
                             alpha=1.0, m=4).run([tokenizer.encode("Add 1 and 2.")] * 4)  # fmt: skip
    root = next(t for t in trajs if t.kind == "root")
    first = root.token_entropies[: root.tool_mask.index(0)]  # the root's first segment: its H_initial window
    assert not any(math.isnan(h) for h in first[:4]) and all(math.isnan(h) for h in first[4:])


def test_tool_calls_wait_in_threads_named_for_them(tokenizer):
    """While a tool runs, the driver's waiting thread is named for what it does (thread dumps of a stalled run)."""
    names = []

    def named(expression: str) -> str:
        names.append({t.name.split("_")[0] for t in threading.enumerate()})
        return "3"

    named.__name__ = "calc"
    async_rollout(tokenizer, calls=1, tools=(named,)).run([tokenizer.encode("Add 1 and 2.")] * 2)
    assert names and all("arpo-tools" in n for n in names)


def test_a_fresh_rollout_discarded_while_streaming_releases_its_entropy_entries(tokenizer):
    engine = Observed(tokenizer, calls=2, delay=0.01)
    rollout = async_rollout(tokenizer, engine=engine, m=4, n=1, alpha=1.0, rollout_fill="speculative",
                            measure_every_token=True)  # fmt: skip
    _, stats = rollout.run([tokenizer.encode("Add 1 and 2.")] * 4)
    assert stats.discarded > 0
    assert {r for r in engine.forgotten if "-fresh-" in r}  # the discarded rollouts' requests


def test_the_async_driver_hands_the_calls_over_the_limit_to_the_notice(tokenizer):
    """The chat-template notice answers each call by name: the protocol is given the calls it answers."""

    class Noting(TagProtocol):
        noted = []

        def limit_notice_ids(self, traj, calls, limit):
            self.noted.append([c.name for c in calls])
            return super().limit_notice_ids(traj, calls, limit)

    protocol = Noting(tokenizer, ["calc"])
    async_rollout(tokenizer, calls=3, protocol=protocol, max_tool_rounds=1, call_limit_action="message").run(
        [tokenizer.encode("Add 1 and 2.")] * 2
    )
    assert protocol.noted and all(names == ["calc"] for names in protocol.noted)


# ---------------------------------------------------------------------------------------------- protocols.py (tags)


def test_tag_protocol_hands_rewards_the_turn_as_text_and_appends_results_back_to_back(tokenizer):
    from arpo_trl.tools import format_result

    protocol = TagProtocol(tokenizer, ["calc"], result_style="official")
    traj = Trajectory(slot=0, group=0)
    traj.extend(tokenizer.encode("Sum<calc>1+2</calc>", add_special_tokens=False), sampled=True)
    traj.extend([tokenizer.eos_token_id], sampled=True)
    assert protocol.completion(traj, conversational=True) == [{"role": "assistant", "content": "Sum<calc>1+2</calc>"}]
    assert protocol.completion(traj, conversational=False) == "Sum<calc>1+2</calc>"  # no EOS string
    two = protocol.result_ids(traj, [], [ToolResult("3"), ToolResult("4")])
    assert tokenizer.decode(two) == format_result("3", "official") + format_result("4", "official")
    notice = tokenizer.decode(protocol.limit_notice_ids(traj, [], 2))
    assert notice.startswith(" <result>\nError: the tool-call limit (2) is reached")  # in the protocol's style


# ---------------------------------------------------------------------------------------------- protocols.py (chat)


def _chat_protocol(with_schema=True):
    from fakes import fake_trainer
    from trl.chat_template_utils import add_response_schema

    from arpo_trl.rollout.protocols import ChatTemplateProtocol
    from arpo_trl.testing import chat_template_tokenizer

    tok = chat_template_tokenizer()
    trainer = fake_trainer(add_response_schema(tok) if with_schema else tok)
    trainer.tools = [calc]
    protocol = ChatTemplateProtocol(trainer)
    protocol.prompt_ids = [tok.apply_chat_template([{"role": "user", "content": "Add 1 and 2."}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)]  # fmt: skip
    return protocol, trainer._tokenizer


def _turn(tok, text, finish="eos"):
    ids = tok.encode(text, add_special_tokens=False) + ([tok.eos_token_id] if finish == "eos" else [])
    traj = Trajectory(slot=0, group=0)
    traj.extend(ids, sampled=True)
    return traj, Segment(ids, [0.0] * len(ids), finish)


def test_chat_protocol_parses_a_turns_tool_calls_as_trl_does_and_names_bad_ones():
    protocol, tok = _chat_protocol()
    call = '<tool_call>\n{"name": "calc", "arguments": {"expression": "1+2"}}\n</tool_call>'
    traj, seg = _turn(tok, call)
    assert protocol.calls(traj, seg) == [ToolCall("calc", {"expression": "1+2"})]
    assert traj.messages == [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": {"expression": "1+2"}}}]}]  # fmt: skip
    traj, seg = _turn(tok, '<tool_call>\n{"name": "calc", "arguments": "1+2"}\n</tool_call>')
    assert protocol.calls(traj, seg) == [
        ToolCall("calc", {}, parse_error="Error: arguments of 'calc' are not a JSON object.")
    ]
    traj, seg = _turn(tok, call, finish="length")  # cut by the budget: parsed into the turns, not run
    assert protocol.calls(traj, seg) == [] and traj.messages[0]["tool_calls"]
    traj, seg = _turn(tok, "The answer is 3.")
    assert protocol.calls(traj, seg) == [] and traj.messages == [{"role": "assistant", "content": "The answer is 3."}]


@pytest.mark.parametrize(
    "tool_call, expected",
    [
        ({"type": "function", "function": {"name": "calc", "arguments": {"expression": "1"}}},
         ToolCall("calc", {"expression": "1"})),
        ({"function": {"name": "calc", "arguments": {}}}, ToolCall("calc", {})),  # no type: a function call
        ({"type": "retrieval", "function": {"name": "calc", "arguments": {}}},
         ToolCall("calc", {}, parse_error="Error: unsupported tool call type 'retrieval'.")),
        ({"type": "function"}, ToolCall("unknown", {}, parse_error="Error: arguments of 'unknown' are not a JSON object.")),
        ({"type": "function", "function": "calc"},
         ToolCall("unknown", {}, parse_error="Error: arguments of 'unknown' are not a JSON object.")),
        ({"type": "function", "function": {"name": "", "arguments": []}},
         ToolCall("unknown", {}, parse_error="Error: arguments of 'unknown' are not a JSON object.")),
        ("calc(1)", ToolCall("unknown", {}, parse_error="Error: unsupported tool call type 'str'.")),
    ],
)  # fmt: skip
def test_each_parsed_tool_call_becomes_a_call_or_an_error_naming_what_is_wrong(tool_call, expected):
    from arpo_trl.rollout.protocols import tool_calls_of

    ok = {"type": "function", "function": {"name": "calc", "arguments": {"expression": "2"}}}
    assert tool_calls_of({"tool_calls": [tool_call, ok]}) == [expected, ToolCall("calc", {"expression": "2"})]
    assert tool_calls_of({"role": "assistant", "content": "3"}) == tool_calls_of({"tool_calls": None}) == []


def test_chat_protocol_types_arguments_with_the_tools_schema():
    """TRL types a call's arguments with the calling tool's JSON schema ("7" → 7 for an integer parameter)."""
    protocol, tok = _chat_protocol()

    def add(a: int, b: int) -> str:
        """Add two integers.

        Args:
            a: the first.
            b: the second.
        """
        return str(a + b)

    protocol.trainer.tools = [add]
    traj, seg = _turn(tok, '<tool_call>\n{"name": "add", "arguments": {"a": "7", "b": 2}}\n</tool_call>')
    assert protocol.calls(traj, seg) == [ToolCall("add", {"a": 7, "b": 2})]


def test_chat_protocol_without_a_response_schema_keeps_the_turn_as_text():
    protocol, tok = _chat_protocol(with_schema=False)
    traj, seg = _turn(tok, '<tool_call>\n{"name": "calc", "arguments": {"expression": "1+2"}}\n</tool_call>')
    assert protocol.calls(traj, seg) == []
    assert traj.messages == [{"role": "assistant", "content": tok.decode(seg.ids, skip_special_tokens=True)}]


def test_chat_protocol_answers_each_call_with_a_tool_turn_and_hands_rewards_the_turns():
    from arpo_trl.rollout.plain_text import tool_suffix_ids

    protocol, tok = _chat_protocol()
    traj, _ = _turn(tok, "x")
    calls = [ToolCall("calc", {"expression": "1+2"}), ToolCall("calc", {"expression": "2+2"})]
    ids = protocol.result_ids(traj, calls, [ToolResult("3"), ToolResult("4")])
    results = [{"role": "tool", "name": "calc", "content": "3"}, {"role": "tool", "name": "calc", "content": "4"}]
    assert traj.messages == results and ids == tool_suffix_ids(protocol.trainer, results)
    notice = protocol.limit_notice_ids(traj, calls[:1], 2)
    assert traj.messages[-1]["name"] == "calc" and traj.messages[-1]["content"].startswith(
        "Error: the tool-call limit (2) is reached"
    )
    assert notice == tool_suffix_ids(protocol.trainer, [traj.messages[-1]])
    assert protocol.completion(traj, conversational=True) is traj.messages
    assert protocol.completion(traj, conversational=False) == "x"


# ---------------------------------------------------------------------------------------------- plain_text.py


def test_trusted_pieces_keep_every_added_token_even_id_0_and_plain_runs_join_their_neighbours(tokenizer):
    """SmolLM2's `<|endoftext|>` has id 0: a trusted piece keeps it live like any added token. The trusted text
    after it and the plain piece that follows are tokenized as one run, as the whole text would be."""
    from arpo_trl.rollout.plain_text import encode_pieces, encode_plain

    assert tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
    ids = encode_pieces(tokenizer, [("a<|endoftext|>b", False), ("c<|im_end|>", True)])
    assert ids == tokenizer.encode("a", add_special_tokens=False) + [0] + encode_plain(tokenizer, "bc<|im_end|>")
    assert ids[-1] != tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_tool_message_without_content_renders_as_an_empty_one():
    from arpo_trl.rollout.plain_text import tool_suffix_ids

    protocol, _ = _chat_protocol()
    empty = tool_suffix_ids(protocol.trainer, [{"role": "tool", "name": "calc", "content": ""}])
    assert tool_suffix_ids(protocol.trainer, [{"role": "tool", "name": "calc"}]) == empty


def _template_trainer(tok, template):
    import types

    return types.SimpleNamespace(
        processing_class=tok, _tokenizer=tok, chat_template=template, chat_template_kwargs={}, _is_vlm=False
    )


_TURNS = "{% for m in messages %}<|im_start|>{{ m.role }}{{ EXTRA }}\n{{ CONTENT }}<|im_end|>\n{% endfor %}"
_TURNS += "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def test_a_template_that_cuts_a_tool_message_short_is_refused(tokenizer):
    """The content's closing marker never renders: the plain span cannot be found, and the tool turn is refused
    with the reason rather than tokenized with the tool's text live."""
    from arpo_trl.rollout.plain_text import tool_suffix_ids

    template = _TURNS.replace("{{ EXTRA }}", "").replace("{{ CONTENT }}", "{{ m.content[:30] }}")
    trainer = _template_trainer(tokenizer, template)
    message = "the chat template must render each tool message's content exactly once"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tool_suffix_ids(trainer, [{"role": "tool", "name": "calc", "content": "abc"}])


def test_a_template_that_rewrites_the_history_is_refused_as_trl_refuses_it(tokenizer):
    """A template that renders the last message differently: the assistant turn alone is not a prefix of it
    followed by the tool turn, so there is no suffix to append (TRL raises the same error)."""
    from trl import GRPOTrainer

    from arpo_trl.rollout.plain_text import tool_suffix_ids

    template = _TURNS.replace("{{ EXTRA }}", "{% if loop.last %} last{% endif %}").replace(
        "{{ CONTENT }}", "{{ m.content }}"
    )
    trainer = _template_trainer(tokenizer, template)
    messages = [{"role": "tool", "name": "calc", "content": "3"}]
    message = "Unexpected tokenization: the EOS-trimmed prefix IDs are not a prefix of the full IDs."
    for suffix in (tool_suffix_ids, GRPOTrainer._get_tool_suffix_ids):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            suffix(trainer, messages)


class CharTokenizer(PythonBackend):
    """A pure-Python tokenizer (transformers' `PythonBackend`, no `tokenizers` backend): one id per character,
    and a BOS in front when asked for special tokens."""

    def __init__(self, **kw):
        self.vocab = {c: i for i, c in enumerate(["<unk>"] + [chr(c) for c in range(32, 127)])}
        self.inverse = {i: c for c, i in self.vocab.items()}
        super().__init__(unk_token="<unk>", **kw)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab, **self.added_tokens_encoder)

    def _tokenize(self, text, **kw):
        return list(text)

    def _convert_token_to_id(self, token):
        return self.vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return self.inverse.get(index, "<unk>")

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return [self.bos_token_id, *token_ids_0, *(token_ids_1 or [])]


def test_a_tokenizer_without_a_tokenizers_backend_gets_tool_output_as_plain_text():
    from arpo_trl.rollout.plain_text import added_token_ids, encode_pieces, encode_plain

    tok = CharTokenizer(eos_token="<|im_end|>", bos_token="<s>")
    tok.add_tokens(["<tool_call>"])  # an added token not flagged special
    added = added_token_ids(tok)
    hostile = "a<|im_end|>b<tool_call>"
    assert tok.encode(hostile, add_special_tokens=False)[1] in added  # tokenized normally, both are live
    assert tok.encode("a")[0] == tok.bos_token_id  # and with special tokens, after a BOS
    ids = encode_plain(tok, hostile)
    assert ids == [tok.vocab[c] for c in hostile] and not added.intersection(ids)
    # Trusted text keeps its added tokens; each piece is tokenized on its own.
    trusted = encode_pieces(tok, [("x<|im_end|>", False), (hostile, True)])
    assert trusted == [tok.vocab["x"], tok.eos_token_id] + ids


def test_tag_protocol_stops_at_each_tools_closing_tag_and_ignores_a_stop_without_a_call(tokenizer):
    """A segment stopped by some other stop string (no known closing tag in it) has no call."""
    protocol = TagProtocol(tokenizer, ["calc", "search"])
    assert protocol.stop_strings == ["</calc>", "</search>"]
    ids = tokenizer.encode("no call here</answer>", add_special_tokens=False)
    assert protocol.calls(Trajectory(slot=0, group=0), Segment(ids, [0.0] * len(ids), "stop")) == []


def test_a_word_whose_tokens_rebuild_an_added_token_goes_character_by_character():
    """No pre-tokenizer and whole words taken from the vocabulary (Llama-3's `ignore_merges`): "<|im_end|>" is one
    word, and SmolLM2's vocabulary holds it under the added token's id. That word is split into characters."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from arpo_trl.rollout.plain_text import added_token_ids, encode_plain
    from arpo_trl.testing import chat_template_tokenizer

    spec = json.loads(chat_template_tokenizer().backend_tokenizer.to_str())
    spec["pre_tokenizer"], spec["model"]["ignore_merges"] = None, True
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>")
    backend = tok.backend_tokenizer
    assert [t.id for t in backend.model.tokenize("<|im_end|>")] == [tok.eos_token_id]  # the vocabulary rebuilds it
    ids = encode_plain(tok, "<|im_end|>")
    assert ids == [t.id for c in "<|im_end|>" for t in backend.model.tokenize(c)] and not added_token_ids(tok) & set(
        ids
    )
    assert encode_plain(tok, "ab") == tok.encode("ab", add_special_tokens=False)  # other words as the tokenizer


def test_a_tag_call_keeps_the_added_tokens_the_model_wrote_in_it(tokenizer):
    """The call is parsed from the tokens as sampled: an added token inside it stays in the content."""
    protocol = TagProtocol(tokenizer, ["calc"])
    ids = tokenizer.encode("<calc>1+<|im_start|>2</calc>", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    [call] = protocol.calls(Trajectory(slot=0, group=0), Segment(ids, [0.0] * len(ids), "stop"))
    assert call.name == "calc" and call.arguments == "1+<|im_start|>2"


# ---------------------------------------------------------------------------------------------- generation.py


def test_a_left_padded_batch_generates_what_each_row_generates_alone(tokenizer):
    """Greedy, rows of different lengths and budgets (one past `generate`'s default of 20 tokens): the padding
    and its attention mask change nothing, each row gets its own budget, and the generator counts its calls."""
    from arpo_trl.rollout.generation import TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3).eval()
    generator = TransformersGenerator.for_model(model, tokenizer, None, temperature=0.0)
    try:
        prompts = [tokenizer.encode("Add 3, 4 and 5, then twice that."), tokenizer.encode("Add 1.")]
        budgets = [30, 7]
        batched = generator(prompts, budgets)
        alone = [generator([p], [b])[0] for p, b in zip(prompts, budgets)]
        assert [s.ids for s in batched] == [s.ids for s in alone]
        assert [len(s.ids) for s in batched] == [30, 7] and [s.finish for s in batched] == ["length", "length"]
        assert generator([], []) == [] and (generator.calls, generator.idle_calls) == (3, 0)
    finally:
        generator.close()


@pytest.mark.parametrize(
    "temperature, top_p, top_k, sampled", [(0.7, 0.9, 5, True), (0.0, 0.9, 5, False), (1.0, 1.0, 0, True)]
)
def test_plain_model_sampling_config(tokenizer, temperature, top_p, top_k, sampled):
    """The analyser's sampling settings: filters only when sampling; EOS ids of the model and the tokenizer, each
    once; the pad id the tokenizer's (else the first EOS)."""
    from arpo_trl.rollout.generation import PlainModel
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3)
    model.generation_config.eos_token_id = [7, tokenizer.eos_token_id]
    config = PlainModel.sampling(model, tokenizer, temperature, top_p, top_k)
    assert config.do_sample is sampled
    if sampled:
        assert (config.temperature, config.top_p, config.top_k) == (temperature, top_p, top_k)
    else:
        assert (config.temperature, config.top_p, config.top_k) == (None, None, None)
    assert config.eos_token_id == [7, tokenizer.eos_token_id] and config.pad_token_id == tokenizer.pad_token_id
    source = PlainModel(model, tokenizer, config)
    assert (source.eos_token_ids, source.pad_token_id, source.model, source.tokenizer) == (
        [7, tokenizer.eos_token_id], tokenizer.pad_token_id, model, tokenizer
    )  # fmt: skip


def test_plain_model_sampling_adds_the_tokenizers_eos_and_pads_with_the_first_without_a_pad(tokenizer):
    import copy

    from arpo_trl.rollout.generation import PlainModel
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3)
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    model.generation_config.eos_token_id = 9
    config = PlainModel.sampling(model, tok, 1.0)
    assert config.eos_token_id == [9, tok.eos_token_id] and config.pad_token_id == 9
    assert PlainModel(model, tok, config).eos_token_ids == [9, tok.eos_token_id]
    model.generation_config.eos_token_id = None
    tok.eos_token = None
    with pytest.raises(ValueError, match="^the model and its tokenizer name no EOS token: generation would never end$"):
        PlainModel.sampling(model, tok, 1.0)
    model.generation_config = None
    with pytest.raises(ValueError, match="name no EOS token"):
        PlainModel.sampling(model, tok, 1.0)


@pytest.mark.parametrize("temperature, recorded", [(0.7, 0.7), (0.0, 1.0)])
def test_for_model_hooks_a_recorder_at_the_sampling_temperature_and_close_removes_it(tokenizer, temperature, recorded):
    from arpo_trl.rollout.generation import TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3)
    head = model.get_output_embeddings()
    generator = TransformersGenerator.for_model(model, tokenizer, ["</calc>"], temperature=temperature,
                                                entropy_estimator="top_k")  # fmt: skip
    r = generator.recorder
    assert (r.temperature, r.logit_scale, r.softcap, r.estimator) == (recorded, 1.0, None, "top_k")
    assert generator.measure_every_token is True and generator.stop_strings == ["</calc>"]
    assert generator.source.generation_config.do_sample is (temperature > 0)
    assert head._forward_hooks or head._forward_pre_hooks
    generator.close()
    assert not head._forward_hooks and not head._forward_pre_hooks and generator._hooks == []
    default = TransformersGenerator.for_model(model, tokenizer, None, measure_every_token=False)
    assert (default.recorder.temperature, default.recorder.estimator, default.measure_every_token) == (
        1.0,
        "exact",
        False,
    )
    assert default.stop_strings is None and default.stop_criterion is None
    default.close()


def test_entropies_only_for_the_rows_that_need_them_and_segments_cut_at_their_first_stop(tokenizer, tool_model_state):
    """Greedy on the calc-tool model: row 1 needs no entropy (NaN), row 0 does (finite). With the stop string
    `</calc>`, each row is cut right after its first call, with finish "stop"."""
    from arpo_trl.rollout.generation import TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=0)
    model.load_state_dict(tool_model_state)
    model.eval()
    prompts = [tokenizer.encode("Add 3, 4 and 5."), tokenizer.encode("Add 1 and 2, then 7.")]
    plain = TransformersGenerator.for_model(model, tokenizer, None, temperature=0.0, measure_every_token=False)
    try:
        free = plain(prompts, [40, 40], [True, False])
        assert all(math.isfinite(e) for e in free[0].entropies) and all(math.isnan(e) for e in free[1].entropies)
        every = plain(prompts, [40, 40])  # None: every row
        assert all(math.isfinite(e) for s in every for e in s.entropies)
        assert [s.ids for s in every] == [s.ids for s in free]
    finally:
        plain.close()
    stopping = TransformersGenerator.for_model(model, tokenizer, ["</calc>"], temperature=0.0)
    try:
        cut = stopping(prompts, [40, 40])
    finally:
        stopping.close()
    for whole, segment in zip(free, cut):
        text = tokenizer.decode(whole.ids)
        assert "</calc>" in text
        first = next(n for n in range(1, len(whole.ids) + 1) if "</calc>" in tokenizer.decode(whole.ids[:n]))
        assert segment.ids == whole.ids[:first] and segment.finish == "stop"


def _recording_source(model, tokenizer, config, *, collective: bool = True, fail_after: int | None = None):
    """A `PlainModel` whose `generate` records what it receives (`source.seen`); `collective` as a trainer's model
    under ZeRO-3 (a rank with no rows must still join), and with `fail_after` it raises from inside `generate`
    after that many decoding steps."""
    import contextlib
    import copy

    from transformers import StoppingCriteria

    from arpo_trl.rollout.generation import PlainModel

    class CrashAt(StoppingCriteria):
        steps = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.steps += 1
            if self.steps == fail_after:
                raise RuntimeError("the model crashed mid-generation")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    class Recording(PlainModel):
        seen: list[dict]

        @contextlib.contextmanager
        def generating(self):
            with torch.no_grad():
                yield self

        def generate(self, **kwargs):
            self.seen.append(dict(kwargs, generation_config=copy.copy(kwargs["generation_config"])))
            if fail_after is not None:
                kwargs["stopping_criteria"].append(CrashAt())
            return self.model.generate(**kwargs)

    source = Recording(model, tokenizer, config)
    source.collective, source.seen = collective, []
    return source


def test_a_rank_with_no_rows_joins_a_collective_source_with_one_throwaway_row_and_batches_are_padded_as_trl_pads(
    tokenizer,
):
    """Under ZeRO-3 every rank must join each `generate`: a rank with nothing to generate sends one EOS with a
    budget of 1 and returns nothing, counted as idle. A real batch reaches `generate` left-padded with the pad id
    and masked, with the largest row budget and the source's own config left untouched."""
    from arpo_trl.rollout.generation import PlainModel, TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3).eval()
    config = PlainModel.sampling(model, tokenizer, 0.0)
    source = _recording_source(model, tokenizer, config)
    generator = TransformersGenerator(source, None, EntropyRecorder(1.0))
    assert generator([], []) == [] and generator([], []) == []
    assert (generator.calls, generator.idle_calls) == (2, 2)
    for dummy in source.seen:
        assert dummy["input_ids"].tolist() == [[tokenizer.eos_token_id]]
        assert dummy["attention_mask"].tolist() == [[1]] and dummy["generation_config"].max_new_tokens == 1
    short, long = tokenizer.encode("Add 1."), tokenizer.encode("Add 3, 4 and 5.")
    pad = len(long) - len(short)
    segments = generator([short, long], [1, 1])
    assert [len(s.ids) for s in segments] == [1, 1] and (generator.calls, generator.idle_calls) == (3, 2)
    batch = source.seen[-1]
    assert batch["input_ids"].tolist() == [[tokenizer.pad_token_id] * pad + short, long]
    assert batch["attention_mask"].tolist() == [[0] * pad + [1] * len(short), [1] * len(long)]
    assert batch["generation_config"].max_new_tokens == 1
    generator([short, long], [3, 5])
    assert source.seen[-1]["generation_config"].max_new_tokens == 5
    assert config.max_new_tokens is None  # each call sets its budget on a copy
    alone = TransformersGenerator(_recording_source(model, tokenizer, config, collective=False), None,
                                  EntropyRecorder(1.0))  # fmt: skip
    assert alone([], []) == [] and (alone.calls, alone.idle_calls, alone.source.seen) == (0, 0, [])


def test_a_generate_that_crashes_mid_window_raises_its_own_error_and_leaves_the_recorder_disarmed(tokenizer):
    """`top_k` keeps a step pending for the next input; a crash after 3 steps must surface as itself (not as an
    error of the cleanup), and the next call measures afresh."""
    from arpo_trl.rollout.generation import TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3).eval()
    generator = TransformersGenerator.for_model(model, tokenizer, None, temperature=0.0, entropy_estimator="top_k")
    healthy = generator.source
    try:
        generator.source = _recording_source(model, tokenizer, healthy.generation_config, fail_after=3)
        with pytest.raises(RuntimeError, match="^the model crashed mid-generation$"):
            generator([tokenizer.encode("Add 1.")], [8])
        generator.source = healthy
        [segment] = generator([tokenizer.encode("Add 1.")], [4])
        assert len(segment.entropies) == 4 and all(math.isfinite(e) for e in segment.entropies)
    finally:
        generator.close()


def test_first_stop_keeps_each_rows_first_firing_length_and_passes_everything_through():
    from arpo_trl.rollout.generation import _FirstStop

    fired = iter([[False, True, False], [False, False, False], [True, True, False]])
    received = []

    def inner(input_ids, scores, **kwargs):
        received.append((scores, kwargs))
        return torch.tensor(next(fired))

    stop = _FirstStop(inner)
    outs = [stop(torch.zeros(3, width, dtype=torch.long), f"scores{width}", step=width).tolist() for width in (5, 6, 7)]
    assert outs == [[False, True, False], [False, False, False], [True, True, False]]
    assert stop.first.tolist() == [7, 5, -1] and stop.first.dtype == torch.long
    assert received == [("scores5", {"step": 5}), ("scores6", {"step": 6}), ("scores7", {"step": 7})]


def test_split_segments_cuts_each_row_at_its_eos_its_first_stop_or_its_own_budget():
    """Six rows of one batch (prompt width 10, EOS id 9, the recorder stopped after 4 steps)."""
    from arpo_trl.rollout.generation import _FirstStop, split_segments

    new_ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 9, 4, 5, 6], [1, 2, 3, 4, 5, 6],
                            [1, 2, 3, 4, 5, 6], [1, 9, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])  # fmt: skip
    entropies = torch.arange(24, dtype=torch.float).reshape(6, 4)
    stop = _FirstStop(None)
    stop.first = torch.tensor([13, 13, 15, 14, 14, -1])
    budgets = [6, 6, 3, 4, 6, 6]
    segments = split_segments(new_ids, entropies, budgets, [9], stop, prompt_width=10)

    def seen(values):
        return [None if math.isnan(v) else v for v in values]

    assert [(s.ids, s.finish) for s in segments] == [
        ([1, 2, 3], "stop"),  # the stop string ends at the 3rd token
        ([1, 2, 9], "eos"),  # the stop string ends with the EOS itself: an EOS
        ([1, 2, 3], "length"),  # the stop fired after this row's own budget, which the batch's outran
        ([1, 2, 3, 4], "stop"),  # the stop string ends at the last token of the budget
        ([1, 9], "eos"),
        ([1, 2, 3, 4, 5, 6], "length"),
    ]
    assert seen(segments[5].entropies) == [20.0, 21.0, 22.0, 23.0, None, None]
    assert seen(segments[3].entropies) == [12.0, 13.0, 14.0, 15.0]
    unmeasured = split_segments(new_ids[:1], None, [6], [9], None, prompt_width=10)
    assert (unmeasured[0].ids, seen(unmeasured[0].entropies)) == ([1, 2, 3, 4, 5, 6], [None] * 6)


@pytest.mark.parametrize("eos, listed", [(None, []), (5, [5]), ([5, 6], [5, 6])])
def test_plain_model_reads_eos_ids_given_as_none_one_id_or_a_list(tokenizer, eos, listed):
    from transformers import GenerationConfig

    from arpo_trl.rollout.generation import PlainModel

    source = PlainModel(None, tokenizer, GenerationConfig(eos_token_id=eos, pad_token_id=4))
    assert (source.eos_token_ids, source.pad_token_id) == (listed, 4)


def test_for_model_and_sampling_defaults_filters_and_the_models_logit_transform(tokenizer):
    """Defaults: plain sampling at T = 1 with no top-p/top-k filter; filters reach the config; the recorder applies the
    model's logit scale and soft-cap (read from its config, as `output_logit_transform` reads them)."""
    from arpo_trl.rollout.generation import PlainModel, TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3)
    defaults = PlainModel.sampling(model, tokenizer)
    assert (defaults.do_sample, defaults.temperature, defaults.top_p, defaults.top_k) == (True, 1.0, 1.0, 0)
    plain = TransformersGenerator.for_model(model, tokenizer, None)
    config = plain.source.generation_config
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 1.0, 1.0, 0)
    plain.close()
    model.config.logit_scale, model.config.final_logit_softcapping = 0.5, 30.0
    filtered = TransformersGenerator.for_model(model, tokenizer, None, temperature=0.7, top_p=0.9, top_k=5)
    config = filtered.source.generation_config
    assert (config.temperature, config.top_p, config.top_k) == (0.7, 0.9, 5)
    assert (filtered.recorder.logit_scale, filtered.recorder.softcap) == (0.5, 30.0)
    filtered.close()
    bare = TransformersGenerator(PlainModel(model, tokenizer, defaults), None, EntropyRecorder(1.0))
    assert bare.measure_every_token is False
    bare.close()  # no hooks of its own: nothing to remove
    assert bare._hooks == []
