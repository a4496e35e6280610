"""The engine core on a thread of this process (library use, tests, ``--engine-in-process``)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from rillet.engine.core import EngineCore
from rillet.engine.core_loop import Command, CommandKind, CoreLoop, EngineStats, Reporter
from rillet.engine.core_loop import engine_stats as _engine_stats

log = logging.getLogger("rillet.engine")


class EngineThread:
    """Runs :class:`CoreLoop` on a daemon thread; commands go through a queue.

    Reports are made on the engine thread itself, so a stop string ends its request before
    the next step.
    """

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, reporter: Reporter, on_death: Callable[[BaseException], None]) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(reporter, on_death), name="rillet-engine", daemon=True
        )
        self._thread.start()

    def send(self, kind: CommandKind, payload: object = None) -> None:
        self._commands.put((kind, payload))

    def stats(self) -> EngineStats:
        return _engine_stats(self.core)

    def join(self, timeout: float) -> None:
        """Wait for the loop to end after a ``stop`` command."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, reporter: Reporter, on_death: Callable[[BaseException], None]) -> None:
        try:
            CoreLoop(self.core, self._receive, reporter).run()
        except BaseException as exc:  # the loop itself broke: nothing can be served
            log.exception("engine thread died")
            on_death(exc)

    def _receive(self, timeout: float) -> list[Command]:
        commands: list[Command] = []
        try:
            if timeout > 0:
                commands.append(self._commands.get(timeout=timeout))
            else:
                commands.append(self._commands.get_nowait())
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return commands
