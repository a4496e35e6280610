"""The routes' one way into the engine: stream outputs (feeding metrics) or collect them.

Both close ``AsyncEngine.generate`` deterministically (``aclosing``), so a cancelled or
abandoned consumer aborts the engine request at once instead of whenever the garbage
collector finalizes the generator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rillet.errors import IncompleteGenerationError, RilletError
from rillet.protocol import (
    EngineRequest,
    FinishReason,
    GeneratedToken,
    PromptToken,
    RequestOutput,
)
from rillet.server.sse import closing
from rillet.server.state import RequestTracker

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
