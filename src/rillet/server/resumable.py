"""Resumable streams: a generation that outlives its connection, and a way back into it.

A door that streams numbered events (the HTTP door's SSE, on request) hands the events to a
:class:`ResumableStream` instead of straight to the socket. A producer task fills the
stream from the generation whether or not anybody reads it; a reader *follows* it from an
event number on, and a new reader (the client came back with ``Last-Event-ID``) takes over
from the old one, which may not even know yet that its connection died.

What is kept, and for how long:

* the events, numbered from 1, as the door framed them: a resume replays the very bytes;
* while nobody follows, for ``window_s`` seconds. When that passes the producer is
  cancelled, which aborts the generation through the service's one cancellation path
  (the engine frees its blocks at its next step), and the stream is forgotten;
* at most ``max_stream_bytes`` per stream (the oldest events go first) and ``max_bytes`` in
  all (whole streams that are finished and unread go first, oldest first). A resume from
  an event no longer held is refused, never answered with a gap.

Nothing here knows HTTP: a stream is numbered byte strings, its owner's key and a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from rillet.errors import AuthenticationError, NotFoundError, ValidationError

log = logging.getLogger("rillet.server")


@dataclass(frozen=True)
class ResumeLimits:
    """How long and how much the store keeps (``--resume-window``, ``--max-resume-bytes``)."""

    #: Seconds a stream nobody reads is kept (and its generation kept running); 0: off.
    window_s: float = 30.0
    max_bytes: int = 64 << 20
    max_stream_bytes: int = 4 << 20

    @property
    def enabled(self) -> bool:
        return self.window_s > 0


Frame = Callable[[int, bytes], bytes]


class ResumableStream:
    """One generation's numbered events and who follows them (see the module docstring)."""

    def __init__(self, store: StreamStore, sid: str, owner: bytes, frame: Frame) -> None:
        self.store = store
        self.sid = sid
        self._owner = owner
        self._frame = frame
        #: ``(number, framed bytes)``, oldest first; numbers are consecutive.
        self.events: deque[tuple[int, bytes]] = deque()
        self.num_bytes = 0
        self.last_id = 0
        self.finished = False
        self.producer: asyncio.Future[None] | None = None
        self._reader = 0  # the token of the reader in charge; 0: nobody reads
        self._next_reader = 0
        self._changed = asyncio.Event()
        self._expiry: asyncio.TimerHandle | None = None

    # ---- the producer's side ----------------------------------------------------------

    def append(self, payload: bytes) -> None:
        """Number and keep one event, and wake the reader."""
        self.last_id += 1
        framed = self._frame(self.last_id, payload)
        self.events.append((self.last_id, framed))
        self.num_bytes += len(framed)
        self.store._grew(self, len(framed))
        self._wake()

    def finish(self) -> None:
        """No more events: a reader that has them all ends its response."""
        self.finished = True
        self._wake()

    def drop_oldest(self) -> int:
        """Forget the oldest event (over a memory limit); the bytes freed."""
        _, framed = self.events.popleft()
        self.num_bytes -= len(framed)
        return len(framed)

    # ---- the readers' side ------------------------------------------------------------

    def check_owner(self, presented_key: str | None) -> None:
        """AuthenticationError unless ``presented_key`` is the key that started the stream."""
        if not hmac.compare_digest(_digest(presented_key), self._owner):
            raise AuthenticationError("this stream was started with another API key")

    def attach(self, after: int) -> int:
        """Make a new reader, who has the events up to ``after``, the one in charge.

        Returns its token for :meth:`follow` and :meth:`detach`. Refused (404) if events
        after ``after`` are no longer held, and (422) if ``after`` was never sent.
        """
        if after > self.last_id:
            raise ValidationError(
                f"Last-Event-ID {after} is past this stream's last event ({self.last_id})"
            )
        first_held = self.events[0][0] if self.events else self.last_id + 1
        if after + 1 < first_held:
            raise NotFoundError(f"the events after {after} of stream {self.sid} are gone")
        self._next_reader += 1
        self._reader = self._next_reader
        self.cancel_expiry()
        self._wake()  # the reader it replaces stops
        return self._reader

    def detach(self, token: int) -> None:
        """A reader is done (its response ended, however). If it was the one in charge,
        the stream waits ``window_s`` for another, then is aborted and forgotten."""
        if token != self._reader:
            return  # replaced already: the new reader is in charge
        self._reader = 0
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(self.store.limits.window_s, self.store.expire, self)

    async def follow(self, token: int, after: int) -> AsyncGenerator[bytes, None]:
        """The framed events after ``after``, then live ones, until the last one is sent,
        another reader takes over, or events this reader still needed were dropped."""
        position = after
        while token == self._reader:
            changed = self._changed
            for number, framed in list(self.events):
                if number <= position:
                    continue
                if number != position + 1:
                    log.warning("stream %s dropped events its reader needed", self.sid)
                    return
                yield framed
                position = number
                if token != self._reader:
                    return
            if self.finished and position == self.last_id:
                return
            if changed is self._changed:
                await changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def is_unread(self) -> bool:
        return self._reader == 0

    def cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None


