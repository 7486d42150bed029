"""Shutting the shared engine down (runs last: see the `vllm_last` marker in conftest)."""

import asyncio
import glob
import os
import threading
import time

import psutil
import pytest
from vllm_helpers import collect


def _children() -> list[psutil.Process]:
    # Python's multiprocessing resource tracker is one helper per parent process, shared by every spawn context
    # (not the engine's): it lives until the parent exits.
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def _wait_on_long_stream(engine, outcome: list) -> None:
    async def consume():
        async for _ in engine.stream("long", [1, 2, 3], 900, None):
            await asyncio.sleep(3600)  # a rollout still waiting (on a slow tool, say)

    try:
        engine.run(consume())
        outcome.append("finished")
    except BaseException as exc:  # CancelledError is a BaseException
        outcome.append(exc)


@pytest.mark.vllm_last
def test_shutdown_leaves_no_process_thread_or_file(engine, tokenizer):
    assert _children(), "the engine should be running in child processes"
    engine.run(
        collect(engine, "last", [1, 2, 3], 2, read_entropies=False, entropy_tokens=2)
    )  # its entries are never read: left behind
    tables = glob.glob(os.path.join(engine._scratch, f"arpo-vllm-{os.getpid()}-*"))
    assert tables
    # A caller still waiting on a stream when the engine goes down gets an error instead of waiting forever.
    outcome = []
    waiting = threading.Thread(target=_wait_on_long_stream, args=(engine, outcome))
    waiting.start()
    time.sleep(1.0)
    engine.shutdown()
    waiting.join(timeout=30)
    assert not waiting.is_alive() and outcome and isinstance(outcome[0], BaseException), outcome
    engine.shutdown()  # idempotent
    gone, alive = psutil.wait_procs(_children(), timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    assert not engine._loop_thread.thread.is_alive()
    assert not any(os.path.exists(t) for t in tables)
    with pytest.raises(RuntimeError):
        engine.run(engine.entropies([]))
