"""Fuzzing: thousands of generated, mostly malformed tool calls through the parser and the executor.

Nothing may escape: every segment parses to None or a ToolCall, every call gets exactly one ToolResult whose
text is clean, bounded UTF-8, and errors are flagged. The executor part uses cheap pure tools (and a real BM25
index); a handful of generated programs also go through the real sandbox.
"""

from __future__ import annotations

import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arpo_trl.tools import LocalSearch, ToolCall, ToolExecutor, ToolOutput, ToolResult, parse_tag_call

NAMES = ["python", "search", "echo", "boom"]
FRAGMENTS = [
    *(f"<{n}>" for n in NAMES),
    *(f"</{n}>" for n in NAMES),
    "<result>",
    "</result>",
    "<think>",
    "</think>",
    "<answer>\\boxed{4}</answer>",
    "<",
    ">",
    "</",
    "/>",
    "<python",
    "python>",
    "\x00",
    "\udcff",
    "\ufeff",
    "\u202e",
    " ",
    "\n",
    "print(1)",
    "import os",
    "x" * 300,
]
segments = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=12), max_size=25).map("".join)
junk_args = st.one_of(
    st.text(max_size=40),
    st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=10), st.integers(), st.none()), max_size=3),
    st.integers(),
    st.none(),
    st.binary(max_size=10),
)
direct_calls = st.builds(
    ToolCall,
    name=st.sampled_from([*NAMES, "", "nope", "<python>"]) | st.text(max_size=8),
    arguments=junk_args,
    parse_error=st.none() | st.text(max_size=30),
)


def echo(text: str) -> str:
    """Echo.

    Args:
        text: anything.
    """
    return text * 3


def boom(text: str) -> str:
    """Fail in assorted ways, chosen by a hash of the input.

    Args:
        text: anything.
    """
    kind = zlib.crc32(text.encode("utf-8", "surrogatepass")) % 6
    if kind == 0:
        raise ValueError(text)
    if kind == 1:
        raise SystemExit(1)
    if kind == 2:
        return ToolOutput(text, error=True)
    if kind == 3:
        return None  # type: ignore[return-value]
    if kind == 4:
        return text.encode("utf-8", "surrogatepass")  # type: ignore[return-value]
    return "\x00" + text


def fake_python(code: str) -> str:
    """Pretend to run code.

    Args:
        code: the code.
    """
    return f"ran {len(code)} chars"


fake_python.__name__ = "python"
SEARCH = LocalSearch(
    [{"title": f"Doc {i}", "text": f"document number {i} about topic {i % 7} and python search"} for i in range(50)],
    persist=False,
    top_k=3,  # its own output limit (3 pages of 100 characters) fits the executor's cap of 500
    max_chars=100,
)
EXECUTOR = ToolExecutor([fake_python, SEARCH, echo, boom], timeout=5, max_workers=8, max_response_chars=500)


def check(calls: list[ToolCall], results: list[ToolResult]) -> None:
    assert len(results) == len(calls)
    for call, res in zip(calls, results):
        assert isinstance(res, ToolResult) and isinstance(res.text, str)
        res.text.encode("utf-8")  # no lone surrogates
        assert "\x00" not in res.text
        assert len(res.text) <= 500 + len("\n... [output truncated: 100000000 more characters]")
        assert isinstance(res.error, bool) and isinstance(res.timed_out, bool) and not res.timed_out
        if isinstance(call, ToolCall) and call.parse_error is not None:
            assert res.error


def test_parser_and_executor_never_raise():
    """1,000 generated rounds; the count is kept here, so the volume check holds whatever runs before or after."""
    seen = {"segments": 0, "calls": 0}

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(texts=st.lists(segments, min_size=1, max_size=6), extra=st.lists(direct_calls, max_size=3))
    def fuzz(texts, extra):
        calls = []
        for text in texts:
            seen["segments"] += 1
            call = parse_tag_call(text, NAMES)
            assert call is None or isinstance(call, ToolCall)
            if call is not None:
                assert call.name in NAMES
                assert (call.parse_error is None) == bool(call.arguments)
                if call.parse_error is None:
                    assert call.arguments == call.arguments.strip()
                    assert f"</{call.name}>" not in call.arguments
                calls.append(call)
        calls += extra
        seen["calls"] += len(calls)
        check(calls, EXECUTOR.run(calls))

    fuzz()
    # the fuzz really pushed at least 1,000 segments and calls through
    assert seen["segments"] >= 1000 and seen["calls"] >= 1000, seen


code_parts = st.sampled_from(
    [
        "print(1)",
        "x = 1/0",
        "import os",
        "os.fork()",
        "while False: pass",
        "def f(:",
        "'''",
        "\x00",
        "print('\udcff')",
        "import sys; sys.exit(2)",
        "[i for i in range(10**5)][-1]",
        "raise KeyboardInterrupt",
        "open('/etc/shadow')",
        "</python>",
    ]
) | st.text(max_size=15)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(parts=st.lists(code_parts, min_size=1, max_size=6))
def test_generated_programs_in_the_real_sandbox(python_tool, parts):
    code = "\n".join(parts)
    out = python_tool(code)
    assert isinstance(out, ToolOutput) and isinstance(out.error, bool)
    out.encode("utf-8")
    assert "\x00" not in out and len(out) <= python_tool.max_output_chars
    assert not out.timed_out
