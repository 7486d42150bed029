"""AEPO (arpo_trl/aepo.py and its hooks): the budget formulas, the penalty, the entropy-balanced clip's gradient and
the entropy-aware advantage, each against the formula written out by hand; then through TRL's real loss on the tiny
model, the config's presets and refusals, and a 2-process run with AEPO on."""

import math

import pytest
import torch
from trl import GRPOConfig

from arpo_trl import AEPOConfig, AEPOTrainer, ARPOConfig, ARPOTrainer
from arpo_trl.aepo import (
    balanced_epsilon_high,
    branch_penalty,
    entropy_aware_advantages,
    entropy_balanced_clip_loss,
    global_samples_official,
    global_samples_paper,
    official_fork,
    official_fork_probability,
    penalized_branch_probability,
    sigmoid,
    standardized_entropy,
)
from arpo_trl.testing import calc, calc_dataset, closeness_reward

# ----------------------------------------------------------------------------------------------- budget split


def test_official_budget_formula_at_its_clamps():
    n = 16
    assert global_samples_official(n, 1.0, 1.0) == 9  # int(16·0.5) + 1
    assert global_samples_official(n, 3.0, 1.0) == 12  # int(16·σ(1) = 11.70) + 1
    assert global_samples_official(n, 1.0, 3.0) == 5  # int(16·σ(−1) = 4.30) + 1
    assert global_samples_official(n, 100.0, 0.0) == n  # int(16·1.0) + 1 = 17, clamped to n
    assert global_samples_official(n, 0.0, 100.0) == 1  # int(16·e^−50) + 1
    assert global_samples_official(n, 0.0, 1e6) == 1  # no overflow in σ
    assert global_samples_official(1, 5.0, 0.0) == 1
    assert global_samples_official(12, 3.0, 1.0, beta=1.0) == 11  # int(12·σ(2) = 10.57) + 1


def test_paper_budget_formula_rounds_and_keeps_one_global_sample():
    assert global_samples_paper(16, 1.0, 1.0, 0.5) == 8  # 16·0.5
    assert global_samples_paper(16, 3.0, 1.0, 0.5) == 12  # 11.70 rounds up
    assert global_samples_paper(16, 1.0, 3.0, 0.5) == 4  # 4.30 rounds down
    assert global_samples_paper(16, 0.0, 100.0, 0.5) == 1  # m → 0, at least one global sample
    assert global_samples_paper(16, 100.0, 0.0, 0.5) == 16
    assert sigmoid(0.0) == 0.5 and sigmoid(-800.0) == 0.0 and sigmoid(800.0) == 1.0


def test_probe_segments_and_their_entropies():
    from arpo_trl.aepo import probe_entropies, segment_windows

    mask = [1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1, 0]  # segment, result, segment, result, segment, call-limit EOS
    ent = [1.0, 2.0, 9.0, math.nan, math.nan, 3.0, 5.0, math.nan, 4.0, 6.0, 8.0, 8.0, math.nan]
    windows = segment_windows(mask, ent, lambda h: sum(h[:2]) / 2)  # k = 2, mean
    assert windows == [1.5, 4.0, 5.0]
    assert probe_entropies(windows, official=False) == (1.5, 4.5)  # H̄ over the steps after tool results
    assert probe_entropies(windows, official=True) == (1.5, pytest.approx(10.5 / 3))  # over every segment
    assert probe_entropies([2.0], official=False) == (2.0, 2.0)  # no tool step: H̄ = H_root
    assert probe_entropies([2.0, math.nan, 4.0], official=False) == (2.0, 4.0)  # unmeasured segments left out
    assert segment_windows([1, 1], [0.5, 0.7], lambda h: h[0]) == [0.5]  # a trajectory ending on a sampled token


# ----------------------------------------------------------------------------------------------- penalty


