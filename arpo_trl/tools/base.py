"""The one tool protocol shared by both tool formats of `ARPOTrainer`.

A tool is a plain Python callable with a name and a docstring:

- in ``tool_format="tags"`` it is called with one string, the text between ``<name>`` and ``</name>``;
- in ``tool_format="chat_template"`` it is called with the keyword arguments of a JSON tool call, as TRL does.

Its name is ``tool.name`` when set (tool objects such as ``PythonInterpreter``), else ``tool.__name__``.

Tool objects derive from `StringTool`: a callable object with one ``str`` argument that also looks like a plain
function to TRL and to ``transformers.utils.get_json_schema`` (``__name__``, a Google-style ``__doc__`` with an
``Args:`` section, annotated ``__call__``). A tool may return a `ToolOutput` (a ``str``) to tell the executor that
the call failed or timed out, and may raise `TransientToolError` to ask the executor for a retry.

Where a tool runs (`execution_mode`), as TRL runs it unless it says otherwise:

- ``"main_thread"`` (the default for a synchronous tool): inline on the trainer's main thread, one call at a time,
  without a time limit of ARPO's, exactly as `GRPOTrainer` calls it, so tools written for TRL (``signal.alarm``
  timeouts, thread-local state, clients that are not thread-safe) work unchanged;
- ``"threads"``: the tool declares ``thread_safe = True`` (the sandboxed `PythonInterpreter` and the search tools
  do; `declare_tool` sets it on a function): ARPO runs its calls concurrently in worker threads, each bounded by a
  time limit;
- ``"async"``: a coroutine function (or an object with an ``async def __call__``): awaited on an event loop,
  concurrently, and cancelled at its time limit.

A tool may also declare its own limits, which then are the ones that apply to it: ``time_limit`` (seconds a call
may take) and ``output_limit`` (the longest answer in characters; None: no cap of ARPO's). See docs/tools.md.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

Tool = Callable[..., Any]
T = TypeVar("T")

#: Where a tool's calls run; see the module docstring.
ExecutionMode = Literal["main_thread", "threads", "async"]


class _Unset:
    """The value of a limit a tool does not declare (None is a declared value: no cap)."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()


def is_async_tool(tool: Tool) -> bool:
    """Whether calling `tool` returns a coroutine: a coroutine function, a `functools.partial` of one, or an object
    whose ``__call__`` is one."""
    while isinstance(tool, functools.partial):
        tool = tool.func
    if inspect.iscoroutinefunction(tool):
        return True
    if inspect.isroutine(tool):
        return False
    call = type(tool).__dict__.get("__call__") or next(
        (c.__dict__["__call__"] for c in type(tool).__mro__ if "__call__" in c.__dict__), None
    )
    return call is not None and inspect.iscoroutinefunction(call)


def _declared(tool: Tool, attribute: str) -> Any:
    """`attribute` as `tool` declares it: on the callable itself (a function's attribute, a tool object's, a bound
    method's function), else on a bound method's instance (an environment class declaring it for its methods)."""
    value = getattr(tool, attribute, UNSET)
    owner = getattr(tool, "__self__", None)
    if value is UNSET and owner is not None and not inspect.ismodule(owner):
        value = getattr(owner, attribute, UNSET)
    return value


def execution_mode(tool: Tool) -> ExecutionMode:
    """Where the calls of `tool` run: async tools on an event loop, tools declaring ``thread_safe = True`` in ARPO's
    worker threads, every other tool inline on the main thread (as TRL calls it)."""
    if is_async_tool(tool):
        return "async"
    return "threads" if _declared(tool, "thread_safe") is True else "main_thread"


def declared_time_limit(tool: Tool) -> float | None:
    """The tool's own time limit in seconds (`time_limit`), or None when it declares none."""
    value = _declared(tool, "time_limit")
    if value is UNSET or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"tool {tool_name(tool)!r} declares time_limit={value!r}; it must be a number of seconds > 0")
    return float(value)


def declared_output_limit(tool: Tool) -> int | None | _Unset:
    """The tool's own output cap in characters (`output_limit`): an int, None (declared: no cap of ARPO's), or
    `UNSET` when it declares none."""
    value = _declared(tool, "output_limit")
    if value is UNSET or value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"tool {tool_name(tool)!r} declares output_limit={value!r}; it must be an int >= 1 or None")
    return value


def declare_tool(
    tool: T | None = None,
    *,
    thread_safe: bool | None = None,
    time_limit: float | None | _Unset = UNSET,
    output_limit: int | None | _Unset = UNSET,
) -> Any:
    """Declare how ARPO may run `tool` (sets the attributes `execution_mode` and the executor read); returns the
    tool itself, so it still is the plain function TRL's `GRPOTrainer` takes. Usable as a decorator::

        @declare_tool(thread_safe=True, time_limit=30)
        def lookup(query: str) -> str: ...

    Args:
        thread_safe: True: ARPO may run its calls concurrently in worker threads and stop waiting for one at its
            time limit; False (or undeclared): inline on the main thread, as TRL calls it.
        time_limit: seconds a call may take (the executor's `timeout` no longer applies to this tool).
        output_limit: longest answer in characters (None: no cap of ARPO's; the executor's cap no longer applies).
    """

    def apply(target: T) -> T:
        if thread_safe is not None:
            target.thread_safe = bool(thread_safe)  # type: ignore[attr-defined]
        if time_limit is not UNSET:
            target.time_limit = time_limit  # type: ignore[attr-defined]
            declared_time_limit(target)  # validates
        if output_limit is not UNSET:
            target.output_limit = output_limit  # type: ignore[attr-defined]
            declared_output_limit(target)
        return target

    return apply if tool is None else apply(tool)


