"""OpenAI's routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

The dialect (``dialects/openai.py`` and ``openai_render.py``) maps bodies and shapes the
chunks; these routes move them over HTTP and SSE, ending every stream with
``data: [DONE]`` (also after an in-band error).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from rillet.protocol import RequestOutput
from rillet.server.dialects import openai
from rillet.server.dialects.openai_render import OpenAIRenderer
from rillet.server.generation import Generation
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
from rillet.server.http.respond import collect_answer, stream_response
from rillet.server.http.sse import DONE, sse_event

router = APIRouter(prefix="/v1", route_class=rendered_by(OPENAI_ERRORS))
_auth = [Depends(require_api_key)]


async def _events(generation: Generation, renderer: OpenAIRenderer) -> AsyncIterator[bytes]:
    last: RequestOutput | None = None
    async with contextlib.aclosing(generation.stream()) as outputs:
        async for out in outputs:
            last = out
            for chunk in renderer.chunks(out):
                yield sse_event(chunk)
    if renderer.plan.include_usage and last is not None:
        yield sse_event(renderer.usage_chunk(last))
    yield DONE


async def _start(request: Request, route: str, chat: bool) -> Response:
    service = service_of(request)
    raw = parse_json(await read_body(request))

    def plan() -> openai.OpenAIPlan:
        if chat:
            return openai.plan_chat(parse_model(openai.ChatCompletionRequest, raw))
        body = parse_model(openai.CompletionRequest, raw)
        return openai.plan_completion(body, service.tokenizer)

    generation, planned = service.start(route, plan, request_options(request))
    assert generation.request is not None
    renderer = OpenAIRenderer(
        service.tokenizer,
        service.model_name,
        planned,
        generation.request.request_id,
        generation.timing,
    )
    if planned.stream:
        return stream_response(generation, _events(generation, renderer), OPENAI_ERRORS, request)
    return JSONResponse(renderer.answer(await collect_answer(request, generation)))


@router.post(
    "/chat/completions",
    dependencies=_auth,
    openapi_extra=json_body(openai.ChatCompletionRequest),
)
async def chat_completions(request: Request) -> Response:
    return await _start(request, "chat_completions", chat=True)


@router.post("/completions", dependencies=_auth, openapi_extra=json_body(openai.CompletionRequest))
async def completions(request: Request) -> Response:
    return await _start(request, "completions", chat=False)


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    service = service_of(request)
    card = {
        "id": service.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "rillet",
        "max_model_len": service.limits.max_total_tokens,
    }
    return {"object": "list", "data": [card]}
