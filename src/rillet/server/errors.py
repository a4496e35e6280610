"""How a :class:`~rillet.errors.RilletError` looks on each route family.

The status and ``error_type`` come from ``rillet.errors`` (the one table). This module only
decides the shape: TGI's ``{"error", "error_type"}`` on native routes, OpenAI's
``{"error": {"message", "type", "param", "code"}}`` under ``/v1``, both before a stream
starts (a JSON response) and inside one (an SSE event; OpenAI streams then add ``[DONE]``).
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from rillet.errors import OverloadedError, RilletError
from rillet.server.sse import DONE, sse_event

#: ``retry-after`` on 429: the openai SDK honours it; others back off on their own.
RETRY_AFTER_S = 1

_TGI_PREFIX = {
    "validation": "Input validation error: ",
    "generation": "Request failed during generation: ",
}


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def tgi_error_body(exc: RilletError) -> dict[str, str]:
    """TGI's ``ErrorResponse``; messages carry TGI's ``InferError`` prefixes."""
    prefix = _TGI_PREFIX.get(exc.error_type, "")
    message = exc.message if exc.message.startswith(prefix) else prefix + exc.message
    return {"error": message, "error_type": exc.error_type}


def openai_status(exc: RilletError) -> int:
    """OpenAI and vLLM answer bad input with 400 (TGI's 422 is kept on native routes)."""
    return 400 if exc.http_status == 422 else exc.http_status


def openai_error_body(exc: RilletError) -> dict[str, Any]:
    return {
        "error": {
            "message": exc.message,
            "type": exc.error_type,
            "param": None,
            "code": openai_status(exc),
        }
    }


def error_response(exc: RilletError, path: str) -> JSONResponse:
    """The JSON answer to a request that failed before its response started."""
    headers = {"retry-after": str(RETRY_AFTER_S)} if isinstance(exc, OverloadedError) else None
    if is_openai_path(path):
        return JSONResponse(openai_error_body(exc), openai_status(exc), headers=headers)
    return JSONResponse(tgi_error_body(exc), exc.http_status, headers=headers)


def tgi_error_events(exc: RilletError) -> list[bytes]:
    """In-band on TGI streams: one error event, then the body ends (no ``[DONE]``)."""
    return [sse_event(tgi_error_body(exc))]


def openai_error_events(exc: RilletError) -> list[bytes]:
    """In-band on OpenAI streams: an error event with no ``event:`` line, then ``[DONE]``."""
    return [sse_event(openai_error_body(exc)), DONE]
