"""The limits one tool's calls run under (`ToolExecutor.limits`), and where they run."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ExecutionMode, TransientToolError

#: Exceptions treated as transient (retried) by default.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (TransientToolError, ConnectionError, TimeoutError)
#: The limits of a tool that declares none, when the executor is given none either.
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RESPONSE_CHARS = 4000
#: How much longer than its own time limit the watchdog waits for a tool that limits itself.
SELF_LIMIT_GRACE_S = 5.0


@dataclass(frozen=True)
class ToolLimits:
    """The limits that apply to one tool's calls.

    `mode`: where its calls run (`base.execution_mode`). `time_limit`: seconds a call may take (None: none of
    ARPO's, a main-thread tool that declares none). `output_limit`: the longest answer (None: no cap). `own`: the
    time limit is the tool's own (it stops itself; the watchdog waits `SELF_LIMIT_GRACE_S` longer).
    """

    mode: ExecutionMode
    time_limit: float | None
    output_limit: int | None
    own: bool = False

    @property
    def watchdog(self) -> float | None:
        """When the executor gives up waiting for a call (threads and async; None on the main thread)."""
        if self.mode == "main_thread" or self.time_limit is None:
            return None
        return self.time_limit + (SELF_LIMIT_GRACE_S if self.own else 0.0)
