"""The generation service: the one recipe under every front door.

A door (HTTP routes, the WebSocket, gRPC) reads its frames, lets its dialect turn them into
a :class:`~rillet.server.spec.GenerationSpec`, and calls :meth:`GenerationService.start`:

    admit (one count, one draining state: 429 ``overloaded`` / 503 ``unavailable``)
      -> plan (the dialect) -> tokenize, chat template, token limits
      -> the queue deadline: 429 ``overloaded`` if the first token cannot come in time
      -> run: the door's work over the engine's outputs, on a task the generation owns
      -> the permit comes back exactly once, when that task is done, however it ended

Nothing here imports Starlette, SSE, WebSocket or gRPC code: the door renders what comes
out (outputs and :class:`~rillet.errors.RilletError`\\ s) in its own format.

Cancellation has one path: a door cancels the task :meth:`Generation.run` started (a
disconnect, a cancel frame, a cancelled RPC), the ``CancelledError`` closes the engine's
generator, and ``AsyncEngine.generate`` aborts the request before the engine's next step.

No door returns a permit: the task's done callback does, and a task's done callbacks run
once whatever ended it: its work finishing or failing, a cancel that lands before its first
step (where a ``finally`` in the work would never run), or a second cancel while it cleans
up. Three leaks and double closes, each in one door's own ``finally``, led here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from rillet.engine.inputs import check_params, check_token_ids, new_request
from rillet.errors import (
    IncompleteGenerationError,
    OverloadedError,
    RilletError,
    UnavailableError,
    ValidationError,
)
from rillet.protocol import EngineRequest, FinishReason, RequestOutput
from rillet.sampling import SamplingParams
from rillet.server.auth import check_api_key
from rillet.server.config import ServerConfig
from rillet.server.deadlines import (
    TIMEOUT_DETAIL,
    QueueStats,
    RequestOptions,
    predict_first_token_s,
    retry_after_s,
)
from rillet.server.limits import TokenLimits
from rillet.server.metrics import EngineStatsLike, ServerMetrics
from rillet.server.resumable import ResumeLimits, StreamStore
from rillet.server.sampling_defaults import SamplingDefaults
from rillet.server.spec import ChatPrompt, GenerationSpec
from rillet.server.timing import StreamTiming

if TYPE_CHECKING:
    from rillet.tokenizer import Tokenizer

log = logging.getLogger("rillet.server")


class ServiceStats(EngineStatsLike, QueueStats, Protocol):
    """What the service reads of ``engine.stats()``: the gauges and the queue's measures."""


