"""The markdown report of one ``bench/compare.py`` run: side-by-side table, health, commands.

``write_report(run_dir, out)`` reads ``run_dir/manifest.json`` (servers, versions,
commands) and ``run_dir/<server>.jsonl`` (the harness's level rows) and writes ``out``;
``compare.py --render-only RUN_DIR`` calls it again on an old run. Stdlib only.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine_summary() -> dict[str, Any]:
    """CPU model, cores, memory and whether the CPU has AVX-512 BF16."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                info["avx512_bf16"] = "avx512_bf16" in line.split()
                break
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def _time(ms: float | None) -> str:
    if ms is None:
        return "—"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s" if ms < 10_000 else f"{ms / 1000:.0f} s"
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def _pair(dist: dict[str, Any] | None) -> str:
    if not dist:
        return "—"
    return f"{_time(dist.get('p50'))} / {_time(dist.get('p99'))}"


def _rows(run_dir: Path, name: str) -> dict[int, dict[str, Any]]:
    path = run_dir / f"{name}.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["concurrency"]): r for r in rows}


def side_by_side(run_dir: Path, servers: list[dict[str, Any]]) -> list[str]:
    """One row per concurrency, three columns per server."""
    by_server = {s["name"]: _rows(run_dir, s["name"]) for s in servers}
    levels = sorted({c for rows in by_server.values() for c in rows})
    header = ["C"]
    for s in servers:
        header += [f"{s['name']} tok/s", f"{s['name']} TTFT p50 / p99"]
        header += [f"{s['name']} ITL p50 / p99"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in levels:
        cells = [str(c)]
        for s in servers:
            row = by_server[s["name"]].get(c)
            if row is None:
                cells += ["—", "—", "—"]
                continue
            flag = "" if row["errors"] == 0 and row["cancelled"] == 0 else " ⚠"
            cells += [f"{row['output_tok_s']:.0f}{flag}", _pair(row["ttft_ms"])]
            cells += [_pair(row["itl_ms"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def against_best_peer(run_dir: Path, servers: list[dict[str, Any]]) -> list[str]:
    """Issue 5's goal per level: rillet's tok/s >= 1.2x the best peer's, ITL p99 no worse."""
    ours = _rows(run_dir, "rillet")
    peers = {s["name"]: _rows(run_dir, s["name"]) for s in servers if s["name"] != "rillet"}
    if not ours or not any(peers.values()):
        return []
    lines = [
        "| C | best peer (tok/s) | rillet / best peer tok/s | rillet TTFT p99 | ITL p99 rillet"
        " / best peer |",
        "|---|---|---|---|---|",
    ]
    for c, row in sorted(ours.items()):
        rivals = [(rows[c], name) for name, rows in peers.items() if c in rows]
        if not rivals:
            continue
        best, name = max(rivals, key=lambda pair: pair[0]["output_tok_s"] or 0.0)
        ratio = (row["output_tok_s"] or 0.0) / best["output_tok_s"] if best["output_tok_s"] else 0
        lines.append(
            f"| {c} | {name} ({best['output_tok_s']:.0f}) | {ratio:.2f}x"
            f" | {_time(row['ttft_ms']['p99'])}"
            f" | {_time(row['itl_ms']['p99'])} / {_time(best['itl_ms']['p99'])} |"
        )
    return lines


def health(run_dir: Path, servers: list[dict[str, Any]]) -> list[str]:
    """Per level: did every request finish, at max_tokens, on an otherwise idle machine?"""
    lines = [
        "| server | C | ok / started / planned | errors | cancelled at cap | reached max_tokens"
        " | tokens per delta | TPOT p50 | server cores | other cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in servers:
        for c, r in sorted(_rows(run_dir, s["name"]).items()):
            errors = str(r["errors"]) + (f" {r['error_kinds']}" if r["error_kinds"] else "")
            lines.append(
                f"| {s['name']} | {c} | {r['ok']} / {r['started']} / {r['planned']} | {errors}"
                f" | {r['cancelled']} | {r['reached_max_tokens']} | {r['tokens_per_delta']}"
                f" | {_time(r['tpot_ms']['p50'])} | {r.get('server_cpu_cores')}"
                f" | {r.get('other_cpu_cores')} |"
            )
    return lines


def _plot(run_dir: Path) -> Path | None:
    """serve.png beside the JSON lines when matplotlib is there; None otherwise."""
    files = sorted(str(p) for p in run_dir.glob("*.jsonl") if ".requests." not in p.name)
    if not files:
        return None
    out = run_dir / "serve.png"
    command = [sys.executable, str(ROOT / "bench/plot.py"), *files, "--out", str(out)]
    done = subprocess.run(command, capture_output=True)
    return out if done.returncode == 0 else None


def write_report(run_dir: Path, out: Path) -> Path:
    """Render ``run_dir`` into the markdown file ``out``; returns ``out``."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    servers: list[dict[str, Any]] = manifest["servers"]
    machine = manifest.get("machine", {})
    rel = os.path.relpath(run_dir, out.parent)
    text = [
        "# Streaming serve benchmark: rillet and its peers, side by side",
        "",
        f"Run of {manifest['started_at']} on {machine.get('cpu', '?')}, "
        f"{machine.get('cores', '?')} cores, {machine.get('memory_gib', '?')} GiB "
        f"(AVX-512 BF16: {machine.get('avx512_bf16', '?')}); servers one after another.",
        "",
        "Harness: `bench/serve.py` (= `rillet bench`), OpenAI chat route, streaming, closed loop"
        f" with C requests in flight: `{' '.join(manifest['harness_args'])}`. Every request asks"
        " for `ignore_eos` and `stream_options.include_usage`; tokens/s counts `usage` tokens"
        " where the server sends them. TTFT = first content delta; ITL = gap between content"
        " deltas. ⚠ = some requests failed or were cancelled at the level's time cap (see"
        " below). Reproduce: `.venv/bin/python bench/compare.py "
        + " ".join(manifest.get("argv", []))
        + "`",
        "",
        *side_by_side(run_dir, servers),
        "",
    ]
    plot = _plot(run_dir)
    if plot is not None:
        text += [f"![tok/s and TTFT vs concurrency]({os.path.relpath(plot, out.parent)})", ""]
    goal = against_best_peer(run_dir, servers)
    if goal:
        text += ["## rillet against the best peer at each level", "", *goal, ""]
    text += ["## Each level's health", "", *health(run_dir, servers), ""]
    text += ["## Servers", ""]
    for s in servers:
        versions = ", ".join(f"{k} {v}" for k, v in (s.get("versions") or {}).items())
        text += [
            f"### {s['name']}: {s['title']}",
            "",
            f"- status: {s['status']}; versions: {versions or 'unknown'}"
            + (f"; ready {s['startup_s']} s after start" if "startup_s" in s else ""),
            f"- command: `{s.get('command', '')}`",
            f"- request extras: `{json.dumps(s.get('extra_body') or {})}`"
            + (f"; {s['note']}" if s.get("note") else ""),
            f"- data: `{rel}/{s['name']}.jsonl`, server log `{rel}/{s['name']}.log`",
            "",
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    return out
