"""Token and window entropies and the LM-head recorder (`arpo_trl/rollout/entropy.py`): Eq. 3 and its
normalisations, the hook against a teacher-forced recompute (exact and the official top-k estimate), each model
family's own logit transform."""

import math

import pytest
import torch

from arpo_trl.rollout.entropy import (
    EntropyRecorder,
    output_logit_transform,
    token_entropy,
    truncated_entropy,
    truncated_token_entropy,
    window_entropy,
)


def test_window_entropy_normalisations():
    ent = [1.0, 2.0, 3.0, 4.0]
    assert window_entropy(ent, 3, "sum_lnV", 100) == pytest.approx(6.0 / math.log(100))
    assert window_entropy(ent, 3, "mean", 100) == pytest.approx(2.0)
    assert window_entropy(ent, 10, "sum_V", 100) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        window_entropy([], 3, "mean", 100)


def test_token_entropy_extremes():
    v = 50
    assert token_entropy(torch.zeros(v)).item() == pytest.approx(math.log(v), rel=1e-5)
    peaked = torch.full((v,), -1e4)
    peaked[3] = 0
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-5)


def test_entropy_hook_matches_a_teacher_forced_recompute(tokenizer):
    """The hook's per-step entropies equal the entropies recomputed from the logits of a full forward."""
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3).eval()
    recorder = EntropyRecorder(temperature=0.7)
    model.get_output_embeddings().register_forward_hook(recorder)
    prompt = torch.tensor([tokenizer.encode("Add 3, 4 and 5.")])
    torch.manual_seed(0)
    recorder.arm()
    out = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.7, pad_token_id=0, eos_token_id=None)
    hooked = recorder.disarm()[0]
    assert hooked.shape == (12,)
    with torch.no_grad():
        logits = model(out).logits[0, prompt.shape[1] - 1 : -1]
    direct = token_entropy(logits, 0.7)
    torch.testing.assert_close(hooked, direct, atol=1e-4, rtol=1e-4)
    # Disarmed, the hook records nothing during ordinary forwards.
    with torch.no_grad():
        model(out)
    assert recorder.disarm() is None


def official_estimate(logits: torch.Tensor, sampled: int, temperature: float) -> float:
    """The official truncated entropy written out: the 10 most likely tokens and the sampled one, at T."""
    logprobs = torch.log_softmax(logits.double() / temperature, dim=-1)
    candidates = {int(t): float(logprobs[t]) for t in logprobs.topk(10).indices}
    candidates[sampled] = float(logprobs[sampled])
    return truncated_entropy(candidates)


@pytest.mark.parametrize("max_steps", [None, 5])
def test_top_k_hook_matches_the_official_estimate_on_a_teacher_forced_recompute(tokenizer, max_steps):
    """estimator="top_k": each step's value is the top-10 + sampled-token entropy of that step's distribution,
    with the token that step really sampled (not the previous or next one), for the rows armed only."""
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3).eval()
    recorder = EntropyRecorder(temperature=0.7, max_steps=max_steps, estimator="top_k")
    handles = recorder.attach(model)
    prompt = torch.tensor([tokenizer.encode("Add 3, 4 and 5.")] * 2)
    torch.manual_seed(0)
    recorder.arm([1])
    out = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.7, pad_token_id=0, eos_token_id=None)
    new_ids = out[:, prompt.shape[1] :]
    hooked = recorder.disarm(new_ids)
    steps = 12 if max_steps is None else max_steps
    assert hooked.shape == (2, steps) and torch.isnan(hooked[0]).all()
    with torch.no_grad():
        logits = model(out).logits[1, prompt.shape[1] - 1 : -1]
    want = [official_estimate(logits[i], int(new_ids[1, i]), 0.7) for i in range(steps)]
    assert hooked[1].tolist() == pytest.approx(want, abs=1e-4)
    # The truncated estimate is not the exact entropy (the test would not tell them apart otherwise).
    assert max(abs(a - b) for a, b in zip(want, token_entropy(logits[:steps], 0.7).tolist())) > 1e-3
    for handle in handles:
        handle.remove()


