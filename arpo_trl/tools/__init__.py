"""Tools the model calls while reasoning, and the machinery that runs them.

- `PythonInterpreter` (tag ``python``): model-written code in a bubblewrap sandbox.
- `LocalSearch` (tag ``search``): offline BM25 over a local corpus; `build_wiki_corpus` makes a demo corpus.
- `WebSearch` (tag ``search``): an HTTP search API with an on-disk cache.
- `ToolExecutor`: runs one round of calls, each where its tool may run (user tools inline on the main thread, as TRL
  runs them; thread-safe and async tools concurrently), under each tool's own limits.
- `declare_tool`: declare a tool thread-safe and/or give it its own time and output limits.
- `parse_tag_call` / `format_result` / `stop_strings`: the paper's inline tag format.

See docs/tools.md.
"""

from .base import (
    UNSET,
    StringTool,
    Tool,
    ToolCall,
    ToolOutput,
    ToolResult,
    TransientToolError,
    as_function,
    declare_tool,
    execution_mode,
    tool_name,
    tools_by_name,
)
from .corpus import build_wiki_corpus, wiki_corpus_available
from .executor import ToolExecutor, ToolLimits
from .python_tool import PythonInterpreter, python_interpreter_available
from .sandbox import SandboxUnavailableError
from .search import LocalSearch, format_pages
from .tags import format_result, is_empty_call, parse_tag_call, stop_strings
from .web_search import WebSearch

__all__ = [
    "LocalSearch",
    "PythonInterpreter",
    "SandboxUnavailableError",
    "StringTool",
    "Tool",
    "ToolCall",
    "ToolExecutor",
    "ToolLimits",
    "ToolOutput",
    "ToolResult",
    "TransientToolError",
    "UNSET",
    "WebSearch",
    "as_function",
    "build_wiki_corpus",
    "declare_tool",
    "execution_mode",
    "format_pages",
    "format_result",
    "is_empty_call",
    "parse_tag_call",
    "python_interpreter_available",
    "stop_strings",
    "tool_name",
    "tools_by_name",
    "wiki_corpus_available",
]