def test_penalty_closed_forms():
    assert branch_penalty(0, 0.05) == 0.0 and branch_penalty(4, 0.05) == pytest.approx(0.2)
    assert branch_penalty(30, 0.05) == 1.0  # capped: the probability never turns negative
    # Paper: (α + γ·ΔH)·(1 − P̂(l))
    assert penalized_branch_probability(0.5, 0.5, 0.2, 4, 0.05) == pytest.approx(0.6 * 0.8)
    assert penalized_branch_probability(0.5, 0.5, 0.2, 0, 0.0) == pytest.approx(0.6)  # λ = 0: ARPO's P
    assert penalized_branch_probability(10.0, 0.5, 0.2, 2, 0.05) == 1.0  # clipped to a probability
    assert penalized_branch_probability(0.5, 0.5, 0.2, 20, 0.05) == 0.0
    # Official AEPO rule, α a threshold: P = clip(1 − α/f + β·ΔH, 0, 1), f = 1 − 0.05·c
    assert official_fork_probability(0.5, 0.5, 0.2, 0, 0.05) == pytest.approx(0.6)  # = ARPO's at α = 0.5, c = 0
    assert official_fork_probability(0.5, 0.8, 0.2, 0, 0.05) == pytest.approx(0.3)  # ARPO would give 0.9
    assert official_fork_probability(0.5, 0.5, 0.2, 4, 0.05) == pytest.approx(1 - 0.5 / 0.8 + 0.1)
    assert official_fork_probability(0.0, 0.5, 0.2, 20, 0.05) == 0.0  # f = 0
    assert official_fork_probability(0.0, 0.0, 0.2, 20, 0.05) == 1.0  # 0 ≥ 0


@pytest.mark.parametrize(("delta_h", "alpha", "c"), [(0.5, 0.5, 0), (0.5, 0.8, 0), (-1.0, 0.3, 3), (0.2, 0.5, 6)])
def test_official_rule_forks_with_its_closed_form_probability(delta_h, alpha, c):
    grid = [(i + 0.5) / 20000 for i in range(20000)]  # u ~ U(0, 1), integrated on a grid
    share = sum(official_fork(u, delta_h, alpha, 0.2, c, 0.05) for u in grid) / len(grid)
    assert share == pytest.approx(official_fork_probability(delta_h, alpha, 0.2, c, 0.05), abs=1e-4)


def _policy(rounds=True, rate=0.2):
    from arpo_trl.rollout.branching import BranchPolicy

    # threshold rule, α = 1, β = 0, τ = 0.5: fork iff 1 − 0.2·c > 0.5, i.e. while c ≤ 2
    return BranchPolicy(1.0, 0.0, rule="threshold", threshold=0.5, seed=0, penalty_rate=rate, rounds=rounds)


def test_consecutive_counter_counts_forking_rounds_and_resets():
    policy = _policy()
    seen = []
    for r in range(1, 7):
        d = policy.decide(0.0, group=0, round=r)
        seen.append((d.consecutive, d.fork))
    # forks at c = 0, 1, 2; c = 3 gives 0.4 < 0.5: no fork, so the next round starts over
    assert seen == [(0, True), (1, True), (2, True), (3, False), (0, True), (1, True)]
    assert policy.decide(0.0, group=0, round=7).penalty == pytest.approx(0.4)
    # two decisions in one round read the same c; the round counts once
    p = _policy()
    assert [p.decide(0.0, group=0, round=1).consecutive for _ in range(2)] == [0, 0]
    assert p.decide(0.0, group=0, round=2).consecutive == 1
    # a round without any decision of the prompt resets it (it did not fork then)
    p = _policy()
    p.decide(0.0, group=0, round=1)
    p.decide(0.0, group=1, round=2)
    assert p.decide(0.0, group=0, round=3).consecutive == 0
    # groups are counted apart; reseed (a new rollout) forgets every counter
    p = _policy()
    p.decide(0.0, group=0, round=1)
    p.decide(0.0, group=1, round=1)
    p.decide(0.0, group=0, round=2)
    assert p.consecutive == {0: 1, 1: 1}
    assert p.decide(0.0, group=1, round=3).consecutive == 0  # group 1 skipped round 2
    p.reseed(1)
    assert p.consecutive == {} and p.decide(0.0, group=0, round=1).consecutive == 0


