"""Anthropic's Messages dialect: ``/v1/messages`` and ``/v1/messages/count_tokens`` bodies in.

As Anthropic documents them: ``model``, ``max_tokens`` (required, at least 1), ``messages``
(``user``/``assistant``, content a string or blocks), ``system`` (a string or text blocks),
``stop_sequences``, ``temperature`` (0 to 1; default 1), ``top_p``, ``top_k``, ``metadata``
(accepted, unused), ``stream``, ``tools`` (``input_schema``) and ``tool_choice`` (``auto``,
``any``, ``tool``, ``none``; ``disable_parallel_tool_use``), ``output_config.format``
(``json_schema``: the constraint machinery, as chat's ``response_format``). The SDK's 2.x
``create`` has no keywords for the sampling fields any more; they still come in the body
(``extra_body``). Text blocks of one message are joined, as the OpenAI dialect joins text
parts. Tools and tool turns map to the door-neutral
:class:`~rillet.server.dialects.tool_request.ToolRequest`, planned as OpenAI chat's tools are
(``auto``/``any``/``tool`` are grammar-constrained calls, ``none`` keeps the tools out of the
prompt; ``disable_parallel_tool_use`` allows one call); ``tool_use``/``tool_result`` blocks
are tool turns for the chat template. What we cannot do (images, documents, thinking, a final
assistant message to continue) is refused with a 400.

The response side (events, the whole message, errors) is in ``anthropic_render.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from rillet.constraint import Constraint
from rillet.errors import ValidationError
from rillet.sampling import SamplingParams
from rillet.server.dialects.fields import Lenient
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

FIELDS = FieldNames(prompt="messages", max_new_tokens="max_tokens")
Blocks = str | list[dict[str, Any]]


class Message(Lenient):
    role: Literal["user", "assistant"]
    content: Blocks


class CountTokensRequest(Lenient):
    """``/v1/messages/count_tokens``: the prompt half of a Messages request."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: Blocks | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None
    stream: bool | None = None
    #: ``{"format": {"type": "json_schema", "schema"}}``: structured output (``effort`` is
    #: accepted and unused).
    output_config: dict[str, Any] | None = None


@dataclass
class AnthropicPlan:
    spec: GenerationSpec
    stream: bool
    #: The request's tools as planned (None: no tools): how the answer's calls are parsed.
    tools: ToolPlan | None


def plan_messages(body: MessagesRequest) -> AnthropicPlan:
    """Validate a Messages request and map it (the service renders the chat template)."""
    chat, request = prompt_of(body)
    if body.temperature is not None and not 0.0 <= body.temperature <= 1.0:
        raise ValidationError("`temperature` must be between 0 and 1")
    params = SamplingParams(
        max_new_tokens=body.max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        stop=list(body.stop_sequences or []),
        constraint=output_constraint(body.output_config),
    )
    tools, params = plan_tool_request(request, params, "output_config.format")
    unset = frozenset(name for name in DEFAULTABLE if getattr(body, name, None) is None)
    spec = GenerationSpec(chat, params, names=FIELDS, unset=unset)
    return AnthropicPlan(spec, stream=bool(body.stream), tools=tools)


def output_constraint(output_config: dict[str, Any] | None) -> Constraint | None:
    """``output_config.format`` as the constraint chat's ``response_format`` would make."""
    fmt = (output_config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise ValidationError('`output_config.format` must be {"type": "json_schema", "schema"}')
    if not isinstance(fmt.get("schema"), dict):
        raise ValidationError("`output_config.format.schema` must be a JSON Schema object")
    return Constraint.json_schema(fmt["schema"])


def prompt_of(body: CountTokensRequest) -> tuple[ChatPrompt, ToolRequest | None]:
    """The chat to render (system first, the tools the template lists) and the tools."""
    messages = []
    if body.system is not None:
        system = _text(body.system, "system")
        if system:
            messages.append({"role": "system", "content": system})
    for i, message in enumerate(body.messages):
        messages.extend(_message(message, f"messages[{i}]"))
    if messages[-1]["role"] == "assistant":
        raise ValidationError(
            "a final assistant message (a prefill to continue) is not supported: "
            "end `messages` with a user message"
        )
    tools = tool_request(body.tools, body.tool_choice)
    listed = None
    if tools is not None and tools.tool_choice != "none":
        listed = tools.tools
    return ChatPrompt(messages, tools=listed), tools


def tool_request(
    tools: list[dict[str, Any]] | None, choice: dict[str, Any] | None
) -> ToolRequest | None:
    """Anthropic's ``tools``/``tool_choice`` as a ToolRequest; None without tools."""
    if choice is not None and not isinstance(choice.get("type"), str):
        raise ValidationError('`tool_choice.type` must be "auto", "any", "tool" or "none"')
    kind = "auto" if choice is None else choice["type"]
    if not tools:
        if kind not in ("auto", "none"):
            raise ValidationError("`tool_choice` needs `tools`")
        return None
    listed = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if tool.get("type") not in (None, "custom"):
            raise ValidationError(
                f"`{where}`: only client tools with an `input_schema` are supported"
            )
        schema = tool.get("input_schema")
        if schema is None:
            raise ValidationError(f"`{where}.input_schema` is required")
        listed.append(
            function_tool(tool.get("name"), tool.get("description"), schema, where, "input_schema")
        )
    check_unique(listed, "tools")
    mapped: str | dict[str, Any]
    if kind in ("auto", "none"):
        mapped = kind
    elif kind == "any":
        mapped = "required"
    elif kind == "tool":
        mapped = named_choice((choice or {}).get("name"), listed, "tool_choice.name")
    else:
        raise ValidationError('`tool_choice.type` must be "auto", "any", "tool" or "none"')
    parallel = None
    if choice is not None and choice.get("disable_parallel_tool_use"):
        parallel = False
    return ToolRequest(listed, mapped, parallel)


def _message(message: Message, where: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat-template messages: text joined; ``tool_use`` blocks as
    the assistant's ``tool_calls``; ``tool_result`` blocks as ``tool`` messages before the
    user's own text (the order of a tool turn in OpenAI's shape)."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    text, calls, results = [], [], []
    for j, block in enumerate(message.content):
        at = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "tool_use" and message.role == "assistant":
            calls.append(tool_call(block.get("id"), block.get("name"), block.get("input"), at))
        elif kind == "tool_result" and message.role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise ValidationError(f"`{at}.tool_use_id` is required")
            content = block.get("content")
            result = "" if content is None else _text(content, f"{at}.content")
            results.append(
                {"role": "tool", "tool_call_id": block["tool_use_id"], "content": result}
            )
        else:
            raise ValidationError(f"`{at}`: content blocks of type {kind!r} are not supported here")
    turn: dict[str, Any] = {"role": message.role, "content": "".join(text)}
    if calls:
        turn["tool_calls"] = calls
    if results and not text:
        return results
    return [*results, turn]


def _text(content: Blocks, where: str) -> str:
    """A string, or text blocks joined (``system``, a tool result's content)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValidationError(f"`{where}` must be a string or a list of text blocks")
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise ValidationError(f"`{where}[{j}]` must be a text block")
        if not isinstance(block.get("text"), str):
            raise ValidationError(f"`{where}[{j}]` must be a text block")
        parts.append(block["text"])
    return "".join(parts)
