"""Forced tool calls: the Lark grammar (llguidance's dialect) that admits only a call of the chosen functions,
in the model's own syntax, with arguments that follow each function's parameter schema."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .spec import Tool


def call_grammar(tools: Sequence[Tool], names: Sequence[str], syntax: str, parallel: bool = False,
                 builtins: bool = False) -> str:  # fmt: skip
    """A Lark grammar (llguidance's dialect) that admits only calls of the functions `names`, in `syntax`
    ("json", "hermes" or "pythonic"), with arguments that follow each function's parameter schema; one call,
    or several when `parallel`. With `builtins` (Llama 3's own format), brave_search and wolfram_alpha are
    called as Meta's built-in tools: ``<|python_tag|>brave_search.call(query="...")``."""
    from ..constrain import lark_for_json_schema

    by_name = {t.name: t for t in tools}
    rules: list[str] = []
    alternatives = []
    for i, name in enumerate(names):
        tool = by_name[name]
        if builtins and name in ("brave_search", "wolfram_alpha"):
            alternatives.append(f'<|python_tag|> {_lit(name + ".call(query=")} query_{i} ")"')
            rules.append(f"query_{i}: " + lark_for_json_schema({"type": "string"}))
        elif syntax == "pythonic":
            alternatives.append(f'{_lit(name + "(")} args_{i} ")"')
            rules += _pythonic_args(f"args_{i}", tool.parameters)
        else:
            key = "parameters" if syntax == "json" else "arguments"
            head = "{" + json.dumps("name") + ": " + json.dumps(name) + ", " + json.dumps(key) + ": "
            body = f'{_lit(head)} args_{i} "}}"'
            alternatives.append(f'"<tool_call>\\n" {body} "\\n</tool_call>"' if syntax == "hermes" else body)
            rules.append(f"args_{i}: " + lark_for_json_schema(_closed(tool.parameters or {"type": "object"})))
    rules.insert(0, "call: " + " | ".join(alternatives))
    if syntax == "pythonic":
        start = 'start: "[" call ("," " " call)* "]"' if parallel else 'start: "[" call "]"'
    elif syntax == "hermes" and parallel:
        start = 'start: call ("\\n" call)*'
    else:
        start = "start: call"
    return "\n".join([start, *rules]) + "\n"


def _closed(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `schema` whose objects with listed properties take no others unless they say so: a call's
    arguments are the function's parameters (OpenAI's strict function calling asks the same)."""

    def close(node: Any) -> Any:
        if isinstance(node, Mapping):
            node = {k: close(v) for k, v in node.items()}
            if isinstance(node.get("properties"), Mapping) and "additionalProperties" not in node:
                node["additionalProperties"] = False
            return node
        if isinstance(node, list):
            return [close(v) for v in node]
        return node

    return close(copy.deepcopy(dict(schema)))


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _pythonic_args(rule: str, schema: Mapping[str, Any]) -> list[str]:
    """Keyword arguments in the schema's property order, required ones always, optional ones when wanted,
    separated by ", "; each value a JSON value of the property's schema (the parser reads JSON literals)."""
    from ..constrain import lark_for_json_schema

    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    items = list(props.items())
    rules = []
    for j, (_, sub) in enumerate(items):
        sub = {**_closed(sub if isinstance(sub, Mapping) else {}), **defs}
        rules.append(f"{rule}_v{j}: " + lark_for_json_schema(sub))
    n = len(items)
    for j in range(n + 1):
        if j == n:
            rules += [f'{rule}_s{j}: ""', f'{rule}_c{j}: ""']
            continue
        key = items[j][0]
        item = f"{_lit(key + '=')} {rule}_v{j}"
        first = f"{item} {rule}_c{j + 1}"
        more = f'", " {item} {rule}_c{j + 1}'
        if key in required:
            rules += [f"{rule}_s{j}: {first}", f"{rule}_c{j}: {more}"]
        else:
            rules += [f"{rule}_s{j}: {first} | {rule}_s{j + 1}", f"{rule}_c{j}: {more} | {rule}_c{j + 1}"]
    rules.insert(0, f"{rule}: {rule}_s0")
    return rules
