"""OpenAI's Responses door on the fake engine: real uvicorn, the real ``openai`` SDK.

The event sequence and its numbers, ``response.completed`` / ``response.incomplete``, the
whole Response, ``text.format`` reaching the engine as a constraint, the stateless refusals,
errors before and inside a stream, the key, and a client leaving mid-stream.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from app_server import Door, door, held_stream
from polling import poll_until
from rillet.constraint import Constraint
from rillet.errors import GenerationError

pytestmark = pytest.mark.timeout(30)

BODY: dict[str, Any] = {"model": "m", "input": "Hi", "stream": True}
OPENED = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
CLOSED = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def sdk(d: Door, key: str = "k") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=d.url + "/v1", api_key=key, max_retries=0)


def named_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


async def test_the_stream_is_the_documented_sequence_numbered_from_zero() -> None:
    async with door() as d:
        response = await d.http.post("/v1/responses", json=BODY)
    assert "[DONE]" not in response.text
    events = named_events(response.text)
    names = [name for name, _ in events]
    assert names == [*OPENED, *["response.output_text.delta"] * 11, *CLOSED, "response.completed"]
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = [data for name, data in events if name == "response.output_text.delta"]
    assert "".join(d["delta"] for d in deltas) == "Hello world"
    item_id = events[2][1]["item"]["id"]
    assert all(d["item_id"] == item_id and d["output_index"] == 0 for d in deltas)
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["incomplete_details"] is None
    assert final["output"][0]["content"][0]["text"] == "Hello world"
    assert final["usage"]["output_tokens"] == 11
    assert final["usage"]["total_tokens"] == final["usage"]["input_tokens"] + 11


async def test_the_sdk_reads_the_stream_and_the_whole_response() -> None:
    async with door() as d:
        client = sdk(d)
        stream = await client.responses.create(model="m", input="Hi", stream=True)
        events = [event async for event in stream]
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert events[-1].type == "response.completed"
        assert events[-1].response.output_text == text == "Hello world"
        async with client.responses.stream(model="m", input="Hi") as helper:
            async for _ in helper:
                pass
            assert (await helper.get_final_response()).output_text == "Hello world"
        whole = await client.responses.create(model="m", input="Hi", instructions="Be brief.")
        assert whole.output_text == "Hello world" and whole.status == "completed"
        assert whole.instructions == "Be brief." and whole.usage is not None
        registry = d.service.metrics.registry
        done = {"route": "responses", "outcome": "success"}
        assert registry.get_sample_value("rillet_requests_total", done) == 3


async def test_a_capped_answer_ends_incomplete_with_its_reason() -> None:
    async with door() as d:
        response = await d.http.post("/v1/responses", json={**BODY, "max_output_tokens": 3})
        events = named_events(response.text)
        assert events[-1][0] == "response.incomplete"
        final = events[-1][1]["response"]
        assert final["status"] == "incomplete"
        assert final["incomplete_details"] == {"reason": "max_output_tokens"}
        assert final["output"][0]["status"] == "incomplete"
        whole = await sdk(d).responses.create(model="m", input="Hi", max_output_tokens=3)
        assert whole.status == "incomplete" and whole.output_text == "Hel"


async def test_text_format_json_schema_constrains_the_generation() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text_format = {"format": {"type": "json_schema", "name": "thing", "schema": schema}}
    async with door() as d:
        answer = await sdk(d).responses.create(model="m", input="Hi", text=text_format)  # type: ignore[arg-type]
        assert answer.text.format.type == "json_schema"  # echoed
        assert d.engine.requests[0].params.constraint == Constraint.json_schema(schema)
        await sdk(d).responses.create(
            model="m", input="Hi", text={"format": {"type": "json_object"}}
        )
        assert d.engine.requests[1].params.constraint == Constraint.json_object()


async def test_refusals_are_openai_errors_the_sdk_raises() -> None:
    async with door() as d:
        client = sdk(d)
        with pytest.raises(openai.BadRequestError, match="previous_response_id"):
            await client.responses.create(model="m", input="Hi", previous_response_id="resp_1")
        with pytest.raises(openai.NotFoundError, match="does not store responses"):
            await client.responses.retrieve("resp_1")
        tool = {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}
        with pytest.raises(openai.BadRequestError, match="'g'"):
            await client.responses.create(
                model="m",
                input="Hi",
                tools=[tool],  # type: ignore[list-item]
                tool_choice={"type": "function", "name": "g"},
            )
        with pytest.raises(openai.BadRequestError, match=r"text\.format"):
            await client.responses.create(model="m", input="Hi", text={"format": {"type": "xml"}})  # type: ignore[typeddict-item]
        image = [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
        response = await d.http.post("/v1/responses", json={"model": "m", "input": image})
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "validation"
        assert d.engine.requests == []


async def test_the_key_guards_both_routes() -> None:
    async with door(api_key="secret") as d:
        with pytest.raises(openai.AuthenticationError):
            await sdk(d, "wrong").responses.create(model="m", input="Hi")
        with pytest.raises(openai.AuthenticationError):
            await sdk(d, "wrong").responses.retrieve("resp_1")
        assert (await sdk(d, "secret").responses.create(model="m", input="Hi")).output_text


async def test_overload_is_429_at_once() -> None:
    async with door(max_concurrent_requests=1) as d, held_stream(d):
        response = await d.http.post("/v1/responses", json=BODY)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "overloaded"


async def test_a_failure_mid_stream_is_an_error_event_then_response_failed() -> None:
    async with door() as d:
        d.engine.fail_after = (2, GenerationError("boom"))
        response = await d.http.post("/v1/responses", json=BODY)
        events = named_events(response.text)
        assert [name for name, _ in events][-3:] == [
            "response.output_text.delta",
            "error",
            "response.failed",
        ]
        assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
        error = events[-2][1]
        assert (error["code"], error["message"], error["param"]) == ("generation", "boom", None)
        assert "error" not in error  # the SDK would raise mid-iteration on a top-level `error`
        failed = events[-1][1]["response"]
        assert failed["status"] == "failed"
        assert failed["error"] == {"code": "generation", "message": "boom"}
        assert failed["output"][0]["content"][0]["text"] == "He"
        stream = await sdk(d).responses.create(model="m", input="Hi", stream=True)
        assert [e.type async for e in stream][-1] == "response.failed"


async def test_a_client_that_leaves_mid_stream_frees_the_engine_and_the_permit() -> None:
    async with door() as d:
        d.engine.pause()
        async with d.http.stream("POST", "/v1/responses", json=BODY) as response:
            await d.engine.wait_running(1)
            async for _ in response.aiter_bytes():
                break
        await poll_until(lambda: len(d.engine.aborted) == 1 and d.service.in_flight == 0)
        cancelled = {"route": "responses", "outcome": "cancelled"}
        assert d.service.metrics.registry.get_sample_value("rillet_requests_total", cancelled) == 1


async def test_a_resumable_stream_keeps_its_numbers() -> None:
    async with door() as d:
        headers = {"x-rillet-resumable": "1"}
        response = await d.http.post("/v1/responses", json=BODY, headers=headers)
        sid = response.headers["x-rillet-stream-id"]
        again = await d.http.get(f"/streams/{sid}", headers={"last-event-id": "15"})
        assert named_events(again.text) == named_events(response.text)[15:]