def test_without_rounds_each_decision_is_a_round_and_no_penalty_is_arpo():
    policy = _policy(rounds=False)
    assert [policy.decide(0.0, group=3).consecutive for _ in range(5)] == [0, 1, 2, 3, 0]
    arpo = _policy(rate=0.0)
    assert all(arpo.decide(0.0, group=0, round=r).fork for r in range(1, 30))


def test_aepo_official_rule_in_the_policy_reads_alpha_as_a_threshold():
    from arpo_trl.rollout.branching import BranchPolicy

    n = 4000
    arpo = BranchPolicy(0.8, 0.0, seed=0)
    aepo = BranchPolicy(0.8, 0.0, rule="aepo_official", seed=0, penalty_rate=0.05)
    arpo_forks = sum(arpo.decide(0.0).fork for _ in range(n)) / n
    aepo_forks = sum(aepo.decide(0.0).fork for _ in range(n)) / n
    assert arpo_forks == pytest.approx(0.8, abs=0.03) and aepo_forks == pytest.approx(0.2, abs=0.03)
    assert aepo.decide(0.0).probability == pytest.approx(0.2)


# ----------------------------------------------------------------------------------------------- clipping

EPS = 0.2


def _cases():
    # (log π − log π_old, A): above the upper clip with A > 0 / A < 0, below the lower clip with A < 0 / A > 0, inside
    log_ratio = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.05], dtype=torch.float64)
    adv = torch.tensor([1.5, -1.5, -2.0, 2.0, 0.7], dtype=torch.float64)
    return log_ratio, adv


def test_balanced_clip_keeps_the_gradient_of_clipped_positive_tokens_only():
    log_ratio, adv = _cases()
    logp = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    old = -log_ratio
    loss = entropy_balanced_clip_loss(logp, old, adv, EPS, EPS, balanced=True)
    loss.sum().backward()
    ratio = log_ratio.exp()
    # Forward unchanged: PPO's −min(δA, clip(δ)A)
    ppo = -torch.min(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv)
    assert torch.allclose(loss.detach(), ppo)
    # d loss / d log π: (1 + ε_h)·A above the upper clip with A > 0 (PPO: 0); 0 below the lower clip with A < 0 (hard);
    # −δ·A wherever the unclipped term is the minimum
    expected = torch.tensor(
        [-(1 + EPS) * 1.5, ratio[1] * 1.5, 0.0, -ratio[3] * 2.0, -ratio[4] * 0.7], dtype=torch.float64
    )
    assert torch.allclose(logp.grad, expected)
    logp.grad = None
    entropy_balanced_clip_loss(logp, old, adv, EPS, EPS, balanced=False).sum().backward()
    assert logp.grad[0] == 0.0 and torch.allclose(logp.grad[1:], expected[1:])


def test_balanced_epsilon_high_is_eps_forward_and_carries_the_ratio_gradient():
    logp = torch.tensor([0.3, -1.0], dtype=torch.float64, requires_grad=True)
    eps = balanced_epsilon_high(logp, 0.28)
    assert eps.tolist() == [0.28, 0.28]  # exactly
    eps.sum().backward()
    assert logp.grad.tolist() == [pytest.approx(1.28), pytest.approx(1.28)]


# ----------------------------------------------------------------------------------------------- advantage


def test_entropy_standardized_over_valid_tokens_only():
    h = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    z = standardized_entropy(h, mask)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, std = values.mean(), values.std()  # unbiased, over the 4 valid tokens only
    expected = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    expected = torch.where(mask.bool(), (expected - mean) / std, torch.zeros(()))
    assert torch.allclose(z, expected)
    # one valid token, or all equal: std counts as 1
    assert standardized_entropy(torch.tensor([[7.0, 1.0]]), torch.tensor([[1, 0]])).tolist() == [[0.0, 0.0]]
    assert standardized_entropy(torch.tensor([[2.0, 2.0]]), torch.tensor([[1, 1]])).tolist() == [[0.0, 0.0]]
    assert not standardized_entropy(h.requires_grad_(), mask).requires_grad  # detached


