"""Anthropic's Messages dialect without a server: bodies -> specs, outputs -> events."""

from __future__ import annotations

import json
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
        (
            {"tools": [TOOL], "output_config": {"format": {"type": "json_schema", "schema": {}}}},
            "cannot be combined with `tools`",
        ),
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


def test_tools_with_choice_none_stay_out_of_the_prompt_and_unconstrained() -> None:
    planned = plan(tools=[TOOL], tool_choice={"type": "none"})
    assert planned.tools is not None and not planned.tools.parse
    assert planned.spec.params.constraint is None
    assert isinstance(planned.spec.prompt, ChatPrompt) and planned.spec.prompt.tools is None


@pytest.mark.parametrize(
    ("choice", "format_type", "max_calls"),
    [
        (None, "triggered_tags", None),
        ({"type": "any"}, "tags_with_separator", None),
        ({"type": "auto", "disable_parallel_tool_use": True}, "triggered_tags", 1),
        ({"type": "tool", "name": "get_weather"}, "tag", None),
    ],
)
def test_tools_are_planned_as_chats_a_constraint_and_the_templates_tools(
    choice: Any, format_type: str, max_calls: int | None
) -> None:
    planned = plan(tools=[TOOL], **({} if choice is None else {"tool_choice": choice}))
    assert planned.tools is not None and planned.tools.parse
    assert planned.tools.max_calls == max_calls
    constraint = planned.spec.params.constraint
    assert constraint is not None and constraint == planned.tools.constraint
    assert json.loads(constraint.value)["format"]["type"] == format_type
    assert "get_weather" in constraint.value
    prompt = planned.spec.prompt
    assert isinstance(prompt, ChatPrompt)
    assert prompt.tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object"},
                "description": "d",
            },
        }
    ]


def test_tool_turns_map_to_openai_shapes_for_the_template() -> None:
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
    prompt = plan(**body).spec.prompt
    assert isinstance(prompt, ChatPrompt)
    assert [m["role"] for m in prompt.messages] == ["user", "assistant", "tool"]
    assert prompt.messages[1]["tool_calls"][0]["id"] == "toolu_1"


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


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def tool_renderer(**body: Any) -> AnthropicRenderer:
    return AnthropicRenderer("m", "r", 4, plan(tools=[TOOL], **body).tools)


def test_a_call_is_a_tool_use_block_after_the_texts_own_block() -> None:
    renderer = tool_renderer()
    events = []
    for piece in ["Let me", " check.", *CALL]:  # the call one character at a time
        events += renderer.events(output(piece))
    events += renderer.events(output("", FinishReason.EOS_TOKEN))
    names = [name for name, _ in events]
    assert names[:5] == [
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
    ]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[0][1]["content_block"] == {"type": "text", "text": ""}
    assert events[3][1] == {"type": "content_block_stop", "index": 0}
    start = events[4][1]
    assert start["index"] == 1
    block = start["content_block"]
    assert block["type"] == "tool_use" and block["name"] == "get_weather"
    assert block["input"] == {} and block["id"].startswith("toolu_")
    deltas = [event for _, event in events[5:-3]]
    assert len(deltas) > 10  # the arguments stream as they are generated
    assert {(d["type"], d["index"], d["delta"]["type"]) for d in deltas} == {
        ("content_block_delta", 1, "input_json_delta")
    }
    arguments = "".join(d["delta"]["partial_json"] for d in deltas)
    assert json.loads(arguments) == {"city": "Paris"}
    assert events[-3][1] == {"type": "content_block_stop", "index": 1}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert renderer.content()[1]["input"] == {"city": "Paris"}


def test_the_whole_message_has_the_calls_with_their_input_parsed() -> None:
    renderer = tool_renderer(tool_choice={"type": "any"})
    answer = renderer.answer(
        output("Sure." + CALL + "\n" + CALL.replace("Paris", "Oslo"), FinishReason.EOS_TOKEN)
    )
    assert answer["stop_reason"] == "tool_use"
    text, first, second = answer["content"]
    assert text == {"type": "text", "text": "Sure."}
    assert (first["type"], first["name"], first["input"]) == (
        "tool_use",
        "get_weather",
        {"city": "Paris"},
    )
    assert second["input"] == {"city": "Oslo"} and second["id"] != first["id"]


def test_a_call_cut_short_stays_max_tokens_with_an_empty_input() -> None:
    renderer = tool_renderer()
    answer = renderer.answer(output(CALL[:60], FinishReason.LENGTH))
    assert answer["stop_reason"] == "max_tokens"
    [block] = answer["content"]
    assert block["type"] == "tool_use" and block["input"] == {}


def test_without_parallel_calls_the_second_is_dropped() -> None:
    renderer = tool_renderer(tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    answer = renderer.answer(output(CALL + "\n" + CALL, FinishReason.EOS_TOKEN))
    assert [block["type"] for block in answer["content"]] == ["tool_use"]
