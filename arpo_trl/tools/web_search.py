"""`WebSearch`: an optional ``<search>`` backend calling an HTTP search API, with an on-disk cache.

The API contract is deliberately small so that most search services fit by configuration: a GET request
``{endpoint}?{query_param}=QUERY&{count_param}=K`` with the key (read from an environment variable at call time,
never stored in the object) in a header; a JSON answer whose result list sits at `results_path` (dotted,
e.g. ``"webPages.value"`` for the Bing API, ``"organic"`` for a SERP proxy) and whose items carry a snippet
(``snippet``/``description``/``text``/``content``) and optionally a title.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import StringTool, ToolOutput, TransientToolError
from .search import NO_RESULTS, format_pages, snippet_of

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
        cache_dir: folder of the on-disk cache (one JSON file per query; None: no cache). Only successful
            answers are cached, so an outage is not remembered.
        query_param / count_param: the URL parameters for the query and the number of results.
        results_path: dotted path of the result list in the JSON answer.
        extra_params / headers: sent with every request.
        include_titles: put each result's title before its snippet.
        name: the tag / function name.
    """

    name = "search"
    argument = "query"
    cacheable = True

    def __init__(
        self,
        endpoint: str,
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
    ) -> None:
        super().__init__(
            name=name,
            description=(
                "Search the web and return the top result snippets, numbered 'Page 1: …', or 'No search results found.'"
            ),
            argument_description="The search query.",
        )
        scheme = urllib.parse.urlsplit(endpoint).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"WebSearch endpoint must be an http(s) URL, got {endpoint!r}")
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

    # -- cache ------------------------------------------------------------------------------------------------

    def _cache_file(self, query: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = json.dumps([self.endpoint, self.results_path, self.top_k, self.max_chars, self.include_titles, query])
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
        query = " ".join(query.split())
        if not query:
            return NO_RESULTS
        cached = self._cache_get(query)
        if cached is not None:
            return cached
        try:
            result = format_pages(self._snippets(self._request(query)), self.max_chars)
        except _PermanentSearchError as exc:
            return ToolOutput(f"Error: {exc}", error=True)
        self._cache_put(query, result)
        return result

    def __repr__(self) -> str:
        return f"WebSearch(name={self.name!r}, endpoint={self.endpoint!r}, key_env={self.api_key_env!r})"


class _PermanentSearchError(Exception):
    """A failure a retry would not fix (bad key, bad request, malformed answer)."""


def _short(text: Any) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(str(text).split())[:300]
