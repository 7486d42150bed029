"""vLLM against transformers on the same weights: greedy tokens, sampling logprobs, top-k logprobs, stops."""

import asyncio

import pytest
import torch
from vllm_helpers import LOGPROB_TOL, collect, prompt_ids, teacher_forced

from arpo_trl.tools import format_result

PROMPTS = [(3, 4, 5), (11, 2, 19), (7, 7, 7), (20, 1, 13)]


def test_greedy_tokens_and_logprobs_equal_transformers(engine, hf_model, tokenizer):
    prompts = [prompt_ids(tokenizer, *p) for p in PROMPTS]

    async def run():  # concurrently: the engine batches them
        return await asyncio.gather(
            *(collect(engine, f"greedy-{i}", p, 24, temperature=0.0) for i, p in enumerate(prompts))
        )

    results = engine.run(run())
    for prompt, res in zip(prompts, results):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :]
        assert res.ids == expected.tolist()
        logp, _ = teacher_forced(hf_model, prompt, res.ids)
        expected_lp = logp[torch.arange(len(res.ids)), torch.tensor(res.ids)]
        assert torch.allclose(torch.tensor(res.logprobs), expected_lp, atol=LOGPROB_TOL, rtol=0)
    # The tool-calling model calls the tool first: the parity covers a real tool call, not noise.
    assert all(tokenizer.decode(r.ids).startswith("<calc>") for r in results)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_and_top_k_equal_teacher_forcing(engine, hf_model, tokenizer, temperature):
    prompt = prompt_ids(tokenizer, 9, 8, 6)
    override = None if temperature == 1.0 else temperature  # 1.0: the engine's own temperature
    res = engine.run(collect(engine, f"sampled-{temperature}", prompt, 32, top_logprobs=10, seed=7,
                             temperature=override))  # fmt: skip
    logp, _ = teacher_forced(hf_model, prompt, res.ids, temperature)
    positions = torch.arange(len(res.ids))
    assert torch.allclose(torch.tensor(res.logprobs), logp[positions, torch.tensor(res.ids)], atol=LOGPROB_TOL, rtol=0)
    assert len(res.top) == len(res.ids)
    for j, (top, token) in enumerate(zip(res.top, res.ids)):
        assert token in top and abs(top[token] - res.logprobs[j]) < 1e-6
        ten = sorted(top, key=top.get, reverse=True)[:10]  # the dict also holds the sampled token when outside
        values, ids = logp[j].topk(10)
        assert set(ten) == set(ids.tolist())
        assert torch.allclose(torch.tensor([top[t] for t in ids.tolist()]), values, atol=LOGPROB_TOL, rtol=0)
        assert len(top) == (10 if token in ids.tolist() else 11)


def test_seeded_requests_are_reproducible(engine, tokenizer):
    prompt = prompt_ids(tokenizer, 5, 6, 7)
    first = engine.run(collect(engine, "seed-a", prompt, 20, seed=123))
    second = engine.run(collect(engine, "seed-b", prompt, 20, seed=123))
    assert first.ids == second.ids and first.logprobs == second.logprobs


def test_stop_string_eos_and_length(engine, hf_model, tokenizer):
    prompt = prompt_ids(tokenizer, 3, 4, 5)
    with torch.no_grad():
        greedy = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt) :]
    text = tokenizer.decode(greedy)
    assert "</calc>" in text  # the model's greedy continuation calls the tool

    stopped = engine.run(collect(engine, "stop", prompt, 40, stop=["</calc>"], temperature=0.0))
    assert stopped.finish == "stop"
    # Token ids are the truth: they include the tokens that spell the stop string, and nothing after them.
    assert tokenizer.decode(stopped.ids).endswith("</calc>")
    assert stopped.ids == greedy[: len(stopped.ids)].tolist()
    assert "</calc>" not in tokenizer.decode(stopped.ids[:-1])

    # After the tool result and the start of the answer, the model closes it and ends the turn.
    answer = tokenizer.encode("<calc>3+4+5</calc>" + format_result("12") + " The answer is \\boxed{12",
                              add_special_tokens=False)  # fmt: skip
    ended = engine.run(collect(engine, "eos", prompt + answer, 20, stop=["</calc>"], temperature=0.0))
    assert ended.finish == "eos"
    assert ended.ids[-1] == tokenizer.eos_token_id and len(ended.ids) < 20

    short = engine.run(collect(engine, "length", prompt, 3, stop=["</calc>"], temperature=0.0))
    assert short.finish == "length" and short.ids == greedy[:3].tolist()


def test_prefix_cache_serves_a_shared_prefix(engine, tokenizer):
    bs = engine.block_size
    # A prefix no other test sends (the cache is shared by the session), longer than two blocks.
    shared = tokenizer.encode("Prefix cache check. " * (3 * bs // 4), add_special_tokens=False)[: 2 * bs + bs // 2]
    first = engine.run(collect(engine, "prefix-a", shared + tokenizer.encode(" one", add_special_tokens=False), 2))
    second = engine.run(collect(engine, "prefix-b", shared + tokenizer.encode(" two", add_special_tokens=False), 2))
    full_blocks = len(shared) // bs * bs
    assert full_blocks >= 2 * bs
    assert first.cached < full_blocks
    assert second.cached >= full_blocks


def test_seeded_requests_beyond_one_steps_token_budget_all_finish_and_repeat(engine):
    """Many seeded requests at once (a throughput-bound rollout: 16 prompts × M = 8 did this) need more prefill
    tokens than one engine step takes. vLLM's CPU build cannot split a seeded request's prompt across steps (it
    rewinds the request's generator, which a CPU generator refuses, and the engine dies), so a CPU engine must
    schedule whole prompts; and what each request samples must not depend on how the batch was split."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (120,), generator=g).tolist() for _ in range(40)]  # 4,800 prompt tokens

    async def run(tag):
        return await asyncio.gather(
            *(collect(engine, f"budget-{tag}-{i}", p, 4, seed=1000 + i) for i, p in enumerate(prompts))
        )

    first = engine.run(run("a"))
    engine.reset_prefix_cache()
    alone = [engine.run(collect(engine, f"budget-alone-{i}", prompts[i], 4, seed=1000 + i)) for i in (0, 39)]
    assert len(first) == 40 and sum(len(r.ids) for r in first) > 40  # every stream finished (collect checks)
    assert [first[0].ids, first[39].ids] == [a.ids for a in alone]
