"""Successful tool results kept in memory, keyed by tool name and arguments (`ToolExecutor(cache_size=...)`)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from .base import Tool, ToolCall, ToolResult

Key = tuple[str, str]


class ResultCache:
    """Least-recently-used cache of up to `size` successful results (0: caches nothing). Thread-safe: rounds may
    run from several threads at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._results: OrderedDict[Key, ToolResult] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, call: ToolCall, tool: Tool) -> Key | None:
        """The key of `call`, or None when it must not be cached (no cache, a tool whose ``cacheable`` is False, or
        arguments that do not serialize)."""
        if not self.size or getattr(tool, "cacheable", True) is False:
            return None
        args = call.arguments
        try:
            text = args if isinstance(args, str) else json.dumps(args, sort_keys=True, default=repr)
        except (TypeError, ValueError, RecursionError):
            return None
        return call.name, text

    def get(self, key: Key | None) -> ToolResult | None:
        if key is None:
            return None
        with self._lock:
            result = self._results.get(key)
            if result is not None:
                self._results.move_to_end(key)
            return result

    def put(self, key: Key | None, result: ToolResult) -> None:
        """Keep `result` unless it is an error (a failure may be transient; the next call should try again)."""
        if key is None or result.error:
            return
        with self._lock:
            self._results[key] = result
            self._results.move_to_end(key)
            while len(self._results) > self.size:
                self._results.popitem(last=False)

    def __len__(self) -> int:
        return len(self._results)
