"""Helpers of the vLLM tests: the tiny model's head-size re-layout, prompts, streams and teacher forcing."""

import math

import torch

from arpo_trl.rollout.entropy import token_entropy
from arpo_trl.testing import calc_prompt

# |vLLM − transformers| on logprobs and entropies, float32 on both sides. Measured on this model (32 tokens × 4
# requests, T = 1 and 0.7, tests/vllm/measure_engine.py): at most 9e-6 for logprobs and 7e-6 for entropies; the
# bounds leave room for other CPUs' kernels (the issue asks ≤ 1e-3 for entropies).
LOGPROB_TOL = 1e-4
ENTROPY_TOL = 1e-4


def widen_heads(model, head_dim: int = 32):
    """The same Llama with attention heads of size `head_dim`: each head's q/k dimensions are placed where the
    wider rotary embedding has the same frequencies (dimension i of a rotary half goes to 2i when doubling), the
    others are zero, q is scaled by √(head_dim / old) to keep the softmax scale, and v/o follow the same layout."""
    from transformers import LlamaForCausalLM

    cfg = model.config
    old = cfg.head_dim
    step = head_dim // old
    assert head_dim == step * old
    wide = LlamaForCausalLM(cfg.__class__.from_dict({**cfg.to_dict(), "head_dim": head_dim})).eval()
    half_old, half_new = old // 2, head_dim // 2
    index = torch.tensor([step * i for i in range(half_old)] + [half_new + step * i for i in range(half_old)])
    state = {name: t.clone() for name, t in model.state_dict().items()}
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        for proj, heads, scale in (
            ("q_proj", cfg.num_attention_heads, math.sqrt(head_dim / old)),
            ("k_proj", cfg.num_key_value_heads, 1.0),
            ("v_proj", cfg.num_key_value_heads, 1.0),
        ):
            weight = state[prefix + proj + ".weight"].view(heads, old, -1)
            placed = torch.zeros(heads, head_dim, weight.shape[-1])
            placed[:, index] = weight * scale
            state[prefix + proj + ".weight"] = placed.reshape(heads * head_dim, -1)
        weight = state[prefix + "o_proj.weight"].view(-1, cfg.num_attention_heads, old)
        placed = torch.zeros(weight.shape[0], cfg.num_attention_heads, head_dim)
        placed[:, :, index] = weight
        state[prefix + "o_proj.weight"] = placed.reshape(weight.shape[0], -1)
    wide.load_state_dict(state)
    wide.generation_config = model.generation_config
    return wide


def prompt_ids(tokenizer, a: int, b: int, c: int) -> list[int]:
    return tokenizer.apply_chat_template(calc_prompt(a, b, c), add_generation_prompt=True, tokenize=True,
                                         return_dict=False)  # fmt: skip


class Result:
    """A finished stream, merged, and the entropies read right after it."""

    def __init__(self, updates, entropies):
        self.updates = updates
        self.ids = [t for u in updates for t in u.token_ids]
        self.logprobs = [x for u in updates for x in u.logprobs]
        self.top = [x for u in updates for x in u.top_logprobs]
        self.finish = updates[-1].finish_reason
        self.cached = updates[-1].num_cached_tokens
        self.entropies = entropies


async def collect(engine, request_id: str, prompt: list[int], max_tokens: int, stop=None, read_entropies=True,
                  **kwargs) -> Result:  # fmt: skip
    updates = [u async for u in engine.stream(request_id, prompt, max_tokens, stop, **kwargs)]
    assert updates[-1].finished and not any(u.finished for u in updates[:-1])
    entropies = (
        (await engine.entropies([request_id]))[request_id] if read_entropies and kwargs.get("entropy_tokens") else None
    )
    return Result(updates, entropies)


def teacher_forced(model, prompt: list[int], ids: list[int], temperature: float = 1.0):
    """(log_softmax, entropy) at `temperature` of the distributions `ids` were sampled from, by transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    scaled = logits.float() / temperature
    return torch.log_softmax(scaled, dim=-1), token_entropy(logits, temperature)
