"""A tool written for TRL's `GRPOTrainer` works unchanged under `ARPOTrainer` (the chat-template format).

TRL calls a synchronous tool inline on the main thread and keeps its return value in the tool message as TRL's tool
loop does (``result if isinstance(result, list) else str(result)``). The tool here is written the way TRL's
``examples/scripts/grpo_agent.py`` writes its SQL tool: bounded by ``signal.alarm`` (main thread only), querying a
SQLite connection made on the main thread (SQLite refuses it in any other thread), returning the rows as a list.
Its calls must succeed, the reward must see the list, and the model must read the tokens TRL's template renders.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading

from fakes import ScriptedTurns, tool_call

from arpo_trl import ARPOConfig, ARPOTrainer
from arpo_trl.testing import calc_dataset, chat_template_tokenizer
from arpo_trl.tools import execution_mode

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
    trainer.generator = ScriptedTurns(
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
    for traj in trainer.last_rollout.trajectories:
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
    trainer.generator = ScriptedTurns(tok, lambda turn, row: tool_call("broken", query="x") if turn == 0 else "Done.")
    with caplog.at_level(logging.WARNING, logger="arpo_trl.trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "every tool call" in r.getMessage()]
    calls = [len(t.tool_events) for t in trainer.last_rollout.trajectories]
    assert len(warnings) == 2  # one per rollout (two steps), not one per call
    assert warnings[0].startswith("every tool call of this train rollout failed (")
    assert warnings[0].endswith("the last error: Error: tool 'broken' failed: ConnectionError: database is down")
    assert sum(calls) >= 8
