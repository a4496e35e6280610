"""OpenAI's Responses dialect without a server: bodies -> specs, outputs -> events."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest

from rillet.constraint import Constraint
from rillet.errors import GenerationError, ValidationError
from rillet.protocol import FinishReason, RequestOutput
from rillet.server.dialects import responses
from rillet.server.dialects.responses_render import ResponsesRenderer
from rillet.server.spec import ChatPrompt

FN = {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}


def plan(**body: Any) -> responses.ResponsesPlan:
    full = {"model": "m", "input": "Hi", **body}
    return responses.plan_response(responses.ResponsesRequest.model_validate(full))


def messages(planned: responses.ResponsesPlan) -> list[dict[str, Any]]:
    prompt = planned.spec.prompt
    assert isinstance(prompt, ChatPrompt)
    return prompt.messages


def test_a_string_input_with_instructions_is_a_system_and_a_user_message() -> None:
    planned = plan(instructions="Be brief.", max_output_tokens=9, temperature=0.5, stream=True)
    assert messages(planned) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    params = planned.spec.params
    assert (params.max_new_tokens, params.temperature, params.top_p) == (9, 0.5, 1.0)
    assert planned.stream and planned.spec.names.max_new_tokens == "max_output_tokens"
    assert "top_p" in planned.spec.unset and "temperature" not in planned.spec.unset


def test_input_items_map_to_chat_messages() -> None:
    items = [
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "A"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "B"}]},
        {"role": "user", "content": "C"},
    ]
    assert messages(plan(input=items)) == [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "C"},
    ]


def test_function_call_items_map_to_tool_turns() -> None:
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"x":1}'}
    result = {"type": "function_call_output", "call_id": "call_1", "output": "2"}
    assert responses._item(call, "input[0]") == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
        ],
    }
    assert responses._item(result, "input[1]") == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "2",
    }
    second = {**call, "call_id": "call_2", "arguments": '{"x":2}'}
    said = {"role": "assistant", "content": "Two calls."}
    items = [{"role": "user", "content": "Hi"}, said, call, second, result]
    turns = messages(plan(input=items))
    assert [m["role"] for m in turns] == ["user", "assistant", "tool"]
    assert turns[1]["content"] == "Two calls."  # parallel calls are one assistant turn
    assert [c["id"] for c in turns[1]["tool_calls"]] == ["call_1", "call_2"]


@pytest.mark.parametrize(
    ("fmt", "constraint"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, Constraint.json_object()),
        (
            {"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": True},
            Constraint.json_schema({"type": "object"}),
        ),
    ],
)
def test_text_format_is_the_constraint(fmt: dict[str, Any], constraint: Constraint | None) -> None:
    planned = plan(text={"format": fmt})
    assert planned.spec.params.constraint == constraint
    assert planned.echo["text"] == {"format": fmt}


def test_tools_map_flat_to_the_door_neutral_request() -> None:
    tools = responses.tool_request([FN], {"type": "function", "name": "f"}, False)
    assert tools is not None and tools.parallel_tool_calls is False
    assert tools.tools == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert tools.tool_choice == {"type": "function", "function": {"name": "f"}}
    unused = plan(tools=[FN], tool_choice="none")
    assert unused.tools is not None and not unused.tools.parse
    assert unused.spec.params.constraint is None


@pytest.mark.parametrize(
    ("choice", "parallel", "format_type", "max_calls"),
    [
        (None, None, "triggered_tags", None),
        ("required", False, "tags_with_separator", 1),
        ({"type": "function", "name": "f"}, None, "tag", None),
    ],
)
def test_tools_are_planned_as_chats_a_constraint_and_the_templates_tools(
    choice: Any, parallel: bool | None, format_type: str, max_calls: int | None
) -> None:
    planned = plan(tools=[FN], tool_choice=choice, parallel_tool_calls=parallel)
    assert planned.tools is not None and planned.tools.parse
    assert planned.tools.max_calls == max_calls
    constraint = planned.spec.params.constraint
    assert constraint is not None and constraint == planned.tools.constraint
    assert json.loads(constraint.value)["format"]["type"] == format_type
    prompt = planned.spec.prompt
    assert isinstance(prompt, ChatPrompt)
    assert prompt.tools == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"previous_response_id": "resp_1"}, "does not store responses"),
        ({"background": True}, "background"),
        ({"input": []}, "cannot be empty"),
        ({"input": [{"type": "reasoning"}]}, "'reasoning'"),
        ({"input": [{"role": "tool", "content": "x"}]}, "role"),
        ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "'input_file'"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        (
            {"tools": [FN], "text": {"format": {"type": "json_object"}}},
            "cannot be combined with `tools`",
        ),
        ({"tools": [{"type": "web_search"}]}, "only function tools"),
        ({"tool_choice": "required"}, "needs `tools`"),
        ({"tools": [FN], "tool_choice": {"type": "function", "name": "g"}}, "'g'"),
    ],
)
def test_what_cannot_be_served_is_a_validation_error(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        plan(**body)


def test_llama_servers_per_request_draft_cap() -> None:
    """``speculative.n_max`` as on chat (llama-server keeps it when it turns a Responses
    body into a chat body): this request's draft tokens per step."""
    assert plan().spec.params.num_speculative_tokens is None
    assert plan(**{"speculative.n_max": 2}).spec.params.num_speculative_tokens == 2
    assert plan(**{"speculative.n_max": 0}).spec.params.num_speculative_tokens == 0
    with pytest.raises(pydantic.ValidationError, match=r"speculative\.n_max"):
        plan(**{"speculative.n_max": -1})


