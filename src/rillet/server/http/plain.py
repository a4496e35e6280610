"""``POST /?prompt=...``: the Ray Serve streaming tutorial's client, unmodified.

That client reads the answer with ``requests.post(url, stream=True).iter_content(
chunk_size=None, decode_unicode=True)``, so the answer is ``text/plain`` with one chunk per
piece of text as it is generated. The mapping is ``dialects/plain.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import Request

from rillet.server.dialects import plain
from rillet.server.generation import Generation
from rillet.server.http.body import request_options, service_of
from rillet.server.http.errors import PLAIN_ERRORS
from rillet.server.http.respond import stream_response
from rillet.server.http.sse import StreamResponse


def plain_stream(request: Request, prompt: str) -> StreamResponse:
    service = service_of(request)
    has_template = service.tokenizer.has_chat_template
    generation, _ = service.start(
        "plain",
        lambda: plain.plan(prompt, request.query_params, has_chat_template=has_template),
        request_options(request),
    )
    return stream_response(
        generation,
        _chunks(generation),
        PLAIN_ERRORS,
        media_type="text/plain; charset=utf-8",
        keep_alive=None,
        headers={"x-accel-buffering": "no", "cache-control": "no-cache"},
    )


async def _chunks(generation: Generation) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(generation.stream()) as outputs:
        async for out in outputs:
            if out.text:
                yield out.text.encode()
