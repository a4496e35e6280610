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
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from rillet.engine.inputs import check_params, check_token_ids, new_request
from rillet.errors import (
    OverloadedError,
    RilletError,
    UnavailableError,
    ValidationError,
)
from rillet.protocol import EngineRequest, RequestOutput
from rillet.sampling import SamplingParams
from rillet.server.auth import check_api_key
from rillet.server.config import ServerConfig
from rillet.server.deadlines import (
    QueueStats,
    RequestOptions,
    predict_first_token_s,
    retry_after_s,
)
from rillet.server.generation import Generation
from rillet.server.limits import TokenLimits
from rillet.server.metrics import EngineStatsLike, ServerMetrics
from rillet.server.resumable import ResumeLimits, StreamStore
from rillet.server.sampling_defaults import SamplingDefaults
from rillet.server.spec import ChatPrompt, GenerationSpec

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
        self,
        request: EngineRequest,
        max_buffer_bytes: int | None = None,
        max_hold_steps: int = 1,
    ) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs; a reader that leaves more than ``max_buffer_bytes``
        waiting is given up, and a busy host may merge up to ``max_hold_steps`` steps into
        one output (``AsyncEngine.generate``)."""
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
