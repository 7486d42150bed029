"""Rewards with TRL's reward-function signature ``f(completions, answer, **kwargs) -> list[float]``.

- `arpo_f1_reward`: the paper's reward (ARPO_SPEC §9, Eq. 8): −1 when the format is invalid or no boxed answer can
  be read; otherwise the token-level F1 of the last ``\\boxed{}`` inside ``<answer>`` against the gold answer(s),
  +0.1 when the response used both search and Python and F1 > 0; 0 when F1 = 0.
- `math_exact_reward`: 1 when `math-verify` finds the last boxed answer equal to the gold one, else 0 — an exact
  variant for math, a departure from the paper (which trains with F1 everywhere).
"""

from __future__ import annotations

import re
import string
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the contents of a message list (tool turns included)."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, nested braces allowed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def format_valid(text: str) -> bool:
    """The official format check: balanced think tags, one answer block with a boxed answer, and every tool call
    closed and followed by a result."""
    opens, closes = text.count("<think>"), text.count("</think>")
    if opens < 1 or opens != closes:
        return False
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return False
    answer = text[text.find("<answer>") : text.find("</answer>")]
    if "\\boxed{" not in answer:
        return False
    for tag in ("search", "python"):
        for match in re.finditer(f"<{tag}>", text):
            rest = text[match.end() :]
            pos = [rest.find(t) for t in (f"</{tag}>", "<result>", "</result>")]
            if any(p < 0 for p in pos) or pos != sorted(pos):
                return False
    return True


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch if ch not in set(string.punctuation) else " " for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer"):
        return float(pred == ref)
    p_tokens, g_tokens = pred.split(), ref.split()
    common = sum((Counter(p_tokens) & Counter(g_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p_tokens), common / len(g_tokens)
    return 2 * precision * recall / (precision + recall)


def _golds(answer: Any) -> list[str]:
    return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]


def arpo_f1_reward(completions: list, answer: list, **kwargs) -> list[float]:
    """The paper's reward (Eq. 8): format −1, else F1 of the boxed answer, +0.1 for using both tools."""
    rewards = []
    for completion, gold in zip(completions, answer):
        text = completion_text(completion)
        if not format_valid(text):
            rewards.append(-1.0)
            continue
        block = text[text.find("<answer>") : text.find("</answer>")]
        predicted = last_boxed(block)
        if predicted is None:
            rewards.append(-1.0)
            continue
        f1 = max(token_f1(predicted, g) for g in _golds(gold))
        both_tools = "</search>" in text and "</python>" in text
        rewards.append(f1 + 0.1 * both_tools if f1 > 0 else 0.0)
    return rewards


def math_exact_reward(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 when math-verify judges the last boxed answer equal to the gold answer, else 0.0.

    math-verify bounds its work with `signal.alarm`, which only works in the main thread; elsewhere (async
    rewards, thread pools) its timeouts are turned off, so callers there must bound the time themselves.
    """
    from math_verify import parse, verify

    in_main = threading.current_thread() is threading.main_thread()
    timeouts = {} if in_main else {"parsing_timeout": None}
    rewards = []
    for completion, gold in zip(completions, answer):
        predicted = last_boxed(completion_text(completion))
        if predicted is None:
            rewards.append(0.0)
            continue
        try:
            ok = any(
                verify(
                    parse(f"${g}$", **timeouts),
                    parse(f"${predicted}$", **timeouts),
                    **({} if in_main else {"timeout_seconds": None}),
                )
                for g in _golds(gold)
            )
        except Exception:  # an unparsable answer is a wrong answer, not a crashed step
            ok = False
        rewards.append(float(ok))
    return rewards


REWARD_FUNCTIONS: dict[str, Callable[..., list[float]]] = {
    "arpo_f1": arpo_f1_reward,
    "math_exact": math_exact_reward,
}


def get_reward_function(name: str) -> Callable[..., list[float]]:
    """A reward by registry name, or by dotted path ``package.module.function``."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if "." in name:
        import importlib

        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    raise ValueError(f"unknown reward {name!r}; use one of {', '.join(REWARD_FUNCTIONS)} or a dotted path")
