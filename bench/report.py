"""Turning the benchmark's runs into figures: the trainer roster, medians, ratios, targets, tables, plot, provenance.

`TRAINERS` and `PAIRS` name the trainers `arpo_vs_grpo.py` can run and the (ARPO, baseline) pairs compared;
`METRICS` lists the reported figures (keys of `StepRecord.derived`) with their labels and ratio targets.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import trl
from probes import Probe

TRAINERS = {
    # name: (tool format, trainer, initial rollouts: "M" or "N", label)
    "grpo-tags": ("tags", "arpo", "M", "GRPO (ARPOTrainer N=M, tags)"),
    "arpo-tags": ("tags", "arpo", "N", "ARPO (tags)"),
    "trl-grpo-chat": ("chat", "trl", "M", "TRL GRPOTrainer (chat)"),
    "grpo-chat": ("chat", "arpo", "M", "GRPO (ARPOTrainer N=M, chat)"),
    "arpo-chat": ("chat", "arpo", "N", "ARPO (chat)"),
}
# (ARPO, baseline) pairs whose ratios are reported; the first of each format is the headline.
PAIRS = [
    ("arpo-tags", "grpo-tags"),
    ("arpo-chat", "trl-grpo-chat"),
    ("arpo-chat", "grpo-chat"),
    ("grpo-chat", "trl-grpo-chat"),
]


METRICS = [
    # key, label, format, ratio target (ARPO/GRPO ≤ target) or None
    ("tool_executions_per_completion", "unique tool executions / completion", "{:.2f}", 0.5),
    ("tool_calls_per_completion", "tool calls / completion", "{:.2f}", None),
    ("sampled_tokens_per_completion", "sampled tokens / completion", "{:.1f}", 0.75),
    ("decode_work_per_completion", "decode work (rows × steps) / completion", "{:.1f}", None),
    ("rollout_s", "rollout wall time / step (s)", "{:.2f}", 0.9),
    ("step_s", "whole step time (s)", "{:.2f}", None),
    ("train_s", "step time outside the rollout (s)", "{:.2f}", None),
    ("generate_s", "model generate time / step (s)", "{:.2f}", None),
    ("generate_calls", "generate calls (rounds) / step", "{:.0f}", None),
    ("tree_rounds", "  of which: rounds until roots and branches finished", "{:.0f}", None),
    ("decode_steps", "decoding steps / step (sum over rounds)", "{:.0f}", None),
    ("entropy_s", "entropy capture / step (s)", "{:.3f}", None),
    ("entropy_pct_of_generate", "entropy capture, % of generate", "{:.1f}", None),
    ("tools_s", "tool execution / step (s)", "{:.4f}", None),
    ("bookkeeping_s", "bookkeeping / step (s)", "{:.3f}", None),
    ("bookkeeping_pct_of_rollout", "bookkeeping, % of rollout", "{:.1f}", None),
    ("stop_init_s", "  of which: StopStringCriteria construction (s)", "{:.3f}", None),
    ("generator_overhead_s", "  of which: generator outside generate (s)", "{:.3f}", None),
    ("engine_overhead_s", "  of which: tree engine outside generator and tools (s)", "{:.3f}", None),
    ("stop_check_s", "stop-string checks inside generate (s)", "{:.3f}", None),
    ("branches_per_group", "branches / group", "{:.2f}", None),
    ("fresh_per_group", "fresh rollouts / group", "{:.2f}", None),
    ("executions_by_root_per_completion", "tool executions by roots / completion", "{:.2f}", None),
    ("executions_by_branch_per_completion", "tool executions by branches / completion", "{:.2f}", None),
    ("executions_by_fresh_per_completion", "tool executions by fresh rollouts / completion", "{:.2f}", None),
    ("reward", "mean reward", "{:.3f}", None),
]
ABSOLUTE_TARGETS = {"entropy_pct_of_generate": 2.0, "bookkeeping_pct_of_rollout": 5.0}


def median(values: list[float]) -> float:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else float("nan")


def summarise(runs: dict[int, dict[str, Probe]], warmup: int) -> dict[str, dict[str, float]]:
    """Per trainer, the median of each per-step figure over the steps after `warmup`, pooled over seeds."""
    pooled: dict[str, dict[str, list[float]]] = {}
    for probes in runs.values():
        for name, probe in probes.items():
            kept = probe.steps[warmup:] if len(probe.steps) > warmup else probe.steps
            for rec in kept:
                for key, value in rec.derived().items():
                    pooled.setdefault(name, {}).setdefault(key, []).append(value)
    return {name: {k: median(v) for k, v in figures.items()} for name, figures in pooled.items()}


def ratios(medians: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for a, b in PAIRS:
        if a in medians and b in medians:
            out[f"{a}/{b}"] = {
                key: (medians[a].get(key, math.nan) / medians[b][key]) if medians[b].get(key) else math.nan
                for key, *_ in METRICS
            }
    return out


def verdicts(medians, ratio_table) -> list[dict[str, Any]]:
    """The issue's targets, for each (ARPO, baseline) pair present."""
    rows = []
    for a, b in PAIRS:
        if not a.startswith("arpo") or f"{a}/{b}" not in ratio_table:
            continue
        r = ratio_table[f"{a}/{b}"]
        for key, label, _, target in METRICS:
            if target is not None:
                rows.append(
                    {
                        "pair": f"{a}/{b}",
                        "target": f"{label}: ARPO/GRPO ≤ {target}",
                        "value": r[key],
                        "met": bool(r[key] <= target),
                    }
                )
        for key, limit in ABSOLUTE_TARGETS.items():
            label = dict((k, lab) for k, lab, *_ in METRICS)[key]
            rows.append(
                {
                    "pair": a,
                    "target": f"{label} ≤ {limit}",
                    "value": medians[a][key],
                    "met": bool(medians[a][key] <= limit),
                }
            )
    seen, unique = set(), []
    for row in rows:
        ident = (row["pair"], row["target"])
        if ident not in seen:
            seen.add(ident)
            unique.append(row)
    return unique