def tool_name(tool: Tool) -> str:
    """The name a model uses to call `tool` (the tag name in tag mode, the function name in chat mode)."""
    name = getattr(tool, "name", None) or getattr(tool, "__name__", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"tool {tool!r} has no name: give it a `name` attribute or use a named function")
    return name


def tools_by_name(tools: list[Tool] | None) -> dict[str, Tool]:
    """Index tools by name; two tools with one name are a configuration error."""
    index: dict[str, Tool] = {}
    for tool in tools or []:
        if not callable(tool):
            raise TypeError(f"tools must be callables, got {tool!r}")
        name = tool_name(tool)
        if name in index:
            raise ValueError(f"two tools share the name {name!r}; tool names must be unique")
        index[name] = tool
    return index


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for. `arguments` is the tag content (str) or the JSON arguments (dict)."""

    name: str
    arguments: str | dict[str, Any]
    # Set by the parser when the call itself is malformed (e.g. empty content): no tool runs, the model
    # receives this message as the result and `tools/errors` counts it.
    parse_error: str | None = None


@dataclass(frozen=True)
class ToolResult:
    """What the model sees (`text`) and what the metrics count.

    `error` is set for every call that did not succeed from the model's point of view (malformed or unknown
    call, a tool exception, a program that failed in the sandbox, a timeout); `timed_out` additionally for
    time-limit failures. `duration_s` is the wall time the call took, `cached` says it came from the cache.

    `content` is the tool message's content in the chat-template format, as TRL's tool loop stores it: a list the
    tool returned stays that list, any other value is ``str(value)`` (within the output cap); None: `text`.
    """

    text: str
    error: bool = False
    timed_out: bool = False
    duration_s: float = 0.0
    cached: bool = False
    content: Any = None

    @property
    def message_content(self) -> Any:
        """What a chat-format tool message holds (and what reward functions read): `content`, else `text`."""
        return self.text if self.content is None else self.content


class ToolOutput(str):
    """A tool's answer (a plain ``str`` to everyone else) carrying the flags the executor turns into metrics."""

    error: bool
    timed_out: bool

    def __new__(cls, text: str, *, error: bool = False, timed_out: bool = False) -> ToolOutput:
        obj = super().__new__(cls, text)
        obj.error = bool(error or timed_out)
        obj.timed_out = bool(timed_out)
        return obj

    def __reduce__(self):  # keep the flags through pickling (e.g. a multiprocessing tool cache)
        return (_make_output, (str(self), self.error, self.timed_out))


def _make_output(text: str, error: bool, timed_out: bool) -> ToolOutput:
    return ToolOutput(text, error=error, timed_out=timed_out)


def clean_text(text: str) -> str:
    """Text safe for any tokenizer: lone surrogates become ``?``, NUL characters U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text.replace("\x00", "\ufffd")


class TransientToolError(RuntimeError):
    """Raised by a tool for a failure worth retrying (a network hiccup, an overloaded service)."""


class StringTool:
    """Base class of the tool objects: one string argument, a name, a docstring TRL can turn into a schema.

    Subclasses set `name` and `argument` (the argument's name in chat mode, e.g. ``"code"``), pass a
    description and the argument's description to ``__init__``, and implement `run`.
    """

    name: str = ""
    argument: str = "input"
    #: whether the executor's result cache may serve this tool's answers (deterministic, side-effect free).
    cacheable: bool = True
    #: whether ARPO may run calls concurrently in worker threads (`execution_mode`); subclasses that are say so.
    thread_safe: bool = False

    def __init__(self, *, name: str | None = None, description: str, argument_description: str) -> None:
        if name is not None:
            self.name = name
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"tool name must be a non-empty identifier, got {self.name!r}")
        # What get_json_schema / TRL read from a callable: __name__, __doc__ (Google style), the signature and
        # the annotations. They are set per instance so that each instance describes itself.
        self.__name__ = self.name
        self.__qualname__ = self.name
        self.__doc__ = f"{description.strip()}\n\nArgs:\n    {self.argument}: {argument_description.strip()}\n"
        self.__annotations__ = {self.argument: str, "return": str}
        self.__signature__ = inspect.Signature(
            [inspect.Parameter(self.argument, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)],
            return_annotation=str,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        """Call with the single string argument, positionally (tag mode) or by keyword (chat mode)."""
        if len(args) + len(kwargs) != 1 or (kwargs and self.argument not in kwargs):
            got = [*(type(a).__name__ for a in args), *kwargs]
            return ToolOutput(
                f"Error: {self.name} takes exactly one argument, {self.argument!r} (a string); got {got}.",
                error=True,
            )
        value = args[0] if args else kwargs[self.argument]
        if not isinstance(value, str):
            return ToolOutput(
                f"Error: {self.name}'s argument {self.argument!r} must be a string, got {type(value).__name__}.",
                error=True,
            )
        return self.run(value)

    def run(self, value: str) -> str:
        """Do the work for one call. Implemented by subclasses."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def as_function(tool: Tool) -> Tool:
    """A plain-function view of `tool` for chat templates.

    transformers' `apply_chat_template(tools=...)` builds JSON schemas only from functions and methods, so a tool
    object (e.g. `PythonInterpreter`) is wrapped in a function carrying its name, docstring and signature.
    """
    if inspect.isfunction(tool) or inspect.ismethod(tool):
        return tool

    def call(*args: Any, **kwargs: Any) -> Any:
        return tool(*args, **kwargs)

    call.__name__ = call.__qualname__ = tool_name(tool)
    call.__doc__ = tool.__doc__  # an instance's own docstring, else its class's
    call.__signature__ = inspect.signature(tool)  # type: ignore[attr-defined]
    call.__annotations__ = dict(getattr(tool, "__annotations__", {}) or {})
    return call
