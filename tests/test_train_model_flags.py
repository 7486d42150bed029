"""`arpo-train` honours TRL's ModelConfig flags as TRL's own scripts/grpo.py does: each reaches the model."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from trl import ModelConfig, TrlParser

from arpo_trl import ARPOConfig
from arpo_trl import train as train_module
from arpo_trl.testing import CALC_SYSTEM_PROMPT
from arpo_trl.train import ARPOScriptArguments, build_trainer


@pytest.fixture
def model_dir(tool_model, tokenizer, tmp_path):
    path = tmp_path / "tiny"
    tool_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (tmp_path / "qa.jsonl").write_text('{"question": "Add 1, 2 and 3.", "answer": "6"}\n' * 4)
    return path


def parse(model_dir, *flags):
    argv = [
        "--model_name_or_path", str(model_dir),
        "--dataset_name", str(model_dir.parent / "qa.jsonl"),
        "--system_prompt", CALC_SYSTEM_PROMPT,
        "--tools", "arpo_trl.testing.calc",
        "--reward_funcs", "arpo_trl.testing.closeness_reward",
        "--output_dir", str(model_dir.parent / "out"),
        "--num_generations", "4", "--initial_rollouts", "2", "--per_device_train_batch_size", "4",
        "--max_completion_length", "16", "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
        *flags,
    ]  # fmt: skip
    return TrlParser((ARPOScriptArguments, ARPOConfig, ModelConfig)).parse_args_and_config(argv)


def test_revision_remote_code_attention_and_dtype_reach_from_pretrained(model_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    seen = {}
    original = LlamaForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        seen.update(kwargs, path=path)
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", classmethod(spy))
    script, config, model_args = parse(
        model_dir,
        "--model_revision", "v1.0", "--trust_remote_code", "true",
        "--attn_implementation", "eager", "--dtype", "bfloat16",
    )  # fmt: skip
    trainer = build_trainer(script, config, model_args)
    assert seen["path"] == str(model_dir)
    assert (seen["revision"], seen["trust_remote_code"], seen["attn_implementation"]) == ("v1.0", True, "eager")
    assert seen["dtype"] == torch.bfloat16  # TRL turns the string into the torch dtype
    model = trainer.model
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


def test_defaults_and_recipe_model_init_kwargs_win(model_dir):
    script, config, model_args = parse(model_dir, "--attn_implementation", "sdpa")
    trainer = build_trainer(script, config, model_args)
    assert trainer.model.config._attn_implementation == "sdpa" and trainer.model.dtype == torch.float32
    config.model_init_kwargs = {"attn_implementation": "eager"}
    assert train_module.model_init_kwargs(model_args, config)["attn_implementation"] == "eager"


def test_quantization_flags_build_the_bitsandbytes_config_and_pass_it(model_dir, monkeypatch):
    from transformers import BitsAndBytesConfig

    captured = {}
    monkeypatch.setattr(train_module, "ARPOTrainer", lambda **kwargs: captured.update(kwargs))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    script, config, model_args = parse(
        model_dir,
        "--load_in_4bit", "--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant", "--dtype", "bfloat16",
        "--use_peft", "--lora_target_modules", "q_proj",
    )  # fmt: skip
    build_trainer(script, config, model_args)
    quant = captured["quantization_config"]
    assert isinstance(quant, BitsAndBytesConfig) and quant.load_in_4bit and not quant.load_in_8bit
    assert (quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == ("fp4", True)
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert captured["model"] == str(model_dir) and captured["args"].model_init_kwargs["dtype"] == "bfloat16"

    script, config, model_args = parse(model_dir, "--load_in_8bit", "--use_peft")
    build_trainer(script, config, model_args)
    assert captured["quantization_config"].load_in_8bit

    script, config, model_args = parse(model_dir, "--load_in_8bit")
    with pytest.raises(ValueError, match="--load_in_8bit .* only works with LoRA: add --use_peft"):
        build_trainer(script, config, model_args)


def test_quantization_without_bitsandbytes_fails_clearly(model_dir):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    script, config, model_args = parse(model_dir, "--load_in_4bit", "--use_peft")
    with pytest.raises(ImportError, match="--load_in_4bit quantizes with bitsandbytes, which is not installed"):
        build_trainer(script, config, model_args)
