"""The cold-start SFT stage: the recipes parse to the official schedule, and a tiny run on ShareGPT traces trains
on the assistant turns only."""

from __future__ import annotations

import json

import pytest
from trl import ModelConfig, SFTConfig, TrlParser

from arpo_trl.sft import SFTScriptArguments, build_sft_trainer, main

TEMPLATE = "recipes/chat_templates/qwen_chatml_training.jinja"


@pytest.mark.parametrize(
    "recipe, model",
    [
        ("cold_start_sft.yaml", "Qwen/Qwen2.5-7B-Instruct"),
        ("cold_start_sft_qwen3_8b.yaml", "Qwen/Qwen3-8B"),
        ("cold_start_sft_qwen3_14b.yaml", "Qwen/Qwen3-14B"),
    ],
)
def test_cold_start_recipes_follow_the_official_schedule(recipe, model, tmp_path):
    script, config, model_args = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(
        ["--config", f"recipes/{recipe}", "--output_dir", str(tmp_path), "--bf16", "false", "--use_cpu", "true"]
    )
    assert model_args.model_name_or_path == model and script.dataset_name == "data/final_5w4_still.jsonl"
    assert script.dataset_size is None  # all the traces
    assert config.assistant_only_loss and config.chat_template_path == TEMPLATE
    assert (config.learning_rate, config.num_train_epochs, config.lr_scheduler_type) == (7e-6, 3, "cosine")
    assert config.warmup_steps == 0.1 and config.max_length == 15000  # warm-up ratio 0.1, cutoff_len


def test_tiny_cold_start_on_sharegpt_trains_on_assistant_turns_only(tool_model, tokenizer, tmp_path):
    model_dir = tmp_path / "tiny"
    tool_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    answer = "<think>add</think><calc>1+2</calc><result>\n3\n</result><answer>\\boxed{3}</answer>"
    rows = [
        {
            "conversations": [{"from": "human", "value": f"Add 1 and {i}."}, {"from": "gpt", "value": answer}],
            "system": "S",
        }
        for i in range(4)
    ]
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
        "--assistant_only_loss", "true", "--chat_template_path", TEMPLATE, "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
        "--save_strategy", "no", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1",
    ]  # fmt: skip
    script, config, model_args = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config(argv)
    trainer = build_sft_trainer(script, config, model_args)
    row = trainer.train_dataset[0]
    trained = [t for t in row["labels"] if t != -100]
    assert tokenizer.decode(trained) == answer + "<|im_end|>"  # the system and user turns are not trained on
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nAdd 1")
    trained = main(argv)
    assert trained.state.global_step == 1 and (tmp_path / "out" / "model.safetensors").exists()
