"""A single-slot, merging hand-off from the engine to one request's consumer.

If the consumer (an SSE writer, a WebSocket) falls behind, deltas are merged into the one
pending output instead of queueing: a slow client gets bigger chunks, never an unbounded
backlog. An exception replaces whatever is pending, since nothing after it matters.
Used on the event loop thread only.
"""

from __future__ import annotations

import asyncio

from rillet.protocol import RequestOutput

Item = RequestOutput | BaseException


class RequestCollector:
    __slots__ = ("_item", "_ready", "loop")

    def __init__(self) -> None:
        self._item: Item | None = None
        self._ready = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def put(self, item: Item) -> None:
        if self._item is None or isinstance(item, BaseException):
            self._item = item
        elif isinstance(self._item, RequestOutput):
            assert isinstance(item, RequestOutput)
            self._item.merge(item)
        self._ready.set()

    def take_nowait(self) -> Item | None:
        item, self._item = self._item, None
        self._ready.clear()
        return item

    async def take(self) -> Item:
        while True:
            await self._ready.wait()
            item = self.take_nowait()
            if item is not None:
                return item
