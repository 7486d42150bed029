"""Runs the tool calls of one generation round concurrently, each bounded by a timeout.

Contract: `ToolExecutor.run` never raises because of a tool. A crashing, hanging, unknown or malformed call
becomes an error text the model reads, and `ToolResult.error` / `ToolResult.timed_out` let the trainer count it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
from collections.abc import Sequence

from .base import Tool, ToolCall, ToolResult, tools_by_name


class ToolExecutor:
    """Bounded thread pool over a set of named tools.

    Args:
        tools: the callables the model may call.
        timeout: seconds one call may take; past it the model gets a timeout error and the round goes on
            (a Python thread cannot be killed: tools that run foreign code must bound themselves, as the
            sandboxed interpreter does).
        max_workers: concurrent calls.
        max_response_chars: longer outputs are cut, with a note saying so.
    """

    def __init__(
        self,
        tools: Sequence[Tool],
        timeout: float = 60.0,
        max_workers: int = 16,
        max_response_chars: int = 4000,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"tool timeout must be > 0 seconds, got {timeout}")
        self.tools = tools_by_name(list(tools))
        self.timeout = timeout
        self.max_response_chars = max_response_chars
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="arpo-tool")

    def _call(self, call: ToolCall) -> ToolResult:
        tool = self.tools[call.name]
        args = call.arguments
        out = tool(**args) if isinstance(args, dict) else tool(args)
        if inspect.isawaitable(out):
            out = asyncio.run(_await(out))
        return ToolResult(self._truncate(str(out)))

    def _truncate(self, text: str) -> str:
        if len(text) <= self.max_response_chars:
            return text
        cut = len(text) - self.max_response_chars
        return text[: self.max_response_chars] + f"\n... [output truncated: {cut} more characters]"

    def run(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Execute `calls` concurrently; results come back in the same order."""
        results: list[ToolResult | None] = [None] * len(calls)
        futures: dict[cf.Future, int] = {}
        for i, call in enumerate(calls):
            if call.parse_error is not None:
                results[i] = ToolResult(call.parse_error, error=True)
            elif call.name not in self.tools:
                known = ", ".join(sorted(self.tools)) or "none"
                results[i] = ToolResult(f"Error: unknown tool {call.name!r} (available: {known}).", error=True)
            else:
                futures[self._pool.submit(self._call, call)] = i
        done, pending = cf.wait(futures, timeout=self.timeout)
        for fut in done:
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception as exc:  # the tool's own failure is the model's information, not ours to raise
                results[i] = ToolResult(f"Error: {type(exc).__name__}: {exc}", error=True)
        for fut in pending:
            fut.cancel()
            name = calls[futures[fut]].name
            results[futures[fut]] = ToolResult(
                f"Error: tool {name!r} timed out after {self.timeout:g} s.", error=True, timed_out=True
            )
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _await(awaitable):
    return await awaitable
