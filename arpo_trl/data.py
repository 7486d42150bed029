"""Training data: question/answer rows to conversational prompts with ARPO's tag-format system prompt.

Sources: an HF `datasets` dataset (local directory or loadable name), a JSONL file, or a procedurally generated,
verifiable task from `reasoning-gym` (``reasoning_gym:<task>``, e.g. ``basic_arithmetic`` or ``gsm_symbolic``),
which needs no download.
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
    """Our wording of the paper's instructions for the inline tag format (ARPO_SPEC §8.1)."""
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
    """Repair ``\\x08oxed`` (a ``\\b`` escape eaten by the official data files, ARPO_SPEC D9) into ``\\boxed``."""
    return text.replace("\x08oxed", "\\boxed")


def to_conversational(
    dataset: Dataset,
    system_prompt: str | None,
    question_column: str = "question",
    answer_column: str = "answer",
) -> Dataset:
    """Rows with a question and an answer → TRL conversational prompts plus an `answer` column for rewards."""
    for column in (question_column, answer_column):
        if column not in dataset.column_names:
            raise ValueError(f"dataset has no column {column!r} (columns: {', '.join(dataset.column_names)})")

    if isinstance(dataset.features[answer_column], Value) and dataset.features[answer_column].dtype != "string":
        dataset = dataset.cast_column(answer_column, Value("string"))  # rewards compare text

    def convert(row):
        messages = [{"role": "system", "content": fix_boxed(system_prompt)}] if system_prompt else []
        messages.append({"role": "user", "content": fix_boxed(str(row[question_column]))})
        answer = row[answer_column]
        return {"prompt": messages, "answer": answer if isinstance(answer, list) else str(answer)}

    # Other columns stay: TRL passes them to reward functions.
    return dataset.map(convert, remove_columns=list({question_column, answer_column}))


def reasoning_gym_dataset(task: str, size: int, seed: int = 0) -> Dataset:
    """`size` generated problems of a reasoning-gym task, as question/answer rows."""
    try:
        import reasoning_gym
    except ImportError as exc:  # pragma: no cover - installed by make install
        raise ImportError("reasoning_gym:<task> datasets need `pip install reasoning-gym==0.1.25`") from exc
    generated = reasoning_gym.create_dataset(task, size=size, seed=seed)
    return Dataset.from_list([{"question": item["question"], "answer": str(item["answer"])} for item in generated])


def load_questions(spec: str, size: int | None = None, seed: int = 0, split: str = "train") -> Dataset:
    """A question/answer dataset from ``reasoning_gym:<task>``, a ``.jsonl`` file, a saved dataset or a name."""
    if spec.startswith("reasoning_gym:"):
        return reasoning_gym_dataset(spec.split(":", 1)[1], size or 1000, seed)
    if spec.endswith(".jsonl") or spec.endswith(".json"):
        with open(spec) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        dataset = Dataset.from_list(rows)
    elif os.path.isdir(spec) and os.path.exists(os.path.join(spec, "dataset_info.json")):
        dataset = load_from_disk(spec)
    else:
        dataset = load_dataset(spec, split=split)
    if size is not None and size < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(size))
    return dataset
