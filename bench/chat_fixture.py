"""The chat-template twin of `arpo_trl.testing.tool_sft`, so TRL's own `GRPOTrainer(tools=[calc])` can run the task.

TRL's built-in tool loop only understands chat-template tool calls (``<tool_call>{json}</tool_call>`` for the Qwen2.5
family), not the paper's inline ``<calc>…</calc>`` tags. To compare against the real `GRPOTrainer` on the same work,
this module teaches the same tiny 2-layer Llama (SmolLM2's tokenizer) the same task — "Add a, b and c." with the
``calc`` tool called once or twice — in TRL's bundled Qwen2.5 chat template:

    <|im_start|>assistant\\n<tool_call>\\n{"name": "calc", "arguments": {"expression": "3+4"}}\\n</tool_call><|im_end|>
    \\n<|im_start|>user\\n<tool_response>\\n7\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n   (not trained)
    The answer is \\boxed{12}.<|im_end|>

Every piece is tokenized exactly as the rollouts append it: the prompt with ``apply_chat_template(tools=[calc],
add_generation_prompt=True)``, the tool turn with the same dummy-conversation difference TRL's
`GRPOTrainer._get_tool_suffix_ids` computes. Cached under ``$ARPO_CACHE`` by recipe hash, like the tag fixture.
"""

from __future__ import annotations

import hashlib
import json
import random

import torch

from arpo_trl.testing import (
    build_tiny_model,
    cache_dir,
    calc,
    calc_dataset,
    calc_prompt,
    chat_template_tokenizer,
    load_tokenizer,
    tool_sft,
)

CHAT_SYSTEM_PROMPT = "Use the calc tool to add numbers. Put the final answer in \\boxed{}."
_RECIPE_VERSION = "chat-tool-sft-v2-from-tags"


chat_tokenizer = chat_template_tokenizer  # SmolLM2's tokenizer with TRL's bundled Qwen2.5 template


def chat_calc_prompt(a: int, b: int, c: int) -> list[dict[str, str]]:
    return calc_prompt(a, b, c, system_prompt=CHAT_SYSTEM_PROMPT)


def chat_calc_dataset(size: int, seed: int = 0):
    """The rows of `arpo_trl.testing.calc_dataset(size, seed)` (same numbers, same order) with the chat prompt."""
    return calc_dataset(size, seed, system_prompt=CHAT_SYSTEM_PROMPT)


def tool_suffix_ids(tokenizer, tool_messages: list[dict]) -> list[int]:
    """Token ids of a tool turn plus the next generation prompt, as `GRPOTrainer._get_tool_suffix_ids` builds them."""
    dummy = [
        {"role": "user", "content": "dummy"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}],
        },
    ]
    prefix = tokenizer.apply_chat_template(dummy, add_generation_prompt=False, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(
        dummy + tool_messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    eos = [i for i, t in enumerate(prefix) if t == tokenizer.eos_token_id]
    if eos:
        prefix = prefix[: eos[-1] + 1]
    assert full[: len(prefix)] == prefix, "chat template is not prefix-preserving"
    return full[len(prefix) :]


def call_text(expression: str) -> str:
    """The assistant turn the Qwen2.5 template renders for one calc call (after the generation prompt)."""
    return "<tool_call>\n" + json.dumps({"name": "calc", "arguments": {"expression": expression}}) + "\n</tool_call>"


def _trace(tokenizer, a: int, b: int, c: int, two_calls: bool) -> list[tuple[list[int], bool]]:
    """(ids, trained) pieces of one completion; tool turns are not trained on."""
    eos = [tokenizer.eos_token_id]

    def said(text: str) -> tuple[list[int], bool]:
        return tokenizer.encode(text, add_special_tokens=False) + eos, True

    def answered(value: int) -> tuple[list[int], bool]:
        return tool_suffix_ids(tokenizer, [{"role": "tool", "name": "calc", "content": str(value)}]), False

    total = a + b + c
    if two_calls:
        return [
            said(call_text(f"{a}+{b}")),
            answered(a + b),
            said(call_text(f"{a + b}+{c}")),
            answered(total),
            said(f"The answer is \\boxed{{{total}}}."),
        ]
    return [said(call_text(f"{a}+{b}+{c}")), answered(total), said(f"The answer is \\boxed{{{total}}}.")]


def tool_sft_chat(tokenizer, steps: int = 200, batch_size: int = 16, seed: int = 0, lr: float = 4e-3):
    """The tiny model after a short SFT on chat-template calc traces (cached on disk by recipe hash)."""
    from transformers import LlamaForCausalLM

    recipe = json.dumps([_RECIPE_VERSION, steps, batch_size, seed, lr, len(tokenizer), tokenizer.chat_template])
    path = cache_dir() / f"tiny-calc-chat-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (path / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(path)

    # Start from the tag-format fixture: it already copies the numbers of the question into its calls.
    model = build_tiny_model(tokenizer, seed=seed)
    model.load_state_dict(tool_sft(load_tokenizer()).state_dict())
    rng = random.Random(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    prompt_cache: dict[tuple[int, int, int], list[int]] = {}
    for _ in range(steps):
        rows, labels = [], []
        for _ in range(batch_size):
            a, b, c = (rng.randint(1, 20) for _ in range(3))
            if (a, b, c) not in prompt_cache:
                prompt_cache[a, b, c] = tokenizer.apply_chat_template(
                    chat_calc_prompt(a, b, c),
                    tools=[calc],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            ids = list(prompt_cache[a, b, c])
            lab = [-100] * len(ids)
            for piece, trained in _trace(tokenizer, a, b, c, two_calls=rng.random() < 0.5):
                ids, lab = ids + piece, lab + (piece if trained else [-100] * len(piece))
            rows.append(ids)
            labels.append(lab)
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]
        shifted = target[:, 1:]
        keep = shifted != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), shifted[keep])
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    model.save_pretrained(path)
    return model


def main() -> None:
    """Build (or load) the fixture and show a few sampled completions."""
    import time

    tok = chat_tokenizer()
    start = time.monotonic()
    model = tool_sft_chat(tok)
    print(f"fixture ready in {time.monotonic() - start:.1f} s")
    ids = tok.apply_chat_template(
        chat_calc_prompt(3, 4, 5), tools=[calc], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([ids] * 4),
        attention_mask=torch.ones(4, len(ids), dtype=torch.long),
        max_new_tokens=60,
        do_sample=True,
    )
    for row in out:
        print(repr(tok.decode(row[len(ids) :])))


if __name__ == "__main__":
    main()
