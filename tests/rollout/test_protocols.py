"""A tool written for TRL's `GRPOTrainer` works unchanged under `ARPOTrainer` (the chat-template format).

TRL calls a synchronous tool inline on the main thread and keeps its return value in the tool message as TRL's tool
loop does (``result if isinstance(result, list) else str(result)``). The tool here is written the way TRL's
``examples/scripts/grpo_agent.py`` writes its SQL tool: bounded by ``signal.alarm`` (main thread only), querying a
SQLite connection made on the main thread (SQLite refuses it in any other thread), returning the rows as a list.
Its calls must succeed, the reward must see the list, and the model must read the tokens TRL's template renders.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sqlite3
import threading

import pytest
from fakes import ScriptedTurns, chat_protocol, tool_call

from arpo_trl import ARPOConfig, ARPOTrainer
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.trajectory import Trajectory
from arpo_trl.rollout.tree import Segment
from arpo_trl.testing import calc_dataset, chat_template_tokenizer
from arpo_trl.tools import ToolCall, ToolResult, execution_mode

M = 4
QUERY = "SELECT name, population FROM cities WHERE population > 1000000 ORDER BY name"
ROWS = [("Lagos", 15400000), ("Lima", 10700000)]


def sql_database() -> sqlite3.Connection:
    database = sqlite3.connect(":memory:")  # usable only from the thread that made it
    database.execute("CREATE TABLE cities (name TEXT, population INTEGER)")
    database.executemany("INSERT INTO cities VALUES (?, ?)", [("Lagos", 15400000), ("Lima", 10700000), ("Oslo", 7e5)])
    return database


def make_sql_tool(database: sqlite3.Connection, threads: list):
    def run_sql(query: str) -> list:
        """
        Run a read-only SQL query against the cities database.

        Args:
            query: the SQL query.

        Returns:
            The rows.
        """
        threads.append(threading.current_thread().name)

        def give_up(signum, frame):
            raise TimeoutError("the query took longer than 5 s")

        previous = signal.signal(signal.SIGALRM, give_up)  # ValueError outside the main thread
        signal.alarm(5)
        try:
            return database.execute(query).fetchall()  # ProgrammingError outside the creating thread
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return run_sql


class EvidenceReward:
    """As grpo_agent.py's reward: credit a completion whose tool result holds the rows as a list."""

    __name__ = "evidence_reward"

    def __init__(self) -> None:
        self.contents: list = []

    def __call__(self, completions, **kwargs) -> list[float]:
        scores = []
        for completion in completions:
            results = [m["content"] for m in completion if m["role"] == "tool"]
            self.contents += results
            scores.append(
                2.0 if results and all(isinstance(r, list) and ("Lima", 10700000) in r for r in results) else -1.0
            )
        return scores


def test_a_signal_alarm_tool_returning_a_list_works_as_under_trl(tool_model, tmp_path, caplog):
    tok = chat_template_tokenizer()
    threads: list[str] = []
    run_sql = make_sql_tool(sql_database(), threads)
    assert execution_mode(run_sql) == "main_thread"  # declares nothing: run as TRL runs it
    reward = EvidenceReward()
    args = ARPOConfig(
        output_dir=str(tmp_path / "sql"), per_device_train_batch_size=8, num_generations=M, max_completion_length=160,
        max_steps=1, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
        use_cpu=True, seed=0, tool_format="chat_template", initial_rollouts=2, branch_base_probability=1.0,
        branch_entropy_weight=0.0, max_tool_calling_iterations=2,
    )  # fmt: skip
    trainer = ARPOTrainer(
        model=tool_model, reward_funcs=[reward], args=args, train_dataset=calc_dataset(8), processing_class=tok,
        tools=[run_sql],
    )  # fmt: skip
    trainer.rollout_backend.generator = ScriptedTurns(
        tok, lambda turn, row: tool_call("run_sql", query=QUERY) if turn == 0 else "Done."
    )
    with caplog.at_level(logging.WARNING, logger="arpo_trl.trainer"):
        trainer.train()

    assert threads and set(threads) == {"MainThread"}
    assert reward.contents and all(c == ROWS for c in reward.contents)  # the list of row tuples, as TRL keeps it
    log = [e for e in trainer.state.log_history if "loss" in e][0]
    assert log["tools/failure_frequency"] == 0.0 and log["tools/errors"] == 0
    assert log["rewards/evidence_reward/mean"] == 2.0
    assert "every tool call" not in caplog.text

    # The model read exactly the tokens TRL's own tool loop appends for that message (its template renders the list).
    message = {"role": "tool", "name": "run_sql", "content": ROWS}
    expected = trainer._get_tool_suffix_ids([message])
    for traj in trainer.observed_rollout.trajectories:
        result = [i for i, m in zip(traj.completion_ids, traj.tool_mask, strict=True) if m == 0]
        assert result == expected
    assert "[('Lagos', 15400000), ('Lima', 10700000)]" in tok.decode(expected)


