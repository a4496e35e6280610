"""Request bodies and credentials over HTTP: every problem becomes a typed rillet error.

Routes read their body here instead of through FastAPI's body parameters, so that a bad
body (not JSON, wrong types, too big) is a :class:`~rillet.errors.ValidationError` or
:class:`~rillet.errors.PayloadTooLargeError` rendered in the route's own error format,
never FastAPI's default 422 shape or axum's text/plain.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pydantic
from starlette.requests import Request

from rillet.errors import PayloadTooLargeError, ValidationError
from rillet.server.auth import bearer_token
from rillet.server.deadlines import RequestOptions
from rillet.server.dialects.fields import first_problem, json_loads
from rillet.server.service import GenerationService

M = TypeVar("M", bound=pydantic.BaseModel)

#: An oversized body is still read (and dropped) up to this many bytes, so the client gets
#: to read our 413 instead of a connection reset in the middle of its upload.
_DRAIN_LIMIT = 16 << 20


async def read_body(request: Request) -> bytes:
    """The raw body, refused with 413 over the configured limit."""
    limit = service_of(request).config.max_body_bytes
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    body = bytearray()
    async for chunk in request.stream():
        if len(body) <= _DRAIN_LIMIT:
            body += chunk
        if len(body) > limit:
            too_large = True
            if len(body) > _DRAIN_LIMIT:
                break
    if too_large:
        raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
    return bytes(body)


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object. The content-type is not checked (``curl -d`` sends a form
    type) and an empty body is a validation error."""
    if not body.strip():
        raise ValidationError("the request body is empty; expected a JSON object")
    try:
        data = json_loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(f"Failed to parse the request body as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError("the request body must be a JSON object")
    return data


def parse_model(model: type[M], data: dict[str, Any]) -> M:
    """Validate ``data`` against a pydantic model; the first problem becomes the message."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ValidationError(
            "Failed to deserialize the JSON body into the target type: "
            + first_problem(exc, "body")
        ) from None


def request_options(request: Request) -> RequestOptions:
    """The deadlines and timing a request's ``X-Rillet-*`` headers ask for (every HTTP door)."""
    return RequestOptions.from_headers(request.headers)


def service_of(request: Request) -> GenerationService:
    """The app's one generation service (``create_app`` puts it on ``app.state``)."""
    service: GenerationService = request.app.state.rillet
    return service


async def require_api_key(request: Request) -> None:
    """FastAPI dependency of the generation routes: ``Authorization: Bearer <key>``."""
    service_of(request).check_key(bearer_token(request.headers.get("authorization")))
