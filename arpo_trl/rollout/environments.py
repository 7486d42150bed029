"""TRL environments (`environment_factory`) inside a rollout tree: an environment is forked with its trajectory.

A branch copies its parent's token state right after a tool result; a stateful environment (a game, a sandbox, a
counter) must be copied at the same moment, so that the branch's later tool calls act on its own state while both
share everything that happened before the fork. `fork_environment` makes that copy:

1. ``env.fork()`` when the environment defines it (the environment knows best: e.g. it reopens a connection),
2. else ``env.clone()``,
3. else ``copy.deepcopy(env)``.

An environment none of these can copy is refused when the trainer is built (`check_forkable`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

from ..tools import tool_name

# Methods of an environment that are not tools: TRL's two, and the copy hooks ARPO uses (TRL would otherwise offer
# them to the model as tools; `ARPOTrainer` removes them from the rendered tool list too).
NOT_TOOLS = ("reset", "get_reward", "fork", "clone")


def fork_environment(env: Any) -> Any:
    """An independent copy of `env` in its current state: `fork()`, else `clone()`, else `copy.deepcopy`."""
    for name in ("fork", "clone"):
        method = getattr(env, name, None)
        if callable(method):
            twin = method()
            if twin is env:
                raise ValueError(f"{type(env).__name__}.{name}() returned the same object; it must return a copy")
            return twin
    return copy.deepcopy(env)


def check_forkable(env: Any) -> None:
    """Raise a clear error when `env` cannot be deep-copied for a branch. An environment with its own `fork()` or
    `clone()` is trusted: probed before `reset`, such a method may rightly need state that `reset` creates."""
    if any(callable(getattr(env, name, None)) for name in ("fork", "clone")):
        return
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
