"""OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` as a plan (no transport).

The tools go into the prompt through the chat template (``rillet.chat_tools``), and the
model answers in Hermes's format, which ``tool_calls.py`` parses out of the text. Every
choice but ``none`` is also a grammar constraint (an xgrammar structural tag over each
tool's ``parameters`` schema), so a call the model starts is always a well-formed call
of a listed tool with arguments that match its schema:

* ``auto`` (the default with tools): free text, in which each ``<tool_call>`` must go on
  to a valid call (vLLM constrains only ``strict`` tools; a small model's calls need it).
  A call written as a Markdown code block naming a listed tool, as Qwen2.5-Coder-1.5B
  writes it, is parsed as a call too (``call_openings.py``), but is not held to the schema;
* ``required``: one or more calls and nothing else;
* a named function: exactly one call of it;
* ``none``: no constraint, and the tools stay out of the prompt (vLLM's
  ``--exclude-tools-when-tool-choice-none``), so the model answers in text.

``parallel_tool_calls: false`` stops the grammar after the first call. TGI's bare-string
``tool_choice`` (a function's name) and huggingface_hub's ``{"function": {"name"}}``
without ``type`` are accepted too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rillet.constraint import Constraint
from rillet.errors import ValidationError
from rillet.server.dialects.tool_calls import ToolCallParser

#: OpenAI's rule for function names.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: What the model writes around each call's arguments (Qwen2.5 / Hermes).
CALL_BEGIN = '<tool_call>\n{{"name": "{name}", "arguments": '
CALL_END = "}\n</tool_call>"
CALL_SEPARATOR = "\n"
#: Whitespace the grammar allows in a row inside arguments: enough for ``{"a": 1}``, too
#: little for a small model to loop on newlines.
MAX_WHITESPACE = 1
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its generation."""

    #: For the chat template (None: keep them out of the prompt).
    tools: list[dict[str, Any]] | None
    constraint: Constraint | None
    #: Parse calls out of the output (every choice but ``none``).
    parse: bool
    #: 1 when the client forbade parallel calls.
    max_calls: int | None
    #: The functions' names: a call the model writes outside ``<tool_call>`` tags (a
    #: Markdown code block) is taken only when it names one of them.
    names: tuple[str, ...] = ()

    def parser(self) -> ToolCallParser:
        """A parser of one generation's calls."""
        return ToolCallParser(self.max_calls, self.names)


def plan_tools(
    tools: Sequence[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None
) -> ToolPlan | None:
    """Validate the tool fields; None when the request has no tools. Raises
    ValidationError (400) for a malformed tool, an unknown named tool or choice."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ValidationError("`tool_choice` needs `tools`")
        return None
    functions = _functions(tools)
    choice = _choice(tool_choice, functions)
    if choice == "none":
        return ToolPlan(None, None, parse=False, max_calls=None)
    parallel = parallel_tool_calls is not False
    tags = [_call_tag(name, functions[name]) for name in functions]
    fmt: dict[str, Any]
    if choice == "auto":
        fmt = {
            "type": "triggered_tags",
            "triggers": ["<tool_call>"],
            "tags": tags,
            "stop_after_first": not parallel,
        }
    elif choice == "required":
        fmt = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": CALL_SEPARATOR,
            "at_least_one": True,
            "stop_after_first": not parallel,
        }
    else:
        fmt = _call_tag(choice, functions[choice])
    constraint = Constraint.structural_tag({"type": "structural_tag", "format": fmt})
    listed = [dict(tool) for tool in tools]
    return ToolPlan(
        listed, constraint, parse=True, max_calls=None if parallel else 1, names=tuple(functions)
    )


def check_history(messages: Sequence[Mapping[str, Any]]) -> None:
    """Assistant ``tool_calls`` and ``tool`` results as OpenAI defines them (the template
    relies on their shape)."""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        calls = message.get("tool_calls")
        if calls is not None:
            if message.get("role") != "assistant" or not isinstance(calls, list):
                raise ValidationError(f"`{where}.tool_calls` must be a list, on an assistant")
            for j, call in enumerate(calls):
                _check_call(call, f"{where}.tool_calls[{j}]")
        if message.get("role") == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise ValidationError(f"`{where}.tool_call_id` is required on a tool message")


def _check_call(call: Any, where: str) -> None:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValidationError(f"`{where}.function.name` is required")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            raise ValidationError(f"`{where}.function.arguments` is not valid JSON") from None
    elif not isinstance(arguments, Mapping | None):
        raise ValidationError(f"`{where}.function.arguments` must be a JSON string")


def _functions(tools: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Each function's name -> its parameters schema, in the client's order."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else type(tool).__name__
            raise ValidationError(f"`{where}`: only function tools are supported, not {kind!r}")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ValidationError(f"`{where}.function` must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValidationError(
                f"`{where}.function.name` must be 1 to 64 of a-z, A-Z, 0-9, _ and -"
            )
        if name in functions:
            raise ValidationError(f"`{where}.function.name`: {name!r} is listed twice")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = NO_PARAMETERS
        if not isinstance(parameters, Mapping):
            raise ValidationError(f"`{where}.function.parameters` must be a JSON Schema object")
        if parameters.get("type", "object") != "object":
            raise ValidationError(f"`{where}.function.parameters` must describe an object")
        functions[name] = dict(parameters)
    return functions


def _choice(tool_choice: Any, functions: Mapping[str, Any]) -> str:
    """``none``, ``auto``, ``required``, or the name of the one function to call."""
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        if tool_choice in ("none", "auto", "required"):
            return tool_choice
        name: Any = tool_choice  # TGI: any other string names a function
    elif isinstance(tool_choice, Mapping):
        kind = tool_choice.get("type", "function")
        function = tool_choice.get("function")
        if kind != "function" or not isinstance(function, Mapping):
            raise ValidationError(
                '`tool_choice` must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}'
            )
        name = function.get("name")
    else:
        raise ValidationError("`tool_choice` must be a string or an object")
    if name not in functions:
        raise ValidationError(
            f"`tool_choice` names the function {name!r}, which is not in `tools` "
            f"({', '.join(functions)})"
        )
    return str(name)


def _call_tag(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "tag",
        "begin": CALL_BEGIN.format(name=name),
        "content": {
            "type": "json_schema",
            "json_schema": parameters,
            "max_whitespace_cnt": MAX_WHITESPACE,
        },
        "end": CALL_END,
    }
