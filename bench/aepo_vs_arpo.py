"""ARPO against AEPO on the tiny calc-tool fixture (arpo_trl.testing): how the branches spread, tool calls, sampled
tokens, time.

Variants (same model weights, data, tool, reward, seed and budget M; transformers driver, one process):

    arpo            ARPOConfig defaults (the paper's ARPO)
    aepo            algorithm_preset="aepo" (penalty λ = 0.05, stop-gradient clip, a = 0.2, budget split "paper")
    aepo-official   algorithm_preset="aepo_official" (the released scripts: official rollout, AEPO's own rule)

Per variant and step, from each training rollout's `RolloutResult` (the trainer's `on_rollout` seam):

- top-3 share: in each group with at least one fork, the forks made by its three most-forking trajectories over all
  its forks (the AEPO paper reports 93.4 % for ARPO on 1–3 trajectories); pooled over groups;
- forks per group, the deepest fork chain, global samples per prompt (N, or m with the budget split);
- tool calls per completion (a call in a shared prefix counts for each completion holding it) and unique executions;
- sampled tokens per completion (a branch does not re-sample its parent's prefix), probe tokens (budget split);
- rollout seconds and step seconds (wall clock, median over the steps after the first);
- the share of valid tokens above the upper clip with A > 0 (AEPO keeps their gradient; PPO zeroes it). With one
  update per generation batch π = π_old and no token is ever clipped, hence `--updates-per-generation 2`.

It is a mechanics benchmark: a 3.2 M-parameter model and a handful of steps say nothing about accuracy.
Default settings take a few minutes on 2 CPU cores:

    .venv/bin/python bench/aepo_vs_arpo.py --steps 4 --num-generations 12 --out bench/results/aepo_vs_arpo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from arpo_trl import ARPOConfig, ARPOTrainer  # noqa: E402
from arpo_trl.testing import calc, calc_dataset, closeness_reward, load_tokenizer, tool_sft  # noqa: E402

VARIANTS = {
    "arpo": {},
    "aepo": {"algorithm_preset": "aepo"},
    "aepo-official": {"algorithm_preset": "aepo_official"},
}


def top_share(counts: list[int], top: int = 3) -> tuple[int, int]:
    """(forks of the `top` most-forking trajectories, all forks) of one group."""
    ordered = sorted(counts, reverse=True)
    return sum(ordered[:top]), sum(ordered)


def fork_depth(trajectories: list, traj) -> int:
    by_slot = {t.slot: t for t in trajectories}
    depth = 0
    while traj.parent is not None and traj.parent in by_slot and depth < 64:
        traj, depth = by_slot[traj.parent], depth + 1
    return depth


def rollout_figures(result, m: int) -> dict:
    trajs = result.trajectories
    groups: dict[int, list] = {}
    for t in trajs:
        groups.setdefault(t.group, []).append(t)
    top, forks, depths, roots = 0, 0, [], []
    for members in groups.values():
        counts = [sum(len(e.forked_slots) for e in t.branch_events) for t in members]
        a, b = top_share(counts)
        top, forks = top + a, forks + b
        depths.append(max(fork_depth(members, t) for t in members))
        roots.append(sum(t.kind == "root" for t in members))
    sampled = sum(sum(t.tool_mask[(t.fork_position or 0) :]) for t in trajs)
    return {
        "top3": top,
        "forks": forks,
        "groups": len(groups),
        "max_depth": max(depths, default=0),
        "roots_per_group": statistics.mean(roots) if roots else 0.0,
        "calls": sum(len(t.tool_events) for t in trajs),
        "executions": result.stats.tool_executions,
        "sampled_tokens": sampled,
        "completions": len(trajs),
    }


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)


class Recording(ARPOTrainer):
    """Keeps each training rollout's figures, from the result the trainer hands to `on_rollout`."""

    def __init__(self, *args, **kwargs):
        self.records: list[dict] = []
        super().__init__(*args, **kwargs)

    def on_rollout(self, mode, result):
        super().on_rollout(mode, result)
        if mode == "train":
            self.records.append(rollout_figures(result, self.num_generations))


