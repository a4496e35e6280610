"""AsyncEngine: the engine on its own thread, streams out through per-request collectors.

The event loop never runs the model: ``generate()`` hands a request to the engine thread
through a command queue and then awaits its collector. The engine thread loops
``drain commands -> core.step() -> detokenize -> hand outputs to the loop`` and sleeps
when there is nothing to do.

Cancellation has exactly one place: ``generate()``'s ``finally``. A consumer that stops
iterating (client disconnect -> CancelledError, ``aclose()``, an exception, a ``break``)
sends ``abort`` to the engine thread, which frees the request's blocks before its next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from rillet.config import EngineConfig
from rillet.engine.builder import EngineParts, build_engine
from rillet.engine.collector import Item, RequestCollector
from rillet.engine.inputs import build_request
from rillet.engine.output_processor import OutputProcessor
from rillet.errors import (
    EngineDeadError,
    GenerationError,
    IncompleteGenerationError,
    RilletError,
    ValidationError,
)
from rillet.protocol import EngineRequest, FinishReason, RequestOutput
from rillet.sampling import SamplingParams

log = logging.getLogger("rillet.engine")

_IDLE_POLL_S = 0.5


@dataclass
class EngineStats:
    """A snapshot for /metrics and tests; read from any thread."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_used_blocks: int
    num_prefix_hit_tokens: int
    num_computed_tokens: int
    num_prompt_tokens_computed: int
    num_generated_tokens: int
    num_preemptions: int
    num_steps: int


class AsyncEngine:
    """The interface every front door uses: ``make_request`` then ``generate``."""

    def __init__(self, parts: EngineParts) -> None:
        self.parts = parts
        self.core = parts.core
        self.tokenizer = parts.tokenizer
        self.model_name = parts.model_name
        self.max_model_len = parts.max_model_len
        self._processor = OutputProcessor(parts.tokenizer)
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._collectors: dict[str, RequestCollector] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dead: BaseException | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model (blocking, seconds) and return an engine; its thread starts lazily."""
        return cls(build_engine(config))

    # ---- the front doors' API -------------------------------------------------------

    def make_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        add_special_tokens: bool = True,
    ) -> EngineRequest:
        """Tokenize and validate. Raises ValidationError, so callers can answer 4xx early."""
        return build_request(
            self.tokenizer,
            self.parts.model_config.vocab_size,
            self.max_model_len,
            prompt,
            params,
            request_id,
            add_special_tokens,
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream deltas for ``request`` until one has a finish_reason.

        Raises the engine's error for this request (GenerationError, EngineDeadError,
        IncompleteGenerationError on shutdown) in place of the next delta.
        """
        self._ensure_started()
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}")
        rid = request.request_id
        if rid in self._collectors:
            raise ValidationError(f"request id {rid!r} is already in use")
        collector = RequestCollector()
        self._collectors[rid] = collector
        self._send("add", request)
        finished = False
        try:
            while True:
                item = collector.take_nowait() or await collector.take()
                if isinstance(item, BaseException):
                    finished = True  # the engine side has already dropped it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._collectors.pop(rid, None)
            if not finished:
                self._send("abort", rid)

    def abort(self, request_id: str) -> None:
        """Stop a request from outside its stream (e.g. a WebSocket cancel message)."""
        self._send("abort", request_id)

    def stats(self) -> EngineStats:
        sched = self.core.scheduler
        bm = sched.block_manager
        c = self.core.counters
        return EngineStats(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            kv_cache_usage=bm.usage,
            num_used_blocks=bm.num_used_blocks,
            num_prefix_hit_tokens=bm.num_prefix_hit_tokens,
            num_computed_tokens=c.num_computed_tokens,
            num_prompt_tokens_computed=c.num_prompt_tokens_computed,
            num_generated_tokens=c.num_generated_tokens,
            num_preemptions=c.num_preemptions,
            num_steps=c.num_steps,
        )

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and not self._stopping.is_set()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; open streams end with IncompleteGenerationError."""
        self._stopping.set()
        self._send("stop", None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        for collector in list(self._collectors.values()):
            collector.put(IncompleteGenerationError("the server is shutting down"))

    # ---- plumbing ---------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="rillet-engine", daemon=True)
        self._thread.start()

    def _send(self, kind: str, payload: object) -> None:
        self._commands.put((kind, payload))

    def _post(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """From the engine thread: hand each item to its collector on the collector's loop.

        Collectors remember their own loop, so one engine can serve streams from several
        event loops (e.g. successive ``asyncio.run`` calls) without losing outputs.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestCollector, Item]]] = {}
        for rid, item in items:
            collector = self._collectors.get(rid)
            if collector is not None:
                by_loop.setdefault(collector.loop, []).append((collector, item))
        for loop, batch in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_deliver, batch)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not self.core.has_unfinished_requests())
                if self.core.has_unfinished_requests():
                    self._step()
        except BaseException as exc:  # the thread itself broke: nothing can be served
            log.exception("engine thread died")
            self._dead = exc
            self._post([(rid, EngineDeadError(str(exc))) for rid in list(self._collectors)])

    def _drain_commands(self, block: bool) -> None:
        pending: list[tuple[str, RequestOutput | BaseException]] = []
        try:
            kind, payload = (
                self._commands.get(timeout=_IDLE_POLL_S) if block else (self._commands.get_nowait())
            )
            while True:
                self._apply(kind, payload, pending)
                kind, payload = self._commands.get_nowait()
        except queue.Empty:
            pass
        self._post(pending)

    def _apply(
        self, kind: str, payload: object, pending: list[tuple[str, RequestOutput | BaseException]]
    ) -> None:
        if kind == "add":
            assert isinstance(payload, EngineRequest)
            try:
                self.core.add_request(payload)
                self._processor.add(payload)
            except RilletError as exc:
                pending.append((payload.request_id, exc))
        elif kind == "abort":
            assert isinstance(payload, str)
            self.core.abort_request(payload)
            self._processor.drop(payload)

    def _step(self) -> None:
        try:
            deltas = self.core.step()
            processed = self._processor.process(deltas)
        except Exception as exc:
            # A failed step poisons only the requests in flight: fail them all, free their
            # blocks, and keep serving new requests.
            log.exception("engine step failed")
            self._fail_all(GenerationError(f"generation failed: {exc}"))
            return
        for rid in processed.stop_hits:
            self.core.finish_request(rid, FinishReason.STOP_SEQUENCE)
        self._post([(out.request_id, out) for out in processed.outputs])

    def _fail_all(self, error: RilletError) -> None:
        failed = self.core.scheduler.request_ids()
        for rid in failed:
            self.core.abort_request(rid)
            self._processor.drop(rid)
        self._post([(rid, error) for rid in failed])


def _deliver(batch: list[tuple[RequestCollector, Item]]) -> None:
    for collector, item in batch:
        collector.put(item)
