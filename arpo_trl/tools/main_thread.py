"""The main thread as a tool server: calls of main-thread tools handed to it by other threads (`ToolExecutor.serve`)."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class MainThreadServer:
    """Calls handed to the serving thread by other threads (see `ToolExecutor.serve`)."""

    def __init__(self) -> None:
        self.thread = threading.current_thread()
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future] | None] = queue.SimpleQueue()
        self.open = True
        self.lock = threading.Lock()

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if not self.open:
                future.set_exception(RuntimeError("the main thread stopped serving tool calls"))
                return future
            self.jobs.put((fn, future))
        return future

    def serve_while(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a helper thread while this (the serving) thread runs the calls handed to it; return what `fn`
        returns or raise what it raises. A KeyboardInterrupt in a call (Ctrl-C) stops serving and propagates."""
        outcome: concurrent.futures.Future = concurrent.futures.Future()

        def target() -> None:
            try:
                outcome.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the serving thread, which raises it
                outcome.set_exception(exc)
            finally:
                self.jobs.put(None)  # wake the server: done

        try:
            threading.Thread(target=target, name="arpo-rollout", daemon=True).start()
            while (job := self.jobs.get()) is not None:
                work, future = job
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(work())
                except BaseException as exc:
                    future.set_exception(exc)
                    if isinstance(exc, KeyboardInterrupt):
                        raise
        finally:
            self.close()
        return outcome.result()

    def close(self) -> None:
        with self.lock:
            self.open = False
        while True:  # whatever was queued and never ran: its caller gets an error, not a hang
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job[1].set_exception(RuntimeError("the main thread stopped serving tool calls"))
