"""Runs the tool calls of one generation round concurrently, each bounded by its own timeout.

Contract: `ToolExecutor.run` never raises because of a tool. A crashing, hanging, unknown or malformed call
becomes an error text the model reads, and `ToolResult.error` / `ToolResult.timed_out` let the trainer count it.

Scheduling: at most `max_workers` calls run at once; the others wait in a queue. A call's clock starts when it
starts running, so a call queued behind slow ones still gets its whole `timeout`. When a call overruns, the
round stops waiting for it at once: it is answered with a timeout error and its slot goes to the next queued
call (a Python thread cannot be killed, so the overrunning thread is abandoned and finishes on its own; tools
that run foreign code bound themselves, as the sandboxed interpreter does). A round therefore lasts at most
``ceil(len(calls) / max_workers) * timeout`` seconds, and exactly ``timeout`` when every call fits in one wave.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from .base import (
    Tool,
    ToolCall,
    ToolOutput,
    ToolResult,
    TransientToolError,
    clean_text,
    tool_name,
    tools_by_name,
)

logger = logging.getLogger(__name__)

#: Exceptions treated as transient (retried) by default.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (TransientToolError, ConnectionError, TimeoutError)


class ToolExecutor:
    """Bounded, timeout-safe concurrent execution of named tools.

    Args:
        tools: the callables the model may call.
        timeout: seconds one call may take, retries included, counted from the moment it starts running;
            past it the model gets ``Error: tool 'NAME' timed out after T s.`` and the round goes on.
        max_workers: calls running at once.
        max_response_chars: longer outputs are cut, with a note saying so.
        max_retries: extra attempts after a transient failure (an exception in `retry_on`), within `timeout`.
        retry_backoff: seconds before the first retry, doubled for each further one.
        retry_on: exception types that count as transient.
        cache_size: keep up to this many successful results, keyed by tool name and arguments, and serve
            repeated calls from memory (0: no cache). Tools whose ``cacheable`` attribute is False are never
            cached (e.g. the Python interpreter, whose programs may be random).
        empty_output_text: what the model sees when a tool returns nothing (``{name}`` is the tool's name);
            the official wrapper's wording by default.
    """

    def __init__(
        self,
        tools: Sequence[Tool],
        timeout: float = 60.0,
        max_workers: int = 16,
        max_response_chars: int = 4000,
        *,
        max_retries: int = 2,
        retry_backoff: float = 0.5,
        retry_on: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
        cache_size: int = 0,
        empty_output_text: str = "Tool({name}) returned empty output.",
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"tool timeout must be > 0 seconds, got {timeout}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if max_response_chars < 1:
            raise ValueError(f"max_response_chars must be >= 1, got {max_response_chars}")
        if max_retries < 0 or retry_backoff < 0 or cache_size < 0:
            raise ValueError("max_retries, retry_backoff and cache_size must be >= 0")
        self.tools = tools_by_name(list(tools))
        self.timeout = float(timeout)
        self.max_workers = max_workers
        self.max_response_chars = max_response_chars
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.retry_on = tuple(retry_on)
        self.cache_size = cache_size
        self.empty_output_text = empty_output_text
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._cache_lock = threading.Lock()  # rounds may run from several threads at once
        self._abandoned: set[threading.Thread] = set()
        self._closed = False

    # -- one call ---------------------------------------------------------------------------------------------

    def _invoke(self, tool: Tool, args: str | dict[str, Any]) -> Any:
        out = tool(**args) if isinstance(args, dict) else tool(args)
        if inspect.isawaitable(out):
            out = asyncio.run(_await(out))
        return out

    def _attempts(self, call: ToolCall, tool: Tool, deadline: float) -> ToolResult:
        """Run one call with retries; runs in its own thread. Never raises."""
        attempt = 0
        while True:
            try:
                return self._to_result(call.name, self._invoke(tool, call.arguments))
            except BaseException as exc:  # noqa: BLE001 - a tool's failure is the model's information
                transient = isinstance(exc, self.retry_on)
                delay = self.retry_backoff * (2**attempt)
                if transient and attempt < self.max_retries and time.monotonic() + delay < deadline:
                    attempt += 1
                    logger.debug("tool %r failed transiently (%s); retry %d", call.name, _describe(exc), attempt)
                    time.sleep(delay)
                    continue
                tries = f" after {attempt + 1} attempts" if attempt else ""
                return ToolResult(f"Error: tool {call.name!r} failed{tries}: {_describe(exc)}", error=True)

    def _to_result(self, name: str, out: Any) -> ToolResult:
        error = bool(getattr(out, "error", False)) if isinstance(out, ToolOutput) else False
        timed_out = bool(getattr(out, "timed_out", False)) if isinstance(out, ToolOutput) else False
        text = _to_text(out)
        if not text.strip():
            text = (
                f"Error: tool {name!r} failed without a message."
                if error
                else self.empty_output_text.replace("{name}", name)
            )
        return ToolResult(clean_text(text), error=error or timed_out, timed_out=timed_out)

    def _truncate(self, text: str) -> str:
        if len(text) <= self.max_response_chars:
            return text
        cut = len(text) - self.max_response_chars
        return text[: self.max_response_chars] + f"\n... [output truncated: {cut} more characters]"

    # -- cache ------------------------------------------------------------------------------------------------

    def _cache_key(self, call: ToolCall) -> tuple[str, str] | None:
        if not self.cache_size or getattr(self.tools[call.name], "cacheable", True) is False:
            return None
        args = call.arguments
        try:
            key = args if isinstance(args, str) else json.dumps(args, sort_keys=True, default=repr)
        except (TypeError, ValueError, RecursionError):
            return None
        return call.name, key

    def _cache_put(self, key: tuple[str, str] | None, result: ToolResult) -> None:
        if key is None or result.error:
            return
        with self._cache_lock:
            self._cache[key] = result.text
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _cache_get(self, key: tuple[str, str] | None) -> str | None:
        if key is None:
            return None
        with self._cache_lock:
            text = self._cache.get(key)
            if text is not None:
                self._cache.move_to_end(key)
            return text

    # -- a round ----------------------------------------------------------------------------------------------

    def run(
        self, calls: Sequence[ToolCall], toolsets: Sequence[Mapping[str, Tool] | None] | None = None
    ) -> list[ToolResult]:
        """Execute `calls` concurrently; results come back in the same order. Never raises for a tool.

        `toolsets[i]`, when given and not None, is the name → tool mapping call i is looked up in instead of the
        executor's own tools: the methods of the caller's environment instance (stateful, so never cached).
        """
        if self._closed:
            raise RuntimeError("ToolExecutor is closed")
        results: list[ToolResult | None] = [None] * len(calls)
        todo: list[tuple[int, tuple[str, str] | None]] = []
        targets: dict[int, Tool] = {}
        for i, call in enumerate(calls):
            bound = toolsets[i] if toolsets is not None else None
            tools = self.tools if bound is None else bound
            if not isinstance(call, ToolCall):
                results[i] = ToolResult(f"Error: malformed tool call {type(call).__name__}.", error=True)
            elif call.parse_error is not None:
                results[i] = ToolResult(self._truncate(clean_text(str(call.parse_error))), error=True)
            elif call.name not in tools:
                known = ", ".join(sorted(tools)) or "none"
                shown = clean_text(repr(call.name))[:100]
                results[i] = ToolResult(f"Error: unknown tool {shown} (available: {known}).", error=True)
            elif not isinstance(call.arguments, str | dict):
                results[i] = ToolResult(
                    f"Error: the arguments of {call.name!r} must be a string or an object.", error=True
                )
            else:
                targets[i] = tools[call.name]
                key = self._cache_key(call) if bound is None else None
                cached = self._cache_get(key)
                if cached is not None:
                    results[i] = ToolResult(cached, cached=True)
                else:
                    todo.append((i, key))
        self._schedule(calls, targets, todo, results)
        return results  # type: ignore[return-value]

    def _schedule(
        self,
        calls: Sequence[ToolCall],
        targets: dict[int, Tool],
        todo: list[tuple[int, tuple[str, str] | None]],
        results: list[ToolResult | None],
    ) -> None:
        done: queue.SimpleQueue[tuple[int, ToolResult]] = queue.SimpleQueue()
        running: dict[int, tuple[float, float, threading.Thread]] = {}  # index -> (start, deadline, thread)
        keys = dict(todo)
        waiting = [i for i, _ in todo]
        waiting.reverse()  # pop() from the end keeps the calls' order

        def worker(i: int, deadline: float) -> None:
            try:
                res = self._attempts(calls[i], targets[i], deadline)
            except BaseException as exc:  # noqa: BLE001 - defensive: _attempts never raises
                res = ToolResult(f"Error: tool {calls[i].name!r} failed: {_describe(exc)}", error=True)
            done.put((i, res))

        while waiting or running:
            while waiting and len(running) < self.max_workers:
                i = waiting.pop()
                start = time.monotonic()
                deadline = start + self.timeout
                thread = threading.Thread(target=worker, args=(i, deadline), name=f"arpo-tool-{i}", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # the process is out of threads: answer, do not raise
                    results[i] = ToolResult(f"Error: tool {calls[i].name!r} could not start: {exc}.", error=True)
                    continue
                running[i] = (start, deadline, thread)
            if not running:
                break
            next_deadline = min(d for _, d, _ in running.values())
            try:
                i, res = done.get(timeout=min(max(0.0, next_deadline - time.monotonic()), 3600.0))
            except queue.Empty:
                now = time.monotonic()
                for j, (start, deadline, thread) in list(running.items()):
                    if deadline <= now:
                        del running[j]
                        self._abandoned.add(thread)
                        results[j] = ToolResult(
                            f"Error: tool {calls[j].name!r} timed out after {self.timeout:g} s.",
                            error=True,
                            timed_out=True,
                            duration_s=now - start,
                        )
                self._reap_abandoned()
                continue
            if i not in running:  # a late answer from an abandoned call: its slot is already given away
                continue
            start, _, _ = running.pop(i)
            res = ToolResult(self._truncate(res.text), res.error, res.timed_out, time.monotonic() - start)
            results[i] = res
            self._cache_put(keys.get(i), res)

    def _reap_abandoned(self) -> None:
        self._abandoned = {t for t in self._abandoned if t.is_alive()}
        if len(self._abandoned) >= 4 * self.max_workers:
            logger.warning(
                "%d timed-out tool calls are still running in the background; a tool ignores its own time "
                "limit (tools that can hang should bound themselves)",
                len(self._abandoned),
            )

    @property
    def abandoned_calls(self) -> int:
        """Timed-out calls whose threads are still running in the background."""
        self._reap_abandoned()
        return len(self._abandoned)

    def close(self) -> None:
        """Stop accepting rounds. Background threads of timed-out calls are daemons and die with the process."""
        self._closed = True

    def __enter__(self) -> ToolExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(tool_name(t) for t in self.tools.values())
        return f"ToolExecutor(tools=[{names}], timeout={self.timeout:g}, max_workers={self.max_workers})"


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _describe(exc: BaseException) -> str:
    """``Type: message`` for an exception, robust to hostile ``__str__`` and cut to a sane length."""
    try:
        msg = str(exc)
    except BaseException:  # noqa: BLE001
        msg = "<unprintable exception>"
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return clean_text(text if len(text) <= 1000 else text[:1000] + " …")


def _to_text(out: Any) -> str:
    """A tool's return value as text; never raises."""
    if out is None:
        return ""
    if isinstance(out, str):
        return str(out)
    if isinstance(out, bytes | bytearray):
        return bytes(out).decode("utf-8", errors="replace")
    try:
        if isinstance(out, dict | list):
            return json.dumps(out, ensure_ascii=False, default=str)
        return str(out)
    except BaseException as exc:  # noqa: BLE001
        return f"Error: the tool's output could not be converted to text ({_describe(exc)})."
