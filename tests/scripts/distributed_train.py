"""Run by tests/test_distributed.py and tests/test_distributed_vllm.py under `accelerate launch`: each rank branches
differently on purpose.

Rank 0 forks at every tool result (α = 1), rank 1 never does (α = 0): their trees, and so the number of rounds
each would need on its own, differ. On transformers every rank must still make the same number of generate calls;
with `{"use_vllm": true}` (one colocated engine per rank) the asynchronous rollout makes no collective call at all,
and the weight sync (a ZeRO-3 gather) happens at the same steps on both ranks.

`argv`: the output directory, then optionally a JSON object of ARPOConfig overrides (`{"max_steps": 1}` for the
exit-reliability loops).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from arpo_trl import ARPOConfig, ARPOTrainer  # noqa: E402
from arpo_trl.testing import calc, calc_dataset, closeness_reward, load_tokenizer, tool_sft, widen_heads  # noqa: E402

SETTINGS = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    initial_rollouts=2,
    max_completion_length=64,
    max_tool_calling_iterations=3,
    max_steps=2,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    bf16=False,
    gradient_checkpointing=False,
    seed=0,
    branch_entropy_weight=0.0,
    use_cpu=True,
)
# With vLLM: shorter completions and windows (two engines share two cores), a small KV cache each.
VLLM_SETTINGS = dict(
    max_completion_length=48, max_tool_calling_iterations=2, entropy_window=4, vllm_mode="colocate",
    vllm_kv_cache_gib=0.25,
)  # fmt: skip


class CountingTrainer(ARPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.branches = 0
        self.rounds = 0

    def on_rollout(self, mode, result):
        self.branches += result.stats.branches
        self.rounds += result.stats.rounds


def main(output_dir: str, extra: list[str]) -> None:
    overrides = json.loads(extra[0]) if extra else {}
    use_vllm = overrides.get("use_vllm", False)
    tok = load_tokenizer()
    # Built before the config: under ZeRO-3 a config activates DeepSpeed's zero.Init, and a model created after it
    # is born partitioned (the re-layout needs its full weights; the trainer partitions it when training starts).
    model = tool_sft(tok)
    if use_vllm:
        model = widen_heads(model)  # vLLM's CPU attention needs heads of 32: the same function
    settings = {**SETTINGS, **(VLLM_SETTINGS if use_vllm else {}), **overrides}
    args = ARPOConfig(output_dir=output_dir, **settings)
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
    history = trainer.state.log_history
    report = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        # The transformers backend's generate calls (the vLLM one streams per trajectory: no collective calls).
        "generate_calls": getattr(getattr(trainer.rollout_backend, "generator", None), "calls", None),
        "idle_calls": getattr(getattr(trainer.rollout_backend, "generator", None), "idle_calls", None),
        "rounds": trainer.rounds,
        "branches": trainer.branches,
        "global_step": trainer.state.global_step,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "aepo_metrics": sorted({k for e in history for k in e if k.startswith("aepo/")}),
        "weight_syncs": len([e for e in history if "vllm/weight_sync_s" in e]),
        "importance_sampling_ratios": [
            e["sampling/importance_sampling_ratio/mean"]
            for e in history
            if "sampling/importance_sampling_ratio/mean" in e
        ],
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    # No trainer.end() and no engine shutdown, as in many users' scripts: ARPOTrainer.train() destroys the process
    # group at exit, and the engine shuts itself down at exit.


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
