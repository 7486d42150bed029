"""`python -m arpo_trl.train --config recipe.yaml` with CLI overrides, LoRA flags, wandb offline and the model card."""

import json
import time
from pathlib import Path

import pytest
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
    assert trainer.observed_rollout.stats.branches == 2 * 2  # Z = 2 copies fill M − N = 2 slots at the first decision
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


# -- what `trl grpo` accepts ----------------------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _calc_rows(numbers, split: str) -> list[dict]:
    from arpo_trl.testing import calc_prompt

    return [{"prompt": calc_prompt(a, b, c), "solution": str(a + b + c), "split": split} for a, b, c in numbers]


def test_prompt_datasets_are_used_as_they_are(tmp_path):
    """TRL's layout: a `prompt` column, standard or conversational, every column kept under its own name."""
    from arpo_trl.train import ARPOScriptArguments, build_dataset

    rows = _calc_rows([(1, 2, 3), (4, 5, 6)], "train")
    conversational = _jsonl(tmp_path / "conv.jsonl", rows)
    ds = build_dataset(ARPOScriptArguments(dataset_name=str(conversational)))
    assert ds.column_names == ["prompt", "solution", "split"]  # no `answer` made up, `solution` not renamed
    assert ds["prompt"] == [r["prompt"] for r in rows] and ds["solution"] == ["6", "15"]

    # a system prompt asked for replaces the data's own system message
    ds = build_dataset(ARPOScriptArguments(dataset_name=str(conversational), system_prompt="Be brief."))
    assert ds[1]["prompt"] == [{"role": "system", "content": "Be brief."}, rows[1]["prompt"][1]]

    standard = _jsonl(tmp_path / "text.jsonl", [{"prompt": "1+1=", "solution": "2"}])
    ds = build_dataset(ARPOScriptArguments(dataset_name=str(standard)))
    assert ds[0] == {"prompt": "1+1=", "solution": "2"}
    with pytest.raises(ValueError, match="system_prompt cannot be added to a standard"):
        build_dataset(ARPOScriptArguments(dataset_name=str(standard), system_prompt="Be brief."))

    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": [{"x": 1}]}])
    with pytest.raises(ValueError, match="row 1: 'prompt' must be text or a list of"):
        build_dataset(ARPOScriptArguments(dataset_name=str(mixed)))


def test_question_rows_keep_their_answer_column(tmp_path):
    """question/answer rows: a differently named answer column stays (TRL's rewards read it) and is copied to
    `answer` (ARPO's rewards read that); the question column stays too."""
    from arpo_trl.train import ARPOScriptArguments, build_dataset

    data = _jsonl(tmp_path / "qa.jsonl", [{"question": "Add 1, 2 and 3.", "solution": 6}])
    ds = build_dataset(ARPOScriptArguments(dataset_name=str(data), answer_column="solution", system_prompt="S"))
    assert ds[0] == {
        "question": "Add 1, 2 and 3.",
        "solution": 6,
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Add 1, 2 and 3."}],
        "answer": "6",
    }
    both = _jsonl(tmp_path / "both.jsonl", [{"question": "q", "solution": "1", "answer": "2"}])
    with pytest.raises(ValueError, match="also has an 'answer' column"):
        build_dataset(ARPOScriptArguments(dataset_name=str(both), answer_column="solution"))


def test_eval_rows_come_from_a_file_a_split_or_held_out_rows(tmp_path):
    from arpo_trl import ARPOConfig
    from arpo_trl.train import ARPOScriptArguments, build_datasets

    train = _calc_rows([(1, 1, 1), (2, 2, 2), (3, 3, 3)], "train")
    test = _calc_rows([(9, 9, 9)], "test")
    _jsonl(tmp_path / "calc" / "train.jsonl", train)
    _jsonl(tmp_path / "calc" / "test.jsonl", test)
    valid = _jsonl(tmp_path / "valid.jsonl", _calc_rows([(5, 5, 5), (6, 6, 6)], "valid"))
    no_eval = ARPOConfig(str(tmp_path / "o"), use_cpu=True)
    evaluating = ARPOConfig(str(tmp_path / "o"), use_cpu=True, eval_strategy="steps", eval_steps=1)

    # as trl grpo: dataset_test_split of dataset_name, only when evaluating
    ds, ev = build_datasets(ARPOScriptArguments(dataset_name=str(tmp_path / "calc")), evaluating)
    assert ds["solution"] == ["3", "6", "9"] and ev["solution"] == ["27"] and ev["split"] == ["test"]
    assert build_datasets(ARPOScriptArguments(dataset_name=str(tmp_path / "calc")), no_eval)[1] is None
    args = ARPOScriptArguments(dataset_name=str(tmp_path / "calc"), dataset_test_split="train")
    assert build_datasets(args, evaluating)[1]["solution"] == ["3", "6", "9"]

    # a separate eval file (e.g. the official valid.parquet), all its rows
    args = ARPOScriptArguments(dataset_name=str(tmp_path / "calc"), eval_dataset_name=str(valid))
    assert build_datasets(args, evaluating)[1]["solution"] == ["15", "18"]

    # held-out rows
    ds, ev = build_datasets(ARPOScriptArguments(dataset_name=str(tmp_path / "calc"), eval_size=1), no_eval)
    assert len(ds) == 2 and len(ev) == 1 and set(ds["solution"]) | set(ev["solution"]) == {"3", "6", "9"}

    # contradictions and impossible choices fail before anything is loaded
    with pytest.raises(ValueError, match=r"eval_dataset_name \(.*valid.jsonl\) and eval_size \(1\) both"):
        build_datasets(ARPOScriptArguments(dataset_name=str(valid), eval_dataset_name=str(valid), eval_size=1), no_eval)
    with pytest.raises(ValueError, match="eval_strategy=steps needs eval rows, and .*valid.jsonl has no 'test' split"):
        build_datasets(ARPOScriptArguments(dataset_name=str(valid)), evaluating)


