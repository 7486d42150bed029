"""Training data: TRL ``prompt`` datasets as they are, and question/answer rows turned into conversational prompts
with ARPO's tag-format system prompt.

A dataset with a ``prompt`` column (standard: text; conversational: a list of messages) is TRL's own layout and is
used unchanged, every other column included, so TRL's reward functions receive the columns they name (e.g.
``solution``). Sources: an HF `datasets` dataset (local directory or loadable name), a JSONL or parquet file, or a procedurally
generated, verifiable task from `reasoning-gym` (``reasoning_gym:<task>``, e.g. ``basic_arithmetic`` or
``gsm_symbolic``), which needs no download.

The official ARPO data (RUC-NLPIR/ARPO, also on the Hub as ``dongguanting/ARPO-RL-Reasoning-10K``,
``ARPO-RL-DeepSearch-1K`` and ``ARPO-SFT-54K``) reads from local files:

- `load_official_rl`: the RL parquet files (``train_10k``, ``valid``, ``hard_search_1k``, ``gaia_test``,
  ``hle_test``), verl's layout: ``data_source``, ``prompt`` (a system and a user message), ``ability``,
  ``reward_model.ground_truth``, ``extra_info`` (``index``, ``question``, ``split``).
- `load_sharegpt`: the cold-start SFT traces, LLaMA-Factory's ShareGPT layout (``conversations``: a list of
  ``{"from": "human"|"gpt", "value": ...}``, and a ``system`` column), as TRL ``messages``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from datasets import Dataset, Value, load_dataset, load_from_disk

_TOOL_LINES = {
    "python": "- To run Python, write code between <python> and </python>. Whatever it prints comes back between "
    "<result> and </result>.",
    "search": "- To search the web, write a query between <search> and </search>. The top results come back between "
    "<result> and </result>.",
}


def tag_system_prompt(tools: Sequence[str] = ("python", "search")) -> str:
    """Our wording of the paper's instructions for the inline tag format (``system_prompt: official`` gives the
    official text, `arpo_trl.prompts`)."""
    tool_lines = "\n".join(
        _TOOL_LINES.get(t, f"- To use {t}, write its input between <{t}> and </{t}>.") for t in tools
    )
    return (
        "You are a helpful assistant that solves problems step by step and may use tools.\n"
        "Reason inside <think> and </think>.\n"
        f"{tool_lines}\n"
        "You may use the tools several times. When you are done, write the final answer inside <answer> and "
        "</answer>, ending with the exact answer in LaTeX: \\boxed{answer}."
    )


def fix_boxed(text: str) -> str:
    """Repair ``\\x08oxed`` (a ``\\b`` escape eaten when the official data files were written) into ``\\boxed``."""
    return text.replace("\x08oxed", "\\boxed")


def to_conversational(
    dataset: Dataset,
    system_prompt: str | None,
    question_column: str = "question",
    answer_column: str = "answer",
) -> Dataset:
    """Rows with a question and an answer → TRL conversational prompts plus an `answer` column for ARPO's rewards.

    Every column stays as it is (TRL passes them to reward functions under their own names): an answer column
    named otherwise (``solution``) is kept and copied, as text, into `answer`; a column named `answer` becomes
    text (ARPO's rewards compare text).
    """
    for column in (question_column, answer_column):
        if column not in dataset.column_names:
            raise ValueError(f"dataset has no column {column!r} (columns: {', '.join(dataset.column_names)})")
    if "prompt" in dataset.column_names:
        raise ValueError("dataset already has a 'prompt' column: it is a TRL prompt dataset, used as it is")
    if answer_column != "answer" and "answer" in dataset.column_names:
        raise ValueError(
            f"answer_column is {answer_column!r} but the dataset also has an 'answer' column, which ARPO's rewards "
            "would read instead: rename one of them"
        )

    if answer_column == "answer" and isinstance(dataset.features["answer"], Value):
        if dataset.features["answer"].dtype != "string":
            dataset = dataset.cast_column("answer", Value("string"))  # rewards compare text

    def convert(row):
        messages = [{"role": "system", "content": fix_boxed(system_prompt)}] if system_prompt else []
        messages.append({"role": "user", "content": fix_boxed(str(row[question_column]))})
        answer = row[answer_column]
        return {"prompt": messages, "answer": answer if isinstance(answer, list) else str(answer)}

    return dataset.map(convert)


def is_prompt_dataset(dataset: Dataset) -> bool:
    """Whether rows are TRL's prompt layout: a ``prompt`` column, and not the official RL layout."""
    return "prompt" in dataset.column_names and not is_official_rl(dataset)


def _is_messages(value) -> bool:
    # a role that is not text: Arrow fills the keys one row lacks with None when rows' messages differ in shape
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)
    )


