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

Stdlib only; the load is ``bench/serve.py`` (``rillet bench``), run with the project venv.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import sys
import time
from pathlib import Path

from harness import ROOT, load, start_server


def run(
    args: argparse.Namespace,
    api: str,
    url: str,
    target: str,
    model: str,
    out: Path,
    round_: int,
    pid: int,
) -> list[dict]:
    extra = ("--api", "grpc", "--grpc-url", target) if api == "grpc" else ()
    lines = out / f"{api}-{round_}.jsonl"
    return load(args, f"{api} round {round_}", url, model, lines, server_pid=pid, extra=extra)


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
