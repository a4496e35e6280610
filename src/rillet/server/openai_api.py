"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Chunks are shaped as vLLM sends them (``serving_chat.py``, ``serving_completion.py``): a
stable ``chatcmpl-``/``cmpl-`` id, a first chat chunk ``{"role":"assistant","content":""}``
sent with the first engine output, content-only deltas, ``finish_reason`` on the last one,
a ``choices: []`` usage chunk only when ``stream_options.include_usage``, then
``data: [DONE]`` (also after an in-band error).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from rillet.protocol import GeneratedToken, RequestOutput
from rillet.server.body import parse_json, parse_model, read_body, require_api_key
from rillet.server.errors import openai_error_events
from rillet.server.generation import collect_answer, outputs, stream_response
from rillet.server.openai_params import OpenAIPlan, plan_chat, plan_completion
from rillet.server.schemas import ChatCompletionRequest, CompletionRequest
from rillet.server.sse import (
    DONE,
    clean_logprob,
    closing,
    sse_event,
)
from rillet.server.state import RequestTracker, ServerState, state_of

router = APIRouter(prefix="/v1")
_auth = [Depends(require_api_key)]


class _Answer:
    """The fields every chunk and answer of one request repeats."""

    def __init__(self, state: ServerState, plan: OpenAIPlan, chat: bool) -> None:
        self.state = state
        self.plan = plan
        self.chat = chat
        rid = plan.request.request_id
        self.id = f"chatcmpl-{rid}" if chat else f"cmpl-{rid}"
        self.created = int(time.time())
        self.text_offset = len(plan.echo)

    def envelope(self, obj: str, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.state.model_name,
            **fields,
        }

    def choice(self, text: str, tokens: list[GeneratedToken], finish: str | None) -> dict[str, Any]:
        logprobs = self.logprobs(tokens) if self.plan.logprobs else None
        if self.chat:
            return {
                "index": 0,
                "delta": {"content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def logprobs(self, tokens: list[GeneratedToken]) -> dict[str, Any]:
        decode = self.state.engine.tokenizer.decode
        raw = [decode([t.id], skip_special_tokens=False) for t in tokens]
        if self.chat:  # {"content": [{token, logprob, bytes, top_logprobs}]}
            return {
                "content": [
                    {
                        **_logprob_entry(text, t.logprob),
                        "top_logprobs": [_logprob_entry(a.text, a.logprob) for a in t.top],
                    }
                    for t, text in zip(tokens, raw, strict=True)
                ]
            }
        offsets = []  # completions' legacy shape
        for t in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(t.text)
        return {
            "text_offset": offsets,
            "token_logprobs": [clean_logprob(t.logprob) for t in tokens],
            "tokens": raw,
            "top_logprobs": [{a.text: clean_logprob(a.logprob) for a in t.top} for t in tokens],
        }

    def usage(self, num_prompt: int, num_generated: int) -> dict[str, int]:
        return {
            "prompt_tokens": num_prompt,
            "completion_tokens": num_generated,
            "total_tokens": num_prompt + num_generated,
        }


def _logprob_entry(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": clean_logprob(logprob), "bytes": list(text.encode())}


async def _events(answer: _Answer, tracker: RequestTracker) -> AsyncIterator[bytes]:
    state, plan = answer.state, answer.plan
    obj = "chat.completion.chunk" if answer.chat else "text_completion"
    last: RequestOutput | None = None
    async with closing(outputs(state.engine, plan.request, tracker)) as stream:
        async for out in stream:
            text = out.text
            if last is None:
                if answer.chat:
                    delta = {"role": "assistant", "content": ""}
                    first = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
                    yield sse_event(answer.envelope(obj, choices=[first]))
                text = plan.echo + text
            last = out
            finish = out.finish_reason.to_openai() if out.finish_reason else None
            if text or finish or (plan.logprobs and out.tokens):
                choice = answer.choice(text, out.tokens, finish)
                yield sse_event(answer.envelope(obj, choices=[choice]))
    if plan.include_usage and last is not None:
        usage = answer.usage(last.num_prompt_tokens, last.num_generated_tokens)
        yield sse_event(answer.envelope(obj, choices=[], usage=usage))
    yield DONE


async def _start(request: Request, route: str, chat: bool) -> Response:
    state = state_of(request)
    raw = parse_json(await read_body(request))
    tracker = state.track(route)
    with tracker.preparing():
        if chat:
            plan = plan_chat(state, parse_model(ChatCompletionRequest, raw))
        else:
            plan = plan_completion(state, parse_model(CompletionRequest, raw))
    answer = _Answer(state, plan, chat)
    if plan.stream:
        return stream_response(state, tracker, _events(answer, tracker), openai_error_events)
    result = await collect_answer(request, state, plan.request, tracker)
    finish = result.finish_reason.to_openai()
    text = plan.echo + result.text
    choice = answer.choice(text, result.tokens, finish)
    obj = "text_completion"
    if chat:
        message = {"role": "assistant", "content": choice.pop("delta")["content"]}
        choice = {"index": 0, "message": message, **choice}
        obj = "chat.completion"
    usage = answer.usage(result.num_prompt_tokens, result.num_generated_tokens)
    return JSONResponse(answer.envelope(obj, choices=[choice], usage=usage))


@router.post("/chat/completions", dependencies=_auth)
async def chat_completions(request: Request) -> Response:
    return await _start(request, "chat_completions", chat=True)


@router.post("/completions", dependencies=_auth)
async def completions(request: Request) -> Response:
    return await _start(request, "completions", chat=False)


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state = state_of(request)
    card = {
        "id": state.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "rillet",
        "max_model_len": state.max_total_tokens,
    }
    return {"object": "list", "data": [card]}
