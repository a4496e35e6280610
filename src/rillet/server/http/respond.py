"""The HTTP door's ways to answer an admitted generation: a stream, a resumable stream, or
one body.

Each runs the :class:`~rillet.server.service.Generation`'s work on its
:meth:`~rillet.server.service.Generation.run` task (whose end returns the permit, however
the response ends), and each takes the service's one cancellation path when the generation
is given up: that task is cancelled. For a plain stream that
happens when the client goes away; for a resumable one, when nobody has come back for it
within the resume window (``rillet.server.resumable``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

from starlette.requests import Request

from rillet.errors import RilletError
from rillet.protocol import RequestOutput
from rillet.server.auth import presented_key
from rillet.server.generation import Generation
from rillet.server.http.errors import ErrorFormat
from rillet.server.http.sse import (
    StreamResponse,
    cancel_on_disconnect,
    in_band_errors,
    sse_named_event,
)
from rillet.server.resumable import ResumableStream

#: Opt-in request header (``1``) for a resumable SSE stream: some SSE parsers choke on ``id:``.
RESUMABLE_HEADER = "x-rillet-resumable"
#: The response header naming a resumable stream, for ``GET /streams/<sid>``.
STREAM_ID_HEADER = "x-rillet-stream-id"


def stream_response(
    generation: Generation,
    chunks: AsyncIterator[bytes],
    errors: ErrorFormat,
    request: Request | None = None,
    **options: Any,
) -> StreamResponse:
    """``chunks`` streamed; an error after the first byte in ``errors``' in-band format.

    With the ``request`` of an SSE route that asked for it (``X-Rillet-Resumable: 1``, and
    ``--resume-window`` not 0), the stream is resumable: a producer task fills a
    :class:`~rillet.server.resumable.ResumableStream`, which :func:`follow_response` reads.
    """

    def error_chunks(exc: RilletError) -> list[bytes]:
        generation.fail(exc)
        return errors.events(exc)

    options.setdefault("keep_alive_interval", generation.service.config.keep_alive_interval_s)
    store = generation.service.streams
    if (
        request is not None
        and request.headers.get(RESUMABLE_HEADER) == "1"
        and store.limits.enabled
    ):
        stream = store.open(presented_key(request.headers), sse_with_id)
        store.produce(stream, in_band_errors(chunks, error_chunks), spawn=generation.run)
        return follow_response(stream, 0, errors, **options)
    return StreamResponse(chunks, error_chunks=error_chunks, spawn=generation.run, **options)


def follow_response(
    stream: ResumableStream, after: int, errors: ErrorFormat, **options: Any
) -> StreamResponse:
    """A response that follows ``stream`` from event ``after`` on (the first response, or a
    resume), as the reader in charge until it ends or another takes over."""
    token = stream.attach(after)
    return StreamResponse(
        stream.follow(token, after),
        error_chunks=errors.events,  # the events are rendered already; a follow cannot fail
        on_close=lambda: stream.detach(token),
        headers={STREAM_ID_HEADER: stream.sid},
        **options,
    )


def sse_with_id(number: int, event: bytes) -> bytes:
    """An SSE event (``data: ...\\n\\n``) with its number as the event id, first."""
    return b"id: %d\n%b" % (number, event)


async def collect_answer(request: Request, generation: Generation) -> RequestOutput:
    """The whole generation; a client that disconnects first cancels it (ClientGone)."""
    return await cancel_on_disconnect(request, generation.run(generation.collect()))


class NamedEventRenderer(Protocol):
    """A renderer of named SSE events (``event: NAME``): Anthropic's and Responses'."""

    def start(self) -> Iterable[tuple[str, Any]]: ...

    def events(self, out: RequestOutput) -> Iterable[tuple[str, Any]]: ...


async def named_events(
    generation: Generation, renderer: NamedEventRenderer
) -> AsyncIterator[bytes]:
    """The renderer's opening events, then its events for each of the engine's outputs."""
    for name, event in renderer.start():
        yield sse_named_event(name, event)
    async with contextlib.aclosing(generation.stream()) as outputs:
        async for out in outputs:
            for name, event in renderer.events(out):
                yield sse_named_event(name, event)
