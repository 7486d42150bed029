"""The shared-prefix training forward (`arpo_trl/shared_prefix.py`) against TRL's per-row forward.

The reference is always TRL's own path: `GRPOTrainer._get_per_token_logps_and_entropies` (every row padded and run
on its own through the fused LM head), on the same batch. Compared: every completion log-probability and entropy,
the loss of every `loss_type` and every parameter's gradient, with old and reference log-probabilities, hard
attribution and `top_entropy_quantile`; on the tiny tool model with forced branching and on the demo's SmolLM2.
"""

import logging

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from arpo_trl import ARPOTrainer
from arpo_trl.shared_prefix import pack_rows, shared_prefix_logps, shuffle_groups, unsupported_reason
from arpo_trl.testing import build_tiny_model, calc, calc_dataset, closeness_reward

PAD = 0


def padded(prompts, completions):
    """TRL's layout: prompts left-padded, completions right-padded, one attention mask."""
    p_width = max(map(len, prompts))
    c_width = max(map(len, completions))
    ids, mask = [], []
    for p, c in zip(prompts, completions):
        ids.append([PAD] * (p_width - len(p)) + p + c + [PAD] * (c_width - len(c)))
        mask.append([0] * (p_width - len(p)) + [1] * (len(p) + len(c)) + [0] * (c_width - len(c)))
    return torch.tensor(ids), torch.tensor(mask), c_width


