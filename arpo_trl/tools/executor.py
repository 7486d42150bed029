"""Runs the tool calls of one generation round, each where its tool says it may run, under its own limits.

Contract: `ToolExecutor.run` never raises because of a tool (the one exception: a ``KeyboardInterrupt`` on the main
thread, which is the user's Ctrl-C). A crashing, hanging, unknown or malformed call becomes an error text the model
reads, and `ToolResult.error` / `ToolResult.timed_out` let the trainer count it.

Where a call runs (`base.execution_mode`):

- **main thread** (a synchronous tool that does not declare ``thread_safe = True``: every user tool by default):
  inline, one call after another, without a time limit or retries of ARPO's, exactly as TRL's `GRPOTrainer` calls
  it, so a tool bounded by ``signal.alarm``, one with thread-local state or a client that is not thread-safe works
  unchanged. A round called from another thread (the asynchronous vLLM driver runs rounds on worker threads) hands
  these calls to the thread inside `serve` (the trainer's main thread), which runs them while the rollout goes on;
  with nobody serving, they run inline on the calling thread, as TRL would run them there.
- **worker threads** (tools declaring ``thread_safe = True``: the sandboxed interpreter, the search tools): at
  most `max_workers` calls at once, the others queued. A call's clock starts when it starts running, so a call
  queued behind slow ones still gets its whole time limit. When a call overruns, the round stops waiting for it at
  once: it is answered with a timeout error and its slot goes to the next queued call (a Python thread cannot be
  killed, so the overrunning thread is abandoned and finishes on its own). Transient failures are retried within
  the time limit.
- **event loop** (async tools): awaited concurrently on one event loop (TRL's, when the trainer has one), each
  cancelled at its time limit, transient failures retried within it.

Limits, one per tool: a tool's own ``time_limit`` / ``output_limit`` (e.g. `PythonInterpreter`'s ``timeout`` and
``max_output_chars``) are the ones that apply to it; the executor's `timeout` and `max_response_chars` apply to the
tools that declare none. Where a tool limits itself, the executor's watchdog waits `SELF_LIMIT_GRACE_S` longer, so
the tool reports its own limit (with its partial output) rather than being cut off by the watchdog. Executor
limits given explicitly that would cut a tool short of its own (a shorter timeout, a smaller cap) contradict it:
the executor refuses them at construction, naming both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from .base import (
    UNSET,
    ExecutionMode,
    Tool,
    ToolCall,
    ToolOutput,
    ToolResult,
    clean_text,
    declared_output_limit,
    declared_time_limit,
    execution_mode,
    tool_name,
    tools_by_name,
)
from .limits import (
    DEFAULT_MAX_RESPONSE_CHARS,
    DEFAULT_TIMEOUT,
    TRANSIENT_ERRORS,
    ToolLimits,
)
from .main_thread import MainThreadServer
from .result_cache import ResultCache
from .result_text import describe, timeout_result, to_str, to_text, truncate

T = TypeVar("T")

logger = logging.getLogger(__name__)


class ToolExecutor:
    """Runs named tools where each may run, each under its own limits; see the module docstring.

    Args:
        tools: the callables the model may call.
        timeout: seconds one call of a tool that declares no ``time_limit`` may take, retries included, counted
            from the moment it starts running (threads and async; main-thread tools get no time limit of ARPO's);
            past it the model gets ``Error: tool 'NAME' timed out after T s.`` and the round goes on. Unset: 60 s.
        max_workers: calls running at once in worker threads.
        max_response_chars: the longest answer of a tool that declares no ``output_limit``; longer ones are cut,
            with a note saying so. Unset: 4,000.
        max_retries: extra attempts after a transient failure (an exception in `retry_on`), within the time limit
            (threads and async only: a main-thread tool is called once, as TRL calls it).
        retry_backoff: seconds before the first retry, doubled for each further one.
        retry_on: exception types that count as transient.
        cache_size: keep up to this many successful results, keyed by tool name and arguments, and serve
            repeated calls from memory (0: no cache). Tools whose ``cacheable`` attribute is False are never
            cached (e.g. the Python interpreter, whose programs may be random).
        empty_output_text: what the model sees when a tool returns nothing (``{name}`` is the tool's name);
            the official wrapper's wording by default.
        async_loop: the event loop async tools run on (a trainer passes TRL's); None: one of the executor's own,
            started at the first async call.
    """

    def __init__(
        self,
        tools: Sequence[Tool],
        timeout: float | None = None,
        max_workers: int = 16,
        max_response_chars: int | None = None,
        *,
        max_retries: int = 2,
        retry_backoff: float = 0.5,
        retry_on: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
        cache_size: int = 0,
        empty_output_text: str = "Tool({name}) returned empty output.",
        async_loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"tool timeout must be > 0 seconds, got {timeout}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if max_response_chars is not None and max_response_chars < 1:
            raise ValueError(f"max_response_chars must be >= 1, got {max_response_chars}")
        if max_retries < 0 or retry_backoff < 0 or cache_size < 0:
            raise ValueError("max_retries, retry_backoff and cache_size must be >= 0")
        self.tools = tools_by_name(list(tools))
        # Explicit values are kept apart from the defaults: only an explicit one can contradict a tool's own limit.
        self._explicit_timeout = None if timeout is None else float(timeout)
        self._explicit_chars = max_response_chars
        self.timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        self.max_workers = max_workers
        self.max_response_chars = DEFAULT_MAX_RESPONSE_CHARS if max_response_chars is None else max_response_chars
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.retry_on = tuple(retry_on)
        self.cache_size = cache_size
        self.empty_output_text = empty_output_text
        self._cache = ResultCache(cache_size)
        self._abandoned: set[threading.Thread] = set()
        self._closed = False
        self._server: MainThreadServer | None = None
        self._server_lock = threading.Lock()
        self._loop = async_loop
        self._loop_lock = threading.Lock()
        #: the text of the latest failed call (the trainer quotes it when every call of a step failed)
        self.last_error: str | None = None
        for tool in self.tools.values():
            self.check_limits(tool)
        unbounded = [name for name, t in self.tools.items() if self.limits(t).time_limit is None]
        if self._explicit_timeout is not None and unbounded:
            logger.warning(
                "tool_timeout=%g s does not bound %s: a synchronous tool runs inline on the main thread, as "
                "GRPOTrainer runs it, where ARPO cannot stop it. Give it a time_limit and thread_safe=True "
                "(arpo_trl.tools.declare_tool) to have ARPO bound it in a worker thread, or bound it yourself.",
                self._explicit_timeout,
                ", ".join(repr(n) for n in unbounded),
            )

    @classmethod
    def from_config(cls, tools: Sequence[Tool], args: Any, **kwargs: Any) -> ToolExecutor:
        """The executor an `ARPOConfig` describes (`tool_timeout`, `tool_max_workers`, `max_tool_response_chars`),
        as `ARPOTrainer` builds it."""
        try:
            return cls(
                tools,
                timeout=args.tool_timeout,
                max_workers=args.tool_max_workers,
                max_response_chars=args.max_tool_response_chars,
                **kwargs,
            )
        except ValueError as exc:  # name the config fields, not the executor's arguments
            message = (
                str(exc)
                .replace("the executor's timeout", "tool_timeout")
                .replace("the executor's max_response_chars", "max_tool_response_chars")
            )
            raise ValueError(message) from None

    # -- limits -----------------------------------------------------------------------------------------------

    def limits(self, tool: Tool | str) -> ToolLimits:
        """The limits that apply to `tool` (or to the executor's tool of that name)."""
        if isinstance(tool, str):
            tool = self.tools[tool]
        mode = execution_mode(tool)
        own_time = declared_time_limit(tool)
        own_chars = declared_output_limit(tool)
        if own_time is not None:
            time_limit: float | None = own_time
        else:
            time_limit = None if mode == "main_thread" else self.timeout
        output_limit = self.max_response_chars if own_chars is UNSET else own_chars
        return ToolLimits(mode, time_limit, output_limit, own=own_time is not None)

    def check_limits(self, tool: Tool) -> None:
        """Refuse explicit executor limits that would cut `tool` short of its own (they contradict each other)."""
        name = tool_name(tool)
        own_time = declared_time_limit(tool)
        if self._explicit_timeout is not None and own_time is not None and own_time > self._explicit_timeout:
            raise ValueError(
                f"conflicting time limits for tool {name!r}: the tool's own time_limit is {own_time:g} s (e.g. "
                f"python_timeout / PythonInterpreter(timeout=...)), but the executor's timeout is "
                f"{self._explicit_timeout:g} s, which would cut it short. Set one of them: leave the executor's "
                "timeout unset to let each tool's own limit apply, or give the tool the limit you want."
            )
        own_chars = declared_output_limit(tool)
        explicit = self._explicit_chars
        if explicit is not None and own_chars is not UNSET and (own_chars is None or own_chars > explicit):
            own = "no cap (None)" if own_chars is None else f"{own_chars} characters"
            raise ValueError(
                f"conflicting output limits for tool {name!r}: the tool's own output_limit is {own} (e.g. "
                f"python_max_output_chars / PythonInterpreter(max_output_chars=...)), but the executor's "
                f"max_response_chars is {explicit}, which would cut it. Set one of them: leave the executor's "
                "max_response_chars unset to let each tool's own limit apply, or give the tool the limit you want."
            )

    # -- one call ---------------------------------------------------------------------------------------------

    def _invoke(self, tool: Tool, args: str | dict[str, Any], deadline: float | None) -> Any:
        out = tool(**args) if isinstance(args, dict) else tool(args)
        if inspect.isawaitable(out):  # a synchronous callable that returned an awaitable: await it on the loop
            loop = self._event_loop()
            future = asyncio.run_coroutine_threadsafe(_await(out), loop)
            out = future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return out

    def _attempts(self, call: ToolCall, tool: Tool, deadline: float) -> ToolResult:
        """Run one call with retries; runs in its own thread. Never raises."""
        attempt = 0
        while True:
            try:
                return self._to_result(call.name, self._invoke(tool, call.arguments, deadline))
            except BaseException as exc:  # noqa: BLE001 - a tool's failure is the model's information
                transient = isinstance(exc, self.retry_on)
                delay = self.retry_backoff * (2**attempt)
                if transient and attempt < self.max_retries and time.monotonic() + delay < deadline:
                    attempt += 1
                    logger.debug("tool %r failed transiently (%s); retry %d", call.name, describe(exc), attempt)
                    time.sleep(delay)
                    continue
                tries = f" after {attempt + 1} attempts" if attempt else ""
                return ToolResult(f"Error: tool {call.name!r} failed{tries}: {describe(exc)}", error=True)

    def _call_inline(self, call: ToolCall, tool: Tool) -> ToolResult:
        """One main-thread call, as TRL makes it: once, no time limit. A KeyboardInterrupt (Ctrl-C) propagates."""
        start = time.monotonic()
        try:
            result = self._to_result(call.name, self._invoke(tool, call.arguments, None))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a tool's failure is the model's information
            result = ToolResult(f"Error: tool {call.name!r} failed: {describe(exc)}", error=True)
        return dataclasses.replace(result, duration_s=time.monotonic() - start)

    async def _call_async(self, call: ToolCall, tool: Tool, limits: ToolLimits) -> ToolResult:
        """One async call on the event loop: cancelled at its time limit, transient failures retried within it."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + (limits.watchdog or self.timeout)
        attempt = 0
        while True:
            args = call.arguments
            try:
                awaitable = tool(**args) if isinstance(args, dict) else tool(args)
                out = await asyncio.wait_for(_await(awaitable), max(0.0, deadline - loop.time()))
                result = self._to_result(call.name, out)
            except (asyncio.TimeoutError, TimeoutError) as exc:
                if loop.time() >= deadline:
                    result = timeout_result(call.name, limits)
                else:  # the tool's own TimeoutError: transient, like any other
                    result = self._async_failure(call, exc, attempt, deadline, loop.time())
            except asyncio.CancelledError:  # the round gave up on this call (`_collect_async`)
                raise
            except BaseException as exc:  # noqa: BLE001 - a tool's failure is the model's information
                result = self._async_failure(call, exc, attempt, deadline, loop.time())
            if isinstance(result, float):  # a retry after this delay
                attempt += 1
                await asyncio.sleep(result)
                continue
            return dataclasses.replace(result, duration_s=loop.time() - start)

    def _async_failure(
        self, call: ToolCall, exc: BaseException, attempt: int, deadline: float, now: float
    ) -> ToolResult | float:
        delay = self.retry_backoff * (2**attempt)
        if isinstance(exc, self.retry_on) and attempt < self.max_retries and now + delay < deadline:
            return delay
        tries = f" after {attempt + 1} attempts" if attempt else ""
        return ToolResult(f"Error: tool {call.name!r} failed{tries}: {describe(exc)}", error=True)

    def _to_result(self, name: str, out: Any) -> ToolResult:
        error = bool(getattr(out, "error", False)) if isinstance(out, ToolOutput) else False
        timed_out = bool(getattr(out, "timed_out", False)) if isinstance(out, ToolOutput) else False
        text = to_text(out)
        if not text.strip():
            text = (
                f"Error: tool {name!r} failed without a message."
                if error
                else self.empty_output_text.replace("{name}", name)
            )
        content: Any = None
        if not (error or timed_out):
            # The chat format's tool message holds what TRL's tool loop puts there: a list as it is, else str(value).
            if isinstance(out, list):
                content = out
            else:
                as_str = to_str(out)
                content = None if as_str == text else clean_text(as_str)
        return ToolResult(clean_text(text), error=error or timed_out, timed_out=timed_out, content=content)

    def _cap(self, result: ToolResult, limit: int | None) -> ToolResult:
        """Cut the answer (and a string message content) to `limit` characters, with a note; a list stays whole."""
        text = truncate(result.text, limit)
        content = result.content
        if isinstance(content, str):
            content = truncate(content, limit)
        if text is result.text and content is result.content:
            return result
        return dataclasses.replace(result, text=text, content=content)

    # -- the main thread --------------------------------------------------------------------------------------

    def serve(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a helper thread while this thread (the trainer's main thread) runs the main-thread tool
        calls that `fn`'s rounds hand to it; return what `fn` returns, or raise what it raises.

        The asynchronous driver calls its rollout through this: its rounds run on worker threads while vLLM keeps
        streaming on the engine's loop, and a tool written for TRL's inline call (``signal.alarm``, thread-local
        state) still runs on the main thread."""
        with self._server_lock:
            if self._server is not None:  # already served (a nested call): the outer server runs the calls
                return fn()
            server = self._server = MainThreadServer()
        try:
            return server.serve_while(fn)
        finally:
            with self._server_lock:
                self._server = None

    def _on_main_thread(self, fn: Callable[[], T]) -> T:
        """`fn()` on the serving thread when one serves and this is another thread; else here, inline."""
        server = self._server
        if server is None or threading.current_thread() is server.thread:
            return fn()
        return server.submit(fn).result()

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="arpo-async-tools", daemon=True).start()
                self._loop = loop
            return self._loop

    # -- a round ----------------------------------------------------------------------------------------------

    def run(
        self, calls: Sequence[ToolCall], toolsets: Sequence[Mapping[str, Tool] | None] | None = None
    ) -> list[ToolResult]:
        """Execute `calls`; results come back in the same order. Never raises for a tool.

        `toolsets[i]`, when given and not None, is the name → tool mapping call i is looked up in instead of the
        executor's own tools: the methods of the caller's environment instance (stateful, so never cached).
        """
        if self._closed:
            raise RuntimeError("ToolExecutor is closed")
        results: list[ToolResult | None] = [None] * len(calls)
        todo: dict[ExecutionMode, list[tuple[int, tuple[str, str] | None]]] = {
            "main_thread": [],
            "threads": [],
            "async": [],
        }
        targets: dict[int, Tool] = {}
        limits: dict[int, ToolLimits] = {}
        for i, call in enumerate(calls):
            bound = toolsets[i] if toolsets is not None else None
            tools = self.tools if bound is None else bound
            if not isinstance(call, ToolCall):
                results[i] = ToolResult(f"Error: malformed tool call {type(call).__name__}.", error=True)
            elif call.parse_error is not None:
                results[i] = self._cap(
                    ToolResult(clean_text(str(call.parse_error)), error=True), self.max_response_chars
                )
            elif call.name not in tools:
                known = ", ".join(sorted(tools)) or "none"
                shown = clean_text(repr(call.name))[:100]
                results[i] = ToolResult(f"Error: unknown tool {shown} (available: {known}).", error=True)
            elif not isinstance(call.arguments, str | dict):
                results[i] = ToolResult(
                    f"Error: the arguments of {call.name!r} must be a string or an object.", error=True
                )
            else:
                try:
                    limits[i] = self.limits(tools[call.name])
                except ValueError as exc:  # an environment method declaring a nonsensical limit
                    results[i] = ToolResult(f"Error: {exc}", error=True)
                    continue
                targets[i] = tools[call.name]
                key = self._cache.key(call, targets[i]) if bound is None else None
                cached = self._cache.get(key)
                if cached is not None:
                    results[i] = dataclasses.replace(cached, cached=True, duration_s=0.0)
                else:
                    todo[limits[i].mode].append((i, key))

        pending = self._start_async(calls, targets, limits, todo["async"])
        if todo["main_thread"] and todo["threads"]:
            # The worker calls start first and run while this thread (or the serving one) runs the inline calls.
            scheduler = threading.Thread(
                target=self._schedule, args=(calls, targets, limits, todo["threads"], results), daemon=True
            )
            try:
                scheduler.start()
            except RuntimeError:  # out of threads: one after the other
                scheduler = None
                self._schedule(calls, targets, limits, todo["threads"], results)
            self._run_main(calls, targets, limits, todo["main_thread"], results)
            if scheduler is not None:
                scheduler.join()
        else:
            self._schedule(calls, targets, limits, todo["threads"], results)
            self._run_main(calls, targets, limits, todo["main_thread"], results)
        self._collect_async(calls, limits, pending, results)
        keys = dict(item for items in todo.values() for item in items)
        for i, key in keys.items():
            self._cache.put(key, results[i])  # type: ignore[arg-type]
        failed = [r for r in results if r is not None and r.error]
        if failed:
            self.last_error = failed[-1].text
        return results  # type: ignore[return-value]

    def _run_main(
        self,
        calls: Sequence[ToolCall],
        targets: dict[int, Tool],
        limits: dict[int, ToolLimits],
        todo: list[tuple[int, tuple[str, str] | None]],
        results: list[ToolResult | None],
    ) -> None:
        if not todo:
            return

        def job() -> list[ToolResult]:
            return [self._call_inline(calls[i], targets[i]) for i, _ in todo]

        try:
            answers = self._on_main_thread(job)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - the main thread stopped serving (the rollout is ending)
            answers = [
                ToolResult(f"Error: tool {calls[i].name!r} did not run: {describe(exc)}", error=True) for i, _ in todo
            ]
        for (i, _), res in zip(todo, answers, strict=True):
            results[i] = self._cap(res, limits[i].output_limit)

    def _start_async(
        self,
        calls: Sequence[ToolCall],
        targets: dict[int, Tool],
        limits: dict[int, ToolLimits],
        todo: list[tuple[int, tuple[str, str] | None]],
    ) -> dict[int, concurrent.futures.Future]:
        if not todo:
            return {}
        loop = self._event_loop()
        return {
            i: asyncio.run_coroutine_threadsafe(self._call_async(calls[i], targets[i], limits[i]), loop)
            for i, _ in todo
        }

    def _collect_async(
        self,
        calls: Sequence[ToolCall],
        limits: dict[int, ToolLimits],
        pending: dict[int, concurrent.futures.Future],
        results: list[ToolResult | None],
    ) -> None:
        for i, future in pending.items():
            try:
                # The coroutine is cancelled at its own deadline; this bound only guards against a tool that blocks
                # the loop itself (synchronous work inside `async def`).
                res = future.result(timeout=(limits[i].watchdog or self.timeout) + 30.0)
            except concurrent.futures.TimeoutError:
                future.cancel()
                res = timeout_result(calls[i].name, limits[i])
            except BaseException as exc:  # noqa: BLE001 - defensive: _call_async never raises
                res = ToolResult(f"Error: tool {calls[i].name!r} failed: {describe(exc)}", error=True)
            results[i] = self._cap(res, limits[i].output_limit)

    def _schedule(
        self,
        calls: Sequence[ToolCall],
        targets: dict[int, Tool],
        limits: dict[int, ToolLimits],
        todo: list[tuple[int, tuple[str, str] | None]],
        results: list[ToolResult | None],
    ) -> None:
        done: queue.SimpleQueue[tuple[int, ToolResult]] = queue.SimpleQueue()
        running: dict[int, tuple[float, float, threading.Thread]] = {}  # index -> (start, deadline, thread)
        waiting = [i for i, _ in todo]
        waiting.reverse()  # pop() from the end keeps the calls' order

        def worker(i: int, deadline: float) -> None:
            try:
                res = self._attempts(calls[i], targets[i], deadline)
            except BaseException as exc:  # noqa: BLE001 - defensive: _attempts never raises
                res = ToolResult(f"Error: tool {calls[i].name!r} failed: {describe(exc)}", error=True)
            done.put((i, res))

        while waiting or running:
            while waiting and len(running) < self.max_workers:
                i = waiting.pop()
                start = time.monotonic()
                deadline = start + (limits[i].watchdog or self.timeout)
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
                        results[j] = dataclasses.replace(
                            timeout_result(calls[j].name, limits[j]), duration_s=now - start
                        )
                self._reap_abandoned()
                continue
            if i not in running:  # a late answer from an abandoned call: its slot is already given away
                continue
            start, _, _ = running.pop(i)
            results[i] = dataclasses.replace(
                self._cap(res, limits[i].output_limit), duration_s=time.monotonic() - start
            )

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
