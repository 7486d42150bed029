"""ToolExecutor: concurrency, per-call timeouts, queueing, retries, truncation, caching, failure containment."""

from __future__ import annotations

import threading
import time

import pytest

from arpo_trl.tools import ToolCall, ToolExecutor, ToolOutput, ToolResult, TransientToolError


def echo(text: str) -> str:
    """Echo the input.

    Args:
        text: what to echo.
    """
    return text


def sleeper(seconds: str) -> str:
    """Sleep.

    Args:
        seconds: how long.
    """
    time.sleep(float(seconds))
    return f"slept {seconds}"


def test_results_keep_call_order_and_run_concurrently():
    ex = ToolExecutor([sleeper], timeout=5, max_workers=8)
    t0 = time.monotonic()
    res = ex.run([ToolCall("sleeper", str(0.3 + 0.01 * i)) for i in range(8)])
    elapsed = time.monotonic() - t0
    assert [r.text for r in res] == [f"slept {0.3 + 0.01 * i}" for i in range(8)]
    assert not any(r.error for r in res)
    assert elapsed < 1.5, f"8 calls of ~0.3 s took {elapsed:.2f} s: not concurrent"
    assert all(0.25 < r.duration_s < 1.5 for r in res)


def test_a_hanging_call_times_out_without_holding_the_round():
    ex = ToolExecutor([sleeper, echo], timeout=0.5, max_workers=4)
    t0 = time.monotonic()
    res = ex.run([ToolCall("sleeper", "30"), ToolCall("echo", "hi")])
    elapsed = time.monotonic() - t0
    assert res[0] == ToolResult(res[0].text, error=True, timed_out=True, duration_s=res[0].duration_s)
    assert res[0].text == "Error: tool 'sleeper' timed out after 0.5 s."
    assert res[1].text == "hi" and not res[1].error
    assert elapsed < 1.5
    assert ex.abandoned_calls == 1  # the thread is still sleeping in the background


def test_a_queued_call_gets_its_whole_timeout():
    """One worker: the second call starts only when the first is given up, and still gets its full 0.6 s."""
    ex = ToolExecutor([sleeper], timeout=0.6, max_workers=1)
    t0 = time.monotonic()
    res = ex.run([ToolCall("sleeper", "30"), ToolCall("sleeper", "0.4")])
    elapsed = time.monotonic() - t0
    assert res[0].timed_out
    assert res[1].text == "slept 0.4" and not res[1].error  # would have timed out on a shared round clock
    assert 0.9 < elapsed < 2.0


def test_round_time_is_bounded_by_waves_of_timeouts():
    ex = ToolExecutor([sleeper], timeout=0.3, max_workers=2)
    t0 = time.monotonic()
    res = ex.run([ToolCall("sleeper", "30") for _ in range(4)])
    elapsed = time.monotonic() - t0
    assert all(r.timed_out and r.error for r in res)
    assert elapsed < 2 * 0.3 + 0.7, elapsed


class Flaky:
    """Fails transiently `n` times, then answers."""

    name = "flaky"

    def __init__(self, n: int, exc: type[BaseException] = TransientToolError) -> None:
        self.n, self.exc, self.calls = n, exc, 0

    def __call__(self, text: str) -> str:
        self.calls += 1
        if self.calls <= self.n:
            raise self.exc(f"hiccup {self.calls}")
        return f"ok after {self.calls}"


def test_transient_failures_are_retried():
    tool = Flaky(2)
    res = ToolExecutor([tool], timeout=5, max_retries=2, retry_backoff=0.01).run([ToolCall("flaky", "x")])
    assert res[0].text == "ok after 3" and not res[0].error and tool.calls == 3


def test_retries_stop_after_the_limit():
    tool = Flaky(10, ConnectionError)
    res = ToolExecutor([tool], timeout=5, max_retries=2, retry_backoff=0.01).run([ToolCall("flaky", "x")])
    assert res[0].error and not res[0].timed_out
    assert res[0].text == "Error: tool 'flaky' failed after 3 attempts: ConnectionError: hiccup 3"
    assert tool.calls == 3


def test_non_transient_errors_are_not_retried():
    tool = Flaky(10, ValueError)
    res = ToolExecutor([tool], timeout=5, max_retries=5, retry_backoff=0.01).run([ToolCall("flaky", "x")])
    assert res[0].text == "Error: tool 'flaky' failed: ValueError: hiccup 1" and tool.calls == 1


def test_retries_never_outlast_the_timeout():
    tool = Flaky(100)
    t0 = time.monotonic()
    res = ToolExecutor([tool], timeout=0.5, max_retries=100, retry_backoff=0.1).run([ToolCall("flaky", "x")])
    assert res[0].error and time.monotonic() - t0 < 1.0


class Weird:
    """A tool returning/raising odd things, chosen by its input."""

    name = "weird"

    def __call__(self, what: str):
        if what == "exit":
            raise SystemExit(3)
        if what == "interrupt":
            raise KeyboardInterrupt
        if what == "badstr":

            class Bad(Exception):
                def __str__(self):
                    raise RuntimeError("no")

            raise Bad
        if what == "hugeexc":
            raise ValueError("x" * 100_000)
        if what == "badout":

            class BadOut:
                def __str__(self):
                    raise RuntimeError("cannot render")

            return BadOut()
        if what == "bytes":
            return b"\xff\xfeabc\x00"
        if what == "surrogate":
            return "a\udcffb"
        if what == "none":
            return None
        if what == "dict":
            return {"answer": 42}
        if what == "error-output":
            return ToolOutput("Error: it broke", error=True)
        if what == "timeout-output":
            return ToolOutput("Error: too slow", timed_out=True)
        raise AssertionError(what)


