"""Per-token entropy by position relative to tool results (the observation behind ARPO, paper §2.2 / Fig. 1).

ARPO's premise: right after a tool result enters the context, the model's next-token entropy rises; ARPO branches
where it does. For each sampled token with entropy H_t = −Σ_j p_{t,j} log p_{t,j} (p_t = softmax(z_t / T)), its
position is classified by the tool results of its trajectory:

- ``before_first_call``: tokens sampled before the first tool result (offset from the completion's start);
- ``after_result``: the first k tokens after a tool result (offset 0 = the first token sampled after it), pooled
  over all results, and per ordinal (``after_result_1``, ``after_result_2``, ``after_result_3+``);
- ``later``: tokens at offset ≥ k after a result (until the next call);
- ``no_tool_call``: trajectories that never called a tool (offset from the start);
- ``aligned``: every result boundary, offsets −k…−1 (the tokens before the result: the call itself) and 0…2k−1.

The paper's window quantities are reported too: H_initial (first k sampled tokens of a trajectory), H_t (first k
sampled tokens after tool result t) and ΔH_t = H_t − H_initial, each window reduced per ``normalization``
(`arpo_trl.rollout.entropy.window_entropy`; default ``"mean"``, nats per token).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..rollout.entropy import window_entropy


@dataclass
class SampleRecord:
    """One sampled trajectory with per-token entropies (NaN on environment tokens)."""

    prompt_index: int
    sample: int
    prompt_ids: list[int]
    completion_ids: list[int]
    tool_mask: list[int]
    entropies: list[float]
    result_spans: list[tuple[int, int]]  # [start, end) of each tool result (end: where the model resumes)
    finish_reason: str | None = None
    text: str = ""


def result_spans(tool_mask: Sequence[int], positions: Iterable[int]) -> list[tuple[int, int]]:
    """[start, end) of the environment block starting at each tool-event position (duplicates merged)."""
    spans = []
    for start in sorted(set(positions)):
        end = start
        while end < len(tool_mask) and tool_mask[end] == 0:
            end += 1
        spans.append((start, end))
    return spans


@dataclass
class _Acc:
    """Running sums per offset."""

    n: list[int] = field(default_factory=list)
    s: list[float] = field(default_factory=list)
    s2: list[float] = field(default_factory=list)

    def add(self, offset: int, value: float) -> None:
        while len(self.n) <= offset:
            self.n.append(0)
            self.s.append(0.0)
            self.s2.append(0.0)
        self.n[offset] += 1
        self.s[offset] += value
        self.s2[offset] += value * value

    def curve(self, first_offset: int = 0) -> dict[str, list[Any]]:
        mean, std = [], []
        for n, s, s2 in zip(self.n, self.s, self.s2):
            m = s / n if n else None
            mean.append(m)
            std.append(math.sqrt(max(0.0, s2 / n - m * m)) if n else None)
        return {
            "offset": list(range(first_offset, first_offset + len(self.n))),
            "mean": mean,
            "std": std,
            "count": list(self.n),
        }

    def total(self) -> tuple[int, float]:
        return sum(self.n), sum(self.s)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def entropy_profile(
    records: Sequence[SampleRecord],
    k: int = 20,
    max_offset: int = 128,
    normalization: str = "mean",
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Curves (mean, std, count per offset) and summary numbers; see the module docstring for the categories."""
    accs = {
        name: _Acc()
        for name in (
            "before_first_call",
            "after_result",
            "after_result_1",
            "after_result_2",
            "after_result_3+",
            "later",
            "no_tool_call",
        )
    }
    aligned = _Acc()  # offsets shifted by +k
    h_initial, h_t, delta = [], [], []
    for rec in records:
        sampled = [i for i, m in enumerate(rec.tool_mask) if m and not math.isnan(rec.entropies[i])]
        ent = rec.entropies
        if sampled:
            h0 = window_entropy([ent[i] for i in sampled], k, normalization, vocab_size or 1)
            h_initial.append(h0)
        else:
            h0 = None
        if not rec.result_spans:
            for j, i in enumerate(sampled[:max_offset]):
                accs["no_tool_call"].add(j, ent[i])
            continue
        first_start = rec.result_spans[0][0]
        before = [i for i in sampled if i < first_start]
        for j, i in enumerate(before[:max_offset]):
            accs["before_first_call"].add(j, ent[i])
        prev_end = 0
        for r, (start, end) in enumerate(rec.result_spans):
            nxt = rec.result_spans[r + 1][0] if r + 1 < len(rec.result_spans) else len(rec.tool_mask)
            pre = [i for i in sampled if prev_end <= i < start]
            post = [i for i in sampled if end <= i < nxt]
            for j, i in enumerate(reversed(pre[-k:])):
                aligned.add(k - 1 - j, ent[i])
            for j, i in enumerate(post[: 2 * k]):
                aligned.add(k + j, ent[i])
            ordinal = "after_result_1" if r == 0 else "after_result_2" if r == 1 else "after_result_3+"
            for j, i in enumerate(post):
                if j < k:
                    accs["after_result"].add(j, ent[i])
                    accs[ordinal].add(j, ent[i])
                elif j - k < max_offset:
                    accs["later"].add(j - k, ent[i])
            if post:
                window = window_entropy([ent[i] for i in post], k, normalization, vocab_size or 1)
                h_t.append(window)
                if h0 is not None:
                    delta.append(window - h0)
            prev_end = end

    curves = {name: acc.curve() for name, acc in accs.items()}
    curves["aligned"] = aligned.curve(first_offset=-k)
    summary: dict[str, Any] = {}
    for name, acc in accs.items():
        n, s = acc.total()
        summary[f"{name}_tokens"] = n
        summary[f"{name}_mean"] = s / n if n else None
    summary.update(
        trajectories=len(records),
        with_tool_call=sum(bool(r.result_spans) for r in records),
        tool_results=sum(len(r.result_spans) for r in records),
        h_initial_mean=_mean(h_initial),
        h_t_mean=_mean(h_t),
        delta_h_mean=_mean(delta),
        delta_h_positive_fraction=_mean([float(d > 0) for d in delta]),
        delta_h_count=len(delta),
    )
    return {"window": k, "normalization": normalization, "curves": curves, "summary": summary}


