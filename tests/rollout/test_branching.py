"""Branching (`arpo_trl/rollout/branching.py`): Eq. 5's clipped probability, α/β extremes, the Bernoulli and
threshold rules, seeding; AEPO's consecutive-branch penalty inside the real tree, on both drivers (the scripted
model of tests/fakes.py stands in for the generator and for vLLM)."""

import pytest
from fakes import ScriptedEngine, ScriptedGenerator, settings

from arpo_trl.rollout.branching import BranchPolicy, branch_probability
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.round_driver import RoundDriver
from arpo_trl.rollout.stream_driver import StreamDriver
from arpo_trl.testing import calc
from arpo_trl.tools import ToolExecutor


def rollout(tok, driver, rate, m=8, n=1, groups=1, calls=4):
    # threshold rule, α = 1, β = 0, τ = 0.5: P = 1 − λ·c, fork iff P > 0.5 (with λ = 0.5: iff c = 0)
    policy = BranchPolicy(1.0, 0.0, "threshold", 0.5, seed=0, penalty_rate=rate, rounds=driver == "rounds")
    protocol = TagProtocol(tok, ["calc"])
    args = (settings(m, n), None, protocol, ToolExecutor([calc], timeout=5), policy, len(tok), tok.eos_token_id)
    if driver == "rounds":
        engine = RoundDriver(*(args[:1] + (ScriptedGenerator(tok, calls),) + args[2:]))
    else:
        engine = StreamDriver(*(args[:1] + (ScriptedEngine(tok, calls),) + args[2:]), stop=protocol.stop_strings)
    trajectories, stats = engine.run([tok.encode("Add 1 and 2.")] * (m * groups))
    return trajectories, stats, policy


@pytest.mark.parametrize("driver", ["rounds", "async"])
def test_penalty_damps_consecutive_forks_in_the_tree(tokenizer, driver):
    trajs, stats, policy = rollout(tokenizer, driver, rate=0.5)
    events = [e for t in trajs for e in t.branch_events]
    assert events and len(stats.consecutive_branches) == len(events) == len(stats.branch_probabilities)
    # each decision forks exactly when its prompt did not fork in its previous round (P = 1), never at P = 0.5
    assert all(bool(e.forked_slots) == (e.probability == 1.0) for e in events)
    assert any(e.probability == 0.5 for e in events)  # the penalty reached the tree
    _, plain, _ = rollout(tokenizer, driver, rate=0.0)
    assert all(p == 1.0 for p in plain.branch_probabilities)  # without it every decision forks while slots last
    # the same budget takes more decisions to spend: forks spread over more steps instead of one run of them
    assert len(stats.branch_probabilities) > len(plain.branch_probabilities)


def test_without_rounds_each_decision_of_the_prompt_is_a_round(tokenizer):
    _, stats, _ = rollout(tokenizer, "async", rate=0.5)
    seen = stats.consecutive_branches
    assert len(seen) >= 3
    # fork (c = 0 → 1), no fork (c = 1 → 0), fork, ...: one prompt, decisions in order
    assert seen == [i % 2 for i in range(len(seen))]


# ------------------------------------------------------------------------ the branch probability and the policy's rules


def test_branch_probability_is_clipped_linear():
    assert branch_probability(0.0, 0.5, 0.2) == 0.5
    assert branch_probability(1.0, 0.5, 0.2) == pytest.approx(0.7)
    assert branch_probability(10.0, 0.5, 0.2) == 1.0
    assert branch_probability(-10.0, 0.5, 0.2) == 0.0


@pytest.mark.parametrize("delta_h", [-5.0, 0.0, 5.0])
def test_alpha_beta_zero_never_forks_and_alpha_one_beta_zero_always_forks(delta_h):
    never, always = BranchPolicy(0.0, 0.0, seed=1), BranchPolicy(1.0, 0.0, seed=1)
    assert not any(never.decide(delta_h).fork for _ in range(500))
    assert all(always.decide(delta_h).fork for _ in range(500))


def test_bernoulli_rule_forks_at_the_documented_rate():
    policy = BranchPolicy(0.5, 0.2, seed=0)
    rate = sum(policy.decide(1.0).fork for _ in range(20000)) / 20000
    assert rate == pytest.approx(0.7, abs=0.015)


def test_threshold_rule_is_the_papers_deterministic_comparison():
    policy = BranchPolicy(0.5, 0.2, rule="threshold", threshold=0.5)
    assert policy.decide(0.01).fork and not policy.decide(0.0).fork and not policy.decide(-1).fork


def test_seeded_policy_is_reproducible():
    a, b = BranchPolicy(0.5, 0.2, seed=7), BranchPolicy(0.5, 0.2, seed=7)
    assert [a.decide(0.3).fork for _ in range(50)] == [b.decide(0.3).fork for _ in range(50)]


# -------------------------- tests written for mutants that survived `make mutate` (tests/README.md, "Mutation testing")


def test_threshold_rule_defaults_to_one_half_and_unknown_rules_are_named():
    policy = BranchPolicy(0.3, 0.2, rule="threshold")
    assert policy.decide(1.1).fork and not policy.decide(0.9).fork  # α + β·ΔH = 0.52 and 0.48 against 0.5
    with pytest.raises(ValueError, match="^unknown branch rule 'coin'$"):
        BranchPolicy(0.3, 0.2, rule="coin")
