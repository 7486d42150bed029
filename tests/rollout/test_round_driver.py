"""The tree rollout without a model: a scripted generator stands in at the generation seam."""

import threading

import pytest
from fakes import Counter, CountingGenerator, assert_forks_share_their_parents_prefix, rollout

from arpo_trl.rollout.branching import BranchPolicy
from arpo_trl.rollout.environments import environment_tools
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.tree import RolloutSettings
from arpo_trl.testing import calc
from arpo_trl.tools import ToolExecutor


@pytest.mark.parametrize("m, n, z", [(4, 2, 1), (8, 4, 1), (8, 1, 3), (5, 5, 1), (6, 4, 2)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_every_group_ends_with_exactly_m_finished_completions(tokenizer, m, n, z, alpha):
    trajs, stats = rollout(tokenizer, m=m, n=n, z=z, alpha=alpha, beta=0.3)
    assert [t.slot for t in trajs] == list(range(2 * m))
    assert all(t.done and t.group == t.slot // m for t in trajs)
    assert stats.branches + stats.fresh == 2 * (m - n)  # budget used by branches, the rest filled fresh
    assert stats.branches <= 2 * (m - n)


def test_forced_branching_uses_the_whole_budget_and_forks_share_the_prefix_through_the_result(tokenizer):
    trajs, stats = rollout(tokenizer, m=8, n=2, alpha=1.0, beta=0.0)
    assert stats.branches == 2 * 6 and stats.fresh == 0
    by_slot = {t.slot: t for t in trajs}
    for t in trajs:
        if t.kind != "branch":
            continue
        parent = by_slot[t.parent]
        cut = t.fork_position
        assert t.completion_ids[:cut] == parent.completion_ids[:cut]
        assert t.tool_mask[cut - 1] == 0  # the shared prefix ends on a tool-result token
        assert tokenizer.decode(t.completion_ids[:cut]).endswith("</result>")


def test_no_branching_when_alpha_and_beta_are_zero(tokenizer):
    trajs, stats = rollout(tokenizer, m=6, n=2, alpha=0.0, beta=0.0)
    assert stats.branches == 0 and stats.fresh == 2 * 4
    assert all(t.kind in ("root", "fresh") for t in trajs)
    assert stats.branch_probabilities and set(stats.branch_probabilities) == {0.0}


def test_duplicate_fill_repeats_the_last_trajectory(tokenizer):
    trajs, stats = rollout(tokenizer, m=4, n=2, alpha=0.0, beta=0.0, fill="duplicate", groups=1)
    assert stats.duplicates == 2 and stats.fresh == 0
    assert trajs[2].completion_ids == trajs[1].completion_ids == trajs[3].completion_ids


def test_unique_tool_executions_are_fewer_than_calls_seen_by_completions(tokenizer):
    trajs, stats = rollout(tokenizer, m=8, n=2, alpha=1.0, beta=0.0, calls=3, groups=1)
    seen = sum(len(t.tool_events) for t in trajs)
    assert seen == 8 * 3
    assert stats.tool_executions < seen
    assert all(
        sum(1 for e in t.tool_events if not e.inherited) + sum(1 for e in t.tool_events if e.inherited) == 3
        for t in trajs
    )


def test_lagged_timing_first_decision_has_zero_entropy_change(tokenizer):
    """The official code (docs/reproduction.md, lagged timing) decides at the first call on the segment that defined H_initial."""
    trajs, stats = rollout(tokenizer, m=4, n=4, alpha=0.5, beta=0.2, timing="lagged", groups=1)
    roots = [t for t in trajs if t.kind == "root"]
    assert roots  # no budget: no decisions at all
    trajs, stats = rollout(tokenizer, m=8, n=2, alpha=0.5, beta=0.2, timing="lagged", groups=1)
    first_decisions = [t.branch_events[0] for t in trajs if t.kind == "root" and t.branch_events]
    assert first_decisions and all(e.delta_h == 0.0 for e in first_decisions)


def test_after_tool_timing_measures_the_tokens_after_the_result(tokenizer):
    trajs, _ = rollout(tokenizer, m=8, n=2, alpha=0.5, beta=0.2, groups=1)
    events = [e for t in trajs for e in t.branch_events]
    assert events and any(e.delta_h != 0.0 for e in events)
    for t in trajs:
        for e in t.branch_events:  # decided at a tool-result boundary
            assert t.tool_mask[e.position - 1] == 0


def test_completion_budget_is_honoured_tool_tokens_included(tokenizer):
    trajs, _ = rollout(tokenizer, m=4, n=2, calls=5, max_len=30)
    assert all(len(t.completion_ids) <= 30 for t in trajs)
    assert any(t.finish_reason in ("length", "no_room_for_result") for t in trajs)


def test_call_limit_ends_with_an_unsampled_eos(tokenizer):
    trajs, stats = rollout(tokenizer, m=4, n=2, calls=5, max_tool_rounds=2, groups=1)
    assert stats.call_limit_hits == 4
    for t in trajs:
        assert t.finish_reason == "call_limit" and t.tool_rounds == 2
        assert t.completion_ids[-1] == tokenizer.eos_token_id and t.tool_mask[-1] == 0


def test_call_limit_message_lets_the_model_continue(tokenizer):
    trajs, stats = rollout(tokenizer, m=2, n=2, calls=3, max_tool_rounds=1, call_limit_action="message", groups=1)
    assert stats.call_limit_hits >= 2
    texts = [tokenizer.decode(t.completion_ids) for t in trajs]
    assert all("tool-call limit (1)" in x and x.endswith(tokenizer.eos_token) for x in texts)


def test_a_crashing_tool_becomes_an_error_result_and_is_counted(tokenizer):
    def calc(expression: str) -> str:
        raise RuntimeError("boom")

    trajs, stats = rollout(tokenizer, m=2, n=2, calls=1, tools=(calc,), groups=1)
    assert stats.tool_errors == 2
    assert all("RuntimeError: boom" in tokenizer.decode(t.completion_ids) for t in trajs)


def test_ranks_make_the_same_number_of_generate_calls_however_their_trees_branch(tokenizer):
    """Two simulated ranks with very different trees: the collective `any_active` keeps their rounds aligned."""
    barrier = threading.Barrier(2)
    flags = {}
    lock = threading.Lock()

    def any_active(rank):
        def reduce(local):
            with lock:
                flags[rank] = local
            barrier.wait()
            result = any(flags.values())
            barrier.wait()
            return result

        return reduce

    gens = [CountingGenerator(tokenizer, calls=1), CountingGenerator(tokenizer, calls=4)]
    outcome = [None, None]

    def work(rank):
        outcome[rank] = rollout(
            tokenizer, m=8, n=2, alpha=[0.0, 1.0][rank], generator=gens[rank], any_active=any_active(rank), groups=1
        )

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(o is not None for o in outcome)
    assert outcome[0][1].branches == 0 and outcome[1][1].branches == 6
    assert len(gens[0].call_log) == len(gens[1].call_log)
    assert 0 in gens[0].call_log  # rank 0 finished early and joined the remaining rounds with no rows


def test_entropy_is_requested_only_for_rows_whose_window_is_read(tokenizer):
    gen = CountingGenerator(tokenizer, calls=2)
    rollout(tokenizer, m=4, n=2, alpha=0.0, beta=0.0, generator=gen, groups=1)
    # Round 1: the two roots (H_initial). Round 2: both await their decision at result 1. Round 3: at result 2.
    # Then the fresh rollouts, which never branch, ask for nothing.
    assert gen.need_log[:3] == [[True, True]] * 3
    assert all(not any(needs) for needs in gen.need_log[3:]) and len(gen.need_log) > 3

    # N = M (GRPO): no free slot, so no decision is ever taken and no entropy is ever needed.
    gen = CountingGenerator(tokenizer, calls=2)
    _, stats = rollout(tokenizer, m=4, n=4, alpha=1.0, beta=0.0, generator=gen, groups=1)
    assert stats.branches == 0 and not any(any(needs) for needs in gen.need_log)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_speculative_fill_starts_fresh_rollouts_with_the_roots_and_discards_those_branches_need(tokenizer, alpha):
    m, n, groups = 8, 2, 2
    gen = CountingGenerator(tokenizer, calls=2)
    beta = 0.3 if 0 < alpha < 1 else 0.0  # α = 0 or 1 with β = 0: never or always branch
    trajs, stats = rollout(tokenizer, m=m, n=n, alpha=alpha, beta=beta, fill="speculative", generator=gen)
    assert gen.call_log[0] == groups * m  # every slot samples from round 1 on
    assert [t.slot for t in trajs] == list(range(groups * m))
    assert all(t.done and t.finish_reason != "discarded" for t in trajs)
    kinds = [t.kind for t in trajs]
    assert kinds.count("root") == groups * n
    assert stats.branches + stats.fresh == groups * (m - n) == kinds.count("branch") + kinds.count("fresh")
    # Every free slot was lent at the start, so every branch reclaimed one (highest slot first).
    assert stats.discarded == stats.branches
    for g in range(groups):
        group = trajs[g * m : (g + 1) * m]
        fresh_slots = [t.slot for t in group if t.kind == "fresh"]
        branch_slots = [t.slot for t in group if t.kind == "branch"]
        assert not fresh_slots or not branch_slots or max(fresh_slots) < min(branch_slots)
    if alpha == 1.0:
        assert stats.fresh == 0 and stats.discarded == groups * (m - n)
    if alpha == 0.0:
        assert stats.discarded == 0 and stats.fresh == groups * (m - n)


def test_speculative_fill_needs_fewer_rounds_than_waiting_for_the_tree(tokenizer):
    _, waiting = rollout(tokenizer, m=8, n=2, alpha=0.0, beta=0.0, calls=2)
    _, speculative = rollout(tokenizer, m=8, n=2, alpha=0.0, beta=0.0, calls=2, fill="speculative")
    assert speculative.rounds < waiting.rounds
    assert speculative.fresh == waiting.fresh == 2 * 6


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_speculative_forks_sample_in_the_parents_round_and_keep_only_decided_forks(tokenizer, alpha):
    m, n, groups = 8, 2, 2
    beta = 0.3 if 0 < alpha < 1 else 0.0
    gen = CountingGenerator(tokenizer, calls=2)
    trajs, stats = rollout(tokenizer, m=m, n=n, alpha=alpha, beta=beta, generator=gen, speculative_forks=True)
    assert [t.slot for t in trajs] == list(range(groups * m)) and all(t.done for t in trajs)
    assert stats.branches + stats.fresh == groups * (m - n)
    # Round 2: each root decides at result 1 and has one copy sampling beside it.
    assert gen.call_log[1] == 2 * groups * n
    decisions = len(stats.branch_probabilities)
    assert stats.discarded_forks == decisions - stats.branches  # Z = 1: one copy per decision, kept iff forked
    assert_forks_share_their_parents_prefix(tokenizer, trajs, results=2)
    if alpha == 1.0:
        assert stats.branches == groups * (m - n) and stats.fresh == 0
    if alpha == 0.0:
        assert stats.branches == 0 and stats.discarded_forks == decisions > 0


def test_speculative_forks_remove_the_branch_lag(tokenizer):
    _, lagging = rollout(tokenizer, m=8, n=2, alpha=1.0, beta=0.0, calls=3, groups=1)
    _, speculative = rollout(tokenizer, m=8, n=2, alpha=1.0, beta=0.0, calls=3, groups=1, speculative_forks=True)
    assert lagging.branches == speculative.branches == 6
    assert speculative.rounds < lagging.rounds


def test_completions_stay_within_the_models_context(tokenizer):
    prompt_len = len(tokenizer.encode("Add 1 and 2."))
    context = prompt_len + 30
    trajs, _ = rollout(tokenizer, m=4, n=2, alpha=1.0, beta=0.0, calls=3, max_len=200, max_model_len=context)
    assert all(prompt_len + len(t.completion_ids) < context for t in trajs)
    # The context, not the completion budget, ended them.
    assert {t.finish_reason for t in trajs} & {"length", "no_room_for_result"}
    with pytest.raises(ValueError, match="leaves no room"):
        rollout(tokenizer, m=4, n=2, max_model_len=prompt_len)


# -------------------------- tests written for mutants that survived `make mutate` (tests/README.md, "Mutation testing")


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