def test_top_k_generator_segments_carry_the_official_estimate(tokenizer):
    """Through the transformers backend (`TransformersGenerator`, rows cut at their own ends), each segment's
    entropies are the official estimate of the tokens it kept."""
    from arpo_trl.rollout.generation import TransformersGenerator
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=3).eval()
    generator = TransformersGenerator.for_model(model, tokenizer, None, temperature=1.0, entropy_estimator="top_k")
    prompts = [tokenizer.encode("Add 3, 4 and 5."), tokenizer.encode("Add 1 and 2, then 7.")]
    torch.manual_seed(1)
    segments = generator(prompts, [9, 6])
    generator.close()
    assert [len(s.ids) for s in segments] == [9, 6]
    for prompt, segment in zip(prompts, segments):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + segment.ids])).logits[0, len(prompt) - 1 : -1]
        want = [official_estimate(logits[i], segment.ids[i], 1.0) for i in range(len(segment.ids))]
        assert segment.entropies == pytest.approx(want, abs=1e-4)
    assert not any(h._forward_pre_hooks for h in [model.get_input_embeddings()])  # close removed both hooks


def test_recorder_refuses_an_unknown_estimator():
    with pytest.raises(ValueError, match="entropy estimator must be 'exact' or 'top_k', got 'top_10'"):
        EntropyRecorder(1.0, estimator="top_10")


def test_recorder_stops_after_k_steps_and_segments_stay_aligned():
    """ARPO reads only a segment's first k entropies: the recorder stops there, later tokens are NaN-padded."""
    from arpo_trl.rollout.generation import output_segments

    recorder = EntropyRecorder(temperature=1.0, max_steps=3)
    recorder.arm()
    for _ in range(6):
        recorder(None, (), torch.zeros(2, 1, 10))
    recorded = recorder.disarm()
    assert recorded.shape == (2, 3)
    segments = output_segments(torch.tensor([[5, 6, 7, 8, 9], [5, 6, 0, 0, 0]]), recorded, [5, 5], [0], None, 0)
    assert [len(s.ids) for s in segments] == [5, 3] and [len(s.entropies) for s in segments] == [5, 3]
    assert segments[0].entropies[:3] == pytest.approx([math.log(10)] * 3) and math.isnan(segments[0].entropies[4])
    assert segments[1].finish == "eos"


def test_token_entropy_equals_the_definition_on_random_logits():
    logits = torch.randn(4, 7, 300) * 4
    for temperature in (1.0, 0.6):
        p = torch.softmax(logits / temperature, dim=-1)
        direct = -(p * torch.log(p)).sum(-1)
        torch.testing.assert_close(token_entropy(logits, temperature), direct, atol=1e-4, rtol=1e-4)


def test_token_entropy_ignores_masked_logits():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    assert token_entropy(logits).item() == pytest.approx(math.log(2), rel=1e-6)


def test_recorder_armed_on_some_rows_computes_only_theirs():
    logits = torch.randn(3, 1, 40)
    recorder = EntropyRecorder(temperature=1.0)
    recorder.arm([0, 2])
    recorder(None, (), logits)
    recorder(None, (), logits * 2)
    recorded = recorder.disarm()
    assert recorded.shape == (3, 2)
    assert torch.isnan(recorded[1]).all()
    torch.testing.assert_close(recorded[[0, 2], 0], token_entropy(logits[[0, 2], -1]))
    torch.testing.assert_close(recorded[[0, 2], 1], token_entropy(2 * logits[[0, 2], -1]))


@pytest.mark.parametrize("family", ["granite", "gemma2", "cohere"])
def test_hook_applies_the_models_own_logit_scaling_and_softcapping(family):
    """Granite divides its logits, Cohere multiplies them, Gemma 2 soft-caps them, all after the LM head: the hook
    must measure the distribution the model actually defines (the logits `generate` returns)."""
    import transformers

    from arpo_trl.rollout.entropy import output_logit_transform

    common = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    config, cls = {
        "granite": (lambda: transformers.GraniteConfig(**common, logits_scaling=8.0), "GraniteForCausalLM"),
        "gemma2": (lambda: transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=3.0), "Gemma2ForCausalLM"),
        "cohere": (lambda: transformers.CohereConfig(**common, logit_scale=0.25), "CohereForCausalLM"),
    }[family]  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config()).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)  # large raw logits, so the transform matters
    scale, softcap = output_logit_transform(model.config)
    assert (scale, softcap) != (1.0, None)
    recorder = EntropyRecorder(0.8, logit_scale=scale, softcap=softcap)
    model.get_output_embeddings().register_forward_hook(recorder)
    recorder.arm()
    out = model.generate(
        torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, do_sample=True, temperature=0.8, top_k=0, pad_token_id=0,
        eos_token_id=None, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    hooked = recorder.disarm()[0]
    expected = token_entropy(torch.stack(out.logits, 1)[0], 0.8)
    torch.testing.assert_close(hooked, expected, atol=1e-4, rtol=1e-4)


# -------------------------- tests written for mutants that survived `make mutate` (tests/README.md, "Mutation testing")


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
