"""WebSearch against a real HTTP server on loopback: request shape, parsing, disk cache, retries, failures."""

from __future__ import annotations

import json
import pickle
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from arpo_trl.tools import ToolCall, ToolExecutor, TransientToolError, WebSearch

KEY = "test-key-123"


class FakeSearchAPI(BaseHTTPRequestHandler):
    """A tiny search API: the query decides the behaviour."""

    hits: list[dict] = []
    flaky_failures: dict[str, int] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        q = params.get("q", "")
        type(self).hits.append({"path": url.path, "params": params, "auth": self.headers.get("Authorization")})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, b'{"error": "invalid api key"}')
        if q == "down":
            return self._send(503, b"overloaded")
        if q.startswith("flaky"):
            left = type(self).flaky_failures.get(q, 2)
            if left > 0:
                type(self).flaky_failures[q] = left - 1
                return self._send(503, b"try again")
        if q == "badjson":
            return self._send(200, b"<html>not json</html>", "text/html")
        if q == "slow":
            time.sleep(1.5)
        if q == "empty":
            return self._send(200, json.dumps({"results": []}).encode())
        n = int(params.get("count", "10"))
        results = [
            {"title": f"Result {i} for {q}", "snippet": f"Snippet {i} about {q}. " + ("long " * 400 if i == 0 else "")}
            for i in range(n + 5)  # more than asked, to check the client's own cap
        ]
        results.insert(1, dict(results[0]))  # a duplicate, to be dropped
        return self._send(200, json.dumps({"results": results, "meta": {"q": q}}).encode())


@pytest.fixture
def api(monkeypatch):
    FakeSearchAPI.hits = []
    FakeSearchAPI.flaky_failures = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSearchAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TEST_SEARCH_KEY", KEY)
    yield f"http://127.0.0.1:{server.server_address[1]}/search"
    server.shutdown()
    server.server_close()


def make(api, tmp_path, **kw) -> WebSearch:
    return WebSearch(api, api_key_env="TEST_SEARCH_KEY", cache_dir=tmp_path / "cache", top_k=3, max_chars=100, **kw)


def test_request_and_formatting(api, tmp_path):
    search = make(api, tmp_path)
    out = search(' "who wrote Emma?" ')  # quotes removed and ends stripped, as the official tool
    assert (
        out.splitlines()
        == [  # the official rendering: a hard cut at max_chars, the duplicate dropped
            "Page 1: " + ("Snippet 0 about who wrote Emma?. " + "long " * 400)[:100],
            "Page 2: Snippet 1 about who wrote Emma?.",
            "Page 3: Snippet 2 about who wrote Emma?.",
        ]
    )
    (hit,) = FakeSearchAPI.hits
    assert hit["params"] == {"q": "who wrote Emma?", "count": "3"} and hit["auth"] == f"Bearer {KEY}"
    titled = make(api, tmp_path, include_titles=True)("titles")
    assert titled.splitlines()[1] == "Page 2: Result 1 for titles. Snippet 1 about titles."
    compact = make(api, tmp_path, result_format="compact")("who wrote   Emma?")
    assert (
        compact.splitlines()[0]
        == "Page 1: " + ("Snippet 0 about who wrote Emma?. " + "long " * 400)[:99].rstrip() + "…"
    )


def test_official_rendering_dedups_before_the_top_k_and_keeps_text_as_is():
    from arpo_trl.tools.web_search import format_official

    assert format_official([]) == "No search results found."
    assert format_official([f"s{i}" for i in range(12)]).splitlines()[-1] == "Page 10: s9"
    assert format_official(["a\nb", "x" * 1200]) == "Page 1: a\nb\nPage 2: " + "x" * 1000
    search = WebSearch(None, cache_file="/nonexistent/none.json")
    assert search._snippets({"results": [{"snippet": " a "}, {"snippet": "a"}, {"snippet": ""}, {"snippet": "b"}]}) == [
        "a",
        "b",
    ]


def test_official_cache_file_replays_offline_and_is_extended_in_its_format(api, tmp_path):
    cache = tmp_path / "search_cache.json"
    released = {"Amy Smart film debut": "Page 1: Campfire Tales (1997).", 'search query: "quoted"': "never hit"}
    cache.write_text(json.dumps(released, ensure_ascii=False, indent=2))
    offline = WebSearch(None, cache_file=cache)  # no endpoint, no key: replay only
    assert offline("  Amy Smart film debut\n") == "Page 1: Campfire Tales (1997)."
    missing = offline("not cached")
    assert missing.error and "not in the offline search cache search_cache.json" in missing
    online = WebSearch(api, api_key_env="TEST_SEARCH_KEY", cache_file=cache, top_k=2, max_chars=50)
    assert online("Amy Smart film debut") == "Page 1: Campfire Tales (1997)." and not FakeSearchAPI.hits
    fresh = online('new "query"')
    assert fresh.startswith("Page 1: Snippet 0 about new query.") and len(FakeSearchAPI.hits) == 1
    written = json.loads(cache.read_text())
    assert written == {**released, "new query": fresh}  # the official layout: query -> rendered text, merged
    assert WebSearch(None, cache_file=cache)("new query") == fresh  # a later offline run replays it
    cache.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object mapping queries"):
        WebSearch(None, cache_file=cache)
    with pytest.raises(ValueError, match="needs an endpoint, or a cache_file"):
        WebSearch(None)