def run(name: str, opts, tokenizer, state: dict, out: Path) -> dict:
    model = tool_sft(tokenizer)
    model.load_state_dict(state)
    torch.manual_seed(opts.seed)
    m = opts.num_generations
    args = ARPOConfig(
        output_dir=str(out / name),
        # U optimizer updates per generation batch: from the second on, π differs from π_old and the clip can act
        per_device_train_batch_size=m * opts.prompts_per_step // opts.updates_per_generation,
        steps_per_generation=opts.updates_per_generation,
        num_generations=m,
        initial_rollouts=opts.initial_rollouts or m // 4,
        max_completion_length=opts.max_completion_length,
        max_tool_calling_iterations=opts.max_tool_calls,
        max_steps=opts.steps,
        learning_rate=opts.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        seed=opts.seed,
        branch_base_probability=opts.alpha,
        branch_entropy_weight=opts.beta,
        **VARIANTS[name],
    )
    timer = StepTimer()
    trainer = Recording(
        model=model,
        reward_funcs=[closeness_reward],
        args=args,
        train_dataset=calc_dataset(256, seed=opts.seed),
        processing_class=tokenizer,
        tools=[calc],
        callbacks=[timer],
    )
    trainer.train()
    recs = trainer.records
    total = {k: sum(r[k] for r in recs) for k in ("top3", "forks", "groups", "calls", "executions", "completions")}
    total["sampled_tokens"] = sum(r["sampled_tokens"] for r in recs)
    history = trainer.state.log_history

    def logged(key: str) -> list[float]:
        return [e[key] for e in history if key in e]

    rollout_s = logged("arpo/rollout_seconds")
    later = lambda xs: xs[1:] if len(xs) > 1 else xs  # noqa: E731 (the first step warms caches)
    return {
        "variant": name,
        "steps": len(recs),
        "top3_share": total["top3"] / total["forks"] if total["forks"] else None,
        "forks_per_group": total["forks"] / max(total["groups"], 1),
        "max_fork_depth": max((r["max_depth"] for r in recs), default=0),
        "global_samples_per_prompt": statistics.mean(
            logged("aepo/global_samples_per_prompt") or [args.initial_rollouts]
        ),
        "tool_calls_per_completion": total["calls"] / max(total["completions"], 1),
        "executions_per_completion": total["executions"] / max(total["completions"], 1),
        "sampled_tokens_per_completion": total["sampled_tokens"] / max(total["completions"], 1),
        "probe_tokens_per_prompt": statistics.mean(logged("aepo/probe_sampled_tokens") or [0.0]),
        "consecutive_branches_max": max(logged("aepo/consecutive_branches_max") or [0.0]),
        "kept_gradient_share": statistics.mean(logged("aepo/clipped_gradient_kept_share") or [0.0]),
        "upper_clipped_share": statistics.mean(logged("clip_ratio/high_mean") or [0.0]),  # TRL's: δ > 1 + ε_h, A > 0
        "rollout_s_median": statistics.median(later(rollout_s)) if rollout_s else None,
        "step_s_median": statistics.median(later(timer.times)) if timer.times else None,
        "reward_mean": statistics.mean(logged("reward") or [float("nan")]),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| variant | top-3 share of forks | forks / group | max depth | global samples / prompt | tool calls / "
        "completion | unique executions / completion | sampled tokens / completion | probe tokens / prompt | "
        "upper-clipped share (A > 0) | rollout s (median) | step s (median) |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        share = "—" if r["top3_share"] is None else f"{r['top3_share']:.3f}"
        lines.append(
            f"| {r['variant']} | {share} | {r['forks_per_group']:.2f} | {r['max_fork_depth']} | "
            f"{r['global_samples_per_prompt']:.2f} | {r['tool_calls_per_completion']:.2f} | "
            f"{r['executions_per_completion']:.2f} | {r['sampled_tokens_per_completion']:.1f} | "
            f"{r['probe_tokens_per_prompt']:.1f} | {r['upper_clipped_share']:.4f} | {r['rollout_s_median']:.2f} | "
            f"{r['step_s_median']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=4, help="optimizer steps")
    p.add_argument("--num-generations", type=int, default=16, help="M")
    p.add_argument("--initial-rollouts", type=int, default=None, help="N (default M/4: room for forks)")
    p.add_argument("--prompts-per-step", type=int, default=2, help="prompts per generation batch")
    p.add_argument(
        "--updates-per-generation", type=int, default=2, help="optimizer steps per generation batch (1: on-policy)"
    )
    p.add_argument("--max-completion-length", type=int, default=96)
    p.add_argument("--max-tool-calls", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for aepo_vs_arpo.json / .md")
    opts = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    tokenizer = load_tokenizer()
    state = {k: v.clone() for k, v in tool_sft(tokenizer).state_dict().items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in opts.variants:
            started = time.perf_counter()
            rows.append(run(name, opts, tokenizer, state, Path(tmp)))
            print(f"{name}: {time.perf_counter() - started:.0f} s {json.dumps(rows[-1])}", file=sys.stderr)
    md = table(rows)
    print(md)
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "aepo_vs_arpo.json").write_text(json.dumps({"options": vars(opts), "rows": rows}, indent=1))
        (out / "aepo_vs_arpo.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
