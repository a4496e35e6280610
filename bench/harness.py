"""What the side-by-side benchmark scripts share: start ``rillet serve``, load a server with
``bench/serve.py`` (``rillet bench``) and read its JSON lines back. Stdlib only."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until GET /v1/models answers 200 (vLLM answers only once its engine is up); a server
    that exits meanwhile, or is not ready in ``timeout`` seconds, is a RuntimeError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} while starting")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/v1/models", timeout=2):
            return
        time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout:.0f}s")


def start_server(
    out: Path, threads: str, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], str, str, str]:
    http_port, grpc_port = free_port(), free_port()
    log = (out / "server.log").open("wb")
    command = [
        str(PYTHON),
        "-m",
        "rillet",
        "serve",
        "--port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--threads",
        threads,
        "--max-concurrent-requests",
        "512",
        *extra,
    ]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/info", timeout=2) as response:
                model = json.load(response)["model_id"]
            return proc, url, f"127.0.0.1:{grpc_port}", model
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"rillet serve did not start; see {out / 'server.log'}")


def children(pid: int) -> list[int]:
    """The direct children of process ``pid`` (Linux ``/proc``; a thread that ends while
    we look is skipped)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def load(
    args: argparse.Namespace,
    label: str,
    url: str,
    model: str,
    lines: Path,
    *,
    server_pid: int | None = None,
    extra: tuple[str, ...] = (),
) -> list[dict]:
    """``bench/serve.py`` at ``args.concurrency`` levels against ``url``; its rows."""
    command = [
        str(PYTHON),
        str(ROOT / "bench" / "serve.py"),
        "--url",
        url,
        "--model",
        model,
        "--concurrency",
        args.concurrency,
        "--max-tokens",
        str(args.max_tokens),
        "--level-timeout",
        str(args.level_timeout),
        "--out",
        str(lines),
        "--no-progress",
        "--label",
        label,
        *extra,
    ]
    if server_pid is not None:
        command += ["--server-pid", str(server_pid)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in lines.read_text().splitlines()]
