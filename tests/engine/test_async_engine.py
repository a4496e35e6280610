"""AsyncEngine over a scripted backend (a stand-in for the core's thread or process): a core
that dies ends every open stream with EngineDeadError at once, the engine reports unhealthy
while a new backend comes up, then serves again; past MAX_RESTARTS it stays dead. The test
holds the restart explicitly, so nothing here races it. (The real thing, a killed engine
process under ``rillet serve``: ``test_server_robustness.py``.)"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from fake_engine import char_tokenizer
from polling import poll_until
from rillet.engine import async_engine
from rillet.engine.async_engine import AsyncEngine
from rillet.engine.core_loop import EngineStats, Reporter
from rillet.errors import EngineDeadError
from rillet.protocol import EngineRequest, FinishReason, TokenDelta
from rillet.sampling import SamplingParams

pytestmark = pytest.mark.timeout(30)


class ScriptedBackend:
    """Answers each request with one token and a finish, unless told to stay silent."""

    def __init__(self, *, silent: bool = False) -> None:
        self.silent = silent
        self.reporter: Reporter | None = None
        self.on_death: Callable[[BaseException], None] | None = None
        self.added: list[str] = []

    def start(self, reporter: Reporter, on_death: Callable[[BaseException], None]) -> None:
        self.reporter, self.on_death = reporter, on_death

    def send(self, kind: str, payload: Any = None) -> None:
        if kind == "add":
            assert isinstance(payload, EngineRequest) and self.reporter is not None
            self.added.append(payload.request_id)
            if not self.silent:
                delta = TokenDelta(payload.request_id, [5], finish_reason=FinishReason.LENGTH)
                self.reporter.step([delta])

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0)

    def join(self, timeout: float) -> None:
        pass

    def die(self) -> None:
        assert self.on_death is not None
        self.on_death(RuntimeError("the engine process died (exit code -9)"))


class HeldRespawn:
    """The backend factory: each call waits until the test releases it."""

    def __init__(self) -> None:
        self.backends: list[ScriptedBackend] = []
        self.release = threading.Semaphore(0)

    def __call__(self) -> ScriptedBackend:
        self.release.acquire()
        backend = ScriptedBackend()
        self.backends.append(backend)
        return backend


def engine_over(backend: ScriptedBackend, respawn: HeldRespawn) -> AsyncEngine:
    tokenizer = char_tokenizer()
    return AsyncEngine(backend, tokenizer, "m", 64, tokenizer.vocab_size, respawn=respawn)


async def answer(engine: AsyncEngine, prompt: str = "Hi") -> list[int]:
    request = engine.make_request(prompt, SamplingParams(max_new_tokens=1))
    return [t.id for out in [o async for o in engine.generate(request)] for t in out.tokens]


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(async_engine, "RESTART_BACKOFF_S", 0.0)


async def test_a_dead_core_ends_open_streams_then_comes_back() -> None:
    first, respawn = ScriptedBackend(silent=True), HeldRespawn()
    engine = engine_over(first, respawn)
    open_stream = asyncio.ensure_future(answer(engine))
    await poll_until(lambda: len(first.added) == 1)

    first.die()
    with pytest.raises(EngineDeadError, match="exit code -9"):
        await open_stream
    assert not engine.is_healthy  # and stays so while the new core loads
    with pytest.raises(EngineDeadError):
        await answer(engine)

    respawn.release.release()
    await poll_until(lambda: engine.is_healthy)
    assert engine.restarts == 1
    assert await answer(engine) == [5]
    assert respawn.backends[0].added and not engine._collectors


async def test_past_the_last_restart_it_stays_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(async_engine, "MAX_RESTARTS", 1)
    first, respawn = ScriptedBackend(), HeldRespawn()
    engine = engine_over(first, respawn)
    assert await answer(engine) == [5]
    first.die()
    respawn.release.release()
    await poll_until(lambda: engine.is_healthy)
    assert await answer(engine) == [5]  # the new core starts with its first request
    respawn.backends[0].die()  # the second death: no restart left
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):
        await answer(engine)
    assert engine.restarts == 1 and len(respawn.backends) == 1
