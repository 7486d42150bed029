"""Fixtures of the tools suite: real bubblewrap sandboxes, built once per session.

The sandbox tests need bubblewrap (`make install` provides it). Where it cannot work (no user namespaces),
set ARPO_SKIP_SANDBOX_TESTS=1 to skip them instead of failing.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _interpreter(**kwargs):
    from arpo_trl.tools import PythonInterpreter, SandboxUnavailableError

    try:
        return PythonInterpreter(**kwargs)
    except SandboxUnavailableError as exc:
        if os.environ.get("ARPO_SKIP_SANDBOX_TESTS") == "1":
            pytest.skip(f"no sandbox here: {exc}")
        raise


@pytest.fixture(scope="session")
def python_tool():
    """The interpreter as a trainer would build it (10 s wall time, 1 GB)."""
    return _interpreter()


@pytest.fixture(scope="session")
def short_python_tool():
    """A tighter interpreter for the cases that hit a time limit: 2 s wall, 2 s CPU, 256 MB."""
    return _interpreter(timeout=2.0, memory_mb=256)
