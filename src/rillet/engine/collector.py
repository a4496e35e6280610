"""A single-slot, merging hand-off from the engine to one request's consumer.

If the consumer (an SSE writer, a WebSocket, a gRPC stream) falls behind, deltas are merged
into the one pending output instead of queueing: a slow client gets bigger chunks, never a
backlog of messages, and the engine never waits for it. What the pending output holds is
still bounded: past ``max_bytes`` (its text's UTF-8 bytes plus :data:`TOKEN_BYTES` per
token, top alternatives included) the collector gives up on the reader: the pending output
is replaced by one :class:`~rillet.errors.IncompleteGenerationError`, which the reader gets
when it reads again, and ``on_overflow`` runs once, so the owner aborts the request in the
engine at once rather than producing for nobody. An exception replaces whatever is pending,
since nothing after it matters. Used on the event loop thread only.

A collector may also *hold* its output for a few engine steps on purpose, when the host is
the bottleneck (``engine/pacing.py``): then the reader gets the pending output only once it
holds the outputs of ``min(max_hold_steps, pacer.hold_steps)`` steps, or a finish, or an
error; the stream's first output with tokens always goes at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rillet.engine.pacing import StreamPacer
from rillet.errors import IncompleteGenerationError
from rillet.protocol import RequestOutput

Item = RequestOutput | BaseException

#: What one pending token costs besides its text: its id, logprob and the objects around
#: them (a rough Python size, so a stream of tokens with no text is bounded too).
TOKEN_BYTES = 64


def output_bytes(out: RequestOutput) -> int:
    """The bytes ``out`` counts for against a collector's bound."""
    num_tokens = sum(1 + len(t.top) for t in out.tokens)
    return len(out.text.encode()) + TOKEN_BYTES * num_tokens


class RequestCollector:
    __slots__ = (
        "_item",
        "_num_steps",
        "_ready",
        "_sent_tokens",
        "loop",
        "max_bytes",
        "max_hold_steps",
        "num_bytes",
        "on_overflow",
        "pacer",
    )

    def __init__(
        self,
        max_bytes: int | None = None,
        on_overflow: Callable[[], None] | None = None,
        pacer: StreamPacer | None = None,
        max_hold_steps: int = 1,
    ) -> None:
        """``max_bytes``: the most a pending output may hold (None: no bound). ``pacer``
        (None: never hold) sets how many steps' outputs to hold, at most ``max_hold_steps``."""
        self._item: Item | None = None
        self._ready = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.max_bytes = max_bytes
        self.on_overflow = on_overflow
        self.pacer = pacer
        self.max_hold_steps = max_hold_steps
        #: What the pending output holds now (0 when the reader keeps up).
        self.num_bytes = 0
        self._num_steps = 0  # the engine outputs merged into the pending one
        self._sent_tokens = False  # the reader has had an output with tokens

    def put(self, item: Item) -> None:
        if isinstance(item, BaseException):
            self._item, self.num_bytes = item, 0
        elif self._item is None:
            self._item, self.num_bytes = item, output_bytes(item)
            self._num_steps = 1
        elif isinstance(self._item, RequestOutput):
            self._item.merge(item)
            self.num_bytes += output_bytes(item)
            self._num_steps += 1
        # else: an error is pending; what the engine made after it goes nowhere
        if self.max_bytes is not None and self.num_bytes > self.max_bytes:
            self._overflow()
        if self._is_due():
            self._ready.set()

    def _is_due(self) -> bool:
        """Whether the reader should have the pending output now rather than after more
        steps: always, unless this stream holds and nothing says otherwise."""
        item = self._item
        if not isinstance(item, RequestOutput) or self.pacer is None:
            return True
        if item.finished or not self._sent_tokens:
            return True
        return self._num_steps >= min(self.max_hold_steps, self.pacer.hold_steps)

    def _overflow(self) -> None:
        self._item = IncompleteGenerationError(
            f"the client read too slowly: more than {self.max_bytes} bytes of output were "
            "waiting for it (--max-stream-buffer-bytes)"
        )
        self.num_bytes = 0
        if self.on_overflow is not None:
            self.on_overflow()

    @property
    def is_held(self) -> bool:
        """Whether an output is pending on purpose (the pacer holds it), not for the reader."""
        return self._item is not None and not self._ready.is_set()

    def take_nowait(self) -> Item | None:
        """The pending output if it is due (see :meth:`put`), else None."""
        if not self._ready.is_set():
            return None
        item, self._item = self._item, None
        self.num_bytes = 0
        self._num_steps = 0
        self._ready.clear()
        if isinstance(item, RequestOutput) and item.tokens:
            self._sent_tokens = True
        return item

    async def take(self) -> Item:
        while True:
            await self._ready.wait()
            item = self.take_nowait()
            if item is not None:
                return item
