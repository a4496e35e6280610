"""The HTTP door's two ways to answer an admitted generation: a stream or one body.

Both close the :class:`~rillet.server.service.Generation` (its permit comes back) however
the response ends, and both take the service's one cancellation path when the client
goes away: the task consuming the engine's outputs is cancelled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from rillet.errors import RilletError
from rillet.protocol import RequestOutput
from rillet.server.http.errors import ErrorFormat
from rillet.server.http.sse import StreamResponse, cancel_on_disconnect
from rillet.server.service import Generation


def stream_response(
    generation: Generation,
    chunks: AsyncIterator[bytes],
    errors: ErrorFormat,
    **options: Any,
) -> StreamResponse:
    """``chunks`` streamed; an error after the first byte in ``errors``' in-band format."""

    def error_chunks(exc: RilletError) -> list[bytes]:
        generation.fail(exc)
        return errors.events(exc)

    options.setdefault("keep_alive_interval", generation.service.config.keep_alive_interval_s)
    return StreamResponse(chunks, error_chunks=error_chunks, on_close=generation.close, **options)


async def collect_answer(request: Request, generation: Generation) -> RequestOutput:
    """The whole generation; a client that disconnects first cancels it (ClientGone)."""
    try:
        return await cancel_on_disconnect(request, generation.collect())
    finally:
        generation.close()
