"""The routes' one way into the engine: stream outputs (feeding metrics) or collect them.

Both close ``AsyncEngine.generate`` deterministically (``aclosing``), so a cancelled or
abandoned consumer aborts the engine request at once instead of whenever the garbage
collector finalizes the generator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from rillet.errors import IncompleteGenerationError, RilletError
from rillet.protocol import (
    EngineRequest,
    FinishReason,
    GeneratedToken,
    PromptToken,
    RequestOutput,
)
from rillet.server.sse import StreamResponse, cancel_on_disconnect, closing
from rillet.server.state import RequestTracker, ServerState

if TYPE_CHECKING:
    from rillet.engine.async_engine import AsyncEngine


@dataclass
class Generation:
    """Everything one request produced, merged (the non-streaming answer)."""

    text: str = ""
    tokens: list[GeneratedToken] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.LENGTH
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    prompt_tokens: list[PromptToken] | None = None


async def outputs(
    engine: AsyncEngine, request: EngineRequest, tracker: RequestTracker
) -> AsyncIterator[RequestOutput]:
    """``engine.generate(request)`` with metrics and a definite outcome for the tracker.

    An engine-side abort (never asked for by this consumer) is reported as an incomplete
    generation rather than passed on as a normal finish.
    """
    try:
        async with closing(engine.generate(request)) as stream:
            async for out in stream:
                tracker.observe(out)
                if out.finish_reason is FinishReason.ABORT:
                    raise IncompleteGenerationError("the request was aborted by the engine")
                yield out
        tracker.succeed()
    except RilletError as exc:
        tracker.fail(exc)
        raise


async def collect(
    engine: AsyncEngine, request: EngineRequest, tracker: RequestTracker
) -> Generation:
    """Run ``request`` to the end and merge its outputs."""
    result = Generation()
    async with closing(outputs(engine, request, tracker)) as stream:
        async for out in stream:
            result.text += out.text
            result.tokens.extend(out.tokens)
            result.num_prompt_tokens = out.num_prompt_tokens or result.num_prompt_tokens
            result.num_generated_tokens = out.num_generated_tokens
            if out.prompt_tokens is not None:
                result.prompt_tokens = out.prompt_tokens
            if out.finish_reason is not None:
                result.finish_reason = out.finish_reason
    return result


def stream_response(
    state: ServerState,
    tracker: RequestTracker,
    chunks: AsyncIterator[bytes],
    render_error: Callable[[RilletError], list[bytes]],
) -> StreamResponse:
    """A route's streamed answer: its errors rendered in the route's own format, the
    tracker (and its concurrency permit) closed when the stream ends or the client leaves.
    """
    return StreamResponse(
        chunks,
        error_chunks=tracker.failing(render_error),
        on_close=tracker.close,
        keep_alive_interval=state.config.keep_alive_interval_s,
    )


async def collect_answer(
    request: Request, state: ServerState, engine_request: EngineRequest, tracker: RequestTracker
) -> Generation:
    """A route's whole answer; a client that disconnects first cancels it. Closes the tracker."""
    try:
        return await cancel_on_disconnect(request, collect(state.engine, engine_request, tracker))
    finally:
        tracker.close()
