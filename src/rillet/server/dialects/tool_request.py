"""A request's tools in one door-neutral form, for the doors that do not speak OpenAI chat.

Anthropic's Messages (``input_schema``, ``tool_choice: {"type": "any"}``) and OpenAI's
Responses (flat ``{"type": "function", "name", "parameters"}``) spell tools their own way.
Each dialect validates its spelling and maps it to a :class:`ToolRequest` in OpenAI chat's
shape (``{"type": "function", "function": {"name", "description", "parameters"}}``,
``tool_choice`` ``none``/``auto``/``required``/``{"type": "function", "function":
{"name"}}``, ``parallel_tool_calls``), the shape the tool machinery (grammar-enforced calls,
the incremental ``<tool_call>`` parser, tools in the chat template) plans from. Tool turns in
the history map the same way: an assistant message with ``tool_calls`` (arguments as JSON
text) and ``{"role": "tool", "tool_call_id", "content"}`` results.

Until that machinery serves these doors, :func:`refuse_tool_use` turns a request that needs
it into a clear 400 instead of a prompt the model would misread.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rillet.errors import ValidationError

#: Anthropic's and OpenAI's rule for a tool's name.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NOT_AVAILABLE = "tool use is not available yet on this server"


@dataclass(frozen=True)
class ToolRequest:
    """Tools, the choice among them and whether calls may come in parallel (OpenAI chat's
    shapes; see the module docstring)."""

    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool | None = None

    @property
    def wants_calls(self) -> bool:
        """Whether the model may call a tool (``none`` keeps the tools out entirely)."""
        return bool(self.tools) and self.tool_choice != "none"


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


def has_tool_turns(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def refuse_tool_use(tools: ToolRequest | None, messages: Sequence[Mapping[str, Any]]) -> None:
    """ValidationError (400) when the request needs the tool machinery: tools the model may
    call, or tool turns in its history. Tools with ``tool_choice`` none pass (they stay out
    of the prompt)."""
    if tools is not None and tools.wants_calls:
        raise ValidationError(f"{NOT_AVAILABLE}: send the request without `tools`")
    if has_tool_turns(messages):
        raise ValidationError(f"{NOT_AVAILABLE}: the history holds tool calls or results")
