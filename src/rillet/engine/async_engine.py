"""AsyncEngine: the front end every door uses; streams out through per-request collectors.

The event loop never runs the model. The core runs either on a thread of this process
(:class:`EngineThread`) or in a process of its own (:class:`EngineProcess`, what ``rillet
serve`` uses); both run the same :class:`CoreLoop` and report here the same way. Text lives
here: each step's token deltas are detokenized and matched against stop strings by the
:class:`OutputProcessor`, on the thread that received them, then handed to the collectors
on their event loops.

Cancellation has exactly one place: ``generate()``'s ``finally``. A consumer that stops
iterating (client disconnect -> CancelledError, ``aclose()``, an exception, a ``break``)
sends ``abort`` to the core, which frees the request's blocks before its next step. A door
that cancels from outside (a WebSocket cancel frame, a cancelled RPC) cancels the task
that consumes the stream, so it takes this same path.

When the core dies (its process killed, the loop broken), every open stream gets an
EngineDeadError at once and the engine reports unhealthy. An engine that can ``respawn``
its backend (the process backend: it reloads the model in a new child) then comes back by
itself, up to :data:`MAX_RESTARTS` times, waiting 1, 2, 4 ... seconds first; after that it
stays dead, and requests get EngineDeadError until the server is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from rillet.engine.collector import Item, RequestCollector
from rillet.engine.core_loop import CommandKind, EngineStats, Reporter
from rillet.engine.inputs import build_request
from rillet.engine.output_processor import OutputProcessor, TextReporter
from rillet.engine.pacing import StreamPacer
from rillet.errors import (
    EngineDeadError,
    IncompleteGenerationError,
    ValidationError,
)
from rillet.protocol import EngineRequest, RequestOutput
from rillet.sampling import SamplingParams

if TYPE_CHECKING:
    from rillet.config import EngineConfig
    from rillet.engine.builder import EngineParts
    from rillet.engine.core import EngineCore
    from rillet.tokenizer import Tokenizer

__all__ = ["AsyncEngine", "EngineStats"]

log = logging.getLogger("rillet.engine")

#: How many times a dead core is brought back, over the engine's life.
MAX_RESTARTS = 3
#: The wait before the first restart; it doubles for each one after.
RESTART_BACKOFF_S = 1.0


class EngineBackend(Protocol):
    """Where the core runs: :class:`EngineThread` or :class:`EngineProcess`."""

    def start(self, reporter: Reporter, on_death: Callable[[BaseException], None]) -> None: ...

    def send(self, kind: CommandKind, payload: object = None) -> None: ...

    def stats(self) -> EngineStats: ...

    def join(self, timeout: float) -> None: ...


class AsyncEngine:
    """The way in to the engine: ``generate`` a request, built by the server's generation
    service or, for a Python caller, by ``make_request``."""

    def __init__(
        self,
        backend: EngineBackend,
        tokenizer: Tokenizer,
        model_name: str,
        max_model_len: int,
        vocab_size: int,
        respawn: Callable[[], EngineBackend] | None = None,
        generation_defaults: Mapping[str, Any] | None = None,
    ) -> None:
        """``respawn`` makes a fresh backend for the same model when the core dies;
        ``generation_defaults`` are the model's own sampling defaults (generation_config.json
        names), which the server may apply to fields a request leaves unset."""
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.generation_defaults: Mapping[str, Any] = dict(generation_defaults or {})
        self._backend = backend
        self._processor = OutputProcessor(tokenizer)
        self._collectors: dict[str, RequestCollector] = {}
        #: How many steps streams that merge hold their tokens now (``engine/pacing.py``).
        self.pacer = StreamPacer()
        self._started = False
        self._stopping = False
        self._dead: BaseException | None = None
        self._respawn = respawn
        #: Cores brought back so far (``rillet_engine_restarts``).
        self.restarts = 0
        # The service checks a request's constraint on the caller's loop: have the grammar
        # library ready by then. On a thread, and imported there: the library brings torch
        # (~1.5 s), which the server's own process does not import while it starts.
        threading.Thread(target=_preload_grammar, name="rillet-grammar-import", daemon=True).start()

    @classmethod
    def from_config(cls, config: EngineConfig, *, own_process: bool = False) -> AsyncEngine:
        """Load the model (blocking, seconds) and return an engine; its core starts lazily.

        ``own_process`` runs the core in a child process (what ``rillet serve`` does);
        otherwise it runs on a thread of this one.
        """
        if own_process:
            from rillet.engine.engine_process import EngineProcess

            process = EngineProcess(config)
            info = process.info
            return cls(
                process,
                info.tokenizer,
                info.model_name,
                info.max_model_len,
                info.vocab_size,
                respawn=lambda: EngineProcess(config),
                generation_defaults=info.generation_defaults,
            )
        from rillet.engine.builder import build_engine

        return cls.from_parts(build_engine(config))

    @classmethod
    def from_parts(cls, parts: EngineParts) -> AsyncEngine:
        """An engine whose core runs on a thread of this process."""
        from rillet.engine.engine_thread import EngineThread

        return cls(
            EngineThread(parts.core),
            parts.tokenizer,
            parts.model_name,
            parts.max_model_len,
            parts.model_config.vocab_size,
            generation_defaults=parts.generation_defaults,
        )

    @property
    def core(self) -> EngineCore:
        """The core, when it runs in this process (tests and tools look inside it)."""
        from rillet.engine.engine_thread import EngineThread

        if not isinstance(self._backend, EngineThread):
            raise RuntimeError("this engine's core runs in another process")
        return self._backend.core

    # ---- the front doors' API -------------------------------------------------------

    def make_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        add_special_tokens: bool = True,
    ) -> EngineRequest:
        """Tokenize and check for the engine (``inputs.build_request``); raises
        ValidationError before anything runs. The server checks its clients' requests itself,
        in their words (``GenerationService.build_request``)."""
        return build_request(
            self.tokenizer,
            self.vocab_size,
            self.max_model_len,
            prompt,
            params,
            request_id,
            add_special_tokens,
        )

    async def generate(
        self,
        request: EngineRequest,
        max_buffer_bytes: int | None = None,
        max_hold_steps: int = 1,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream deltas for ``request`` until one has a finish_reason.

        ``max_hold_steps`` > 1 lets the engine's :class:`StreamPacer` hold this stream's
        tokens for up to that many steps when the host is busy, so they go out as one delta
        (its first token, its end and errors never wait); 1 delivers every step's tokens as
        soon as they are sampled (a reader that falls behind still gets merged deltas).

        Raises the engine's error for this request (GenerationError, EngineDeadError,
        IncompleteGenerationError on shutdown) in place of the next delta. A consumer that
        stalls while more than ``max_buffer_bytes`` of output wait for it (None: no bound)
        has its request aborted at once, and gets an IncompleteGenerationError when it reads
        again (``RequestCollector``).
        """
        self._ensure_started()
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}")
        rid = request.request_id
        if rid in self._collectors:
            raise ValidationError(f"request id {rid!r} is already in use")
        pacer = self.pacer if max_hold_steps > 1 else None
        collector = RequestCollector(
            max_buffer_bytes, lambda: self._abort(rid), pacer, max_hold_steps
        )
        self._collectors[rid] = collector
        self._processor.add(request)
        self._backend.send("add", request)
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
                self._abort(rid)

    def _abort(self, request_id: str) -> None:
        """Forget a request's text and have the core free it before its next step: for a
        consumer that went away, and for one too slow to keep (its collector overflowed)."""
        self._processor.drop(request_id)
        self._backend.send("abort", request_id)

    def buffered_bytes(self, request_id: str) -> int:
        """What a request's output waiting for its consumer holds (0: it keeps up)."""
        collector = self._collectors.get(request_id)
        return 0 if collector is None else collector.num_bytes

    def is_held(self, request_id: str) -> bool:
        """Whether a request's pending output waits for more steps on purpose (the pacer
        holds it: the host is busy), rather than for its reader."""
        collector = self._collectors.get(request_id)
        return collector is not None and collector.is_held

    def stats(self) -> EngineStats:
        """A snapshot of the core's counters (from its last report, if it runs elsewhere)."""
        return self._backend.stats()

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and not self._stopping

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core; open streams end with IncompleteGenerationError."""
        # Started even if no request ever came: an engine process's commands go through
        # the sender thread that start() launches, and the stop must reach the child.
        self._ensure_started()
        self._stopping = True
        self._backend.send("stop")
        await asyncio.to_thread(self._backend.join, timeout)
        for collector in list(self._collectors.values()):
            collector.put(IncompleteGenerationError("the server is shutting down"))

    # ---- plumbing ---------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            self._backend.start(TextReporter(self._processor, self._post), self._on_death)

    def _post(self, items: Sequence[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand each item to its collector on the collector's loop (from any thread).

        Collectors remember their own loop, so one engine can serve streams from several
        event loops (e.g. successive ``asyncio.run`` calls) without losing outputs.
        """
        posted_at = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestCollector, Item]]] = {}
        for rid, item in items:
            collector = self._collectors.get(rid)
            if collector is not None:
                by_loop.setdefault(collector.loop, []).append((collector, item))
        for loop, batch in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._deliver, batch, posted_at)

    def _deliver(self, batch: list[tuple[RequestCollector, Item]], posted_at: float) -> None:
        """On the collectors' loop: update the pacer's signals (how late the loop is, how
        many streams are open), then hand each item over."""
        self.pacer.observe(posted_at, time.monotonic(), len(self._collectors))
        for collector, item in batch:
            collector.put(item)

    def _on_death(self, exc: BaseException) -> None:
        if self._stopping:
            return  # shutdown() ends the open streams itself
        self._dead = exc
        open_ids = list(self._collectors)
        for rid in open_ids:
            self._processor.drop(rid)
        self._post([(rid, EngineDeadError(str(exc))) for rid in open_ids])
        if self._respawn is not None and self.restarts < MAX_RESTARTS:
            restart = threading.Thread(target=self._restart, name="rillet-engine-restart")
            restart.daemon = True
            restart.start()
        else:
            log.error("the engine is dead and will not be restarted: %s", exc)

    def _restart(self) -> None:
        """Bring the core back in a new backend, with backoff; until then, unhealthy."""
        assert self._respawn is not None
        while self.restarts < MAX_RESTARTS and not self._stopping:
            delay = RESTART_BACKOFF_S * 2**self.restarts
            self.restarts += 1
            log.warning(
                "restarting the engine in %.0f s (restart %d of %d)",
                delay,
                self.restarts,
                MAX_RESTARTS,
            )
            time.sleep(delay)
            try:
                backend = self._respawn()
            except Exception:
                log.exception("restarting the engine failed")
                continue
            # The new core starts on the next request (_ensure_started); healthy from now.
            self._backend, self._started = backend, False
            self._dead = None
            log.warning("the engine is back")
            return
        log.error("the engine is dead and will not be restarted")


def _preload_grammar() -> None:
    from rillet.engine import grammar

    grammar.import_library()
