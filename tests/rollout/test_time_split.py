"""Where a rollout's time went (`RolloutStats.generation_seconds`, `tool_seconds`, `wait_seconds`), on both drivers:
the round driver against a clock that only the generator and the tool move (exact figures), the asynchronous one
against sleeps (figures bounded below by what was slept), plus the thread guard of the trainer's process."""

import threading
import time
import types

import pytest
from fakes import ScriptedEngine, ScriptedGenerator, settings

import arpo_trl.rollout.round_driver as round_driver
from arpo_trl.rollout.branching import BranchPolicy
from arpo_trl.rollout.protocols import TagProtocol
from arpo_trl.rollout.round_driver import RoundDriver
from arpo_trl.rollout.stream_driver import StreamDriver
from arpo_trl.testing import calc
from arpo_trl.tools import ToolExecutor

GENERATE_S, TOOL_S = 1.0, 10.0


class Clock:
    """A clock that moves only when told (thread-safe: tool calls run in worker threads)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds

    def perf_counter(self) -> float:
        return self.now


def test_round_driver_splits_generation_tools_and_the_rest_exactly(tokenizer, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(round_driver, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    script = ScriptedGenerator(tokenizer, 2)
    calls = {"generate": 0, "tool": 0}

    def generator(prefixes, budgets, needs=None):
        calls["generate"] += 1
        clock.advance(GENERATE_S)
        return script(prefixes, budgets, needs)

    def tool(expression: str) -> str:
        calls["tool"] += 1
        clock.advance(TOOL_S)  # calls of one round run at once in threads: each moves the clock by its own time
        return calc(expression)

    tool.__name__ = "calc"
    protocol = TagProtocol(tokenizer, ["calc"])
    policy = BranchPolicy(0.0, 0.0, "bernoulli", 0.5, seed=0)
    rollout = RoundDriver(settings(4, 4), generator, protocol, ToolExecutor([tool], timeout=5), policy,
                          len(tokenizer), tokenizer.eos_token_id)  # fmt: skip
    _, stats = rollout.run([tokenizer.encode("Add 1 and 2.")] * 4)
    assert calls["generate"] == stats.rounds == 3  # two tool rounds, then the answers
    assert calls["tool"] == stats.tool_executions == 8
    assert stats.generation_seconds == calls["generate"] * GENERATE_S
    assert stats.tool_seconds == calls["tool"] * TOOL_S
    assert stats.wait_seconds == 0.0  # nothing else moved the clock


def test_async_driver_counts_streaming_time_and_tool_time(tokenizer):
    delay, sleep_s = 0.01, 0.2

    def slow_calc(expression: str) -> str:
        time.sleep(sleep_s)
        return calc(expression)

    slow_calc.__name__ = "calc"
    slow_calc.thread_safe = True  # run in the executor's worker threads, beside the streams
    protocol = TagProtocol(tokenizer, ["calc"])
    policy = BranchPolicy(0.0, 0.0, "bernoulli", 0.5, seed=0)
    engine = ScriptedEngine(tokenizer, 2, delay=delay)
    rollout = StreamDriver(settings(4, 4), engine, protocol, ToolExecutor([slow_calc], timeout=5), policy,
                               len(tokenizer), tokenizer.eos_token_id, stop=protocol.stop_strings)  # fmt: skip
    started = time.perf_counter()
    trajectories, stats = rollout.run([tokenizer.encode("Add 1 and 2.")] * 4)
    wall = time.perf_counter() - started
    assert stats.tool_executions == 8
    assert stats.tool_seconds >= stats.tool_executions * sleep_s  # summed over calls
    longest = max(sum(t.tool_mask) for t in trajectories)  # this trajectory's requests streamed, token by token
    assert stats.generation_seconds >= longest * delay
    # every trajectory waited on two tool calls one after the other, while the others did the same: the engine sat idle
    assert stats.wait_seconds >= sleep_s
    assert stats.generation_seconds + stats.wait_seconds <= wall


@pytest.mark.parametrize("driver", ["rounds", "async"])
def test_split_starts_at_zero(tokenizer, driver):
    """A rollout without tool calls spends no tool time."""
    protocol = TagProtocol(tokenizer, ["calc"])
    policy = BranchPolicy(0.0, 0.0, "bernoulli", 0.5, seed=0)
    args = (settings(2, 2), None, protocol, ToolExecutor([calc], timeout=5), policy, len(tokenizer),
            tokenizer.eos_token_id)  # fmt: skip
    if driver == "rounds":
        rollout = RoundDriver(*(args[:1] + (ScriptedGenerator(tokenizer, 0),) + args[2:]))
    else:
        rollout = StreamDriver(*(args[:1] + (ScriptedEngine(tokenizer, 0),) + args[2:]), stop=protocol.stop_strings)
    _, stats = rollout.run([tokenizer.encode("Add 1 and 2.")] * 2)
    assert stats.tool_executions == 0 and stats.tool_seconds == 0.0
    assert stats.generation_seconds > 0.0 and stats.wait_seconds >= 0.0