def test_rewards_by_trl_name_and_by_dotted_path_from_the_current_directory(tmp_path, monkeypatch):
    import sys

    import trl.rewards

    from arpo_trl.rewards import get_reward_function

    assert get_reward_function("accuracy_reward") is trl.rewards.accuracy_reward
    assert get_reward_function("think_format_reward") is trl.rewards.think_format_reward
    assert get_reward_function("reasoning_accuracy_reward") is trl.rewards.reasoning_accuracy_reward
    # trl grpo's parameters: no penalty up to 1280 - 256 tokens, then linear to -1 at 1280, -1 beyond
    overlong = get_reward_function("get_soft_overlong_punishment")
    ids = [[0] * n for n in (1024, 1152, 1280, 1281)]
    assert overlong(completion_ids=ids) == [0.0, -0.5, -1.0, -1.0]

    (tmp_path / "my_rewards.py").write_text(
        "def length(completions, **kwargs):\n    return [len(c) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert get_reward_function("my_rewards.length")(["ab", "c"]) == [2, 1]
    with pytest.raises(ValueError, match="cannot load reward 'my_rewards.nope'"):
        get_reward_function("my_rewards.nope")


RECORDING_REWARD = '''
import json


def record(completions, solution, split, **kwargs):
    """Writes what a reward function receives; rewards nothing."""
    with open("received.jsonl", "a") as f:
        f.write(json.dumps({"completions": completions, "solution": solution, "split": split}) + "\\n")
    return [0.0] * len(completions)
'''


def test_the_console_script_trains_on_a_trl_prompt_dataset_with_trl_rewards_and_evaluates_its_test_split(
    tool_model, tokenizer, tmp_path
):
    """`arpo-train` as `trl grpo` is used: a `prompt` dataset directory with train and test splits and a `solution`
    column, TRL's `accuracy_reward` by name, the user's own reward by a dotted path into the current directory,
    evaluation on the test split. The rewards logged are TRL's `accuracy_reward` of what the reward functions
    received, and they received the dataset's columns unchanged."""
    import os
    import subprocess
    import sys

    from trl.rewards import accuracy_reward

    model_dir = tmp_path / "tiny"
    tool_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train = _calc_rows([(a, a + 1, 3) for a in range(1, 9)], "train")
    test = _calc_rows([(a, 2 * a, 1) for a in range(1, 5)], "test")
    _jsonl(tmp_path / "calc" / "train.jsonl", train)
    _jsonl(tmp_path / "calc" / "test.jsonl", test)
    (tmp_path / "my_rewards.py").write_text(RECORDING_REWARD)
    script = Path(sys.executable).parent / "arpo-train"
    argv = [
        str(script),
        "--model_name_or_path", str(model_dir),
        "--dataset_name", "calc",
        "--tools", "arpo_trl.testing.calc",
        "--reward_funcs", "accuracy_reward", "my_rewards.record",
        "--eval_strategy", "steps", "--eval_steps", "1", "--per_device_eval_batch_size", "16",
        "--max_steps", "1", "--num_generations", "4", "--per_device_train_batch_size", "8",
        "--max_completion_length", "48", "--max_tool_calling_iterations", "2",
        "--use_cpu", "--bf16", "false", "--report_to", "none", "--logging_steps", "1",
        "--save_strategy", "steps", "--save_steps", "1", "--output_dir", "out", "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ""}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    received = [json.loads(line) for line in (tmp_path / "received.jsonl").read_text().splitlines()]
    assert [r["split"][0] for r in received] == ["train", "test"]  # one training step, then the evaluation
    by_split = {r["split"][0]: r for r in received}
    # the columns came through unchanged: each completion's `solution` is its own row's, 4 completions per row
    assert set(by_split["train"]["solution"]) <= {r["solution"] for r in train}
    assert sorted(by_split["test"]["solution"]) == sorted(r["solution"] for r in test for _ in range(4))
    assert len(by_split["train"]["completions"]) == 8 and set(by_split["train"]["split"]) == {"train"}

    state = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())
    logged = {k: v for entry in state["log_history"] for k, v in entry.items()}
    for split, prefix in (("train", ""), ("test", "eval_")):
        expected = accuracy_reward(by_split[split]["completions"], by_split[split]["solution"])
        assert logged[f"{prefix}rewards/accuracy_reward/mean"] == pytest.approx(sum(expected) / len(expected))
        assert logged[f"{prefix}rewards/record/mean"] == 0.0
    assert "arpo/branches_per_group" in logged  # trained by ARPO's tree rollout
