"""Loaders for the official ARPO data, on small files written in the released files' exact layout."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arpo_trl.data import load_official_rl, load_questions, load_sharegpt
from arpo_trl.prompts import OFFICIAL_SYSTEM_PROMPT, resolve_system_prompt

# the released files store "\b" + "oxed" for \boxed: a backspace escape eaten when they were written
BROKEN = OFFICIAL_SYSTEM_PROMPT.replace("\\boxed", "\x08oxed")
MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])
# train_10k.parquet / valid.parquet (Table 1): ability, reward_model.style, extra_info.need_tools_kwargs
REASONING = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(MESSAGE)),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("index", pa.int64()),
                    ("need_tools_kwargs", pa.bool_()),
                    ("question", pa.string()),
                    ("split", pa.string()),
                ]
            ),
        ),
        ("metadata", pa.null()),
    ]
)
# hard_search_1k.parquet / gaia_test / hle_test (Table 2): ability is null, no style, no need_tools_kwargs
DEEPSEARCH = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.field("item", MESSAGE))),
        ("ability", pa.null()),
        ("reward_model", pa.struct([("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("question", pa.string()), ("split", pa.string())])),
        ("metadata", pa.null()),
    ]
)


def reasoning_row(i: int, question: str, gold: str, ability: str = "math") -> dict:
    return {
        "data_source": "DR_grpo_mix",
        "prompt": [{"content": BROKEN, "role": "system"}, {"content": question, "role": "user"}],
        "ability": ability,
        "reward_model": {"ground_truth": gold, "style": "rule"},
        "extra_info": {"index": i, "need_tools_kwargs": True, "question": question, "split": "train"},
        "metadata": None,
    }


@pytest.fixture
def reasoning_file(tmp_path):
    rows = [
        reasoning_row(0, "Compute the radius of circle $E$.", "3\\sqrt{3} - 6"),
        reasoning_row(
            1, "Who is older, William Henry Rodes Green or Eleanor Of Lancaster?", "Eleanor Of Lancaster", "qa"
        ),
        reasoning_row(2, "Solve $x^2 \\ge 16$, $x>0$.", "[4,\\infty)"),
    ]
    path = tmp_path / "train_10k.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=REASONING), path)
    return path


def test_reasoning_parquet_keeps_the_official_prompt_repaired(reasoning_file):
    ds = load_official_rl(reasoning_file)
    assert len(ds) == 3 and set(ds.column_names) == {"data_source", "prompt", "ability", "answer"}
    assert ds[0]["prompt"] == [
        {"role": "system", "content": OFFICIAL_SYSTEM_PROMPT},  # \x08oxed repaired to \boxed
        {"role": "user", "content": "Compute the radius of circle $E$."},
    ]
    assert "\x08" not in ds[0]["prompt"][0]["content"] and "\\boxed{answer here}" in ds[0]["prompt"][0]["content"]
    assert ds["answer"] == ["3\\sqrt{3} - 6", "Eleanor Of Lancaster", "[4,\\infty)"]  # list-like golds stay text
    assert ds["ability"] == ["math", "qa", "math"] and ds[1]["data_source"] == "DR_grpo_mix"
    assert load_official_rl(reasoning_file, repair_boxed=False)[0]["prompt"][0]["content"] == BROKEN
    replaced = load_official_rl(reasoning_file, system_prompt="mine")[1]["prompt"]
    assert replaced == [
        {"role": "system", "content": "mine"},
        {"role": "user", "content": ds[1]["prompt"][1]["content"]},
    ]
    assert len(load_official_rl(reasoning_file, size=2, seed=1)) == 2 and len(load_official_rl(reasoning_file)) == 3


def test_deepsearch_parquet_layout(tmp_path):
    row = {
        "data_source": "DR_simpledeepsearch0.8k",
        "prompt": [
            {"content": BROKEN, "role": "system"},
            {"content": "who illustrated winnie the pooh", "role": "user"},
        ],
        "ability": None,
        "reward_model": {"ground_truth": "E. H. Shepard"},
        "extra_info": {"index": 0, "question": "who illustrated winnie the pooh", "split": "train"},
        "metadata": None,
    }
    path = tmp_path / "hard_search_1k.parquet"
    pq.write_table(pa.Table.from_pylist([row], schema=DEEPSEARCH), path)
    ds = load_official_rl(path)
    assert ds[0]["answer"] == "E. H. Shepard" and ds[0]["prompt"][0]["content"] == OFFICIAL_SYSTEM_PROMPT


def test_official_layout_errors_name_what_is_wrong(tmp_path, reasoning_file):
    with pytest.raises(FileNotFoundError, match="official RL data file not found"):
        load_official_rl(tmp_path / "missing.parquet")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), plain)
    with pytest.raises(ValueError, match="not in the official RL layout: it needs the columns prompt, reward_model"):
        load_official_rl(plain)
    assert load_questions(str(plain))["answer"] == ["a"]  # a question/answer parquet is ordinary data
    with pytest.raises(ValueError, match="dataset_size must be positive or unset"):
        load_official_rl(reasoning_file, size=0)


def test_the_cli_reads_the_official_parquet_and_named_prompts(reasoning_file):
    from arpo_trl.train import ARPOScriptArguments, build_dataset

    ds = build_dataset(ARPOScriptArguments(dataset_name=str(reasoning_file)))
    assert len(ds) == 3 and ds[0]["prompt"][0]["content"] == OFFICIAL_SYSTEM_PROMPT  # dataset_size unset: all
    ds = build_dataset(ARPOScriptArguments(dataset_name=str(reasoning_file), system_prompt="tags", tools=["python"]))
    assert ds[0]["prompt"][0]["content"].startswith("You are a helpful assistant that solves problems step by step")
    assert (
        resolve_system_prompt("official") == OFFICIAL_SYSTEM_PROMPT and resolve_system_prompt("verbatim") == "verbatim"
    )


SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "What is 6*7?"},
            {
                "from": "gpt",
                "value": "<think>compute</think><python>print(6*7)</python><result>\n42\n</result>"
                "<answer>\\boxed{42}</answer>",
            },
        ],
        "system": BROKEN,
    },
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<answer>\\boxed{hi}</answer>"}]},
]


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_sharegpt_traces_become_messages(tmp_path, layout):
    path = tmp_path / f"final_5w4_still.{layout}"
    if layout == "json":
        path.write_text(json.dumps(SHAREGPT, ensure_ascii=False))
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SHAREGPT))
    ds = load_sharegpt(path)
    assert ds.column_names == ["messages"] and len(ds) == 2
    assert ds[0]["messages"] == [
        {"role": "system", "content": OFFICIAL_SYSTEM_PROMPT},
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": SHAREGPT[0]["conversations"][1]["value"]},
    ]
    assert [m["role"] for m in ds[1]["messages"]] == ["user", "assistant"]  # no system column: none


def test_sharegpt_errors_name_the_bad_turn(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "r"}]})
    )
    with pytest.raises(ValueError, match="unsupported ShareGPT turn .*observation"):
        load_sharegpt(path)
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}]}))
    with pytest.raises(ValueError, match="without an assistant"):
        load_sharegpt(path)
    path.write_text(json.dumps({"messages": []}))
    with pytest.raises(ValueError, match="needs a non-empty 'conversations' list"):
        load_sharegpt(path)


def test_recipe_tool_settings_reach_the_tools(tmp_path):
    from arpo_trl.tools import PythonInterpreter, WebSearch
    from arpo_trl.train import ARPOScriptArguments, build_tools

    cache = tmp_path / "search_cache.json"
    cache.write_text(json.dumps({"q": "Page 1: r"}))
    args = ARPOScriptArguments(
        tools=["python", "search"], search_cache=str(cache), python_timeout=120, python_max_output_chars=None
    )
    python, search = build_tools(args)
    assert isinstance(python, PythonInterpreter) and python.limits.wall_s == 120
    assert python.max_output_chars == python.limits.file_mb << 20  # no cap beyond the sandbox's output file limit
    assert isinstance(search, WebSearch) and search.endpoint is None and search("q") == "Page 1: r"
    python = build_tools(ARPOScriptArguments(tools=["python"], python_max_output_chars=500))[0]
    assert python.max_output_chars == 500
