"""A Server-Sent Events parser that follows the WHATWG spec, fed chunk by chunk.

It does no I/O: :class:`SSEDecoder` takes bytes (or text) in whatever pieces the network
delivers and hands back whole events, so the sync and the async client share it.
What the spec asks, and naive parsers get wrong:

- lines end with CRLF, LF or CR, and a CRLF may be split across two chunks;
- one optional space after ``field:`` is removed, no more (``data:x`` and ``data: x`` agree;
  ``str.lstrip("data:")`` would also eat a leading ``a`` or ``:`` of the payload);
- a line starting with ``:`` is a comment (keep-alive), and several ``data:`` lines make one
  event joined with ``\\n``; an event is dispatched on a blank line, and only if it has data;
- a multi-byte UTF-8 character may be split across chunks; a leading BOM is dropped;
- an event cut off by the end of the stream (no blank line) is discarded.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

# Not str.splitlines(): it also splits on \v, \f, \x1c-\x1e, \x85, \u2028 and \u2029,
# which are ordinary characters inside an SSE line.
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event. ``event`` is ``"message"`` unless the server named it."""

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class SSEDecoder:
    """Incremental SSE parser: :meth:`feed` chunks in, get the completed events out."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""  # text after the last line ending seen
        self._at_start = True  # a BOM is only dropped at the very start of the stream
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF belongs to it
        self._data: list[str] = []
        self._has_data = False
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None

    def feed(self, chunk: bytes | str) -> list[ServerSentEvent]:
        """Parse one more piece of the stream; return the events it completed, in order."""
        text = self._utf8.decode(chunk) if isinstance(chunk, bytes) else chunk
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            text = text.removeprefix("\ufeff")
        if self._skip_lf:
            self._skip_lf = False
            text = text.removeprefix("\n")
        buffer = self._partial + text
        events: list[ServerSentEvent] = []
        start = 0
        for match in _LINE_END.finditer(buffer):
            event = self._line(buffer[start : match.start()])
            if event is not None:
                events.append(event)
            start = match.end()
        self._partial = buffer[start:]
        # A CR at the very end may be the first half of a CRLF whose LF is in the next chunk.
        self._skip_lf = buffer.endswith("\r")
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        # Any other field name is ignored, as the spec says.
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, has_data, event = self._data, self._has_data, self._event
        self._data, self._has_data, self._event = [], False, ""
        if not has_data:
            return None
        return ServerSentEvent(
            data="\n".join(data), event=event or "message", id=self._last_id, retry=self._retry
        )


def iter_events(chunks: Iterable[bytes | str]) -> Iterator[ServerSentEvent]:
    """Events of a stream given as an iterable of chunks (e.g. ``response.iter_bytes()``)."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)


async def aiter_events(chunks: AsyncIterable[bytes | str]) -> AsyncIterator[ServerSentEvent]:
    """Async twin of :func:`iter_events` over the same decoder."""
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
