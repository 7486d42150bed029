"""`PythonInterpreter`: the paper's ``<python>`` tool, running model-written code in a sandbox.

Each call starts a fresh CPython process inside a bubblewrap sandbox (`arpo_trl.tools.sandbox`), feeds it the
code on stdin, and returns what the model should read: stdout on success (plus the value of a final bare
expression, printed as a notebook would), stdout followed by the traceback on failure, and a one-line
explanation when a limit stopped the program.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence

from .base import StringTool, ToolOutput, clean_text
from .sandbox import SANDBOX_INSTALL_HINT, BwrapSandbox, Limits, RunResult, interpreter_paths, run_limited

logger = logging.getLogger(__name__)

# Executed with `python -I -u -X utf8 -c RUNNER`; the model's code arrives on stdin. It compiles the code as
# "<string>" (like `python -c`), shows the offending source line in tracebacks, prints the value of a final bare
# expression unless it is None, and hides its own frame from tracebacks.
RUNNER = r"""
import ast, builtins, linecache, os, resource, sys, traceback
# The same limits `prlimit` sets from outside, set again from inside: they hold even where prlimit is missing.
for _res, _value in zip(
    (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE, resource.RLIMIT_CORE),
    [int(v) for v in sys.argv[1:6]],
):
    _soft, _hard = resource.getrlimit(_res)
    _extra = 1 if _res == resource.RLIMIT_CPU else 0
    _new_hard = _value + _extra if _hard == resource.RLIM_INFINITY else min(_hard, _value + _extra)
    resource.setrlimit(_res, (min(_value, _new_hard), _new_hard))
del _res, _value, _soft, _hard, _extra, _new_hard, resource
sys.argv = ["-c"]
src = sys.stdin.buffer.read().decode("utf-8", "replace")
try:
    sys.stdin.close()
    sys.stdin = open(os.devnull)
except OSError:
    pass
linecache.cache["<string>"] = (len(src), None, src.splitlines(True), "<string>")
del linecache
def _fail(exc):
    tb = None if isinstance(exc, SyntaxError) or exc.__traceback__ is None else exc.__traceback__.tb_next
    traceback.print_exception(type(exc), exc, tb)
    sys.stderr.flush()
    os._exit(1)
try:
    tree = ast.parse(src, "<string>")
except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
    _fail(exc)
last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
_main = type(sys)("__main__")  # a clean __main__ module, as runpy gives a script (pickle, dataclasses need it)
_main.__builtins__ = builtins
sys.modules["__main__"] = _main
ns = _main.__dict__
del ast, builtins, src
try:
    exec(compile(tree, "<string>", "exec"), ns)
    if last is not None:
        import ast as _ast
        value = eval(compile(_ast.Expression(last.value), "<string>", "eval"), ns)
        if value is not None:
            print(value)
except SystemExit:
    raise
except BaseException as exc:
    _fail(exc)
