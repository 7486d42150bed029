"""Weights pushed into the running engine: new outputs equal transformers with the new weights, and back."""

import asyncio
import copy

import torch
from vllm_helpers import LOGPROB_TOL, collect, prompt_ids, teacher_forced

PROMPTS = [(3, 4, 5), (11, 2, 19), (7, 7, 7)]


def _greedy(engine, tokenizer, tag):
    prompts = [prompt_ids(tokenizer, *p) for p in PROMPTS]

    async def run():
        return await asyncio.gather(
            *(collect(engine, f"{tag}-{i}", p, 16, temperature=0.0) for i, p in enumerate(prompts))
        )

    return prompts, engine.run(run())


def test_load_weights_changes_outputs_exactly_and_restores(engine, hf_model, tokenizer):
    prompts, before = _greedy(engine, tokenizer, "w-before")
    perturbed = copy.deepcopy(hf_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn_like(param) * 0.3 * param.std())
    try:
        # named_parameters(), as a trainer iterates them, has no lm_head.weight when it is tied to the embedding:
        # the engine must still refresh the head (on CPU it keeps a packed copy of that weight).
        names = [name for name, _ in perturbed.named_parameters()]
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
        seconds = engine.load_weights((n, p.detach()) for n, p in perturbed.named_parameters())
        assert seconds > 0
        _, after = _greedy(engine, tokenizer, "w-after")
        assert any(a.ids != b.ids for a, b in zip(after, before))
        for prompt, res in zip(prompts, after):
            logp, _ = teacher_forced(perturbed, prompt, res.ids)
            expected = logp[torch.arange(len(res.ids)), torch.tensor(res.ids)]
            assert torch.allclose(torch.tensor(res.logprobs), expected, atol=LOGPROB_TOL, rtol=0)
            assert res.ids == logp.argmax(-1).tolist()  # greedy under the new weights, token by token
    finally:
        engine.load_weights(hf_model.state_dict().items())  # the state dict names the tied head too
    _, restored = _greedy(engine, tokenizer, "w-restored")
    for a, b in zip(restored, before):
        assert a.ids == b.ids and a.logprobs == b.logprobs
