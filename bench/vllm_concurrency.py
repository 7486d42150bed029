"""What one decode step of the CPU vLLM engine costs, against the number of requests in flight.

Starts `VLLMEngine` on the demo's model (SmolLM2-135M-Instruct, float32, as `vllm_rollout.py`), then streams C
concurrent requests of at most `--tokens` tokens each (T = 1, seeded, no stop string) for each C, twice, and prints
tokens per second and decode steps per second. A fit of step time = a + c·C over the C's says whether the rollout
is latency-bound (a dominates: a request waiting costs little, the longest chain of steps sets the wall time) or
compute-bound (c·C dominates: wall time follows the tokens sampled). `vllm_rollout.py`'s results are read with it.

    python bench/vllm_concurrency.py                       # C = 1, 2, 4, 8, 16
    python bench/vllm_concurrency.py --concurrency 4,16 --tokens 96
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def _stream_all(engine, concurrency: int, tokens: int, seed: int) -> tuple[int, float, float, int]:
    """Tokens streamed, wall seconds, the mean per-request token count (EOS may end a request early), and the
    most tokens of one request (the run's decode steps)."""
    counts = [0] * concurrency

    async def one(i: int) -> None:
        prompt = [1, 100 + i, 200, 300 + 7 * i]  # distinct prompts: no prefix-cache sharing between requests
        async for update in engine.stream(f"c{concurrency}-{seed}-{i}", prompt, tokens, None, seed=seed * 1000 + i):
            counts[i] += len(update.token_ids)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(concurrency)))
    return sum(counts), time.perf_counter() - start, statistics.mean(counts), max(counts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated request counts C")
    p.add_argument("--tokens", type=int, default=64, help="max tokens per request")
    p.add_argument("--repeats", type=int, default=2)
    opts = p.parse_args()

    from arpo_trl.models import resolve_model_path
    from arpo_trl.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(resolve_model_path("embedded:smollm2-135m-instruct"), temperature=1.0, max_model_len=1024)
    try:
        engine.run(_stream_all(engine, 2, 8, seed=999))  # warm-up
        rows = []
        for c in (int(x) for x in opts.concurrency.split(",")):
            runs = [engine.run(_stream_all(engine, c, opts.tokens, seed=r)) for r in range(opts.repeats)]
            tokens = sum(r[0] for r in runs)
            seconds = sum(r[1] for r in runs)
            steps = sum(r[3] for r in runs)  # one decode step per token of the longest request
            rows.append((c, tokens / seconds, steps / seconds, seconds / steps, statistics.mean(r[2] for r in runs)))
        print(
            f"| C (requests in flight) | tokens/s | decode steps/s | s per step | tokens per request (max {opts.tokens}) |"
        )
        print("|---|---|---|---|---|")
        for c, tps, sps, sec, mean in rows:
            print(f"| {c} | {tps:.0f} | {sps:.1f} | {sec * 1000:.0f} ms | {mean:.1f} |")
        if len(rows) >= 2:  # least squares: s per step = a + b·C
            xs, ys = [r[0] for r in rows], [r[3] for r in rows]
            mx, my = statistics.mean(xs), statistics.mean(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            a = my - b * mx
            print(f"\nstep time ≈ {a * 1000:.0f} ms + {b * 1000:.1f} ms × C")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