def plot_profile(profile: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Two panels: entropy aligned on tool-result boundaries; curves by category. Written as PNG."""
    from ..extras import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, summary, k = profile["curves"], profile["summary"], profile["window"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)

    def draw(ax: Any, curve: dict[str, list[Any]], label: str, color: str, limit: int | None = None) -> None:
        pts = [
            (o, m, s, n)
            for o, m, s, n in zip(curve["offset"], curve["mean"], curve["std"], curve["count"])
            if m is not None and (limit is None or o < limit)
        ]
        if not pts:
            return
        xs = [p[0] for p in pts]
        ms = [p[1] for p in pts]
        sem = [p[2] / math.sqrt(p[3]) if p[3] > 1 else 0.0 for p in pts]
        ax.plot(xs, ms, color=color, label=label, lw=1.8, marker="." if len(xs) < 80 else None)
        ax.fill_between(xs, [m - e for m, e in zip(ms, sem)], [m + e for m, e in zip(ms, sem)], color=color, alpha=0.15)

    draw(left, curves["aligned"], "all tool results (±1 s.e.)", "#c0392b")
    left.axvline(-0.5, color="#27ae60", lw=2, label="tool result (not sampled)")
    if summary.get("before_first_call_mean") is not None:
        left.axhline(summary["before_first_call_mean"], color="#2471a3", ls="--", lw=1, label="mean before first call")
    if summary.get("later_mean") is not None:
        left.axhline(summary["later_mean"], color="#7f8c8d", ls=":", lw=1.2, label=f"mean ≥ {k} tokens after")
    left.set_xlabel("sampled tokens relative to the end of a tool result (0 = first token after it)")
    left.set_ylabel("token entropy H (nats)")
    left.set_title("Entropy around tool results")
    left.legend(fontsize=8)

    span = max(2 * k, 32)
    draw(right, curves["before_first_call"], "before the first call", "#2471a3", span)
    draw(right, curves["after_result_1"], "after result 1", "#c0392b", span)
    draw(right, curves["after_result_2"], "after result 2", "#e67e22", span)
    draw(right, curves["after_result_3+"], "after result 3+", "#8e44ad", span)
    draw(right, curves["later"], f"after a result, offset ≥ {k} (x = offset − {k})", "#7f8c8d", span)
    draw(right, curves["no_tool_call"], "trajectories without tool calls", "#16a085", span)
    right.set_xlabel("offset (sampled tokens)")
    right.set_ylabel("token entropy H (nats)")
    right.set_title("Entropy by position and category")
    right.legend(fontsize=8)

    stats = (
        f"{summary['trajectories']} trajectories, {summary['tool_results']} tool results; "
        f"window k={k} ({profile['normalization']}): H_initial {_fmt(summary['h_initial_mean'])}, "
        f"H_t {_fmt(summary['h_t_mean'])}, mean ΔH {_fmt(summary['delta_h_mean'], True)} "
        f"(ΔH > 0 in {_fmt_pct(summary['delta_h_positive_fraction'])})"
    )
    fig.suptitle((title + "\n" if title else "") + stats, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: float | None, signed: bool = False) -> str:
    return "—" if x is None else (f"{x:+.3f}" if signed else f"{x:.3f}")


def _fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"
