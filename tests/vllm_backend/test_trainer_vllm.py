"""The real `ARPOTrainer.train()` with `use_vllm=True` (colocate): ARPO's asynchronous tree rollout on a real vLLM
engine, the real sandboxed Python tool, real branching, weight sync after every step, and resume.

One trainer (one engine) trains for the module; a second, resumed from its checkpoint, runs after it has shut its
engine down. The tiny model is re-laid out with head size 32 (vLLM's CPU attention needs ≥ 32; same function).
"""

import math

import pytest
import torch
from vllm_helpers import M, N, Recording, collect, prompt_ids, teacher_forced, vllm_args, wide_model

from arpo_trl.testing import calc_dataset, closeness_reward
from arpo_trl.tools import PythonInterpreter


@pytest.fixture(scope="module")
def trained(tokenizer, tool_model_state, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-train")
    model = wide_model(tokenizer, tool_model_state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Recording(
        model=model,
        reward_funcs=[closeness_reward],
        args=vllm_args(tmp),
        train_dataset=calc_dataset(64),
        processing_class=tokenizer,
        # The tiny model writes "<calc>4+5+6</calc>": valid Python for the sandboxed interpreter.
        tools=[PythonInterpreter(name="calc", timeout=10)],
    )
    trainer.train()
    yield trainer, before, tmp
    trainer.rollout_backend.engine.shutdown()


def logs(trainer, key):
    return [e[key] for e in trainer.state.log_history if key in e]


def test_trains_with_real_branching_and_the_sandboxed_tool(trained, tokenizer):
    trainer, before, _ = trained
    assert len(trainer.batches) == 2
    for batch in trainer.batches:
        trajs, stats = batch["rollout"].trajectories, batch["rollout"].stats
        assert [t.slot for t in trajs] == list(range(8)) and all(t.done for t in trajs)
        assert stats.branches + stats.fresh == 2 * (M - N)
        events = [e for t in trajs for e in t.branch_events]
        assert all(e.forked_slots for e in events)  # α = 1, β = 0: every decision forked
        assert sum(len(e.forked_slots) for e in events) == stats.branches
        for t in trajs:
            if t.kind == "branch":
                cut = t.fork_position
                assert t.completion_ids[:cut] == trajs[t.parent].completion_ids[:cut]
                assert tokenizer.decode(t.completion_ids[:cut]).endswith("</result>")
        # tool-result tokens have no sampling logprob (0, masked); sampled tokens have vLLM's
        for t in trajs:
            for lp, sampled in zip(t.logprobs, t.tool_mask):
                assert (lp == 0.0) if not sampled else (lp <= 0.0 and not math.isnan(lp))
    # vLLM sampled with the trainer's weights at every step: TRL's importance-sampling ratio is 1 (to float noise)
    # (each token within 1e-3: vLLM's CPU kernels differ by up to ~2.5e-4 on the freshly built tool model; a
    # sequence's ratio sums them, 0.9973 measured before any update)
    for diff in logs(trainer, "sampling/sampling_logp_difference/max"):
        assert diff < 1e-3
    for ratio in logs(trainer, "sampling/importance_sampling_ratio/mean"):
        assert ratio == pytest.approx(1.0, abs=1e-2)
    assert sum(b["rollout"].stats.branches for b in trainer.batches) > 0
    answered = [e for b in trainer.batches for t in b["rollout"].trajectories for e in t.tool_events if not e.error]
    assert answered, "the sandbox answered no call"
    assert len(logs(trainer, "vllm/weight_sync_s")) == 2  # before each rollout
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the loss trained the model


def test_forks_prefill_from_the_prefix_cache(trained):
    """A fork's prompt is its parent's prefix through the tool result, which the parent's continuation has just
    prefilled: every full KV block of it must come from the cache."""
    trainer, _, _ = trained
    block = trainer.rollout_backend.engine.block_size
    rates = iter(logs(trainer, "vllm/fork_prefix_cache_hit_rate"))  # logged for the steps that forked
    forked = 0
    for batch in trainer.batches:
        shared = [
            len(batch["rollout"].prompt_ids[t.slot]) + t.fork_position
            for t in batch["rollout"].trajectories
            if t.kind == "branch"
        ]
        if not shared:
            continue
        forked += 1
        # What a prefix cache can serve: the full blocks before the prompt's last token (vLLM computes that one
        # afresh for its logits, so a prompt of exactly b blocks reuses b − 1).
        full_blocks = sum((n - 1) // block * block for n in shared)
        assert full_blocks > 0
        assert next(rates) >= 0.9 * full_blocks / sum(shared)
    assert forked > 0 and next(rates, None) is None


def test_engine_serves_the_trained_weights(trained, tokenizer, tool_model_state):
    """After the last optimizer step and a sync, the engine's logprobs are the trained model's, not the initial
    model's."""
    trainer, _, _ = trained
    trainer.rollout_backend.sync_weights(
        trainer.model, trainer.state.global_step, trainer.accelerator
    )  # after the last rollout
    prompt = prompt_ids(tokenizer, 3, 4, 5)
    result = trainer.rollout_backend.engine.run(
        collect(trainer.rollout_backend.engine, "after-training", prompt, 12, seed=7)
    )
    trained_model = trainer.accelerator.unwrap_model(trainer.model).eval()
    log_probs, _ = teacher_forced(trained_model, prompt, result.ids)
    want = log_probs[torch.arange(len(result.ids)), torch.tensor(result.ids)]
    torch.testing.assert_close(torch.tensor(result.logprobs), want, atol=1e-4, rtol=0)
    initial = wide_model(tokenizer, tool_model_state).eval()
    old, _ = teacher_forced(initial, prompt, result.ids)
    old = old[torch.arange(len(result.ids)), torch.tensor(result.ids)]
    assert (old - want).abs().max() > 1e-2  # training moved the distribution the engine samples from


def test_resume_syncs_the_checkpoint_weights_before_the_first_rollout(trained, tokenizer, tool_model_state):
    trainer, _, tmp = trained
    trainer.rollout_backend.engine.shutdown()  # one engine at a time on this machine
    resumed = Recording(
        model=wide_model(tokenizer, tool_model_state),  # initial weights: resume must load and push the checkpoint's
        reward_funcs=[closeness_reward],
        args=vllm_args(tmp, max_steps=2, output_dir=str(tmp / "resumed")),
        train_dataset=calc_dataset(64),
        processing_class=tokenizer,
        tools=[PythonInterpreter(name="calc", timeout=10)],
    )
    try:
        resumed.train(resume_from_checkpoint=str(tmp / "out" / "checkpoint-1"))
        assert resumed.state.global_step == 2 and len(resumed.batches) == 1
        after = [e for e in resumed.state.log_history if e.get("step") == 2]  # (steps ≤ 1 come from the checkpoint)
        assert len([e for e in after if "vllm/weight_sync_s" in e]) == 1
        (ratio,) = [e["sampling/importance_sampling_ratio/mean"] for e in after if "loss" in e]
        assert ratio == pytest.approx(1.0, abs=2e-3)  # the engine sampled with the checkpoint's weights
    finally:
        resumed.rollout_backend.engine.shutdown()
