"""Tool output reaches the model as plain text, never as control tokens.

A tokenizer matches its added tokens (``<|im_end|>``, ``<|eot_id|>``, ``<tool_call>``, ``</tool_response>``, ...)
anywhere in the text it is given, so a tool result that prints one of them would put a real end-of-turn, a forged
user turn or a fake tool-call marker into the model's context. Here a tool's text is tokenized with no added token
recognised: the normalizer, pre-tokenizer and model of the tokenizer's backend, which is exactly how the tokenizer
tokenizes the text *between* two added tokens, so output free of control strings gets the same ids as before.
``split_special_tokens=True`` is not enough: it leaves the added tokens that are not flagged special live
(Qwen's ``<tool_call>``, ``</tool_response>``, ``<think>``).

- `encode_plain`: a text as plain tokens (the tag format's ``<result>…</result>`` block).
- `ChatContext`: what the chat template's tool turn is rendered from (the values TRL's trainer holds).
- `tool_suffix_ids`: TRL's `GRPOTrainer._get_tool_suffix_ids` (the chat template's tool turn, sliced after the
  assistant turn the same way), with the template's own markers live and each tool message's content plain.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChatContext:
    """What a chat-template tool turn is rendered and parsed from: the values `GRPOTrainer` holds after its
    `__init__` (`processing_class`, `_tokenizer`, `chat_template`, `chat_template_kwargs`, `tools`, `_is_vlm`)."""

    processing_class: Any
    tokenizer: Any
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[Any] | None = None
    is_vlm: bool = False

    @classmethod
    def of(cls, trainer: Any) -> ChatContext:
        """The context of a TRL trainer (or anything with its attribute names), read once."""
        return cls(
            processing_class=trainer.processing_class,
            tokenizer=trainer._tokenizer,
            chat_template=trainer.chat_template,
            chat_template_kwargs=dict(trainer.chat_template_kwargs or {}),
            tools=getattr(trainer, "tools", None),
            is_vlm=bool(trainer._is_vlm),
        )


def _backend(tokenizer: Any) -> Any:
    """The `tokenizers` tokenizer behind a fast tokenizer (None for a pure-Python or SentencePiece one)."""
    return getattr(tokenizer, "backend_tokenizer", None)


def added_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every added token (special or not): the ids no tool output may produce."""
    return frozenset(int(i) for i in tokenizer.added_tokens_decoder)


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """`text`'s ids with no added token recognised (no BOS/EOS added either)."""
    backend = _backend(tokenizer)
    if backend is None:
        # No `tokenizers` backend: the closest such a tokenizer offers (a pure-Python one then splits every added
        # token as text, special or not).
        return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    words = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
    added = added_token_ids(tokenizer)
    ids = []
    for word, _ in words:
        word_ids = [token.id for token in backend.model.tokenize(word)]
        if added.intersection(word_ids):
            # Only a vocabulary whose merges or whole-word entries rebuild an added token's string lands here:
            # that word goes character by character, which no added token survives.
            word_ids = [token.id for char in word for token in backend.model.tokenize(char)]
        ids += word_ids
    return ids


