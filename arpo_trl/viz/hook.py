"""The trainer's side of the rollout-tree pictures: render a few prompts of a batch and log them to wandb."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..rollout.trajectory import ROOT
from .html import render_tree

TREES_DIR = "rollout_trees"
WANDB_KEY = "arpo/rollout_trees"


def _local_rows(
    values: Sequence[float] | torch.Tensor, rows: int, process_index: int
) -> Sequence[float] | torch.Tensor:
    """TRL gathers rewards over all processes; advantages are local. Keep this process's rows of either."""
    n = len(values)
    if n == rows:
        return values
    if n % rows == 0 and process_index * rows < n:
        return values[process_index * rows : (process_index + 1) * rows]
    raise ValueError(f"expected {rows} values (this process's rows) or a multiple of it (all processes), got {n}")


def log_rollout_trees(
    trainer: Any,
    record: Any,
    rewards: Sequence[float] | torch.Tensor,
    advantages: Sequence[float] | torch.Tensor,
    step: int,
    max_prompts: int = 2,
) -> Path:
    """Render the first `max_prompts` prompts of `record` to ``<output_dir>/rollout_trees/step-XXXXXX.html``.

    When the trainer reports to wandb and a run is active, the page is also logged as ``wandb.Html`` under
    ``arpo/rollout_trees`` with ``train/global_step`` = `step` (the step metric transformers' `WandbCallback`
    defines), from the main process only, and without wandb's injected stylesheet (the page stays
    self-contained).

    Args:
        trainer: the `ARPOTrainer` (reads `args`, the tokenizer, the model's vocabulary size, `accelerator`).
        record: the batch's `RolloutResult` (what `ARPOTrainer.on_rollout` receives).
        rewards: R_i, this process's rows (B,) or TRL's gathered rewards over all processes.
        advantages: Â_i, sequence level (B,), before any hard attribution (hard advantages are derived here).
        step: the global step, used in the file name and for wandb.
        max_prompts: how many groups (prompts) to draw, from the first.

    Returns:
        The path of the HTML file written (other processes than the main one write ``…-rankN.html``).
    """
    args = trainer.args
    accelerator = getattr(trainer, "accelerator", None)
    process_index = getattr(accelerator, "process_index", 0)
    rows = len(record.trajectories)
    rewards = _local_rows(rewards, rows, process_index)
    advantages = _local_rows(advantages, rows, process_index)
    num_groups = len({t.group for t in record.trajectories})
    tokenizer = getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    vocab_size = None
    model = getattr(trainer, "model", None)
    if model is not None:
        # From the config, as the rollout does: under ZeRO-3 the LM head's local weight is an empty shard.
        vocab_size = int(model.config.get_text_config().vocab_size)
    meta = {
        "step": step,
        "mode": getattr(record, "mode", "train"),
        "M": rows // max(1, num_groups),
        "N": getattr(trainer, "initial_rollouts", getattr(args, "initial_rollouts", None)),
        "Z": getattr(args, "branch_factor", None),
        "k": getattr(args, "entropy_window", None),
        "α": getattr(args, "branch_base_probability", None),
        "β": getattr(args, "branch_entropy_weight", None),
        "rule": getattr(args, "branch_rule", None),
        "timing": getattr(args, "entropy_timing", None),
        "normalization": getattr(args, "entropy_normalization", None),
    }
    if getattr(args, "dynamic_rollouts", None):  # AEPO's budget split: m roots of each drawn prompt
        roots = [sum(t.kind == ROOT for t in record.trajectories if t.group == g) for g in range(num_groups)]
        meta["N"] = None
        meta["m per prompt (AEPO)"] = ", ".join(map(str, roots[:max_prompts]))
    if getattr(args, "branch_penalty_rate", 0) or getattr(args, "branch_rule", None) == "aepo_official":
        meta["λ (AEPO penalty)"] = getattr(args, "branch_penalty_rate", None)
    name = f"step-{int(step):06d}" + (f"-rank{process_index}" if process_index else "") + ".html"
    path = render_tree(
        record,
        tokenizer,
        rewards,
        advantages,
        Path(args.output_dir) / TREES_DIR / name,
        groups=range(min(max_prompts, num_groups)),
        entropy_window=getattr(args, "entropy_window", 20),
        entropy_normalization=getattr(args, "entropy_normalization", "sum_lnV"),
        vocab_size=vocab_size,
        title=f"ARPO rollout trees — step {step}",
        meta={k: v for k, v in meta.items() if v is not None},
    )
    report_to = args.report_to or []
    if isinstance(report_to, str):
        report_to = [report_to]
    if "wandb" in report_to and getattr(accelerator, "is_main_process", True):
        from ..extras import require

        wandb = require("wandb")

        if wandb.run is not None:
            wandb.log(
                {WANDB_KEY: wandb.Html(path.read_text(encoding="utf-8"), inject=False), "train/global_step": step}
            )
    return path
