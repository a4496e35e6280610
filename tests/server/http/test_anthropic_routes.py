"""Anthropic's Messages door on the fake engine: real uvicorn, the real ``anthropic`` SDK.

Every event type in its order, the whole message, count_tokens, each error shape (before and
inside a stream), the key in ``x-api-key`` or a Bearer, ``ping`` keep-alives, a resumable
stream, and a client that leaves mid-stream freeing the engine and the permit.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import pytest

from app_server import Door, door, held_stream
from polling import poll_until
from rillet.errors import GenerationError

pytestmark = pytest.mark.timeout(30)

HI = [{"role": "user", "content": "Hi"}]
BODY: dict[str, Any] = {"model": "m", "max_tokens": 5, "messages": HI}


def sdk(d: Door, key: str = "k") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=d.url, api_key=key, max_retries=0)


def named_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of each SSE event (comments and ids skipped)."""
    events = []
    for block in raw.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


async def test_the_stream_sends_every_event_in_anthropics_order() -> None:
    async with door() as d:
        response = await d.http.post("/v1/messages", json={**BODY, "stream": True})
        assert response.headers["content-type"] == "text/event-stream"
        events = named_events(response.text)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(name == data["type"] for name, data in events)
    start = events[0][1]["message"]
    assert (
        start["role"] == "assistant" and start["content"] == [] and start["id"].startswith("msg_")
    )
    assert start["usage"]["output_tokens"] == 0 and start["usage"]["input_tokens"] > 0
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert "".join(data["delta"]["text"] for name, data in events[2:7]) == "Hello"
    assert {data["delta"]["type"] for _, data in events[2:7]} == {"text_delta"}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 5  # cumulative: the SDK takes it as the total


async def test_the_sdk_streams_and_creates_the_same_message() -> None:
    async with door() as d:
        client = sdk(d)
        async with client.messages.stream(model="m", max_tokens=50, messages=HI) as stream:
            pieces = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        assert "".join(pieces) == "Hello world" and len(pieces) == 11
        assert final.content[0].text == "Hello world"  # type: ignore[union-attr]
        assert final.stop_reason == "end_turn" and final.usage.output_tokens == 11
        whole = await client.messages.create(model="m", max_tokens=50, messages=HI)
        assert [b.model_dump() for b in whole.content] == [
            {"citations": None, "text": "Hello world", "type": "text"}
        ]
        assert whole.stop_reason == final.stop_reason
        assert whole.usage.input_tokens == final.usage.input_tokens
        capped = await client.messages.create(model="m", max_tokens=2, messages=HI)
        assert capped.stop_reason == "max_tokens" and capped.content[0].text == "He"  # type: ignore[union-attr]
        counted = await client.messages.count_tokens(model="m", messages=HI)
        assert counted.input_tokens == whole.usage.input_tokens
        with_system = await client.messages.count_tokens(model="m", messages=HI, system="Be brief.")
        assert with_system.input_tokens > counted.input_tokens
        registry = d.service.metrics.registry
        done = {"route": "messages", "outcome": "success"}
        assert registry.get_sample_value("rillet_requests_total", done) == 3


async def test_bad_requests_raise_the_sdks_own_errors() -> None:
    async with door() as d:
        client = sdk(d)
        with pytest.raises(anthropic.BadRequestError) as bad:
            await client.messages.create(model="m", max_tokens=0, messages=HI)
        assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert "max_tokens" in bad.value.body["error"]["message"]  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(
                model="m", max_tokens=5, messages=HI, extra_body={"temperature": 1.5}
            )
        tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
        with pytest.raises(anthropic.BadRequestError, match="'nope'"):
            await client.messages.create(
                model="m",
                max_tokens=5,
                messages=HI,
                tools=[tool],  # type: ignore[list-item]
                tool_choice={"type": "tool", "name": "nope"},
            )
        missing = await d.http.post("/v1/messages", json={"model": "m", "messages": HI})
        assert missing.status_code == 400
        assert missing.json() == {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "Failed to deserialize the JSON body into the target type: "
                "max_tokens: Field required",
            },
        }
        unknown = await d.http.post("/v1/messages/batches", json={})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["type"] == "not_found_error"
        assert d.engine.requests == []


