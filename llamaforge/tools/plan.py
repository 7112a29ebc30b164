"""One chat request's use of tools: how they are shown, whether a call is forced, how the answer is read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .formats import default_style, template_syntax
from .grammar import call_grammar
from .parse import ToolCallParser
from .spec import STYLES, Tool, ToolChoice, ToolError, parse_tool_choice, parse_tools


@dataclass
class ToolPlan:
    """How one chat request uses tools: what the prompt shows, what decoding forces, how the answer is read."""

    tools: list[Tool]
    choice: ToolChoice
    parallel: bool
    syntax: str  # how calls are written: "json", "pythonic" or "hermes"
    tool_format: str | None
    builtins: bool  # Meta's built-in tools are called in their own syntax (Llama 3's format)

    @property
    def render_options(self) -> dict[str, Any]:
        """Keyword arguments for ``render_chat``/``encode_chat``; with tool_choice "none" the tools are left out."""
        shown = self.tools if self.choice.mode != "none" else []
        return {"tools": [dict(t.spec) for t in shown] or None, "tool_format": self.tool_format}

    @property
    def grammar(self) -> str | None:
        """The Lark grammar that forces a call (tool_choice required or named), else None."""
        if not self.choice.forced:
            return None
        names = [self.choice.name] if self.choice.name else [t.name for t in self.tools]
        parallel = self.parallel and self.choice.mode == "required"
        return call_grammar(self.tools, names, self.syntax, parallel, self.builtins)  # type: ignore[arg-type]

    def parser(self) -> ToolCallParser | None:
        if self.choice.mode == "none" or not self.tools:
            return None
        return ToolCallParser(self.tools, max_calls=None if self.parallel else 1)


def plan_tools(template: str | None, tools: Any, tool_choice: Any = None, parallel_tool_calls: bool = True,
               tool_format: str | None = None) -> ToolPlan:  # fmt: skip
    """Check a request's tools for a chat `template` (a named format or jinja text) and decide how they are
    written and read."""
    parsed = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, parsed)
    if tool_format is not None and tool_format not in STYLES:
        raise ToolError(f"unknown tool format {tool_format!r}; choose one of {', '.join(STYLES)}", "tool_format")
    if template in ("llama3", "llama4"):
        syntax = tool_format or default_style(3 if template == "llama3" else 4)
        builtins = template == "llama3"
    elif template in ("llama2", "codellama") or not template:
        if parsed and choice.mode != "none":
            raise ToolError(f"the {template or 'model'}'s chat format has no tool calling", "tools")
        syntax, builtins = "json", False
    else:
        syntax, builtins = template_syntax(template), False
    return ToolPlan(parsed, choice, bool(parallel_tool_calls), syntax, tool_format, builtins)
