"""Run a real ``python -m rillet serve`` for tests (stdlib only, so any venv can use it).

``start_server(extra_args)`` starts the bundled model on 127.0.0.1 with ``--port 0`` (the
server picks a free port and prints it, so there is no race for ports), waits until
``/health`` answers 200, and returns a :class:`ServerHandle`; ``handle.stop()`` sends
SIGTERM and waits. The server's output goes to a log file, shown when it fails to start.
``is_running`` and ``child_pids`` look at processes (the server's engine child) on Linux;
``frozen_engine`` holds every request in the engine where it is, so a test never races it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_BANNER = re.compile(r"serving .* on (http://[\d.]+:\d+)")
_GRPC_BANNER = re.compile(r"gRPC:\s+([\d.]+:\d+)")


@dataclass
class ServerHandle:
    """A running server: ``url`` has no trailing slash; ``grpc_target`` is ``host:port``."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)
    grpc_target: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    extra_args: Sequence[str] = (),
    *,
    python: str = sys.executable,
    timeout: float = 240.0,
    threads: int = 1,
    env: dict[str, str] | None = None,
) -> ServerHandle:
    """Start ``rillet serve`` with ``extra_args`` and wait until it is healthy.

    Its gRPC door gets a free port of its own (``grpc_target``), unless ``extra_args`` set one.
    """
    for _ in range(2):
        # free_port()'s port may go to someone else before the server binds it (another
        # bind to port 0 may take it, even this server's own HTTP socket): pick again.
        with contextlib.suppress(PortTaken):
            return _start_server(extra_args, python, timeout, threads, env)
    return _start_server(extra_args, python, timeout, threads, env)


class PortTaken(RuntimeError):
    """The gRPC port chosen for the server was taken by the time it bound it."""


def _start_server(
    extra_args: Sequence[str],
    python: str,
    timeout: float,
    threads: int,
    env: dict[str, str] | None,
) -> ServerHandle:
    fd, log_name = tempfile.mkstemp(prefix="rillet-serve-", suffix=".log")
    chosen = "--grpc-port" not in extra_args
    grpc = ["--grpc-port", str(free_port())] if chosen else []
    args = ["--host", "127.0.0.1", "--port", "0", "--threads", str(threads), *grpc, *extra_args]
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(
            [python, "-m", "rillet", "serve", *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    handle = ServerHandle("", proc, Path(log_name), args)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = handle.log()
                if chosen and "cannot serve gRPC on port" in log:
                    raise PortTaken(log)
                raise RuntimeError(f"rillet serve exited with {proc.returncode}:\n{log}")
            if not handle.url:
                match = _BANNER.search(handle.log())
                handle.url = match.group(1) if match else ""
            if handle.url and _healthy(handle.url):
                match = _GRPC_BANNER.search(handle.log())
                handle.grpc_target = match.group(1) if match else ""
                return handle
            time.sleep(0.2)
        raise RuntimeError(f"rillet serve not healthy after {timeout}s:\n{handle.log()}")
    except BaseException:
        handle.stop(timeout=5)
        raise


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def metric(handle: ServerHandle, name: str) -> float:
    """The value of series ``name`` (with its labels, as exposed) in the server's /metrics."""
    with urllib.request.urlopen(f"{handle.url}/metrics", timeout=10) as response:
        return metric_value(response.read().decode(), name)


def metric_value(text: str, name: str) -> float:
    """The value of series ``name`` in a Prometheus text exposition (0 if absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def free_port() -> int:
    """A port nobody listens on now (the server fails loudly if one takes it first: its
    gRPC door binds without SO_REUSEPORT; :func:`start_server` then picks again)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has: only its exit
    status is left for its parent to collect)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def child_pids(pid: int) -> list[int]:
    """The direct children of process ``pid`` (Linux ``/proc``)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended while we looked
            children += [int(child) for child in (task / "children").read_text().split()]
    return children


@contextlib.contextmanager
def frozen_engine(handle: ServerHandle) -> Iterator[list[int]]:
    """SIGSTOP the server's engine process until the block exits (then SIGCONT).

    Requests in the engine can neither advance nor finish meanwhile, while the HTTP side
    keeps serving: a stream that is running stays running for as long as the test needs.
    Yields the stopped pids (a process that has exited by the end is left alone).
    """
    pids = child_pids(handle.proc.pid)
    assert pids, "rillet serve runs its engine core in a child process"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
