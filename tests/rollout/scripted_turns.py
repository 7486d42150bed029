"""Scripted chat turns for trainer tests in the chat-template tool format (the tiny model was taught the tag format,
not JSON tool calls): a stand-in for the round driver's generator that emits chosen assistant turns token for token."""

from __future__ import annotations

import json
from collections.abc import Callable

from arpo_trl.rollout.round_driver import Segment


class ScriptedTurns:
    """`script(turn, row)` gives the text of assistant turn `turn` (the number of tool responses already in the
    prefix) of the `row`-th trajectory segment generated so far. Scripted tokens get entropy 0."""

    def __init__(self, tokenizer, script: Callable[[int, int], str]) -> None:
        self.tok, self.script, self.rows = tokenizer, script, 0

    def __call__(self, prefixes, max_new_tokens, need_entropy=None) -> list[Segment]:
        out = []
        for prefix in prefixes:
            text = self.script(self.tok.decode(prefix).count("<tool_response>"), self.rows)
            self.rows += 1
            ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
            out.append(Segment(ids, [0.0] * len(ids), "eos"))
        return out


def tool_call(name: str, **arguments) -> str:
    """A tool call in the Qwen2.5 template's format (`arpo_trl.testing.chat_template_tokenizer`)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"