async def test_the_key_comes_in_x_api_key_or_a_bearer() -> None:
    async with door(api_key="secret") as d:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await sdk(d, "wrong").messages.create(model="m", max_tokens=2, messages=HI)
        assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        assert (await sdk(d, "secret").messages.create(model="m", max_tokens=2, messages=HI)).id
        bearer = anthropic.AsyncAnthropic(base_url=d.url, auth_token="secret", max_retries=0)
        assert (await bearer.messages.count_tokens(model="m", messages=HI)).input_tokens > 0
        headers = {"anthropic-version": "2023-06-01"}
        plain = await d.http.post("/v1/messages/count_tokens", json=BODY, headers=headers)
        assert plain.status_code == 401


async def test_overload_is_429_overloaded_error_and_the_sdk_raises_rate_limit() -> None:
    async with door(max_concurrent_requests=1) as d, held_stream(d):
        response = await d.http.post("/v1/messages", json=BODY)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"] == {
            "type": "overloaded_error",
            "message": "Model is overloaded",
        }
        with pytest.raises(anthropic.RateLimitError):
            await sdk(d).messages.create(model="m", max_tokens=2, messages=HI)


async def test_a_failure_mid_stream_is_an_error_event_the_sdk_raises() -> None:
    async with door() as d:
        d.engine.fail_after = (2, GenerationError("boom"))
        response = await d.http.post("/v1/messages", json={**BODY, "stream": True})
        events = named_events(response.text)
        assert [name for name, _ in events][-2:] == ["content_block_delta", "error"]
        assert events[-1][1] == {
            "type": "error",
            "error": {"type": "api_error", "message": "boom"},
        }
        with pytest.raises(anthropic.APIStatusError, match="boom") as raised:
            async with sdk(d).messages.stream(model="m", max_tokens=5, messages=HI) as stream:
                async for _ in stream:
                    pass
        assert raised.value.status_code == 200  # the stream had begun
        whole = await d.http.post("/v1/messages", json=BODY)
        assert whole.status_code == 500 and whole.json()["error"]["type"] == "api_error"


async def test_pings_keep_a_held_stream_alive() -> None:
    async with door(keep_alive_interval_s=0.05) as d:
        d.engine.pause()
        body = {**BODY, "stream": True}
        async with d.http.stream("POST", "/v1/messages", json=body) as response:
            seen = ""
            async for chunk in response.aiter_text():
                seen += chunk
                if "event: ping" in seen:
                    d.engine.resume()  # once a ping came, let the answer finish
        assert 'event: ping\ndata: {"type":"ping"}\n\n' in seen
        assert seen.rstrip().endswith('data: {"type":"message_stop"}')


async def test_a_client_that_leaves_mid_stream_frees_the_engine_and_the_permit() -> None:
    async with door() as d:
        d.engine.pause()
        body = {**BODY, "stream": True}
        async with d.http.stream("POST", "/v1/messages", json=body) as response:
            await d.engine.wait_running(1)
            assert d.service.in_flight == 1
            async for _ in response.aiter_bytes():
                break
        await poll_until(lambda: len(d.engine.aborted) == 1 and d.service.in_flight == 0)
        cancelled = {"route": "messages", "outcome": "cancelled"}
        registry = d.service.metrics.registry
        assert registry.get_sample_value("rillet_requests_total", cancelled) == 1


async def test_a_resumable_stream_picks_up_with_the_anthropic_framing() -> None:
    async with door() as d:
        headers = {"x-rillet-resumable": "1", "x-api-key": "k"}
        body = {**BODY, "stream": True}
        response = await d.http.post("/v1/messages", json=body, headers=headers)
        sid = response.headers["x-rillet-stream-id"]
        assert response.text.startswith("id: 1\nevent: message_start\ndata: ")
        resume = {"last-event-id": "8", "x-api-key": "k"}  # the key that opened it
        again = await d.http.get(f"/streams/{sid}", headers=resume)
        assert named_events(again.text) == named_events(response.text)[8:]
        assert [name for name, _ in named_events(again.text)] == ["message_delta", "message_stop"]


async def test_an_abandoned_request_is_not_left_running() -> None:
    async with door() as d:
        d.engine.pause()
        task = asyncio.ensure_future(d.http.post("/v1/messages", json=BODY))
        await d.engine.wait_running(1)
        task.cancel()
        await poll_until(lambda: len(d.engine.aborted) == 1 and d.service.in_flight == 0)
