"""Resumable streams over HTTP, on a fake engine the test holds: the opt-in header, numbered
events, ``GET /streams/<sid>`` replaying after ``Last-Event-ID`` then going on live, the key,
the errors, and the abort when nobody comes back. Every drop happens while the engine is
held, so the generation is known to be running when the client leaves."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from app_server import Door, door
from polling import poll_until
from rillet.client.sse import ServerSentEvent, aiter_events, iter_events

pytestmark = pytest.mark.timeout(30)

RESUMABLE = {"x-rillet-resumable": "1"}
TGI_BODY = {"inputs": "Hi", "parameters": {"max_new_tokens": 11}}
CHAT_BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 11, "stream": True}


async def first_events(
    d: Door, path: str, body: dict[str, Any], count: int, headers: dict[str, str] | None = None
) -> tuple[str, list[ServerSentEvent]]:
    """Start a resumable stream, read ``count`` events, then drop the connection."""
    events: list[ServerSentEvent] = []
    sent = {**RESUMABLE, **(headers or {})}
    async with d.http.stream("POST", path, json=body, headers=sent) as r:
        assert r.status_code == 200, await r.aread()
        sid = r.headers["x-rillet-stream-id"]
        async for event in aiter_events(r.aiter_bytes()):
            events.append(event)
            if len(events) == count:
                break
    return sid, events


async def resume(
    d: Door, sid: str, last_id: str | None, headers: dict[str, str] | None = None
) -> httpx.Response:
    sent = {**({"last-event-id": last_id} if last_id is not None else {}), **(headers or {})}
    return await d.http.get(f"/streams/{sid}", headers=sent)


def events_of(body: bytes) -> list[ServerSentEvent]:
    return list(iter_events([body]))


def tgi_text(events: list[ServerSentEvent]) -> str:
    return "".join(json.loads(e.data)["token"]["text"] for e in events)


async def test_a_dropped_tgi_stream_resumes_after_its_last_event_and_loses_nothing() -> None:
    async with door() as d:
        d.engine.pause()
        sid, first = await first_events(d, "/generate_stream", TGI_BODY, count=1)
        await d.engine.step()  # the generation goes on while nobody reads
        await d.engine.step()
        d.engine.resume()
        response = await resume(d, sid, first[-1].id)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["x-rillet-stream-id"] == sid
        rest = events_of(response.content)
        events = first + rest
        assert [e.id for e in events] == [str(n) for n in range(1, 12)]
        assert tgi_text(events) == "Hello world"
        assert json.loads(rest[-1].data)["generated_text"] == "Hello world"
        # Each event is framed as TGI frames it, with its number first.
        assert response.content.startswith(b"id: 2\ndata: {")
        # Resuming again after the end, from any event, replays the same bytes.
        again = await resume(d, sid, "9")
        assert [e.id for e in events_of(again.content)] == ["10", "11"]
        await poll_until(lambda: d.service.in_flight == 0)


async def test_an_openai_stream_resumes_with_its_done_numbered_too() -> None:
    async with door() as d:
        d.engine.pause()
        sid, first = await first_events(d, "/v1/chat/completions", CHAT_BODY, count=2)
        d.engine.resume()
        rest = events_of((await resume(d, sid, first[-1].id)).content)
        events = first + rest
        assert [e.id for e in events] == [str(n) for n in range(1, len(events) + 1)]
        assert events[-1].data == "[DONE]"
        chunks = [json.loads(e.data) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == "Hello world"


async def test_without_the_header_a_stream_is_as_before_and_not_held() -> None:
    async with door() as d:
        response = await d.http.post("/generate_stream", json=TGI_BODY)
        assert "x-rillet-stream-id" not in response.headers
        assert b"id:" not in response.content
        assert len(d.service.streams) == 0


async def test_with_a_zero_window_the_header_is_ignored() -> None:
    async with door(resume_window_s=0) as d:
        response = await d.http.post("/generate_stream", json=TGI_BODY, headers=RESUMABLE)
        assert "x-rillet-stream-id" not in response.headers
        assert tgi_text(events_of(response.content)) == "Hello world"


async def test_unknown_stream_bad_last_event_id_and_wrong_key_are_clear_errors() -> None:
    async with door(api_key="k") as d:
        auth = {"authorization": "Bearer k"}
        d.engine.pause()
        sid, first = await first_events(d, "/generate_stream", TGI_BODY, 1, headers=auth)
        unknown = await resume(d, "no-such-stream", "1", auth)
        assert unknown.status_code == 404 and unknown.json()["error_type"] == "not_found"
        for bad in ("x", "-1", "1e3", "9" * 40):
            refused = await resume(d, sid, bad, auth)
            assert refused.status_code == 422, bad
            assert refused.json()["error_type"] == "validation"
        past = await resume(d, sid, "50", auth)
        assert past.status_code == 422 and "past" in past.json()["error"]
        for wrong in ({}, {"authorization": "Bearer nope"}):
            denied = await resume(d, sid, "1", wrong)
            assert denied.status_code == 401 and denied.json()["error_type"] == "authentication"
        d.engine.resume()
        rest = events_of((await resume(d, sid, first[-1].id, auth)).content)
        assert tgi_text(first + rest) == "Hello world"


async def test_nobody_coming_back_aborts_the_generation_and_frees_its_permit() -> None:
    async with door(resume_window_s=0.05) as d:
        d.engine.pause()
        sid, _ = await first_events(d, "/generate_stream", TGI_BODY, count=1)
        (request_id,) = d.engine.running
        await poll_until(lambda: request_id in d.engine.aborted)
        await poll_until(lambda: d.service.in_flight == 0)
        assert len(d.service.streams) == 0
        gone = await resume(d, sid, "1")
        assert gone.status_code == 404
        outcome = {"route": "generate_stream", "outcome": "cancelled"}
        assert d.service.metrics.registry.get_sample_value("rillet_requests_total", outcome) == 1
        streams = d.service.metrics.registry.get_sample_value("rillet_resumable_streams")
        assert streams == 0


async def test_a_resume_while_the_old_connection_still_reads_takes_over() -> None:
    async with door() as d:
        d.engine.pause()
        async with d.http.stream(
            "POST", "/generate_stream", json=TGI_BODY, headers=RESUMABLE
        ) as old:
            sid = old.headers["x-rillet-stream-id"]
            events = aiter_events(old.aiter_bytes())
            first = await anext(events)
            # The client believes its connection is dead; the server does not know yet.
            resumed = {"last-event-id": first.id}
            async with d.http.stream("GET", f"/streams/{sid}", headers=resumed) as taken:
                assert taken.status_code == 200
                # The old response ends at once, without another event.
                assert [e async for e in events] == []
                d.engine.resume()
                rest = [e async for e in aiter_events(taken.aiter_bytes())]
        assert tgi_text([first, *rest]) == "Hello world"
