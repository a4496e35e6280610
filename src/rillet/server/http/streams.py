"""``GET /streams/<sid>``: pick up a resumable stream where the connection dropped.

A stream request on the TGI or OpenAI routes with ``X-Rillet-Resumable: 1`` is answered
with ``X-Rillet-Stream-Id: <sid>`` and events numbered with ``id: <n>`` from 1
(``respond.py``). This route replays the events after ``Last-Event-ID`` (all of them without
one), then goes on live, in the same framing: TGI's events, or OpenAI's chunks and
``[DONE]``. The request needs the API key that started the stream. An unknown or expired
``sid``, or events no longer held, get 404; errors here are in TGI's JSON shape.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from rillet.errors import ValidationError
from rillet.server.auth import presented_key
from rillet.server.http.body import require_api_key, service_of
from rillet.server.http.errors import TGI_ERRORS, rendered_by
from rillet.server.http.respond import follow_response

router = APIRouter(route_class=rendered_by(TGI_ERRORS))


@router.get("/streams/{sid}", dependencies=[Depends(require_api_key)])
async def resume_stream(request: Request, sid: str) -> Response:
    service = service_of(request)
    after = _last_event_id(request.headers.get("last-event-id"))
    stream = service.streams.get(sid)
    stream.check_owner(presented_key(request.headers))
    return follow_response(
        stream, after, TGI_ERRORS, keep_alive_interval=service.config.keep_alive_interval_s
    )


def _last_event_id(value: str | None) -> int:
    """The number of the last event the client has (0: none; replay everything)."""
    if value is None or not value.strip():
        return 0
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise ValidationError(f"Last-Event-ID must be an event number, got {value[:40]!r}")
    return int(value)
