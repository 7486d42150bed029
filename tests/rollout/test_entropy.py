import math

import pytest
import torch

from arpo_trl.rollout.branching import BranchPolicy, branch_probability
from arpo_trl.rollout.entropy import EntropyRecorder, token_entropy, truncated_entropy, window_entropy


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
    from arpo_trl.rollout.generation import split_segments

    recorder = EntropyRecorder(temperature=1.0, max_steps=3)
    recorder.arm()
    for _ in range(6):
        recorder(None, (), torch.zeros(2, 1, 10))
    recorded = recorder.disarm()
    assert recorded.shape == (2, 3)
    segments = split_segments(torch.tensor([[5, 6, 7, 8, 9], [5, 6, 0, 0, 0]]), recorded, [5, 5], [0], None, 0)
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
