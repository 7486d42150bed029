"""Run by tests/test_distributed.py under `accelerate launch`: each rank branches differently on purpose.

Rank 0 forks at every tool result (α = 1), rank 1 never does (α = 0): their trees, and so the number of rounds
each would need on its own, differ. Every rank must still make the same number of generate calls.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from arpo_trl import ARPOConfig, ARPOTrainer  # noqa: E402
from arpo_trl.testing import calc, calc_dataset, closeness_reward, load_tokenizer, tool_sft  # noqa: E402


class CountingTrainer(ARPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.branches = 0
        self.rounds = 0

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.branches += self.last_rollout.stats.branches
        self.rounds += self.last_rollout.stats.rounds
        return out


def main(output_dir: str, extra: list[str]) -> None:
    tok = load_tokenizer()
    settings = dict(
        output_dir=output_dir,
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
    # A JSON argument overrides any of these (a shorter run for exit-reliability loops: {"max_steps": 1}).
    args = ARPOConfig(**{**settings, **(json.loads(extra[0]) if extra else {})})
    trainer = CountingTrainer(
        model=tool_sft(tok),
        reward_funcs=[closeness_reward],
        args=args,
        train_dataset=calc_dataset(64),
        processing_class=tok,
        tools=[calc],
    )
    rank = trainer.accelerator.process_index
    trainer.branch_policy.alpha = 1.0 if rank == 0 else 0.0
    trainer.train()
    report = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "generate_calls": trainer.generator.calls,
        "idle_calls": trainer.generator.idle_calls,
        "rounds": trainer.rounds,
        "branches": trainer.branches,
        "global_step": trainer.state.global_step,
        "distributed_type": str(trainer.accelerator.distributed_type),
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    # No trainer.end(), as in many users' scripts: ARPOTrainer.train() destroys the process group at exit.


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
