"""The pieces `make demo` is built from (the demo itself is run by `make demo`, not here: it takes minutes)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from arpo_trl.cold_start import _expression, _trace
from arpo_trl.data import arithmetic
from arpo_trl.prompts import DEMO_SYSTEM_PROMPT
from arpo_trl.rewards import arpo_f1_reward
from arpo_trl.tools import PythonInterpreter, format_result


def test_cold_start_traces_are_correct_tool_use_with_the_papers_format():
    items = arithmetic(20, seed=5)
    python = PythonInterpreter(timeout=10)
    for i, item in enumerate(items.select(range(3))):
        pieces = _trace(item["question"], item["answer"], i)
        # the code the trace shows really prints the gold answer, in the sandbox
        assert python(f"print({_expression(item['question'])})").strip() == item["answer"]
        assert pieces[1] == (format_result(item["answer"]), False)  # the tool result is not trained on
        text = "".join(p for p, _ in pieces)
        assert arpo_f1_reward([text], [item["answer"]]) == [1.0]  # a perfect trace earns the paper's full reward
    assert all("/" not in _expression(q) for q in items["question"])  # no division: Python prints the gold text


def test_embedded_model_resolves_offline_to_a_real_smollm2(tokenizer):
    from transformers import AutoConfig

    from arpo_trl.models import load_tokenizer, resolve_model_path

    path = resolve_model_path("embedded:smollm2-135m-instruct")
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    embedded = load_tokenizer(path)
    text = f"{DEMO_SYSTEM_PROMPT} <python>print(2**10)</python>"
    assert embedded.encode(text) == tokenizer.encode(text)  # the test fixtures use this very tokenizer
    assert resolve_model_path("some/hub-id") == "some/hub-id"
    with pytest.raises(ValueError, match="unknown embedded model"):
        resolve_model_path("embedded:nope")


def test_demo_recipe_parses(tmp_path):
    from trl import ModelConfig, TrlParser

    from arpo_trl import ARPOConfig
    from arpo_trl.train import ARPOScriptArguments

    script, config, model = TrlParser((ARPOScriptArguments, ARPOConfig, ModelConfig)).parse_args_and_config(
        ["--config", "recipes/demo.yaml", "--output_dir", str(tmp_path)]
    )
    assert (config.num_generations, config.initial_rollouts, script.tools, model.use_peft) == (4, 2, ["python"], True)
    assert json.dumps(script.reward_funcs) == '["arpo_f1"]'


@pytest.mark.parametrize(
    "recipe", ["arpo_qwen2.5_7b_reasoning.yaml", "arpo_qwen3_8b_deepsearch.yaml", "arpo_qwen3_14b_deepsearch.yaml"]
)
def test_paper_recipes_parse_and_validate(recipe, tmp_path, monkeypatch):
    from trl import ModelConfig, TrlParser

    from arpo_trl import ARPOConfig
    from arpo_trl.train import ARPOScriptArguments

    monkeypatch.setenv("WANDB_PROJECT", "x")  # the recipes' env: block exports it
    script, config, _ = TrlParser((ARPOScriptArguments, ARPOConfig, ModelConfig)).parse_args_and_config(
        ["--config", f"recipes/{recipe}", "--output_dir", str(tmp_path), "--bf16", "false", "--use_cpu", "true"]
    )
    m, n = (12, 6) if "14b" in recipe else (16, 8)
    assert (config.num_generations, config.initial_rollouts, config.learning_rate, config.beta) == (m, n, 1e-6, 0.0)
    assert config.lr_scheduler_type == "constant" and config.epsilon == 0.2 and config.delta == 3.0
    assert script.tools == ["python", "search"] and script.reward_funcs == ["arpo_f1"]
    # the official data (all rows), prompt and tool settings; search replays the released cache
    assert script.dataset_name.endswith(".parquet") and script.dataset_size is None
    assert script.system_prompt == "official" and script.search_cache.endswith("search_cache.json")
    assert (script.python_timeout, script.python_max_output_chars) == (120, None)
    assert "rollout_preset: official" in open(f"recipes/{recipe}").read()  # the documented official-mode switch
    # one process here; the recipes are sized for 8: the generation batch per process holds whole groups either way
    assert (config.per_device_train_batch_size * config.steps_per_generation) % m == 0


def test_logged_only_rewards_read_format_and_answers():
    from arpo_trl.demo import answer_correct, format_ok

    good = "<think>t</think>\n<python>print(3+4)</python><result>\n7\n</result>\n<answer>\\boxed{7}.</answer>"
    wrong = good.replace("\\boxed{7}", "\\boxed{8}")
    broken = good.replace("</think>", "")
    assert format_ok([good, wrong, broken]) == [1.0, 1.0, 0.0]
    assert answer_correct([good, wrong, broken], ["7", "7", "7"]) == [1.0, 0.0, 1.0]  # correctness ignores format
    assert answer_correct([[{"role": "assistant", "content": good}]], ["7"]) == [1.0]  # conversational completions


def _history(rewards):
    """A log_history as TRL writes it: one entry per step, plus the final train summary without a reward."""
    entries = [
        {"step": i + 1, "reward": r, "tools/calls_per_completion": 1.0 + 0.1 * i,
         "tools/executions_per_completion": 0.8, "arpo/branches_per_group": 0.5 * (i % 3),
         "arpo/fresh_rollouts_per_group": 1.0, "rewards/format_ok/mean": 0.5 + 0.05 * i,
         "rewards/answer_correct/mean": 0.25}
        for i, r in enumerate(rewards)
    ]  # fmt: skip
    return entries + [{"step": len(rewards), "train_runtime": 12.0}]


def test_learning_curve_numbers():
    from arpo_trl.viz.learning_curve import quarter_means, running_mean, step_series

    history = _history([-1.0, -0.5, 0.0, 0.5, 1.0, 1.0, 0.5, 1.0])
    steps, values = step_series(history, "reward")
    assert steps == list(range(1, 9)) and values[0] == -1.0  # the train summary entry is not a step
    assert quarter_means(values) == (-0.75, 0.75)  # two steps per quarter
    assert quarter_means([0.2, 0.4, 0.9]) == (0.2, 0.9)  # fewer than four steps: one step each
    assert quarter_means([float(i) for i in range(12)]) == (1.0, 10.0)  # three steps per quarter
    assert running_mean([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    assert step_series([{"step": 1, "reward": float("nan")}], "reward") == ([], [])


def test_learning_curve_png_draws_every_panel(tmp_path):
    """A real image: PNG, the size asked, and each panel's series painted in its colour."""
    from PIL import Image

    from arpo_trl.viz.learning_curve import plot_learning_curve

    path = plot_learning_curve(_history([-1.0, -0.5, 0.0, 0.5, 1.0, 1.0, 0.5, 1.0]), tmp_path / "c" / "curve.png",
                               title="t", format_key="rewards/format_ok/mean",
                               correct_key="rewards/answer_correct/mean")  # fmt: skip
    with Image.open(path) as image:
        image.verify()
    image = Image.open(path).convert("RGB")
    assert image.size == (1650, 484)  # 15 × 4.4 inches at 110 dpi
    pixels = list(image.getdata())
    width = image.size[0]

    def painted(hex_colour, columns, tol=40):
        r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
        lo, hi = columns
        return sum(
            1
            for i, p in enumerate(pixels)
            if lo <= (i % width) / width < hi and abs(p[0] - r) <= tol and abs(p[1] - g) <= tol and abs(p[2] - b) <= tol
        )

    assert painted("#1f77b4", (0.0, 0.34)) > 300  # reward, left panel
    assert painted("#2ca02c", (0.0, 0.34)) > 50  # valid-format share on it
    assert painted("#9467bd", (0.34, 0.67)) > 200  # tool calls per completion, middle panel
    assert painted("#ff7f0e", (0.67, 1.0)) > 200  # branches per group, right panel
    with pytest.raises(ValueError, match="no training step"):
        plot_learning_curve([{"step": 1, "train_runtime": 1.0}], tmp_path / "none.png")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_miniature_demo_writes_every_picture_and_they_render(tmp_path, monkeypatch, capsys):
    """`arpo_trl.demo` end to end at toy size (transformers backend; the model conversion is reused): every file
    the summary names exists, the PNGs decode, the first and last rollout-tree pages load in a real browser with
    the batch's rows drawn, and the summary's numbers are the logged ones."""
    from PIL import Image

    from arpo_trl import demo
    from arpo_trl.models import resolve_model_path

    cache = tmp_path / "cache"
    cache.mkdir()
    # Converted once per run, here if no earlier test did (the run's caches start empty); the SFT is not.
    (cache / "models").symlink_to(Path(resolve_model_path("embedded:smollm2-135m-instruct")).parent)
    monkeypatch.setenv("ARPO_CACHE", str(cache))
    out = tmp_path / "demo"
    summary = demo.main(["--output_dir", str(out), "--sft_steps", "2", "--steps", "2", "--prompts_per_step", "1",
                         "--num_generations", "2", "--initial_rollouts", "1", "--max_completion_length", "48",
                         "--entropy_prompts", "2", "--backend", "transformers"])  # fmt: skip
    printed = capsys.readouterr().out
    for stage in ("[demo 1/5] model", "[demo 2/5] cold start", "[demo 3/5] ARPO", "[demo 4/5] pictures"):
        assert stage in printed
    assert "step   2/2" in printed  # one progress line per step
    files = summary["files"]
    for key in ("learning_curve", "rollout_tree_first_step", "rollout_tree_last_step", "entropy_png"):
        assert files[key] in printed  # the final screen says what to open
    for key in ("learning_curve", "entropy_png"):
        with Image.open(files[key]) as image:
            image.verify()
        with Image.open(files[key]) as image:
            assert image.format == "PNG" and image.size[0] > 1000
            assert len(set(image.convert("RGB").getdata())) > 50  # drawn, not blank
    assert files["rollout_tree_first_step"].endswith("step-000000.html")
    assert files["rollout_tree_last_step"].endswith("step-000001.html")
    for page in (files["rollout_tree_first_step"], files["rollout_tree_last_step"]):
        base = [CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run([*base, "--dump-dom", Path(page).as_uri()], capture_output=True, text=True,
                             timeout=90, check=True).stdout  # fmt: skip
        assert dom.count('class="leaf"') == 2 and dom.count('class="node"') >= 2  # M = 2 rows, each ≥ 1 segment
    history = [h for h in json.loads((out / "metrics.json").read_text()) if "reward" in h]
    assert summary["steps"] == 2 and len(history) == 2
    assert summary["reward_first_quarter"] == pytest.approx(history[0]["reward"])
    assert summary["reward_last_quarter"] == pytest.approx(history[1]["reward"])
    assert summary["correct_last_quarter"] == pytest.approx(history[1]["rewards/answer_correct/mean"])
    entropy = json.loads((out / "entropy" / "entropy.json").read_text())
    assert len(entropy["trajectories"]) == 4 and entropy["summary"] == summary["entropy"]
