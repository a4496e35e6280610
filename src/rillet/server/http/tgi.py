"""TGI's routes: ``/generate``, ``/generate_stream``, ``/`` (compat), ``/tokenize``,
``/info``, ``/health``. The dialect (``dialects/tgi.py``) maps bodies and shapes the JSON;
these routes move it over HTTP and SSE (no ``[DONE]`` on TGI streams)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from rillet import __version__
from rillet.server.dialects import tgi
from rillet.server.generation import Generation
from rillet.server.http.body import (
    parse_json,
    parse_model,
    read_body,
    request_options,
    require_api_key,
    service_of,
)
from rillet.server.http.errors import TGI_ERRORS, rendered_by
from rillet.server.http.openapi import json_body
from rillet.server.http.plain import plain_stream
from rillet.server.http.respond import collect_answer, stream_response
from rillet.server.http.sse import sse_event

router = APIRouter(route_class=rendered_by(TGI_ERRORS))
_auth = [Depends(require_api_key)]
_body = json_body(tgi.GenerateRequest)


async def _events(generation: Generation, renderer: tgi.TgiRenderer) -> AsyncIterator[bytes]:
    # One event per token, merged or not: holding tokens back would only delay them.
    async with contextlib.aclosing(generation.stream(merge=False)) as outputs:
        async for out in outputs:
            for event in renderer.events(out):
                yield sse_event(event)


async def _start(request: Request, route: str, body: tgi.GenerateRequest, stream: bool) -> Response:
    """Admit, validate, then answer: a stream, or the whole generation as JSON."""
    service = service_of(request)
    generation, plan = service.start(
        route,
        lambda: tgi.plan(body, service.config, stream=stream, full_text_default=route == "compat"),
        request_options(request),
    )
    renderer = tgi.TgiRenderer(service.tokenizer, plan, generation.timing)
    if stream:
        return stream_response(generation, _events(generation, renderer), TGI_ERRORS, request)
    answer = renderer.answer(await collect_answer(request, generation))
    return JSONResponse([answer] if route == "compat" else answer, headers=_headers(generation))


def _headers(generation: Generation) -> dict[str, str]:
    total = time.monotonic() - generation.start_time
    return {
        "x-compute-type": "rillet",
        "x-total-time": f"{total:.6f}",
        "x-prompt-tokens": str(generation.num_prompt_tokens),
        "x-generated-tokens": str(generation.num_generated_tokens),
    }


@router.post("/generate", dependencies=_auth, openapi_extra=_body)
async def generate(request: Request) -> Response:
    body = parse_model(tgi.GenerateRequest, parse_json(await read_body(request)))
    return await _start(request, "generate", body, stream=False)


@router.post("/generate_stream", dependencies=_auth, openapi_extra=_body)
async def generate_stream(request: Request) -> Response:
    body = parse_model(tgi.GenerateRequest, parse_json(await read_body(request)))
    return await _start(request, "generate_stream", body, stream=True)


@router.post("/", dependencies=_auth, openapi_extra=_body)
async def compat_generate(request: Request) -> Response:
    """TGI's ``/`` (dispatch on ``stream``; non-stream answers a JSON array), and the Ray Serve
    tutorial's ``POST /?prompt=...`` with no body, answered as streamed text/plain."""
    raw = await read_body(request)
    prompt = request.query_params.get("prompt")
    if prompt is not None and not raw.strip():
        return plain_stream(request, prompt)
    body = parse_model(tgi.GenerateRequest, parse_json(raw))
    return await _start(request, "compat", body, stream=bool(body.stream))


@router.post("/tokenize", dependencies=_auth, openapi_extra=_body)
async def tokenize(request: Request) -> Response:
    """``[{"id", "text", "start", "stop"}]`` with byte offsets into ``inputs``."""
    body = parse_model(tgi.GenerateRequest, parse_json(await read_body(request)))
    tokenizer = service_of(request).tokenizer
    encoding = tokenizer.backend.encode(body.inputs, add_special_tokens=True)
    char_to_byte = _char_to_byte_offsets(body.inputs)
    return JSONResponse(
        [
            {
                "id": token_id,
                "text": body.inputs[start:stop],
                "start": char_to_byte[start],
                "stop": char_to_byte[stop],
            }
            for token_id, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True)
        ]
    )


def _char_to_byte_offsets(text: str) -> list[int]:
    offsets = [0]
    for ch in text:
        offsets.append(offsets[-1] + len(ch.encode()))
    return offsets


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    service = service_of(request)
    config = service.config
    return {
        "model_id": service.model_name,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": config.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": config.max_stop_sequences,
        "max_input_tokens": service.limits.max_input_tokens,
        "max_input_length": service.limits.max_input_tokens,
        "max_total_tokens": service.limits.max_total_tokens,
        "max_top_n_tokens": config.max_top_n_tokens,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "rillet",
        "version": __version__,
        "sha": None,
        "docker_label": None,
        # rillet's own: the defaults a request's unset sampling fields get, and their source.
        "sampling_defaults": service.sampling_defaults.describe(),
    }


@router.get("/health")
async def health(request: Request) -> Response:
    """200 with an empty body; 503 (draining, or the engine is down) when unhealthy. Also
    ``GET /`` for clients that are not browsers (``page.py``)."""
    if not service_of(request).is_ready:
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, 503)
    return Response(status_code=200)
