"""The two tool formats, as seen by the tree rollout.

- `TagProtocol` (``tool_format="tags"``, the paper): one assistant turn; generation stops after ``</name>`` of a
  known tool; the call's content is the text between the tags; the result is appended inline as
  ``<result>…</result>`` tokens.
- `ChatTemplateProtocol` (``tool_format="chat_template"``, TRL-native): a turn ends with EOS; tool calls are parsed
  from it with TRL's `parse_response`; results are appended as the chat template's tool turn
  (`GRPOTrainer._get_tool_suffix_ids`), as TRL's own tool loop does.

In both, a tool's output is tokenized as plain text: no added token it prints becomes a control token.
"""

from __future__ import annotations

from typing import Any

from trl.chat_template_utils import parse_response

from ..tools import ToolCall, ToolResult, format_result, parse_tag_call, stop_strings
from .plain_text import ChatContext, encode_plain, tool_suffix_ids
from .trajectory import Trajectory
from .tree import Segment


def _limit_text(limit: int) -> str:
    return f"Error: the tool-call limit ({limit}) is reached; no more tools run. Give your final answer now."


class TagProtocol:
    def __init__(self, tokenizer: Any, tool_names: list[str], result_style: str = "paper") -> None:
        self.tokenizer = tokenizer
        self.tool_names = list(tool_names)
        self.stop_strings = stop_strings(self.tool_names)
        self.result_style = result_style  # "official": the official code's leading space before <result>

    @property
    def min_result_tokens(self) -> int:
        """Tokens of the shortest result (an empty one): a trajectory with less room does not run its calls."""
        if not hasattr(self, "_min_result_tokens"):
            self._min_result_tokens = len(self._encode(format_result("", self.result_style)))
        return self._min_result_tokens

    def calls(self, traj: Trajectory, segment: Segment) -> list[ToolCall]:
        if segment.finish != "stop":
            return []
        text = self.tokenizer.decode(segment.ids, skip_special_tokens=False)
        call = parse_tag_call(text, self.tool_names)
        return [call] if call is not None else []

    def _encode(self, text: str) -> list[int]:
        # Plain text: a result that prints "<|im_end|>" must not become the control token (see plain_text).
        return encode_plain(self.tokenizer, text)

    def result_ids(self, traj: Trajectory, calls: list[ToolCall], results: list[ToolResult]) -> list[int]:
        return self._encode("".join(format_result(r.text, self.result_style) for r in results))

    def limit_notice_ids(self, traj: Trajectory, calls: list[ToolCall], limit: int) -> list[int]:
        return self._encode(format_result(_limit_text(limit), self.result_style))

    def completion(self, traj: Trajectory, conversational: bool) -> Any:
        text = self.tokenizer.decode(traj.completion_ids, skip_special_tokens=True)
        return [{"role": "assistant", "content": text}] if conversational else text


def tool_calls_of(message: dict) -> list[ToolCall]:
    """The calls of a parsed assistant turn (TRL's `parse_response`). A malformed call becomes one whose result is
    the error, so the model is told what was wrong; the turn's other calls still run."""
    calls = []
    for tool_call in message.get("tool_calls") or []:
        tool_call = tool_call if isinstance(tool_call, dict) else {"type": type(tool_call).__name__}
        function = tool_call.get("function")
        function = function if isinstance(function, dict) else {}
        name = function.get("name") or "unknown"
        arguments = function.get("arguments")
        if tool_call.get("type", "function") != "function":
            error = f"Error: unsupported tool call type {tool_call.get('type')!r}."
            calls.append(ToolCall(name, {}, parse_error=error))
        elif not isinstance(arguments, dict):
            calls.append(ToolCall(name, {}, parse_error=f"Error: arguments of {name!r} are not a JSON object."))
        else:
            calls.append(ToolCall(name, arguments))
    return calls


class ChatTemplateProtocol:
    stop_strings = None

    def __init__(self, chat: ChatContext) -> None:
        self.chat = chat

    @property
    def parses_responses(self) -> bool:
        """TRL parses a turn (tool calls included) only when the tokenizer has a response template or schema, which
        it adds when tools are passed; otherwise it decodes the turn as plain assistant text (`GRPOTrainer._generate`)."""
        tok = self.chat.tokenizer
        return getattr(tok, "response_template", None) is not None or getattr(tok, "response_schema", None) is not None

    def calls(self, traj: Trajectory, segment: Segment) -> list[ToolCall]:
        tok = self.chat.tokenizer
        if not self.parses_responses:
            traj.messages.append({"role": "assistant", "content": tok.decode(segment.ids, skip_special_tokens=True)})
            return []
        # Its own prompt (a branch's is its parent's) and the turns before this one.
        context = traj.prompt_ids + traj.completion_ids[: len(traj.completion_ids) - len(segment.ids)]
        message = parse_response(tok, segment.ids, prefix=context, tools=self.chat.tools)
        traj.messages.append(message)
        if segment.finish != "eos":
            return []
        return tool_calls_of(message)

    def result_ids(self, traj: Trajectory, calls: list[ToolCall], results: list[ToolResult]) -> list[int]:
        # The content TRL's tool loop stores (a returned list stays a list): what the reward functions read.
        messages = [
            {"role": "tool", "name": c.name, "content": r.message_content} for c, r in zip(calls, results, strict=True)
        ]
        traj.messages.extend(messages)
        return tool_suffix_ids(self.chat, messages)  # TRL's tool turn, with the content as plain text

    def limit_notice_ids(self, traj: Trajectory, calls: list[ToolCall], limit: int) -> list[int]:
        messages = [{"role": "tool", "name": c.name, "content": _limit_text(limit)} for c in calls]
        traj.messages.extend(messages)
        return tool_suffix_ids(self.chat, messages)

    def completion(self, traj: Trajectory, conversational: bool) -> Any:
        """As TRL's: the turns (assistant, tool, assistant, ...) for conversational prompts, else the decoded text."""
        if conversational:
            return traj.messages
        return self.chat.tokenizer.decode(traj.completion_ids, skip_special_tokens=True)