def test_disk_cache(api, tmp_path):
    search = make(api, tmp_path)
    first = search("cached query")
    assert search("cached query") == first and len(FakeSearchAPI.hits) == 1
    assert make(api, tmp_path)(" cached query ") == first and len(FakeSearchAPI.hits) == 1  # a new instance
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    make(api, tmp_path)("other query")
    assert len(FakeSearchAPI.hits) == 2
    for f in (tmp_path / "cache").glob("*.json"):  # a damaged entry is a miss, not a crash
        f.write_text("{broken")
    assert search("cached query") == first and len(FakeSearchAPI.hits) == 3


def test_empty_results(api, tmp_path):
    assert make(api, tmp_path)("empty") == "No search results found."
    assert make(api, tmp_path)("   ") == "No search results found." and len(FakeSearchAPI.hits) == 1


def test_transient_failures_are_retried_by_the_executor(api, tmp_path):
    search = make(api, tmp_path)
    with pytest.raises(TransientToolError, match="HTTP 503"):
        search("down")
    ex = ToolExecutor([search], timeout=10, max_retries=2, retry_backoff=0.05)
    ok, down = ex.run([ToolCall("search", "flaky one"), ToolCall("search", "down")])
    assert ok.text.startswith("Page 1: Snippet 0 about flaky one") and not ok.error
    assert down.error and down.text == (
        "Error: tool 'search' failed after 3 attempts: TransientToolError: search API returned HTTP 503 "
        "Service Unavailable"
    )
    assert not list((tmp_path / "cache").glob("*.json"))[1:]  # only the success was cached


def test_permanent_failures(api, tmp_path, monkeypatch):
    search = make(api, tmp_path)
    bad = search("badjson")
    assert bad.error and bad == "Error: search API answered with invalid JSON: <html>not json</html>"
    monkeypatch.setenv("TEST_SEARCH_KEY", "wrong")
    denied = search("anything")
    assert denied.error
    assert denied == 'Error: search API returned HTTP 401 Unauthorized: {"error": "invalid api key"}'
    assert not list((tmp_path / "cache").glob("*.json"))


def test_timeout_and_unreachable(api, tmp_path):
    slow = WebSearch(api, api_key_env="TEST_SEARCH_KEY", timeout=0.3)
    with pytest.raises(TransientToolError, match="search API unreachable"):
        slow("slow")
    dead = WebSearch("http://127.0.0.1:9/search", api_key_env=None, timeout=2)
    res = ToolExecutor([dead], timeout=5, max_retries=1, retry_backoff=0.01).run([ToolCall("search", "x")])[0]
    assert res.error and res.text.startswith("Error: tool 'search' failed after 2 attempts: TransientToolError: ")
    assert "Connection refused" in res.text


def test_key_handling(api, monkeypatch):
    monkeypatch.delenv("MISSING_SEARCH_KEY", raising=False)
    with pytest.raises(ValueError, match="MISSING_SEARCH_KEY"):
        WebSearch(api, api_key_env="MISSING_SEARCH_KEY")
    search = WebSearch(api, api_key_env="TEST_SEARCH_KEY")
    assert KEY not in repr(search) and KEY.encode() not in pickle.dumps(search)
    with pytest.raises(ValueError, match="http"):
        WebSearch("file:///etc/passwd", api_key_env=None)


def test_results_path_and_string_items(api, tmp_path):
    search = WebSearch(api, api_key_env="TEST_SEARCH_KEY", results_path="meta.q", count_param=None)
    with pytest.raises(Exception, match="is not a list"):
        search._snippets({"meta": {"q": "x"}})
    assert search._snippets({"meta": {"q": ["a", "b", "a"]}}) == ["a", "b"]
    assert search._snippets({"other": 1}) == []
    out = search("q")  # here "meta.q" holds a string, not a list: an error for the model, no count sent
    assert out.error and out == "Error: search API answer: 'meta.q' is not a list"
    assert FakeSearchAPI.hits[-1]["params"] == {"q": "q"}
