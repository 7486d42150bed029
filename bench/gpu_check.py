"""The shared-prefix training forward on CUDA: parity with TRL's per-row forward (float32 and bf16) and the time and
peak memory of forward + backward for an ARPO-like batch, packed against per-row. Run by bench/gpu_check.sh on a
GPU machine (no Hub access needed: the model is a randomly initialised Llama of the size asked).

    python bench/gpu_check.py [--hidden 1024 --layers 16 --prompt 1000 --completion 1500 --rows 16]

Prints one JSON line per measurement and a summary table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from arpo_trl.shared_prefix import pack_rows, shared_prefix_logps


def arpo_batch(vocab: int, prompt: int, completion: int, rows: int, seed: int = 0):
    """One group: a shared prompt, rows // 2 roots, a fork of each root sharing its first 60 % (TRL's padding)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, vocab, (prompt,), generator=g).tolist()
    roots = [torch.randint(0, vocab, (completion,), generator=g).tolist() for _ in range(rows // 2)]
    cut = int(completion * 0.6)
    forks = [r[:cut] + torch.randint(0, vocab, (completion - cut,), generator=g).tolist() for r in roots]
    comps = roots + forks
    ids = torch.tensor([p + c for c in comps])
    mask = torch.ones_like(ids)
    return ids, mask, completion


def per_row(model, ids, mask, keep):
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-keep] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    return out.log_probs[:, -keep:], out.entropy[:, -keep:]


def measure(fn, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    lp, h = fn()
    (lp.sum() + h.sum()).backward()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**30, lp.detach(), h.detach()


def check(dtype: torch.dtype, args: argparse.Namespace, device: torch.device) -> dict:
    """Parity and cost of the packed forward against the per-row one, for one dtype."""
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128,
        max_position_embeddings=8192,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    ids, mask, keep = arpo_batch(config.vocab_size, args.prompt, args.completion, args.rows)
    ids, mask = ids.to(device), mask.to(device)
    packs = pack_rows(ids, mask, keep, args.max_tokens)

    def packed():
        no_autocast = lambda: torch.autocast("cuda", enabled=False)  # noqa: E731
        return shared_prefix_logps(model, packs, ids.shape[0], keep, True, "sdpa", dtype, no_autocast)

    runs = {}
    for name, fn in (("per_row", lambda: per_row(model, ids, mask, keep)), ("packed", packed)):
        measure(fn, device)  # warm-up
        model.zero_grad(set_to_none=True)
        runs[name] = measure(fn, device)
        model.zero_grad(set_to_none=True)
    (a_s, a_peak, a_lp, a_h), (b_s, b_peak, b_lp, b_h) = runs["per_row"], runs["packed"]
    return {
        "dtype": str(dtype),
        "padded_tokens": ids.numel(),
        "packed_tokens": sum(p.num_tokens for p in packs),
        "packs": len(packs),
        "per_row_s": a_s,
        "packed_s": b_s,
        "per_row_peak_gib": a_peak,
        "packed_peak_gib": b_peak,
        "max_abs_logp_diff": (a_lp.float() - b_lp.float()).abs().max().item(),
        "max_abs_entropy_diff": (a_h.float() - b_h.float()).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=1000)
    parser.add_argument("--completion", type=int, default=1500)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16384)
    args = parser.parse_args()
    device = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        print(json.dumps(check(dtype, args, device)), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
