"""The official code's rollout, knob by knob, against trees derived by hand from its loop (docs/reproduction.md).

The official `generate_sequences` loop, per round: generate every active trajectory; measure each segment's
entropy (H_initial of a slot is the first segment ever measured in it); classify (a tool tag under the call limit
queues a call, an empty one ends the trajectory, one over the limit appends a trained EOS and ends); run the tools
and append ``" <result>\\n…\\n</result>"``; branch (lagged: on the segment before the call); and, for a prompt with
nothing active and fewer than M trajectories, add **one** fresh root, which may branch in turn.
Both drivers run the same scenarios (the scripted model of tests/fakes.py).
"""

import pytest
from fakes import ScriptedEngine, ScriptedGenerator

from arpo_trl import ARPOConfig
from arpo_trl.rollout.branching import BranchPolicy
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.round_driver import RolloutSettings, RoundDriver, Segment
from arpo_trl.rollout.stream_driver import StreamDriver
from arpo_trl.testing import calc
from arpo_trl.tools import ToolExecutor

OFFICIAL = dict(
    entropy_timing="lagged",
    rollout_fill="sequential",
    initial_entropy="frozen_per_slot",
    call_limit_eos_trained=True,
    empty_tool_call="end",
)


def run(tok, driver="rounds", m=4, n=1, calls=1, alpha=1.0, generator=None, frozen=None, groups=1, prompt=None, **kw):
    values = dict(group_size=m, initial_rollouts=n, entropy_window=4, max_completion_length=200, **OFFICIAL)
    values.update(kw)
    settings = RolloutSettings(**values)
    protocol = TagProtocol(tok, ["calc"], result_style="official")
    common = dict(
        settings=settings,
        protocol=protocol,
        executor=ToolExecutor([calc], timeout=5),
        policy=BranchPolicy(alpha, 0.0, seed=0),
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        frozen_initial=frozen,
    )
    if driver == "rounds":
        rollout = RoundDriver(generator=generator or ScriptedGenerator(tok, calls), **common)
    else:
        rollout = StreamDriver(engine=ScriptedEngine(tok, calls), stop=protocol.stop_strings, **common)
    prompt = prompt or tok.encode("Add 1 and 2.")
    return rollout.run([prompt] * (m * groups))


def shape(trajs):
    return [(t.slot, t.kind, t.parent, t.can_branch, t.finish_reason) for t in trajs]


@pytest.mark.parametrize("driver", ["rounds", "async"])
def test_roots_that_never_call_a_tool_get_one_fresh_root_at_a_time(tokenizer, driver):
    trajs, stats = run(tokenizer, driver, m=4, n=2, calls=0)
    # round 1: both roots answer; then one fresh root per round while nothing is active (slots 2, then 3)
    assert shape(trajs) == [
        (0, "root", None, True, "eos"),
        (1, "root", None, True, "eos"),
        (2, "fresh", None, True, "eos"),
        (3, "fresh", None, True, "eos"),
    ]
    assert stats.fresh == 2 and stats.branches == 0
    if driver == "rounds":
        assert stats.rounds == 3


@pytest.mark.parametrize("driver", ["rounds", "async"])
def test_sequential_fresh_roots_branch_in_turn(tokenizer, driver):
    """α = 1: the root forks at its result (lagged: ΔH = 0 at a first call, P = α); when both have answered, ONE
    fresh root starts, calls, and forks into the last slot — the official fill, not padding."""
    trajs, stats = run(tokenizer, driver, m=4, n=1, calls=1)
    assert shape(trajs) == [
        (0, "root", None, True, "eos"),
        (1, "branch", 0, True, "eos"),
        (2, "fresh", None, True, "eos"),
        (3, "branch", 2, True, "eos"),
    ]
    assert stats.entropy_deltas == [0.0, 0.0]  # the lagged decision at a first call: ΔH = 0
    assert stats.duplicates == 0
    if driver == "rounds":
        assert stats.rounds == 4
    # the result wrapper of the official code, leading space included
    text = tokenizer.decode(trajs[0].completion_ids)
    assert "</calc> <result>\n" in text and "\n</result>" in text