"""

_SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "MPLBACKEND": "Agg",
    # one thread per BLAS/OpenMP pool: threads count against the memory limit and the cores are shared
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}

_warned_unsandboxed = False
_warn_lock = threading.Lock()


def _warn_unsandboxed_once() -> None:
    global _warned_unsandboxed
    with _warn_lock:
        if _warned_unsandboxed:
            return
        _warned_unsandboxed = True
    logger.warning(
        "\n" + "!" * 100 + "\n"
        "PythonInterpreter(allow_unsandboxed=True) is running model-written code WITHOUT A SANDBOX: the code has\n"
        "this user's network access and can read every file this user can read (it only gets rlimits, a\n"
        "wall-clock timeout, a throw-away working directory and an empty environment). Do not do this with\n"
        "untrusted models or on machines that hold secrets.\n" + "!" * 100
    )


class PythonInterpreter(StringTool):
    """Runs Python code in a sandbox and returns what it printed (tag ``<python>``).

    Args:
        timeout: wall-clock seconds per run.
        cpu_time: CPU seconds per run (default: `timeout`, rounded up).
        memory_mb: address-space limit; a bigger allocation raises MemoryError in the program.
        max_output_chars: the longest text returned to the model (the beginning of stdout and the end of the
            traceback are kept). None: no cap beyond `max_file_mb` (the official tool's).
        max_file_mb: largest file the program may write (stdout and stderr included).
        scratch_mb: size of the private scratch directory ``/tmp`` (also the working directory).
        python: the interpreter to run inside (default: this process's; numpy/sympy installed in it stay
            importable). Its installation prefixes are bound read-only into the sandbox.
        extra_ro_binds: more host paths to expose read-only at the same path (e.g. a data directory).
        env: extra environment variables for the program (the caller's environment is never passed on).
        allow_unsandboxed: run without bubblewrap when no sandbox works here, with a loud warning. Without it,
            construction fails with `SandboxUnavailableError` when no sandbox is available.
        name: the tag / function name.
    """

    name = "python"
    argument = "code"
    cacheable = False
    # Each call is its own sandboxed process, bounded by its own wall-clock limit: safe to run concurrently, and
    # those limits (`time_limit`, `output_limit`) are the ones the executor applies to it.
    thread_safe = True

    def __init__(
        self,
        timeout: float = 10.0,
        cpu_time: int | None = None,
        memory_mb: int = 1024,
        max_output_chars: int | None = 4000,
        max_file_mb: int = 8,
        scratch_mb: int = 64,
        python: str | None = None,
        extra_ro_binds: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        allow_unsandboxed: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            description=(
                "Execute Python code in a fresh, isolated interpreter and return its printed output (stdout), or "
                "the error traceback. The value of a final bare expression is printed too. No network access; "
                "the working directory /tmp is a private scratch space; numpy and sympy are available when "
                "installed."
            ),
            argument_description="The Python source code to run.",
        )
        self.limits = Limits(
            wall_s=float(timeout),
            cpu_s=int(cpu_time if cpu_time is not None else max(1, math.ceil(timeout))),
            memory_mb=int(memory_mb),
            file_mb=int(max_file_mb),
            scratch_mb=int(scratch_mb),
        )
        if max_output_chars is not None and max_output_chars < 100:
            raise ValueError(f"max_output_chars must be >= 100 or None, got {max_output_chars}")
        self.output_cap = max_output_chars  # None: no cap of ours (what the executor reads, `output_limit`)
        # What the rendering keeps; without a cap, everything the output files can hold.
        self.max_output_chars = max_output_chars if max_output_chars is not None else self.limits.file_mb << 20
        self.python = python or sys.executable
        self.env = {**_SANDBOX_ENV, **dict(env or {})}
        self.allow_unsandboxed = allow_unsandboxed
        self.sandbox: BwrapSandbox | None = None
        self.sandboxed = False
        self.unavailable_reason: str | None = None
        try:
            sandbox = BwrapSandbox(ro_binds=[*interpreter_paths(self.python), *extra_ro_binds])
            self._probe(sandbox)
            self.sandbox, self.sandboxed = sandbox, True
        except Exception as exc:  # noqa: BLE001 - any failure here means "no sandbox"
            self.unavailable_reason = str(exc)
            if not allow_unsandboxed:
                from .sandbox import SandboxUnavailableError

                raise SandboxUnavailableError(
                    f"PythonInterpreter refuses to run model-written code without a sandbox: {exc}\n"
                    f"Fix: {SANDBOX_INSTALL_HINT}.\nOr opt out explicitly (unsafe): "
                    "PythonInterpreter(allow_unsandboxed=True)."
                ) from exc
            _warn_unsandboxed_once()

    @property
    def time_limit(self) -> float:
        """The wall-clock limit of a run: the executor's limit for this tool (it stops the program itself)."""
        return self.limits.wall_s

    @property
    def output_limit(self) -> int | None:
        """The longest answer (None: no cap but the output files'): the executor's cap for this tool."""
        return None if self.output_cap is None else self.max_output_chars

    def _probe(self, sandbox: BwrapSandbox) -> None:
        """One real run: the sandbox starts, the interpreter works, a fork is refused."""
        code = (
            b"import os\ntry:\n    os.fork()\nexcept OSError:\n    print('probe ok')\nelse:\n    print('fork allowed')"
        )
        limits = Limits(wall_s=max(30.0, self.limits.wall_s), cpu_s=30, memory_mb=max(512, self.limits.memory_mb))
        res = sandbox.run(self._command(), stdin=code, env=self.env, limits=limits)
        out = res.stdout.decode("utf-8", "replace").strip()
        if res.returncode != 0 or out != "probe ok":
            detail = (res.stderr.decode("utf-8", "replace").strip() or out)[-1000:]
            raise RuntimeError(f"a test run in bubblewrap failed (exit status {res.returncode}): {detail}")

    def _command(self) -> list[str]:
        lim = self.limits
        limits = [lim.memory_mb << 20, lim.cpu_s, lim.file_mb << 20, lim.open_files, 0]
        return [self.python, "-I", "-u", "-X", "utf8", "-c", RUNNER, *map(str, limits)]

    def run(self, code: str) -> ToolOutput:
        """Execute `code`; return what the model reads. Never raises for anything the code does."""
        stdin = code.encode("utf-8", errors="replace")
        try:
            if self.sandbox is not None:
                res = self.sandbox.run(self._command(), stdin=stdin, env=self.env, limits=self.limits)
            elif self.allow_unsandboxed:
                _warn_unsandboxed_once()
                with tempfile.TemporaryDirectory(prefix="arpo-python-") as cwd:
                    env = {**self.env, "HOME": cwd, "TMPDIR": cwd}
                    res = run_limited(self._command(), stdin=stdin, env=env, limits=self.limits, cwd=cwd)
            else:  # pragma: no cover - construction refuses this state
                return ToolOutput("Error: the Python sandbox is unavailable; the code was not run.", error=True)
        except OSError as exc:
            logger.error("PythonInterpreter could not start a run: %s", exc)
            return ToolOutput(f"Error: the Python tool could not start ({exc.strerror or exc}).", error=True)
        return self._render(res)

    def _render(self, res: RunResult) -> ToolOutput:
        out = clean_text(res.stdout.decode("utf-8", errors="replace"))
        err = clean_text(res.stderr.decode("utf-8", errors="replace"))
        limit_bytes = self.limits.file_mb << 20
        notes: list[str] = []
        if res.stdout_size > len(res.stdout):
            notes.append(f"[stdout truncated: {res.stdout_size} bytes written]")
        if res.stdout_size >= limit_bytes or res.stderr_size >= limit_bytes:
            notes.append(f"Error: output limit exceeded ({self.limits.file_mb} MB); the program was stopped.")
        code = res.returncode
        timed_out = res.timed_out
        if timed_out:
            notes.append(f"Error: execution timed out after {self.limits.wall_s:g} s; the program was stopped.")
        elif code is not None and (code < 0 or code > 128):
            signum = -code if code < 0 else code - 128
            if signum == signal.SIGXCPU or (signum == signal.SIGKILL and res.duration_s >= self.limits.cpu_s):
                timed_out = True
                notes.append(f"Error: CPU time limit exceeded ({self.limits.cpu_s} s); the program was stopped.")
            else:
                notes.append(f"Error: the program was killed by signal {_signal_name(signum)} (exit status {code}).")
        elif code not in (0, None) and not err.strip():
            notes.append(f"Error: the program exited with status {code}.")
        if "MemoryError" in err:
            notes.append(f"(memory limit: {self.limits.memory_mb} MB)")
        if err.startswith("bwrap:"):
            logger.error("the Python sandbox failed to start: %s", err.strip()[:500])
            return ToolOutput(f"Error: the Python sandbox failed to start: {err.strip()[:500]}", error=True)
        failed = timed_out or bool(notes and any(n.startswith("Error") for n in notes)) or code != 0
        text = _compose(out, err if failed else "", notes, self.max_output_chars)
        if not failed and not text.strip():
            text = "(no output; use print() to show values)"
        return ToolOutput(text, error=failed, timed_out=timed_out)

    def __repr__(self) -> str:
        mode = "bubblewrap" if self.sandboxed else "UNSANDBOXED"
        return f"PythonInterpreter(name={self.name!r}, {mode}, timeout={self.limits.wall_s:g}s)"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"#{signum}"


def _compose(out: str, err: str, notes: list[str], limit: int) -> str:
    """stdout, then the traceback, then the notes, within `limit` characters.

    When too long, the start of stdout and the end of the traceback (where the error is) are kept.
    """
    tail = "\n".join(notes)
    err = err.rstrip()
    budget = limit - len(tail) - 2
    if len(out) + len(err) + 1 > budget:
        err_budget = min(len(err), max(budget // 2, budget - len(out) - 1))
        if len(err) > err_budget:
            err = "…" + err[len(err) - err_budget + 1 :] if err_budget > 1 else ""
        out_budget = max(0, budget - len(err) - 1)
        if len(out) > out_budget:
            out = out[: max(0, out_budget - 1)] + "…"
    parts = [p for p in (out.rstrip("\n"), err, tail) if p]
    return "\n".join(parts)[: max(limit, 0)] if parts else ""


def python_interpreter_available() -> bool:
    """Whether a sandboxed `PythonInterpreter` can be built on this machine (runs a probe)."""
    try:
        PythonInterpreter()
    except Exception:  # noqa: BLE001
        return False
    return True


__all__ = ["PythonInterpreter", "RUNNER", "python_interpreter_available"]

if os.name != "posix":  # pragma: no cover
    logger.warning("PythonInterpreter needs Linux; it will refuse to run here unless allow_unsandboxed=True")
