"""Tool calling: OpenAI tool definitions rendered in each model family's own format, and calls parsed back.

- ``spec``: checking what a client sends (``tools``, ``tool_choice``, tool calls and results in messages);
- ``formats``: the tool prompt and past calls in Meta's formats and in jinja templates;
- ``grammar``: the grammar that forces a call whose arguments follow the parameter schema;
- ``parse``: reading calls out of the answer as it streams;
- ``plan``: one request's choices, tying the four together.
"""

from .formats import default_style, meta_messages, template_messages, template_syntax, template_uses_tools
from .grammar import call_grammar
from .parse import Delta, ToolCallParser, ToolStream
from .plan import ToolPlan, plan_tools
from .spec import (
    BUILTIN_TOOLS,
    STYLES,
    Tool,
    ToolCall,
    ToolChoice,
    ToolError,
    check_messages,
    has_tool_calls,
    new_call_id,
    parse_tool_choice,
    parse_tools,
)

__all__ = [
    "BUILTIN_TOOLS",
    "STYLES",
    "Delta",
    "Tool",
    "ToolCall",
    "ToolCallParser",
    "ToolChoice",
    "ToolError",
    "ToolPlan",
    "ToolStream",
    "call_grammar",
    "check_messages",
    "default_style",
    "has_tool_calls",
    "meta_messages",
    "new_call_id",
    "parse_tool_choice",
    "parse_tools",
    "plan_tools",
    "template_messages",
    "template_syntax",
    "template_uses_tools",
]
