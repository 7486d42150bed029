"""`arpo_trl.tools.result_cache`: least-recently-used order, errors and unserializable arguments never kept."""

from arpo_trl.tools.base import ToolCall, ToolResult
from arpo_trl.tools.result_cache import ResultCache


def search(query: str) -> str:
    return query


def test_least_recently_used_result_is_evicted_first():
    cache = ResultCache(2)
    a, b, c = (cache.key(ToolCall("search", {"query": q}), search) for q in "abc")
    cache.put(a, ToolResult("A"))
    cache.put(b, ToolResult("B"))
    assert cache.get(a).text == "A"  # a is now the most recently used: b goes first
    cache.put(c, ToolResult("C"))
    assert cache.get(b) is None and cache.get(a).text == "A" and cache.get(c).text == "C" and len(cache) == 2


def test_errors_unserializable_arguments_and_a_size_of_zero_are_not_cached():
    cache = ResultCache(4)
    key = cache.key(ToolCall("search", "q"), search)
    cache.put(key, ToolResult("Error: boom", error=True))
    assert cache.get(key) is None
    cyclic: dict = {}
    cyclic["self"] = cyclic
    assert cache.key(ToolCall("search", cyclic), search) is None
    assert ResultCache(0).key(ToolCall("search", "q"), search) is None
    # argument order does not matter: the key is the arguments' sorted JSON
    assert cache.key(ToolCall("search", {"a": 1, "b": 2}), search) == cache.key(
        ToolCall("search", {"b": 2, "a": 1}), search
    )