def test_when_every_call_fails_the_log_says_so_once_per_rollout(tool_model, tmp_path, caplog):
    tok = chat_template_tokenizer()

    def broken(query: str) -> str:
        """
        Always fails.

        Args:
            query: ignored.
        """
        raise ConnectionError("database is down")

    args = ARPOConfig(
        output_dir=str(tmp_path / "down"), per_device_train_batch_size=8, num_generations=M, max_completion_length=160,
        max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
        use_cpu=True, seed=0, tool_format="chat_template", initial_rollouts=2, max_tool_calling_iterations=2,
    )  # fmt: skip
    trainer = ARPOTrainer(
        model=tool_model, reward_funcs=[EvidenceReward()], args=args, train_dataset=calc_dataset(8),
        processing_class=tok, tools=[broken],
    )  # fmt: skip
    trainer.rollout_backend.generator = ScriptedTurns(
        tok, lambda turn, row: tool_call("broken", query="x") if turn == 0 else "Done."
    )
    with caplog.at_level(logging.WARNING, logger="arpo_trl.trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "every tool call" in r.getMessage()]
    calls = [len(t.tool_events) for t in trainer.observed_rollout.trajectories]
    assert len(warnings) == 2  # one per rollout (two steps), not one per call
    assert warnings[0].startswith("every tool call of this train rollout failed (")
    assert warnings[0].endswith("the last error: Error: tool 'broken' failed: ConnectionError: database is down")
    assert sum(calls) >= 8


# -------------------------- tests written for mutants that survived `make mutate` (tests/README.md, "Mutation testing")


def test_tag_protocol_hands_rewards_the_turn_as_text_and_appends_results_back_to_back(tokenizer):
    from arpo_trl.tools import format_result

    protocol = TagProtocol(tokenizer, ["calc"], result_style="official")
    traj = Trajectory(slot=0, group=0)
    traj.extend(tokenizer.encode("Sum<calc>1+2</calc>", add_special_tokens=False), sampled=True)
    traj.extend([tokenizer.eos_token_id], sampled=True)
    assert protocol.completion(traj, conversational=True) == [{"role": "assistant", "content": "Sum<calc>1+2</calc>"}]
    assert protocol.completion(traj, conversational=False) == "Sum<calc>1+2</calc>"  # no EOS string
    two = protocol.result_ids(traj, [], [ToolResult("3"), ToolResult("4")])
    assert tokenizer.decode(two) == format_result("3", "official") + format_result("4", "official")
    notice = tokenizer.decode(protocol.limit_notice_ids(traj, [], 2))
    assert notice.startswith(" <result>\nError: the tool-call limit (2) is reached")  # in the protocol's style


def _turn(tok, text, finish="eos"):
    ids = tok.encode(text, add_special_tokens=False) + ([tok.eos_token_id] if finish == "eos" else [])
    traj = Trajectory(slot=0, group=0)
    traj.extend(ids, sampled=True)
    return traj, Segment(ids, [0.0] * len(ids), finish)


def test_chat_protocol_parses_a_turns_tool_calls_as_trl_does_and_names_bad_ones():
    protocol, tok = chat_protocol()
    call = '<tool_call>\n{"name": "calc", "arguments": {"expression": "1+2"}}\n</tool_call>'
    traj, seg = _turn(tok, call)
    assert protocol.calls(traj, seg) == [ToolCall("calc", {"expression": "1+2"})]
    assert traj.messages == [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": {"expression": "1+2"}}}]}]  # fmt: skip
    traj, seg = _turn(tok, '<tool_call>\n{"name": "calc", "arguments": "1+2"}\n</tool_call>')
    assert protocol.calls(traj, seg) == [
        ToolCall("calc", {}, parse_error="Error: arguments of 'calc' are not a JSON object.")
    ]
    traj, seg = _turn(tok, call, finish="length")  # cut by the budget: parsed into the turns, not run
    assert protocol.calls(traj, seg) == [] and traj.messages[0]["tool_calls"]
    traj, seg = _turn(tok, "The answer is 3.")
    assert protocol.calls(traj, seg) == [] and traj.messages == [{"role": "assistant", "content": "The answer is 3."}]


@pytest.mark.parametrize(
    "tool_call, expected",
    [
        ({"type": "function", "function": {"name": "calc", "arguments": {"expression": "1"}}},
         ToolCall("calc", {"expression": "1"})),
        ({"function": {"name": "calc", "arguments": {}}}, ToolCall("calc", {})),  # no type: a function call
        ({"type": "retrieval", "function": {"name": "calc", "arguments": {}}},
         ToolCall("calc", {}, parse_error="Error: unsupported tool call type 'retrieval'.")),
        ({"type": "function"}, ToolCall("unknown", {}, parse_error="Error: arguments of 'unknown' are not a JSON object.")),
        ({"type": "function", "function": "calc"},
         ToolCall("unknown", {}, parse_error="Error: arguments of 'unknown' are not a JSON object.")),
        ({"type": "function", "function": {"name": "", "arguments": []}},
         ToolCall("unknown", {}, parse_error="Error: arguments of 'unknown' are not a JSON object.")),
        ("calc(1)", ToolCall("unknown", {}, parse_error="Error: unsupported tool call type 'str'.")),
    ],
)  # fmt: skip
def test_each_parsed_tool_call_becomes_a_call_or_an_error_naming_what_is_wrong(tool_call, expected):
    from arpo_trl.rollout.protocols import tool_calls_of

    ok = {"type": "function", "function": {"name": "calc", "arguments": {"expression": "2"}}}
    assert tool_calls_of({"tool_calls": [tool_call, ok]}) == [expected, ToolCall("calc", {"expression": "2"})]
    assert tool_calls_of({"role": "assistant", "content": "3"}) == tool_calls_of({"tool_calls": None}) == []


def test_chat_protocol_types_arguments_with_the_tools_schema():
    """TRL types a call's arguments with the calling tool's JSON schema ("7" → 7 for an integer parameter)."""
    protocol, tok = chat_protocol()

    def add(a: int, b: int) -> str:
        """Add two integers.

        Args:
            a: the first.
            b: the second.
        """
        return str(a + b)

    protocol.chat = dataclasses.replace(protocol.chat, tools=[add])
    traj, seg = _turn(tok, '<tool_call>\n{"name": "add", "arguments": {"a": "7", "b": 2}}\n</tool_call>')
    assert protocol.calls(traj, seg) == [ToolCall("add", {"a": 7, "b": 2})]


def test_chat_protocol_without_a_response_schema_keeps_the_turn_as_text():
    protocol, tok = chat_protocol(with_schema=False)
    traj, seg = _turn(tok, '<tool_call>\n{"name": "calc", "arguments": {"expression": "1+2"}}\n</tool_call>')
    assert protocol.calls(traj, seg) == []
    assert traj.messages == [{"role": "assistant", "content": tok.decode(seg.ids, skip_special_tokens=True)}]


def test_chat_protocol_answers_each_call_with_a_tool_turn_and_hands_rewards_the_turns():
    from arpo_trl.rollout.plain_text import tool_suffix_ids

    protocol, tok = chat_protocol()
    traj, _ = _turn(tok, "x")
    calls = [ToolCall("calc", {"expression": "1+2"}), ToolCall("calc", {"expression": "2+2"})]
    ids = protocol.result_ids(traj, calls, [ToolResult("3"), ToolResult("4")])
    results = [{"role": "tool", "name": "calc", "content": "3"}, {"role": "tool", "name": "calc", "content": "4"}]
    assert traj.messages == results and ids == tool_suffix_ids(protocol.chat, results)
    notice = protocol.limit_notice_ids(traj, calls[:1], 2)
    assert traj.messages[-1]["name"] == "calc" and traj.messages[-1]["content"].startswith(
        "Error: the tool-call limit (2) is reached"
    )
    assert notice == tool_suffix_ids(protocol.chat, [traj.messages[-1]])
    assert protocol.completion(traj, conversational=True) is traj.messages
    assert protocol.completion(traj, conversational=False) == "x"
