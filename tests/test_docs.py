"""Every link in README.md and docs/*.md resolves: relative ones to a file of the repository (and a heading there,
for a #fragment), outside ones only to the references the documentation cites (the paper, the official code)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The paper and the official code: cited, not depended on.
OUTSIDE = ("https://arxiv.org/abs/", "https://github.com/RUC-NLPIR/ARPO")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code is not a link
    return LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        if target.startswith(("http://", "https://")):
            if not target.startswith(OUTSIDE):
                broken.append(f"{target}: outside the repository")
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_pattern_finds_the_links() -> None:
    assert {"docs/gpu.md", "#where-the-gpu-path-stands", "https://arxiv.org/abs/2507.19849"} <= set(
        links(ROOT / "README.md")
    )


def test_readme_first_screen_is_short() -> None:
    """The README stays what a newcomer reads first; depth goes to docs/."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 260
