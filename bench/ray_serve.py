#!/usr/bin/env python3
"""rillet on Ray Serve against ``rillet serve``, on this machine, in one run.

Three systems, each loaded in turn with the same chat load (``bench/serve.py``: streamed
chat completions, greedy, ``ignore_eos``, c=1,16,64):

- ``direct``: ``rillet serve --threads 2`` (the engine in its own process, as always);
- ``ray 1x2``: ``rillet.deploy.ray:app`` with 1 replica of 2 threads, behind Serve's proxy:
  against ``direct`` this is the proxy's cost per token;
- ``ray 2x1``: 2 replicas of 1 thread each.

One local Ray cluster (``ray.init(num_cpus=2)``) serves both Ray systems in turn. Around each
system's load the CPU time of its processes is read from ``/proc``, by role: Serve's HTTP
proxy, the replicas' actor processes (the app, the ASGI bridge, Ray's streaming), and the
engine processes; divided by the tokens served, that is what each role costs per token.
Prints markdown tables; JSON lines go to ``bench/out/ray-<time>/``. Needs the ray extra
(``scripts/setup.sh --ray``).

    .venv/bin/python bench/ray_serve.py                      # c=1,16,64
    .venv/bin/python bench/ray_serve.py --concurrency 1,16 --systems direct,ray-1x2
    .venv/bin/python bench/ray_serve.py --merge-steps 1,4    # merging off, then on

``--merge-steps`` runs each system once per value of ``--max-merge-steps`` (the most engine
steps a stream's tokens may be held to go out as one event when the host is busy; 1: every
token at once), labelled ``system mN``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path

from harness import ROOT, children, free_port, load, start_server

SYSTEMS = ("direct", "ray-1x2", "ray-2x1")
TICKS = os.sysconf("SC_CLK_TCK")


def processes(title: str) -> list[int]:
    """Pids whose command line starts with ``title`` (Ray titles its workers ``ray::...``)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(title.encode()):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (not their children), from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def measured(
    roles: dict[str, list[int]], run: Callable[[], list[dict]]
) -> tuple[list[dict], dict[str, float]]:
    """Runs ``run()`` (a load) and returns its rows and each role's CPU ms per token."""
    before = {role: cpu_seconds(pids) for role, pids in roles.items()}
    rows = run()
    tokens = sum(row["output_tokens"] for row in rows)
    spent = {role: cpu_seconds(pids) - before[role] for role, pids in roles.items()}
    return rows, {role: 1000 * seconds / tokens for role, seconds in spent.items()}


def load_system(
    args: argparse.Namespace, system: str, url: str, out: Path, pid: int | None
) -> list[dict]:
    with urllib.request.urlopen(url + "/info", timeout=30) as response:
        model = json.load(response)["model_id"]
    extra = (
        () if args.requests_per_level is None else ("--requests-per-level", args.requests_per_level)
    )
    lines = out / f"{system}.jsonl"
    try:
        return load(args, system, url, model, lines, server_pid=pid, extra=tuple(map(str, extra)))
    except subprocess.CalledProcessError:
        # A level with errors or requests cancelled at its time cap: keep its row (the
        # table's errors column says so) rather than lose the whole run.
        return [json.loads(line) for line in lines.read_text().splitlines()]


def run_direct(
    args: argparse.Namespace, out: Path, label: str, merge_steps: int
) -> tuple[list[dict], dict[str, float]]:
    proc, url, _, _ = start_server(out, "2", ("--max-merge-steps", str(merge_steps)))
    try:
        roles = {"HTTP server": [proc.pid], "engine": children(proc.pid)}
        return measured(roles, partial(load_system, args, label, url, out, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def run_on_ray(
    args: argparse.Namespace, out: Path, systems: list[str], merge_steps: list[int]
) -> dict[str, tuple[list[dict], dict[str, float]]]:
    import ray
    from ray import serve

    from rillet.deploy.ray import RayAppArgs, app

    port = free_port()
    results: dict[str, tuple[list[dict], dict[str, float]]] = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for system, steps in ((s, m) for s in systems for m in merge_steps):
            replicas, threads = (int(n) for n in system.removeprefix("ray-").split("x"))
            options = RayAppArgs(
                num_replicas=replicas,
                threads=threads,
                max_concurrent_requests=512,
                max_merge_steps=steps,
            )
            started = time.monotonic()
            serve.run(app(options), name="rillet", route_prefix="/")
            label = labelled(system, steps, merge_steps)
            print(f"{label}: ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
            replicas = processes("ray::ServeReplica:rillet")
            roles = {
                "Serve proxy": processes("ray::ProxyActor"),
                "replica actors": replicas,
                "engine": [child for pid in replicas for child in children(pid)],
            }
            url = f"http://127.0.0.1:{port}"
            results[label] = measured(roles, partial(load_system, args, label, url, out, None))
            serve.delete("rillet")
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def table(results: dict[str, tuple[list[dict], dict[str, float]]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.max_tokens} tokens out per request, greedy, ignore_eos; streamed chat.",
        "",
        "| system | c | tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | tokens/event | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, (rows, _) in results.items():
        for row in rows:
            ttft, itl = row["ttft_ms"], row["itl_ms"]
            lines.append(
                f"| {system} | {row['concurrency']} | {row['output_tok_s']:.0f} "
                f"| {ttft['p50']:.0f} / {ttft['p99']:.0f} | {itl['p50']:.1f} / {itl['p99']:.1f} "
                f"| {row.get('tokens_per_delta') or 0:.2f} | {row['errors']} |"
            )
    lines += ["", "CPU per token over all levels (ms):", ""]
    lines += ["| system | " + " | ".join(ROLES) + " | all |", "|---" * (len(ROLES) + 2) + "|"]
    for system, (_, cost) in results.items():
        cells = [f"{cost[role]:.2f}" if role in cost else "-" for role in ROLES]
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {sum(cost.values()):.2f} |")
    return "\n".join(lines)


ROLES = ("HTTP server", "Serve proxy", "replica actors", "engine")


def labelled(system: str, steps: int, merge_steps: list[int]) -> str:
    """``ray-1x2 m4``, or the bare name when one merge setting runs."""
    return system if len(merge_steps) == 1 else f"{system} m{steps}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--level-timeout", type=float, default=150.0)
    parser.add_argument(
        "--requests-per-level", type=int, help="default: bench/serve.py's, max(8, 4 x c)"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--merge-steps", default="4", help="values of --max-merge-steps to run (default: 4)"
    )
    args = parser.parse_args()
    systems = args.systems.split(",")
    merge_steps = [int(m) for m in args.merge_steps.split(",")]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    out = ROOT / "bench" / "out" / time.strftime("ray-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    results: dict[str, tuple[list[dict], dict[str, float]]] = {}
    if "direct" in systems:
        for steps in merge_steps:
            label = labelled("direct", steps, merge_steps)
            results[label] = run_direct(args, out, label, steps)
            print(f"{label}: done", file=sys.stderr)
    on_ray = [s for s in systems if s != "direct"]
    if on_ray:
        results |= run_on_ray(args, out, on_ray, merge_steps)
    print(table(results, args))
    print(f"\nJSON lines: {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
