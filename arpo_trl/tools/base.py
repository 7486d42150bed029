"""The one tool protocol shared by both tool formats of `ARPOTrainer`.

A tool is a plain Python callable with a name and a docstring:

- in ``tool_format="tags"`` it is called with one string, the text between ``<name>`` and ``</name>``;
- in ``tool_format="chat_template"`` it is called with the keyword arguments of a JSON tool call, as TRL does.

Its name is ``tool.name`` when set (tool objects such as ``PythonInterpreter``), else ``tool.__name__``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Tool = Callable[..., Any]


def tool_name(tool: Tool) -> str:
    """The name a model uses to call `tool` (the tag name in tag mode, the function name in chat mode)."""
    name = getattr(tool, "name", None) or getattr(tool, "__name__", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"tool {tool!r} has no name: give it a `name` attribute or use a named function")
    return name


def tools_by_name(tools: list[Tool] | None) -> dict[str, Tool]:
    """Index tools by name; two tools with one name are a configuration error."""
    index: dict[str, Tool] = {}
    for tool in tools or []:
        if not callable(tool):
            raise TypeError(f"tools must be callables, got {tool!r}")
        name = tool_name(tool)
        if name in index:
            raise ValueError(f"two tools share the name {name!r}; tool names must be unique")
        index[name] = tool
    return index


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for. `arguments` is the tag content (str) or the JSON arguments (dict)."""

    name: str
    arguments: str | dict[str, Any]
    # Set by the parser when the call itself is malformed (e.g. empty content): no tool runs, the model
    # receives this message as the result and `tools/errors` counts it.
    parse_error: str | None = None


@dataclass(frozen=True)
class ToolResult:
    """What the model sees (`text`) and what the metrics count."""

    text: str
    error: bool = False
    timed_out: bool = False
