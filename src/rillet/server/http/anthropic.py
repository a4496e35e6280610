"""Anthropic's routes: ``POST /v1/messages`` (streamed or whole) and
``POST /v1/messages/count_tokens``.

The dialect (``dialects/anthropic.py``, ``anthropic_render.py``) maps bodies and shapes the
events; these routes move them over HTTP and SSE with an ``event:`` line on every event
(Anthropic's SDK reads the name, not the data's ``type``), ``ping`` as the keep-alive, and
errors in Anthropic's shape (an ``error`` event once streaming). The key comes in
``x-api-key`` (the SDK's header) or ``Authorization: Bearer``; ``anthropic-version`` is
accepted whatever it says.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from rillet.server.auth import presented_key
from rillet.server.dialects import anthropic
from rillet.server.dialects.anthropic_render import PING, AnthropicRenderer
from rillet.server.http.body import parse_json, parse_model, read_body, request_options, service_of
from rillet.server.http.errors import ANTHROPIC_ERRORS, rendered_by
from rillet.server.http.openapi import json_body
from rillet.server.http.respond import collect_answer, named_events, stream_response
from rillet.server.http.sse import sse_named_event

router = APIRouter(prefix="/v1/messages", route_class=rendered_by(ANTHROPIC_ERRORS))


async def require_key(request: Request) -> None:
    """FastAPI dependency: ``x-api-key`` or ``Authorization: Bearer``, when a key is set."""
    service_of(request).check_key(presented_key(request.headers))


_auth = [Depends(require_key)]
KEEP_ALIVE = sse_named_event(*PING)


@router.post("", dependencies=_auth, openapi_extra=json_body(anthropic.MessagesRequest))
async def messages(request: Request) -> Response:
    service = service_of(request)
    raw = parse_json(await read_body(request))

    def plan() -> anthropic.AnthropicPlan:
        return anthropic.plan_messages(parse_model(anthropic.MessagesRequest, raw))

    generation, planned = service.start("messages", plan, request_options(request))
    assert generation.request is not None
    renderer = AnthropicRenderer(
        service.model_name,
        generation.request.request_id,
        len(generation.request.prompt_token_ids),
        planned.tools,
        generation.timing,
    )
    if planned.stream:
        return stream_response(
            generation,
            named_events(generation, renderer),
            ANTHROPIC_ERRORS,
            request,
            keep_alive=KEEP_ALIVE,
        )
    return JSONResponse(renderer.answer(await collect_answer(request, generation)))


@router.post(
    "/count_tokens", dependencies=_auth, openapi_extra=json_body(anthropic.CountTokensRequest)
)
async def count_tokens(request: Request) -> dict[str, Any]:
    """``{"input_tokens": n}``: the prompt as ``/v1/messages`` would render it."""
    service = service_of(request)
    body = parse_model(anthropic.CountTokensRequest, parse_json(await read_body(request)))
    chat, _ = anthropic.prompt_of(body)
    return {"input_tokens": service.count_prompt_tokens(chat)}
