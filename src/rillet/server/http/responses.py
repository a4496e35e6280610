"""OpenAI's Responses routes: ``POST /v1/responses`` (streamed or whole) and
``GET /v1/responses/{id}`` (always 404: nothing is stored).

The dialect (``dialects/responses.py``, ``responses_render.py``) maps the body and makes the
events; here they go out as ``event: <type>`` + ``data:`` pairs, as OpenAI and vLLM send
them, with no ``[DONE]``. Errors before the stream are OpenAI's JSON shape; after it began,
the renderer's ``error`` and ``response.failed`` events, numbered in the stream's sequence
(so each request has its own :class:`~rillet.server.http.errors.ErrorFormat`).
"""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from rillet.errors import NotFoundError, RilletError
from rillet.server.dialects import responses
from rillet.server.dialects.responses_render import ResponsesRenderer
from rillet.server.http.body import (
    parse_json,
    parse_model,
    read_body,
    request_options,
    require_api_key,
    service_of,
)
from rillet.server.http.errors import OPENAI_ERRORS, rendered_by
from rillet.server.http.openapi import json_body
from rillet.server.http.respond import collect_answer, named_events, stream_response
from rillet.server.http.sse import sse_named_event

router = APIRouter(prefix="/v1/responses", route_class=rendered_by(OPENAI_ERRORS))
_auth = [Depends(require_api_key)]


@router.post("", dependencies=_auth, openapi_extra=json_body(responses.ResponsesRequest))
async def create_response(request: Request) -> Response:
    service = service_of(request)
    raw = parse_json(await read_body(request))

    def plan() -> responses.ResponsesPlan:
        return responses.plan_response(parse_model(responses.ResponsesRequest, raw))

    generation, planned = service.start("responses", plan, request_options(request))
    assert generation.request is not None
    renderer = ResponsesRenderer(
        service.model_name, planned, generation.request.request_id, generation.timing
    )
    if planned.stream:

        def failure(exc: RilletError) -> list[bytes]:
            return [sse_named_event(name, event) for name, event in renderer.failure_of(exc)]

        errors = dataclasses.replace(OPENAI_ERRORS, terminator=None, stream_events=failure)
        return stream_response(generation, named_events(generation, renderer), errors, request)
    return JSONResponse(renderer.answer(await collect_answer(request, generation)))


@router.get("/{response_id}", dependencies=_auth)
async def get_response(response_id: str) -> Response:
    """Nothing is stored (``store`` is ignored), so no response can be fetched."""
    raise NotFoundError(f"no response {response_id[:64]!r}: {responses.NOT_STORED}")
