"""One exception family, one table.

Every error a client can trigger is a :class:`RilletError` subclass that knows its
``error_type`` (the stable string TGI's clients dispatch on), its HTTP status and its
gRPC status code. Front doors never invent statuses of their own: they look them up here,
and the Python client mirrors the same table in ``rillet.client.errors``.

This module imports nothing from rillet, so every layer may use it.
"""

from __future__ import annotations


class RilletError(Exception):
    """Base of every error rillet raises on purpose.

    ``error_type``, ``http_status`` and ``grpc_code`` are class-level facts; ``message``
    is what the client sees.
    """

    error_type: str = "generation"
    http_status: int = 500
    grpc_code: str = "INTERNAL"
    #: Seconds after which a retry may succeed, for the doors' ``retry-after`` (None: none).
    retry_after_s: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(RilletError):
    """The request is malformed or asks for something the server cannot do (TGI 422)."""

    error_type = "validation"
    http_status = 422
    grpc_code = "INVALID_ARGUMENT"


class OverloadedError(RilletError):
    """Too many requests in flight, or a deadline the queue cannot meet; refused at once,
    never queued (TGI 429). ``retry_after_s`` is the server's estimate of when a retry may
    succeed (1 s at the concurrency limit; the queue's drain time for a deadline)."""

    error_type = "overloaded"
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str = "Model is overloaded", retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationError(RilletError):
    """The engine failed while producing tokens for this request (TGI 424)."""

    error_type = "generation"
    http_status = 424
    grpc_code = "INTERNAL"


class IncompleteGenerationError(RilletError):
    """The stream ended without a final answer, e.g. on shutdown (TGI 500)."""

    error_type = "incomplete_generation"
    http_status = 500
    grpc_code = "UNAVAILABLE"


class InternalError(RilletError):
    """A bug: an exception nobody planned for, answered instead of a traceback (500)."""

    error_type = "internal"
    http_status = 500
    grpc_code = "INTERNAL"


class AuthenticationError(RilletError):
    """Missing or wrong API key (401)."""

    error_type = "authentication"
    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class NotFoundError(RilletError):
    """Unknown route or model name (404)."""

    error_type = "not_found"
    http_status = 404
    grpc_code = "NOT_FOUND"


class MethodNotAllowedError(RilletError):
    """The route exists but not for this HTTP method (405)."""

    error_type = "method_not_allowed"
    http_status = 405
    grpc_code = "UNIMPLEMENTED"


class UnavailableError(RilletError):
    """The server is draining after SIGINT/SIGTERM, or its engine is down (503).

    503 is used for this and for an unhealthy /health only, never for overload: some
    clients retry 503 forever.
    """

    error_type = "unavailable"
    http_status = 503
    grpc_code = "UNAVAILABLE"


class PayloadTooLargeError(RilletError):
    """Request body over the size limit (413)."""

    error_type = "validation"
    http_status = 413
    grpc_code = "INVALID_ARGUMENT"


class HeadersTooLargeError(RilletError):
    """Request headers over the size limit (431)."""

    error_type = "validation"
    http_status = 431
    grpc_code = "INVALID_ARGUMENT"


class ModelLoadError(RilletError):
    """A model could not be loaded: missing path, broken file, unsupported architecture.

    Raised at start-up (or when a test builds an engine), never in answer to a request.
    """

    error_type = "model_load"
    http_status = 500
    grpc_code = "FAILED_PRECONDITION"


class EngineDeadError(GenerationError):
    """The engine core died (its process or its thread); every open stream receives this,
    and so does every request until the engine is back (``AsyncEngine``'s restarts)."""


#: The table: every error a client can meet, with its ``error_type``, HTTP status and gRPC
#: code as class attributes. ``rillet.client.errors`` mirrors each of these types.
ERROR_TABLE: tuple[type[RilletError], ...] = (
    ValidationError,
    PayloadTooLargeError,
    HeadersTooLargeError,
    AuthenticationError,
    NotFoundError,
    MethodNotAllowedError,
    OverloadedError,
    GenerationError,
    EngineDeadError,
    IncompleteGenerationError,
    InternalError,
    UnavailableError,
)
