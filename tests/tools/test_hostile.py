"""Hostile model input: every case must be contained, leave the caller alive, and tell the model what happened.

Each case runs real code in a real bubblewrap sandbox and asserts (1) containment, checked from the host where
there is something to check (files, servers, processes, secrets), (2) that this process and a sentinel process
of ours survive, and (3) the exact error text the model reads.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from arpo_trl.tools import PythonInterpreter, ToolCall, ToolExecutor, parse_tag_call


@pytest.fixture(scope="module")
def sentinel():
    """A host process of ours that sandboxed code will try to kill."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def survivors(sentinel, python_tool):
    """After every case: the sentinel lives and the interpreter still works."""
    yield
    assert sentinel.poll() is None, "sandboxed code killed a host process"
    assert python_tool("1 + 1") == "2"


def last_line(text: str) -> str:
    return text.rstrip().splitlines()[-1]


# -- network --------------------------------------------------------------------------------------------------


def test_network_loopback_of_the_host_is_unreachable(python_tool):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        out = python_tool(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert out.error
        assert last_line(out) == "ConnectionRefusedError: [Errno 111] Connection refused"
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever reached the host's server
    finally:
        server.close()


def test_network_outside_is_unreachable(python_tool):
    out = python_tool("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)")
    assert out.error and last_line(out) == "OSError: [Errno 101] Network is unreachable"


def test_dns_does_not_resolve(python_tool):
    out = python_tool("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)")
    assert out.error
    assert last_line(out) == "urllib.error.URLError: <urlopen error [Errno -3] Temporary failure in name resolution>"


def test_abstract_unix_socket_of_the_host_is_unreachable(python_tool):
    name = f"\0arpo-hostile-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(name)
    server.listen()
    try:
        out = python_tool(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({name!r})")
        assert out.error and last_line(out) == "ConnectionRefusedError: [Errno 111] Connection refused"
    finally:
        server.close()


# -- filesystem -----------------------------------------------------------------------------------------------


def test_writing_outside_the_scratch_dir_fails(python_tool):
    venv_file = os.path.join(sys.prefix, "pwned.txt")
    repo_file = os.path.join(os.getcwd(), "pwned.txt")
    for path, expected in [
        ("/usr/pwned.txt", "OSError: [Errno 30] Read-only file system: '/usr/pwned.txt'"),
        (venv_file, f"OSError: [Errno 30] Read-only file system: '{venv_file}'"),
        ("/pwned.txt", "OSError: [Errno 30] Read-only file system: '/pwned.txt'"),
    ]:
        out = python_tool(f"open({path!r}, 'w').write('x')")
        assert out.error and last_line(out) == expected
    assert not os.path.exists(venv_file) and not os.path.exists(repo_file)
    out = python_tool(f"open({repo_file!r}, 'w').write('x')")
    # The host's repository never receives the file. Inside the sandbox the path is either absent (an error), or,
    # when the checkout lives under /tmp, it lands in the private scratch tmpfs that vanishes with the run.
    assert not os.path.exists(repo_file)
    if not os.getcwd().startswith("/tmp"):
        assert out.error


def test_host_secret_files_are_invisible(python_tool, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    for path in [str(secret), "/root/.ssh/id_rsa", os.path.expanduser("~/.ssh/id_rsa"), "/etc/shadow", "/etc/passwd"]:
        out = python_tool(f"print(open({path!r}).read())")
        assert out.error, path
        assert last_line(out) == f"FileNotFoundError: [Errno 2] No such file or directory: {path!r}"
    listing = python_tool("import os; sorted(os.listdir('/'))")
    # The root shows the system directories plus the top of every path the sandbox binds for the interpreter
    # (the virtualenv lives under the checkout, e.g. /work/... here or /check/... on CI) - nothing else.
    bound_tops = {p.strip("/").split("/")[0] for p in python_tool.sandbox.ro_binds}
    system_dirs = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr"}
    assert set(eval(listing)) <= system_dirs | bound_tops
    assert not {"root", "home"} & set(eval(listing)) - bound_tops
    assert python_tool("import os; os.path.exists(os.path.expanduser('~/.ssh'))") == "False"


def test_parent_environment_does_not_leak(python_tool, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FAKE_SECRET_1234")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-FAKE-SECRET")
    out = python_tool(
        "import os\nprint(sorted(os.environ))\nprint(open('/proc/1/environ', 'rb').read())\n"
        "print(open('/proc/self/environ', 'rb').read())"
    )
    assert not out.error
    assert "FAKE_SECRET" not in out and "FAKE-SECRET" not in out and "HF_TOKEN" not in out
    assert out.splitlines()[0].startswith("['HOME', 'LANG', 'LC_ALL'")


def test_scratch_space_is_bounded(python_tool):
    out = python_tool(
        "for i in range(100):\n    open(f'/tmp/f{i}', 'wb').write(b'x' * (4 << 20))"
    )  # 400 MB into a 64 MB tmpfs
    assert out.error and last_line(out) == "OSError: [Errno 28] No space left on device"
    shm = python_tool("open('/dev/shm/x', 'wb').write(b'x' * (10 << 20))")
    assert shm.error and last_line(shm) == "OSError: [Errno 28] No space left on device"
    big = python_tool("open('/tmp/one', 'wb').write(b'x' * (20 << 20))")  # 8 MB per file
    assert big.error and last_line(big) == "OSError: [Errno 27] File too large"


# -- processes and signals ------------------------------------------------------------------------------------


def test_fork_bomb(python_tool):
    out = python_tool("import os\nwhile True:\n    os.fork()")
    assert out.error and last_line(out) == "PermissionError: [Errno 1] Operation not permitted"


def test_spawning_subprocesses(python_tool):
    out = python_tool("import subprocess\nsubprocess.run(['sh', '-c', 'echo escaped'])")
    assert out.error and last_line(out) == "PermissionError: [Errno 1] Operation not permitted"
    assert python_tool("import os\nos.system('echo escaped')") == "32512"  # the shell never starts
    mp = python_tool("import multiprocessing as m\np = m.Process(target=print)\np.start()")
    assert mp.error and last_line(mp) == "PermissionError: [Errno 1] Operation not permitted"


def test_killing_the_parent_and_host_processes(python_tool, sentinel):
    # the sandbox's parent is its own pid-1 (a bwrap init), which ignores signals from inside
    assert python_tool("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('still here')") == "still here"
    # Real host pids do not exist in the sandbox. Pid 1 does (the sandbox's own init, which ignores the signal): the
    # test's parent is pid 1 when pytest was started detached, so it is left out.
    for pid in {sentinel.pid, os.getpid(), os.getppid()} - {1}:
        out = python_tool(f"import os, signal\nos.kill({pid}, signal.SIGKILL)")
        assert out.error and last_line(out) == "ProcessLookupError: [Errno 3] No such process"
    out = python_tool("import os, signal\nos.kill(-1, signal.SIGKILL)")  # everything it may signal: nothing
    assert out.error and last_line(out) == "ProcessLookupError: [Errno 3] No such process"
    out = python_tool("import os, signal\nos.killpg(0, signal.SIGKILL)")  # its own group: only itself
    assert out == "Error: the program was killed by signal SIGKILL (exit status 137)." and out.error


def test_proc_shows_only_the_sandbox(python_tool):
    assert python_tool("import os\nsorted(int(p) for p in os.listdir('/proc') if p.isdigit())") == "[1, 2]"
    out = python_tool(f"open('/proc/{os.getpid()}/environ').read()")
    assert (
        out.error
        and last_line(out) == f"FileNotFoundError: [Errno 2] No such file or directory: '/proc/{os.getpid()}/environ'"
    )
    assert python_tool("open('/proc/self/status').read().split('CapEff:')[1].split()[0]") == "0000000000000000"
    sysfs = python_tool("import os\nos.listdir('/sys')")
    assert sysfs.error and last_line(sysfs) == "FileNotFoundError: [Errno 2] No such file or directory: '/sys'"


def test_kernel_escape_hatches_are_closed(python_tool):
    out = python_tool(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for name, call in [('unshare', lambda: libc.unshare(0x10000000)),\n"
        "                   ('mount', lambda: libc.mount(b'none', b'/usr', b'tmpfs', 0, None)),\n"
        "                   ('ptrace', lambda: libc.ptrace(16, 1, 0, 0))]:\n"
        "    print(name, call(), ctypes.get_errno())"
    )
    assert out == "unshare -1 1\nmount -1 1\nptrace -1 1"  # EPERM each time
    chroot = python_tool("import os\nos.chroot('/tmp')")
    assert chroot.error and last_line(chroot) == "PermissionError: [Errno 1] Operation not permitted: '/tmp'"


def test_signals(python_tool, short_python_tool):
    segv = python_tool("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert segv == "Error: the program was killed by signal SIGSEGV (exit status 139)." and segv.error
    crash = python_tool("import ctypes\nctypes.string_at(0)")
    assert crash == "Error: the program was killed by signal SIGSEGV (exit status 139)."
    term = python_tool("import signal\nsignal.raise_signal(signal.SIGTERM)")
    assert term == "Error: the program was killed by signal SIGTERM (exit status 143)."
    t0 = time.monotonic()
    stop = short_python_tool("import os, signal\nprint('stopping')\nos.kill(os.getpid(), signal.SIGSTOP)")
    assert stop == "stopping\nError: execution timed out after 2 s; the program was stopped."
    assert stop.timed_out and time.monotonic() - t0 < 4


# -- resources ------------------------------------------------------------------------------------------------


def test_memory_bomb(python_tool):
    out = python_tool("x = bytearray(8 * 1024**3)")
    assert out.error and out.endswith("MemoryError\n(memory limit: 1024 MB)")
    grow = python_tool("chunks = []\nwhile True:\n    chunks.append(b'x' * 10**7)")
    assert grow.error and grow.endswith("MemoryError\n(memory limit: 1024 MB)")


def test_thread_bomb(short_python_tool):
    out = short_python_tool(
        "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()"
    )
    assert out.error and last_line(out) == "RuntimeError: can't start new thread"


def test_infinite_loop(short_python_tool):
    t0 = time.monotonic()
    out = short_python_tool("print('working')\nwhile True:\n    pass")
    assert out == "working\nError: execution timed out after 2 s; the program was stopped."
    assert out.timed_out and out.error and time.monotonic() - t0 < 4


def test_cpu_time_limit():
    tool = PythonInterpreter(timeout=8, cpu_time=1)
    t0 = time.monotonic()
    out = tool("while True:\n    pass")
    assert out == "Error: CPU time limit exceeded (1 s); the program was stopped." and out.timed_out
    assert time.monotonic() - t0 < 4


def test_hundred_megabytes_of_stdout(python_tool):
    t0 = time.monotonic()
    out = python_tool("import sys\nsys.stdout.write('x' * 100_000_000)")
    assert time.monotonic() - t0 < 5
    assert out.error and len(out) <= python_tool.max_output_chars
    assert out.startswith("xxxx")
    assert out.endswith(
        "OSError: [Errno 27] File too large\n[stdout truncated: 8388608 bytes written]\n"
        "Error: output limit exceeded (8 MB); the program was stopped."
    )


def test_deep_recursion(python_tool, short_python_tool):
    out = python_tool("def f(n):\n    return f(n + 1)\nf(0)")
    assert out.error and last_line(out) == "RecursionError: maximum recursion depth exceeded"
    assert len(out) <= python_tool.max_output_chars
    deep = short_python_tool("import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)")
    assert deep.error  # stopped by the memory, stack or time limit, whichever comes first
    assert any(s in deep for s in ("MemoryError", "SIGSEGV", "timed out after 2 s", "RecursionError"))


def test_too_many_open_files(python_tool):
    out = python_tool("files = [open('/dev/null') for _ in range(100_000)]")
    assert out.error and last_line(out) == "OSError: [Errno 24] Too many open files: '/dev/null'"


# -- odd programs ---------------------------------------------------------------------------------------------


def test_binary_and_invalid_utf8_output(python_tool):
    out = python_tool("import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe\\x80 \\x00 end')\nNone")
    assert out == "ok \ufffd\ufffd\ufffd \ufffd end" and not out.error
    out.encode("utf-8")  # safe for any tokenizer
    ex = ToolExecutor([python_tool], timeout=20)
    text = ex.run([ToolCall("python", "import sys\nsys.stdout.buffer.write(bytes(range(256)))\nNone")])[0].text
    assert "\x00" not in text and text.encode("utf-8") and text.count("\ufffd") == 129  # NUL + 128 bytes >= 0x80


def test_syntax_error(python_tool):
    out = python_tool("def f(:\n    pass")
    assert out.error
    assert out == '  File "<string>", line 1\n    def f(:\n          ^\nSyntaxError: invalid syntax'
    nul = python_tool("print('a')\x00")
    assert nul.error and last_line(nul) == "SyntaxError: source code string cannot contain null bytes"


def test_sys_exit(python_tool):
    assert python_tool("import sys\nprint('done')\nsys.exit(0)") == "done"
    three = python_tool("import sys\nsys.exit(3)")
    assert three == "Error: the program exited with status 3." and three.error
    msg = python_tool("import sys\nsys.exit('fatal: giving up')")
    assert msg == "fatal: giving up" and msg.error
    hard = python_tool("import os\nos._exit(7)")
    assert hard == "Error: the program exited with status 7." and hard.error


def test_very_long_code(python_tool):
    code = "total = 0\n" + "total += 1\n" * 100_000 + "print(total)"  # 1.1 MB: beyond one argv string's limit
    assert python_tool(code) == "100000"
    call = parse_tag_call(f"<python>{code}</python>", ["python"])
    assert call.parse_error == f"Error: the <python> call is {len(code)} characters long; the limit is 100000."


def test_nested_unclosed_and_empty_tags_through_the_executor(python_tool):
    ex = ToolExecutor([python_tool], timeout=20)
    texts = [
        "<python>print('outer')<python>print('inner')</python>",
        "<python>print('never closed')",
        "<python>   </python>",
        "</python>",
        "<python>print('<python>nested</python>')</python>",
    ]
    calls = [parse_tag_call(t, ["python"]) for t in texts]
    assert calls[1] is None  # no call: nothing runs
    res = ex.run([c for c in calls if c is not None])
    assert res[0].text == "inner" and not res[0].error
    assert res[1].text == "Error: empty <python> call; put the input between the tags." and res[1].error
    assert res[2].text == "Error: found </python> without a matching <python> before it." and res[2].error
    # the last <python> before the first </python> opens the call: the content is `nested`
    assert calls[4].arguments == "nested"
    assert res[3].error and last_line(res[3].text) == "NameError: name 'nested' is not defined"


def test_a_round_of_hostile_calls_through_the_executor(short_python_tool):
    """Many hostile programs in one round: all answered, in order, within the tool's own limit, nothing raised."""
    codes = [
        "while True: pass",
        "import os\nwhile True: os.fork()",
        "x = bytearray(8 * 1024**3)",
        "import sys\nsys.stdout.write('y' * 100_000_000)",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('alive')",
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
        "print(open('/etc/shadow').read())",
        "21 * 2",
    ]
    ex = ToolExecutor([short_python_tool], max_workers=len(codes))  # the tool's own 2 s limit applies
    started = threading.active_count()
    t0 = time.monotonic()
    res = ex.run([ToolCall("python", c) for c in codes])
    assert time.monotonic() - t0 < 5
    assert res[0].timed_out and res[0].text == "Error: execution timed out after 2 s; the program was stopped."
    assert [r.error for r in res[1:]] == [True, True, True, False, True, True, False]
    assert res[4].text == "alive" and res[7].text == "42"
    deadline = time.monotonic() + 2  # finished workers exit: the sandbox stopped the loop, nothing is abandoned
    while threading.active_count() > started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= started
    assert ex.abandoned_calls == 0
