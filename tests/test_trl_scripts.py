"""TRL's own `trl grpo` script (``trl/scripts/grpo.py``, as the installed trl ships it) run unchanged, with
`GRPOTrainer` swapped for `ARPOTrainer` and nothing else.

The swap: before the script runs, ``trl.GRPOTrainer`` is set to `ARPOTrainer`; the script's ``from trl import
GRPOTrainer`` then gets ARPO's class. The script, its parser (`GRPOConfig`, not `ARPOConfig`), its reward registry
and its data loading are TRL's. Offline: a local dataset directory stands in for the Hub dataset and the tiny model,
saved to a directory, for the Hub model. `bench/trl_examples/run.py` runs TRL's example scripts the same way.
"""

import json
import os
import subprocess
import sys

import pytest

from arpo_trl.testing import calc_prompt

# The whole swap: TRL's module attribute, set before the script imports it.
SWAP = (
    "import runpy, trl; from arpo_trl import ARPOTrainer; trl.GRPOTrainer = ARPOTrainer; "
    "runpy.run_module('trl.scripts.grpo', run_name='__main__', alter_sys=True)"
)

RECORDING_REWARD = '''
import json


def record(completions, solution, **kwargs):
    """Writes what a reward function receives; rewards nothing."""
    with open("received.jsonl", "a") as f:
        f.write(json.dumps({"completions": completions, "solution": solution}) + "\\n")
    return [0.0] * len(completions)
'''


def test_trl_grpo_script_runs_with_the_class_swapped(tool_model, tokenizer, tmp_path):
    """`trl/scripts/grpo.py` with a conversational `prompt` dataset, TRL's rewards by name, a user reward by dotted
    path and LoRA: 2 steps, finished, each step's logged `accuracy_reward` equal to TRL's `accuracy_reward` of the
    completions the rewards received (with the dataset's own `solution` column), trained by ARPO."""
    import trl.scripts.grpo
    from trl.rewards import accuracy_reward, think_format_reward

    model_dir = tmp_path / "tiny"
    tool_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "data").mkdir()
    rows = [{"prompt": calc_prompt(a, a + 2, 1), "solution": str(2 * a + 3)} for a in range(1, 9)]
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "my_rewards.py").write_text(RECORDING_REWARD)
    argv = [
        sys.executable, "-c", SWAP,
        "--model_name_or_path", str(model_dir), "--dataset_name", "data",
        "--reward_funcs", "accuracy_reward", "think_format_reward", "my_rewards.record",
        "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
        "--max_steps", "2", "--num_generations", "4", "--per_device_train_batch_size", "8",
        "--max_completion_length", "32", "--learning_rate", "1e-3",
        "--use_cpu", "--bf16", "false", "--report_to", "none", "--logging_steps", "1",
        "--save_strategy", "steps", "--save_steps", "2", "--output_dir", "out", "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Training completed" in done.stdout and "ARPOTrainer got no tools" in done.stderr
    assert open(trl.scripts.grpo.__file__).read().count("GRPOTrainer(") == 1  # the script builds the trainer once

    received = [json.loads(line) for line in (tmp_path / "received.jsonl").read_text().splitlines()]
    assert len(received) == 2 and all(len(r["completions"]) == 8 for r in received)
    solutions = {r["solution"] for r in rows}
    assert all(set(r["solution"]) <= solutions for r in received)  # the dataset's column, unchanged
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    steps = [e for e in state["log_history"] if "rewards/accuracy_reward/mean" in e]
    assert [e["step"] for e in steps] == [1, 2]
    for entry, got in zip(steps, received):
        accuracy = accuracy_reward(got["completions"], got["solution"])
        think = think_format_reward(got["completions"])
        assert entry["rewards/accuracy_reward/mean"] == pytest.approx(sum(accuracy) / 8)
        assert entry["rewards/think_format_reward/mean"] == pytest.approx(sum(think) / 8)
        assert entry["reward"] == pytest.approx((sum(accuracy) + sum(think)) / 8)
        assert "arpo/fresh_rollouts_per_group" in entry  # ARPO's rollout ran, not GRPO's
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()  # the script's save_model, LoRA adapter