@pytest.mark.parametrize(
    ("arg", "text", "error"),
    [
        ("exit", "Error: tool 'weird' failed: SystemExit: 3", True),
        ("interrupt", "Error: tool 'weird' failed: KeyboardInterrupt", True),
        ("badstr", "Error: tool 'weird' failed: Bad: <unprintable exception>", True),
        ("badout", "Error: the tool's output could not be converted to text (RuntimeError: cannot render).", False),
        ("bytes", "\ufffd\ufffdabc\ufffd", False),
        ("surrogate", "a?b", False),
        ("none", "Tool(weird) returned empty output.", False),
        ("dict", '{"answer": 42}', False),
        ("error-output", "Error: it broke", True),
    ],
)
def test_odd_tool_behaviour_is_contained(arg, text, error):
    res = ToolExecutor([Weird()], timeout=5).run([ToolCall("weird", arg)])[0]
    assert res.text == text and res.error is error


def test_output_flags_and_long_exception_messages():
    ex = ToolExecutor([Weird()], timeout=5, max_response_chars=200)
    slow, huge = ex.run([ToolCall("weird", "timeout-output"), ToolCall("weird", "hugeexc")])
    assert slow.error and slow.timed_out and slow.text == "Error: too slow"
    assert huge.error and len(huge.text) < 300 and "[output truncated:" in huge.text


def test_truncation_note():
    res = ToolExecutor([echo], timeout=5, max_response_chars=10).run([ToolCall("echo", "a" * 25)])[0]
    assert res.text == "a" * 10 + "\n... [output truncated: 15 more characters]"


def test_unknown_malformed_and_parse_error_calls():
    ex = ToolExecutor([echo], timeout=5)
    res = ex.run(
        [
            ToolCall("nope", "x"),
            ToolCall("echo", "", parse_error="Error: empty <echo> call; put the input between the tags."),
            ToolCall("echo", 42),  # type: ignore[arg-type]
            "not a call",  # type: ignore[list-item]
            ToolCall("echo", {"text": "by keyword"}),
        ]
    )
    assert res[0].text == "Error: unknown tool 'nope' (available: echo)." and res[0].error
    assert res[1].text.startswith("Error: empty <echo> call") and res[1].error
    assert res[2].text == "Error: the arguments of 'echo' must be a string or an object." and res[2].error
    assert res[3].text == "Error: malformed tool call str." and res[3].error
    assert res[4].text == "by keyword" and not res[4].error
    assert ex.run([]) == []


def test_async_tools_are_awaited():
    async def shout(text: str) -> str:
        """Shout.

        Args:
            text: the words.
        """
        return text.upper()

    assert ToolExecutor([shout]).run([ToolCall("shout", "hey")])[0].text == "HEY"


def test_result_cache_serves_repeats_but_not_errors_or_uncacheable_tools():
    counter = {"n": 0}
    lock = threading.Lock()

    def count(text: str) -> str:
        """Count calls.

        Args:
            text: ignored.
        """
        with lock:
            counter["n"] += 1
        if text == "fail":
            raise ValueError("nope")
        return f"{text}:{counter['n']}"

    ex = ToolExecutor([count], timeout=5, cache_size=2)
    first = ex.run([ToolCall("count", "a")])[0]
    again = ex.run([ToolCall("count", "a")])[0]
    assert again.cached and again.text == first.text and counter["n"] == 1
    ex.run([ToolCall("count", "fail")])
    ex.run([ToolCall("count", "fail")])
    assert counter["n"] == 3  # errors are never cached
    ex.run([ToolCall("count", "b")])
    ex.run([ToolCall("count", "c")])  # evicts "a" (LRU, 2 entries)
    assert not ex.run([ToolCall("count", "a")])[0].cached

    count.cacheable = False  # type: ignore[attr-defined]
    ex2 = ToolExecutor([count], timeout=5, cache_size=10)
    ex2.run([ToolCall("count", "z")])
    assert not ex2.run([ToolCall("count", "z")])[0].cached


def test_configuration_errors():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        ToolExecutor([echo], timeout=0)
    with pytest.raises(ValueError, match="max_workers"):
        ToolExecutor([echo], max_workers=0)
    with pytest.raises(ValueError, match="share the name"):
        ToolExecutor([echo, echo])
    with pytest.raises(TypeError, match="callables"):
        ToolExecutor(["echo"])  # type: ignore[list-item]
    ex = ToolExecutor([echo])
    ex.close()
    with pytest.raises(RuntimeError, match="closed"):
        ex.run([])


def test_thread_exhaustion_is_an_error_result(monkeypatch):
    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    res = ToolExecutor([echo], timeout=5).run([ToolCall("echo", "x"), ToolCall("echo", "y")])
    assert [r.text for r in res] == ["Error: tool 'echo' could not start: can't start new thread."] * 2
    assert all(r.error for r in res)
