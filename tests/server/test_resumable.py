"""The store of resumable streams, without HTTP: numbering, replay from any event, a new
reader taking over, expiry that cancels the producer, and the memory limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from rillet.errors import AuthenticationError, NotFoundError, ValidationError
from rillet.server.resumable import ResumableStream, ResumeLimits, StreamStore

pytestmark = pytest.mark.timeout(20)


def framed(number: int, payload: bytes) -> bytes:
    return b"%d:%b" % (number, payload)


def store_with(**limits: float) -> StreamStore:
    return StreamStore(ResumeLimits(**limits))  # type: ignore[arg-type]


async def read(stream: ResumableStream, after: int, count: int | None = None) -> list[bytes]:
    """What a new reader gets after ``after``: ``count`` events, or up to the end."""
    token = stream.attach(after)
    got: list[bytes] = []
    async with contextlib.aclosing(stream.follow(token, after)) as events:
        async for event in events:
            got.append(event)
            if len(got) == count:
                break
    stream.detach(token)
    return got


async def test_events_are_numbered_from_one_and_replayed_after_any_number() -> None:
    store = store_with()
    stream = store.open("key", framed)
    for payload in (b"a", b"b", b"c"):
        stream.append(payload)
    stream.finish()
    assert await read(stream, 0) == [b"1:a", b"2:b", b"3:c"]
    assert await read(stream, 2) == [b"3:c"]
    assert await read(stream, 3) == []
    with pytest.raises(ValidationError):
        stream.attach(4)  # never sent
    assert store.get(stream.sid) is stream
    with pytest.raises(NotFoundError):
        store.get("nope")


async def test_a_reader_follows_live_events_until_the_end() -> None:
    store = store_with()
    stream = store.open(None, framed)
    gate: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def events() -> AsyncIterator[bytes]:
        while (item := await gate.get()) is not None:
            yield item

    store.produce(stream, events())
    reader = asyncio.ensure_future(read(stream, 0))
    for payload in (b"x", b"y"):
        await gate.put(payload)
    await gate.put(None)
    assert await reader == [b"1:x", b"2:y"]
    assert stream.finished


async def test_a_new_reader_takes_over_and_the_old_one_stops() -> None:
    store = store_with()
    stream = store.open(None, framed)
    stream.append(b"a")
    old_token = stream.attach(0)
    old = stream.follow(old_token, 0)
    assert await anext(old) == b"1:a"
    waiting = asyncio.ensure_future(anext(old))  # blocked: no second event yet
    await asyncio.sleep(0)
    new_token = stream.attach(1)  # the client came back before we saw it leave
    with pytest.raises(StopAsyncIteration):
        await waiting
    stream.detach(old_token)  # the old response ends: it is no longer in charge
    assert not stream.is_unread
    stream.append(b"b")
    stream.finish()
    assert [e async for e in stream.follow(new_token, 1)] == [b"2:b"]


async def test_nobody_resuming_within_the_window_cancels_the_producer_and_forgets() -> None:
    store = store_with(window_s=0.01)
    stream = store.open(None, framed)
    cancelled = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"t"
                await asyncio.Event().wait()
        finally:
            cancelled.set()

    store.produce(stream, endless())
    assert await read(stream, 0, count=1) == [b"1:t"]  # the reader leaves: the window starts
    await cancelled.wait()
    assert len(store) == 0
    with pytest.raises(NotFoundError):
        store.get(stream.sid)


async def test_a_resume_within_the_window_keeps_the_stream() -> None:
    store = store_with(window_s=3600)
    stream = store.open(None, framed)
    stream.append(b"a")
    token = stream.attach(0)
    stream.detach(token)
    assert stream.is_unread and len(store) == 1
    token = stream.attach(1)
    assert not stream.is_unread
    stream.finish()
    stream.detach(token)
    await store.close()
    assert len(store) == 0


async def test_only_the_key_that_started_a_stream_resumes_it() -> None:
    store = store_with()
    keyed, open_ = store.open("secret", framed), store.open(None, framed)
    keyed.check_owner("secret")
    open_.check_owner(None)
    for stream, wrong in ((keyed, "other"), (keyed, None), (open_, "secret")):
        with pytest.raises(AuthenticationError):
            stream.check_owner(wrong)


async def test_one_stream_keeps_at_most_its_share_and_a_resume_before_it_is_refused() -> None:
    store = store_with(max_stream_bytes=10)
    stream = store.open(None, framed)
    for payload in (b"aa", b"bb", b"cc", b"dd"):  # 4 bytes each, framed
        stream.append(payload)
    assert [n for n, _ in stream.events] == [3, 4]
    assert store.num_bytes == stream.num_bytes == 8
    with pytest.raises(NotFoundError):
        stream.attach(1)  # event 2 is gone: no gaps, ever
    stream.finish()
    assert await read(stream, 2) == [b"3:cc", b"4:dd"]


async def test_over_the_total_finished_unread_streams_go_first() -> None:
    store = store_with(max_bytes=12, window_s=3600)
    done = store.open(None, framed)
    done.append(b"aaaa")  # 6 bytes
    done.finish()
    reading = store.open(None, framed)
    token = reading.attach(0)
    reading.append(b"bbbb")
    assert len(store) == 2 and store.num_bytes == 12
    reading.append(b"cccc")  # 18 > 12: the finished, unread stream is forgotten
    assert list(store.streams) == [reading.sid] and store.num_bytes == 12
    reading.append(b"dddd")  # nothing else to drop: its own oldest event goes
    assert [n for n, _ in reading.events] == [2, 3] and store.num_bytes == 12
    reading.detach(token)
    await store.close()
