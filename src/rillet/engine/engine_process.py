"""The engine core in a process of its own, as vLLM v1 runs its EngineCore.

Why a process: on a CPU the model's matmuls want every core, and the front end (HTTP,
SSE framing, detokenization) wants Python. In one process the two take turns on the GIL,
and torch's thread team waits whenever the HTTP thread holds it; served steps ran 15-45 %
slower than the same steps offline, with a third of the machine idle (bench/RESULTS.md).
In its own process the core's Python never waits for the front end's.

The parent keeps text: the child sees token ids only and sends ``TokenDelta``s back, one
message a step, with an ``EngineStats`` snapshot for /metrics. Stop strings are matched in
the parent and come back as ``finish`` commands (one step late at most; the extra token is
dropped by the front end, as in vLLM).

Pipes, one per direction. The parent writes commands from a sender thread and reads
reports on a reader thread, so neither the event loop nor the reader ever blocks on a
full pipe (a reader blocked on a write while the child blocks on its own would deadlock).
The child ignores SIGINT (Ctrl-C reaches the whole process group; the parent drains its
streams first, then sends ``stop``) and exits when the parent's end of a pipe closes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from rillet.engine.core_loop import Command, CommandKind, CoreLoop, EngineStats, engine_stats
from rillet.errors import GenerationError, ModelLoadError, RilletError
from rillet.protocol import TokenDelta

if TYPE_CHECKING:
    from rillet.config import EngineConfig
    from rillet.engine.core import EngineCore
    from rillet.engine.core_loop import Reporter
    from rillet.tokenizer import Tokenizer

log = logging.getLogger("rillet.engine")


@dataclass
class EngineInfo:
    """What the child tells the parent once the model is loaded."""

    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int
    stats: EngineStats
    generation_defaults: dict[str, Any]


class EngineProcess:
    """Parent side: start the child, forward commands, hand its reports to a Reporter."""

    def __init__(self, config: EngineConfig) -> None:
        """Start the child and wait until its model is loaded (seconds).

        Raises ModelLoadError if loading fails or the child dies on the way.
        """
        ctx = multiprocessing.get_context("spawn")  # fork would copy this process's threads
        self._reports, child_reports = ctx.Pipe(duplex=False)
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=run_engine_process,
            args=(config, child_commands, child_reports, logging.getLogger().level),
            name="rillet-engine",
            daemon=True,
        )
        self._process.start()
        child_commands.close()
        child_reports.close()
        try:
            kind, payload = self._reports.recv()
        except EOFError:
            self._process.join(5)
            raise ModelLoadError(
                f"the engine process exited while loading (exit code {self._process.exitcode})"
            ) from None
        if kind != "ready":
            self._process.join(5)
            assert isinstance(payload, BaseException)
            raise payload
        assert isinstance(payload, EngineInfo)
        self.info = payload
        self._stats = payload.stats
        self._outbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def start(self, reporter: Reporter, on_death: Callable[[BaseException], None]) -> None:
        for target, args, name in (
            (self._write, (), "rillet-engine-commands"),
            (self._read, (reporter, on_death), "rillet-engine-reports"),
        ):
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def send(self, kind: CommandKind, payload: object = None) -> None:
        if kind == "stop":
            self._stopping = True
        self._outbox.put((kind, payload))

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        """None while the child runs; 0 after a clean stop, -N if signal N ended it."""
        return self._process.exitcode

    def stats(self) -> EngineStats:
        """The snapshot the child sent with its last report."""
        return self._stats

    def join(self, timeout: float) -> None:
        """Wait for the child to exit after a ``stop`` command; kill it if it does not."""
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("the engine process did not stop in %.0fs; killing it", timeout)
            self._process.kill()
            self._process.join(5)
        for thread in self._threads:
            thread.join(1)

    def _write(self) -> None:
        while True:
            command = self._outbox.get()
            try:
                self._commands.send(command)
            except (OSError, ValueError):
                return  # the child is gone; the reader reports it
            if command[0] == "stop":
                self._commands.close()
                return

    def _read(self, reporter: Reporter, on_death: Callable[[BaseException], None]) -> None:
        while True:
            try:
                kind, payload = self._reports.recv()
            except (EOFError, OSError):
                break
            if kind == "step":
                deltas, self._stats = payload
                self._report_step(reporter, deltas)
            elif kind == "errors":
                reporter.errors(payload)
        self._process.join(5)
        if not self._stopping:
            log.error("the engine process died (exit code %s)", self._process.exitcode)
            on_death(RuntimeError(f"the engine process died (exit code {self._process.exitcode})"))

    def _report_step(self, reporter: Reporter, deltas: list[TokenDelta]) -> None:
        try:
            stop_hits = reporter.step(deltas)
        except Exception as exc:
            # The front end's part of the step failed (text for these requests): fail them
            # and free them in the child, as a failed step would.
            log.exception("processing a step's outputs failed")
            failed = [d.request_id for d in deltas]
            for request_id in failed:
                self.send("abort", request_id)
            error = GenerationError(f"generation failed: {exc}")
            reporter.errors([(request_id, error) for request_id in failed])
            return
        for request_id in stop_hits:
            self.send("finish", request_id)


# ---- child side ----------------------------------------------------------------------


def run_engine_process(
    config: EngineConfig, commands: Connection, reports: Connection, log_level: int
) -> None:
    """The child's main: load the model, report ready, run the core loop until stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    from rillet.engine.builder import build_engine

    try:
        parts = build_engine(config)
    except BaseException as exc:
        reports.send(("failed", _picklable(exc)))
        return
    core = parts.core
    reports.send(
        (
            "ready",
            EngineInfo(
                tokenizer=parts.tokenizer,
                model_name=parts.model_name,
                max_model_len=parts.max_model_len,
                vocab_size=parts.model_config.vocab_size,
                stats=engine_stats(core),
                generation_defaults=parts.generation_defaults,
            ),
        )
    )
    # EOF or a broken pipe: the parent has gone and nobody is left to serve.
    with contextlib.suppress(EOFError, BrokenPipeError):
        CoreLoop(core, _receiver(commands), _PipeReporter(reports, core)).run()


def _receiver(commands: Connection) -> Callable[[float], list[Command]]:
    def receive(timeout: float) -> list[Command]:
        received: list[Command] = []
        if commands.poll(timeout):
            received.append(commands.recv())
            while commands.poll(0):
                received.append(commands.recv())
        return received

    return receive


class _PipeReporter:
    def __init__(self, reports: Connection, core: EngineCore) -> None:
        self._reports = reports
        self._core = core

    def step(self, deltas: list[TokenDelta]) -> list[str]:
        self._reports.send(("step", (deltas, engine_stats(self._core))))
        return []  # stop strings are matched in the parent; they come back as "finish"

    def errors(self, failed: list[tuple[str, RilletError]]) -> None:
        self._reports.send(("errors", failed))


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` if it survives a trip through the pipe, else a ModelLoadError saying it."""
    if isinstance(exc, RilletError):
        return exc
    return ModelLoadError(f"loading the model failed: {type(exc).__name__}: {exc}")
