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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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
    __slots__ = ("_item", "_ready", "loop", "max_bytes", "num_bytes", "on_overflow")

    def __init__(
        self, max_bytes: int | None = None, on_overflow: Callable[[], None] | None = None
    ) -> None:
        """``max_bytes``: the most a pending output may hold (None: no bound)."""
        self._item: Item | None = None
        self._ready = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.max_bytes = max_bytes
        self.on_overflow = on_overflow
        #: What the pending output holds now (0 when the reader keeps up).
        self.num_bytes = 0

    def put(self, item: Item) -> None:
        if isinstance(item, BaseException):
            self._item, self.num_bytes = item, 0
        elif self._item is None:
            self._item, self.num_bytes = item, output_bytes(item)
        elif isinstance(self._item, RequestOutput):
            self._item.merge(item)
            self.num_bytes += output_bytes(item)
        # else: an error is pending; what the engine made after it goes nowhere
        if self.max_bytes is not None and self.num_bytes > self.max_bytes:
            self._overflow()
        self._ready.set()

    def _overflow(self) -> None:
        self._item = IncompleteGenerationError(
            f"the client read too slowly: more than {self.max_bytes} bytes of output were "
            "waiting for it (--max-stream-buffer-bytes)"
        )
        self.num_bytes = 0
        if self.on_overflow is not None:
            self.on_overflow()

    def take_nowait(self) -> Item | None:
        item, self._item = self._item, None
        self.num_bytes = 0
        self._ready.clear()
        return item

    async def take(self) -> Item:
        while True:
            await self._ready.wait()
            item = self.take_nowait()
            if item is not None:
                return item
