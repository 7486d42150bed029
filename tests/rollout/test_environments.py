"""Environments that cannot be copied safely are refused, not copied.

An environment whose episode lives on a server (OpenEnv's: a client per environment) holds a connection: a deep copy
copies the client, not the episode, so a branch would share its parent's server-side game or break mid-training.
Without its own `fork()`/`clone()`, such an environment is refused when the trainer is built, with a message saying
to define `fork()`; with one, it forks the episode on the server. The server here is real: a small HTTP game server
on the loopback interface, started by the tests.
"""

from __future__ import annotations

import copy
import http.client
import http.server
import io
import json
import logging
import re
import socket
import sqlite3
import subprocess
import sys
import threading
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from fakes import Counter, ScriptedTurns, tool_call

from arpo_trl import ARPOConfig, ARPOTrainer
from arpo_trl.rollout.environments import (
    NOT_TOOLS,
    check_forkable,
    environment_tools,
    fork_environment,
    live_connections,
)
from arpo_trl.testing import calc_dataset, chat_template_tokenizer

M = 4


class GameServer(http.server.ThreadingHTTPServer):
    """Counter episodes kept server-side: ``/reset`` opens one, ``/step`` adds to it, ``/fork`` copies it."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.episodes: dict[int, list[int]] = {}
        self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client's socket stays open between requests
    server: GameServer

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        query = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
        with self.server.lock:
            episodes = self.server.episodes
            if url.path == "/reset":
                answer = {"episode": len(episodes)}
                episodes[len(episodes)] = []
            elif url.path == "/step":
                episodes[query["episode"]].append(query["n"])
                answer = {"total": sum(episodes[query["episode"]])}
            elif url.path == "/fork":
                answer = {"episode": len(episodes)}
                episodes[len(episodes)] = list(episodes[query["episode"]])
            else:
                self.send_error(404)
                return
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    server = GameServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    RemoteCounter.port = server.server_address[1]
    yield server
    server.shutdown()
    server.server_close()


class RemoteCounter:
    """A TRL environment whose episode lives on the game server, reached over one HTTP connection."""

    port = 0

    def __init__(self) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", RemoteCounter.port, timeout=10)
        self.episode: int | None = None

    def _post(self, path: str) -> dict:
        self.conn.request("POST", path)
        return json.loads(self.conn.getresponse().read())

    def reset(self, **kwargs) -> None:
        self.episode = self._post("/reset")["episode"]

    def add(self, n: int) -> str:
        """
        Add n to the counter.

        Args:
            n: how much to add.

        Returns:
            The counter's new value.
        """
        return str(self._post(f"/step?episode={self.episode}&n={n}")["total"])


class ForkingRemoteCounter(RemoteCounter):
    """Defines fork(): a new connection, and the server copies the episode."""

    def fork(self) -> ForkingRemoteCounter:
        twin = ForkingRemoteCounter()
        twin.episode = self._post(f"/fork?episode={self.episode}")["episode"]
        return twin


class SocketCounter:
    """Holds a raw socket to the server (a hand-written client)."""

    def __init__(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", RemoteCounter.port), timeout=10)

    def reset(self, **kwargs) -> None:
        pass

    def add(self, n: int) -> str:
        """
        Add n.

        Args:
            n: how much.
        """
        return str(n)


class LazyRemoteCounter(RemoteCounter):
    """Connects only in reset: nothing to see when the trainer probes it, refused at the first fork instead."""

    def __init__(self) -> None:
        self.conn = None
        self.episode = None

    def reset(self, **kwargs) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", RemoteCounter.port, timeout=10)
        super().reset()


# ---------------------------------------------------------------------------------------------- without a trainer


def test_a_live_connection_is_found_wherever_the_state_holds_it(server, tmp_path):
    class Slotted:
        __slots__ = ("inner",)

        def __init__(self, inner):
            self.inner = inner

    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
    other = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    handle = open(tmp_path / "log.txt", "w")  # noqa: SIM115 - held by the environment on purpose
    database = sqlite3.connect(":memory:")
    try:

        class Env:
            pass

        env = Env()
        env.settings = {"clients": [Slotted(other)]}
        env.send = conn.request  # a bound method's instance is followed
        env.jobs = (process,)
        env.log = handle
        env.db = database
        found = live_connections(env, limit=10)
        assert found == [  # breadth first: the shallowest first
            "env.log (TextIOWrapper)",
            "env.db (Connection)",
            "env.send.__self__ (HTTPConnection)",
            "env.jobs[0] (Popen)",
            "env.settings['clients'][0].inner (HTTPConnection)",
        ]
        # Data is not a connection: in-memory streams, arrays, plain containers; nor is what deepcopy shares rather
        # than copies (a logger, whose root handler writes to stderr).
        data = Env()
        data.buffer, data.board, data.history = io.StringIO("abc"), np.zeros((4, 4)), [[1, 2], {"a": (3,)}]
        data.log = logging.getLogger("a.game")
        assert live_connections(data) == []
        check_forkable(data)
        assert fork_environment(data).log is data.log
    finally:
        process.wait(10)
        handle.close()
        database.close()


def test_a_connection_deepcopy_would_copy_is_refused_with_a_message_to_define_fork(server):
    env = RemoteCounter()
    env.reset()
    env.add(1)  # a live keep-alive socket now
    assert env.conn.sock is not None
    with pytest.raises(TypeError):  # what deepcopy made of it before: a crash mid-training
        copy.deepcopy(env)
    fresh = RemoteCounter()
    twin = copy.deepcopy(fresh)  # unconnected, deepcopy "works": both would talk to the same episode
    assert twin.conn is not fresh.conn
    for candidate in (env, fresh):
        with pytest.raises(ValueError) as refused:
            check_forkable(candidate)
        message = str(refused.value)
        assert "RemoteCounter whose state holds a live connection (env.conn (HTTPConnection))" in message
        assert "defines no fork() or clone()" in message and "Define RemoteCounter.fork()" in message
        with pytest.raises(ValueError, match=r"live connection .* cannot be forked for a branch"):
            fork_environment(candidate)


def test_a_connection_opened_by_reset_is_refused_at_the_fork(server):
    env = LazyRemoteCounter()
    check_forkable(env)  # the trainer's probe, before reset: nothing live yet
    env.reset()
    with pytest.raises(ValueError, match=r"LazyRemoteCounter whose state holds a live connection.*define|Define"):
        fork_environment(env)
    assert len(server.episodes) == 1  # nothing was copied


def test_an_environment_with_fork_forks_the_episode_on_the_server(server):
    env = ForkingRemoteCounter()
    check_forkable(env)
    env.reset()
    assert env.add(1) == "1"
    twin = fork_environment(env)
    assert twin.conn is not env.conn and twin.episode != env.episode
    assert twin.add(10) == "11" and env.add(20) == "21"
    assert server.episodes == {env.episode: [1, 20], twin.episode: [1, 10]}


# ---------------------------------------------------------------------------------------------- the real trainer


def remote_args(tmp_path, name, **overrides):
    values = dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=8,
        num_generations=M,
        max_completion_length=160,
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        tool_format="chat_template",
        initial_rollouts=2,
        branch_base_probability=1.0,  # α = 1, β = 0: every decision forks while slots remain
        branch_entropy_weight=0.0,
        max_tool_calling_iterations=3,
    )
    values.update(overrides)
    return ARPOConfig(**values)


def total_reward(environments, **kwargs):
    return [float(e.episode or 0) for e in environments]


@pytest.mark.parametrize("env_class", [RemoteCounter, SocketCounter])
def test_the_trainer_refuses_an_environment_holding_a_connection(server, tool_model, tmp_path, env_class):
    with pytest.raises(ValueError) as refused:
        ARPOTrainer(
            model=tool_model, reward_funcs=[total_reward], args=remote_args(tmp_path, "refused"),
            train_dataset=calc_dataset(8), processing_class=chat_template_tokenizer(), environment_factory=env_class,
        )  # fmt: skip
    message = str(refused.value)
    kind = "HTTPConnection" if env_class is RemoteCounter else "socket"
    assert f"{env_class.__name__} whose state holds a live connection (env." in message and f"({kind}))" in message
    assert f"Define {env_class.__name__}.fork()" in message


def test_a_remote_environment_with_fork_trains_and_each_branch_plays_its_own_episode(server, tool_model, tmp_path):
    """Roots add 1 (shared by their branches, run once), then every trajectory adds its own amount: on the server,
    each branch's episode holds its parent's first move and its own second one, and the parent's is untouched."""
    tok = chat_template_tokenizer()
    trainer = ARPOTrainer(
        model=tool_model, reward_funcs=[total_reward], args=remote_args(tmp_path, "forking"),
        train_dataset=calc_dataset(8), processing_class=tok, environment_factory=ForkingRemoteCounter,
    )  # fmt: skip
    assert [t.__name__ for t in trainer.tools] == ["add"]

    def script(turn, row):
        return tool_call("add", n=1) if turn == 0 else tool_call("add", n=10 * (row + 1)) if turn == 1 else "Done."

    trainer.rollout_backend.generator = ScriptedTurns(tok, script)
    trainer.train()
    trajs = trainer.observed_rollout.trajectories
    branches = [t for t in trajs if t.kind == "branch"]
    assert len(branches) == 2 * (M - 2)  # 2 groups × (M − N) slots, all filled by forks
    for branch in branches:
        parent = trajs[branch.parent]
        mine, theirs = server.episodes[branch.env.episode], server.episodes[parent.env.episode]
        assert branch.env.episode != parent.env.episode and branch.env.conn is not parent.env.conn
        assert mine[0] == theirs[0] == 1 and mine[1] != theirs[1] and len(mine) == len(theirs) == 2
        results = [m["content"] for m in branch.messages if m["role"] == "tool"]
        assert results == ["1", str(sum(mine))]


