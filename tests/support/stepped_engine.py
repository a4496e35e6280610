"""The real ``AsyncEngine`` (output processor, per-request collectors) over a core the test
steps by hand: for the doors' slow-reader tests, where what matters is what the engine side
does while a reader stalls.

:meth:`SteppedBackend.step` is one engine step: it hands every running request one token
straight to the engine's reporter, as the core loop does, and never waits for any reader.
A reader that has stopped reading leaves its outputs merging in its collector (or, until
those fill, in the transport's buffers); :meth:`AsyncEngine.buffered_bytes` shows which.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fake_engine import char_tokenizer
from polling import poll_until
from rillet.engine.async_engine import AsyncEngine
from rillet.engine.core_loop import EngineStats, Reporter
from rillet.protocol import EngineRequest, FinishReason, TokenDelta

#: The token every step samples: "x", one byte of text.
TOKEN = "x"


class SteppedBackend:
    """A stand-in for the core's thread: requests run only when the test calls :meth:`step`."""

    def __init__(self) -> None:
        self.tokenizer = char_tokenizer()
        self.token_id = self.tokenizer.encode(TOKEN, add_special_tokens=False)[0]
        self.reporter: Reporter | None = None
        self.running: dict[str, int] = {}
        self.caps: dict[str, int] = {}
        self.aborted: list[str] = []
        self.num_steps = 0

    def start(self, reporter: Reporter, on_death: Callable[[BaseException], None]) -> None:
        self.reporter = reporter

    def send(self, kind: str, payload: Any = None) -> None:
        if kind == "add":
            assert isinstance(payload, EngineRequest)
            self.running[payload.request_id] = 0
            self.caps[payload.request_id] = payload.params.max_new_tokens or 1 << 30
        elif kind == "abort" and self.running.pop(payload, None) is not None:
            self.aborted.append(payload)

    def step(self, finish: bool = False) -> None:
        """One token for every running request (its last, or with ``finish`` this one,
        ends it with ``length``)."""
        assert self.reporter is not None
        self.num_steps += 1
        deltas = []
        for rid in list(self.running):
            self.running[rid] += 1
            done = finish or self.running[rid] >= self.caps[rid]
            deltas.append(
                TokenDelta(
                    rid,
                    [self.token_id],
                    finish_reason=FinishReason.LENGTH if done else None,
                    step=self.num_steps,
                )
            )
            if done:
                del self.running[rid]
        if deltas:
            self.reporter.step(deltas)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), 0, 0.0, 0, 0, 0, 0, 0, 0, self.num_steps)

    def join(self, timeout: float) -> None:
        pass


def stepped_engine() -> tuple[AsyncEngine, SteppedBackend]:
    backend = SteppedBackend()
    tokenizer = backend.tokenizer
    engine = AsyncEngine(backend, tokenizer, "fake-model", 1 << 20, tokenizer.vocab_size)
    return engine, backend


#: Output merged in a collector that only a stalled reader leaves there: a reader that
#: keeps up takes its output within the few steps between two turns of the loop.
STALLED_BYTES = 16 << 10


async def stall(engine: AsyncEngine, backend: SteppedBackend, max_steps: int = 200_000) -> str:
    """Step while the one running request's reader reads nothing, until its collector holds
    :data:`STALLED_BYTES` (the transport's buffers are full) or gave the reader up (its
    request aborted); returns the request's id. The reader must have stopped reading."""
    await poll_until(lambda: len(backend.running) == 1)
    [rid] = backend.running
    for i in range(max_steps):
        backend.step()
        if i % 4 == 0:  # let the loop deliver, and the writer send what it can
            await asyncio.sleep(0)
        if engine.buffered_bytes(rid) > STALLED_BYTES or rid in backend.aborted:
            return rid
    raise AssertionError(f"no stall after {max_steps} steps")
