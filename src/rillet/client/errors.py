"""Exceptions the client raises, chosen by the server's ``error_type``, then by HTTP status.

This is the client half of the one error table in :mod:`rillet.errors`: each class here
subclasses the server-side class of the same name, so ``except rillet.errors.OverloadedError``
catches an overload whether the engine ran in this process or behind a server.
(:mod:`rillet.errors` is stdlib-only, so importing it keeps the client free of torch.)

Both error shapes on the wire are understood: TGI's ``{"error": "...", "error_type": "..."}``
and OpenAI's ``{"error": {"message": "...", "type": "...", "code": 422}}``, whether they come
as an HTTP error response or in-band, as an event in the middle of a stream.
"""

from __future__ import annotations

from typing import Any

from rillet import errors as _server


class ClientError(_server.RilletError):
    """Base of every error the client raises.

    ``status_code`` is the HTTP status of the error response, or ``None`` when the error
    arrived in-band, inside a stream that had already started. ``body`` is the decoded
    error payload as sent. ``retry_after`` is the server's ``retry-after`` hint in seconds.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        # Keep the server's own string (e.g. "template_error" mapped to ValidationError).
        if error_type is not None:
            self.error_type = error_type
        self.body = body
        self.retry_after = retry_after


class ValidationError(ClientError, _server.ValidationError):
    """The server refused the request's parameters or input (422)."""


class OverloadedError(ClientError, _server.OverloadedError):
    """The server is at its concurrency limit (429); retry later, see ``retry_after``."""


class GenerationError(ClientError, _server.GenerationError):
    """The engine failed while generating (424, or in-band)."""


class IncompleteGenerationError(ClientError, _server.IncompleteGenerationError):
    """The generation ended without its final answer (500, or a stream cut short)."""


class AuthenticationError(ClientError, _server.AuthenticationError):
    """Missing or wrong API key (401)."""


class NotFoundError(ClientError, _server.NotFoundError):
    """Unknown route or model (404)."""


class MethodNotAllowedError(ClientError, _server.MethodNotAllowedError):
    """The route does not take this HTTP method (405)."""


class UnavailableError(ClientError, _server.UnavailableError):
    """The server is shutting down or its engine is down (503); another replica may serve."""


class InternalError(ClientError, _server.InternalError):
    """The server hit a bug (500)."""


class BadRequestError(ClientError):
    """The server rejected the request (400) without a more specific error type."""

    error_type = "bad_request"
    http_status = 400


class UnknownError(ClientError):
    """An error response the table does not know."""

    error_type = "unknown"


class ProtocolError(ClientError):
    """The server's answer could not be understood (bad JSON, bad SSE, missing fields)."""

    error_type = "protocol"


class APIConnectionError(ClientError):
    """The server could not be reached, or the connection broke."""

    error_type = "connection"


class APITimeoutError(APIConnectionError):
    """The server did not answer (or send the next chunk) within the timeout."""

    error_type = "timeout"


#: The server's table (``rillet.errors.ERROR_TABLE``), client side: one class per error_type.
_BY_ERROR_TYPE: dict[str, type[ClientError]] = {
    cls.error_type: cls
    for cls in (
        ValidationError,
        OverloadedError,
        GenerationError,
        IncompleteGenerationError,
        AuthenticationError,
        NotFoundError,
        MethodNotAllowedError,
        UnavailableError,
        InternalError,
    )
}
# TGI's own name for a stream cut short.
_BY_ERROR_TYPE["incomplete_generation_stream"] = IncompleteGenerationError

_BY_STATUS: dict[int, type[ClientError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    413: ValidationError,
    422: ValidationError,
    424: GenerationError,
    429: OverloadedError,
    431: ValidationError,
    500: InternalError,
    503: UnavailableError,
}


def parse_error(
    status_code: int | None, payload: Any, *, retry_after: float | None = None
) -> ClientError:
    """Build the exception for an error answer.

    ``status_code`` is ``None`` for an in-band error event. ``payload`` is the decoded JSON
    body (any shape: TGI's, OpenAI's, FastAPI's ``{"detail": ...}``) or raw text.
    """
    message, error_type, code = _fields(payload)
    cls = _BY_ERROR_TYPE.get(error_type or "")
    if cls is None:
        cls = _BY_STATUS.get(status_code or code or 0, UnknownError)
    if not message:
        message = f"HTTP {status_code}" if status_code else "error event in stream"
    return cls(
        message,
        status_code=status_code,
        error_type=error_type,
        body=payload,
        retry_after=retry_after,
    )


def _fields(payload: Any) -> tuple[str, str | None, int | None]:
    """(message, error_type, status code found inside the payload) from any error shape."""
    if not isinstance(payload, dict):
        return (str(payload).strip() if payload is not None else "", None, None)
    error = payload.get("error")
    if isinstance(error, dict):  # OpenAI: {"error": {"message", "type", "code"}}
        code = error.get("code", error.get("http_status_code"))
        return (
            str(error.get("message") or ""),
            _str_or_none(error.get("type")),
            code if isinstance(code, int) and not isinstance(code, bool) else None,
        )
    if error is not None:  # TGI: {"error": "...", "error_type": "..."}
        return (str(error), _str_or_none(payload.get("error_type")), None)
    detail = payload.get("detail", payload.get("message"))
    return (str(detail) if detail is not None else "", None, None)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
