"""Tool use on Anthropic's Messages and OpenAI's Responses doors, on a fake engine that
answers with a scripted ``<tool_call>`` text, one character per token, read by the real
``anthropic`` and ``openai`` SDKs: the streamed blocks / items and their accumulation, the
whole message / response, the tool constraint and tool turns in the prompt."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from app_server import Door, door

pytestmark = pytest.mark.timeout(30)

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
OSLO = CALL.replace("Paris", "Oslo")
HI = [{"role": "user", "content": "Weather in Paris?"}]
CONTEXT = 4096  # the fallback tool prompt, one token per character
ANTHROPIC_TOOL: Any = {"name": "get_weather", "description": "Weather", "input_schema": SCHEMA}
RESPONSES_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather",
    "parameters": SCHEMA,
    "strict": False,
}


def claude(d: Door) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=d.url, api_key="k", max_retries=0)


def gpt(d: Door) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="k", max_retries=0)


def last_prompt(d: Door) -> str:
    ids = d.engine.requests[-1].prompt_token_ids
    return d.engine.tokenizer.decode(ids, skip_special_tokens=False)


# ---- Anthropic ---------------------------------------------------------------------------


async def test_messages_stream_assembles_tool_use_blocks_and_create_is_equal() -> None:
    async with door(max_model_len=CONTEXT) as d:
        d.engine.reply = "Let me check." + CALL + "\n" + OSLO
        client = claude(d)
        kwargs: Any = {"model": "m", "max_tokens": 400, "messages": HI, "tools": [ANTHROPIC_TOOL]}
        async with client.messages.stream(**kwargs) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
        assert kinds.count("input_json") > 10  # the arguments streamed as they came
        assert final.stop_reason == "tool_use"
        text, paris, oslo = final.content
        assert text.type == "text" and text.text == "Let me check."
        assert paris.type == "tool_use" and oslo.type == "tool_use"
        assert (paris.name, paris.input, oslo.input) == (
            "get_weather",
            {"city": "Paris"},
            {"city": "Oslo"},
        )
        assert paris.id.startswith("toolu_") and paris.id != oslo.id
        whole = await client.messages.create(**kwargs)
        assert whole.stop_reason == "tool_use"
        assert [b.model_dump(exclude={"id"}) for b in whole.content] == [
            b.model_dump(exclude={"id"}) for b in final.content
        ]
        assert whole.usage.output_tokens == final.usage.output_tokens == len(d.engine.reply)
        # auto: free text, but a call the model starts is a valid call of a listed tool
        constraint = d.engine.requests[-1].params.constraint
        assert constraint is not None and json.loads(constraint.value)["format"]["type"] == (
            "triggered_tags"
        )


async def test_a_forced_tool_sets_the_constraint_and_its_only_block_is_the_call() -> None:
    async with door(max_model_len=CONTEXT) as d:
        d.engine.reply = CALL
        whole = await claude(d).messages.create(
            model="m",
            max_tokens=400,
            messages=HI,  # type: ignore[arg-type]
            tools=[ANTHROPIC_TOOL],
            tool_choice={"type": "tool", "name": "get_weather"},
        )
        [block] = whole.content
        assert block.type == "tool_use" and block.input == {"city": "Paris"}
        assert whole.stop_reason == "tool_use"
        request = d.engine.requests[-1]
        fmt = json.loads(request.params.constraint.value)["format"]
        assert fmt["type"] == "tag" and '"get_weather"' in fmt["begin"]
        assert "get_weather" in last_prompt(d)  # the tools are in the prompt


async def test_tool_use_and_tool_result_blocks_are_tool_turns_in_the_prompt() -> None:
    async with door(max_model_len=CONTEXT) as d:
        d.engine.reply = "It is sunny."
        history: Any = [
            *HI,
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21C"}
                ],
            },
        ]
        whole = await claude(d).messages.create(
            model="m", max_tokens=100, messages=history, tools=[ANTHROPIC_TOOL]
        )
        assert whole.stop_reason == "end_turn" and whole.content[0].text == "It is sunny."  # type: ignore[union-attr]
        prompt = last_prompt(d)
        assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
        assert "<tool_response>\nsunny, 21C\n</tool_response>" in prompt


# ---- Responses ---------------------------------------------------------------------------


async def test_responses_stream_function_call_items_in_order_and_create_is_equal() -> None:
    async with door(max_model_len=CONTEXT) as d:
        d.engine.reply = CALL + "\n" + OSLO
        client = gpt(d)
        kwargs: Any = {
            "model": "m",
            "input": "Weather in Paris and Oslo?",
            "tools": [RESPONSES_TOOL],
            "tool_choice": "required",
        }
        stream = await client.responses.create(**kwargs, stream=True)
        events = [event async for event in stream]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        kinds = [e.type for e in events]
        assert kinds[:3] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
        ]
        assert kinds[-1] == "response.completed"
        added = [e.item for e in events if e.type == "response.output_item.added"]
        assert [(item.type, item.name, item.arguments) for item in added] == [  # type: ignore[union-attr]
            ("function_call", "get_weather", ""),
            ("function_call", "get_weather", ""),
        ]
        for index, city in enumerate(["Paris", "Oslo"]):
            of_item = [e for e in events if getattr(e, "output_index", None) == index]
            assert of_item[0].type == "response.output_item.added"
            assert of_item[-2].type == "response.function_call_arguments.done"
            assert of_item[-1].type == "response.output_item.done"
            deltas = [
                e.delta for e in of_item if e.type == "response.function_call_arguments.delta"
            ]
            assert len(deltas) > 5
            assert json.loads("".join(deltas)) == {"city": city}
            assert of_item[-2].arguments == "".join(deltas)  # type: ignore[union-attr]
            done = of_item[-1].item  # type: ignore[union-attr]
            assert done.status == "completed" and done.call_id.startswith("call_")  # type: ignore[union-attr]
        final = events[-1].response  # type: ignore[union-attr]
        assert [item.type for item in final.output] == ["function_call", "function_call"]
        async with client.responses.stream(**kwargs) as helper:
            async for _ in helper:
                pass
            assembled = await helper.get_final_response()
        calls = [item for item in assembled.output if item.type == "function_call"]
        assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
        whole = await client.responses.create(**kwargs)
        assert whole.status == "completed"
        assert [item.model_dump(exclude={"id", "call_id"}) for item in whole.output] == [
            item.model_dump(exclude={"id", "call_id"}) for item in final.output
        ]
        fmt = json.loads(d.engine.requests[-1].params.constraint.value)["format"]
        assert fmt["type"] == "tags_with_separator" and fmt["at_least_one"]


async def test_a_named_function_sets_the_constraint_and_text_before_a_call_is_a_message() -> None:
    async with door(max_model_len=CONTEXT) as d:
        d.engine.reply = "Checking." + CALL
        whole = await gpt(d).responses.create(
            model="m",
            input="Weather in Paris?",
            tools=[RESPONSES_TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False,
        )
        message, call = whole.output
        assert message.type == "message" and whole.output_text == "Checking."
        assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
        fmt = json.loads(d.engine.requests[-1].params.constraint.value)["format"]
        assert fmt["type"] == "tag" and '"get_weather"' in fmt["begin"]


async def test_function_call_items_and_their_outputs_are_tool_turns_in_the_prompt() -> None:
    async with door(max_model_len=CONTEXT) as d:
        d.engine.reply = "It is sunny."
        items: Any = [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21C"},
        ]
        whole = await gpt(d).responses.create(model="m", input=items, tools=[RESPONSES_TOOL])
        assert whole.output_text == "It is sunny."
        prompt = last_prompt(d)
        assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
        assert "<tool_response>\nsunny, 21C\n</tool_response>" in prompt


# ---- an untagged call, and bad input, on both doors ----------------------------------------

FENCED = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'


async def test_a_fenced_call_is_a_tool_use_block_and_a_function_call_item() -> None:
    """Qwen2.5's Markdown-block call (tool_choice auto) is a call on these doors too."""
    async with door(max_model_len=CONTEXT) as d:
        d.engine.reply = FENCED
        message = await claude(d).messages.create(
            model="m",
            max_tokens=400,
            messages=HI,  # type: ignore[arg-type]
            tools=[ANTHROPIC_TOOL],
        )
        [block] = message.content
        assert block.type == "tool_use" and block.input == {"city": "Paris"}
        assert message.stop_reason == "tool_use"
        response = await gpt(d).responses.create(
            model="m", input="Weather in Paris?", tools=[RESPONSES_TOOL]
        )
        [call] = response.output
        assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}


