"""Tools in a chat prompt: what a chat template is given, with or without tool support.

A template that reads ``tools`` (Qwen2.5's, Hermes's, Llama 3.1's...) renders the tool
list and the tool turns itself, as transformers lets it: it gets ``tools`` as the client
sent them, and each assistant ``tool_calls[].function.arguments`` as an *object* (the
wire carries a JSON string; Qwen2.5's template applies ``tojson`` to it, so a string would
be encoded twice — vLLM's ``_postprocess_messages`` converts it the same way).

A template that never mentions ``tools`` (SmolLM2's ChatML, Gemma's) gets the documented
fallback, Hermes's format as Qwen2.5 words it:

* the tool list and the call format go into the system message (appended to the client's
  own system message, or as a new first message);
* an assistant turn's calls become its text, one ``<tool_call>\\n{json}\\n</tool_call>``
  block per call, as the model is asked to write them;
* tool results become a user turn, each wrapped in ``<tool_response>...</tool_response>``,
  consecutive results sharing one turn (Qwen2.5's own rendering).

The model's answer is then parsed by ``rillet.server.dialects.tool_calls`` either way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

TOOLS_HEADER = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def has_tool_turns(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def with_argument_objects(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with each tool call's JSON-string ``arguments`` parsed into a value."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if not calls:
            out.append(dict(message))
            continue
        converted = []
        for call in calls:
            function = dict(call.get("function") or {})
            function["arguments"] = _arguments_value(function.get("arguments"))
            converted.append({**call, "function": function})
        out.append({**message, "tool_calls": converted})
    return out


def fallback(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None
) -> list[dict[str, Any]]:
    """``messages`` rewritten for a template without tool support (see the module doc)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"<tool_response>\n{_text(message.get('content'))}\n</tool_response>"
            last = out[-1] if out else None
            if last is not None and last.get("_tool_results"):
                last["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        elif role == "assistant" and message.get("tool_calls"):
            blocks = [_call_block(call) for call in message["tool_calls"]]
            text = _text(message.get("content"))
            content = "\n".join([text, *blocks] if text else blocks)
            rest = {k: v for k, v in message.items() if k != "tool_calls"}
            out.append({**rest, "content": content})
        else:
            out.append(dict(message))
    for message in out:
        message.pop("_tool_results", None)
    if tools:
        listing = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        prompt = TOOLS_HEADER + listing + TOOLS_FOOTER
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": _text(out[0].get("content")) + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _call_block(call: Mapping[str, Any]) -> str:
    function = call.get("function") or {}
    body = {"name": function.get("name"), "arguments": _arguments_value(function.get("arguments"))}
    return f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>"


def _arguments_value(arguments: Any) -> Any:
    """A JSON-string ``arguments`` as its value; anything else (already an object, or a
    string that is not JSON) as it is."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return {} if arguments is None else arguments


def _text(content: Any) -> str:
    return "" if content is None else str(content)
