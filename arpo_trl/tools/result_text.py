"""A tool's return value, exception or timeout as the text the model reads: never raises, whatever the tool returned."""

from __future__ import annotations

import json
from typing import Any

from .base import ToolResult, clean_text
from .limits import ToolLimits


def timeout_result(name: str, limits: ToolLimits) -> ToolResult:
    limit = limits.time_limit if limits.time_limit is not None else limits.watchdog
    return ToolResult(f"Error: tool {name!r} timed out after {limit:g} s.", error=True, timed_out=True)


def truncate(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    cut = len(text) - limit
    return text[:limit] + f"\n... [output truncated: {cut} more characters]"


def describe(exc: BaseException) -> str:
    """``Type: message`` for an exception, robust to hostile ``__str__`` and cut to a sane length."""
    try:
        msg = str(exc)
    except BaseException:  # noqa: BLE001
        msg = "<unprintable exception>"
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return clean_text(text if len(text) <= 1000 else text[:1000] + " …")


def to_str(out: Any) -> str:
    """``str(out)``, as TRL's tool loop renders a non-list result; never raises."""
    try:
        return str(out)
    except BaseException as exc:  # noqa: BLE001
        return f"Error: the tool's output could not be converted to text ({describe(exc)})."


def to_text(out: Any) -> str:
    """A tool's return value as text (the tag format's result); never raises."""
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
        return f"Error: the tool's output could not be converted to text ({describe(exc)})."
