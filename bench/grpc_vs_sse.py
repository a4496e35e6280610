#!/usr/bin/env python3
"""The same load over gRPC (Triton's ModelStreamInfer) and over HTTP/SSE (the chat API), on one
``rillet serve``, side by side.

One server (the bundled model, both cores), then for each round both transports in turn
(the order alternates between rounds, so neither always runs on a warmer server) at every
level: the same chat prompts, ``max_tokens``, greedy, ``ignore_eos``. Every request is one
stream: an SSE response, or one ModelStreamInfer call on a shared HTTP/2 channel. Prints a
markdown table of the median over rounds; JSON lines go to ``bench/out/grpc-<time>/``.

    .venv/bin/python bench/grpc_vs_sse.py                  # c=1,16,64, 2 rounds
    .venv/bin/python bench/grpc_vs_sse.py --concurrency 1,16 --rounds 1

Stdlib only; the harness is ``bench/serve.py`` (``rillet bench``), run with the project venv.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(out: Path, threads: str) -> tuple[subprocess.Popen[bytes], str, str, str]:
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


def run(
    args: argparse.Namespace,
    api: str,
    url: str,
    target: str,
    model: str,
    out: Path,
    round_: int,
    pid: int,
) -> list[dict[str, object]]:
    lines = out / f"{api}-{round_}.jsonl"
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
        "--server-pid",
        str(pid),
        "--label",
        f"{api} round {round_}",
    ]
    if api == "grpc":
        command += ["--api", "grpc", "--grpc-url", target]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in lines.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", default="2")
    parser.add_argument("--level-timeout", type=float, default=150.0)
    args = parser.parse_args()
    out = ROOT / "bench" / "out" / time.strftime("grpc-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    proc, url, target, model = start_server(out, args.threads)
    rows: dict[tuple[str, int], list[dict[str, object]]] = {}
    try:
        for round_ in range(args.rounds):
            order = ("sse", "grpc") if round_ % 2 == 0 else ("grpc", "sse")
            for api in order:
                for row in run(args, api, url, target, model, out, round_, proc.pid):
                    rows.setdefault((api, int(row["concurrency"])), []).append(row)  # type: ignore[arg-type]
                print(f"round {round_}: {api} done", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print(table(rows, args))
    print(f"\nJSON lines: {out.relative_to(ROOT)}", file=sys.stderr)


def table(rows: dict[tuple[str, int], list[dict[str, object]]], args: argparse.Namespace) -> str:
    def median(api: str, c: int, key: str, sub: str | None = None) -> float:
        values = [r[key][sub] if sub else r[key] for r in rows[(api, c)]]  # type: ignore[index]
        return float(statistics.median(values))  # type: ignore[arg-type]

    levels = sorted({c for _, c in rows})
    out = [
        f"Median of {args.rounds} round(s); {args.max_tokens} tokens out, greedy, ignore_eos.",
        "",
        "| c | SSE tok/s | gRPC tok/s | SSE TTFT p50 / p99 (ms) | gRPC TTFT p50 / p99 (ms) "
        "| SSE ITL p50 / p99 (ms) | gRPC ITL p50 / p99 (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        cells = [str(c)]
        cells += [f"{median(api, c, 'output_tok_s'):.0f}" for api in ("sse", "grpc")]
        for key in ("ttft_ms", "itl_ms"):
            for api in ("sse", "grpc"):
                cells.append(f"{median(api, c, key, 'p50'):.1f} / {median(api, c, key, 'p99'):.1f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(re.sub(r" +", " ", line) for line in out)


if __name__ == "__main__":
    main()
