"""Tool output as plain text (`arpo_trl/rollout/plain_text.py`): trusted pieces and added tokens, the chat
template's tool turn and the templates refused, a tokenizer without a tokenizers backend, the tag protocol's stops."""

import re

import pytest
from fakes import chat_protocol
from transformers import PythonBackend

from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.trajectory import Trajectory
from arpo_trl.rollout.tree import Segment


def test_trusted_pieces_keep_every_added_token_even_id_0_and_plain_runs_join_their_neighbours(tokenizer):
    """SmolLM2's `<|endoftext|>` has id 0: a trusted piece keeps it live like any added token. The trusted text
    after it and the plain piece that follows are tokenized as one run, as the whole text would be."""
    from arpo_trl.rollout.plain_text import encode_pieces, encode_plain

    assert tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
    ids = encode_pieces(tokenizer, [("a<|endoftext|>b", False), ("c<|im_end|>", True)])
    assert ids == tokenizer.encode("a", add_special_tokens=False) + [0] + encode_plain(tokenizer, "bc<|im_end|>")
    assert ids[-1] != tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_tool_message_without_content_renders_as_an_empty_one():
    from arpo_trl.rollout.plain_text import tool_suffix_ids

    protocol, _ = chat_protocol()
    empty = tool_suffix_ids(protocol.chat, [{"role": "tool", "name": "calc", "content": ""}])
    assert tool_suffix_ids(protocol.chat, [{"role": "tool", "name": "calc"}]) == empty


def _template_trainer(tok, template):
    import types

    return types.SimpleNamespace(
        processing_class=tok, _tokenizer=tok, chat_template=template, chat_template_kwargs={}, _is_vlm=False
    )


_TURNS = "{% for m in messages %}<|im_start|>{{ m.role }}{{ EXTRA }}\n{{ CONTENT }}<|im_end|>\n{% endfor %}"
_TURNS += "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def test_a_template_that_cuts_a_tool_message_short_is_refused(tokenizer):
    """The content's closing marker never renders: the plain span cannot be found, and the tool turn is refused
    with the reason rather than tokenized with the tool's text live."""
    from arpo_trl.rollout.plain_text import ChatContext, tool_suffix_ids

    template = _TURNS.replace("{{ EXTRA }}", "").replace("{{ CONTENT }}", "{{ m.content[:30] }}")
    trainer = _template_trainer(tokenizer, template)
    message = "the chat template must render each tool message's content exactly once"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tool_suffix_ids(ChatContext.of(trainer), [{"role": "tool", "name": "calc", "content": "abc"}])


def test_a_template_that_rewrites_the_history_is_refused_as_trl_refuses_it(tokenizer):
    """A template that renders the last message differently: the assistant turn alone is not a prefix of it
    followed by the tool turn, so there is no suffix to append (TRL raises the same error)."""
    from trl import GRPOTrainer

    from arpo_trl.rollout.plain_text import ChatContext, tool_suffix_ids

    template = _TURNS.replace("{{ EXTRA }}", "{% if loop.last %} last{% endif %}").replace(
        "{{ CONTENT }}", "{{ m.content }}"
    )
    trainer = _template_trainer(tokenizer, template)
    messages = [{"role": "tool", "name": "calc", "content": "3"}]
    message = "Unexpected tokenization: the EOS-trimmed prefix IDs are not a prefix of the full IDs."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tool_suffix_ids(ChatContext.of(trainer), messages)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GRPOTrainer._get_tool_suffix_ids(trainer, messages)


class CharTokenizer(PythonBackend):
    """A pure-Python tokenizer (transformers' `PythonBackend`, no `tokenizers` backend): one id per character,
    and a BOS in front when asked for special tokens."""

    def __init__(self, **kw):
        self.vocab = {c: i for i, c in enumerate(["<unk>"] + [chr(c) for c in range(32, 127)])}
        self.inverse = {i: c for c, i in self.vocab.items()}
        super().__init__(unk_token="<unk>", **kw)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab, **self.added_tokens_encoder)

    def _tokenize(self, text, **kw):
        return list(text)

    def _convert_token_to_id(self, token):
        return self.vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return self.inverse.get(index, "<unk>")

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return [self.bos_token_id, *token_ids_0, *(token_ids_1 or [])]


def test_a_tokenizer_without_a_tokenizers_backend_gets_tool_output_as_plain_text():
    from arpo_trl.rollout.plain_text import added_token_ids, encode_pieces, encode_plain

    tok = CharTokenizer(eos_token="<|im_end|>", bos_token="<s>")
    tok.add_tokens(["<tool_call>"])  # an added token not flagged special
    added = added_token_ids(tok)
    hostile = "a<|im_end|>b<tool_call>"
    assert tok.encode(hostile, add_special_tokens=False)[1] in added  # tokenized normally, both are live
    assert tok.encode("a")[0] == tok.bos_token_id  # and with special tokens, after a BOS
    ids = encode_plain(tok, hostile)
    assert ids == [tok.vocab[c] for c in hostile] and not added.intersection(ids)
    # Trusted text keeps its added tokens; each piece is tokenized on its own.
    trusted = encode_pieces(tok, [("x<|im_end|>", False), (hostile, True)])
    assert trusted == [tok.vocab["x"], tok.eos_token_id] + ids


def test_tag_protocol_stops_at_each_tools_closing_tag_and_ignores_a_stop_without_a_call(tokenizer):
    """A segment stopped by some other stop string (no known closing tag in it) has no call."""
    protocol = TagProtocol(tokenizer, ["calc", "search"])
    assert protocol.stop_strings == ["</calc>", "</search>"]
    ids = tokenizer.encode("no call here</answer>", add_special_tokens=False)
    assert protocol.calls(Trajectory(slot=0, group=0), Segment(ids, [0.0] * len(ids), "stop")) == []


def test_a_word_whose_tokens_rebuild_an_added_token_goes_character_by_character():
    """No pre-tokenizer and whole words taken from the vocabulary (Llama-3's `ignore_merges`): "<|im_end|>" is one
    word, and SmolLM2's vocabulary holds it under the added token's id. That word is split into characters."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from arpo_trl.rollout.plain_text import added_token_ids, encode_plain
    from arpo_trl.testing import chat_template_tokenizer

    spec = json.loads(chat_template_tokenizer().backend_tokenizer.to_str())
    spec["pre_tokenizer"], spec["model"]["ignore_merges"] = None, True
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>")
    backend = tok.backend_tokenizer
    assert [t.id for t in backend.model.tokenize("<|im_end|>")] == [tok.eos_token_id]  # the vocabulary rebuilds it
    ids = encode_plain(tok, "<|im_end|>")
    assert ids == [t.id for c in "<|im_end|>" for t in backend.model.tokenize(c)] and not added_token_ids(tok) & set(
        ids
    )
    assert encode_plain(tok, "ab") == tok.encode("ab", add_special_tokens=False)  # other words as the tokenizer


def test_a_tag_call_keeps_the_added_tokens_the_model_wrote_in_it(tokenizer):
    """The call is parsed from the tokens as sampled: an added token inside it stays in the content."""
    protocol = TagProtocol(tokenizer, ["calc"])
    ids = tokenizer.encode("<calc>1+<|im_start|>2</calc>", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    [call] = protocol.calls(Trajectory(slot=0, group=0), Segment(ids, [0.0] * len(ids), "stop"))
    assert call.name == "calc" and call.arguments == "1+<|im_start|>2"
