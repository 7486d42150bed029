"""The pieces `make demo` is built from (the demo itself is run by `make demo`, not here: it takes minutes)."""

import json

import pytest

from arpo_trl.demo import DEMO_SYSTEM_PROMPT, _expression, _trace, arithmetic
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
