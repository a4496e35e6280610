"""The progress line on stderr: requests done, errors and tokens/s so far in this level.

tqdm draws it when installed (``pip install tqdm``); otherwise a plain line is rewritten
in place on a terminal, and printed every ``_PLAIN_EVERY_S`` seconds into a log file,
so a run piped to a file still shows it is alive without flooding the log.
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any, TextIO

from rillet.benchmark.stream import RequestRecord

_PLAIN_EVERY_S = 10.0
_TTY_EVERY_S = 0.2


class Progress:
    """One bar per level: ``start_level``, ``advance`` per finished request, ``end_level``."""

    def __init__(self, enabled: bool = True, stream: TextIO = sys.stderr) -> None:
        self.enabled = enabled
        self.stream = stream
        self._tty = stream.isatty()
        self._tqdm: Any = None
        if enabled:
            try:
                self._tqdm = importlib.import_module("tqdm").tqdm
            except ImportError:
                self._tqdm = None
        self._bar: Any = None
        self._label = ""
        self._total = 0
        self._done = 0
        self._errors = 0
        self._tokens = 0
        self._start = 0.0
        self._shown_at = 0.0

    def note(self, message: str) -> None:
        """A log line that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def start_level(self, label: str, total: int) -> None:
        self._label = label
        self._total, self._done, self._errors, self._tokens = total, 0, 0, 0
        self._start = self._shown_at = time.perf_counter()
        if self.enabled and self._tqdm is not None:
            self._bar = self._tqdm(
                total=total, desc=self._label, unit="req", file=self.stream, leave=True
            )

    def advance(self, record: RequestRecord) -> None:
        self._done += 1
        self._errors += 0 if record.ok else 1
        self._tokens += record.num_tokens
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(f"err={self._errors} tok/s={self._rate():.0f}", False)
            self._bar.update(1)
            return
        now = time.perf_counter()
        every = _TTY_EVERY_S if self._tty else _PLAIN_EVERY_S
        if now - self._shown_at >= every:
            self._shown_at = now
            self._show(final=False)

    def end_level(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            self._show(final=True)

    def _rate(self) -> float:
        elapsed = time.perf_counter() - self._start
        return self._tokens / elapsed if elapsed > 0 else 0.0

    def _show(self, final: bool) -> None:
        elapsed = time.perf_counter() - self._start
        width = 24
        filled = width * self._done // max(self._total, 1)
        line = (
            f"{self._label:>6} [{'#' * filled}{'.' * (width - filled)}] "
            f"{self._done}/{self._total} req  err {self._errors}  "
            f"{self._rate():.0f} tok/s  {elapsed:.1f}s"
        )
        if self._tty:
            end = "\n" if final else ""
            print(f"\r{line}", end=end, file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
