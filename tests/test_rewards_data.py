import json
import threading
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset

from arpo_trl.data import fix_boxed, load_questions, tag_system_prompt, to_conversational
from arpo_trl.rewards import (
    arpo_f1_reward,
    arpo_f1_score,
    format_valid,
    get_reward_function,
    last_boxed,
    math_exact_reward,
    normalize_answer,
    token_f1,
)

# Cases with the value the official compute_score (RUC-NLPIR/ARPO, verl/utils/reward_score/deep_research.py) gives
# each, derived by running it; `expected` differs from `official` only where a `deviation` says why.
OFFICIAL_CASES = [json.loads(line) for line in (Path(__file__).parent / "data" / "arpo_f1_official_cases.jsonl").open()]

GOOD = "<think>plan</think><python>print(6*7)</python><result>\n42\n</result><answer>So \\boxed{42}.</answer>"


def test_format_check_follows_the_official_rules():
    assert format_valid(GOOD)
    assert not format_valid(GOOD.replace("<think>plan</think>", ""))  # no think block
    assert not format_valid(GOOD.replace("<result>\n42\n</result>", ""))  # a call without a result
    assert not format_valid(GOOD + "<answer>again</answer>")  # two answers
    assert not format_valid(GOOD.replace("\\boxed{42}", "42"))  # no boxed answer
    assert not format_valid(GOOD.replace("</python>", ""))  # unclosed call


def test_paper_reward_cases():
    both = GOOD.replace("<python>", "<search>q</search><result>r</result><python>")
    rewards = arpo_f1_reward(
        [GOOD, GOOD, "plain text", both, GOOD.replace("42}", "42 apples}")], ["42", "41", "42", "42", "42"]
    )
    assert rewards[0] == 1.0
    assert rewards[1] == 0.0  # valid format, F1 = 0
    assert rewards[2] == -1.0  # invalid format
    assert rewards[3] == pytest.approx(1.1)  # both tools used and F1 > 0
    assert rewards[4] == pytest.approx(2 * 0.5 * 1 / 1.5)  # partial token F1
    # gold answers may be a list: the best match counts; message-list completions are read whole
    assert arpo_f1_reward([[{"role": "assistant", "content": GOOD}]], [["7", "42"]]) == [1.0]


def test_official_case_table_is_large_and_covers_every_kind():
    kinds = Counter(c["category"].split(":")[0] for c in OFFICIAL_CASES)
    assert len(OFFICIAL_CASES) >= 200
    for kind in ("numbers", "text", "fractions", "boxes", "unicode", "after_answer", "tags_in_results", "tools"):
        assert kinds[kind] >= 10, kind
    values = Counter(c["official"] for c in OFFICIAL_CASES)
    assert values[-1.0] >= 40 and values[0.0] >= 40 and values[1.0] >= 40  # not one dominant outcome
    assert sum(0 < v < 1 or v > 1 for v in values.elements()) >= 20  # partial F1 and the multi-tool bonus


@pytest.mark.parametrize("case", OFFICIAL_CASES, ids=lambda c: f"{c['id']}-{c['category']}")
def test_arpo_f1_matches_the_official_compute_score(case):
    got = arpo_f1_score(case["response"], case["ground_truth"])
    assert got == pytest.approx(case["expected"], abs=1e-12), case.get("note", "")
    if "deviation" not in case:
        assert case["expected"] == case["official"]
    else:
        assert case["deviation"].startswith("boxed-space")  # the only documented departure
    assert arpo_f1_reward([[{"role": "assistant", "content": case["response"]}]], [case["ground_truth"]]) == [
        pytest.approx(case["expected"], abs=1e-12)
    ]


def test_official_normalisation_deletes_punctuation_and_keeps_non_ascii():
    assert normalize_answer("1,000") == "1000" and normalize_answer("E.H. Shepard") == "eh shepard"
    assert normalize_answer("The  Zürich—café, an X") == "zürich—café x"  # unicode punctuation is not ASCII's
    assert token_f1("1,000", "1000") == 1.0 and token_f1("\\text{70}", "70") == 0.0  # "text70" vs "70"


def test_tags_inside_a_tool_result_do_not_break_the_format():
    quoted = "<think>t</think><search>q</search><result>a page showing <search>x</search></result>"
    assert format_valid(quoted + "<answer>\\boxed{1}</answer>")
    stray = "<think>t</think><search>q</search><result>a page showing <search> alone</result>"
    assert format_valid(stray + "<answer>\\boxed{1}</answer>")  # the scan resumes after </result>


def test_reward_lengths_must_match():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        arpo_f1_reward(["a", "b"], ["1"])


def test_token_f1_and_boxed_extraction():
    assert token_f1("The Eiffel Tower", "eiffel tower") == 1.0
    assert token_f1("yes", "no") == 0.0
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("no box") is None


def test_math_exact_reward_in_main_thread_and_in_a_worker_thread():
    completions = ["\\boxed{0.5}", "\\boxed{\\frac{2}{4}}", "\\boxed{3}", "nothing"]
    answers = ["1/2", "0.5", "4", "1"]
    assert math_exact_reward(completions, answers) == [1.0, 1.0, 0.0, 0.0]
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=math_exact_reward(completions, answers)))
    worker.start()
    worker.join(60)
    assert result["r"] == [1.0, 1.0, 0.0, 0.0]  # no signal.alarm outside the main thread: no crash


def test_reward_registry():
    assert get_reward_function("arpo_f1") is arpo_f1_reward
    assert get_reward_function("arpo_trl.testing.closeness_reward").__name__ == "closeness_reward"
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward_function("nope")


def test_backspace_boxed_is_repaired_in_prompts():
    assert fix_boxed("put it in \x08oxed{answer here}") == "put it in \\boxed{answer here}"
    ds = to_conversational(Dataset.from_list([{"question": "q \x08oxed{}", "answer": 3}]), "sys \x08oxed{x}")
    assert ds[0]["prompt"] == [
        {"role": "system", "content": "sys \\boxed{x}"},
        {"role": "user", "content": "q \\boxed{}"},
    ]
    assert ds[0]["answer"] == "3"
    assert "\\boxed{answer}" in tag_system_prompt(["python"]) and "<python>" in tag_system_prompt(["python"])


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="no column 'question'"):
        to_conversational(Dataset.from_list([{"q": 1, "answer": 2}]), None)


def test_reasoning_gym_and_jsonl_sources(tmp_path):
    gym = load_questions("reasoning_gym:basic_arithmetic", size=5, seed=3)
    assert len(gym) == 5 and set(gym.column_names) == {"question", "answer"}
    assert gym[0] == load_questions("reasoning_gym:basic_arithmetic", size=5, seed=3)[0]  # seeded
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "a?", "answer": "1"}\n{"question": "b?", "answer": "2"}\n')
    assert load_questions(str(path))["answer"] == ["1", "2"]