def encode_pieces(tokenizer: Any, pieces: list[tuple[str, bool]]) -> list[int]:
    """Tokenize the concatenation of `pieces`, each ``(text, plain)``: trusted text keeps its added tokens live,
    plain text gets none. Text either side of an added token is tokenized as one run, plain and trusted parts
    together, exactly as the tokenizer tokenizes the whole text when the plain parts hold no control strings."""
    backend = _backend(tokenizer)
    if backend is None:  # no offsets to split at: each piece on its own (a boundary may tokenize differently)
        pieces_ids: list[int] = []
        for text, plain in pieces:
            pieces_ids += encode_plain(tokenizer, text) if plain else tokenizer.encode(text, add_special_tokens=False)
        return pieces_ids
    added = added_token_ids(tokenizer)
    runs: list[int | str] = []  # an added token's id, or text to tokenize plainly
    for text, plain in pieces:
        if plain:
            runs.append(text)
            continue
        encoding = backend.encode(text, add_special_tokens=False)
        start = 0
        for token_id, (begin, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id in added:
                runs += [text[start:begin], token_id]
                start = end
        runs.append(text[start:])
    ids: list[int] = []
    text = ""
    for run in [*runs, -1]:
        if isinstance(run, str):
            text += run
            continue
        if text:
            ids += encode_plain(tokenizer, text)
            text = ""
        if run >= 0:
            ids.append(run)
    return ids


def tool_suffix_ids(chat: ChatContext, tool_messages: list[dict[str, Any]]) -> list[int]:
    """The ids TRL's `_get_tool_suffix_ids(tool_messages)` appends after an assistant turn, except that each
    message's ``content`` is plain text.

    Each content is rendered between two markers, so whatever the template does to it (Llama 3.1's JSON-encodes
    it) lands between them and the template's own text and tokens stay exactly TRL's. The markers carry a random
    nonce and must each appear once: a tool cannot print one to end its plain span early."""
    from trl.data_utils import prepare_multimodal_messages

    nonce = secrets.token_hex(8)
    marks = [(f"\ue000{nonce}:{i}\ue001", f"\ue000/{nonce}:{i}\ue001") for i in range(len(tool_messages))]
    # A content that is not a string (a list a tool returned, kept as TRL keeps it) is rendered by the template
    # itself: marked empty here, and its rendering found below.
    marked = [
        {**m, "content": f"{open_}{c if isinstance(c := m.get('content', ''), str) else ''}{close}"}
        for m, (open_, close) in zip(tool_messages, marks, strict=True)
    ]
    # The same minimal conversation TRL uses (the real tool name: some templates derive the header from it).
    dummy: list[dict[str, Any]] = [
        {"role": "user", "content": "dummy"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}],
        },
    ]
    if chat.is_vlm:
        dummy, marked = prepare_multimodal_messages(dummy), prepare_multimodal_messages(marked)

    def render(messages: list[dict[str, Any]], tokenize: bool, generation_prompt: bool) -> Any:
        out = chat.processing_class.apply_chat_template(
            messages,
            add_generation_prompt=generation_prompt,
            tokenize=tokenize,
            chat_template=chat.chat_template,
            return_dict=False,
            **chat.chat_template_kwargs,
        )
        return out[0] if chat.is_vlm and tokenize else out

    prefix_ids = list(render(dummy, tokenize=True, generation_prompt=False))
    rest = render(dummy + marked, tokenize=False, generation_prompt=True)
    for i, message in enumerate(tool_messages):
        content = message.get("content", "")
        if not isinstance(content, str):
            open_, close = marks[i]
            text = render(dummy + marked[:i] + [message] + marked[i + 1 :], tokenize=False, generation_prompt=True)
            before, after = rest.split(open_ + close)
            # What the template made of the content: the text between the same surroundings. Where the template
            # renders a list differently around it too, the smallest differing span (still plain text).
            start = len(os.path.commonprefix([text, before]))
            end = len(os.path.commonprefix([text[start:][::-1], after[::-1]]))
            rest = before + open_ + text[start : len(text) - end] + close + after
    pieces: list[tuple[str, bool]] = []
    for open_, close in marks:
        if rest.count(open_) != 1 or rest.count(close) != 1 or rest.index(close) < rest.index(open_):
            raise ValueError("the chat template must render each tool message's content exactly once")
        before, rest = rest.split(open_)
        content, rest = rest.split(close)
        pieces += [(before, False), (content, True)]
    full_ids = encode_pieces(chat.tokenizer, [*pieces, (rest, False)])
    # As TRL: cut the prefix after its last EOS (templates that render "<|im_end|>\n" after a turn).
    eos = [i for i, token_id in enumerate(prefix_ids) if token_id == chat.tokenizer.eos_token_id]
    if eos:
        prefix_ids = prefix_ids[: eos[-1] + 1]
    if full_ids[: len(prefix_ids)] != prefix_ids:
        raise ValueError("Unexpected tokenization: the EOS-trimmed prefix IDs are not a prefix of the full IDs.")
    return full_ids[len(prefix_ids) :]
