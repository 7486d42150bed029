"""`vllm_mode="server"`: ARPO's asynchronous rollout streaming from a real `vllm serve` process on loopback (the
CPU build), its logprobs and top-10 estimate against a transformers recompute, and a real `ARPOTrainer.train()`
that pushes its weights to the server after each step (the same-host ``shared_file`` transport; NCCL needs CUDA).
"""

import math
import threading

import pytest
import torch
from vllm_helpers import (
    M,
    N,
    Recording,
    cached_architectures,
    collect,
    free_port,
    prompt_ids,
    start_server,
    stop_server,
    teacher_forced,
    vllm_args,
    wide_model,
)

from arpo_trl.rollout.entropy import truncated_entropy
from arpo_trl.rollout.vllm_server import VLLMServerEngine
from arpo_trl.testing import calc_dataset, closeness_reward
from arpo_trl.tools import PythonInterpreter


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # An empty vLLM cache, as on a fresh machine: the server inspects the architecture itself while it starts.
    cache_root = tmp_path_factory.mktemp("vllm-server-cache")
    process, url = start_server(model_dir, free_port(), tmp_path_factory.mktemp("vllm-server"), cache_root)
    assert cached_architectures(cache_root) == ["LlamaForCausalLM"]  # the cold path ran
    yield url
    stop_server(process)


def test_server_streams_logprobs_and_the_top_k_estimate_of_the_served_model(server, tokenizer, hf_model):
    engine = VLLMServerEngine(server, temperature=1.0)
    try:
        prompt = prompt_ids(tokenizer, 3, 4, 5)
        result = engine.run(collect(engine, "probe", prompt, 12, seed=3, top_logprobs=10))
        assert len(result.ids) == 12 and result.updates[-1].finish_reason == "length"
        log_probs, _ = teacher_forced(hf_model, prompt, result.ids)
        want = log_probs[torch.arange(12), torch.tensor(result.ids)]
        torch.testing.assert_close(torch.tensor(result.logprobs), want, atol=1e-3, rtol=0)
        tops = [c for u in result.updates for c in u.top_logprobs]
        assert len(tops) == 12
        for i, (candidates, token) in enumerate(zip(tops, result.ids)):
            top10 = set(log_probs[i].topk(10).indices.tolist())
            assert set(candidates) == top10 | {token}  # keyed by token id, the sampled token included
            reference = {t: float(log_probs[i, t]) for t in top10 | {token}}
            assert truncated_entropy(candidates) == pytest.approx(truncated_entropy(reference), abs=1e-3)
        # The same seed gives the same tokens (the request's own random stream).
        again = engine.run(collect(engine, "probe-again", prompt, 12, seed=3))
        assert again.ids == result.ids
        with pytest.raises(ValueError, match="measures no exact entropy"):
            engine.run(collect(engine, "exact", prompt, 4, entropy_tokens=4))
    finally:
        engine.shutdown()


def test_a_missing_server_is_named_in_the_error_and_leaves_no_thread():
    threads = threading.active_count()
    for _ in range(3):  # what a caller waiting for a starting server does
        with pytest.raises(ConnectionError, match=r"no vLLM server answers at http://127\.0\.0\.1:\d+/health"):
            VLLMServerEngine(f"http://127.0.0.1:{free_port()}", connection_timeout=0)
    assert threading.active_count() == threads  # each failed start stopped its event-loop thread


def test_weights_reach_a_server_on_another_host_only_over_nccl():
    with pytest.raises(ValueError, match="is on another host: weights can reach it only over NCCL"):
        VLLMServerEngine("http://10.1.2.3:8000", weight_sync="shared_file")
    with pytest.raises(ValueError, match="is on another host"):
        VLLMServerEngine("http://10.1.2.3:8000")  # auto without CUDA: the shared file
    with pytest.raises(ValueError, match="weight_sync must be one of"):
        VLLMServerEngine("http://127.0.0.1:1", weight_sync="rsync")


def test_trainer_in_server_mode_branches_and_pushes_its_weights(server, tokenizer, tool_model_state, tmp_path):
    """A real train() against the server: real branching with the sandboxed tool, the official top-10 entropy
    (server mode's default), the weights pushed before each rollout that follows a step (TRL's importance-sampling
    ratio stays 1 at lr 1e-2), and the server then samples from the trained model."""
    args = vllm_args(tmp_path, vllm_mode="server", vllm_server_base_url=server, save_strategy="no")
    assert args.entropy_estimator == "top_k"
    model = wide_model(tokenizer, tool_model_state)
    trainer = Recording(
        model=model,
        reward_funcs=[closeness_reward],
        args=args,
        train_dataset=calc_dataset(64),
        processing_class=tokenizer,
        tools=[PythonInterpreter(name="calc", timeout=10)],
    )
    try:
        trainer.train()
        logs = trainer.state.log_history
        assert len([e for e in logs if "vllm/weight_sync_s" in e]) == 2
        # Stale server weights at lr 1e-2 would move these: each sampled token's logprob within 1e-3 of the
        # trainer's (vLLM's CPU kernels differ by up to ~2.5e-4), a sequence's ratio (their sum) within 1e-2.
        for e in [e for e in logs if "loss" in e]:
            assert e["sampling/sampling_logp_difference/max"] < 1e-3
            assert e["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-2)
        for batch in trainer.batches:
            trajs, stats = batch["rollout"].trajectories, batch["rollout"].stats
            assert len(trajs) == 8 and all(t.done for t in trajs)
            assert stats.branches + stats.fresh == 2 * (M - N)
            for t in trajs:
                if t.kind == "branch":
                    assert t.completion_ids[: t.fork_position] == trajs[t.parent].completion_ids[: t.fork_position]
                for lp, sampled in zip(t.logprobs, t.tool_mask):
                    assert (lp == 0.0) if not sampled else (lp <= 0.0 and not math.isnan(lp))
        assert sum(b["rollout"].stats.branches for b in trainer.batches) > 0
        # After one more sync, the server's logprobs are the trained model's.
        trainer.rollout_backend.sync_weights(trainer.model, trainer.state.global_step, trainer.accelerator)
        engine = trainer.rollout_backend.engine
        prompt = prompt_ids(tokenizer, 3, 4, 5)
        result = engine.run(collect(engine, "after-training", prompt, 12, seed=7))
        trained = trainer.accelerator.unwrap_model(trainer.model).eval()
        log_probs, _ = teacher_forced(trained, prompt, result.ids)
        want = log_probs[torch.arange(len(result.ids)), torch.tensor(result.ids)]
        torch.testing.assert_close(torch.tensor(result.logprobs), want, atol=1e-3, rtol=0)
        initial, _ = teacher_forced(wide_model(tokenizer, tool_model_state).eval(), prompt, result.ids)
        assert (initial[torch.arange(len(result.ids)), torch.tensor(result.ids)] - want).abs().max() > 1e-2
    finally:
        trainer.rollout_backend.engine.shutdown()
