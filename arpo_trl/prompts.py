"""System prompts by name, for ``system_prompt:`` in recipes and `arpo-train`.

- ``official``: the prompt of the official RL data (every row of ``train_10k``, ``valid``, ``hard_search_1k``,
  ``gaia_test`` and ``hle_test`` of RUC-NLPIR/ARPO carries it, and the official evaluation's ``code_search`` prompt
  is the same text): Wikipedia search and a Python interpreter, ``<think>``/``<search>``/``<python>``/``<result>``/
  ``<answer>`` tags, the final answer in ``\\boxed{}``. The deep-search data uses this same prompt.
- ``official_search`` / ``official_math``: the official evaluation's search-only and Python-only variants.
- ``tags``: this library's own wording of the tag format for the chosen tools (`arpo_trl.data.tag_system_prompt`).

The official data files store ``\\boxed`` as a backspace followed by ``oxed`` (a ``\\b`` escape eaten when they
were written); these prompts have the intended ``\\boxed``, as `arpo_trl.data.fix_boxed` restores in the data.
"""

from __future__ import annotations

from collections.abc import Sequence

_EXAMPLE_END = (
    "<think> This is the reasoning process. </think> <answer> The final answer is \\[ \\boxed{answer here} \\] "
    "</answer>. In the last part of the answer, the final exact answer is enclosed within \\boxed{} with latex format."
)
_THINK_ANSWER = (
    "Given a question, you need to first think about the reasoning process in the mind and then provide the answer. "
)

OFFICIAL_SYSTEM_PROMPT = (
    "You are a helpful assistant that can solve the given question step by step with the help of the wikipedia "
    "search tool and python interpreter tool. " + _THINK_ANSWER + "During thinking, you can invoke the wikipedia "
    "search tool to search and python interpreter tool to calculate the math problem for fact information about "
    "specific topics if needed. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags respectively, and the search query and result are enclosed within <search> </search> and "
    "<result> </result> tags respectively. For example, <think> This is the reasoning process. </think> <search> "
    "search query here </search> <result> search result here </result> <think> This is the reasoning process. "
    "</think> <python> python code here </python> <result> python interpreter result here </result> " + _EXAMPLE_END
)

OFFICIAL_SEARCH_PROMPT = (
    "You are a helpful assistant that can solve the given question step by step with the help of the wikipedia "
    "search tool. " + _THINK_ANSWER + "During thinking, you can invoke the wikipedia search tool to search for fact "
    "information about specific topics if needed. The reasoning process and answer are enclosed within <think> "
    "</think> and <answer> </answer> tags respectively, and the search query and result are enclosed within "
    "<search> </search> and <result> </result> tags respectively. For example, <think> This is the reasoning "
    "process. </think> <search> search query here </search> <result> search result here </result> " + _EXAMPLE_END
)

OFFICIAL_MATH_PROMPT = (
    "You are a helpful assistant that can solve the given question step by step with the help of the python "
    "interpreter tool. " + _THINK_ANSWER + "During thinking, you can invoke the python interpreter tool to calculate "
    "the math problem for fact information about specific topics if needed. The reasoning process and answer are "
    "enclosed within <think> </think> and <answer> </answer> tags respectively. For example, <think> This is the "
    "reasoning process. </think> <python> python code here </python> <result> python interpreter result here "
    "</result> " + _EXAMPLE_END
)

NAMED_PROMPTS: dict[str, str] = {
    "official": OFFICIAL_SYSTEM_PROMPT,
    "official_search": OFFICIAL_SEARCH_PROMPT,
    "official_math": OFFICIAL_MATH_PROMPT,
}


def resolve_system_prompt(spec: str | None, tools: Sequence[str] = ("python", "search")) -> str:
    """A system prompt from a name (``official``, ``official_search``, ``official_math``, ``tags``) or the text
    itself; None or ``tags`` gives the tag-format instructions for `tools`."""
    if spec is None or spec == "tags":
        from .data import tag_system_prompt

        return tag_system_prompt(tools)
    return NAMED_PROMPTS.get(spec, spec)


__all__ = [
    "NAMED_PROMPTS",
    "OFFICIAL_MATH_PROMPT",
    "OFFICIAL_SEARCH_PROMPT",
    "OFFICIAL_SYSTEM_PROMPT",
    "resolve_system_prompt",
]


# `make demo`'s system prompt (arpo_trl.demo): short on purpose, as on 2 CPU cores the prompt's length is most of a
# step's cost.
DEMO_SYSTEM_PROMPT = (
    "Think in <think></think>. Run Python with <python>code</python>; its output comes back in <result></result>. "
    "Finish with <answer>\\boxed{answer}</answer>."
)