class EngineLike(Protocol):
    """What the service needs of an engine: ``AsyncEngine``, or a fake in unit tests."""

    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    #: The model's vocabulary: every prompt token id is below it.
    vocab_size: int
    #: The model's own sampling defaults (generation_config.json names).
    generation_defaults: Mapping[str, Any]

    def generate(
        self, request: EngineRequest, max_buffer_bytes: int | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs; a reader that leaves more than ``max_buffer_bytes``
        waiting is given up (``AsyncEngine.generate``)."""
        ...

    def stats(self) -> ServiceStats: ...

    @property
    def is_healthy(self) -> bool: ...

    @property
    def restarts(self) -> int:
        """Times the core died and came back."""
        ...

    async def shutdown(self, timeout: float = 10.0) -> None: ...


class HasSpec(Protocol):
    @property
    def spec(self) -> GenerationSpec: ...


P = TypeVar("P", bound=HasSpec)
T = TypeVar("T")


class GenerationService:
    """One engine, one admission count, one set of limits and metrics, for every door."""

    def __init__(
        self, engine: EngineLike, config: ServerConfig, metrics: ServerMetrics | None = None
    ) -> None:
        self.engine = engine
        self.config = config
        self.model_name = config.served_model_name or engine.model_name
        self.limits = TokenLimits.resolve(
            config.max_input_tokens, config.max_total_tokens, engine.max_model_len
        )
        self.sampling_defaults = SamplingDefaults(
            config.default_sampling, engine.generation_defaults
        )
        self.metrics = metrics or ServerMetrics()
        self.limit = config.max_concurrent_requests
        #: Admitted generations not yet closed, on every door (``--max-concurrent-requests``).
        self.in_flight = 0
        self.draining = False
        #: Resumable streams (the HTTP door's ``X-Rillet-Resumable``), for every replica
        #: of the app over this service.
        self.streams = StreamStore(
            ResumeLimits(
                config.resume_window_s, config.max_resume_bytes, config.max_resume_stream_bytes
            )
        )
        self.metrics.watch_streams(self.streams)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def is_ready(self) -> bool:
        """False while draining or when the engine is down (``/health`` says 503)."""
        return not self.draining and self.engine.is_healthy

    def check_key(self, presented: str | None) -> None:
        """AuthenticationError unless ``presented`` is the configured key (if any)."""
        check_api_key(presented, self.config.api_key)

    # ---- the recipe -------------------------------------------------------------------

    def admit(self, route: str) -> Generation:
        """Take a permit or refuse at once: UnavailableError (503) while draining,
        OverloadedError (429) at the limit. Never a queue."""
        error: RilletError | None = None
        if self.draining:
            error = UnavailableError("the server is shutting down")
        elif self.in_flight >= self.limit:
            error = OverloadedError()
        if error is not None:
            self.metrics.requests.labels(route, error.error_type).inc()
            raise error
        self.in_flight += 1
        return Generation(self, route)

    def start(
        self, route: str, plan: Callable[[], P], options: RequestOptions | None = None
    ) -> tuple[Generation, P]:
        """Admit, then run the dialect's ``plan``, build its engine request and check that
        the queue can meet the request's deadline (``options``, else the server's).

        A plan that fails (bad input) is recorded and its permit returned before the error
        propagates to the door. Otherwise the door hands its work to :meth:`Generation.run`
        next, with nothing in between that can fail.
        """
        generation = self.admit(route)
        try:
            generation.set_options(options or RequestOptions())
            planned = plan()
            generation.request = self.build_request(planned.spec)
            self._check_queue(generation)
        except BaseException as exc:
            if isinstance(exc, RilletError):
                generation.fail(exc)
            generation._release()
            raise
        return generation, planned

    def build_request(self, spec: GenerationSpec) -> EngineRequest:
        """Check a client's request and build its engine request: every check a request
        meets, in the client's words (``spec.names``), before the engine sees it.

        In order: the shape (stop sequences, messages), the token cap, the prompt (tokenized,
        with the chat template for messages, truncated, never empty), the token limits (which
        fill an unset cap), the sampling fields, the token ids against the vocabulary. The
        configured limits are below the engine's context, so the engine's own guard never
        speaks to a client. ``spec`` is left as the dialect made it: the params with the
        server's defaults and the cap filled in are new values, carried by the request.
        """
        names = spec.names
        params = self.sampling_defaults.apply(spec.params, spec.unset)
        self._check_shape(spec, params)
        self.limits.check_cap(params, names)
        prompt = spec.prompt
        if isinstance(prompt, ChatPrompt):
            ids = self._render_chat(prompt, params)
        elif isinstance(prompt, str):
            if not prompt:
                raise ValidationError(f"`{names.prompt}` cannot be empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if spec.truncate is not None:
            self.limits.check_truncate(spec.truncate, names)
            ids = ids[-spec.truncate :]
        if not ids:
            raise ValidationError(f"`{names.prompt}` cannot be empty")
        params = self.limits.apply(len(ids), params, names)
        check_params(params)
        check_token_ids(ids, self.engine.vocab_size)
        return new_request(ids, params)

    def count_prompt_tokens(self, chat: ChatPrompt) -> int:
        """The tokens ``chat`` takes as :meth:`build_request` renders it (the chat template
        applied), for ``count_tokens`` routes: nothing is admitted or run."""
        if len(chat.messages) > self.config.max_messages:
            raise ValidationError(
                f"`messages` may hold at most {self.config.max_messages} messages. "
                f"Given: {len(chat.messages)}"
            )
        return len(self._render_chat(chat, SamplingParams()))

    def _check_queue(self, generation: Generation) -> None:
        """OverloadedError now if the engine's queue predicts the first token after the
        request's deadline; ``retry-after`` is the time the queue needs to drain enough."""
        budget = generation.max_queue_s
        if budget is None:
            return
        predicted = self.predict_first_token_s(generation)
        if predicted is not None and predicted > budget:
            raise OverloadedError(
                f"the first token is predicted after {predicted * 1000:.0f} ms, past the "
                f"request's {budget * 1000:.0f} ms (max_queue_ms)",
                retry_after_s(predicted, budget),
            )

    def predict_first_token_s(self, generation: Generation) -> float | None:
        """When the queue as it is now would give ``generation`` its first token."""
        assert generation.request is not None
        return predict_first_token_s(self.engine.stats(), len(generation.request.prompt_token_ids))

    def _check_shape(self, spec: GenerationSpec, params: SamplingParams) -> None:
        """What a request may carry besides tokens, the same on every door: stop sequences
        (TGI's limit of 4, which OpenAI's API also has), a constraint's size and messages.
        The stop-string check runs on every detokenized piece, so the longest one bounds its
        work."""
        config, stop = self.config, params.stop
        if len(stop) > config.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {config.max_stop_sequences} stop sequences. "
                f"Given: {len(stop)}"
            )
        longest = max(map(len, stop), default=0)
        if longest > config.max_stop_length:
            raise ValidationError(
                f"a stop sequence may have at most {config.max_stop_length} characters. "
                f"Given: {longest}"
            )
        constraint = params.constraint
        if constraint is not None and constraint.size > config.max_grammar_length:
            raise ValidationError(
                f"a {constraint.kind.value} constraint may have at most "
                f"{config.max_grammar_length} characters. Given: {constraint.size}"
            )
        chat = spec.prompt
        if isinstance(chat, ChatPrompt) and len(chat.messages) > config.max_messages:
            raise ValidationError(
                f"`messages` may hold at most {config.max_messages} messages. "
                f"Given: {len(chat.messages)}"
            )

    def _render_chat(self, chat: ChatPrompt, params: SamplingParams) -> list[int]:
        messages = list(chat.messages)
        while True:
            text = self.tokenizer.apply_chat_template(
                messages, chat.add_generation_prompt, tools=chat.tools
            )
            # The template already carries BOS where the model wants one (as transformers).
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if not chat.drop_oldest_turns or self.limits.fits(len(ids), params.max_new_tokens):
                return ids
            shorter = _without_oldest_turn(messages)
            if shorter is None:
                return ids  # only the last turn is left: the limit check will refuse it
            messages = shorter

    # ---- lifecycle --------------------------------------------------------------------

    def render_metrics(self) -> bytes:
        return self.metrics.render(self.engine.stats(), self.in_flight, self.engine.restarts)

    async def drain(self, grace_s: float, give_up: Callable[[], bool] = lambda: False) -> None:
        """Refuse new work, let requests in flight finish for ``grace_s``, then end the rest.

        Ending the rest = shutting the engine down, which ends every open stream with an
        IncompleteGenerationError (each door renders it in-band).
        """
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.in_flight and time.monotonic() < deadline and not give_up():
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("ending %d request(s) still in flight", self.in_flight)
        await self.engine.shutdown()
        deadline = time.monotonic() + 2.0
        while self.in_flight and time.monotonic() < deadline and not give_up():
            await asyncio.sleep(0.05)


def _without_oldest_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """``messages`` without the oldest non-system turn (a user message and the assistant
    reply after it go together, so roles keep alternating), or None if only the last turn
    is left."""
    turns = [i for i, m in enumerate(messages) if m.get("role") != "system"]
    if len(turns) <= 1:
        return None
    first = turns[0]
    drop = {first}
    if messages[first].get("role") == "user" and len(turns) > 2:
        following = turns[1]
        if messages[following].get("role") == "assistant":
            drop.add(following)
    return [m for i, m in enumerate(messages) if i not in drop]


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

    async def stream(self) -> AsyncGenerator[RequestOutput, None]:
        """The engine's outputs for this request, observed for metrics.

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
            bound = self.service.config.max_stream_buffer_bytes
            outputs_of = self.service.engine.generate(self.request, max_buffer_bytes=bound)
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
