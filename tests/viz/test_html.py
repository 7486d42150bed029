"""The rollout-tree page: well-formed, self-contained, escaped, faithful to the data, and drawn by a real browser."""

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
import torch
from viz_fixtures import hand_group

from arpo_trl.advantages import hard_attribution
from arpo_trl.viz import build_trees, render_tree
from arpo_trl.viz.html import PROMPT_FILL

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source", "track", "embed", "param"}
SVG_SELF_CLOSING = {"rect", "path", "polyline", "circle", "line", "ellipse", "polygon"}
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "h4", "div", "p", "span", "button", "section",
    "details", "summary", "pre", "ul", "li", "b", "table", "tr", "th", "td", "script", "svg", "g", "a", "rect",
    "text", "tspan", "path", "polyline",
}  # fmt: skip
URL_ATTRS = {"src", "href", "xlink:href", "action", "formaction", "poster", "data", "background", "srcset"}


class StrictParser(HTMLParser):
    """Checks that every element is closed in order and collects tags, attributes and script bodies."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.attrs, self.errors, self.scripts = [], [], [], [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)
        self._in_script = tag == "script"

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.append((tag, dict(attrs)))
        if tag not in VOID and tag not in SVG_SELF_CLOSING:
            self.errors.append(f"self-closed <{tag}/>")

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def parse(page: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return parser


def assert_self_contained(parser: StrictParser, page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert set(parser.tags) <= ALLOWED_TAGS, set(parser.tags) - ALLOWED_TAGS  # no img, link, iframe, object …
    for tag, attrs in parser.attrs:
        for name, value in attrs.items():
            if name in URL_ATTRS:
                assert value is not None and value.startswith("#"), (tag, name, value)  # in-page anchors only
            assert not name.startswith("on") or tag == "button", (tag, name)
            assert "url(" not in (value or "").lower(), (tag, name, value)
        if tag == "script":
            assert "src" not in attrs
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert all("url(" not in s and "@import" not in s for s in styles)
    for script in parser.scripts:  # the inline script loads nothing
        assert not re.search(r"fetch|XMLHttpRequest|import\(|https?:|createElement", script)


def svgs(page: str) -> list[ET.Element]:
    """Each inline <svg> parsed as XML: well-formed, not merely tolerated by a lenient HTML parser."""
    return [ET.fromstring(m) for m in re.findall(r"<svg class=\"tree\".*?</svg>", page, re.S)]


def test_hand_made_page_is_valid_self_contained_and_shows_the_numbers(tokenizer, tmp_path):
    evil = '<script>alert("x")</script></details></svg><img src="https://evil.example/p.png"> & http://x.test'
    trajs, prompts, _ = hand_group(tokenizer, result_text=evil)
    rewards, advantages = [1.0, 0.0, 0.7, 0.2], torch.tensor([1.0, -1.0, 0.5, -0.5])
    path = render_tree(trajs, tokenizer, rewards, advantages, tmp_path / "deep" / "t.html", prompt_ids=prompts,
                       meta={"step": 7, "α": 1.0, "β": 0.0})  # fmt: skip
    page = path.read_text(encoding="utf-8")
    parser = parse(page)
    assert_self_contained(parser, page)
    assert parser.tags.count("script") == 1  # ours; the tool's was escaped
    assert "&lt;script&gt;alert(" in page and '<script>alert("x")' not in page
    (svg,) = svgs(page)
    nodes = svg.findall(".//g[@class='node']")
    leaves = svg.findall(".//g[@class='leaf']")
    assert len(nodes) == 5 and len(leaves) == 4
    assert [float(g.get("data-advantage")) for g in leaves] == [1.0, -1.0, 0.5, -0.5]
    assert [float(g.get("data-reward")) for g in leaves] == rewards
    hard = {int(g.get("data-slot")): float(g.get("data-hard")) for g in leaves}
    assert hard == pytest.approx({0: 1.0, 1: -1.0, 2: 0.0, 3: 0.0})
    text = " ".join("".join(t.itertext()) for t in svg.iter("text"))
    for expected in ("H_t 0.800", "ΔH +0.300", "P 0.800 → fork ×1", "H_t 0.300", "ΔH -0.200", "P 0.300 → no fork",
                     "H_initial 0.500", "calc ✗", "· branch", "· fresh", "Â soft  -1.000", "Â hard  +0.000"):  # fmt: skip
        assert expected in text, expected
    # every box links to its card; every card holds the full text
    for g in nodes:
        (link,) = g.findall("a")
        anchor = link.get("href")[1:]
        assert f'id="{anchor}"' in page
    assert page.count('<details class="card"') == 5 + 1  # segments + the prompt
    assert "step: 7" in page and "α: 1.0" in page


def test_real_rollout_page_matches_the_batch(branching_batch, tokenizer, tmp_path):
    from arpo_trl.rollout.backends import RolloutResult

    batch, rewards, advantages = branching_batch
    record = RolloutResult(batch.trajectories, batch.stats)
    path = render_tree(record, tokenizer, rewards, advantages, tmp_path / "real.html", token_entropies=batch.entropies,
                       entropy_window=4, vocab_size=len(tokenizer))  # fmt: skip
    page = path.read_text(encoding="utf-8")
    assert_self_contained(parse(page), page)
    trees = build_trees(batch.trajectories, batch.prompt_ids, rewards, advantages)
    drawn = svgs(page)
    assert len(drawn) == len(trees) == 2
    # the hard advantage shown on each leaf is hard_attribution's on the row's last segment (computed directly)
    ids = [t.completion_ids for t in batch.trajectories]
    width = max(map(len, ids))
    padded = torch.tensor([row + [-1] * (width - len(row)) for row in ids])
    valid = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    table = hard_attribution(padded, valid, advantages.double(), 4)
    for svg, tree in zip(drawn, trees):
        assert len(svg.findall(".//g[@class='node']")) == len(tree.nodes)
        for g in svg.findall(".//g[@class='leaf']"):
            slot = int(g.get("data-slot"))
            assert float(g.get("data-reward")) == pytest.approx(float(rewards[slot]))
            assert float(g.get("data-advantage")) == pytest.approx(float(advantages[slot]))
            traj = batch.trajectories[slot]
            last = max(i for i in range(1, len(traj.tool_mask)) if traj.tool_mask[i - 1] == 0 and traj.tool_mask[i])
            last = last if any(traj.tool_mask[i] == 0 for i in range(len(traj.tool_mask))) else 0
            own = [float(table[slot, i]) for i in range(last, len(traj.completion_ids)) if traj.tool_mask[i]]
            assert float(g.get("data-hard")) == pytest.approx(sum(own) / len(own), abs=1e-6)
    assert page.count('class="spark"') > 0  # per-token entropy sparklines from the recorded entropies
    assert "branches: " in page  # the record's statistics


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_a_real_browser_draws_the_trees(branching_batch, tokenizer, tmp_path):
    from PIL import Image

    batch, rewards, advantages = branching_batch
    page_path = render_tree(batch.trajectories, tokenizer, rewards, advantages, tmp_path / "page.html",
                            prompt_ids=batch.prompt_ids, groups=[0], token_entropies=batch.entropies,
                            entropy_window=4, vocab_size=len(tokenizer))  # fmt: skip
    (tree,) = build_trees(batch.trajectories, batch.prompt_ids, rewards, advantages, groups=[0])
    base = [CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    url = page_path.resolve().as_uri()
    # 1. the DOM the browser built: every segment and leaf is an SVG element, the script ran without breaking it
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=90, check=True).stdout
    assert dom.count('class="node"') == len(tree.nodes) and dom.count('class="leaf"') == 4
    # 2. the pixels: the prompt box, a fork edge/diamond and reward-coloured leaves are painted
    shot = tmp_path / "page.png"
    subprocess.run([*base, "--window-size=1600,1100", f"--screenshot={shot}", url], capture_output=True,
                   timeout=90, check=True)  # fmt: skip
    image = Image.open(shot).convert("RGB")
    assert image.size == (1600, 1100)
    pixels = list(image.getdata())

    def count(hex_colour, tol=8):
        r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
        return sum(abs(p[0] - r) <= tol and abs(p[1] - g) <= tol and abs(p[2] - b) <= tol for p in pixels)

    assert count(PROMPT_FILL) > 0.8 * 236 * 100 * 0.9  # the prompt box (text inside takes a few pixels)
    assert count("#e67e22", tol=30) > 50  # fork: dashed orange edge and filled diamond (α = 1 forks)
    assert len(set(pixels)) > 50  # text, edges, colours: not a blank or error page
