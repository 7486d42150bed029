"""Tools the model calls while reasoning, and the machinery that runs them."""

from .base import Tool, ToolCall, ToolResult, tool_name, tools_by_name
from .executor import ToolExecutor
from .tags import format_result, parse_tag_call, stop_strings

__all__ = [
    "Tool",
    "ToolCall",
    "ToolExecutor",
    "ToolResult",
    "format_result",
    "parse_tag_call",
    "stop_strings",
    "tool_name",
    "tools_by_name",
]
