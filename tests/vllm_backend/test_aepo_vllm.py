"""AEPO on the asynchronous vLLM driver: `algorithm_preset="aepo"` (budget probe, consecutive-branch penalty,
stop-gradient clip, entropy-aware advantage) trains with a real colocated engine."""

import math

from vllm_helpers import vllm_args, wide_model

from arpo_trl import AEPOTrainer
from arpo_trl.testing import calc, calc_dataset, closeness_reward


def test_aepo_preset_trains_on_the_vllm_driver(tokenizer, tool_model_state, tmp_path):
    # β_b = 0: m = M/2 whatever the entropies, so there are slots to fork into
    args = vllm_args(
        tmp_path,
        algorithm_preset="aepo",
        aepo_budget_sensitivity=0.0,
        save_strategy="no",
        max_steps=2,
        steps_per_generation=2,
        per_device_train_batch_size=4,
    )
    trainer = AEPOTrainer(
        model=wide_model(tokenizer, tool_model_state), reward_funcs=[closeness_reward], args=args,
        train_dataset=calc_dataset(16), processing_class=tokenizer, tools=[calc],
    )  # fmt: skip
    try:
        assert trainer.rollout_backend.engine is not None and not trainer.branch_policy.rounds  # no rounds here
        trainer.train()
        logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
        assert trainer.state.global_step == 2
        assert logged["aepo/global_samples_per_prompt"] == 2.0  # round(4·σ(0)) = 2
        assert logged["aepo/probe_sampled_tokens"] > 0
        for key in ("aepo/clipped_gradient_kept_share", "aepo/advantage_sign_flip_share"):
            assert 0.0 <= logged[key] <= 1.0
        record = trainer.observed_rollout
        for g in range(len(record.trajectories) // 4):
            group = [t for t in record.trajectories if t.group == g]
            assert sum(t.kind == "root" for t in group) == 2 and len(group) == 4
        seen = record.stats.consecutive_branches  # each decision of a prompt is its round here
        assert all(c >= 0 for c in seen)
        assert all(math.isfinite(p.sum().item()) for p in trainer.model.parameters())
    finally:
        trainer.rollout_backend.engine.shutdown()
