"""Run by tests/test_distributed.py under `accelerate launch` with `use_vllm=True`: one colocated vLLM engine per
rank, each rank branching differently on purpose (rank 0 forks at every tool result, rank 1 never).

The asynchronous rollout makes no collective call, so the ranks' different trees cannot deadlock it; the weight
sync (a ZeRO-3 gather) happens at the same steps on both ranks.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from arpo_trl import ARPOConfig, ARPOTrainer  # noqa: E402
from arpo_trl.testing import calc, calc_dataset, closeness_reward, load_tokenizer, tool_sft, widen_heads  # noqa: E402


class CountingTrainer(ARPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.branches = 0

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.branches += self.last_rollout.stats.branches
        return out


def main(output_dir: str) -> None:
    tok = load_tokenizer()
    # Built before the config: under ZeRO-3 a config activates DeepSpeed's zero.Init, and a model created after it
    # is born partitioned (the re-layout needs its full weights; the trainer partitions it when training starts).
    model = widen_heads(tool_sft(tok))  # vLLM's CPU attention needs heads of 32: same function
    args = ARPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        initial_rollouts=2,
        max_completion_length=48,
        max_tool_calling_iterations=2,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        seed=0,
        branch_entropy_weight=0.0,
        entropy_window=4,
        use_cpu=True,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_kv_cache_gib=0.25,
    )
    trainer = CountingTrainer(
        model=model,
        reward_funcs=[closeness_reward],
        args=args,
        train_dataset=calc_dataset(64),
        processing_class=tok,
        tools=[calc],
    )
    rank = trainer.accelerator.process_index
    trainer.branch_policy.alpha = 1.0 if rank == 0 else 0.0
    trainer.train()
    syncs = [e for e in trainer.state.log_history if "vllm/weight_sync_s" in e]
    ratios = [e["sampling/importance_sampling_ratio/mean"] for e in trainer.state.log_history if "loss" in e]
    report = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "branches": trainer.branches,
        "global_step": trainer.state.global_step,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "weight_syncs": len(syncs),
        "importance_sampling_ratios": ratios,
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    trainer.vllm_engine.shutdown()
    trainer.end()


if __name__ == "__main__":
    main(sys.argv[1])
