"""OpenAI's Responses dialect: ``POST /v1/responses`` bodies in.

``input`` (a string: one user message; or a list of items: messages with ``user``,
``assistant``, ``system`` or ``developer`` roles and string or text-part content,
``function_call`` and ``function_call_output`` items), ``instructions`` (a system message
first), ``max_output_tokens``, ``temperature``, ``top_p``, ``text.format`` (``text``,
``json_object``, ``json_schema`` with ``schema`` flat beside ``name``: the same constraint as
chat's ``response_format``), function ``tools`` (flat ``{"type": "function", "name",
"parameters"}``), ``tool_choice``, ``parallel_tool_calls``, ``stream``, and llama-server's
``speculative.n_max`` (this request's draft tokens per step, as on chat). Tools map to the
door-neutral :class:`~rillet.server.dialects.tool_request.ToolRequest` and are planned as
OpenAI chat's (grammar-constrained calls; ``none`` keeps them out of the prompt);
``function_call``/``function_call_output`` items are tool turns for the chat template.

Stateless: nothing is stored whatever ``store`` says (the response says ``store: false``),
so ``previous_response_id`` and ``background`` are refused with a 400 that says so, and
``GET /v1/responses/{id}`` is a 404. The response side is ``responses_render.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from rillet.errors import ValidationError
from rillet.sampling import SamplingParams
from rillet.server.dialects.fields import SpeculativeCap
from rillet.server.dialects.structured import response_format_constraint
from rillet.server.dialects.tool_request import (
    ToolRequest,
    check_unique,
    function_tool,
    named_choice,
    plan_tool_request,
    tool_call,
)
from rillet.server.dialects.tools import ToolPlan
from rillet.server.limits import FieldNames
from rillet.server.sampling_defaults import DEFAULTABLE
from rillet.server.spec import ChatPrompt, GenerationSpec

FIELDS = FieldNames(prompt="input", max_new_tokens="max_output_tokens")
NOT_STORED = "this server does not store responses"
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(SpeculativeCap):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


@dataclass
class ResponsesPlan:
    spec: GenerationSpec
    stream: bool
    #: The request's tools as planned (None: no tools): how the answer's calls are parsed.
    tools: ToolPlan | None
    #: The request's fields the Response object echoes back.
    echo: dict[str, Any]


def plan_response(body: ResponsesRequest) -> ResponsesPlan:
    """Validate a Responses request and map it (the service renders the chat template)."""
    if body.previous_response_id is not None:
        raise ValidationError(
            f"`previous_response_id` is not supported: {NOT_STORED}; send the whole "
            "conversation in `input`"
        )
    if body.background:
        raise ValidationError(f"`background` is not supported: {NOT_STORED}")
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        for i, item in enumerate(body.input):
            message = _item(item, f"input[{i}]")
            last = messages[-1] if messages else None
            if "tool_calls" in message and last is not None and last["role"] == "assistant":
                # Parallel calls (and the text before them) are one assistant turn.
                last["tool_calls"] = [*last.get("tool_calls", []), *message["tool_calls"]]
            else:
                messages.append(message)
    if not messages:
        raise ValidationError("`input` cannot be empty")
    request = tool_request(body.tools, body.tool_choice, body.parallel_tool_calls)
    text_format = (body.text or {}).get("format") or {"type": "text"}
    params = SamplingParams(
        max_new_tokens=body.max_output_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        num_speculative_tokens=body.speculative_n_max,
    )
    params = replace(params, constraint=_constraint(text_format))
    tools, params = plan_tool_request(request, params, "text.format")
    unset = frozenset(name for name in DEFAULTABLE if getattr(body, name, None) is None)
    echo = {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "temperature": body.temperature,
        "text": {"format": text_format},
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "top_p": body.top_p,
        "user": body.user,
    }
    chat = ChatPrompt(messages, tools=None if tools is None else tools.tools)
    spec = GenerationSpec(chat, params, names=FIELDS, unset=unset)
    return ResponsesPlan(spec, stream=bool(body.stream), tools=tools, echo=echo)


def tool_request(
    tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None, parallel: bool | None
) -> ToolRequest | None:
    """Flat function tools and ``tool_choice`` as a ToolRequest; None without tools."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ValidationError("`tool_choice` needs `tools`")
        return None
    listed = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if tool.get("type") != "function":
            raise ValidationError(
                f"`{where}`: only function tools are supported, not {tool.get('type')!r}"
            )
        listed.append(
            function_tool(
                tool.get("name"),
                tool.get("description"),
                tool.get("parameters"),
                where,
                "parameters",
            )
        )
    check_unique(listed, "tools")
    mapped: str | dict[str, Any]
    if choice is None or choice in ("none", "auto", "required"):
        mapped = choice or "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function":
        mapped = named_choice(choice.get("name"), listed, "tool_choice.name")
    else:
        raise ValidationError(
            '`tool_choice` must be "none", "auto", "required" or {"type": "function", "name"}'
        )
    return ToolRequest(listed, mapped, parallel)


def _item(item: dict[str, Any], where: str) -> dict[str, Any]:
    """One input item as a chat-template message (tool items in OpenAI chat's shape)."""
    kind = item.get("type", "message")
    if kind == "function_call":
        call = tool_call(item.get("call_id"), item.get("name"), item.get("arguments"), where)
        return {"role": "assistant", "content": "", "tool_calls": [call]}
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise ValidationError(f"`{where}.call_id` is required")
        return {
            "role": "tool",
            "tool_call_id": item["call_id"],
            "content": _text(item.get("output"), where),
        }
    if kind != "message":
        raise ValidationError(f"`{where}`: input items of type {kind!r} are not supported")
    role = item.get("role")
    role = _ROLES.get(role) if isinstance(role, str) else None
    if role is None:
        raise ValidationError(f"`{where}.role` must be user, assistant, system or developer")
    return {"role": role, "content": _text(item.get("content"), f"{where}.content")}


def _text(content: Any, where: str) -> str:
    """A string, or text parts joined; images and files are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValidationError(f"`{where}` must be a string or a list of text parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValidationError(
                f"`{where}[{j}]`: content parts of type {kind!r} are not supported"
            )
        parts.append(part["text"])
    return "".join(parts)


def _constraint(text_format: Any) -> Any:
    """``text.format`` as chat's ``response_format`` sees it (there ``schema`` is nested)."""
    if not isinstance(text_format, dict):
        raise ValidationError("`text.format` must be an object")
    if text_format.get("type") == "json_schema":
        nested = {"schema": text_format.get("schema")}
        return response_format_constraint({"type": "json_schema", "json_schema": nested})
    try:
        return response_format_constraint(text_format)
    except ValidationError:
        raise ValidationError(
            "`text.format.type` must be text, json_object or json_schema. "
            f"Given: {text_format.get('type')!r}"
        ) from None
