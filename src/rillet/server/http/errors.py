"""How the HTTP door renders a :class:`~rillet.errors.RilletError`: each route family
declares its :class:`ErrorFormat`, and its routes render every error in it.

The status and ``error_type`` come from ``rillet.errors`` (the one table) and the body's
shape from the route's dialect. The HTTP part decided here is the transport: a JSON
response before a stream starts (with ``retry-after`` when the error carries one: every
429, from the concurrency limit or a deadline the queue cannot meet), and once it has started, an
in-band SSE event (OpenAI streams then add ``[DONE]``; text/plain has no error event).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rillet.errors import InternalError, RilletError
from rillet.server.dialects import anthropic_render, openai_render, tgi
from rillet.server.http.sse import DONE, ClientGone, sse_event, sse_named_event

log = logging.getLogger("rillet.server")


def _table_status(exc: RilletError) -> int:
    return exc.http_status


@dataclass(frozen=True)
class ErrorFormat:
    """One route family's error shape."""

    body: Callable[[RilletError], Any]
    status: Callable[[RilletError], int] = _table_status
    #: Sent after the in-band error event (OpenAI's ``[DONE]``).
    terminator: bytes | None = None
    #: False for bodies with no way to say "error" mid-stream (text/plain: it just ends).
    in_band: bool = True
    #: The in-band events, where a door frames them itself: named SSE events (Anthropic),
    #: or events that carry the stream's own state (the Responses API's sequence numbers).
    stream_events: Callable[[RilletError], list[bytes]] | None = None

    def response(self, exc: RilletError) -> JSONResponse:
        """The JSON answer to a request that failed before its response started."""
        # The openai SDK and rillet's client honour retry-after; others back off on their own.
        retry = exc.retry_after_s
        headers = None if retry is None else {"retry-after": str(retry)}
        return JSONResponse(self.body(exc), self.status(exc), headers=headers)

    def events(self, exc: RilletError) -> list[bytes]:
        """In-band, after the stream started: one error event, then the terminator."""
        if not self.in_band:
            return []
        if self.stream_events is not None:
            return self.stream_events(exc)
        events = [sse_event(self.body(exc))]
        if self.terminator is not None:
            events.append(self.terminator)
        return events


TGI_ERRORS = ErrorFormat(tgi.error_body)
OPENAI_ERRORS = ErrorFormat(openai_render.error_body, openai_render.status, DONE)
PLAIN_ERRORS = ErrorFormat(tgi.error_body, in_band=False)
#: Anthropic's shape; in a stream, an ``event: error`` (the SDK raises it as APIStatusError).
ANTHROPIC_ERRORS = ErrorFormat(
    anthropic_render.error_body,
    anthropic_render.status,
    stream_events=lambda exc: [sse_named_event("error", anthropic_render.error_body(exc))],
)

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def rendered_by(errors: ErrorFormat) -> type[APIRoute]:
    """A route class whose handlers answer every failure in ``errors``' format: the door
    chooses the shape, whatever the path. Unexpected exceptions are logged and answered as
    an internal error; a client that left a non-streaming request gets 499."""

    class DoorRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            handler = super().get_route_handler()

            async def render_errors(request: Request) -> Response:
                try:
                    return await handler(request)
                except RilletError as exc:
                    return errors.response(exc)
                except ClientGone:
                    # Nobody is listening; 499 (nginx's "client closed request") for the logs.
                    return Response(status_code=499)
                except Exception as exc:
                    log.exception("unhandled error on %s %s", request.method, request.url.path)
                    return errors.response(InternalError(f"internal error: {type(exc).__name__}"))

            return render_errors

    return DoorRoute


def format_for_path(path: str) -> ErrorFormat:
    """For requests no route took (404, 405): the path is all there is to go on (Triton's
    ``/v2`` routes answer ``{"error": ...}``, which TGI's shape also has)."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return ANTHROPIC_ERRORS
    return OPENAI_ERRORS if path.startswith("/v1/") else TGI_ERRORS