def test_paper_fill_starts_every_fresh_rollout_at_once_without_branching(tokenizer):
    trajs, stats = run(tokenizer, m=4, n=1, calls=1, rollout_fill="fresh")
    assert shape(trajs) == [
        (0, "root", None, True, "eos"),
        (1, "branch", 0, True, "eos"),
        (2, "fresh", None, False, "eos"),
        (3, "fresh", None, False, "eos"),
    ]
    # 1: the root calls and forks; 2: both answer; 3: both fresh rollouts call; 4: they answer
    assert stats.rounds == 4


def test_frozen_per_slot_initial_entropy_is_kept_across_batches(tokenizer):
    frozen = {}
    first, _ = run(tokenizer, m=3, n=2, calls=1, alpha=0.0, frozen=frozen)
    assert set(frozen) == {0, 1}  # measured while a slot was free: the roots (the fresh root fills the last)
    kept = dict(frozen)
    other = tokenizer.encode("Add 7 and 8, then more.")  # another prompt: other segments, other entropies
    second, stats = run(tokenizer, m=3, n=2, calls=1, alpha=0.0, frozen=frozen, prompt=other)
    assert frozen == kept  # never overwritten
    assert [t.h_initial for t in second[:2]] == [kept[0], kept[1]]  # the roots decided on the frozen values
    # what the paper's per-root H_initial measures on that prompt: something else
    afresh, _ = run(tokenizer, m=3, n=2, calls=1, alpha=0.0, prompt=other, initial_entropy="per_root")
    assert all(t.h_initial != pytest.approx(kept[t.slot]) for t in afresh[:2])


def test_per_root_initial_entropy_is_measured_afresh(tokenizer):
    frozen = {}
    run(tokenizer, m=3, n=2, calls=1, alpha=0.0, frozen=frozen, initial_entropy="per_root")
    assert frozen == {}


@pytest.mark.parametrize("trained", [True, False])
def test_eos_appended_at_the_call_limit(tokenizer, trained):
    trajs, _ = run(tokenizer, m=2, n=2, calls=3, alpha=0.0, max_tool_rounds=1, call_limit_eos_trained=trained)
    for t in trajs:
        assert t.finish_reason == "call_limit" and t.completion_ids[-1] == tokenizer.eos_token_id
        assert t.tool_mask[-1] == (1 if trained else 0)
        assert tokenizer.decode(t.completion_ids).count("<result>") == 1


class EmptyCall:
    """Every segment is an empty call."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, prefixes, max_new_tokens, need_entropy=None):
        ids = self.tok.encode(" <calc> </calc>", add_special_tokens=False)
        return [Segment(list(ids), [1.0] * len(ids), "stop") for _ in prefixes]


@pytest.mark.parametrize("action", ["end", "error"])
def test_empty_call(tokenizer, action):
    trajs, stats = run(
        tokenizer, m=2, n=2, generator=EmptyCall(tokenizer), empty_tool_call=action, max_tool_rounds=2, alpha=0.0
    )
    if action == "end":  # official: silently, no tool, no EOS
        assert all(t.finish_reason == "empty_call" and t.completion_ids[-1] != tokenizer.eos_token_id for t in trajs)
        assert stats.tool_executions == 0
    else:  # the model reads an error and continues (up to the call limit)
        assert stats.tool_errors == stats.tool_executions > 0
        assert all("Error: empty" in tokenizer.decode(t.completion_ids) for t in trajs)


def test_budget_end_stops_the_official_loop_with_exactly_m(tokenizer):
    trajs, stats = run(tokenizer, m=4, n=1, calls=3, max_completion_length=30)
    assert len(trajs) == 4 and all(t.done for t in trajs)
    assert all(len(t.completion_ids) <= 30 for t in trajs)
    assert {t.finish_reason for t in trajs} <= {"length", "no_room_for_result", "eos", "call_limit"}
    assert stats.duplicates == 0


def test_rollout_preset_official_sets_every_knob():
    config = ARPOConfig(
        output_dir="/tmp/arpo-preset", per_device_train_batch_size=4, num_generations=4, use_cpu=True,
        report_to="none", rollout_preset="official", rollout_fill="fresh", entropy_timing="after_tool",
    )  # fmt: skip
    assert (config.entropy_timing, config.rollout_fill, config.entropy_estimator) == ("lagged", "sequential", "top_k")
    assert (config.initial_entropy, config.call_limit_eos_trained, config.empty_tool_call) == (
        "frozen_per_slot",
        True,
        "end",
    )
    assert (config.result_format, config.branch_factor, config.entropy_window) == ("official", 1, 20)