def prompt_dataset(dataset: Dataset, system_prompt: str | None = None) -> Dataset:
    """A TRL prompt dataset, checked and otherwise unchanged; `system_prompt`, when given, replaces the system
    message of conversational prompts (or is put first where there is none).

    Every prompt must be text (standard) or a list of ``{role, content}`` messages (conversational), all rows
    alike; a system prompt cannot be added to text prompts (their chat template is applied by the trainer, and
    the text may already hold one), so that combination is refused.
    """
    prompts = dataset["prompt"]
    kinds = {"standard" if isinstance(p, str) else "conversational" if _is_messages(p) else None for p in prompts}
    if None in kinds:
        index = next(i for i, p in enumerate(prompts) if not isinstance(p, str) and not _is_messages(p))
        raise ValueError(
            f"row {index}: 'prompt' must be text or a list of {{role, content}} messages, got {prompts[index]!r}"
        )
    if len(kinds) > 1:
        raise ValueError("the 'prompt' column mixes text and message lists: use one layout for every row")
    if system_prompt is None:
        return dataset
    if kinds == {"standard"}:
        raise ValueError(
            "system_prompt cannot be added to a standard (text) prompt dataset: leave system_prompt unset, or "
            "use conversational prompts (lists of messages)"
        )

    def convert(row):
        messages = [m for m in row["prompt"] if m["role"] != "system"]
        return {"prompt": [{"role": "system", "content": system_prompt}] + messages}

    return dataset.map(convert)


def reasoning_gym_dataset(task: str, size: int, seed: int = 0) -> Dataset:
    """`size` generated problems of a reasoning-gym task, as question/answer rows."""
    from .extras import require

    reasoning_gym = require("reasoning_gym")
    generated = reasoning_gym.create_dataset(task, size=size, seed=seed)
    return Dataset.from_list([{"question": item["question"], "answer": str(item["answer"])} for item in generated])


def _subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """`size` rows drawn with `seed`, or the whole dataset when `size` is None (or not smaller)."""
    if size is not None and size < 1:
        raise ValueError(f"dataset_size must be positive or unset (the whole dataset), got {size}")
    if size is not None and size < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(size))
    return dataset


def load_questions(
    spec: str, size: int | None = None, seed: int = 0, split: str = "train", config: str | None = None
) -> Dataset:
    """A dataset from ``reasoning_gym:<task>``, a ``.jsonl``/``.json``/``.parquet`` file, a saved dataset, or a
    directory of data files or a name (read with `datasets.load_dataset`, its `config` and `split`). `size` rows are
    drawn with `seed`; None means all of them (1,000 generated ones for reasoning_gym, which has no natural size)."""
    if spec.startswith("reasoning_gym:"):
        return reasoning_gym_dataset(spec.split(":", 1)[1], size or 1000, seed)
    if spec.endswith(".jsonl") or spec.endswith(".json"):
        with open(spec) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        dataset = Dataset.from_list(rows)
    elif spec.endswith(".parquet"):
        dataset = Dataset.from_parquet(spec)
    elif os.path.isdir(spec) and os.path.exists(os.path.join(spec, "dataset_info.json")):
        dataset = load_from_disk(spec)
    else:
        dataset = load_dataset(spec, name=config, split=split)
    return _subset(dataset, size, seed)


# -- the official data ---------------------------------------------------------------------------------------------

OFFICIAL_RL_COLUMNS = ("prompt", "reward_model")


def is_official_rl(dataset: Dataset) -> bool:
    """Whether rows are in the official RL layout (verl's: a ``prompt`` message list and ``reward_model``)."""
    return all(c in dataset.column_names for c in OFFICIAL_RL_COLUMNS)


