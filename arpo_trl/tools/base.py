"""The one tool protocol shared by both tool formats of `ARPOTrainer`.

A tool is a plain Python callable with a name and a docstring:

- in ``tool_format="tags"`` it is called with one string, the text between ``<name>`` and ``</name>``;
- in ``tool_format="chat_template"`` it is called with the keyword arguments of a JSON tool call, as TRL does.

Its name is ``tool.name`` when set (tool objects such as ``PythonInterpreter``), else ``tool.__name__``.

Tool objects derive from `StringTool`: a callable object with one ``str`` argument that also looks like a plain
function to TRL and to ``transformers.utils.get_json_schema`` (``__name__``, a Google-style ``__doc__`` with an
``Args:`` section, annotated ``__call__``). A tool may return a `ToolOutput` (a ``str``) to tell the executor that
the call failed or timed out, and may raise `TransientToolError` to ask the executor for a retry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Tool = Callable[..., Any]


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
    """

    text: str
    error: bool = False
    timed_out: bool = False
    duration_s: float = 0.0
    cached: bool = False


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
