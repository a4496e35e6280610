"""What the routes share: the engine, the one admission limit, metrics, and draining.

Every generation request on every route goes through :meth:`ServerState.track`, which takes
a permit from the single global limit (429 at once when none is free, never a queue: TGI's
``--max-concurrent-requests``) and returns a :class:`RequestTracker` that feeds the metrics
and gives the permit back exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from rillet.errors import OverloadedError, RilletError
from rillet.protocol import RequestOutput
from rillet.server.config import ServerConfig
from rillet.server.metrics import ServerMetrics
from rillet.server.sse import ErrorChunks

if TYPE_CHECKING:
    from rillet.engine.async_engine import AsyncEngine

log = logging.getLogger("rillet.server")


class ShuttingDownError(RilletError):
    """The server is draining after SIGINT/SIGTERM and takes no new requests (503).

    503 is used for this and for an unhealthy /health only, never for overload: some
    clients retry 503 forever.
    """

    error_type = "unavailable"
    http_status = 503
    grpc_code = "UNAVAILABLE"


class Admission:
    """A non-blocking counting limit; used from the event loop thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


class RequestTracker:
    """One admitted generation request: its permit and its metrics, closed exactly once.

    The outcome starts as ``cancelled`` (what is left if the client goes away) and becomes
    ``success`` or the error's ``error_type``.
    """

    def __init__(self, state: ServerState, route: str) -> None:
        self.state = state
        self.route = route
        self.start = time.monotonic()
        self.outcome = "cancelled"
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self._last_token_time: float | None = None
        self._queue_observed = False
        self._closed = False

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        metrics = self.state.metrics
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_generated_tokens = out.num_generated_tokens or self.num_generated_tokens
        if not self._queue_observed and out.first_scheduled_time is not None:
            self._queue_observed = True
            metrics.queue_time.observe(max(0.0, out.first_scheduled_time - self.start))
        if out.tokens:
            if self._last_token_time is None:
                metrics.time_to_first_token.observe(now - self.start)
            else:
                # Merged deltas (a slow reader) spread their gap over their tokens.
                gap = (now - self._last_token_time) / len(out.tokens)
                for _ in out.tokens:
                    metrics.inter_token_latency.observe(gap)
            self._last_token_time = now
            metrics.generated_tokens.inc(len(out.tokens))

    def succeed(self) -> None:
        self.outcome = "success"

    def fail(self, error: RilletError) -> None:
        self.outcome = error.error_type

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Wrap the work between admission and handing the tracker to a response: if it
        fails (a client error, or a bug), the failure is recorded and the permit returned."""
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, RilletError):
                self.fail(exc)
            self.close()
            raise

    def failing(self, render: Callable[[RilletError], list[bytes]]) -> ErrorChunks:
        """``render`` (a route's in-band error format) that also records the failure."""

        def render_and_record(error: RilletError) -> list[bytes]:
            self.fail(error)
            return render(error)

        return render_and_record

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state.admission.release()
        metrics = self.state.metrics
        metrics.requests.labels(self.route, self.outcome).inc()
        metrics.request_duration.observe(time.monotonic() - self.start)
        metrics.prompt_tokens.inc(self.num_prompt_tokens)


@dataclass
class ServerState:
    """Lives on ``app.state.rillet``; read by every route through :func:`state_of`."""

    engine: AsyncEngine
    config: ServerConfig
    model_name: str
    max_input_tokens: int
    max_total_tokens: int
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    admission: Admission = field(init=False)
    draining: bool = False

    def __post_init__(self) -> None:
        self.admission = Admission(self.config.max_concurrent_requests)

    def track(self, route: str) -> RequestTracker:
        """Admit a generation request or raise (OverloadedError 429, ShuttingDownError 503)."""
        if self.draining:
            self.metrics.requests.labels(route, ShuttingDownError.error_type).inc()
            raise ShuttingDownError("the server is shutting down")
        if not self.admission.try_acquire():
            self.metrics.requests.labels(route, OverloadedError.error_type).inc()
            raise OverloadedError()
        return RequestTracker(self, route)

    async def drain(self, grace_s: float, give_up: Callable[[], bool] = lambda: False) -> None:
        """Refuse new work, let requests in flight finish for ``grace_s``, then end the rest.

        Ending the rest = shutting the engine down, which pushes an error into every open
        stream (an in-band error event, then the body closes).
        """
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.admission.in_flight and time.monotonic() < deadline and not give_up():
            await asyncio.sleep(0.05)
        if self.admission.in_flight:
            log.warning("ending %d request(s) still in flight", self.admission.in_flight)
        await self.engine.shutdown()
        deadline = time.monotonic() + 2.0
        while self.admission.in_flight and time.monotonic() < deadline and not give_up():
            await asyncio.sleep(0.05)


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.rillet
    return state
