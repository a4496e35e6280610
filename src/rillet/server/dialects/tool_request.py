"""A request's tools in one door-neutral form, for the doors that do not speak OpenAI chat.

Anthropic's Messages (``input_schema``, ``tool_choice: {"type": "any"}``) and OpenAI's
Responses (flat ``{"type": "function", "name", "parameters"}``) spell tools their own way.
Each dialect validates its spelling and maps it to a :class:`ToolRequest` in OpenAI chat's
shape (``{"type": "function", "function": {"name", "description", "parameters"}}``,
``tool_choice`` ``none``/``auto``/``required``/``{"type": "function", "function":
{"name"}}``, ``parallel_tool_calls``), the shape the tool machinery (grammar-enforced calls,
the incremental ``<tool_call>`` parser, tools in the chat template) plans from. Tool turns in
the history map the same way: an assistant message with ``tool_calls`` (arguments as JSON
text) and ``{"role": "tool", "tool_call_id", "content"}`` results, which the chat template
renders as tool turns (``rillet.chat_tools``). :func:`plan_tool_request` then plans it as
OpenAI chat's tools are planned (``tools.py``): the grammar constraint, the tools for the
template, whether to parse calls out of the answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rillet.errors import ValidationError
from rillet.sampling import SamplingParams
from rillet.server.dialects.tools import ToolPlan, plan_tools

#: Anthropic's and OpenAI's rule for a tool's name.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ToolRequest:
    """Tools, the choice among them and whether calls may come in parallel (OpenAI chat's
    shapes; see the module docstring)."""

    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool | None = None


def function_tool(
    name: Any, description: Any, parameters: Any, where: str, schema_field: str
) -> dict[str, Any]:
    """One checked function tool in OpenAI chat's shape; ``where``/``schema_field`` name the
    client's own fields in errors."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValidationError(f"`{where}.name` must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
    if description is not None and not isinstance(description, str):
        raise ValidationError(f"`{where}.description` must be a string")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise ValidationError(f"`{where}.{schema_field}` must be a JSON Schema of an object")
    function: dict[str, Any] = {"name": name, "parameters": dict(parameters)}
    if description is not None:
        function["description"] = description
    return {"type": "function", "function": function}


def check_unique(tools: Sequence[Mapping[str, Any]], field: str) -> None:
    """Two tools of one name would make a call ambiguous."""
    seen: set[str] = set()
    for tool in tools:
        name = tool["function"]["name"]
        if name in seen:
            raise ValidationError(f"`{field}`: the tool {name!r} is listed twice")
        seen.add(name)


def named_choice(name: Any, tools: Sequence[Mapping[str, Any]], field: str) -> dict[str, Any]:
    """``tool_choice`` for one named tool, which must be listed."""
    names = [tool["function"]["name"] for tool in tools]
    if name not in names:
        raise ValidationError(
            f"`{field}` names the tool {name!r}, which is not in `tools` ({', '.join(names)})"
        )
    return {"type": "function", "function": {"name": name}}


def tool_call(call_id: Any, name: Any, arguments: Any, where: str) -> dict[str, Any]:
    """An earlier call in the history as an assistant's ``tool_calls`` entry; ``arguments``
    an object (Anthropic's ``input``) or JSON text (Responses' ``arguments``)."""
    if not isinstance(call_id, str) or not isinstance(name, str):
        raise ValidationError(f"`{where}` needs a string id and name")
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            raise ValidationError(f"`{where}.arguments` is not valid JSON") from None
        text = arguments
    elif isinstance(arguments, Mapping):
        text = json.dumps(arguments, ensure_ascii=False)
    else:
        raise ValidationError(f"`{where}`: the call's input must be a JSON object")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def plan_tool_request(
    request: ToolRequest | None, params: SamplingParams, output_field: str
) -> tuple[ToolPlan | None, SamplingParams]:
    """The request's tool plan (None without tools) and ``params`` with its constraint.

    Tools the model may call constrain the generation, so they exclude the door's own
    output constraint (``output_field`` names it in the 400), as on OpenAI chat.
    """
    if request is None:
        return None, params
    planned = plan_tools(request.tools, request.tool_choice, request.parallel_tool_calls)
    if planned is None or planned.constraint is None:
        return planned, params
    if params.constraint is not None:
        raise ValidationError(
            f"`{output_field}` cannot be combined with `tools` unless `tool_choice` is none"
        )
    return planned, replace(params, constraint=planned.constraint)
