"""Streaming responses: SSE framing, keep-alive, in-band errors, and disconnect -> cancel.

Framing is what TGI (axum 0.7) and vLLM put on the wire, byte for byte:
``data: <compact json>\\n\\n``, LF only, no ``event:`` names, a bare ``:\\n\\n`` comment as
keep-alive. :class:`StreamResponse` watches the connection while it streams: a client that
goes away cancels the producer, whose ``CancelledError`` takes the service's one
cancellation path (``AsyncEngine.generate`` aborts the request before the engine's next
step).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from rillet.errors import GenerationError, RilletError

log = logging.getLogger("rillet.server")

T = TypeVar("T")

KEEP_ALIVE = b":\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


#: Characters JSON may leave raw that line splitters other than SSE's break lines at:
#: Python's ``str.splitlines``, which httpx's ``iter_lines`` (and so huggingface_hub's
#: stream reader) follows. A token whose text held one cut its event in two (bench/soak.py
#: found it). Escaped, the JSON value is the same.
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 characters kept as they are (serde_json's output), except the
    three that some clients take for line breaks."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.translate(_LINE_BREAKERS)


def sse_event(obj: Any) -> bytes:
    """One SSE event: a single ``data:`` line (compact JSON has no raw newlines)."""
    return b"data: " + dumps(obj).encode() + b"\n\n"


def sse_named_event(name: str, obj: Any) -> bytes:
    """One SSE event with an ``event:`` line before its data, as Anthropic and OpenAI's
    Responses API send them (Anthropic's SDK dispatches on the event name alone)."""
    return b"event: " + name.encode() + b"\n" + sse_event(obj)


class ClientGone(Exception):
    """The client disconnected before a non-streaming answer was ready."""


ErrorChunks = Callable[[RilletError], Sequence[bytes]]
#: How a response starts the task that produces its body: ``Generation.run`` for a
#: generation's stream, so that the task's end returns the generation's permit.
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Future[None]"]


class StreamResponse(Response):
    """Streams ``chunks`` and stops the moment the client disconnects.

    * A keep-alive chunk goes out whenever ``keep_alive_interval`` passes without a chunk
      (for SSE; ``keep_alive=None`` for plain text).
    * A :class:`RilletError` raised by ``chunks`` after the headers went out becomes the
      route's in-band error (``error_chunks``); any other exception is logged and sent as a
      generation error. Then the body ends.
    * The body is produced on a task started by ``spawn``; a disconnect cancels it, and
      its ``chunks`` are closed before it ends (so a generation is aborted in the engine
      before its permit comes back).
    * ``on_close`` runs exactly once when the response is over, however it ended (finished,
      failed, disconnected, never started).
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        error_chunks: ErrorChunks,
        spawn: Spawn = asyncio.ensure_future,
        on_close: Callable[[], None] | None = None,
        media_type: str = "text/event-stream",
        keep_alive: bytes | None = KEEP_ALIVE,
        keep_alive_interval: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.chunks = chunks
        self.error_chunks = error_chunks
        self.spawn = spawn
        self.on_close = on_close
        self.keep_alive = keep_alive
        self.keep_alive_interval = keep_alive_interval
        self.status_code = 200
        self.background = None
        all_headers = dict(SSE_HEADERS) if media_type == "text/event-stream" else {}
        all_headers.update(headers or {})
        # Set verbatim: Starlette would append "; charset=utf-8" to a text/* media type,
        # and TGI sends a bare `text/event-stream`.
        all_headers["content-type"] = media_type
        self.media_type = None
        self.init_headers(all_headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streamer = self.spawn(self._stream(send))
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not streamer.done():
                log.info("client disconnected mid-stream")
        finally:
            await run_to_the_end(self._close(streamer, watcher))
        if not streamer.cancelled() and streamer.exception() is not None:
            # The transport failed under us (e.g. a reset): the client is gone either way.
            log.info("stream ended by transport error: %r", streamer.exception())

    async def _close(self, streamer: asyncio.Future[None], watcher: asyncio.Future[None]) -> None:
        """Stop both tasks and let the producer unwind (its abort); close ``chunks`` in case
        the producer never ran a step."""
        try:
            for task in (streamer, watcher):
                task.cancel()
            await asyncio.wait({streamer, watcher})
            with contextlib.suppress(Exception):
                await _aclose(self.chunks)
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        # aclosing: if we are cancelled mid-send, the wrapper still cancels its pending read.
        async with contextlib.aclosing(self._with_keep_alive()) as chunks:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _with_keep_alive(self) -> AsyncGenerator[bytes, None]:
        """The chunks, with keep-alives in the gaps and errors turned into in-band events.

        Each ``__anext__`` runs as a task we can wait on with a timeout *without* cancelling
        it (``wait_for`` would cancel the producer and so abort the request).
        """
        iterator = in_band_errors(self.chunks, self.error_chunks)
        pending: asyncio.Future[bytes] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(iterator))
                done, _ = await asyncio.wait({pending}, timeout=self.keep_alive_interval)
                if not done:
                    if self.keep_alive is not None:
                        yield self.keep_alive
                    continue
                finished, pending = pending, None
                try:
                    chunk = finished.result()
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                await asyncio.wait({pending})
            await iterator.aclose()


async def in_band_errors(
    chunks: AsyncIterator[bytes], error_chunks: ErrorChunks
) -> AsyncGenerator[bytes, None]:
    """``chunks`` without empty ones (an empty chunk would end a chunked body early), then,
    if they fail, the failure as the route's in-band error events: a :class:`RilletError`
    as itself, any other exception (logged) as a generation error. ``chunks`` is closed
    when this is, not left to the garbage collector: closing a generation's chunks is what
    aborts it in the engine."""
    try:
        try:
            async for chunk in chunks:
                if chunk:
                    yield chunk
        finally:
            await _aclose(chunks)
    except RilletError as exc:
        for error_chunk in error_chunks(exc):
            yield error_chunk
    except Exception as exc:
        log.exception("stream failed")
        for error_chunk in error_chunks(GenerationError(f"{exc}")):
            yield error_chunk


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it, raise ClientGone.

    For non-streaming routes: cancelling the task that iterates ``AsyncEngine.generate``
    aborts the request in the engine, exactly as a streaming disconnect does; the task's
    end is awaited even if we are cancelled meanwhile.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))

    async def close() -> None:
        for t in (task, watcher):
            t.cancel()
        await asyncio.wait({task, watcher})

    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await run_to_the_end(close())
    if task.cancelled():
        raise ClientGone()
    return task.result()


#: Clean-ups running on after their caller was cancelled (the loop keeps only weak refs).
_UNFINISHED: set[asyncio.Future[None]] = set()


async def run_to_the_end(cleanup: Awaitable[None]) -> None:
    """Await ``cleanup``; if we are cancelled meanwhile, it still runs to its end.

    A response's clean-up hands back the request's permit, and a second cancellation must
    not skip that. One happens on Ray Serve: the replica's app sees the client's
    ``http.disconnect`` and starts cleaning up, then Serve cancels the call as well. Found
    as ``rillet_requests_in_flight`` stuck at 1 on a replica (tests/e2e/test_ray_serve.py).
    """
    task = asyncio.ensure_future(cleanup)
    _UNFINISHED.add(task)
    task.add_done_callback(_UNFINISHED.discard)
    await asyncio.shield(task)
