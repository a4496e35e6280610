"""One admitted generation: its engine request, its deadlines, its metrics and its permit.

:class:`~rillet.server.service.GenerationService` admits and plans it; a door hands its work
to :meth:`Generation.run`, whose task's end returns the permit, however it ended (see the
service's module docstring for why a done callback and not a ``finally``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from rillet.errors import (
    IncompleteGenerationError,
    OverloadedError,
    RilletError,
)
from rillet.protocol import EngineRequest, FinishReason, RequestOutput
from rillet.server.deadlines import TIMEOUT_DETAIL, RequestOptions, retry_after_s
from rillet.server.timing import StreamTiming

if TYPE_CHECKING:
    from rillet.server.service import GenerationService

T = TypeVar("T")


class Generation:
    """One admitted generation: its engine request, its metrics and its permit.

    A door runs its work over :meth:`stream` or :meth:`collect` with :meth:`run`, once; the
    permit comes back when that task is done. The outcome starts as ``cancelled`` (what is
    left if the consumer goes away) and becomes ``success``, ``timeout`` or the error's
    ``error_type``.

    Deadlines count from admission: ``max_queue_s`` for the first token (else the stream
    fails with OverloadedError, in-band if it has begun), ``timeout_s`` for the whole
    request (then it ends with what it has: finish reason ``length``, detail ``timeout``).
    """

    def __init__(self, service: GenerationService, route: str) -> None:
        self.service = service
        self.route = route
        self.request: EngineRequest | None = None
        self.start_time = time.monotonic()
        self.outcome = "cancelled"
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self._last_token_time: float | None = None
        self._queue_observed = False
        self._task: asyncio.Task[Any] | None = None
        self._released = False
        self.max_queue_s: float | None = None
        self.timeout_s: float | None = None
        #: Per-event server timing, when the request asked (``X-Rillet-Timing: 1``); the
        #: door's renderer stamps each event with it (``server/timing.py``).
        self.timing: StreamTiming | None = None

    def set_options(self, options: RequestOptions) -> None:
        """The request's deadlines and timing, the server's defaults where it set none."""
        config = self.service.config
        queue_ms = options.max_queue_ms or config.max_queue_ms
        self.max_queue_s = None if queue_ms is None else queue_ms / 1000
        self.timeout_s = (
            options.timeout_ms / 1000 if options.timeout_ms else config.request_timeout_s
        )
        self.timing = StreamTiming(self.start_time) if options.timing else None

    def run(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` (the door's use of :meth:`stream` or :meth:`collect`) on a task
        whose end, however it comes, returns the permit and records the request.

        Cancelling the task is the one way to give the generation up: it aborts the request
        in the engine before the engine's next step. Awaiting the task from a coroutine that
        is cancelled cancels it too.
        """
        if self._task is not None:
            work.close()
            raise RuntimeError("a generation runs once")
        task = asyncio.ensure_future(work)
        self._task = task
        task.add_done_callback(lambda _: self._release())
        return task

    async def stream(self, merge: bool = True) -> AsyncGenerator[RequestOutput, None]:
        """The engine's outputs for this request, observed for metrics.

        ``merge``: when the host is busy, the tokens of up to ``--max-merge-steps`` engine
        steps may come as one output (``engine/pacing.py``); False for a door that sends one
        event per token anyway (TGI's stream), where holding would only delay them.

        Raises the request's error (a RilletError) in place of the next output. An abort the
        consumer did not ask for (the engine's own) is an IncompleteGenerationError.
        """
        assert self.request is not None, "start() builds the request"
        if self._task is None:  # its permit would never come back
            raise RuntimeError("a generation's outputs are read inside Generation.run")
        timed_out = False
        try:
            # Closed at once, not when the garbage collector gets to it: closing the
            # engine's generator is what aborts the request in the engine.
            config = self.service.config
            outputs_of = self.service.engine.generate(
                self.request,
                max_buffer_bytes=config.max_stream_buffer_bytes,
                max_hold_steps=config.max_merge_steps if merge else 1,
            )
            async with contextlib.aclosing(outputs_of) as outputs:
                while True:
                    wait_s, first_token_due = self._next_deadline()
                    try:
                        # Only the wait for the engine is timed, never the consumer's turn:
                        # a timeout cancels that wait, which aborts the request (the one
                        # cancellation path), and the generator is closed below.
                        async with asyncio.timeout(wait_s):
                            out = await anext(outputs)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        if first_token_due:
                            raise self._late_first_token() from None
                        timed_out = True
                        break
                    self._observe(out)
                    if out.finish_reason is FinishReason.ABORT:
                        raise IncompleteGenerationError("the request was aborted by the engine")
                    yield out
        except RilletError as exc:
            self.fail(exc)
            raise
        if timed_out:
            self.outcome = "timeout"
            yield self._timeout_output()
        else:
            self.outcome = "success"

    async def collect(self) -> RequestOutput:
        """Run the request to its end; every output merged into one."""
        merged: RequestOutput | None = None
        async with contextlib.aclosing(self.stream()) as outputs:
            async for out in outputs:
                if merged is None:
                    merged = out
                else:
                    merged.merge(out)
        assert merged is not None, "a finished stream has at least its final output"
        return merged

    def fail(self, error: RilletError) -> None:
        self.outcome = error.error_type

    def _next_deadline(self) -> tuple[float | None, bool]:
        """Seconds to wait for the next output (None: no limit), and whether the first
        token's deadline is the one that ends that wait."""
        now = time.monotonic()
        ends = self.start_time + self.timeout_s if self.timeout_s is not None else None
        if self.max_queue_s is not None and self._last_token_time is None:
            first_due = self.start_time + self.max_queue_s
            if ends is None or first_due < ends:
                return max(0.0, first_due - now), True
        return (None if ends is None else max(0.0, ends - now)), False

    def _late_first_token(self) -> OverloadedError:
        assert self.max_queue_s is not None
        predicted = self.service.predict_first_token_s(self)
        retry = 1 if predicted is None else retry_after_s(predicted, self.max_queue_s)
        return OverloadedError(
            f"no first token within {self.max_queue_s * 1000:.0f} ms (max_queue_ms)", retry
        )

    def _timeout_output(self) -> RequestOutput:
        """The end of a request its timeout stopped: no new tokens, ``length``, ``timeout``."""
        assert self.request is not None
        return RequestOutput(
            request_id=self.request.request_id,
            tokens=[],
            text="",
            finish_reason=FinishReason.LENGTH,
            num_prompt_tokens=self.num_prompt_tokens or len(self.request.prompt_token_ids),
            num_generated_tokens=self.num_generated_tokens,
            finish_detail=TIMEOUT_DETAIL,
        )

    def _release(self) -> None:
        """Return the permit and record the request: once, from :meth:`run`'s task's done
        callback (or from the service, for a plan that failed)."""
        if self._released:
            return
        self._released = True
        service = self.service
        service.in_flight -= 1
        metrics = service.metrics
        metrics.requests.labels(self.route, self.outcome).inc()
        metrics.request_duration.observe(time.monotonic() - self.start_time)
        metrics.prompt_tokens.inc(self.num_prompt_tokens)

    def _observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        metrics = self.service.metrics
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_generated_tokens = out.num_generated_tokens or self.num_generated_tokens
        if not self._queue_observed and out.first_scheduled_time is not None:
            self._queue_observed = True
            metrics.queue_time.observe(max(0.0, out.first_scheduled_time - self.start_time))
        if out.tokens:
            if self._last_token_time is None:
                metrics.time_to_first_token.observe(now - self.start_time)
            else:
                # Merged deltas (a slow reader) spread their gap over their tokens.
                gap = (now - self._last_token_time) / len(out.tokens)
                for _ in out.tokens:
                    metrics.inter_token_latency.observe(gap)
            self._last_token_time = now
            metrics.generated_tokens.inc(len(out.tokens))