def fmt(template: str, value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else template.format(value)


def markdown(medians, ratio_table, checks, meta) -> str:
    names = [n for n in TRAINERS if n in medians]
    pairs = [p for p in ratio_table]
    lines = [
        "| metric (median per step) | "
        + " | ".join(TRAINERS[n][3] for n in names)
        + " | "
        + " | ".join(f"ratio {p}" for p in pairs)
        + " |",
        "|---" * (1 + len(names) + len(pairs)) + "|",
    ]
    for key, label, template, target in METRICS:
        cells = [fmt(template, medians[n].get(key)) for n in names]
        rcells = [fmt("{:.2f}", ratio_table[p][key]) for p in pairs]
        tgt = f" (target ≤ {target})" if target is not None else ""
        lines.append(f"| {label}{tgt} | " + " | ".join(cells) + " | " + " | ".join(rcells) + " |")
    lines += ["", "| target | pair | value | met |", "|---|---|---|---|"]
    for row in checks:
        lines.append(f"| {row['target']} | {row['pair']} | {row['value']:.2f} | {'yes' if row['met'] else 'NO'} |")
    lines += [
        "",
        f"Machine: {meta['machine']}.",
        f"Command: `{meta['command']}`.",
        f"arpo_trl: {meta['arpo_trl']}.",
        f"Settings: {meta['settings']}.",
    ]
    if meta.get("label"):
        lines.append(f"Label: {meta['label']}.")
    return "\n".join(lines) + "\n"


def per_step_markdown(runs: dict[int, dict[str, Probe]]) -> str:
    keys = [
        "tool_executions_per_completion",
        "tool_calls_per_completion",
        "sampled_tokens_per_completion",
        "rollout_s",
        "step_s",
        "entropy_s",
        "tools_s",
        "bookkeeping_s",
        "branches_per_group",
        "reward",
    ]
    lines = ["| seed | trainer | step | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for seed, probes in runs.items():
        for name, probe in probes.items():
            for rec in probe.steps:
                d = rec.derived()
                lines.append(f"| {seed} | {name} | {rec.step} | " + " | ".join(f"{d[k]:.3g}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[int, dict[str, Probe]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [
        ("reward", "mean reward"),
        ("tool_calls_per_completion", "tool calls / completion"),
        ("tool_executions_per_completion", "unique tool executions / completion"),
    ]
    names = [n for n in TRAINERS if any(n in p for p in runs.values())]
    for ax, (key, title) in zip(axes, panels):
        for name in names:
            curves = [[rec.derived()[key] for rec in p[name].steps] for p in runs.values() if name in p]
            length = min(len(c) for c in curves)
            data = np.array([c[:length] for c in curves], dtype=float)
            steps = np.arange(1, length + 1)
            mean = np.nanmean(data, axis=0)
            line = ax.plot(
                steps, mean, marker="o", ms=3, label=TRAINERS[name][3], linestyle="-" if "arpo" in name else "--"
            )[0]
            if len(curves) > 1:
                ax.fill_between(
                    steps, np.nanmin(data, axis=0), np.nanmax(data, axis=0), color=line.get_color(), alpha=0.15
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = len(runs)
    fig.suptitle(
        f"ARPO vs GRPO on the calc task: mean over {seeds} seed{'s' if seeds > 1 else ''}"
        + (" (band: min–max)" if seeds > 1 else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def arpo_provenance() -> str:
    """Which arpo_trl ran: its path, the checkout's commit, and whether arpo_trl/ had uncommitted changes."""
    import subprocess

    import arpo_trl

    root = Path(arpo_trl.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "."], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    return f"{root}" + (f" @ {head}" if head else "") + (" (uncommitted changes)" if dirty else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    parts.append(f"trl {trl.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)
