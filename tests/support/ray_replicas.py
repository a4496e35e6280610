"""The replicas of a local Ray Serve app, found by their process titles, and a way to hold
their engines still (for the Ray tests, whichever ingress Serve runs)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from server_process import child_pids


def replica_pids() -> list[int]:
    """The replicas' worker processes: Ray titles them ``ray::ServeReplica:<app>:<name>``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes().startswith(b"ray::ServeReplica:rillet"):
                    pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def frozen_engines() -> Iterator[None]:
    """SIGSTOP every replica's engine process until the block exits: their requests can
    neither advance nor finish, while Serve's ingress and the replicas' Python keep going."""
    pids = [child for pid in replica_pids() for child in child_pids(pid)]
    assert pids, "each replica runs its engine in a child process"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def replica_metrics(url: str, replica: str, predicate: Any) -> str:
    """/metrics of ``replica`` once ``predicate(text)`` holds (Serve routes each scrape to
    any replica; 120 s bound the wait, and the last scrape is shown if it runs out)."""
    deadline, last = time.monotonic() + 120, ""
    while time.monotonic() < deadline:
        response = httpx.get(url + "/metrics", timeout=30)
        if response.headers["x-rillet-replica"] == replica:
            last = response.text
            if predicate(last):
                return last
        time.sleep(0.05)
    running = [line for line in last.splitlines() if line.startswith("rillet_requests_")]
    raise AssertionError(f"replica {replica} never got there: {running}")