def load_official_rl(
    path: str | os.PathLike,
    size: int | None = None,
    seed: int = 0,
    system_prompt: str | None = None,
    repair_boxed: bool = True,
) -> Dataset:
    """An official RL parquet file (e.g. ``rl_datasets/train_10k.parquet``) as TRL conversational prompts.

    Each row keeps its own messages (the official system prompt and the question), with ``\\x08oxed`` repaired
    unless `repair_boxed` is False; `system_prompt`, when given, replaces the system message. The gold answer
    ``reward_model.ground_truth`` becomes the `answer` column the rewards read; ``data_source`` and ``ability``
    stay as columns. `size` rows are drawn with `seed` (None: all).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official RL data file not found: {path}")
    dataset = Dataset.from_parquet(path) if path.endswith(".parquet") else load_questions(path)
    if not is_official_rl(dataset):
        raise ValueError(
            f"{path} is not in the official RL layout: it needs the columns {', '.join(OFFICIAL_RL_COLUMNS)} "
            f"(it has {', '.join(dataset.column_names)})"
        )
    return official_rl_to_conversational(_subset(dataset, size, seed), system_prompt, repair_boxed)


def official_rl_to_conversational(
    dataset: Dataset, system_prompt: str | None = None, repair_boxed: bool = True
) -> Dataset:
    """Rows in the official RL layout → ``prompt`` messages and an ``answer`` column (see `load_official_rl`)."""
    fix = fix_boxed if repair_boxed else (lambda text: text)

    def convert(row, index):
        messages = row["prompt"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"row {index}: 'prompt' must be a list of {{role, content}} messages, got {messages!r}")
        messages = [{"role": m["role"], "content": fix(str(m.get("content") or ""))} for m in messages]
        if system_prompt is not None:
            messages = [{"role": "system", "content": system_prompt}] + [m for m in messages if m["role"] != "system"]
        reward_model = row["reward_model"] or {}
        if "ground_truth" not in reward_model or reward_model["ground_truth"] is None:
            raise ValueError(f"row {index}: reward_model has no ground_truth ({reward_model!r})")
        gold = reward_model["ground_truth"]
        return {"prompt": messages, "answer": gold if isinstance(gold, list) else str(gold)}

    # extra_info, metadata and reward_model are folded into prompt/answer; data_source and ability stay.
    drop = [c for c in ("reward_model", "extra_info", "metadata") if c in dataset.column_names]
    return dataset.map(convert, with_indices=True, remove_columns=drop)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_to_messages(row: dict, repair_boxed: bool = True) -> list[dict]:
    """One ShareGPT row (LLaMA-Factory's layout: ``conversations`` with ``from``/``value``, and ``system``) as
    TRL messages. Tool results in the ARPO traces sit inside the assistant turns; separate ``observation`` or
    ``function_call`` turns are refused (LLaMA-Factory renders them with its own tags)."""
    fix = fix_boxed if repair_boxed else (lambda text: text)
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"a ShareGPT row needs a non-empty 'conversations' list, got {turns!r}")
    messages = [{"role": "system", "content": fix(str(row["system"]))}] if row.get("system") else []
    for turn in turns:
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        if role not in _SHAREGPT_ROLES:
            raise ValueError(
                f"unsupported ShareGPT turn {turn!r}: 'from' must be one of {', '.join(sorted(_SHAREGPT_ROLES))}"
            )
        messages.append({"role": _SHAREGPT_ROLES[role], "content": fix(str(turn.get("value", turn.get("content"))))})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"a ShareGPT row without an assistant ('gpt') turn has nothing to train on: {turns!r}")
    return messages


def load_sharegpt(
    path: str | os.PathLike, size: int | None = None, seed: int = 0, repair_boxed: bool = True
) -> Dataset:
    """The cold-start traces (``final_5w4_still.jsonl`` / ARPO-SFT-54K: a JSON list or JSONL of ShareGPT rows) as
    a TRL conversational dataset with one ``messages`` column."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ShareGPT file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    rows = (
        json.loads(text)
        if stripped.startswith("[")
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON list or JSONL of objects with 'conversations'")
    dataset = Dataset.from_list([{"messages": sharegpt_to_messages(r, repair_boxed)} for r in rows])
    return _subset(dataset, size, seed)


def arithmetic(size: int, seed: int):
    """`make demo`'s task: reasoning-gym arithmetic without division (so Python's printed value is the gold answer)."""
    from datasets import Dataset

    from .extras import require

    reasoning_gym = require("reasoning_gym")

    items = reasoning_gym.create_dataset(
        "basic_arithmetic",
        size=size,
        seed=seed,
        min_terms=2,
        max_terms=3,
        min_digits=1,
        max_digits=2,
        operators=("+", "-", "*"),
    )
    return Dataset.from_list([{"question": it["question"], "answer": str(it["answer"])} for it in items])
