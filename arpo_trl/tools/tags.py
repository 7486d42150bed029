"""The paper's inline tag format: ``<python>code</python>`` / ``<search>query</search>`` inside one assistant
turn, the environment's answer injected as ``<result>…</result>`` (never trained on).

Generation stops right after a closing tag of a known tool; `parse_tag_call` finds that call in the segment.
"""

from __future__ import annotations

from collections.abc import Iterable

from .base import ToolCall

RESULT_OPEN = "<result>"
RESULT_CLOSE = "</result>"


def stop_strings(tool_names: Iterable[str]) -> list[str]:
    """The strings that end a generation segment: each tool's closing tag."""
    return [f"</{name}>" for name in tool_names]


def parse_tag_call(text: str, tool_names: Iterable[str]) -> ToolCall | None:
    """The tool call closed first in `text`, or None when no known closing tag occurs.

    The content is the text between the closing tag and the last matching opening tag before it
    (like the official `rindex`-based extraction). A closing tag without an opening one, or empty content,
    yields a call with `parse_error` set, so the model gets an error result instead of silence (the official
    code ends such a trajectory without a word, ARPO_SPEC D11).
    """
    first: tuple[int, str] | None = None
    for name in tool_names:
        pos = text.find(f"</{name}>")
        if pos >= 0 and (first is None or pos < first[0]):
            first = (pos, name)
    if first is None:
        return None
    close_pos, name = first
    open_tag = f"<{name}>"
    open_pos = text.rfind(open_tag, 0, close_pos)
    if open_pos < 0:
        return ToolCall(name, "", parse_error=f"Error: found </{name}> without a matching {open_tag} before it.")
    content = text[open_pos + len(open_tag) : close_pos].strip()
    if not content:
        return ToolCall(name, "", parse_error=f"Error: empty {open_tag} call; put the input between the tags.")
    return ToolCall(name, content)


def format_result(text: str) -> str:
    """Wrap a tool's output the way the model sees it inline."""
    return f"{RESULT_OPEN}\n{text}\n{RESULT_CLOSE}"