class StreamStore:
    """Every resumable stream of a server, with the memory limits on all of them."""

    def __init__(self, limits: ResumeLimits) -> None:
        self.limits = limits
        self.streams: OrderedDict[str, ResumableStream] = OrderedDict()
        self.num_bytes = 0

    def __len__(self) -> int:
        return len(self.streams)

    def open(self, presented_key: str | None, frame: Frame) -> ResumableStream:
        """A new stream, owned by ``presented_key``; events are framed by ``frame(n, data)``."""
        sid = secrets.token_urlsafe(18)
        stream = ResumableStream(self, sid, _digest(presented_key), frame)
        self.streams[sid] = stream
        return stream

    def get(self, sid: str) -> ResumableStream:
        """The stream ``sid``; NotFoundError if it never was, or was forgotten."""
        stream = self.streams.get(sid)
        if stream is None:
            raise NotFoundError(f"no stream {sid!r} (unknown, or its resume window passed)")
        return stream

    def produce(
        self,
        stream: ResumableStream,
        events: AsyncGenerator[bytes, None],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Future[None]] = asyncio.ensure_future,
    ) -> None:
        """Fill ``stream`` from ``events`` on a task of its own (started by ``spawn``:
        ``Generation.run``), whoever reads. ``events`` must end by itself (errors rendered
        in-band); cancelling the task closes it, which aborts the generation."""

        async def run() -> None:
            try:
                async with contextlib.aclosing(events):
                    async for payload in events:
                        stream.append(payload)
            finally:
                stream.finish()

        stream.producer = spawn(run())

    def expire(self, stream: ResumableStream) -> None:
        """Nobody came back in time: stop the generation and forget the stream."""
        if self.streams.get(stream.sid) is not stream:
            return
        if stream.producer is not None and not stream.producer.done():
            log.info("stream %s: nobody resumed it; aborting its generation", stream.sid)
            stream.producer.cancel()
        self._forget(stream)

    async def close(self) -> None:
        """Cancel every producer and forget every stream (the app is stopping)."""
        producers = [s.producer for s in self.streams.values() if s.producer is not None]
        for stream in list(self.streams.values()):
            stream.cancel_expiry()
            self._forget(stream)
        for task in producers:
            task.cancel()
        await asyncio.gather(*producers, return_exceptions=True)

    def _forget(self, stream: ResumableStream) -> None:
        if self.streams.pop(stream.sid, None) is stream:
            self.num_bytes -= stream.num_bytes
            stream.finish()  # a reader still waiting ends

    def _grew(self, stream: ResumableStream, num_bytes: int) -> None:
        """Keep within the limits after ``stream`` grew: its own oldest events beyond its
        share; then, over the total, finished unread streams (oldest first), and only
        then the oldest events of the growing stream."""
        self.num_bytes += num_bytes
        limits = self.limits
        while stream.num_bytes > limits.max_stream_bytes and len(stream.events) > 1:
            self.num_bytes -= stream.drop_oldest()
        if self.num_bytes <= limits.max_bytes:
            return
        for old in list(self.streams.values()):
            if self.num_bytes <= limits.max_bytes:
                return
            if old is not stream and old.finished and old.is_unread:
                old.cancel_expiry()
                self._forget(old)
        while self.num_bytes > limits.max_bytes and len(stream.events) > 1:
            self.num_bytes -= stream.drop_oldest()


def _digest(key: str | None) -> bytes:
    return hashlib.sha256(b"\0" if key is None else b"k" + key.encode()).digest()
