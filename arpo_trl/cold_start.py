"""`make demo`'s cold start (the paper's SFT stage, in miniature): TRL's `SFTTrainer` teaches the embedded SmolLM2 the
tag format on synthetic traces of the demo's arithmetic task (think, a ``<python>`` call, its ``<result>`` (not
trained on), a boxed answer), LoRA on the top layers, merged and cached by recipe under ``$ARPO_CACHE/demo``.
Used by the demo, the entropy analyser (``demo:cold-start``) and the benchmarks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .data import arithmetic
from .models import MODEL, cache_dir, load_tokenizer, resolve_model_path
from .prompts import DEMO_SYSTEM_PROMPT
from .tools import format_result

_SFT_VERSION = "demo-sft-v2"
SFT_STEPS, TOP_LAYERS, SEED = 24, 6, 0  # the cold start's defaults (flags of `arpo_trl.demo`)


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


def lora(r: int, top_layers: int, num_layers: int):
    """LoRA of rank `r` on every projection of the top `top_layers` of `num_layers` layers."""
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


def cold_start_dir(base: str, steps: int, seed: int, top_layers: int) -> Path:
    """Where the cold start of this recipe is cached."""
    recipe = json.dumps([_SFT_VERSION, base, steps, seed, top_layers])
    return cache_dir() / "demo" / f"sft-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def cold_start(base: str, steps: int, seed: int, top_layers: int) -> str:
    """SFT the base model on tag-format traces; return the merged model's directory (cached by recipe)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    out = cold_start_dir(base, steps, seed, top_layers)
    if (out / "config.json").exists():
        print(f"  cached SFT model at {out}")
        return str(out)
    print(f"  SFT for {steps} steps (cached afterwards in {out})")
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
        peft_config=lora(16, top_layers, model.config.num_hidden_layers),
    )
    trainer.train()
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