def output(text: str, reason: FinishReason | None = None) -> RequestOutput:
    return RequestOutput("r", [], text, reason, num_prompt_tokens=4, num_generated_tokens=2)


def test_events_are_numbered_in_order_and_the_end_says_how_it_ended() -> None:
    renderer = ResponsesRenderer("m", plan(), "r")
    events = [
        *renderer.start(),
        *renderer.events(output("He")),
        *renderer.events(output("y", FinishReason.LENGTH)),
    ]
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    assert events[-1][0] == "response.incomplete"
    final = events[-1][1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["content"][0]["text"] == "Hey"
    assert final["usage"]["total_tokens"] == 6


def test_a_failure_is_an_error_event_then_response_failed_in_the_same_sequence() -> None:
    renderer = ResponsesRenderer("m", plan(), "r")
    renderer.start()
    renderer.events(output("He"))
    (error_name, error), (failed_name, failed) = renderer.failure_of(GenerationError("boom"))
    assert (error_name, failed_name) == ("error", "response.failed")
    assert error == {
        "type": "error",
        "sequence_number": 5,
        "code": "generation",
        "message": "boom",
        "param": None,
    }
    assert failed["sequence_number"] == 6 and failed["response"]["status"] == "failed"


CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


def test_a_call_is_a_function_call_item_after_the_texts_message() -> None:
    renderer = ResponsesRenderer("m", plan(tools=[FN]), "r")
    events = renderer.start()
    assert [name for name, _ in events] == ["response.created", "response.in_progress"]
    for piece in ["Sure.", *CALL]:  # the call one character at a time
        events += renderer.events(output(piece))
    events += renderer.events(output("", FinishReason.EOS_TOKEN))
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    names = [name for name, _ in events]
    assert names[2:9] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
    ]
    assert names[-4:] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = events[8][1]
    assert added["output_index"] == 1
    item = added["item"]
    assert item["id"] == "fc_r_0" and item["call_id"].startswith("call_")
    assert {k: item[k] for k in ("type", "name", "arguments", "status")} == {
        "type": "function_call",
        "name": "f",
        "arguments": "",
        "status": "in_progress",
    }
    deltas = [e for name, e in events if name == "response.function_call_arguments.delta"]
    assert len(deltas) > 3 and {(d["item_id"], d["output_index"]) for d in deltas} == {
        ("fc_r_0", 1)
    }
    arguments = "".join(d["delta"] for d in deltas)
    assert json.loads(arguments) == {"x": 1}
    done = events[-3][1]
    assert (done["item_id"], done["output_index"], done["arguments"]) == ("fc_r_0", 1, arguments)
    assert events[-2][1]["item"] == {**item, "arguments": arguments, "status": "completed"}
    message, call = events[-1][1]["response"]["output"]
    assert message["content"][0]["text"] == "Sure." and message["status"] == "completed"
    assert call == events[-2][1]["item"]


def test_the_whole_response_has_the_calls_and_no_message_without_text() -> None:
    renderer = ResponsesRenderer("m", plan(tools=[FN], tool_choice="required"), "r")
    answer = renderer.answer(output(CALL + "\n" + CALL.replace("1", "2"), FinishReason.EOS_TOKEN))
    assert answer["status"] == "completed"
    first, second = answer["output"]
    assert (first["type"], first["status"], json.loads(first["arguments"])) == (
        "function_call",
        "completed",
        {"x": 1},
    )
    assert json.loads(second["arguments"]) == {"x": 2} and second["call_id"] != first["call_id"]
    assert (first["id"], second["id"]) == ("fc_r_0", "fc_r_1")


def test_a_call_the_cap_cut_is_incomplete_and_an_empty_answer_has_an_empty_message() -> None:
    tools = plan(tools=[FN])
    cut = ResponsesRenderer("m", tools, "r").answer(output(CALL[:40], FinishReason.LENGTH))
    assert cut["status"] == "incomplete"
    [call] = cut["output"]
    assert call["type"] == "function_call" and call["status"] == "incomplete"
    empty = ResponsesRenderer("m", tools, "r").answer(output("", FinishReason.EOS_TOKEN))
    [message] = empty["output"]
    assert message["type"] == "message" and message["content"][0]["text"] == ""
