"""`python -m arpo_trl.train --config recipe.yaml` with CLI overrides, LoRA flags, wandb offline and the model card."""

import json
import time
from pathlib import Path

import yaml

from arpo_trl.testing import CALC_SYSTEM_PROMPT


def test_yaml_recipe_with_overrides_trains_logs_to_wandb_and_writes_the_card(
    tool_model, tokenizer, tmp_path, monkeypatch
):
    from peft import PeftModel

    from arpo_trl import ARPOTrainer
    from arpo_trl.train import main

    model_dir = tmp_path / "tiny"
    tool_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "calc.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"Add {a}, {a + 1} and 3.", "answer": str(2 * a + 4)}) + "\n" for a in range(1, 9)
        )
    )
    recipe = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(data),
        "system_prompt": CALC_SYSTEM_PROMPT,
        "tools": ["arpo_trl.testing.calc"],
        "reward_funcs": ["arpo_trl.testing.closeness_reward"],
        "output_dir": str(tmp_path / "out"),
        "num_generations": 4,
        "initial_rollouts": 2,
        "per_device_train_batch_size": 8,
        "max_completion_length": 64,
        "max_tool_calling_iterations": 3,
        "branch_base_probability": 1.0,
        "branch_entropy_weight": 0.0,
        "max_steps": 5,
        "learning_rate": 1.0e-3,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "wandb",
        "env": {"WANDB_PROJECT": "arpo-test"},
    }
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.teardown()  # wandb caches its settings (WANDB_DIR) per process: start from this test's environment

    trainer = main(
        [
            "--config",
            str(config),
            "--max_steps",
            "1",
            "--branch_factor",
            "2",
            "--use_peft",
            "--lora_r",
            "4",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
        ]
    )
    wandb.finish()
    wandb.teardown()

    assert isinstance(trainer, ARPOTrainer) and isinstance(trainer.model, PeftModel)
    assert trainer.state.global_step == 1  # the CLI won over the YAML's 5
    assert trainer.args.branch_factor == 2 and trainer.args.initial_rollouts == 2
    assert trainer.last_rollout.stats.branches == 2 * 2  # Z = 2 copies fill M − N = 2 slots at the first decision
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()

    # wandb (offline) recorded ARPO's and the tools' metrics
    keys = [
        b"arpo/branches_per_group",
        b"arpo/fresh_rollouts_per_group",
        b"tools/calls_per_completion",
        b"tools/executions_per_completion",
        b"tools/errors",
    ]

    def run_file_has_all_keys() -> bool:
        blobs = [p.read_bytes() for p in Path(tmp_path, "wandb").glob("offline-run-*/run-*.wandb")]
        return any(all(k in blob for k in keys) for blob in blobs)

    # wandb's service writes the offline run file asynchronously, even after finish(): wait for it (bounded)
    deadline = time.monotonic() + 60
    while not run_file_has_all_keys() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run_file_has_all_keys(), sorted(str(p) for p in Path(tmp_path).rglob("*.wandb"))

    # the card push_to_hub would upload: ARPO in its tags, the key settings, the citation
    trainer.create_model_card(dataset_name="calc")
    card = (tmp_path / "out" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert "arpo" in header["tags"] and "trl" in header["tags"]
    assert "Agentic Reinforced Policy Optimization" in card and "2507.19849" in card
    assert "| M (`num_generations`) | 4 |" in card and "| N (`initial_rollouts`) | 2 |" in card
    assert "| Z (`branch_factor`) | 2 |" in card and "| tools | `calc` |" in card
