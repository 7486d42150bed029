"""The vLLM backend's plumbing that needs no engine: the event-loop thread both engines run on, the trainer's weights
as the colocated engine loads them (LoRA merged, HF names, the exported directory), and the server engine's command
line and chunk parsing. `tests/vllm_backend/` runs them against real engines and a real server; here each rule is checked on
its own, fast enough for `make mutate`."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# ---------------------------------------------------------------------------------------------- loop_thread.py


def test_the_loop_thread_serves_other_threads_refuses_its_own_and_closes_after_stop():
    import asyncio
    import gc
    import threading
    import warnings

    from arpo_trl.rollout.loop_thread import LoopThread

    loop = LoopThread("arpo-test-loop", "TestEngine")
    assert (loop.thread.name, loop.thread.daemon) == ("arpo-test-loop", True)

    async def where(value):
        await asyncio.sleep(0)
        return value, threading.current_thread().name

    assert loop.run(where(3), timeout=10) == (3, "arpo-test-loop") and loop.running and not loop.in_loop()

    async def from_inside():
        assert loop.in_loop()
        return loop.run(where(1), timeout=10)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r"^TestEngine\.run\(\) called from its own event loop: await the "):
            loop.run(from_inside(), timeout=10)
        with pytest.raises(TimeoutError):
            loop.run(asyncio.sleep(0.2), timeout=0.01)
        loop.run(asyncio.sleep(0.3), timeout=10)  # the timed-out sleep ends meanwhile
        loop.stop(join_timeout=5)
        assert not loop.thread.is_alive() and loop.loop.is_closed() and not loop.running
        with pytest.raises(RuntimeError, match=r"^the TestEngine is shut down$"):
            loop.run(where(2), timeout=10)
        loop.stop(join_timeout=5)  # again: nothing to do
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]  # refused coroutines are closed


def test_stopping_a_loop_stuck_in_a_blocking_call_waits_only_the_join_timeout_and_leaves_it_open():
    """A coroutine that blocks the loop's thread: `stop` must return after its join timeout, and must not close a
    loop that still runs (asyncio refuses that); once the thread ends, a second `stop` closes it."""
    import asyncio
    import time

    from arpo_trl.rollout.loop_thread import LoopThread

    loop = LoopThread("arpo-test-stuck", "TestEngine")

    async def blocking():
        time.sleep(2.5)  # long past the join timeout, with room for a loaded machine

    asyncio.run_coroutine_threadsafe(blocking(), loop.loop)
    time.sleep(0.1)  # the loop's thread is now inside time.sleep
    start = time.monotonic()
    loop.stop(join_timeout=0.05)
    assert time.monotonic() - start < 1.5
    assert loop.thread.is_alive() and not loop.loop.is_closed()
    loop.thread.join(timeout=10)
    loop.stop(join_timeout=5)
    assert not loop.thread.is_alive() and loop.loop.is_closed()


# ---------------------------------------------------------------------------------------------- vllm_weights.py


@pytest.mark.parametrize(
    "peft_name, hf_name",
    [
        ("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight", "model.layers.0.mlp.up_proj.weight"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
        ("base_model.model.lm_head.original_module.weight", None),
        ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
        ("model.norm.weight", "model.norm.weight"),
    ],
)
def test_peft_parameter_names_map_to_the_base_models(peft_name, hf_name):
    from arpo_trl.rollout.vllm_weights import _hf_name

    assert _hf_name(peft_name) == hf_name


def _lora_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    from arpo_trl.testing import build_tiny_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(build_tiny_model(tokenizer, seed=5), config)


def test_training_weights_are_the_merged_model_under_hf_names_and_the_adapters_come_back_unmerged(tokenizer):
    import copy

    from arpo_trl.rollout.vllm_weights import training_weights

    model = _lora_model(tokenizer)
    merged = copy.deepcopy(model).merge_and_unload()  # peft's own merge: the reference
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with training_weights(model) as weights:
        reference = dict(merged.named_parameters())
        assert sorted(weights) == sorted(reference)
        for name, tensor in weights.items():
            assert torch.allclose(tensor, reference[name], atol=1e-6), name
        q = weights["model.layers.0.self_attn.q_proj.weight"]
        assert not q.requires_grad
        assert not torch.allclose(q, before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    after = model.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)  # unmerged: the adapters train on
    plain = merged
    with training_weights(plain) as weights:
        assert list(weights) == [n for n, _ in plain.named_parameters()]
        assert all(weights[n].data_ptr() == p.data_ptr() for n, p in plain.named_parameters())  # no copies


def test_a_training_weights_block_that_raises_still_unmerges_the_adapters(tokenizer):
    from arpo_trl.rollout.vllm_weights import training_weights

    model = _lora_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="the engine failed"), training_weights(model):
        raise RuntimeError("the engine failed")
    assert all(torch.allclose(before[k], v, atol=1e-6) for k, v in model.state_dict().items())
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))


def test_an_exported_model_loads_back_as_the_merged_model_with_its_tokenizer_and_generation_config(tokenizer, tmp_path):
    import copy
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arpo_trl.rollout.vllm_weights import export_model

    model = _lora_model(tokenizer)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    path = export_model(model, tokenizer, str(tmp_path / "export"))
    assert path == str(tmp_path / "export")
    assert "lm_head.weight" not in load_file(os.path.join(path, "model.safetensors"))  # tied: vLLM ties it back
    with open(os.path.join(path, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == merged.generation_config.eos_token_id
    assert export_model(model, tokenizer, path) == path  # again, into the same directory (an engine restarting)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([tokenizer.encode("Add 3, 4 and 5.")])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, merged(ids).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(path).encode("Add 3.") == tokenizer.encode("Add 3.")


def test_an_untied_models_export_keeps_its_lm_head(tokenizer, tmp_path):
    from safetensors.torch import load_file

    from arpo_trl.rollout.vllm_weights import export_model
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=5)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 2)  # a head of its own
    model.generation_config = None
    path = export_model(model, tokenizer, str(tmp_path / "untied"))
    assert torch.equal(load_file(os.path.join(path, "model.safetensors"))["lm_head.weight"], model.lm_head.weight)
    assert not os.path.exists(os.path.join(path, "generation_config.json"))


def test_a_head_the_config_ties_is_left_out_of_the_export_even_when_it_is_a_tensor_of_its_own(tokenizer, tmp_path):
    """vLLM ties the head back to the embedding whenever the config says so (a separate head tensor, e.g. a
    trainable copy of it, would contradict the config)."""
    from safetensors.torch import load_file

    from arpo_trl.rollout.vllm_weights import export_model
    from arpo_trl.testing import build_tiny_model

    model = build_tiny_model(tokenizer, seed=5)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert model.config.tie_word_embeddings and "lm_head.weight" in dict(model.named_parameters())
    saved = load_file(os.path.join(export_model(model, tokenizer, str(tmp_path / "tied")), "model.safetensors"))
    assert "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved


def test_autocast_mismatch_names_the_autocast_dtype_only_over_float32_weights():
    from arpo_trl.rollout.vllm_weights import autocast_mismatch

    assert autocast_mismatch("float32", "bf16") == (
        "use_vllm with bf16 mixed precision and float32 weights: the engine samples in float32, but the trainer "
        "computes its logprobs under bfloat16 autocast, so TRL's importance-sampling ratios measure bfloat16 rounding "
        "(per-sequence ratios of 0.7-1.4 on SmolLM2-135M, and sequence_mask drops those above "
        "vllm_importance_sampling_clip_max) rather than the sampler's staleness. Set bf16=False for exact ratios "
        "(the training step then runs in float32, slower where the CPU or GPU has fast bfloat16)."
    )
    assert "under float16 autocast" in autocast_mismatch("float32", "fp16")
    assert autocast_mismatch("bfloat16", "bf16") is None and autocast_mismatch("float32", "no") is None
    assert autocast_mismatch("float32", None) is None


# ---------------------------------------------------------------------------------------------- vllm_server.py


def test_the_server_command_runs_vllms_openai_server_with_what_the_driver_needs_and_the_given_flags():
    from arpo_trl.rollout.vllm_engine import chunked_prefill_default
    from arpo_trl.rollout.vllm_server import server_command

    command = server_command("/models/m", 8123, enforce_eager=True, max_model_len=512, trust_remote_code=False,
                             dtype=None)  # fmt: skip
    # vLLM's CPU build cannot split a seeded prompt across steps: chunked prefill off there (chunked_prefill_default)
    cpu = ["--no-enable-chunked-prefill"] if chunked_prefill_default() is False else []
    assert command == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/m", "--host", "127.0.0.1",
        "--port", "8123", "--logprobs-mode", "processed_logprobs", "--enable-prefix-caching",
        "--enable-prompt-tokens-details", "--worker-extension-cls", "arpo_trl.rollout.vllm_worker.WeightSyncExtension",
        *cpu, "--enforce-eager", "--max-model-len", "512",
    ]  # fmt: skip
    chosen = server_command("/models/m", 8123, enable_chunked_prefill=True)  # the user's choice wins
    assert chosen[-1] == "--enable-chunked-prefill" and "--no-enable-chunked-prefill" not in chosen


def test_a_server_chunk_becomes_a_stream_update_with_top_logprobs_by_token_id():
    """A streamed `/v1/completions` choice (`return_tokens_as_token_ids`): top-k keyed "token_id:<id>", the sampled
    token added where the server left it out, a missing logprob as NaN, extra top-k positions dropped."""
    import math

    from arpo_trl.rollout.vllm_server import _to_update

    choice = {
        "token_ids": [5, 6],
        "logprobs": {
            "token_logprobs": [-0.25, None],
            "top_logprobs": [{"token_id:5": -0.25, "token_id:9": -2.0}, {"token_id:9": -1.0}, {"token_id:1": -3.0}],
        },
        "finish_reason": None,
    }
    update = _to_update(choice, top_logprobs=2, cached=64)
    assert (update.token_ids, update.logprobs[0], update.finished, update.finish_reason, update.num_cached_tokens) == (
        [5, 6], -0.25, False, None, 64
    )  # fmt: skip
    assert math.isnan(update.logprobs[1]) and len(update.top_logprobs) == 2
    assert update.top_logprobs[0] == {5: -0.25, 9: -2.0}
    assert update.top_logprobs[1][9] == -1.0 and list(update.top_logprobs[1]) == [9, 6]
    assert math.isnan(update.top_logprobs[1][6])
    assert _to_update(choice, top_logprobs=0, cached=0).top_logprobs == []
    empty = _to_update({"token_ids": None, "logprobs": None, "finish_reason": "length"}, top_logprobs=2, cached=0)
    assert (empty.token_ids, empty.logprobs, empty.top_logprobs, empty.finished, empty.finish_reason) == (
        [], [], [], True, "length"
    )  # fmt: skip


@pytest.mark.parametrize("stop_reason, ours", [("</calc>", "stop"), (None, "eos"), (2, "eos")])
def test_a_servers_stop_is_a_stop_string_only_when_it_names_one(stop_reason, ours):
    from arpo_trl.rollout.vllm_server import _to_update

    choice = {"token_ids": [5], "finish_reason": "stop", "stop_reason": stop_reason}
    assert _to_update(choice, top_logprobs=0, cached=0).finish_reason == ours


def test_under_zero3_every_parameter_is_gathered_in_one_call_for_the_export(tokenizer, tmp_path, monkeypatch):
    """All ranks enter one `GatheredParameters` over every parameter (read-only), for the weights and the export
    alike. Here the parameters are not partitioned, so the real call is a no-op that can be watched."""
    import deepspeed

    from arpo_trl.rollout.vllm_weights import export_model, training_weights

    real, calls = deepspeed.zero.GatheredParameters, []

    def watched(params, modifier_rank=None, **kwargs):
        calls.append((list(params), modifier_rank))
        return real(params, modifier_rank=modifier_rank, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", watched)
    model = _lora_model(tokenizer)
    everything = list(model.parameters())
    with training_weights(model, zero3=True):
        pass
    export_model(model, tokenizer, str(tmp_path / "zero3"), zero3=True)
    assert len(calls) == 2 and all(modifier is None for _, modifier in calls)
    assert [[id(p) for p in params] for params, _ in calls] == [[id(p) for p in everything]] * 2
    export_model(model, tokenizer, str(tmp_path / "plain"))
    with training_weights(model):
        pass
    assert len(calls) == 2  # nothing gathered without ZeRO-3
