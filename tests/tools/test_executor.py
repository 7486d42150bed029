"""ToolExecutor: where calls run (main thread, worker threads, event loop), concurrency, per-call timeouts, queueing,
retries, each tool's own limits, truncation, TRL's message content, caching, failure containment."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

import pytest

from arpo_trl.tools import (
    ToolCall,
    ToolExecutor,
    ToolLimits,
    ToolOutput,
    ToolResult,
    TransientToolError,
    declare_tool,
    execution_mode,
)
from arpo_trl.tools import limits as limits_module
from arpo_trl.tools.limits import SELF_LIMIT_GRACE_S


def echo(text: str) -> str:
    """Echo the input.

    Args:
        text: what to echo.
    """
    return text


@declare_tool(thread_safe=True)
def sleeper(seconds: str) -> str:
    """Sleep (thread-safe: ARPO runs it in worker threads, under a time limit).

    Args:
        seconds: how long.
    """
    time.sleep(float(seconds))
    return f"slept {seconds}"


@declare_tool(thread_safe=True)
def thread_echo(text: str) -> str:
    """Echo the input, from a worker thread.

    Args:
        text: what to echo.
    """
    return text


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
    """Fails transiently `n` times, then answers (thread-safe: retries are for worker-thread and async tools)."""

    name = "flaky"
    thread_safe = True

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
    thread_safe = True  # in a worker thread, even KeyboardInterrupt is the tool's failure

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
    main = Weird()
    main.thread_safe = False  # the same on the main thread, but for Ctrl-C (below)
    if arg != "interrupt":
        assert ToolExecutor([main]).run([ToolCall("weird", arg)])[0].text == text


def test_a_keyboard_interrupt_on_the_main_thread_is_the_users():
    """On the main thread a KeyboardInterrupt is Ctrl-C: it stops the run, as under TRL, not a tool error."""
    main = Weird()
    main.thread_safe = False
    with pytest.raises(KeyboardInterrupt):
        ToolExecutor([main]).run([ToolCall("weird", "interrupt")])


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
    calls = [ToolCall("thread_echo", "x"), ToolCall("echo", "inline"), ToolCall("thread_echo", "y")]
    res = ToolExecutor([thread_echo, echo], timeout=5).run(calls)
    assert [r.text for r in res] == [
        "Error: tool 'thread_echo' could not start: can't start new thread.",
        "inline",  # a main-thread call needs no thread
        "Error: tool 'thread_echo' could not start: can't start new thread.",
    ]
    assert [r.error for r in res] == [True, False, True]


# ------------------------------------------------------------------------------ where calls run (TRL's contract)


def alarm_query(query: str) -> list:
    """A tool as TRL users write them: bounded by ``signal.alarm`` (main thread only), returning a list of rows.

    Args:
        query: the query.
    """

    def give_up(signum, frame):
        raise TimeoutError("query timed out")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(5)
    try:
        return [[query, threading.current_thread() is threading.main_thread()], ["rows", 2]]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_where_each_kind_of_tool_runs():
    async def lookup(query: str) -> str:
        return query

    class AsyncTool:
        name = "async_tool"

        async def __call__(self, query: str) -> str:
            return query

    class Env:
        thread_safe = True  # declared by the class for its methods

        def move(self, n: int) -> str:
            return str(n)

    assert [execution_mode(t) for t in (alarm_query, echo, sleeper, lookup, AsyncTool(), Env().move)] == [
        "main_thread",
        "main_thread",
        "threads",
        "async",
        "async",
        "threads",
    ]
    from arpo_trl.tools import LocalSearch, PythonInterpreter, WebSearch

    assert PythonInterpreter.thread_safe and LocalSearch.thread_safe and WebSearch.thread_safe


def test_a_signal_alarm_tool_runs_on_the_main_thread_and_its_list_stays_a_list():
    res = ToolExecutor([alarm_query]).run([ToolCall("alarm_query", {"query": "SELECT 1"})])[0]
    assert not res.error
    assert res.content == [["SELECT 1", True], ["rows", 2]]  # as TRL's tool loop stores it: the list itself
    assert res.message_content is res.content
    assert res.text == '[["SELECT 1", true], ["rows", 2]]'  # the tag format's text


def test_rounds_on_worker_threads_hand_main_thread_calls_to_the_serving_thread():
    """The asynchronous driver's shape: rounds run on worker threads while the main thread serves; a main-thread tool
    runs there (its alarm works), a thread-safe one in a worker, and the rounds overlap."""
    seen = []

    def where(tag: str) -> str:
        seen.append((tag, threading.current_thread() is threading.main_thread()))
        return tag

    where.__name__ = "where"
    ex = ToolExecutor([alarm_query, where, sleeper], max_workers=4)
    started = threading.Barrier(3, timeout=10)

    def round_(k: int) -> list[ToolResult]:
        started.wait()  # three rounds at once
        calls = [ToolCall("sleeper", "0.2"), ToolCall("alarm_query", f"q{k}"), ToolCall("where", f"w{k}")]
        return ex.run(calls)

    def rollout() -> list[list[ToolResult]]:
        with __import__("concurrent.futures").futures.ThreadPoolExecutor(3) as pool:
            return list(pool.map(round_, range(3)))

    t0 = time.monotonic()
    rounds = ex.serve(rollout)
    assert time.monotonic() - t0 < 0.2 * 3  # the sleepers of the three rounds overlapped
    for k, (slept, rows, tag) in enumerate(rounds):
        assert slept.text == "slept 0.2" and tag.text == f"w{k}"
        assert rows.content == [[f"q{k}", True], ["rows", 2]]  # the alarm worked: it ran on the main thread
    assert sorted(seen) == [("w0", True), ("w1", True), ("w2", True)]


def test_without_a_serving_thread_a_round_runs_its_calls_inline_where_it_is_called():
    """As TRL would: a round called on another thread runs the tool there (so the alarm cannot be set)."""
    ex = ToolExecutor([alarm_query])
    out = []
    worker = threading.Thread(target=lambda: out.extend(ex.run([ToolCall("alarm_query", "q")])))
    worker.start()
    worker.join(10)
    assert out[0].error and "signal only works in main thread" in out[0].text


def test_serve_returns_or_raises_what_the_rollout_does_and_never_leaves_a_caller_waiting():
    ex = ToolExecutor([echo])
    assert ex.serve(lambda: 42) == 42
    with pytest.raises(ValueError, match="rollout failed"):
        ex.serve(lambda: (_ for _ in ()).throw(ValueError("rollout failed")))
    late = []

    def leave_a_round_behind():
        worker = threading.Thread(target=lambda: (time.sleep(0.3), late.extend(ex.run([ToolCall("echo", "x")]))))
        worker.start()
        return worker

    worker = ex.serve(leave_a_round_behind)  # the round arrives after serving ended: inline on its own thread
    worker.join(10)
    assert late[0].text == "x"


# ------------------------------------------------------------------------------ one limit per tool


def test_a_tools_own_limits_are_the_ones_that_apply():
    @declare_tool(thread_safe=True, time_limit=120, output_limit=None)
    def long_job(n: str) -> str:
        """Prints a lot.

        Args:
            n: characters.
        """
        return "x" * int(n)

    @declare_tool(output_limit=100)
    def short(n: str) -> str:
        """Prints a little.

        Args:
            n: characters.
        """
        return "y" * int(n)

    ex = ToolExecutor([long_job, short, thread_echo])  # the executor's own limits unset: 60 s and 4000 characters
    assert ex.limits("long_job") == ToolLimits("threads", 120.0, None, own=True)
    assert ex.limits("long_job").watchdog == 120.0 + SELF_LIMIT_GRACE_S
    assert ex.limits("short") == ToolLimits("main_thread", None, 100)
    assert ex.limits("thread_echo") == ToolLimits("threads", 60.0, 4000)
    big, small = ex.run([ToolCall("long_job", "10000"), ToolCall("short", "150")])
    assert big.text == "x" * 10_000  # whole: no cap of the executor's
    assert small.text == "y" * 100 + "\n... [output truncated: 50 more characters]"


def test_executor_limits_that_would_cut_a_tool_short_of_its_own_are_refused():
    own = declare_tool(lambda q: q, thread_safe=True, time_limit=120, output_limit=None)
    own.__name__ = "python_like"
    with pytest.raises(ValueError, match=r"tool 'python_like'.*own time_limit is 120 s.*timeout is 60 s"):
        ToolExecutor([own], timeout=60)
    with pytest.raises(ValueError, match=r"tool 'python_like'.*own output_limit is no cap \(None\).*is 4000"):
        ToolExecutor([own], max_response_chars=4000)
    capped = declare_tool(lambda q: q, output_limit=5000)
    capped.__name__ = "capped"
    with pytest.raises(ValueError, match=r"own output_limit is 5000 characters.*max_response_chars is 4000"):
        ToolExecutor([capped], max_response_chars=4000)
    # Looser executor limits do not contradict a stricter tool: the tool's own apply.
    ToolExecutor([own], timeout=300)
    assert ToolExecutor([capped], max_response_chars=9000).limits("capped").output_limit == 5000
    with pytest.raises(ValueError, match="time_limit=-1"):
        declare_tool(lambda q: q, time_limit=-1)


def test_a_tool_that_limits_itself_reports_its_own_timeout(monkeypatch):
    """A self-limited tool gets a grace beyond its limit to report it; past the grace, the watchdog answers."""
    monkeypatch.setattr(limits_module, "SELF_LIMIT_GRACE_S", 0.4)

    @declare_tool(thread_safe=True, time_limit=0.3)
    def bounded(mode: str) -> str:
        """Stops itself at its limit, or hangs.

        Args:
            mode: "polite" or "hang".
        """
        time.sleep(0.3 if mode == "polite" else 30)
        return ToolOutput("Error: stopped at 0.3 s; partial output kept", timed_out=True)

    ex = ToolExecutor([bounded])
    t0 = time.monotonic()
    polite, hung = ex.run([ToolCall("bounded", "polite"), ToolCall("bounded", "hang")])
    assert polite.text == "Error: stopped at 0.3 s; partial output kept" and polite.timed_out
    assert hung.text == "Error: tool 'bounded' timed out after 0.3 s." and hung.timed_out
    assert 0.65 < time.monotonic() - t0 < 2.0


def test_an_async_tool_is_cancelled_at_its_limit():
    cancelled = threading.Event()

    async def slow(query: str) -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return query

    t0 = time.monotonic()
    res = ToolExecutor([slow], timeout=0.3).run([ToolCall("slow", "q")])[0]
    assert res.text == "Error: tool 'slow' timed out after 0.3 s." and res.timed_out
    assert time.monotonic() - t0 < 1.5 and cancelled.wait(2)


def test_an_explicit_timeout_says_it_cannot_bound_main_thread_tools(caplog):
    with caplog.at_level(logging.WARNING, logger="arpo_trl.tools.executor"):
        ToolExecutor([alarm_query, sleeper], timeout=10)
    assert "tool_timeout=10 s does not bound 'alarm_query'" in caplog.text and "'sleeper'" not in caplog.text


@pytest.mark.parametrize(
    ("value", "content", "text"),
    [
        (["a", {"b": 1}], ["a", {"b": 1}], '["a", {"b": 1}]'),
        ({"answer": 42}, "{'answer': 42}", '{"answer": 42}'),
        (7, None, "7"),  # str(7) is the text itself
        ("plain", None, "plain"),
        (None, "None", "Tool(value_tool) returned empty output."),
    ],
)
def test_the_message_content_is_what_trl_stores(value, content, text):
    """TRL's tool loop keeps a list as it is and stores ``str(result)`` otherwise; the tag text stays ours."""

    def value_tool(x: str):
        return value

    res = ToolExecutor([value_tool]).run([ToolCall("value_tool", "x")])[0]
    assert res.content == content and res.text == text
    assert res.message_content == (text if content is None else content)