def test_entropy_aware_advantage_scales_each_token():
    h = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    mask = torch.ones(2, 3)
    z = (h - h.mean()) / h.std()
    adv = torch.tensor([1.0, -2.0])
    out = entropy_aware_advantages(adv, h, mask, 0.2)
    assert torch.allclose(out, adv[:, None] * (1 + 0.2 * z))
    assert torch.equal(entropy_aware_advantages(adv, h, mask, 0.0), adv[:, None].expand(2, 3))  # official no-op
    token_adv = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
    assert torch.allclose(entropy_aware_advantages(token_adv, h, mask, 0.2), token_adv * (1 + 0.2 * z))


# ----------------------------------------------------------------------------------------------- config


def make_args(tmp_path, cls=ARPOConfig, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        initial_rollouts=2,
        max_completion_length=48,
        max_tool_calling_iterations=2,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        seed=0,
    )
    settings.update(overrides)
    return cls(**settings)


def test_presets(tmp_path):
    arpo = make_args(tmp_path)
    assert (arpo.entropy_balanced_clipping, arpo.entropy_advantage_coef, arpo.branch_penalty_rate) == (False, 0.0, 0.0)
    paper = make_args(tmp_path, algorithm_preset="aepo")
    assert paper.entropy_balanced_clipping and paper.entropy_advantage_coef == 0.2
    assert paper.branch_penalty_rate == 0.05 and paper.dynamic_rollouts == "paper" and paper.branch_rule == "bernoulli"
    assert make_args(tmp_path, cls=AEPOConfig).entropy_advantage_coef == 0.2  # AEPOConfig: preset 'aepo'
    official = make_args(tmp_path, algorithm_preset="aepo_official")
    assert official.branch_rule == "aepo_official" and official.rollout_preset == "official"
    assert official.entropy_advantage_coef == 0.0 and official.entropy_balanced_clipping
    assert official.dynamic_rollouts is None and official.entropy_timing == "lagged"
    mine = make_args(tmp_path, algorithm_preset="aepo", entropy_advantage_coef=0.1, branch_penalty_rate=0.2)
    assert (mine.entropy_advantage_coef, mine.branch_penalty_rate) == (0.1, 0.2)  # a value set explicitly wins


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"algorithm_preset": "aepo2"}, "algorithm_preset"),
        ({"entropy_balanced_clipping": True, "loss_type": "cispo"}, "entropy_balanced_clipping"),
        ({"entropy_balanced_clipping": True, "loss_type": "sapo"}, "entropy_balanced_clipping"),
        ({"algorithm_preset": "aepo", "loss_type": "vespo"}, "entropy_balanced_clipping"),
        ({"entropy_advantage_coef": 0.2, "loss_type": "vespo"}, "vespo"),
        ({"entropy_advantage_coef": float("nan")}, "entropy_advantage_coef"),
        ({"branch_penalty_rate": -0.05}, "branch_penalty_rate"),
        ({"dynamic_rollouts": "always"}, "dynamic_rollouts"),
        ({"aepo_budget_sensitivity": float("inf")}, "aepo_budget_sensitivity"),
    ],
)
def test_bad_aepo_settings_fail_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_every_clipped_loss_accepts_the_balanced_clip(tmp_path, loss_type):
    level = "sequence" if loss_type == "luspo" else "token"
    args = make_args(tmp_path, entropy_balanced_clipping=True, loss_type=loss_type, importance_sampling_level=level)
    assert args.entropy_balanced_clipping


# ----------------------------------------------------------------------------------------------- TRL's real loss


def _trainer(model, tokenizer, tmp_path, cls=ARPOTrainer, **overrides):
    args = make_args(tmp_path, **overrides)
    trainer = cls(
        model=model,
        reward_funcs=[closeness_reward],
        args=args,
        train_dataset=calc_dataset(8),
        processing_class=tokenizer,
        tools=[calc],
    )
    trainer.current_gradient_accumulation_steps = 1
    return trainer


SHIFT = torch.tensor([0.5, -0.5, 0.0, 0.5, 0.05, -0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])


