"""Render rollout trees to one self-contained HTML file: inline SVG, inline CSS, a few lines of inline script.

Nothing is fetched: no fonts, scripts, stylesheets or images from anywhere, so the file opens offline, inside
wandb's HTML panel, or attached to a bug report. Every piece of model or tool text is HTML-escaped.

Per prompt (group) the page shows:

- an SVG tree, left to right: the prompt (one box per distinct prompt when the rows of the group start from
  different ones, e.g. an environment's random reset observations), then one box per segment (see `arpo_trl.viz.trees`): the start of the
  text the model sampled, the tool it called, H_t and ΔH_t = H_t − H_initial of the branching decision taken
  after its result, the probability P_t = clip(α + β·ΔH_t, 0, 1) and whether it forked; a fork edge is drawn
  dashed orange. Every row ends in a leaf box with its reward R_i, its soft advantage Â_i and its hard
  advantage Â^hard (mean over the sampled tokens of its last segment). Box borders are red where the entropy
  rose after the tool result (ΔH > 0), blue where it fell.
- below, one collapsible card per segment with the full text, the tool call and result, the decision and, when
  per-token entropies were recorded, an entropy sparkline; then a table of the M rows.

Clicking a box opens its card.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..rollout.trajectory import Trajectory
from .trees import GroupTree, Leaf, TreeNode, build_trees

NODE_W, NODE_H, LEAF_W, LEAF_H = 236, 100, 200, 72
COL, ROW, PAD = 286, 110, 16
PROMPT_FILL = "#1f4e79"  # the prompt box (also the colour the browser test looks for)
RISE, FALL, NEUTRAL = "#c0392b", "#2471a3", "#7f8c8d"
FORK = "#e67e22"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 6px} h2{font-size:16px;margin:22px 0 6px;border-top:1px solid #ddd;padding-top:10px}
h4{margin:8px 0 2px;font-size:12px;color:#555} ul{font-size:13px;margin:4px 0}
.meta span{display:inline-block;background:#f2f4f7;border-radius:4px;padding:1px 6px;margin:2px 4px 2px 0;font-size:12px}
.legend{font-size:12px;color:#444;margin:6px 0}
.scroll{overflow-x:auto;border:1px solid #e5e5e5;border-radius:6px;background:#fcfcfd}
svg text{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:11px}
svg .title{font-weight:bold} svg a{cursor:pointer}
details.card{border:1px solid #ddd;border-radius:6px;margin:4px 0;padding:2px 8px;background:#fff}
details.card:target{outline:2px solid #e67e22}
details.card summary{cursor:pointer;font-size:13px}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f9;padding:6px;border-radius:4px;font-size:12px;margin:2px 0}
pre.result{background:#eef6ee}
table.rows{border-collapse:collapse;font-size:12px;margin-top:6px}
table.rows td,table.rows th{border:1px solid #ddd;padding:2px 6px;text-align:right}
button{font-size:12px;margin-right:6px}
"""

_SCRIPT = """
document.querySelectorAll('a.nodelink').forEach(function(a){a.addEventListener('click',function(){
var d=document.getElementById(a.getAttribute('href').slice(1));if(d){d.open=true;}});});
function setAll(v){document.querySelectorAll('details.card').forEach(function(d){d.open=v;});}
"""

Decode = Callable[[Sequence[int]], str]


