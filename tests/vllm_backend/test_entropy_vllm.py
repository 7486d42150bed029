"""The worker-side entropy processor against a teacher-forced recompute by transformers."""

import asyncio

import pytest
import torch
from vllm_helpers import ENTROPY_TOL, prompt_ids, teacher_forced


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropies_are_exact_for_the_first_k_tokens_of_opted_in_requests(engine, hf_model, tokenizer, temperature):
    # Requests of different lengths in one batch, some arriving while others decode, so the engine's persistent
    # batch removes, moves and reorders rows while others still record; two requests do not opt in.
    specs = [  # (request, prompt, max_tokens, entropy_tokens, start delay in s)
        ("a", (1, 2, 3), 3, 0, 0.0),  # ends first: the last row moves into its place
        ("b", (4, 5, 6), 5, 2, 0.0),
        ("c", (7, 8, 9), 30, 20, 0.0),
        ("d", (10, 11, 12), 30, 25, 0.0),  # the last row at first, moved while its window is open
        ("e", (13, 14, 15), 25, 1, 0.2),
        ("f", (16, 17, 18), 18, 0, 0.2),
        ("g", (19, 20, 1), 20, 12, 0.4),
    ]
    override = None if temperature == 1.0 else temperature
    seen_during_stream: dict[str, list[tuple[int, int]]] = {}

    async def one(name, prompt, max_tokens, k, delay):
        await asyncio.sleep(delay)
        rid = f"ent-{temperature}-{name}"
        ids = []
        async for update in engine.stream(rid, prompt, max_tokens, None, entropy_tokens=k, seed=len(name) + 3,
                                          temperature=override):  # fmt: skip
            ids += update.token_ids
            if k and not update.finished:  # mid-stream: one entropy per delivered token, up to k
                got = (await engine.entropies([rid]))[rid]
                seen_during_stream.setdefault(name, []).append((len(ids), len(got)))
        return rid, ids

    async def run():
        return await asyncio.gather(*(one(n, prompt_ids(tokenizer, *p), m, k, d) for n, p, m, k, d in specs))

    results = engine.run(run())
    truncated = 0  # opted-in requests that sampled more than their window
    for (name, p, max_tokens, k, _), (rid, ids) in zip(specs, results):
        assert 0 < len(ids) <= max_tokens
        truncated += 0 < k < len(ids)
        if not k:
            with pytest.raises(KeyError):
                engine.run(engine.entropies([rid]))
            continue
        got = engine.run(engine.entropies([rid]))[rid]
        assert len(got) == min(k, len(ids))
        _, expected = teacher_forced(hf_model, prompt_ids(tokenizer, *p), ids, temperature)
        assert torch.allclose(torch.tensor(got), expected[: len(got)], atol=ENTROPY_TOL, rtol=0)
        for delivered, available in seen_during_stream.get(name, []):
            assert available == min(k, delivered)
        with pytest.raises(KeyError):  # a finished request's entries were released by the read
            engine.run(engine.entropies([rid]))
    assert truncated >= 2


def test_entropy_depends_on_temperature_and_forget_releases(engine, tokenizer):
    prompt = prompt_ids(tokenizer, 2, 9, 4)

    async def run(temperature, rid):
        ids = [t async for u in engine.stream(rid, prompt, 8, None, entropy_tokens=8, temperature=temperature,
                                              seed=1) for t in u.token_ids]  # fmt: skip
        return ids, (await engine.entropies([rid]))[rid]

    greedy_ids, at_one = engine.run(run(0.0, "temp-greedy"))  # greedy: the model's own distribution (T = 1)
    ids, hot = engine.run(run(2.0, "temp-hot"))
    assert len(at_one) == len(hot) == 8
    assert hot[0] > at_one[0] + 0.1  # same first distribution, flatter at T = 2

    async def aborted():
        async for _ in engine.stream("forget-me", prompt, 50, None, entropy_tokens=5):
            break  # closing the stream aborts the request
        engine.forget(["forget-me"])
        return await engine.entropies(["forget-me"])

    with pytest.raises(KeyError):
        engine.run(aborted())