def test_a_list_is_never_cut_and_a_long_string_is_cut_in_both_forms():
    def rows(n: str):
        return [["r" * 10] for _ in range(int(n))]

    def dict_tool(n: str):
        return {"k": "v" * int(n)}

    ex = ToolExecutor([rows, dict_tool], max_response_chars=50)
    listed, mapped = ex.run([ToolCall("rows", "20"), ToolCall("dict_tool", "100")])
    assert listed.content == [["r" * 10]] * 20  # whole
    assert mapped.content == str({"k": "v" * 100})[:50] + "\n... [output truncated: 59 more characters]"
    assert mapped.text.startswith('{"k": "vvv') and mapped.text.endswith("[output truncated: 59 more characters]")


# ------------------------------------------------------------------------------ the paper recipes' limits


PAPER_RECIPES = ["arpo_qwen2.5_7b_reasoning", "arpo_qwen3_8b_deepsearch", "arpo_qwen3_14b_deepsearch"]


def recipe_tools(recipe: str, *flags: str):
    """The tools and the executor `arpo-train --config recipes/<recipe>.yaml` builds (CPU flags added)."""
    from pathlib import Path

    from trl import ModelConfig, TrlParser

    from arpo_trl.config import ARPOConfig
    from arpo_trl.train import ARPOScriptArguments, build_tools

    path = Path(__file__).resolve().parents[2] / "recipes" / f"{recipe}.yaml"
    parser = TrlParser((ARPOScriptArguments, ARPOConfig, ModelConfig))
    argv = ["--config", str(path), "--output_dir", "out", "--use_cpu", "--bf16", "false", *flags]
    script_args, training_args, _ = parser.parse_args_and_config(argv)
    tools = build_tools(script_args)
    return tools, ToolExecutor.from_config(tools, training_args)


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_the_paper_recipes_limits_reach_the_python_tool(recipe, tmp_path, monkeypatch):
    """python_timeout: 120 and python_max_output_chars: null (the official tool's limits) are the ones that apply: a
    10,000-character result reaches the model whole, and the time limit is 120 s, not tool_timeout's 60."""
    monkeypatch.chdir(tmp_path)  # the recipe's search cache is a relative path: absent here, replayed empty
    monkeypatch.setenv("WANDB_PROJECT", "unchanged")  # the recipe's `env:` mapping is exported; restored after
    tools, ex = recipe_tools(recipe)
    assert [t.name for t in tools] == ["python", "search"]
    assert ex.limits("python") == ToolLimits("threads", 120.0, None, own=True)
    assert tools[0].limits.wall_s == 120.0  # the sandbox stops the program at 120 s
    assert ex.limits("python").watchdog == 120.0 + SELF_LIMIT_GRACE_S
    assert ex.limits("search").output_limit == tools[1].output_limit >= 10 * 1000  # ten pages of 1,000 whole
    res = ex.run([ToolCall("python", "print('x' * 10_000)")])[0]
    assert not res.error and res.text == "x" * 10_000
    assert res.message_content == "x" * 10_000  # the chat format's tool message too


