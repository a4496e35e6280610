"""Anthropic's Messages dialect without a server: bodies -> specs, outputs -> events."""

from __future__ import annotations

from typing import Any

import pytest

from rillet.constraint import Constraint
from rillet.errors import OverloadedError, ValidationError
from rillet.protocol import FinishReason, RequestOutput
from rillet.server.dialects import anthropic
from rillet.server.dialects.anthropic_render import AnthropicRenderer, error_body, status
from rillet.server.spec import ChatPrompt

HI = [{"role": "user", "content": "Hi"}]
TOOL = {"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}


def plan(**body: Any) -> anthropic.AnthropicPlan:
    full = {"model": "m", "max_tokens": 8, "messages": HI, **body}
    return anthropic.plan_messages(anthropic.MessagesRequest.model_validate(full))


def test_a_body_maps_to_a_chat_with_its_system_and_sampling() -> None:
    planned = plan(
        system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        stop_sequences=["\n\n"],
        temperature=0,
        top_k=5,
        metadata={"user_id": "u"},
        stream=True,
    )
    assert planned.stream and planned.tools is None
    prompt = planned.spec.prompt
    assert isinstance(prompt, ChatPrompt)
    assert prompt.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    params = planned.spec.params
    assert (params.max_new_tokens, params.temperature, params.top_k) == (8, 0, 5)
    assert params.stop == ["\n\n"] and not params.include_stop_str_in_output
    assert planned.spec.unset == {"top_p", "min_p", "repetition_penalty"}
    assert planned.spec.names.max_new_tokens == "max_tokens"


def test_output_config_json_schema_is_a_constraint() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    planned = plan(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert planned.spec.params.constraint == Constraint.json_schema(schema)
    with pytest.raises(ValidationError, match=r"output_config\.format"):
        plan(output_config={"format": {"type": "regex"}})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"temperature": 1.2}, "between 0 and 1"),
        ({"messages": [*HI, {"role": "assistant", "content": "Sure"}]}, "prefill"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "'image'"),
        ({"system": [{"type": "image"}]}, r"system\[0\]"),
        ({"tools": [TOOL]}, "tool use is not available yet"),
        ({"tools": [{**TOOL, "name": "a b"}]}, r"tools\[0\]\.name"),
        ({"tools": [{"name": "x"}]}, "input_schema"),
        ({"tools": [TOOL, TOOL]}, "listed twice"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "client tools"),
        ({"tool_choice": {"type": "any"}}, "needs `tools`"),
        ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, "'nope'"),
    ],
)
def test_what_cannot_be_served_is_a_validation_error(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        plan(**body)


@pytest.mark.parametrize(
    ("choice", "mapped", "parallel"),
    [
        (None, "auto", None),
        ({"type": "auto"}, "auto", None),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
        (
            {"type": "tool", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
            None,
        ),
        ({"type": "none"}, "none", None),
    ],
)
def test_tools_map_to_the_door_neutral_request(choice: Any, mapped: Any, parallel: Any) -> None:
    tools = anthropic.tool_request([TOOL], choice)
    assert tools is not None
    assert tools.tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object"},
                "description": "d",
            },
        }
    ]
    assert (tools.tool_choice, tools.parallel_tool_calls) == (mapped, parallel)


def test_tools_with_choice_none_stay_out_and_pass() -> None:
    planned = plan(tools=[TOOL], tool_choice={"type": "none"})
    assert planned.tools is not None and not planned.tools.wants_calls


def test_tool_turns_map_to_openai_shapes_and_are_refused_for_now() -> None:
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "text", "text": "sunny"}],
    }
    call = anthropic.Message(
        role="assistant", content=[{"type": "text", "text": "Let me see."}, use]
    )
    answer = anthropic.Message(role="user", content=[result, {"type": "text", "text": "And?"}])
    assert anthropic._message(call, "m") == [
        {
            "role": "assistant",
            "content": "Let me see.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        }
    ]
    assert anthropic._message(answer, "m") == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "And?"},
    ]
    body = {
        "messages": [
            *HI,
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": [result]},
        ]
    }
    with pytest.raises(ValidationError, match="history holds tool calls"):
        plan(**body)


def output(text: str, reason: FinishReason | None = None, **fields: Any) -> RequestOutput:
    return RequestOutput(
        "r", [], text, reason, num_prompt_tokens=4, num_generated_tokens=2, **fields
    )


def test_events_open_the_block_with_the_first_text_and_close_the_message() -> None:
    renderer = AnthropicRenderer("m", "r", 4)
    assert [name for name, _ in renderer.start()] == ["message_start"]
    assert renderer.events(output("")) == []
    first = renderer.events(output("Hi"))
    assert [name for name, _ in first] == ["content_block_start", "content_block_delta"]
    last = renderer.events(output(" there", FinishReason.STOP_SEQUENCE, stop_sequence="\n"))
    assert [name for name, _ in last] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert last[2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "\n"}
    assert last[2][1]["usage"] == {"input_tokens": 4, "output_tokens": 2}


def test_an_empty_answer_has_no_block_and_the_message_no_content() -> None:
    renderer = AnthropicRenderer("m", "r", 4)
    events = renderer.events(output("", FinishReason.EOS_TOKEN))
    assert [name for name, _ in events] == ["message_delta", "message_stop"]
    assert renderer.answer(output("", FinishReason.EOS_TOKEN))["content"] == []


@pytest.mark.parametrize(
    ("reason", "fields", "expected"),
    [
        (FinishReason.EOS_TOKEN, {}, ("end_turn", None)),
        (FinishReason.LENGTH, {}, ("max_tokens", None)),
        (FinishReason.STOP_SEQUENCE, {"stop_sequence": "END"}, ("stop_sequence", "END")),
        (FinishReason.STOP_SEQUENCE, {}, ("end_turn", None)),  # a stop token id
    ],
)
def test_stop_reasons(
    reason: FinishReason, fields: dict[str, Any], expected: tuple[Any, Any]
) -> None:
    answer = AnthropicRenderer("m", "r", 4).answer(output("x", reason, **fields))
    assert (answer["stop_reason"], answer["stop_sequence"]) == expected


def test_a_timeout_ends_at_max_tokens_with_its_detail() -> None:
    answer = AnthropicRenderer("m", "r", 4).answer(
        output("x", FinishReason.LENGTH, finish_detail="timeout")
    )
    assert answer["stop_reason"] == "max_tokens" and answer["rillet_finish_detail"] == "timeout"


def test_errors_take_anthropics_types_and_overload_stays_429() -> None:
    busy = OverloadedError()
    assert status(busy) == 429
    assert error_body(busy) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Model is overloaded"},
    }
    assert status(ValidationError("no")) == 400
    assert error_body(ValidationError("no"))["error"]["type"] == "invalid_request_error"
