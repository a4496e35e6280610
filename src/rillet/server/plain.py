"""``POST /?prompt=...``: the Ray Serve streaming tutorial's client, unmodified.

That client posts no body and reads the answer with
``requests.post(url, stream=True).iter_content(chunk_size=None, decode_unicode=True)``, so
the answer is ``text/plain`` with one chunk per token as it is generated. The prompt is
used as is (no chat template), decoding is greedy, and ``max_new_tokens`` may be given as
a query parameter too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request

from rillet.errors import ValidationError
from rillet.protocol import EngineRequest
from rillet.sampling import SamplingParams
from rillet.server.generation import outputs
from rillet.server.sse import StreamResponse, closing
from rillet.server.state import RequestTracker, ServerState, state_of

DEFAULT_MAX_NEW_TOKENS = 128


def plain_stream(request: Request, prompt: str) -> StreamResponse:
    state = state_of(request)
    tracker = state.track("plain")
    with tracker.preparing():
        raw_limit = request.query_params.get("max_new_tokens", str(DEFAULT_MAX_NEW_TOKENS))
        if not raw_limit.isdigit():
            raise ValidationError("`max_new_tokens` must be a positive integer")
        params = SamplingParams(max_new_tokens=int(raw_limit), temperature=0.0)
        engine_request = state.engine.make_request(prompt, params)
    return StreamResponse(
        _chunks(state, engine_request, tracker),
        # text/plain has no error event: the body just ends (the failure is logged).
        error_chunks=tracker.failing(lambda exc: []),
        on_close=tracker.close,
        media_type="text/plain; charset=utf-8",
        keep_alive=None,
        headers={"x-accel-buffering": "no", "cache-control": "no-cache"},
    )


async def _chunks(
    state: ServerState, request: EngineRequest, tracker: RequestTracker
) -> AsyncIterator[bytes]:
    async with closing(outputs(state.engine, request, tracker)) as stream:
        async for out in stream:
            if out.text:
                yield out.text.encode()
