"""An asyncio event loop running in a daemon thread: how the vLLM engines (colocated and server) run their
coroutines while the trainer's thread blocks on results."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """`run(coro)` from any other thread; `stop()` once, after the owner has finished its own teardown on the loop."""

    def __init__(self, name: str, owner: str) -> None:
        self.owner = owner  # named in the errors ("the engine is shut down")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.loop.is_running()

    def in_loop(self) -> bool:
        return threading.current_thread() is self.thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and return its result (blocks the calling thread)."""
        if self.in_loop():
            coro.close()
            raise RuntimeError(f"{self.owner}.run() called from its own event loop: await the coroutine instead")
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError(f"the {self.owner} is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, join_timeout: float) -> None:
        """Stop the loop and join its thread; the loop is closed once the thread has ended."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=join_timeout)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
