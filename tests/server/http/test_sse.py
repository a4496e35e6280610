"""SSE framing and the streaming response (keep-alive, in-band errors, disconnect ->
producer cancelled). No model, no sockets: a plain ASGI receive/send pair drives it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from hypothesis import given

from json_strategies import json_objects
from rillet.errors import OverloadedError
from rillet.server.http.errors import OPENAI_ERRORS, TGI_ERRORS
from rillet.server.http.sse import (
    DONE,
    KEEP_ALIVE,
    ClientGone,
    StreamResponse,
    cancel_on_disconnect,
    sse_event,
)

pytestmark = pytest.mark.timeout(20)


def test_event_is_one_compact_data_line_with_lf_framing() -> None:
    event = sse_event({"text": "é\n", "n": [1, 2], "x": None})
    assert event == b'data: {"text":"\xc3\xa9\\n","n":[1,2],"x":null}\n\n'
    assert event.count(b"\n") == 2 and b"\r" not in event
    assert DONE == b"data: [DONE]\n\n" and KEEP_ALIVE == b":\n\n"


class Wire:
    """An ASGI peer: records what the app sends; ``receive`` blocks until ``hang_up()``."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def hang_up(self) -> None:
        self.gone.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}


async def run(response: StreamResponse, wire: Wire) -> None:
    await response({"type": "http"}, wire.receive, wire.send)  # type: ignore[arg-type]


def make(chunks: AsyncIterator[bytes], closed: list[int], **kwargs: Any) -> StreamResponse:
    return StreamResponse(
        chunks, error_chunks=TGI_ERRORS.events, on_close=lambda: closed.append(1), **kwargs
    )


async def test_stream_sends_headers_chunks_and_ends_the_body() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield sse_event({"a": 1})
        yield b""  # dropped: an empty chunk would end a chunked body
        yield sse_event({"a": 2})

    wire, closed = Wire(), []
    await run(make(chunks(), closed), wire)
    assert wire.sent[0]["status"] == 200
    assert wire.headers["content-type"] == "text/event-stream"
    assert wire.headers["cache-control"] == "no-cache"
    assert wire.headers["x-accel-buffering"] == "no"
    assert wire.body == b'data: {"a":1}\n\ndata: {"a":2}\n\n'
    assert wire.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert len(wire.sent) == 4 and closed == [1]


async def test_keep_alive_comments_fill_a_silent_wait() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.3)  # a request waiting in the queue or prefilling
        yield sse_event({"a": 1})

    wire, closed = Wire(), []
    await run(make(chunks(), closed, keep_alive_interval=0.02), wire)
    body = wire.body
    assert body.startswith(KEEP_ALIVE) and body.endswith(b'data: {"a":1}\n\n')
    assert set(body.removesuffix(b'data: {"a":1}\n\n').split(KEEP_ALIVE)) == {b""}


async def test_errors_after_the_first_byte_are_in_band() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield sse_event({"a": 1})
        raise OverloadedError()

    wire, closed = Wire(), []
    await run(make(chunks(), closed), wire)
    events = wire.body.split(b"\n\n")
    assert json.loads(events[1].removeprefix(b"data: ")) == {
        "error": "Model is overloaded",
        "error_type": "overloaded",
    }
    assert events[2:] == [b""] and closed == [1]


async def test_unexpected_exceptions_become_generation_errors() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        raise RuntimeError("boom")
        yield b""

    wire = Wire()
    response = StreamResponse(chunks(), error_chunks=OPENAI_ERRORS.events)
    await run(response, wire)
    first, done, _ = wire.body.split(b"\n\n")
    error = json.loads(first.removeprefix(b"data: "))["error"]
    assert error["type"] == "generation" and "boom" in error["message"]
    assert done + b"\n\n" == DONE


async def test_disconnect_cancels_the_producer_and_closes_once() -> None:
    cancelled = asyncio.Event()
    first_sent = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        try:
            yield sse_event({"a": 1})
            first_sent.set()
            await asyncio.Event().wait()  # the engine is still generating
            yield b"never"
        finally:
            cancelled.set()

    wire, closed = Wire(), []
    task = asyncio.ensure_future(run(make(chunks(), closed, keep_alive_interval=60), wire))
    await first_sent.wait()
    wire.hang_up()
    await asyncio.wait_for(task, 5)
    assert cancelled.is_set() and closed == [1]
    assert b"never" not in wire.body


async def test_a_cancel_during_the_clean_up_still_returns_the_permit_last() -> None:
    # Ray Serve's order: the app sees the client's http.disconnect and starts cleaning up,
    # then Serve cancels the replica's call too. The producer's unwinding is held until the
    # second cancel has landed; the permit must still come back, after the producer ended.
    first_sent, unwinding, hold, permit_back = (asyncio.Event() for _ in range(4))
    order: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        try:
            yield sse_event({"a": 1})
            first_sent.set()
            await asyncio.Event().wait()  # the engine is still generating
        finally:
            unwinding.set()
            await hold.wait()
            order.append("producer ended")

    def spawn(work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """As ``Generation.run``: the permit comes back when the producer's task is done."""
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda _: (order.append("permit back"), permit_back.set()))
        return task

    wire = Wire()
    response = StreamResponse(chunks(), error_chunks=TGI_ERRORS.events, spawn=spawn)
    task = asyncio.ensure_future(run(response, wire))
    await first_sent.wait()
    wire.hang_up()
    await unwinding.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert order == []
    hold.set()
    await asyncio.wait_for(permit_back.wait(), 5)
    assert order == ["producer ended", "permit back"]


async def test_cancel_on_disconnect_lets_the_work_end_even_if_cancelled_twice() -> None:
    class FakeRequest:
        def __init__(self, wire: Wire) -> None:
            self.receive = wire.receive

    started, unwinding, hold, closed = (asyncio.Event() for _ in range(4))
    order: list[str] = []

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            unwinding.set()
            await hold.wait()
            order.append("work ended")

    wire = Wire()
    task = asyncio.ensure_future(work())  # as Generation.run: its end returns the permit
    task.add_done_callback(lambda _: (order.append("closed"), closed.set()))
    call = cancel_on_disconnect(FakeRequest(wire), task)  # type: ignore[arg-type]
    pending = asyncio.ensure_future(call)
    await started.wait()
    wire.hang_up()
    await unwinding.wait()
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    hold.set()
    await asyncio.wait_for(closed.wait(), 5)
    assert order == ["work ended", "closed"]


async def test_cancel_on_disconnect_returns_or_cancels() -> None:
    class FakeRequest:
        def __init__(self, wire: Wire) -> None:
            self.receive = wire.receive

    wire = Wire()
    assert await cancel_on_disconnect(FakeRequest(wire), asyncio.sleep(0, "ok")) == "ok"  # type: ignore[arg-type]
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    pending = asyncio.ensure_future(cancel_on_disconnect(FakeRequest(wire), work()))  # type: ignore[arg-type]
    await started.wait()
    wire.hang_up()
    with pytest.raises(ClientGone):
        await asyncio.wait_for(pending, 5)
    assert cancelled.is_set()


@given(payload=json_objects)
def test_an_event_is_one_line_to_any_line_splitter(payload: dict[str, Any]) -> None:
    """``str.splitlines`` (httpx's ``iter_lines``, so huggingface_hub's reader) also breaks
    lines at U+0085, U+2028 and U+2029, which JSON may leave raw in a string."""
    lines = sse_event(payload).decode().splitlines()
    assert len(lines) == 2 and lines[1] == ""  # the event's line, then the blank one
    assert json.loads(lines[0].removeprefix("data: ")) == payload
