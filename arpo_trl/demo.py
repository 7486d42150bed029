"""`make demo`: ARPO on the embedded SmolLM2-135M-Instruct with the sandboxed Python tool, offline, on CPU.

1. **Cold start** (the paper's SFT stage, in miniature): TRL's `SFTTrainer` teaches the model the tag format on
   synthetic traces of reasoning-gym arithmetic (think, ``<python>`` call, ``<result>`` (not trained on), boxed
   answer). Cached: later runs skip it.
2. **ARPO**: `ARPOTrainer` with `PythonInterpreter` and the paper's F1 reward on fresh problems; LoRA on the top
   layers keeps a step within CPU reach.

Leaves in the output directory: the final checkpoint, ``metrics.json`` / ``metrics.csv`` (every logged step) and
``summary.json``, and prints the summary. Flags: ``python -m arpo_trl.demo --help``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from .data import to_conversational  # noqa: E402
from .models import cache_dir, load_tokenizer, resolve_model_path  # noqa: E402
from .tools import format_result  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
TASK = "basic_arithmetic"
_SFT_VERSION = "demo-sft-v2"
SFT_STEPS, TOP_LAYERS, SEED = 24, 6, 0  # the cold start's defaults (flags of `main`)
# Short on purpose: on 2 CPU cores the prompt's length is most of a step's cost.
DEMO_SYSTEM_PROMPT = (
    "Think in <think></think>. Run Python with <python>code</python>; its output comes back in <result></result>. "
    "Finish with <answer>\\boxed{answer}</answer>."
)


def arithmetic(size: int, seed: int):
    """reasoning-gym arithmetic without division (so Python's printed value is the gold answer)."""
    import reasoning_gym
    from datasets import Dataset

    items = reasoning_gym.create_dataset(
        TASK, size=size, seed=seed, min_terms=2, max_terms=3, min_digits=1, max_digits=2, operators=("+", "-", "*")
    )
    return Dataset.from_list([{"question": it["question"], "answer": str(it["answer"])} for it in items])


def _expression(question: str) -> str:
    return question.removeprefix("Calculate ").rstrip(".").strip()


def _trace(question: str, answer: str, variant: int) -> list[tuple[str, bool]]:
    """(text, trained) pieces of one tag-format completion; the tool result is the environment's, not trained."""
    think = ["I will compute this with Python.", "Let me run the expression in Python.", "Compute it in Python."]
    return [
        (f"<think>{think[variant % 3]}</think>\n<python>print({_expression(question)})</python>", True),
        (format_result(answer), False),
        (f"\n<answer>The answer is \\boxed{{{answer}}}.</answer>", True),
    ]


def _lora(r: int, top_layers: int, num_layers: int):
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=list(range(num_layers - top_layers, num_layers)),
        task_type="CAUSAL_LM",
    )


def default_cold_start() -> str:
    """The cold-start model `make demo` trains with its default flags (built now if not cached)."""
    return cold_start(str(resolve_model_path(MODEL)), SFT_STEPS, SEED, TOP_LAYERS)


def cold_start(base: str, steps: int, seed: int, top_layers: int) -> str:
    """SFT the base model on tag-format traces; return the merged model's directory (cached by recipe)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    recipe = json.dumps([_SFT_VERSION, base, steps, seed, top_layers])
    out = cache_dir() / "demo" / f"sft-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (out / "config.json").exists():
        print(f"[demo] cold start: cached SFT model at {out}")
        return str(out)
    print(f"[demo] cold start: SFT for {steps} steps (cached afterwards in {out})")
    tokenizer = load_tokenizer(base)
    system = DEMO_SYSTEM_PROMPT
    rows = []
    for i, item in enumerate(arithmetic(steps * 4, seed=seed + 1000)):
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": item["question"]}]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        labels = [-100] * len(ids)
        # Tokenized piece by piece, exactly as the rollout appends them.
        for text, trained in _trace(item["question"], item["answer"], i):
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids, labels = ids + piece, labels + (piece if trained else [-100] * len(piece))
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "labels": labels})
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out) + ".run",
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        seed=seed,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=_lora(16, top_layers, model.config.num_hidden_layers),
    )
    trainer.train()
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--sft_steps", type=int, default=SFT_STEPS)
    parser.add_argument("--steps", type=int, default=6, help="ARPO optimizer steps")
    parser.add_argument("--prompts_per_step", type=int, default=2)
    parser.add_argument("--num_generations", type=int, default=4, help="M")
    parser.add_argument("--initial_rollouts", type=int, default=2, help="N")
    parser.add_argument("--max_completion_length", type=int, default=96)
    parser.add_argument("--top_layers", type=int, default=TOP_LAYERS, help="layers trained with LoRA (the top ones)")
    parser.add_argument("--seed", type=int, default=SEED)
    opts = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from . import ARPOConfig, ARPOTrainer
    from .rewards import arpo_f1_reward
    from .tools import PythonInterpreter

    start = time.monotonic()
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    base = resolve_model_path(MODEL)
    sft_path = cold_start(base, opts.sft_steps, opts.seed, opts.top_layers)
    sft_seconds = time.monotonic() - start

    tokenizer = load_tokenizer(sft_path)
    model = AutoModelForCausalLM.from_pretrained(sft_path, dtype=torch.float32)
    size = opts.steps * opts.prompts_per_step
    dataset = to_conversational(arithmetic(size, seed=opts.seed), DEMO_SYSTEM_PROMPT)
    args = ARPOConfig(
        output_dir=opts.output_dir,
        num_generations=opts.num_generations,
        initial_rollouts=opts.initial_rollouts,
        per_device_train_batch_size=opts.prompts_per_step * opts.num_generations,
        max_completion_length=opts.max_completion_length,
        max_tool_calling_iterations=2,
        max_steps=opts.steps,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        beta=0.0,
        temperature=1.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=opts.steps,
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        seed=opts.seed,
        log_completions=False,
    )
    trainer = ARPOTrainer(
        model=model,
        reward_funcs=[arpo_f1_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_lora(16, opts.top_layers, model.config.num_hidden_layers),
        tools=[PythonInterpreter(timeout=10)],
    )
    trainer.train()
    trainer.save_model(opts.output_dir)

    out = Path(opts.output_dir)
    history = [h for h in trainer.state.log_history if "reward" in h]
    (out / "metrics.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    keys = sorted({k for h in history for k in h})
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)

    def mean(key: str) -> float:
        values = [h[key] for h in history if key in h]
        return sum(values) / len(values) if values else float("nan")

    summary = {
        "model": MODEL,
        "steps": trainer.state.global_step,
        "reward_first_step": history[0]["reward"] if history else None,
        "reward_last_step": history[-1]["reward"] if history else None,
        "reward_mean": mean("reward"),
        "tool_calls_per_completion": mean("tools/calls_per_completion"),
        "tool_executions_per_completion": mean("tools/executions_per_completion"),
        "branches_per_group": mean("arpo/branches_per_group"),
        "fresh_rollouts_per_group": mean("arpo/fresh_rollouts_per_group"),
        "tool_errors_total": sum(h.get("tools/errors", 0) for h in history),
        "cold_start_seconds": round(sft_seconds, 1),
        "total_seconds": round(time.monotonic() - start, 1),
        "output_dir": str(out.resolve()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n[demo] summary")
    for key, value in summary.items():
        print(f"  {key:32s} {value:.3f}" if isinstance(value, float) else f"  {key:32s} {value}")
    return summary


if __name__ == "__main__":
    main()
