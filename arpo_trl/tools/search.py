"""`LocalSearch`: offline BM25 search over a document corpus, answering like the paper's search tool.

The corpus is a `datasets.Dataset`, a JSONL file, or a list of dicts, each document with a ``title`` and a
``text``. The BM25 index (`bm25s`) is built once and saved next to the corpus in a folder named after a hash
of the corpus content, so a changed corpus gets a new index and an unchanged one is loaded in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import StringTool

logger = logging.getLogger(__name__)

NO_RESULTS = "No search results found."
_INDEX_FORMAT = "arpo-bm25-v1"


def format_pages(snippets: Iterable[str], max_chars: int = 1000) -> str:
    """The paper's rendering: ``Page 1: …`` lines, each snippet cut to `max_chars`; a fixed text when empty."""
    lines = []
    for snippet in snippets:
        text = " ".join(str(snippet).split())  # one line per page
        if len(text) > max_chars:
            text = text[: max(0, max_chars - 1)].rstrip() + "…"
        if text:
            lines.append(f"Page {len(lines) + 1}: {text}")
    return "\n".join(lines) or NO_RESULTS


def pages_bound(top_k: int, max_chars: int) -> int:
    """The longest answer `top_k` pages of at most `max_chars` characters can make (``Page i: `` and line breaks
    included): a search tool's own output limit, so the executor never cuts the pages it chose to return."""
    return top_k * (len(f"Page {top_k}: ") + max_chars + 1)


def snippet_of(title: str, text: str) -> str:
    """``Title. text`` unless the text already starts with the title (as Wikipedia leads do)."""
    title, text = title.strip(), text.strip()
    n = len(title)
    if not title or (text[:n].lower() == title.lower() and (len(text) == n or not text[n].isalnum())):
        return text or title
    return f"{title}. {text}" if text else title


def _read_jsonl(path: Path, title_field: str, text_field: str) -> list[tuple[str, str]]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object with {text_field!r}")
            docs.append(_doc(row, title_field, text_field, f"{path}:{lineno}"))
    return docs


def _doc(row: Mapping[str, Any], title_field: str, text_field: str, where: str) -> tuple[str, str]:
    if text_field not in row and title_field not in row:
        raise ValueError(f"{where}: a document needs a {text_field!r} (and optionally a {title_field!r}) field")
    title, text = row.get(title_field) or "", row.get(text_field) or ""
    return str(title), str(text)


def _iter_dataset(ds: Any, title_field: str, text_field: str) -> Iterator[tuple[str, str]]:
    cols = [c for c in (title_field, text_field) if c in ds.column_names]
    if text_field not in cols:
        raise ValueError(f"the corpus dataset has no {text_field!r} column (columns: {ds.column_names})")
    for batch in ds.select_columns(cols).iter(batch_size=1000):
        titles = batch.get(title_field, [""] * len(batch[text_field]))
        for title, text in zip(titles, batch[text_field]):
            yield str(title or ""), str(text or "")


def corpus_hash(docs: Sequence[tuple[str, str]]) -> str:
    """A content hash of the corpus (and of the index settings), naming its index folder."""
    h = hashlib.sha256(_INDEX_FORMAT.encode())
    for title, text in docs:
        for part in (title, text):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "arpo_trl" / "bm25"


