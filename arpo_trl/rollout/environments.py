"""TRL environments (`environment_factory`) inside a rollout tree: an environment is forked with its trajectory.

A branch copies its parent's token state right after a tool result; a stateful environment (a game, a sandbox, a
counter) must be copied at the same moment, so that the branch's later tool calls act on its own state while both
share everything that happened before the fork. `fork_environment` makes that copy:

1. ``env.fork()`` when the environment defines it (the environment knows best: e.g. it reopens a connection),
2. else ``env.clone()``,
3. else ``copy.deepcopy(env)``.

An environment none of these can copy is refused when the trainer is built (`check_forkable`), and so is one without
``fork()``/``clone()`` whose state holds a live connection (a socket, an HTTP or WebSocket client, a subprocess, an
open file, a database connection: `live_connections`): a copy of a connection is not a copy of the episode behind it
(the copy shares the server's game with its parent, or breaks), so such an environment must say how it forks. The
same check runs again at each fork (a connection opened by ``reset`` appears only then).
"""

from __future__ import annotations

import collections
import copy
import http.client
import inspect
import io
import multiprocessing.connection
import multiprocessing.process
import re
import selectors
import socket
import sqlite3
import subprocess
import types
from asyncio import BaseTransport, StreamReader, StreamWriter
from collections.abc import Callable
from typing import Any

from ..tools import tool_name

# Methods of an environment that are not tools: TRL's two, and the copy hooks ARPO uses (TRL would otherwise offer
# them to the model as tools; `ARPOTrainer` removes them from the rendered tool list too).
NOT_TOOLS = ("reset", "get_reward", "fork", "clone")


# Standard-library objects that are live connections or handles: copying one copies the handle, not what is behind.
_LIVE_TYPES: tuple[type, ...] = (
    socket.socket,  # ssl.SSLSocket too
    http.client.HTTPConnection,  # HTTPSConnection too
    subprocess.Popen,
    sqlite3.Connection,
    sqlite3.Cursor,
    selectors.BaseSelector,
    BaseTransport,
    StreamReader,
    StreamWriter,
    multiprocessing.connection.Connection,
    multiprocessing.process.BaseProcess,
    io.IOBase,  # open files and file-like streams (in-memory buffers excepted below)
)
_COPYABLE_STREAMS = (io.StringIO, io.BytesIO)  # in memory: a deep copy is a faithful copy
# Third-party clients, by package and class name (matched over the class's MRO, so subclasses count): HTTP and
# WebSocket clients, RPC channels, database and queue connections, OpenEnv's environment clients.
_CLIENT_PACKAGES = frozenset(
    "requests httpx aiohttp urllib3 websocket websockets grpc paramiko pika zmq redis pymongo psycopg psycopg2 "
    "pymysql sqlalchemy openenv openenv_core envs".split()
)
_CLIENT_NAME = re.compile(r"Client|Connection|Session|Channel|Socket|Pool|Transport|Redis")
_OPAQUE_PACKAGES = frozenset({"numpy", "torch", "pandas", "jax", "tensorflow", "PIL", "scipy"})  # data, not handles
_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), range, memoryview)
_SCAN_LIMIT = 10_000  # objects visited at most: the state of a board game is far smaller


def _live_kind(obj: Any) -> str | None:
    """What kind of live connection `obj` is (its class name), or None."""
    if isinstance(obj, _COPYABLE_STREAMS):
        return None
    if isinstance(obj, _LIVE_TYPES):
        return type(obj).__name__
    for cls in type(obj).__mro__:
        package = (getattr(cls, "__module__", None) or "").split(".")[0]
        if package in _CLIENT_PACKAGES and _CLIENT_NAME.search(cls.__name__):
            return f"{type(obj).__module__}.{type(obj).__qualname__}"
    return None


def _copies_itself(obj: Any) -> bool:
    """Whether `copy.deepcopy` copies `obj` its own way (``__deepcopy__``, ``__reduce__``): not through its attributes,
    so what they hold is not copied (a `logging.Logger` is shared by name, with the stderr stream of its handlers)."""
    cls = type(obj)
    if isinstance(obj, dict | list | tuple | set | frozenset | collections.deque | types.MethodType):
        return False
    return (
        getattr(cls, "__deepcopy__", None) is not None
        or getattr(cls, "__reduce_ex__", object.__reduce_ex__) is not object.__reduce_ex__
        or getattr(cls, "__reduce__", object.__reduce__) is not object.__reduce__
    )


