"""A training run's learning curve from `trainer.state.log_history`: one PNG, one panel per question.

- **reward**: the mean reward of each step's completions, its running mean, and (when logged) the share of
  completions with a valid format and with the right answer;
- **tools**: tool calls per completion (calls inside a prefix a branch shares count once per completion) and unique
  executions per completion (each shared call ran once);
- **branching**: branches forked per group (prompt) and fresh rollouts per group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STEP_KEY = "reward"  # a log entry holding it is a training step's


def step_series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the training steps of `history` (entries without it are skipped)."""
    steps, values = [], []
    for entry in history:
        if STEP_KEY in entry and key in entry and entry[key] is not None and not _nan(entry[key]):
            steps.append(int(entry["step"]))
            values.append(float(entry[key]))
    return steps, values


def running_mean(values: Sequence[float], width: int) -> list[float]:
    """Mean of each value and the `width` − 1 before it (fewer at the start)."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def quarter_means(values: Sequence[float]) -> tuple[float, float]:
    """Mean of the first and of the last quarter of `values` (at least one value each)."""
    if not values:
        return math.nan, math.nan
    q = max(1, len(values) // 4)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def plot_learning_curve(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str = "",
    format_key: str | None = None,
    correct_key: str | None = None,
) -> Path:
    """Write the three panels (module docstring) as a PNG at `path`; return it. `format_key` / `correct_key`:
    log keys of the per-step share of well-formatted / correct completions, drawn on the reward panel."""
    from ..extras import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, reward = step_series(history, "reward")
    if not steps:
        raise ValueError("the history holds no training step (no 'reward' entry)")
    fig, (ax_r, ax_t, ax_b) = plt.subplots(1, 3, figsize=(15, 4.4), constrained_layout=True)
    width = max(2, len(steps) // 5)
    ax_r.plot(steps, reward, "o", color="#1f77b4", alpha=0.45, label="mean reward (step)")
    ax_r.plot(steps, running_mean(reward, width), "-", color="#1f77b4", lw=2.2, label=f"running mean ({width} steps)")
    for key, label, color in ((format_key, "valid format", "#2ca02c"), (correct_key, "correct answer", "#d62728")):
        if key:
            s, v = step_series(history, key)
            if s:
                ax_r.plot(s, running_mean(v, width), "--", color=color, lw=1.6, label=f"{label} (share, running)")
    first, last = quarter_means(reward)
    ax_r.set_title(f"reward: first quarter {first:+.2f} → last quarter {last:+.2f}")
    ax_r.set_xlabel("step")
    ax_r.axhline(0, color="grey", lw=0.6)
    ax_r.legend(fontsize=8, loc="lower right")

    _count_panel(ax_t, history, "tool use (shared prefixes run their calls once)", (
        ("tools/calls_per_completion", "tool calls / completion", "#9467bd"),
        ("tools/executions_per_completion", "unique executions / completion", "#8c564b"),
    ))  # fmt: skip
    _count_panel(ax_b, history, "ARPO's tree: what filled the M − N free slots", (
        ("arpo/branches_per_group", "branches / group", "#ff7f0e"),
        ("arpo/fresh_rollouts_per_group", "fresh rollouts / group", "#7f7f7f"),
    ))  # fmt: skip
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_r, ax_t, ax_b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _count_panel(
    ax: Any, history: Sequence[Mapping[str, Any]], title: str, series: tuple[tuple[str, str, str], ...]
) -> None:
    """One panel of per-step counts (from 0): each (metric key, label, colour) that was logged, as a line."""
    for key, label, color in series:
        s, v = step_series(history, key)
        if s:
            ax.plot(s, v, "o-", color=color, ms=3.5, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
