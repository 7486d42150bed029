"""The paper's inline tag format: ``<python>code</python>`` / ``<search>query</search>`` inside one assistant
turn, the environment's answer injected as ``<result>…</result>`` (never trained on).

Generation stops right after a closing tag of a known tool; `parse_tag_call` finds that call in the segment.
The parser is total: any string (nested, unclosed, empty or enormous tags, binary junk) gives either ``None``
(no call) or a `ToolCall`, malformed calls carrying a `parse_error` the model is shown instead of a result.
"""

from __future__ import annotations

from collections.abc import Iterable

from .base import ToolCall

RESULT_OPEN = "<result>"
RESULT_CLOSE = "</result>"

#: Default cap on the content of one call (characters); longer calls are refused with a parse error.
MAX_CONTENT_CHARS = 100_000


EMPTY_CALL_ERROR = "Error: empty"


def is_empty_call(call: ToolCall) -> bool:
    """A call with nothing between its tags (the official code ends such a trajectory silently; docs/reproduction.md)."""
    return bool(call.parse_error) and call.parse_error.startswith(EMPTY_CALL_ERROR)


def stop_strings(tool_names: Iterable[str]) -> list[str]:
    """The strings that end a generation segment: each tool's closing tag."""
    return [f"</{name}>" for name in tool_names]


def parse_tag_call(
    text: str, tool_names: Iterable[str], max_content_chars: int | None = MAX_CONTENT_CHARS
) -> ToolCall | None:
    """The tool call closed first in `text`, or None when no known closing tag occurs.

    The content is the text between the closing tag and the last matching opening tag before it
    (like the official `rindex`-based extraction): for ``<python>a<python>b</python>`` it is ``b``.
    Closing tags of other tools and ``<result>`` blocks inside the content are kept as they are.

    Malformed calls yield a `ToolCall` with `parse_error` set, so the model gets an error result instead of
    silence (the official code ends such a trajectory without a word; docs/reproduction.md):

    - a closing tag without an opening one before it;
    - empty (or whitespace-only) content;
    - content longer than `max_content_chars` (None: no limit).

    A text that opens a tag without closing it (generation ended by EOS or the length limit) has no call.
    """
    if not isinstance(text, str) or not text:
        return None
    first: tuple[int, str] | None = None
    for name in dict.fromkeys(tool_names):  # de-duplicated, order kept
        if not isinstance(name, str) or not name:
            continue
        pos = text.find(f"</{name}>")
        if pos >= 0 and (first is None or pos < first[0]):  # the earliest closing tag wins
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
        return ToolCall(name, "", parse_error=f"{EMPTY_CALL_ERROR} {open_tag} call; put the input between the tags.")
    if max_content_chars is not None and len(content) > max_content_chars:
        return ToolCall(
            name,
            "",
            parse_error=(
                f"Error: the {open_tag} call is {len(content)} characters long; the limit is {max_content_chars}."
            ),
        )
    return ToolCall(name, content)


def format_result(text: str, style: str = "paper") -> str:
    """Wrap a tool's output the way the model sees it inline.

    A literal ``</result>`` inside the output would end the block early in the model's view, so it is
    defanged (``</result >``); the text is otherwise unchanged. ``style="official"`` adds the official code's
    leading space (``" <result>\n…\n</result>"``).
    """
    if style not in ("paper", "official"):
        raise ValueError(f"result style must be 'paper' or 'official', got {style!r}")
    text = text.replace(RESULT_CLOSE, "</result >")
    return (" " if style == "official" else "") + f"{RESULT_OPEN}\n{text}\n{RESULT_CLOSE}"
