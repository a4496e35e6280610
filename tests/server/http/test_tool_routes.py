"""Tool calls and constraints over HTTP on a fake engine that answers with a scripted
text, one character per token: the SSE chunk sequence, the openai SDK's stream helpers
and parse, and each door's refusals in its own error shape."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from app_server import door

pytestmark = pytest.mark.timeout(30)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
BODY: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "Weather in Paris?"}],
    "tools": [WEATHER],
    "max_tokens": 200,
}
CONTEXT = 4096  # the fallback tool prompt, one token per character


async def test_streamed_tool_calls_are_openais_chunks() -> None:
    async with door(max_model_len=CONTEXT) as d:
        d.engine.reply = "Checking." + CALL + "\n" + CALL.replace("Paris", "Oslo")
        body = {**BODY, "stream": True, "tool_choice": "required"}
        async with d.http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        starts = [t for d_ in deltas for t in d_.get("tool_calls", []) if "id" in t]
        assert [(s["index"], s["function"]["name"]) for s in starts] == [
            (0, "get_weather"),
            (1, "get_weather"),
        ]
        fragments = [t for d_ in deltas for t in d_.get("tool_calls", []) if "id" not in t]
        assert len(fragments) > 20  # arguments stream as they are generated
        assert chunks[-1]["choices"][0]["delta"] == {}
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert "".join(d_.get("content") or "" for d_ in deltas) == "Checking."
        # The request was constrained to the tools' calls.
        constraint = d.engine.requests[-1].params.constraint
        assert constraint is not None and "get_weather" in constraint.value


async def test_the_sdk_stream_helper_and_a_whole_answer_assemble_the_call() -> None:
    async with door(max_model_len=CONTEXT) as d:
        d.engine.reply = CALL
        sdk = openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="k", max_retries=0)
        kwargs = {k: v for k, v in BODY.items() if k != "tools"}
        async with sdk.chat.completions.stream(
            **kwargs,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        ) as stream:
            events = [event.type async for event in stream]
            final = await stream.get_final_completion()
        assert "tool_calls.function.arguments.done" in events
        [call] = final.choices[0].message.tool_calls or []
        assert call.function.parsed_arguments == {"city": "Paris"}  # type: ignore[attr-defined]
        assert final.choices[0].finish_reason == "tool_calls"
        whole = await sdk.chat.completions.create(**BODY)
        message = whole.choices[0].message
        assert message.content is None and message.tool_calls is not None
        assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
        assert whole.choices[0].finish_reason == "tool_calls"


async def test_parse_returns_the_pydantic_object() -> None:
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    async with door() as d:
        d.engine.reply = '{"name": "Oslo", "population": 700000}'
        sdk = openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="k", max_retries=0)
        answer = await sdk.chat.completions.parse(
            model="m", messages=[{"role": "user", "content": "A city"}], response_format=City
        )
        assert answer.choices[0].message.parsed == City(name="Oslo", population=700000)
        sent = d.engine.requests[-1].params.constraint
        assert sent is not None and sent.kind.value == "json_schema"


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        (
            "/v1/chat/completions",
            {**BODY, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not in `tools`",
        ),
        (
            "/v1/chat/completions",
            {
                **BODY,
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}
                ],
            },
            "unsupported JSON Schema keyword `not`",
        ),
        (
            "/v1/completions",
            {
                "prompt": "Hi",
                "structured_outputs": {"json": {"type": "array", "uniqueItems": True}},
            },
            "uniqueItems",
        ),
        (
            "/v1/chat/completions",
            {
                **BODY,
                "tools": None,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}},
                },
            },
            'Unsupported type "strin"',
        ),
        (
            "/v1/chat/completions",
            {**BODY, "tools": None, "structured_outputs": {"regex": "(abc"}},
            "invalid regex",
        ),
    ],
)
async def test_bad_tools_and_schemas_are_400_in_openais_shape(
    route: str, body: dict[str, Any], message: str
) -> None:
    async with door(max_model_len=CONTEXT) as d:
        response = await d.http.post(route, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert message in error["message"] and error["code"] == 400


async def test_triton_http_refuses_an_unenforceable_schema_in_its_shape() -> None:
    async with door() as d:
        body = {
            "text_input": "Hi",
            "parameters": {"guided_json": json.dumps({"type": "string", "format": "color"})},
        }
        response = await d.http.post("/v2/models/fake-model/generate", json=body)
        assert response.status_code == 400
        assert "format 'color' is not enforced" in response.json()["error"]
