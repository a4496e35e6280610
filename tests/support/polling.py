"""The tests' one way to wait for a condition: poll it, with a deadline.

The deadline only turns a hang into a clear failure; it is never a timing assertion, so it
is generous (a loaded CI machine is slow). ``poll_until`` is for tests on an event loop,
``poll_until_sync`` for tests that block (a real server in another process).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any


def _ticks(condition: Callable[[], Any], timeout_s: float, what: str | None) -> Iterator[None]:
    """Yields while ``condition()`` is false; raises once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout_s} s: {what or condition}")
        yield


async def poll_until(
    condition: Callable[[], Any], timeout_s: float = 30.0, what: str | None = None
) -> None:
    """Wait on the event loop until ``condition()`` holds."""
    for _ in _ticks(condition, timeout_s, what):
        await asyncio.sleep(0.002)


def poll_until_sync(
    condition: Callable[[], Any], timeout_s: float = 30.0, what: str | None = None
) -> None:
    """Block until ``condition()`` holds."""
    for _ in _ticks(condition, timeout_s, what):
        time.sleep(0.02)