def live_connections(env: Any, limit: int = 3) -> list[str]:
    """Where `env`'s state holds a live connection: up to `limit` entries ``"path (kind)"``, e.g.
    ``"env.conn.sock (socket)"``. Follows attributes, ``__slots__``, containers and bound methods' instances, at most
    `_SCAN_LIMIT` objects; arrays and tensors are data, not followed."""
    found: list[str] = []
    seen: set[int] = set()
    todo = collections.deque([("env", env)])
    while todo and len(seen) < _SCAN_LIMIT and len(found) < limit:
        path, obj = todo.popleft()
        if isinstance(obj, _ATOMS) or id(obj) in seen:
            continue
        seen.add(id(obj))
        kind = _live_kind(obj)
        if kind is not None:
            found.append(f"{path} ({kind})")
            continue
        if isinstance(obj, type | types.ModuleType | types.FunctionType | types.BuiltinFunctionType | types.CodeType):
            continue
        if (type(obj).__module__ or "").split(".")[0] in _OPAQUE_PACKAGES or _copies_itself(obj):
            continue
        if isinstance(obj, dict):
            todo.extend((f"{path}[{k!r}]", v) for k, v in list(obj.items()))
        elif isinstance(obj, list | tuple | set | frozenset | collections.deque):
            todo.extend((f"{path}[{i}]", v) for i, v in enumerate(list(obj)))
        elif isinstance(obj, types.MethodType):
            todo.append((f"{path}.__self__", obj.__self__))
        else:
            state = getattr(obj, "__dict__", None)
            if isinstance(state, dict):
                todo.extend((f"{path}.{k}", v) for k, v in list(state.items()))
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()) if isinstance(getattr(cls, "__slots__", ()), tuple) else ():
                    if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                        todo.append((f"{path}.{slot}", getattr(obj, slot)))
    return found


def _has_fork(env: Any) -> bool:
    return any(callable(getattr(env, name, None)) for name in ("fork", "clone"))


def _connection_error(env: Any, found: list[str], when: str) -> ValueError:
    return ValueError(
        f"environment_factory returned a {type(env).__name__} whose state holds a live connection "
        f"({'; '.join(found)}) and that defines no fork() or clone(); {when}. ARPO forks a trajectory mid-episode, "
        "and its environment with it, and a copy of a connection is not a copy of the episode behind it (the copy "
        f"shares the server's state with its parent, or breaks). Define {type(env).__name__}.fork() returning an "
        "independent environment in the same state (e.g. open a new connection and have the server copy the "
        "episode, or replay its actions), or clone()."
    )


def fork_environment(env: Any) -> Any:
    """An independent copy of `env` in its current state: `fork()`, else `clone()`, else `copy.deepcopy` (refused
    for an environment holding a live connection)."""
    for name in ("fork", "clone"):
        method = getattr(env, name, None)
        if callable(method):
            twin = method()
            if twin is env:
                raise ValueError(f"{type(env).__name__}.{name}() returned the same object; it must return a copy")
            return twin
    found = live_connections(env)
    if found:
        raise _connection_error(env, found, "it cannot be forked for a branch")
    return copy.deepcopy(env)


def check_forkable(env: Any) -> None:
    """Raise a clear error when `env` cannot be copied for a branch: it holds a live connection and defines no
    `fork()`/`clone()`, or it cannot be deep-copied. An environment with its own `fork()` or `clone()` is trusted:
    probed before `reset`, such a method may rightly need state that `reset` creates."""
    if _has_fork(env):
        return
    found = live_connections(env)
    if found:
        raise _connection_error(env, found, "ARPO refuses to copy it")
    try:
        fork_environment(env)
    except Exception as exc:  # noqa: BLE001 - any failure means the environment cannot be forked
        raise ValueError(
            f"environment_factory returned a {type(env).__name__} that cannot be copied for a branch "
            f"({type(exc).__name__}: {exc}). ARPO forks a trajectory mid-episode, and its environment with it: "
            "define a fork() (or clone()) method that returns an independent copy of the environment's state, or "
            "make it deep-copyable."
        ) from exc


def environment_tools(env: Any, standalone: list[Callable]) -> dict[str, Callable]:
    """The tools a trajectory bound to `env` may call: the standalone tools plus `env`'s public methods (TRL's rule:
    every public function of the class except reset and get_reward, bound to this instance)."""
    tools = {tool_name(t): t for t in standalone}
    for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction):
        if name in NOT_TOOLS or name.startswith("_"):
            continue
        tools[name] = getattr(env, name)
    return tools