async def test_bad_tools_are_400_in_each_doors_shape() -> None:
    bad_schema = {**ANTHROPIC_TOOL, "input_schema": {"type": "object", "not": {}}}
    async with door(max_model_len=CONTEXT) as d:
        for tools, choice, message in (
            ([ANTHROPIC_TOOL], {"type": "tool", "name": "nope"}, "not in `tools`"),
            ([bad_schema], {"type": "auto"}, "unsupported JSON Schema keyword `not`"),
        ):
            with pytest.raises(anthropic.BadRequestError, match=message) as anthropic_error:
                await claude(d).messages.create(
                    model="m",
                    max_tokens=8,
                    messages=HI,  # type: ignore[arg-type]
                    tools=tools,
                    tool_choice=choice,  # type: ignore[arg-type]
                )
            assert anthropic_error.value.body["type"] == "error"  # type: ignore[index]
        bad_parameters = {**RESPONSES_TOOL, "parameters": {"type": "object", "not": {}}}
        for tools, choice, message in (
            ([RESPONSES_TOOL], {"type": "function", "name": "nope"}, "not in `tools`"),
            ([bad_parameters], "auto", "unsupported JSON Schema keyword `not`"),
        ):
            with pytest.raises(openai.BadRequestError, match=message):
                await gpt(d).responses.create(
                    model="m",
                    input="Hi",
                    tools=tools,
                    tool_choice=choice,  # type: ignore[arg-type]
                )
        assert d.service.in_flight == 0 and not d.engine.requests