def _decoder(tokenizer: Any | None) -> Decode:
    if tokenizer is None:
        return lambda ids: " ".join(str(i) for i in ids)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _snippet(text: str, width: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def _f(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _hard_text(r: tuple[float, float] | None) -> str:
    if r is None:
        return "—"
    lo, hi = r
    return _f(lo, True) if abs(hi - lo) < 5e-4 else f"{lo:+.2f}…{hi:+.2f}"


def _mix(a: str, b: str, t: float) -> str:
    ca = [int(a[i : i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


# ---------------------------------------------------------------------------------------------------- layout


def _layout(tree: GroupTree) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]], float, float]:
    """Tidy left-to-right layout: leaves stacked in the last column, a node centred on its children."""
    node_xy: dict[int, tuple[float, float]] = {}
    leaf_xy: dict[int, tuple[float, float]] = {}
    leaf_col = tree.depth + 1
    next_row = [0]
    leaves_by_node: dict[int, list[Leaf]] = {}
    for leaf in tree.leaves:
        leaves_by_node.setdefault(leaf.node.id, []).append(leaf)

    def place(node: TreeNode) -> float:
        ys = [place(child) for child in node.children]
        for leaf in leaves_by_node.get(node.id, []):
            y = PAD + next_row[0] * ROW
            next_row[0] += 1
            leaf_xy[leaf.slot] = (PAD + leaf_col * COL, y)
            ys.append(y)
        y = (min(ys) + max(ys)) / 2 if ys else PAD + next_row[0] * ROW
        node_xy[node.id] = (PAD + node.depth * COL, y)
        return y

    # A prompt's box (key −1 − its index) is centred on the roots that continue it.
    root_ys: dict[int, list[float]] = {}
    for root in tree.roots:
        root_ys.setdefault(root.prompt, []).append(place(root))
    for p in range(len(tree.prompts)):
        ys = root_ys.get(p) or [PAD]
        node_xy[-1 - p] = (PAD, (min(ys) + max(ys)) / 2)
    width = PAD * 2 + leaf_col * COL + LEAF_W
    height = PAD * 2 + max(1, next_row[0]) * ROW
    return node_xy, leaf_xy, width, height


# ---------------------------------------------------------------------------------------------------- SVG


def _prompt_label(tree: GroupTree, p: int) -> str:
    """Which of the group's distinct prompts `p` is ("2/3 "); empty when the group has one."""
    return f"{p + 1}/{len(tree.prompts)} " if len(tree.prompts) > 1 else ""


def _prompt_anchor(tree: GroupTree, p: int) -> str:
    return "prompt" if len(tree.prompts) == 1 else f"prompt{p}"


def _edge(x1: float, y1: float, x2: float, y2: float, style: str, label: str = "") -> str:
    mx = (x1 + x2) / 2
    out = f'<path d="M{x1:.0f},{y1:.0f} C{mx:.0f},{y1:.0f} {mx:.0f},{y2:.0f} {x2:.0f},{y2:.0f}" {style}/>'
    if label:
        out += f'<text x="{x2 - 40:.0f}" y="{y2 - 5:.0f}" fill="{FORK}">{_e(label)}</text>'
    return out


def _text_lines(x: float, y: float, lines: Sequence[tuple[str, str]]) -> str:
    """lines: (css class or '', text); one <text> element with a <tspan> per line."""
    spans = "".join(
        f'<tspan x="{x + 8:.0f}" dy="{14 if i else 0}"{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>{_e(t)}</tspan>'
        for i, (cls, t) in enumerate(lines)
    )
    return f'<text x="{x + 8:.0f}" y="{y + 16:.0f}">{spans}</text>'


def _node_lines(node: TreeNode, decode: Decode) -> tuple[list[tuple[str, str]], str, str]:
    """The lines of a segment box, its full text (tooltip) and its border colour."""
    sampled, result = decode(node.sampled_ids), decode(node.result_ids)
    tool = ", ".join(e.name + (" ✗" if e.error else "") + (" ⏱" if e.timed_out else "") for e in node.tool_events) or (
        "answer" if not node.result_ids else "(tool)"
    )
    tag = "· branch" if node.forked else f"· {node.origin_kind}" if node.depth == 1 else ""
    lines: list[tuple[str, str]] = [("title", f"#{node.id} {tool} {tag}".rstrip()), ("", _snippet(sampled, 32))]
    h = []
    if node.h_initial is not None:
        h.append(f"H_initial {_f(node.h_initial)}")
    if node.h_window is not None:
        h.append(f"H_k {_f(node.h_window)}")
    lines.append(("", "  ".join(h) or "H —"))
    border = NEUTRAL
    if node.decisions:
        d = node.decisions[0]
        lines.append(("", f"H_t {_f(d.h_t)}  ΔH {_f(d.event.delta_h, True)}"))
        verdict = f"fork ×{len(d.event.forked_slots)}" if d.forked else "no fork"
        lines.append(("", f"P {_f(d.event.probability)} → {verdict}"))
        if d.event.consecutive or d.event.penalty:  # AEPO's consecutive-branch penalty
            lines.append(("", f"c {d.event.consecutive}  P̂ {_f(d.event.penalty)}"))
        border = RISE if d.event.delta_h > 0 else FALL if d.event.delta_h < 0 else NEUTRAL
    else:
        lines.append(("", "no decision" if node.result_ids else "final segment"))
        lines.append(("", ""))
    lines.append(("", f"Â_hard {_hard_text(node.hard_range)}"))
    tip = sampled + (f"\n── result ──\n{result}" if result else "")
    return lines, tip, border


def _group_svg(tree: GroupTree, decode: Decode, anchor: str) -> str:
    node_xy, leaf_xy, width, height = _layout(tree)
    rewards = [leaf.reward for leaf in tree.leaves]
    lo, hi = (min(rewards), max(rewards)) if rewards else (0.0, 0.0)
    parts = [f'<svg class="tree" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">']
    edges, boxes = [], []
    by_id = {n.id: n for n in tree.nodes}
    for node in tree.nodes:
        x, y = node_xy[node.id]
        if node.parent is None:
            px, py = node_xy[-1 - node.prompt]
            sx, sy = px + NODE_W, py + NODE_H / 2
            style = 'fill="none" stroke="#95a5a6" stroke-width="1.5"'
            if node.origin_kind == "fresh":
                style += ' stroke-dasharray="3,3"'
            edges.append(_edge(sx, sy, x, y + NODE_H / 2, style, "fresh" if node.origin_kind == "fresh" else ""))
        else:
            qx, qy = node_xy[node.parent.id]
            if node.forked:
                style = f'fill="none" stroke="{FORK}" stroke-width="2" stroke-dasharray="6,4"'
                edges.append(_edge(qx + NODE_W, qy + NODE_H / 2, x, y + NODE_H / 2, style, "fork"))
            else:
                style = 'fill="none" stroke="#95a5a6" stroke-width="1.5"'
                edges.append(_edge(qx + NODE_W, qy + NODE_H / 2, x, y + NODE_H / 2, style))
        lines, tip, border = _node_lines(node, decode)
        width_px = 3 if node.decisions else 1.5
        marker = ""
        if node.decisions:
            d = node.decisions[0]
            fill = FORK if d.forked else "#fff"
            cx, cy = x + NODE_W, y + NODE_H / 2
            marker = (
                f'<path d="M{cx - 6:.0f},{cy:.0f} L{cx:.0f},{cy - 6:.0f} L{cx + 6:.0f},{cy:.0f} L{cx:.0f},{cy + 6:.0f} Z" '
                f'fill="{fill}" stroke="{FORK}" stroke-width="1.5"/>'
            )
        boxes.append(
            f'<g class="node" data-node="{node.id}" data-depth="{node.depth}" data-rows="{_e(",".join(map(str, node.rows)))}">'
            f'<a class="nodelink" href="#{anchor}n{node.id}"><title>{_e(tip)}</title>'
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="#fff" stroke="{border}" '
            f'stroke-width="{width_px}"/>{_text_lines(x, y, lines)}</a>{marker}</g>'
        )
    for leaf in tree.leaves:
        x, y = leaf_xy[leaf.slot]
        nx, ny = node_xy[leaf.node.id] if leaf.node.id in by_id else node_xy[-1 - leaf.prompt]
        edges.append(
            _edge(
                nx + NODE_W,
                ny + NODE_H / 2,
                x,
                y + LEAF_H / 2,
                'fill="none" stroke="#bdc3c7" stroke-width="1" stroke-dasharray="2,3"',
            )
        )
        t = 0.5 if hi - lo < 1e-12 else (leaf.reward - lo) / (hi - lo)
        fill = _mix("#f5b7b1", "#abebc6", t)
        lines = [
            ("title", f"slot {leaf.slot} · {leaf.kind} · {leaf.finish_reason or '?'}"),
            ("", f"R       {_f(leaf.reward)}"),
            ("", f"Â soft  {_f(leaf.advantage, True)}"),
            ("", f"Â hard  {_f(leaf.hard_last, True)}"),
        ]
        boxes.append(
            f'<g class="leaf" data-slot="{leaf.slot}" data-reward="{leaf.reward!r}" data-advantage="{leaf.advantage!r}" '
            f'data-hard="{leaf.hard_last!r}"><a class="nodelink" href="#{anchor}rows">'
            f"<title>{_e(f'slot {leaf.slot}: {leaf.length} tokens, {leaf.tool_calls} tool calls')}</title>"
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{LEAF_W}" height="{LEAF_H}" rx="6" fill="{fill}" stroke="#555" '
            f'stroke-width="1"/>{_text_lines(x, y, lines)}</a></g>'
        )
    for p, prompt in enumerate(tree.prompts):
        px, py = node_xy[-1 - p]
        prompt_text = decode(prompt)
        tail = _snippet(re.sub(r"<\|[^|>]*\|>", " ", prompt_text), 10**9)[-64:]
        rows = sum(leaf.prompt == p for leaf in tree.leaves)
        segments = sum(node.prompt == p for node in tree.nodes)
        title = f"prompt {_prompt_label(tree, p)}· group {tree.group}"
        boxes.append(
            f'<g class="prompt" data-prompt="{p}"><a class="nodelink" href="#{anchor}{_prompt_anchor(tree, p)}">'
            f"<title>{_e(prompt_text)}</title>"
            f'<rect x="{px:.0f}" y="{py:.0f}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{PROMPT_FILL}"/>'
            f'<text x="{px + 8:.0f}" y="{py + 18:.0f}" fill="#fff" class="title">{_e(title)}</text>'
            f'<text x="{px + 8:.0f}" y="{py + 38:.0f}" fill="#fff">{_e(tail[:32])}</text>'
            f'<text x="{px + 8:.0f}" y="{py + 54:.0f}" fill="#fff">{_e(tail[32:])}</text>'
            f'<text x="{px + 8:.0f}" y="{py + 74:.0f}" fill="#fff">{rows} rows · {segments} segments</text>'
            "</a></g>"
        )
    parts += edges + boxes + ["</svg>"]
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------- cards


def _sparkline(values: Sequence[float], mask: Sequence[int]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return ""
    w, h, n = 420, 48, len(values)
    top = max(finite) or 1.0
    step = w / max(1, n)
    bands = "".join(
        f'<rect x="{i * step:.1f}" y="0" width="{step + 0.2:.1f}" height="{h}" fill="#dfeedd"/>'
        for i, m in enumerate(mask)
        if not m
    )
    pts = " ".join(
        f"{(i + 0.5) * step:.1f},{h - 2 - (v / top) * (h - 6):.1f}" for i, v in enumerate(values) if not math.isnan(v)
    )
    return (
        f'<svg class="spark" width="{w}" height="{h}" viewBox="0 0 {w} {h}"><rect width="{w}" height="{h}" fill="#fafafa"/>'
        f'{bands}<polyline points="{pts}" fill="none" stroke="{RISE}" stroke-width="1.2"/>'
        f'<text x="4" y="11">max {top:.2f} nats</text></svg>'
    )


def _card(node: TreeNode, decode: Decode, anchor: str) -> str:
    tool = ", ".join(
        f"{e.name}{' (error)' if e.error else ''}{' (timed out)' if e.timed_out else ''}" for e in node.tool_events
    )
    summary = (
        f"<b>#{node.id}</b> depth {node.depth} · tokens {node.start}–{node.end} · rows {_e(node.rows)} · "
        f"created by slot {node.origin_slot} ({_e(node.origin_kind)}{', fork' if node.forked else ''})"
        + (f" · tool {_e(tool)}" if tool else "")
    )
    body = []
    facts = []
    if node.h_initial is not None:
        facts.append(f"H_initial = {_f(node.h_initial)}")
    if node.h_window is not None:
        facts.append(f"H of its first k sampled tokens = {_f(node.h_window)}")
    for d in node.decisions:
        verdict = f"fork → slots {d.event.forked_slots}" if d.forked else "no fork"
        facts.append(
            f"after the result (slot {d.slot}): H_t = {_f(d.h_t)}, ΔH = {_f(d.event.delta_h, True)}, "
            f"P = {_f(d.event.probability)} → {verdict}"
            + (
                f" (AEPO: {d.event.consecutive} consecutive forking rounds before it, penalty P̂ = {_f(d.event.penalty)})"
                if d.event.consecutive or d.event.penalty
                else ""
            )
        )
    facts.append(f"Â_hard over its sampled tokens: {_hard_text(node.hard_range)}")
    body.append("<ul>" + "".join(f"<li>{_e(f)}</li>" for f in facts) + "</ul>")
    body.append(
        f'<h4>Model text ({len(node.sampled_ids)} tokens)</h4><pre class="model">{_e(decode(node.sampled_ids))}</pre>'
    )
    if node.result_ids:
        body.append(
            f"<h4>Tool result ({len(node.result_ids)} tokens, not trained on)</h4>"
            f'<pre class="result">{_e(decode(node.result_ids))}</pre>'
        )
    if node.token_entropies is not None:
        body.append("<h4>Per-token entropy (green: tool result)</h4>" + _sparkline(node.token_entropies, node.mask))
    return f'<details class="card" id="{anchor}n{node.id}"><summary>{summary}</summary>{"".join(body)}</details>'


def _rows_table(tree: GroupTree, anchor: str) -> str:
    head = [
        "slot",
        "kind",
        "parent",
        "fork at",
        "finish",
        "tokens",
        "tool calls",
        "R",
        "Â soft",
        "Â hard (last seg.)",
        "Â hard (mean)",
    ]
    rows = []
    for leaf in tree.leaves:
        cells = [
            leaf.slot,
            leaf.kind,
            "" if leaf.parent is None else leaf.parent,
            "" if leaf.fork_position is None else leaf.fork_position,
            leaf.finish_reason or "",
            leaf.length,
            leaf.tool_calls,
            _f(leaf.reward),
            _f(leaf.advantage, True),
            _f(leaf.hard_last, True),
            _f(leaf.hard_mean, True),
        ]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return (
        f'<table class="rows" id="{anchor}rows"><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )


def tree_html(
    trees: Sequence[GroupTree],
    tokenizer: Any | None = None,
    *,
    title: str = "ARPO rollout trees",
    meta: Mapping[str, Any] | None = None,
) -> str:
    """The whole page for `trees` (see the module docstring); `meta` is shown as key/value chips."""
    decode = _decoder(tokenizer)
    chips = "".join(f"<span>{_e(k)}: {_e(v)}</span>" for k, v in (meta or {}).items())
    legend = (
        "Boxes are segments (sampled text up to a tool call, then its result). H_t: entropy of the k tokens after "
        "the result; ΔH = H_t − H_initial; P = clip(α + β·ΔH, 0, 1); H_k (when token entropies were recorded): "
        "H of the segment's own first k tokens (window values on the run's entropy_normalization scale). Border "
        "red: ΔH > 0, blue: ΔH < 0; diamond: a branching decision (filled: forked). Dashed orange edge: a fork. "
        "Leaves: R, soft Â, hard Â (coloured by R within the group). Click a box for its text."
    )
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="meta">{chips}</div>',
        f'<p class="legend">{_e(legend)}</p>',
        '<button type="button" onclick="setAll(true)">expand all</button>'
        '<button type="button" onclick="setAll(false)">collapse all</button>',
    ]
    for tree in trees:
        anchor = f"g{tree.group}"
        out.append(f'<section class="group" id="{anchor}"><h2>Prompt {tree.group}</h2>')
        for p, prompt in enumerate(tree.prompts):
            slots = [leaf.slot for leaf in tree.leaves if leaf.prompt == p]
            whose = f", slots {_e(slots)}" if len(tree.prompts) > 1 else ""
            out.append(
                f'<details class="card" id="{anchor}{_prompt_anchor(tree, p)}"><summary>prompt '
                f"{_e(_prompt_label(tree, p))}({len(prompt)} tokens{whose})</summary>"
                f"<pre>{_e(decode(prompt))}</pre></details>"
            )
        out.append(f'<div class="scroll">{_group_svg(tree, decode, anchor)}</div>')
        out.append(_rows_table(tree, anchor))
        out.extend(_card(node, decode, anchor) for node in tree.nodes)
        out.append("</section>")
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(out)


def render_tree(
    rollout: Any,
    tokenizer: Any | None,
    rewards: Sequence[float] | torch.Tensor,
    advantages: Sequence[float] | torch.Tensor,
    path: str | Path,
    *,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    groups: Sequence[int] | None = None,
    token_entropies: Sequence[Sequence[float] | None] | None = None,
    entropy_window: int = 20,
    entropy_normalization: str = "sum_lnV",
    vocab_size: int | None = None,
    title: str = "ARPO rollout trees",
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write the rollout trees of a batch to `path` (a self-contained HTML file) and return the path.

    Args:
        rollout: a `RolloutResult` (what `ARPOTrainer.on_rollout` receives) or the batch's trajectories in slot order.
        tokenizer: decodes token ids (None: ids are shown as numbers).
        rewards: (B,) rewards R_i of the rows.
        advantages: (B,) sequence-level advantages Â_i (what soft attribution trains every token with); the hard
            ones, Â^hard_{i,t} (mean over the rows sharing the prefix up to t), are computed here.
        path: where to write the file (parent folders are created).
        prompt_ids: the B prompts, when `rollout` is a list of trajectories.
        groups: which prompts (groups) to draw; default all.
        token_entropies: optional per-row entropies of every completion token (NaN on tool-result tokens); by
            default each trajectory's ``token_entropies`` attribute is used when present.
        entropy_window, entropy_normalization, vocab_size: k, the window normalization and V, used to turn
            recorded token entropies into window values (H_initial, H_t) as the trainer does.
        title, meta: page title and key/value chips (step, α, β, …).
    """
    trajectories: Sequence[Trajectory]
    if hasattr(rollout, "trajectories"):
        trajectories = rollout.trajectories
        prompt_ids = rollout.prompt_ids if prompt_ids is None else prompt_ids
        stats = getattr(rollout, "stats", None)
        if stats is not None:
            meta = {
                **(meta or {}),
                "branches": stats.branches,
                "fresh": stats.fresh,
                "duplicates": stats.duplicates,
                "rounds": stats.rounds,
                "tool executions": stats.tool_executions,
                "tool errors": stats.tool_errors,
            }
    else:
        trajectories = list(rollout)
    if prompt_ids is None:
        raise ValueError("prompt_ids is required when `rollout` is a list of trajectories")
    trees = build_trees(
        trajectories,
        prompt_ids,
        rewards,
        advantages,
        groups=groups,
        token_entropies=token_entropies,
        entropy_window=entropy_window,
        entropy_normalization=entropy_normalization,
        vocab_size=vocab_size,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tree_html(trees, tokenizer, title=title, meta=meta), encoding="utf-8")
    return path
