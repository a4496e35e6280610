"""The Anthropic Messages and OpenAI Responses doors on a real ``rillet serve``, driven by
the real ``anthropic`` and ``openai`` SDKs (a few greedy generations, small caps), tool use
included (a forced tool: the grammar makes the bundled model's call valid)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import jsonschema
import openai
import pytest

from server_process import ServerHandle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

QUESTION = "What is 2+2? Answer with one number."
GREEDY = {"temperature": 0}


def test_anthropic_stream_create_count_tokens_and_errors(server: ServerHandle) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": QUESTION}]
    kwargs = {"model": "any", "max_tokens": 32, "messages": messages, "extra_body": GREEDY}
    with client.messages.stream(**kwargs) as stream:  # type: ignore[arg-type]
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    text = "".join(pieces)
    assert text and len(pieces) > 1 and final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0

    whole = client.messages.create(**kwargs)  # type: ignore[arg-type]
    assert whole.content[0].text == text  # type: ignore[union-attr]
    assert (whole.stop_reason, whole.usage.output_tokens) == (
        final.stop_reason,
        final.usage.output_tokens,
    )
    counted = client.messages.count_tokens(model="any", messages=messages)  # type: ignore[arg-type]
    assert counted.input_tokens == whole.usage.input_tokens

    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="any", max_tokens=0, messages=messages)  # type: ignore[arg-type]
    assert "max_tokens" in str(bad.value)
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("any")  # no such route here: a 404


def test_responses_stream_and_create_with_instructions(server: ServerHandle) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    events = list(
        client.responses.create(
            model="any", input=QUESTION, max_output_tokens=32, temperature=0, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert deltas and final.output_text == deltas and final.status == "completed"

    whole = client.responses.create(
        model="any",
        input=[{"role": "user", "content": "What is 2+2?"}],
        instructions="Answer with one number.",
        max_output_tokens=16,
        temperature=0,
    )
    assert whole.instructions == "Answer with one number." and whole.output_text
    assert whole.status in ("completed", "incomplete") and whole.usage is not None
    assert whole.usage.input_tokens > 0


WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ASK = "What is the weather in Paris?"


def test_anthropic_forced_tool_streams_a_tool_use_block_with_valid_input(
    server: ServerHandle,
) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    tool: Any = {
        "name": "get_weather",
        "description": "The current weather in a city",
        "input_schema": WEATHER_SCHEMA,
    }
    kwargs: Any = {
        "model": "any",
        "max_tokens": 60,
        "messages": [{"role": "user", "content": ASK}],
        "tools": [tool],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "extra_body": GREEDY,
    }
    with client.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds
    assert final.stop_reason == "tool_use"
    [block] = final.content
    assert block.type == "tool_use" and block.name == "get_weather"
    jsonschema.validate(block.input, WEATHER_SCHEMA)
    whole = client.messages.create(**kwargs)
    assert whole.stop_reason == "tool_use"
    assert [b.model_dump(exclude={"id"}) for b in whole.content] == [
        block.model_dump(exclude={"id"})
    ]


def test_responses_forced_function_call_has_arguments_that_parse(server: ServerHandle) -> None:
    client = openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )
    tool: Any = {
        "type": "function",
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": WEATHER_SCHEMA,
        "strict": True,
    }
    events = list(
        client.responses.create(
            model="any",
            input=ASK,
            tools=[tool],
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas and done.arguments == "".join(deltas)
    [call] = events[-1].response.output  # type: ignore[union-attr]
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
