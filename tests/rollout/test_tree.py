"""What the tree logic reads and where it stops, checked with values (issue 11's surviving mutants).

- H_initial and H_t are the window statistic of the entropies recorded for exactly those tokens: the first k of
  the root, and the first k after tool result t (or, with lagged timing, the first k of the segment before it);
  H_initial is measured afresh in every batch.
- The budget: a completion reaches max_completion_length exactly and never exceeds it, tool tokens included; a
  result that exactly fills the budget is kept (as TRL's tool loop keeps it), one token more is not; calls that no
  result can follow are not run.
- Seeds: ranks draw different decisions, the same seed the same ones.
"""

import math

import pytest
from fakes import ScriptedGenerator, scripted_segment

from arpo_trl.rollout.branching import BranchPolicy, rollout_seed
from arpo_trl.rollout.entropy import window_entropy
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.round_driver import RolloutSettings, RoundDriver, Segment
from arpo_trl.testing import calc
from arpo_trl.tools import ToolExecutor

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