class LocalSearch(StringTool):
    """Offline BM25 search over a local corpus (tag ``<search>``).

    Args:
        corpus: a `datasets.Dataset`, a path to a JSONL file, or a list of dicts; documents have `text_field`
            and, optionally, `title_field`.
        top_k: pages returned per query (the paper: 10).
        max_chars: each page's snippet is cut to this many characters (the paper: 1000).
        index_dir: where to keep the index. Default: next to a JSONL corpus (``<file>.bm25/``), next to a
            Dataset's cache files, else ``~/.cache/arpo_trl/bm25``. An index is reused while the corpus
            content hash is unchanged.
        persist: save and reuse the index on disk (False: build it in memory every time).
        title_field / text_field: the documents' field names.
        stopwords: language of the stop-word list given to `bm25s.tokenize` (None: no stop words).
        name: the tag / function name.
    """

    name = "search"
    argument = "query"
    cacheable = True
    thread_safe = True  # read-only index: concurrent queries are safe

    @property
    def output_limit(self) -> int:
        """Its own output limit: `top_k` pages of `max_chars` (what the executor caps it at, never below)."""
        return pages_bound(self.top_k, self.max_chars)

    def __init__(
        self,
        corpus: Any,
        top_k: int = 10,
        max_chars: int = 1000,
        index_dir: str | os.PathLike | None = None,
        persist: bool = True,
        title_field: str = "title",
        text_field: str = "text",
        stopwords: str | None = "en",
        name: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            description=(
                "Search a local document collection (BM25) and return the most relevant passages, numbered "
                "'Page 1: …', or 'No search results found.'"
            ),
            argument_description="The search query, e.g. a question or a few keywords.",
        )
        if top_k < 1 or max_chars < 1:
            raise ValueError("top_k and max_chars must be >= 1")
        self.top_k, self.max_chars, self.stopwords = top_k, max_chars, stopwords
        self.docs, default_dir = self._load(corpus, title_field, text_field)
        if not self.docs:
            raise ValueError("the search corpus is empty")
        self.snippets = [snippet_of(t, x) for t, x in self.docs]
        self.fingerprint = corpus_hash(self.docs)
        self.index_path: Path | None = None
        # Old indexes are pruned only from a folder that belongs to this corpus alone.
        self._prune = index_dir is None and default_dir is not None
        if persist:
            root = Path(index_dir) if index_dir is not None else default_dir or _default_cache_dir()
            self.index_path = root / f"{self.fingerprint[:20]}-{stopwords or 'none'}"
        self.loaded_from_disk = False
        self.retriever = self._load_or_build()

    # -- corpus and index -------------------------------------------------------------------------------------

    @staticmethod
    def _load(corpus: Any, title_field: str, text_field: str) -> tuple[list[tuple[str, str]], Path | None]:
        if isinstance(corpus, str | os.PathLike):
            path = Path(corpus)
            if not path.is_file():
                raise FileNotFoundError(f"search corpus {path} does not exist")
            return _read_jsonl(path, title_field, text_field), path.with_name(path.name + ".bm25")
        if hasattr(corpus, "column_names") and hasattr(corpus, "select_columns"):  # a datasets.Dataset
            files = [f["filename"] for f in getattr(corpus, "cache_files", []) or []]
            where = Path(files[0]).with_suffix(".bm25") if files else None
            return list(_iter_dataset(corpus, title_field, text_field)), where
        if isinstance(corpus, Sequence):
            docs = []
            for i, row in enumerate(corpus):
                if not isinstance(row, Mapping):
                    raise TypeError(f"corpus[{i}] is a {type(row).__name__}; documents must be dicts")
                docs.append(_doc(row, title_field, text_field, f"corpus[{i}]"))
            return docs, None
        raise TypeError(f"unsupported corpus type {type(corpus).__name__}: pass a Dataset, a JSONL path or dicts")

    def _tokenize(self, texts: list[str], *, return_ids: bool = True) -> Any:
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.stopwords, show_progress=False, return_ids=return_ids)

    def _load_or_build(self) -> Any:
        import bm25s

        path = self.index_path
        if path is not None and (path / "arpo_index.json").is_file():
            try:
                meta = json.loads((path / "arpo_index.json").read_text())
                if meta.get("fingerprint") == self.fingerprint and meta.get("n_docs") == len(self.docs):
                    retriever = bm25s.BM25.load(str(path))
                    self.loaded_from_disk = True
                    return retriever
                logger.warning("search index %s does not match its corpus; rebuilding it", path)
            except Exception as exc:  # noqa: BLE001 - a damaged index is rebuilt, never fatal
                logger.warning("could not load the search index %s (%s); rebuilding it", path, exc)
        retriever = bm25s.BM25()
        retriever.index(self._tokenize([f"{t} {x}" for t, x in self.docs]), show_progress=False)
        if path is not None:
            self._save(retriever, path)
        return retriever

    def _save(self, retriever: Any, path: Path) -> None:
        """Write to a temporary folder, then rename: concurrent builders never see a half-written index."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
            retriever.save(str(tmp))
            meta = {"format": _INDEX_FORMAT, "fingerprint": self.fingerprint, "n_docs": len(self.docs)}
            (tmp / "arpo_index.json").write_text(json.dumps(meta))
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            try:
                os.rename(tmp, path)
            except OSError:  # another process won the race: its index is just as good
                shutil.rmtree(tmp, ignore_errors=True)
            for stale in path.parent.iterdir() if self._prune else []:  # indexes of older versions of this corpus
                if stale != path and stale.is_dir() and (stale / "arpo_index.json").is_file():
                    shutil.rmtree(stale, ignore_errors=True)
        except OSError as exc:
            logger.warning("could not save the search index to %s (%s); it stays in memory", path, exc)

    # -- querying ---------------------------------------------------------------------------------------------

    def search(self, query: str, k: int | None = None) -> list[tuple[int, float]]:
        """(document index, BM25 score) of the best matches, best first; only documents that match a term."""
        k = min(k or self.top_k, len(self.docs))
        tokens = self._tokenize([query[:10_000]], return_ids=False)
        if not tokens or not tokens[0]:
            return []
        ids, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]

    def run(self, query: str) -> str:
        """The top pages for `query`, formatted like the paper."""
        query = query.strip()
        if not query:
            return NO_RESULTS
        seen: set[str] = set()
        hits = []
        for i, _ in self.search(query):
            if self.snippets[i] not in seen:
                seen.add(self.snippets[i])
                hits.append(self.snippets[i])
        return format_pages(hits, self.max_chars)

    def __len__(self) -> int:
        return len(self.docs)

    def __repr__(self) -> str:
        return f"LocalSearch(name={self.name!r}, docs={len(self.docs)}, top_k={self.top_k}, index={self.index_path})"
