"""`WebSearch`: an optional ``<search>`` backend calling an HTTP search API, with an on-disk cache.

The API contract is deliberately small so that most search services fit by configuration: a GET request
``{endpoint}?{query_param}=QUERY&{count_param}=K`` with the key (read from an environment variable at call time,
never stored in the object) in a header; a JSON answer whose result list sits at `results_path` (dotted,
e.g. ``"webPages.value"`` for the Bing API, ``"organic"`` for a SERP proxy) and whose items carry a snippet
(``snippet``/``description``/``text``/``content``) and optionally a title.

Results read as the official ARPO search tool renders them: the snippets de-duplicated, the first `top_k` (10),
each cut to `max_chars` (1,000) characters, ``Page i: …`` lines, ``No search results found.`` when there are none;
double quotes are removed from the query. ``cache_file`` reads and writes the official search-cache format (one
JSON object mapping each query to its rendered result, e.g. the released ``search_cache/search_cache.json``), so
that cache replays offline: with ``endpoint=None`` the tool answers from the file alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import StringTool, ToolOutput, TransientToolError
from .search import NO_RESULTS, format_pages, pages_bound, snippet_of


def format_official(snippets: Sequence[str], top_k: int = 10, max_chars: int = 1000) -> str:
    """The official rendering: the first `top_k` snippets (already de-duplicated), each cut to `max_chars`
    characters as they are (no ellipsis, line breaks kept), as ``Page i: …`` lines; a fixed text when empty."""
    lines = [f"Page {i}: {snippet[:max_chars]}" for i, snippet in enumerate(list(snippets)[:top_k], 1)]
    return "\n".join(lines) or NO_RESULTS


logger = logging.getLogger(__name__)

_SNIPPET_FIELDS = ("snippet", "description", "text", "content", "body")
_TITLE_FIELDS = ("title", "name")


class WebSearch(StringTool):
    """Web search through an HTTP JSON API (tag ``<search>``).

    Args:
        endpoint: the API URL (``http(s)://…``).
        api_key_env: name of the environment variable holding the key (None: the API needs no key). It is
            read at each call, so the key never sits in the object, its repr or a pickle.
        key_header: the header carrying the key; `key_prefix` is put before it (e.g. ``"Bearer "``).
        top_k: pages returned (the paper: 10). max_chars: each snippet is cut to this (the paper: 1000).
        timeout: HTTP timeout in seconds.
        cache_file: an official-format search cache (a JSON object, query → rendered result), read at start and
            merged back after each new answer (under a ``.lock`` file, atomically), so concurrent processes
            share it. With ``endpoint=None`` it is replayed alone: a query it lacks gets an error result.
        cache_dir: folder of the on-disk cache (one JSON file per query; None: no cache). Only successful
            answers are cached, so an outage is not remembered.
        result_format: ``"official"`` (the official tool's rendering, above) or ``"compact"`` (whitespace
            collapsed, an ellipsis where a snippet is cut).
        query_param / count_param: the URL parameters for the query and the number of results.
        results_path: dotted path of the result list in the JSON answer.
        extra_params / headers: sent with every request.
        include_titles: put each result's title before its snippet.
        name: the tag / function name.
    """

    name = "search"
    argument = "query"
    cacheable = True
    thread_safe = True  # one urllib request per call; the caches are written atomically, under a lock

    @property
    def output_limit(self) -> int:
        """Its own output limit: `top_k` pages of `max_chars` (what the executor caps it at, never below)."""
        return pages_bound(self.top_k, self.max_chars)

    def __init__(
        self,
        endpoint: str | None,
        api_key_env: str | None = "SEARCH_API_KEY",
        key_header: str = "Authorization",
        key_prefix: str = "Bearer ",
        top_k: int = 10,
        max_chars: int = 1000,
        timeout: float = 30.0,
        cache_dir: str | os.PathLike | None = None,
        query_param: str = "q",
        count_param: str | None = "count",
        results_path: str = "results",
        extra_params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        include_titles: bool = False,
        name: str | None = None,
        cache_file: str | os.PathLike | None = None,
        result_format: str = "official",
    ) -> None:
        super().__init__(
            name=name,
            description=(
                "Search the web and return the top result snippets, numbered 'Page 1: …', or 'No search results found.'"
            ),
            argument_description="The search query.",
        )
        if endpoint is None:
            if cache_file is None:
                raise ValueError("WebSearch needs an endpoint, or a cache_file to replay offline (endpoint=None)")
            api_key_env = None  # nothing is requested
        elif urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
            raise ValueError(f"WebSearch endpoint must be an http(s) URL, got {endpoint!r}")
        if result_format not in ("official", "compact"):
            raise ValueError(f"result_format must be 'official' or 'compact', got {result_format!r}")
        self.result_format = result_format
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(
                f"WebSearch needs an API key in the environment variable {api_key_env} (it is unset or empty); "
                "set it, or pass api_key_env=None for an API without a key"
            )
        if top_k < 1 or max_chars < 1 or timeout <= 0:
            raise ValueError("top_k, max_chars and timeout must be positive")
        self.endpoint, self.api_key_env, self.key_header, self.key_prefix = (
            endpoint,
            api_key_env,
            key_header,
            key_prefix,
        )
        self.top_k, self.max_chars, self.timeout = top_k, max_chars, timeout
        self.query_param, self.count_param, self.results_path = query_param, count_param, results_path
        self.extra_params = dict(extra_params or {})
        self.headers = dict(headers or {})
        self.include_titles = include_titles
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._file_lock = threading.Lock()
        self._file_cache: dict[str, str] = self._read_cache_file() if self.cache_file is not None else {}

    # -- the official cache file ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        """This process's threads, then other processes (the official tool's ``<cache>.lock`` convention)."""
        with self._file_lock, open(str(self.cache_file) + ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_cache_file(self) -> dict[str, str]:
        assert self.cache_file is not None
        if not self.cache_file.exists():
            return {}
        try:
            data = json.loads(self.cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"search cache {self.cache_file} is not readable JSON: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError(f"search cache {self.cache_file} must be a JSON object mapping queries to result text")
        return data

    def _write_cache_file(self, query: str, result: str) -> None:
        assert self.cache_file is not None
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                merged = self._read_cache_file()  # another process may have added entries since we read it
                merged.update(self._file_cache)
                merged[query] = result
                fd, tmp = tempfile.mkstemp(dir=self.cache_file.parent, prefix=".tmp-")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(merged, f, ensure_ascii=False, indent=2)
                os.replace(tmp, self.cache_file)
                self._file_cache = merged
        except (OSError, ValueError) as exc:
            logger.warning("could not write the search cache %s: %s", self.cache_file, exc)

    # -- cache ------------------------------------------------------------------------------------------------

    def _cache_file(self, query: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = [self.endpoint, self.results_path, self.top_k, self.max_chars, self.include_titles, query]
        if self.result_format != "official":  # keys of official-format entries stay those of earlier versions
            key.append(self.result_format)
        key = json.dumps(key)
        return self.cache_dir / (hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest() + ".json")

    def _cache_get(self, query: str) -> str | None:
        path = self._cache_file(query)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            return entry["result"] if entry.get("query") == query else None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a damaged entry is a miss

    def _cache_put(self, query: str, result: str) -> None:
        path = self._cache_file(query)
        if path is None:
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"query": query, "result": result}, f, ensure_ascii=False)
            os.replace(tmp, path)  # atomic: concurrent writers and readers never see half a file
        except OSError as exc:
            logger.warning("could not write the search cache entry %s: %s", path, exc)

    # -- the request ------------------------------------------------------------------------------------------

    def _request(self, query: str) -> Any:
        params = {**self.extra_params, self.query_param: query}
        if self.count_param:
            params[self.count_param] = str(self.top_k)
        sep = "&" if urllib.parse.urlsplit(self.endpoint).query else "?"
        url = self.endpoint + sep + urllib.parse.urlencode(params)
        headers = {"Accept": "application/json", "User-Agent": "arpo_trl-websearch", **self.headers}
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ValueError(f"the environment variable {self.api_key_env} with the search API key is unset")
            headers[self.key_header] = self.key_prefix + key
        req = urllib.request.Request(url, headers=headers, method="GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read(16 << 20)
        except urllib.error.HTTPError as exc:
            detail = _short(exc.read(500).decode("utf-8", "replace")) if exc.fp else ""
            if exc.code == 429 or exc.code >= 500:
                raise TransientToolError(f"search API returned HTTP {exc.code} {exc.reason}") from None
            raise _PermanentSearchError(f"search API returned HTTP {exc.code} {exc.reason}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransientToolError(f"search API unreachable: {reason}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise _PermanentSearchError(f"search API answered with invalid JSON: {_short(body[:200])}") from None

    def _snippets(self, payload: Any) -> list[str]:
        items: Any = payload
        for part in self.results_path.split(".") if self.results_path else []:
            items = items.get(part) if isinstance(items, Mapping) else None
        if items is None:
            return []
        if not isinstance(items, Sequence) or isinstance(items, str | bytes):
            raise _PermanentSearchError(f"search API answer: {self.results_path!r} is not a list")
        out: list[str] = []
        for item in items:
            if isinstance(item, str):
                snippet, title = item, ""
            elif isinstance(item, Mapping):
                snippet = next((str(item[f]) for f in _SNIPPET_FIELDS if item.get(f)), "")
                title = next((str(item[f]) for f in _TITLE_FIELDS if item.get(f)), "")
            else:
                continue
            text = snippet_of(title, snippet) if self.include_titles else snippet.strip()
            if text and text not in out:
                out.append(text)
        return out[: self.top_k]

    def run(self, query: str) -> str:
        """The top snippets for `query`; raises `TransientToolError` for failures worth a retry."""
        query = query.strip().replace('"', "")  # as the official tool: its cache keys are these queries
        if not query.strip():
            return NO_RESULTS
        if query in self._file_cache:
            return self._file_cache[query]
        cached = self._cache_get(query)
        if cached is not None:
            return cached
        if self.endpoint is None:
            return ToolOutput(f"Error: the query is not in the offline search cache {self.cache_file.name}", error=True)
        try:
            snippets = self._snippets(self._request(query))
        except _PermanentSearchError as exc:
            return ToolOutput(f"Error: {exc}", error=True)
        if self.result_format == "official":
            result = format_official(snippets, self.top_k, self.max_chars)
        else:
            result = format_pages(snippets, self.max_chars)
        self._cache_put(query, result)
        if self.cache_file is not None:
            with self._file_lock:
                self._file_cache = {**self._file_cache, query: result}
            self._write_cache_file(query, result)
        return result

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_file_lock")  # locks do not pickle (tools travel to worker processes)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._file_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"WebSearch(name={self.name!r}, endpoint={self.endpoint!r}, key_env={self.api_key_env!r})"


class _PermanentSearchError(Exception):
    """A failure a retry would not fix (bad key, bad request, malformed answer)."""


def _short(text: Any) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(str(text).split())[:300]
