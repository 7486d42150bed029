"""Rewards with TRL's reward-function signature ``f(completions, answer, **kwargs) -> list[float]``.

- `arpo_f1_reward`: the paper's reward (Eq. 8), computed as the official ``compute_score`` of RUC-NLPIR/ARPO
  (``verl/utils/reward_score/deep_research.py``): −1 when the format is invalid or no boxed answer can be read;
  otherwise the SQuAD-style token F1 of the last ``\\boxed{}`` inside ``<answer>`` against the gold answer(s),
  +0.1 when the response used both search and Python and F1 > 0; 0 when F1 = 0. It agrees with the official
  function on every case of ``tests/data/arpo_f1_official_cases.jsonl`` but the documented ``\\boxed `` (space)
  one; docs/reproduction.md explains it.
- `math_exact_reward`: 1 when `math-verify` finds the last boxed answer equal to the gold one, else 0 — an exact
  variant for math, a departure from the paper (which trains with F1 everywhere).

`get_reward_function` also resolves the names ``trl grpo`` knows (TRL's own reward functions, with the parameters
TRL's script gives them) and dotted paths, imported from the current directory as TRL's script does.
"""

from __future__ import annotations

import re
import string
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the contents of a message list (tool turns included)."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed); None when there is none or it is unclosed."""
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


def boxed_answer(answer: str) -> str | None:
    """The boxed answer the official reward reads from the content of ``<answer>``, or None (a format error).

    As officially, the extraction starts at the *last* ``\\boxed``: when that one does not open a brace group
    closed later (``\\boxed{5} or \\boxed``, ``\\boxed\\,{5}``, ``\\boxed{5``) there is no answer. One
    deliberate departure: the official code gives priority to a ``\\boxed `` followed by a space *anywhere* in
    the answer and grades the text after the last one, up to a ``$``, so ``\\boxed{Paris} (the \\boxed
    answer)`` is graded on ``answer)`` and ``\\boxed{Paris} \\boxed `` on nothing. The paper grades the last
    ``\\boxed{}``, which its prompt asks for, so here a ``\\boxed`` followed by a space is ignored
    (docs/reproduction.md lists the case).
    """
    starts = [m.start() for m in _BOXED.finditer(answer)]
    # from the last \boxed on, a \boxed{ can only be that one: anything else reads as no answer
    return last_boxed(answer[starts[-1] :]) if starts else None


_BOXED = re.compile(r"\\boxed(?! )")


def format_valid(text: str) -> bool:
    """The official format check (``validate_format``).

    Balanced, present think tags; exactly one ``<answer>`` and one ``</answer>``, in that order, holding a
    ``\\boxed{`` and a ``}``; and for each tool tag, every call opened is closed, then answered by a
    ``<result>…</result>`` in that order. The scan for the next call resumes after each ``</result>``, so tags
    quoted inside a tool result (a web page showing ``<search>``) are skipped, as officially.
    """
    opens = text.count("<think>")
    if opens == 0 or opens != text.count("</think>"):
        return False
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return False
    for tag in ("search", "python"):
        cursor = 0
        while (call := text.find(f"<{tag}>", cursor)) >= 0:
            close = text.find(f"</{tag}>", call)
            result = text.find("<result>", call)
            if close < 0 or result < 0:
                return False
            result_end = text.find("</result>", result)
            if result_end < 0 or not call < close < result < result_end:
                return False
            cursor = result_end  # resume after this call's result: tags inside it are not calls
    start, end = text.find("<answer>"), text.find("</answer>")
    if start > end:
        return False
    answer = text[start:end]
    return "\\boxed{" in answer and "}" in answer


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation, as the official reward: lower-case, *delete* ASCII punctuation (``1,000`` → ``1000``),
    drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_EXACT_ONLY = ("yes", "no", "noanswer")


def token_f1(prediction: str, gold: str) -> float:
    """Token-level F1 of the normalised strings; yes/no/noanswer on either side must match exactly."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in _EXACT_ONLY or ref in _EXACT_ONLY) and pred != ref:
        return 0.0
    p_tokens, g_tokens = pred.split(), ref.split()
    common = sum((Counter(p_tokens) & Counter(g_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p_tokens), common / len(g_tokens)
    return 2 * precision * recall / (precision + recall)


def _golds(answer: Any) -> list[str]:
    if isinstance(answer, str):
        return [answer]
    if isinstance(answer, Iterable):  # lists, tuples, numpy arrays from parquet
        return [str(a) for a in answer]
    return [str(answer)]


def arpo_f1_score(text: str, gold: Any) -> float:
    """The paper's reward (Eq. 8) for one response, as the official ``compute_score``.

    −1 when the format is invalid or no boxed answer can be read; else the best token F1 of the boxed answer
    against the gold answer(s), +0.1 when F1 > 0 and the response contains both ``</search>`` and ``</python>``
    (anywhere, tool results included, as officially); 0 when F1 = 0.
    """
    if not format_valid(text):
        return -1.0
    answer = text[text.find("<answer>") + len("<answer>") : text.find("</answer>")]
    predicted = boxed_answer(answer)
    if predicted is None:
        return -1.0
    f1 = max((token_f1(predicted, g) for g in _golds(gold)), default=0.0)
    if f1 <= 0:
        return 0.0
    return f1 + 0.1 if "</search>" in text and "</python>" in text else f1


def arpo_f1_reward(completions: list, answer: list, **kwargs) -> list[float]:
    """The paper's reward (Eq. 8) with TRL's signature: `arpo_f1_score` of each completion."""
    if len(completions) != len(answer):
        raise ValueError(f"arpo_f1_reward got {len(completions)} completions but {len(answer)} answers")
    return [arpo_f1_score(completion_text(c), gold) for c, gold in zip(completions, answer)]


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

# The names `trl grpo` (trl/scripts/grpo.py) resolves, to what it resolves them: TRL's reward functions, and the
# soft overlong punishment built with the parameters that script gives it.
TRL_REWARD_NAMES = (
    "accuracy_reward",
    "reasoning_accuracy_reward",
    "think_format_reward",
    "get_soft_overlong_punishment",
)


def trl_reward_function(name: str) -> Callable[..., list[float]]:
    """TRL's reward function `name`, exactly as ``trl grpo`` builds it."""
    import trl.rewards

    if name == "get_soft_overlong_punishment":
        return trl.rewards.get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256)
    if name not in TRL_REWARD_NAMES:
        raise ValueError(f"{name!r} is not one of TRL's named rewards ({', '.join(TRL_REWARD_NAMES)})")
    return getattr(trl.rewards, name)


def get_reward_function(name: str) -> Callable[..., list[float]]:
    """A reward by name (ARPO's: arpo_f1, math_exact; TRL's: accuracy_reward, ...), or by dotted path
    ``package.module.function``, imported from the current directory too (TRL's script puts it on sys.path)."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if name in TRL_REWARD_NAMES:
        return trl_reward_function(name)
    if "." in name:
        import importlib
        import os
        import sys

        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load reward {name!r}: {exc}") from exc
    known = ", ".join([*REWARD_FUNCTIONS, *TRL_REWARD_NAMES])
    raise ValueError(f"unknown reward {name!r}; use one of {known} or a dotted path")
