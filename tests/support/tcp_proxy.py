"""A loopback TCP proxy that drops a connection after a given number of SSE events.

A real network drop for tests of resumable streams: the client's socket is closed after
the proxy has passed exactly ``events`` Server-Sent Events of its response (counted by their
``data:`` lines, so keep-alive comments do not count), in the middle of a chunked body. Later
connections are passed through untouched. Threads and stdlib sockets, so sync and async
clients (and a server in another process) can all sit behind it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class DroppingProxy:
    """``with DroppingProxy(target_port, events=5) as proxy: ... proxy.url``."""

    def __init__(self, target_port: int, events: int) -> None:
        self.target_port = target_port
        self.events = events
        self.connections = 0
        #: Set once the first connection has been cut.
        self.dropped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._closing = False

    def __enter__(self) -> DroppingProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close does not)
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            cut = self.events if self.connections == 1 else None
            self._spawn(self._pipe, client, upstream, None)
            self._spawn(self._pipe, upstream, client, cut)

    def _pipe(self, source: socket.socket, sink: socket.socket, cut_after: int | None) -> None:
        """Copy ``source`` to ``sink``; with ``cut_after``, close both once that many events
        have been passed on (the bytes after the last one are not sent)."""
        seen = bytearray()
        try:
            while data := source.recv(65536):
                if cut_after is None:
                    sink.sendall(data)
                    continue
                start = len(seen)
                seen += data
                end = _end_of_event(seen, cut_after)
                if end is None:
                    sink.sendall(data)
                    continue
                sink.sendall(bytes(seen[start:end]))
                self.dropped.set()
                break
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def _end_of_event(data: bytearray, count: int) -> int | None:
    """The offset just past the blank line ending the ``count``-th event with data."""
    for found, start in enumerate(_data_lines(data), start=1):
        if found == count:
            end = data.find(b"\n\n", start)
            return None if end < 0 else end + 2
    return None


def _data_lines(data: bytearray) -> Iterator[int]:
    position = 0
    while (position := data.find(b"data:", position)) >= 0:
        if position == 0 or data[position - 1 : position] == b"\n":
            yield position
        position += 5