def test_a_recipe_with_a_small_python_timeout_times_out_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_PROJECT", "unchanged")
    _, ex = recipe_tools(PAPER_RECIPES[0], "--python_timeout", "1")
    t0 = time.monotonic()
    res = ex.run([ToolCall("python", "import time\nprint('started', flush=True)\ntime.sleep(30)")])[0]
    assert res.timed_out and res.text == "started\nError: execution timed out after 1 s; the program was stopped."
    assert time.monotonic() - t0 < 1 + SELF_LIMIT_GRACE_S


def test_a_recipe_whose_limits_contradict_fails_naming_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_PROJECT", "unchanged")
    with pytest.raises(
        ValueError, match=r"tool 'python'.*own time_limit is 120 s \(e\.g\. python_timeout.*tool_timeout is 60 s"
    ):
        recipe_tools(PAPER_RECIPES[0], "--tool_timeout", "60")
    with pytest.raises(
        ValueError, match=r"no cap \(None\) \(e\.g\. python_max_output_chars.*max_tool_response_chars is 4000"
    ):
        recipe_tools(PAPER_RECIPES[0], "--max_tool_response_chars", "4000")
    _, ex = recipe_tools(PAPER_RECIPES[0], "--tool_timeout", "300")  # looser than the tool's own: no contradiction
    assert ex.limits("python").time_limit == 120.0 and ex.limits("search").time_limit == 300.0
