"""TGI's native routes: ``/generate``, ``/generate_stream``, ``/`` (compat), ``/tokenize``,
``/info``, ``/health``.

Streams follow ``router/src/server.rs::generate_stream_internal``: one event per generated
token with ``index`` from 1 (``text: ""`` while a UTF-8 character is incomplete, EOS sent
with ``special: true``), ``generated_text``/``details`` null until the last event, which
carries them; no ``[DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from rillet import __version__
from rillet.protocol import GeneratedToken, GeneratedTopToken, PromptToken
from rillet.server.body import parse_json, parse_model, read_body, require_api_key
from rillet.server.errors import tgi_error_events
from rillet.server.generation import Generation, collect_answer, outputs, stream_response
from rillet.server.plain import plain_stream
from rillet.server.schemas import GenerateRequest
from rillet.server.sse import (
    clean_logprob,
    closing,
    sse_event,
)
from rillet.server.state import RequestTracker, ServerState, state_of
from rillet.server.tgi_params import TgiPlan, plan_tgi

router = APIRouter()
_auth = [Depends(require_api_key)]


def token_json(state: ServerState, token: GeneratedToken | GeneratedTopToken) -> dict[str, Any]:
    """TGI's ``Token``. A special token shows its own text (``</s>``), as TGI streams it,
    though ``generated_text`` skips it."""
    text = token.text
    if token.special and not text:
        text = state.engine.tokenizer.decode([token.id], skip_special_tokens=False)
    return {
        "id": token.id,
        "text": text,
        "logprob": clean_logprob(token.logprob),
        "special": token.special,
    }


def _prefill_json(tokens: list[PromptToken] | None) -> list[dict[str, Any]]:
    return [{"id": t.id, "text": t.text, "logprob": clean_logprob(t.logprob)} for t in tokens or []]


async def _stream_events(
    state: ServerState, plan: TgiPlan, tracker: RequestTracker
) -> AsyncIterator[bytes]:
    index = 0
    text = ""
    async with closing(outputs(state.engine, plan.request, tracker)) as stream:
        async for out in stream:
            text += out.text
            for i, token in enumerate(out.tokens):
                index += 1
                last = out.finish_reason is not None and i == len(out.tokens) - 1
                event: dict[str, Any] = {"index": index, "token": token_json(state, token)}
                if plan.top_n_tokens:
                    event["top_tokens"] = [token_json(state, t) for t in token.top]
                event["generated_text"] = plan.prefix + text if last else None
                event["details"] = None
                if last and plan.details and out.finish_reason is not None:
                    event["details"] = {
                        "finish_reason": out.finish_reason.value,
                        "generated_tokens": out.num_generated_tokens,
                        "seed": plan.seed,
                        "input_length": out.num_prompt_tokens,
                    }
                yield sse_event(event)


async def _start(request: Request, route: str, body: GenerateRequest, stream: bool) -> Response:
    """Admit, validate, then answer: a stream, or the whole generation as JSON."""
    state = state_of(request)
    tracker = state.track(route)
    with tracker.preparing():
        plan = plan_tgi(state, body, stream=stream, full_text_default=route == "compat")
    if stream:
        return stream_response(
            state, tracker, _stream_events(state, plan, tracker), tgi_error_events
        )
    result = await collect_answer(request, state, plan.request, tracker)
    answer = _generate_response(state, plan, result)
    return JSONResponse([answer] if route == "compat" else answer, headers=_headers(tracker))


def _generate_response(state: ServerState, plan: TgiPlan, result: Generation) -> dict[str, Any]:
    answer: dict[str, Any] = {"generated_text": plan.prefix + result.text}
    if plan.details:
        details: dict[str, Any] = {
            "finish_reason": result.finish_reason.value,
            "generated_tokens": result.num_generated_tokens,
            "seed": plan.seed,
            "prefill": _prefill_json(result.prompt_tokens) if plan.decoder_input_details else [],
            "tokens": [token_json(state, t) for t in result.tokens],
        }
        if plan.top_n_tokens:
            details["top_tokens"] = [[token_json(state, a) for a in t.top] for t in result.tokens]
        answer["details"] = details
    return answer


def _headers(tracker: RequestTracker) -> dict[str, str]:
    total = time.monotonic() - tracker.start
    return {
        "x-compute-type": "rillet",
        "x-total-time": f"{total:.6f}",
        "x-prompt-tokens": str(tracker.num_prompt_tokens),
        "x-generated-tokens": str(tracker.num_generated_tokens),
    }


@router.post("/generate", dependencies=_auth)
async def generate(request: Request) -> Response:
    body = parse_model(GenerateRequest, parse_json(await read_body(request)))
    return await _start(request, "generate", body, stream=False)


@router.post("/generate_stream", dependencies=_auth)
async def generate_stream(request: Request) -> Response:
    body = parse_model(GenerateRequest, parse_json(await read_body(request)))
    return await _start(request, "generate_stream", body, stream=True)


@router.post("/", dependencies=_auth)
async def compat_generate(request: Request) -> Response:
    """TGI's ``/`` (dispatch on ``stream``; non-stream answers a JSON array), and the Ray Serve
    tutorial's ``POST /?prompt=...`` with no body, answered as streamed text/plain."""
    raw = await read_body(request)
    prompt = request.query_params.get("prompt")
    if prompt is not None and not raw.strip():
        return plain_stream(request, prompt)
    body = parse_model(GenerateRequest, parse_json(raw))
    return await _start(request, "compat", body, stream=bool(body.stream))


@router.post("/tokenize", dependencies=_auth)
async def tokenize(request: Request) -> Response:
    """``[{"id", "text", "start", "stop"}]`` with byte offsets into ``inputs``."""
    body = parse_model(GenerateRequest, parse_json(await read_body(request)))
    tokenizer = state_of(request).engine.tokenizer
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
    state = state_of(request)
    config = state.config
    return {
        "model_id": state.model_name,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": config.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": config.max_stop_sequences,
        "max_input_tokens": state.max_input_tokens,
        "max_input_length": state.max_input_tokens,
        "max_total_tokens": state.max_total_tokens,
        "max_top_n_tokens": config.max_top_n_tokens,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "rillet",
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }


@router.get("/health")
@router.get("/")
async def health(request: Request) -> Response:
    """200 with an empty body; 503 (the only 503 besides draining) when unhealthy."""
    state = state_of(request)
    if state.draining or not state.engine.is_healthy:
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, 503)
    return Response(status_code=200)