# -------------------------- tests written for mutants that survived `make mutate` (tests/README.md, "Mutation testing")


def test_fork_environment_prefers_fork_then_clone_then_deepcopy():
    class Both(Counter):
        def fork(self):
            return Counter("forked")

        def clone(self):
            return Counter("cloned")

    class CloneOnly(Counter):
        def clone(self):
            return Counter("cloned")

    assert fork_environment(Both("x")).name == "forked"
    assert fork_environment(CloneOnly("x")).name == "cloned"
    env = Counter("x")
    env.count = 3
    twin = fork_environment(env)
    assert twin is not env and (twin.name, twin.count) == ("x", 3)
    twin.calc("1")
    assert env.count == 3  # independent state


@pytest.mark.parametrize("method", ["fork", "clone"])
def test_a_fork_or_clone_returning_the_same_object_is_refused(method):
    env = type("Selfish", (Counter,), {method: lambda self: self})("x")
    with pytest.raises(ValueError, match=re.escape(f"Selfish.{method}() returned the same object; it must return")):
        fork_environment(env)


def test_check_forkable_trusts_fork_and_clone_and_explains_an_uncopyable_environment():
    class Uncopyable(Counter):
        def __deepcopy__(self, memo):
            raise TypeError("holds a socket")

    def needs_reset(self):
        raise RuntimeError("reset() opens the connection this copies")

    for method in ("fork", "clone"):  # trusted: not probed before reset (the probe would fail)
        check_forkable(type("Own", (Uncopyable,), {method: needs_reset})("x"))
    check_forkable(Counter("x"))  # deep-copyable: accepted
    with pytest.raises(ValueError) as error:
        check_forkable(Uncopyable("x"))
    message = str(error.value)
    assert message.startswith("environment_factory returned a Uncopyable that cannot be copied for a branch ")
    assert "(TypeError: holds a socket)" in message
    assert message.endswith(
        "define a fork() (or clone()) method that returns an independent copy of the environment's state, or "
        "make it deep-copyable."
    )
    assert isinstance(error.value.__cause__, TypeError)


def test_environment_tools_are_the_standalone_tools_and_the_public_methods_bound_to_the_instance():
    def search(query: str) -> str:
        """Search."""
        return query

    env = Counter("x")
    tools = environment_tools(env, [search])
    assert sorted(tools) == ["calc", "search"]  # not reset/get_reward/fork/clone, nor _private
    assert set(NOT_TOOLS) == {"reset", "get_reward", "fork", "clone"}
    assert tools["search"] is search and tools["calc"]("1") == "x0" and env.count == 1


def test_environment_copy_hooks_are_not_offered_as_tools():
    class Hooks(Counter):
        def fork(self):
            return Hooks(self.name)

        def clone(self):
            return Hooks(self.name)

    assert sorted(environment_tools(Hooks("x"), [])) == ["calc"]
