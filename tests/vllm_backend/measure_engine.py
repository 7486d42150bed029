"""Figures of the vLLM engine layer (not a test): start, throughput, entropy overhead, entropies() latency, weights.

    HF_HUB_OFFLINE=1 python tests/vllm_backend/measure_engine.py [--model DIR] [--requests 16] [--tokens 64]

Without --model it serves the tests' tiny model (re-laid out to head size 32). Timings alternate the variants
rep by rep, so a machine shared with other work loads them alike; read them as ratios.
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))


def tiny_model_dir() -> str:
    from arpo_trl.testing import load_tokenizer, tool_sft, widen_heads

    tok = load_tokenizer()
    path = tempfile.mkdtemp(prefix="arpo-vllm-measure-")
    widen_heads(tool_sft(tok).eval()).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arpo_trl.rollout.vllm_engine import VLLMEngine

    path = args.model or tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok.encode(f"Story {i}: once upon a time, a robot number {i} said", add_special_tokens=False)
               for i in range(args.requests)]  # fmt: skip
    engine = VLLMEngine(path, temperature=1.0, max_model_len=1024, kv_cache_gib=0.5)
    print(f"engine start: {engine.start_seconds:.1f} s (block size {engine.block_size})")
    latencies: list[float] = []

    async def batch(k: int, tag: str) -> int:
        async def one(i):
            rid, n = f"{tag}-{i}", 0
            async for update in engine.stream(rid, prompts[i], args.tokens, None, entropy_tokens=k, seed=i):
                n += len(update.token_ids)
                if k:
                    t0 = time.perf_counter()
                    await engine.entropies([rid])
                    latencies.append(time.perf_counter() - t0)
            engine.forget([rid])
            return n

        return sum(await asyncio.gather(*(one(i) for i in range(args.requests))))

    engine.run(batch(0, "warm"))
    rates: dict[int, list[float]] = {0: [], 20: [], args.tokens: []}
    inside: dict[int, list[float]] = {k: [] for k in rates}  # the processor's own timer, share of wall time
    for rep in range(args.reps):
        for k in rates:
            before = engine.entropy_stats()["seconds"]
            t0 = time.perf_counter()
            n = engine.run(batch(k, f"r{rep}-k{k}"))
            wall = time.perf_counter() - t0
            rates[k].append(n / wall)
            inside[k].append((engine.entropy_stats()["seconds"] - before) / wall)
    for k, r in rates.items():
        label = "no entropy" if not k else f"entropy of the first {k} tokens"
        print(
            f"{args.requests} x {args.tokens} tokens, {label}: {statistics.median(r):.0f} tok/s (reps {[round(x) for x in r]})"
        )
    base = statistics.median(rates[0])
    for k in list(rates)[1:]:
        print(f"entropy overhead, k={k}: {100 * (base / statistics.median(rates[k]) - 1):+.1f} % wall time; by the "
              f"processor's own timer {100 * statistics.median(inside[k]):.2f} % of the wall time")  # fmt: skip
    print(f"entropies() latency while streaming: median {1e6 * statistics.median(latencies):.0f} us, "
          f"max {1e6 * max(latencies):.0f} us over {len(latencies)} calls")  # fmt: skip

    async def ping() -> float:
        t0 = time.perf_counter()
        await engine._engine.collective_rpc("arpo_ping")
        return time.perf_counter() - t0

    idle = [engine.run(ping()) for _ in range(20)]
    print(f"for comparison, one collective_rpc round trip to the worker (idle engine): median "
          f"{1e3 * statistics.median(idle):.2f} ms")  # fmt: skip

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    from vllm_helpers import teacher_forced

    for temperature in (1.0, 0.7):
        lp_gap = ent_gap = 0.0
        for i in range(4):
            rid = f"gap-{temperature}-{i}"
            ids, lps = [], []

            async def sample(rid, i, temperature, ids, lps):
                async for u in engine.stream(rid, prompts[i], 32, None, entropy_tokens=32, seed=i,
                                             temperature=temperature):  # fmt: skip
                    ids.extend(u.token_ids)
                    lps.extend(u.logprobs)
                return (await engine.entropies([rid]))[rid]

            ents = engine.run(sample(rid, i, temperature, ids, lps))
            logp, ent = teacher_forced(model, prompts[i], ids, temperature)
            expected = logp[torch.arange(len(ids)), torch.tensor(ids)]
            lp_gap = max(lp_gap, (torch.tensor(lps) - expected).abs().max().item())
            ent_gap = max(ent_gap, (torch.tensor(ents) - ent[: len(ents)]).abs().max().item())
        print(f"T={temperature}: max |vLLM - transformers| logprob {lp_gap:.1e}, entropy {ent_gap:.1e}")

    times = [engine.load_weights(model.state_dict().items()) for _ in range(3)]
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    print(f"load_weights ({size:.0f} MiB float32): {[round(t, 2) for t in times]} s")
    t0 = time.perf_counter()
    engine.shutdown()
    print(f"shutdown: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