def _batch(trainer, tokenizer):
    """Two rows: prompt + completion (the second padded), old log-probs set so that some tokens sit above the upper
    clip and some below the lower one, one positive and one negative advantage."""
    prompt = tokenizer.encode("What is 2+3?", add_special_tokens=False)
    comps = [
        tokenizer.encode(" It is 5, I think.", add_special_tokens=False),
        tokenizer.encode(" 7", add_special_tokens=False),
    ]
    t = max(map(len, comps))
    completion_ids = torch.tensor([c + [tokenizer.pad_token_id] * (t - len(c)) for c in comps])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (t - len(c)) for c in comps])
    prompt_ids = torch.tensor([prompt, prompt])
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5]),
        "num_items_in_batch": completion_mask.sum(),
    }
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([inputs["prompt_mask"], completion_mask], 1),
            t,
        )
    shift = SHIFT[:t]
    inputs["old_per_token_logps"] = logps - shift  # δ = e^shift
    return inputs


def _reference_loss(trainer, inputs, coef, balanced):
    """The written objective on the model's own log-probs, aggregated as TRL's bnpo: Σ mask·ℓ / Σ mask."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, attn, inputs["completion_ids"].size(1), compute_entropy=True
    )
    mask = inputs["completion_mask"].float()
    valid = entropies.detach()[mask.bool()]
    z = (entropies.detach() - valid.mean()) / valid.std()
    adv = inputs["advantages"][:, None] * (1 + coef * z)
    per_token = entropy_balanced_clip_loss(logps, inputs["old_per_token_logps"], adv, EPS, EPS, balanced=balanced)
    return (per_token * mask).sum() / mask.sum()


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize(("coef", "balanced"), [(0.2, True), (0.0, True), (0.2, False)])
def test_trl_loss_with_aepo_equals_the_written_objective(tool_model, tokenizer, tmp_path, coef, balanced):
    trainer = _trainer(
        tool_model, tokenizer, tmp_path, loss_type="bnpo", entropy_balanced_clipping=balanced,
        entropy_advantage_coef=coef,
    )  # fmt: skip
    inputs = _batch(trainer, tokenizer)
    loss = trainer._compute_loss(trainer.model, inputs)
    got = _grads(trainer.model, loss)
    ref_loss = _reference_loss(trainer, inputs, coef, balanced)
    want = _grads(trainer.model, ref_loss)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    # the hook leaves nothing behind: the batch, the clip range and the forward are TRL's again
    assert inputs["advantages"].shape == (2,)
    assert isinstance(trainer.epsilon_high, float) and isinstance(trainer.epsilon_low, float)
    assert "_get_per_token_logps_and_entropies" not in vars(trainer)
    if balanced:  # kept-gradient share: valid tokens with δ = e^0.5 > 1.2 and Ã > 0 (row 0: A = 1, |a·z| < 1)
        mask = inputs["completion_mask"]
        shift = SHIFT[: mask.size(1)]
        expected = ((shift == 0.5) & mask[0].bool()).sum().item() / mask.sum().item()
        assert trainer._metrics["train"]["aepo/clipped_gradient_kept_share"] == [pytest.approx(expected)]
        assert 0 < expected < 1


def test_balanced_clip_changes_the_gradient_only_through_clipped_positive_tokens(tool_model, tokenizer, tmp_path):
    ppo = _trainer(tool_model, tokenizer, tmp_path, loss_type="bnpo")
    inputs = _batch(ppo, tokenizer)
    g_ppo = _grads(ppo.model, ppo._compute_loss(ppo.model, inputs))
    ppo.args.entropy_balanced_clipping = True
    g_aepo = _grads(ppo.model, ppo._compute_loss(ppo.model, inputs))
    assert not torch.allclose(g_ppo, g_aepo)  # row 0 has tokens above 1 + ε with A > 0
    inputs["advantages"] = torch.tensor([-1.0, -0.5])  # no positive advantage: nothing to keep, same gradient
    ppo.args.entropy_balanced_clipping = False
    g_ppo = _grads(ppo.model, ppo._compute_loss(ppo.model, inputs))
    ppo.args.entropy_balanced_clipping = True
    assert torch.allclose(g_ppo, _grads(ppo.model, ppo._compute_loss(ppo.model, inputs)), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_balanced_clip_runs_through_every_aggregation(tool_model, tokenizer, tmp_path, loss_type):
    trainer = _trainer(tool_model, tokenizer, tmp_path, loss_type=loss_type)
    inputs = _batch(trainer, tokenizer)
    plain = trainer._compute_loss(trainer.model, inputs)
    trainer.args.entropy_balanced_clipping = True
    balanced = trainer._compute_loss(trainer.model, inputs)
    assert balanced.item() == pytest.approx(plain.item(), rel=1e-6)  # same forward value
    assert not torch.allclose(_grads(trainer.model, plain), _grads(trainer.model, balanced))


def test_aepo_trains_end_to_end_with_its_metrics(tool_model, tokenizer, tmp_path):
    trainer = _trainer(
        tool_model, tokenizer, tmp_path, cls=AEPOTrainer, algorithm_preset="aepo", dynamic_rollouts=None,
        branch_base_probability=1.0, branch_entropy_weight=0.0,
    )  # fmt: skip
    assert trainer._name == "AEPO" and trainer.args.entropy_balanced_clipping
    trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"aepo/clipped_gradient_kept_share", "aepo/advantage_sign_flip_share"} <= logged
    assert "aepo/consecutive_branches_max" in logged
    assert trainer.state.global_step == 1 and all(math.isfinite(p.sum().item()) for p in trainer.model.parameters())


def test_aepo_trainer_upgrades_a_plain_grpo_config(tool_model, tokenizer, tmp_path):
    args = GRPOConfig(
        output_dir=str(tmp_path / "g"), per_device_train_batch_size=4, num_generations=4, max_steps=1, use_cpu=True,
        report_to="none", bf16=False,
    )  # fmt: skip
    trainer = AEPOTrainer(
        model=tool_model, reward_funcs=[closeness_reward], args=args, train_dataset=calc_dataset(8),
        processing_class=tokenizer,
    )  # fmt: skip
    assert isinstance(trainer.args, AEPOConfig) and trainer.args.entropy_advantage_coef == 0.2


@pytest.mark.parametrize("recipe", ["aepo_qwen2.5_7b_reasoning.yaml", "aepo_qwen3_14b_deepsearch.yaml"])
def test_aepo_recipes_parse_to_the_released_scripts(recipe, tmp_path, monkeypatch):
    from trl import ModelConfig, TrlParser

    from arpo_trl.train import ARPOScriptArguments

    monkeypatch.setenv("WANDB_PROJECT", "x")  # the recipes' env: block exports it
    script, config, _ = TrlParser((ARPOScriptArguments, ARPOConfig, ModelConfig)).parse_args_and_config(
        ["--config", f"recipes/{recipe}", "--output_dir", str(tmp_path), "--bf16", "false", "--use_cpu", "true"]
    )
    m, n = (12, 6) if "14b" in recipe else (16, 8)
    assert (config.num_generations, config.initial_rollouts, config.max_tool_calling_iterations) == (m, n, 6)
    assert (config.branch_base_probability, config.branch_entropy_weight, config.branch_factor) == (0.5, 0.2, 1)
    assert config.algorithm_preset == "aepo_official" and config.branch_rule == "aepo_official"
    assert config.branch_penalty_rate == 0.05 and config.entropy_balanced_clipping
    assert config.entropy_advantage_coef == 0.0 and config.dynamic_rollouts is None  # as the released runs
    assert config.rollout_preset == "official" and config.loss_type == "dapo" and config.epsilon == 0.2
    assert script.tools == ["python", "search"] and script.reward_funcs == ["arpo_f1"]
    assert "Table" in open(f"recipes/{recipe}").read() or "table" in open(f"recipes/{recipe}").read()


@pytest.mark.slow
def test_two_ranks_with_aepo_on_and_different_trees_finish(tmp_path, tool_model_state):
    """AEPO's collectives (the budget probe's rounds, the kept-gradient share, the sign-flip share, the penalty counts)
    are made by every rank, whatever its tree: rank 0 forks at every decision (up to the penalty), rank 1 never."""
    from fakes import launch_two_ranks

    # all four parts, the budget split's probe included; β_b = 0 makes m = M/2 whatever the entropies: room to fork
    overrides = {"algorithm_preset": "aepo", "aepo_budget_sensitivity": 0.0}
    reports = launch_two_ranks("ddp", tmp_path, timeout=600, overrides=overrides)
    assert [r["global_step"] for r in reports] == [2, 2]
    assert reports[0]["branches"] > 0 and reports[1]["branches"] == 0
    assert reports[0]["generate_calls"] == reports[1]["generate_calls"]
    expected = {
        "aepo/clipped_gradient_kept_share", "aepo/advantage_sign_flip_share", "aepo/consecutive_branches_max",
        "aepo/global_samples_per_prompt", "aepo/probe_sampled_tokens",
    }  # fmt: skip
    assert all(expected <= set(r["aepo_metrics"]) for r in reports)


@pytest.mark.parametrize("split", ["official", "paper"])
def test_dynamic_budget_starts_m_roots_per_prompt_from_the_probe(tool_model, tokenizer, tmp_path, monkeypatch, split):
    import arpo_trl.rollout.backends as backends
    import arpo_trl.trainer as trainer_module
    from arpo_trl.aepo import probe_entropies, segment_windows
    from arpo_trl.rollout.entropy import window_entropy

    probes = []

    class Probing(backends.RoundDriver):
        def run(self, prompt_ids, environments=None):
            trajectories, stats = super().run(prompt_ids, environments)
            if self.s.group_size == 2:  # the probe: one root per prompt and its duplicate
                probes.append(trajectories)
            return trajectories, stats

    monkeypatch.setattr(backends, "RoundDriver", Probing)
    trainer = _trainer(
        tool_model, tokenizer, tmp_path, dynamic_rollouts=split, aepo_budget_sensitivity=2.0,
        branch_base_probability=0.0, branch_entropy_weight=0.0, max_steps=1,
    )  # fmt: skip
    seen = []
    original = trainer_module.dynamic_initial_rollouts

    def spy(*args, **kwargs):
        initial, figures = original(*args, **kwargs)
        seen.append(initial)
        return initial, figures

    monkeypatch.setattr(trainer_module, "dynamic_initial_rollouts", spy)
    trainer.train()
    (initial,) = seen
    (probe,) = probes
    a, m = trainer.args, trainer.num_generations
    formula = global_samples_official if split == "official" else global_samples_paper
    expected = []
    for root in probe[::2]:
        assert root.kind == "root" and not any(e.forked_slots for e in root.branch_events)  # the probe never forks
        windows = segment_windows(
            root.tool_mask, root.token_entropies,
            lambda h: window_entropy(h, a.entropy_window, a.entropy_normalization, trainer.model.config.vocab_size),
        )  # fmt: skip
        assert windows and not math.isnan(windows[0])  # the first segment's entropy was measured
        expected.append(formula(m, *probe_entropies(windows, official=split == "official"), 2.0))
    assert initial == expected and len(initial) == 1  # one prompt per step here
    record = trainer.observed_rollout
    for g, n in enumerate(initial):
        group = [t for t in record.trajectories if t.group == g]
        assert sum(t.kind == "root" for t in group) == n  # α = β = 0: no fork, the other M − m are fresh
        assert len(group) == m
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert logged["aepo/global_samples_per_prompt"] == pytest.approx(sum(initial) / len(initial))
    assert logged["aepo/probe_sampled_tokens"] == pytest.approx(sum(sum(r.tool_mask) for r in probe[::2]))
    assert "aepo/probe_tool_calls" in logged and "aepo/probe_seconds" in logged


def test_dynamic_budget_refuses_environments(tool_model, tokenizer, tmp_path):
    class Env:
        def reset(self, **kwargs):
            return None

    with pytest.raises(ValueError, match="dynamic_rollouts"):
        ARPOTrainer(
            model=tool_model, reward_funcs=[closeness_reward], train_dataset=calc_dataset(8), processing_class=tokenizer,
            args=make_args(tmp_path, dynamic_rollouts="paper", tool_format="chat_template"), environment_factory=Env,
        )  # fmt: skip