def tree_batch(vocab, seed=0):
    """Two groups of M = 4 rows: group 0 has 2 roots and a fork of each at a shared prefix, group 1 (another prompt,
    of another length) 4 roots, one a prefix of another; the two prompts share their first 3 tokens."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    head = toks(3)
    p0, p1 = head + toks(9), head + toks(5)
    r0, r1 = toks(14), toks(10)
    completions = [r0, r1, r0[:6] + toks(7), r1[:4] + toks(9)]
    s0 = toks(12)
    completions += [s0, s0[:5], toks(3), toks(8)]
    prompts = [p0] * 4 + [p1] * 4
    return prompts, completions


def per_row_reference(model, ids, mask, keep):
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-keep] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    return out.log_probs[:, -keep:], out.entropy[:, -keep:]


def packed(model, ids, mask, keep, max_tokens=4096):
    packs = pack_rows(ids, mask, keep, max_tokens)
    impl = model.config._attn_implementation
    return shared_prefix_logps(model, packs, ids.shape[0], keep, True, impl, torch.float32, _no_autocast), packs


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_packing_lays_out_each_distinct_prediction_once():
    prompts = [[7, 8, 9]] * 3 + [[7, 8]]
    completions = [[1, 2, 3], [1, 2, 4], [5], [9, 1]]
    ids, mask, keep = padded(prompts, completions)
    (pack,) = pack_rows(ids, mask, keep, 100)
    # One entry per edge of the forest: 7→8, 8→9, 9→1, 1→2, 2→3, then 2→4 (a second continuation of row 0's
    # prefix [7, 8, 9, 1, 2]: a second entry for token 2) and 9→5. Row 3 ([7, 8] + [9, 1]) lies on row 0's path.
    assert pack.input_ids[0].tolist() == [7, 8, 9, 1, 2, 2, 9]
    assert pack.position_ids[0].tolist() == [0, 1, 2, 3, 4, 4, 2]
    # Labels only where some row scores the next token (its completion): 9→1, 1→2, 2→3, 2→4, 9→5; row 3 scores
    # 9→1 too (its completion is [9, 1]) and 8→9.
    assert pack.labels[0].tolist() == [-100, 9, 1, 2, 3, 4, 5]
    # Entry 5 (2 → 4, row 1) sees its own chain only: not its sibling copy 4 (2 → 3, row 0).
    assert pack.ancestors[5].nonzero().flatten().tolist() == [0, 1, 2, 3, 5]
    assert pack.ancestors[6].nonzero().flatten().tolist() == [0, 1, 6]
    scored = sorted(zip(pack.rows.tolist(), pack.columns.tolist(), pack.entries.tolist()))
    assert scored == [(0, 0, 2), (0, 1, 3), (0, 2, 4), (1, 0, 2), (1, 1, 3), (1, 2, 5), (2, 0, 6), (3, 0, 1), (3, 1, 2)]


def test_budget_splits_packs_and_holes_refuse():
    prompts, completions = tree_batch(500)
    ids, mask, keep = padded(prompts, completions)
    one = pack_rows(ids, mask, keep, 10_000)
    assert len(one) == 1
    several = pack_rows(ids, mask, keep, 40)
    assert len(several) > 1 and all(p.num_tokens <= 40 for p in several)
    assert sum(p.num_tokens for p in several) > one[0].num_tokens  # prefixes repeated across packs
    holed = mask.clone()
    holed[0, -keep + 2] = 0
    holed[0, -keep + 4] = 1
    assert pack_rows(ids, holed, keep, 10_000) is None


@pytest.fixture(scope="module")
def fused_tiny(tokenizer):
    model = build_tiny_model(tokenizer, seed=3)
    model.config._attn_implementation = "sdpa"
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    return model


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_log_probabilities_entropies_and_gradients_equal_the_per_row_forward(fused_tiny, implementation):
    model = fused_tiny
    model.config._attn_implementation = implementation
    try:
        prompts, completions = tree_batch(model.config.vocab_size)
        ids, mask, keep = padded(prompts, completions)
        ref_lp, ref_h = per_row_reference(model, ids, mask, keep)
        (lp, h), packs = packed(model, ids, mask, keep)
    finally:
        model.config._attn_implementation = "sdpa"
    scored = mask[:, -keep:].bool()
    assert (lp - ref_lp).abs().max() < 1e-5
    assert (h - ref_h).abs().max() < 1e-5
    assert lp[~scored].abs().max() == 0 and ref_lp[~scored].abs().max() == 0  # unscored: 0 in both
    # Fewer tokens than the padded rows (8 × 35 here), and fewer than the rows' real tokens.
    assert packs[0].num_tokens < int(mask.sum()) < ids.numel()
    # Gradients: any weighting of log-probabilities and entropies.
    w = torch.randn(lp.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad((ref_lp * w).sum() + (ref_h * w.flip(0)).sum(), params)
    g = torch.autograd.grad((lp * w).sum() + (h * w.flip(0)).sum(), params)
    for a, b in zip(g_ref, g):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item())


def test_a_leaked_sibling_or_a_shifted_gather_is_caught(fused_tiny):
    """The parity check above fails when the layout is broken on purpose (so it would catch such a bug)."""
    model = fused_tiny
    prompts, completions = tree_batch(model.config.vocab_size)
    ids, mask, keep = padded(prompts, completions)
    ref_lp, _ = per_row_reference(model, ids, mask, keep)
    packs = pack_rows(ids, mask, keep, 4096)
    leaked = packs[0].ancestors.clone()
    leaked[-1, :] = True  # the last entry also sees every other branch
    packs[0].ancestors = leaked
    lp, _ = shared_prefix_logps(model, packs, ids.shape[0], keep, False, "sdpa", torch.float32, _no_autocast)
    assert (lp - ref_lp).abs().max() > 1e-3
    packs = pack_rows(ids, mask, keep, 4096)
    packs[0].entries = packs[0].entries.roll(1)  # each score read one entry off
    lp, _ = shared_prefix_logps(model, packs, ids.shape[0], keep, False, "sdpa", torch.float32, _no_autocast)
    assert (lp - ref_lp).abs().max() > 1e-3


def test_models_that_cannot_take_the_layout_are_named(tokenizer):
    model = build_tiny_model(tokenizer)
    config = model.config
    assert unsupported_reason(config) is None
    config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in unsupported_reason(config)
    config._attn_implementation = "sdpa"
    config.sliding_window, config.use_sliding_window = 16, True
    assert "sliding-window" in unsupported_reason(config, max_depth=40)
    assert unsupported_reason(config, max_depth=16) is None  # rows within the window: nothing slides


def test_group_shuffle_moves_whole_groups_in_order_and_draws_as_trl():
    torch.manual_seed(0)
    trls = torch.randperm(12).tolist()
    after = torch.rand(1)
    torch.manual_seed(0)
    batch = {"ids": torch.arange(12)[:, None].repeat(1, 2), "names": [f"r{i}" for i in range(12)], "n": None}
    out = shuffle_groups(batch, group_size=4)
    assert torch.rand(1) == after  # the same RNG stream as TRL's shuffle: what is sampled next is GRPO's
    rows = out["ids"][:, 0].tolist()
    firsts = list(dict.fromkeys(r // 4 for r in trls))  # groups in the order TRL's draw first reaches them
    assert [rows[i] // 4 for i in (0, 4, 8)] == firsts
    assert sorted(rows) == list(range(12)) and rows != list(range(12))
    for start in range(0, 12, 4):
        block = rows[start : start + 4]
        assert block[0] % 4 == 0 and block == list(range(block[0], block[0] + 4))
    assert out["names"] == [f"r{i}" for i in rows] and out["n"] is None


# ---------------------------------------------------------------- through the real trainer


def trainer_for(tool_model, tokenizer, tmp_path, arpo_config, **overrides):
    # The small run with shorter completions, fewer calls and one step, and gradient checkpointing on (TRL's default,
    # which these tests always ran with). Forks at every tool result: shared prefixes inside the completions.
    settings = dict(max_completion_length=48, max_tool_calling_iterations=2, max_steps=1, gradient_checkpointing=True)
    settings.update(overrides)
    model = tool_model
    if settings.get("beta"):  # TRL loads the reference model from the model's path
        tool_model.save_pretrained(tmp_path / "model")
        model = str(tmp_path / "model")
    return ARPOTrainer(
        model=model,
        reward_funcs=closeness_reward,
        args=arpo_config(**settings),
        train_dataset=calc_dataset(8),
        processing_class=tokenizer,
        tools=[calc],
    )


def loss_and_grads(trainer, inputs, shared):
    trainer.args.shared_prefix_forward = shared
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by TRL's loop
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(
    "overrides",
    [
        dict(loss_type="dapo"),
        dict(loss_type="grpo", advantage_attribution="hard"),
        dict(loss_type="bnpo", beta=0.1),  # reference log-probabilities (a copy of the model)
        dict(loss_type="dr_grpo", num_iterations=2),  # old log-probabilities
        dict(loss_type="cispo", top_entropy_quantile=0.5),
        dict(loss_type="sapo"),
        dict(loss_type="luspo", importance_sampling_level="sequence"),
        dict(loss_type="vespo", steps_per_generation=2, per_device_train_batch_size=4),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_loss_and_every_gradient_equal_trls_per_row_forward(tool_model, tokenizer, tmp_path, arpo_config, overrides):
    trainer = trainer_for(tool_model, tokenizer, tmp_path, arpo_config, **overrides)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._prepare_inputs(batch)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    keep = inputs["completion_ids"].shape[1]
    # The rollout branched: some rows share completion tokens beyond the prompt.
    assert trainer._metrics["train"]["arpo/branches_per_group"][-1] > 0
    loss_ref, g_ref = loss_and_grads(trainer, inputs, shared=False)
    loss, g = loss_and_grads(trainer, inputs, shared=True)
    assert torch.isfinite(loss_ref) and abs(loss.item() - loss_ref.item()) <= 1e-5 * max(1.0, abs(loss_ref.item()))
    assert g.keys() == g_ref.keys() and len(g) > 0
    for name in g_ref:
        scale = max(1.0, g_ref[name].abs().max().item())
        assert (g[name] - g_ref[name]).abs().max().item() <= 1e-4 * scale, name
    ratio = trainer._metrics["train"]["arpo/forward_token_ratio"][-1]
    assert 0 < ratio < 0.8
    # Old and reference log-probabilities come through the same forward: equal to the per-row ones.
    for model in [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else []):
        with torch.no_grad():
            trainer.args.shared_prefix_forward = False
            ref, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep)
            trainer.args.shared_prefix_forward = True
            mine, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep)
        assert (mine - ref).abs().max() < 1e-4
    if overrides.get("num_iterations", 1) > 1:
        assert inputs["old_per_token_logps"] is not None
        assert (inputs["old_per_token_logps"] - ref)[mask[:, -keep:].bool()].abs().max() < 1e-4


def test_micro_batches_hold_whole_groups(tool_model, tokenizer, tmp_path, arpo_config):
    trainer = trainer_for(
        tool_model, tokenizer, tmp_path, arpo_config, steps_per_generation=2, per_device_train_batch_size=4
    )
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer._prepare_inputs(batch)
    for micro in trainer._buffered_inputs:  # 2 micro-batches of 4 rows: each is one group, one prompt
        prompts = micro["prompt_ids"].tolist()
        assert all(p == prompts[0] for p in prompts)


def test_training_logs_the_forward_token_ratio_and_a_layout_the_model_gets_wrong_falls_back(
    tool_model, tokenizer, tmp_path, arpo_config, caplog, monkeypatch
):
    trainer = trainer_for(tool_model, tokenizer, tmp_path, arpo_config)
    with caplog.at_level(logging.INFO, logger="arpo_trl.shared_prefix"):
        trainer.train()
    assert any("checked against the per-row forward" in r.message for r in caplog.records)
    logged = [h for h in trainer.state.log_history if "arpo/forward_token_ratio" in h]
    assert logged and 0 < logged[0]["arpo/forward_token_ratio"] < 0.8
    # A packed layout that gives other numbers (here: every entry sees every other): the first call's check
    # against the per-row forward refuses it, and the per-row numbers are used from then on.
    import arpo_trl.shared_prefix as module

    monkeypatch.setattr(module, "attention_mask_for", lambda ancestors, *_: torch.ones_like(ancestors)[None, None])
    trainer.shared_prefix.checked.clear()
    trainer._step, trainer._buffered_inputs = 0, None
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    with caplog.at_level(logging.INFO, logger="arpo_trl.shared_prefix"):
        loss = trainer.compute_loss(trainer.model, inputs)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert id(model) in trainer.shared_prefix.refused
    assert any("per-row forward is used" in r.message for r in caplog.records)
    trainer.args.shared_prefix_forward = False
    assert loss.item() == pytest.approx(trainer.compute_loss(trainer.model, inputs).item(), abs=1e-6)


def test_on_the_demo_smollm2(tokenizer):
    """The demo's SmolLM2-135M (converted from the embedded GGUF), float32 sdpa: a 62-token prompt, 4 roots, 4
    forks — log-probabilities within 1e-4 of the per-row forward; and bf16 autocast's bound, measured."""
    from transformers import AutoModelForCausalLM

    from arpo_trl.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path("embedded:smollm2-135m-instruct"), dtype=torch.float32, attn_implementation="sdpa"
    )
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (62,), generator=g).tolist()
    roots = [torch.randint(0, vocab, (40,), generator=g).tolist() for _ in range(4)]
    forks = [r[:25] + torch.randint(0, vocab, (15,), generator=g).tolist() for r in roots]
    ids, mask, keep = padded([prompt] * 8, roots + forks)
    with torch.no_grad():
        ref_lp, ref_h = per_row_reference(model, ids, mask, keep)
        (lp, h), packs = packed(model, ids, mask, keep)
    assert (lp - ref_lp).abs().max() < 1e-4 and (h - ref_h).abs().max() < 1e-4
    assert packs[0].num_tokens == 62 - 1 + 4 * 40 + 4 * 15  # 0.42× the 8 × 102 padded tokens
