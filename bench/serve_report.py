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


#: Runs from before workloads existed wrote ``<server>.jsonl``: the short chat prompts.
LEGACY_WORKLOAD = {"name": "short", "title": "Short chat prompts (about 30 tokens)", "args": []}


def rows_file(run_dir: Path, server: str, workload: str, kind: str = "") -> Path:
    """Where a server's rows (or, with ``kind="requests"``, its requests) of a workload go;
    the short prompts keep the name they had before there were workloads."""
    parts = [server] + ([workload] if workload != "short" else []) + ([kind] if kind else [])
    return run_dir / (".".join(parts) + ".jsonl")


Level = float  # a concurrency, or an open loop's request rate


def _rows(run_dir: Path, name: str, workload: str) -> dict[Level, dict[str, Any]]:
    path = rows_file(run_dir, name, workload)
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {_level(r): r for r in rows}


def _level(row: dict[str, Any]) -> Level:
    rate = row.get("request_rate")
    return float(rate) if rate is not None else int(row["concurrency"])


def _level_text(level: Level, open_loop: bool) -> str:
    return f"{level:g}/s" if open_loop else str(level)


def side_by_side(run_dir: Path, servers: list[dict[str, Any]], workload: str) -> list[str]:
    """One row per level, four columns per server."""
    by_server = {s["name"]: _rows(run_dir, s["name"], workload) for s in servers}
    levels = sorted({c for rows in by_server.values() for c in rows})
    open_loop = any(r.get("request_rate") for rows in by_server.values() for r in rows.values())
    header = ["rate" if open_loop else "C"]
    for s in servers:
        header += [f"{s['name']} tok/s (prompt tok/s)", f"{s['name']} TTFT p50 / p99"]
        header += [f"{s['name']} ITL p50 / p99"]
        if open_loop:
            header += [f"{s['name']} goodput"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in levels:
        cells = [_level_text(c, open_loop)]
        for s in servers:
            row = by_server[s["name"]].get(c)
            if row is None:
                cells += ["—"] * (4 if open_loop else 3)
                continue
            flag = "" if row["errors"] == 0 and row["cancelled"] == 0 else " ⚠"
            prompt = row.get("prompt_tok_s")
            prompt_text = f" ({prompt:.0f})" if prompt else ""
            cells += [f"{row['output_tok_s']:.0f}{prompt_text}{flag}", _pair(row["ttft_ms"])]
            cells += [_pair(row["itl_ms"])]
            if open_loop:
                good = row.get("goodput") or {}
                share = good.get("share")
                cells += ["—" if share is None else f"{100 * share:.0f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def against_best_peer(run_dir: Path, servers: list[dict[str, Any]], workload: str) -> list[str]:
    """Per level: rillet's tok/s and TTFT p50 against the best peer's (by tok/s)."""
    ours = _rows(run_dir, "rillet", workload)
    peers = {
        s["name"]: _rows(run_dir, s["name"], workload) for s in servers if s["name"] != "rillet"
    }
    if not ours or not any(peers.values()):
        return []
    open_loop = any(r.get("request_rate") for r in ours.values())
    lines = [
        "| level | best peer (tok/s) | rillet / best peer tok/s | TTFT p50 rillet / best peer"
        " | ITL p99 rillet / best peer |",
        "|---|---|---|---|---|",
    ]
    for c, row in sorted(ours.items()):
        rivals = [(rows[c], name) for name, rows in peers.items() if c in rows]
        if not rivals:
            continue
        best, name = max(rivals, key=lambda pair: pair[0]["output_tok_s"] or 0.0)
        ratio = (row["output_tok_s"] or 0.0) / best["output_tok_s"] if best["output_tok_s"] else 0
        ours_ttft, best_ttft = row["ttft_ms"]["p50"], best["ttft_ms"]["p50"]
        ttft_ratio = f" ({ours_ttft / best_ttft:.2f}x)" if ours_ttft and best_ttft else ""
        lines.append(
            f"| {_level_text(c, open_loop)} | {name} ({best['output_tok_s']:.0f}) | {ratio:.2f}x"
            f" | {_time(ours_ttft)} / {_time(best_ttft)}{ttft_ratio}"
            f" | {_time(row['itl_ms']['p99'])} / {_time(best['itl_ms']['p99'])} |"
        )
    return lines


def best_rate_with_goodput(
    run_dir: Path, servers: list[dict[str, Any]], workload: str, share: float = 0.9
) -> list[str]:
    """The open loop's headline: per server, the highest rate where goodput >= ``share``."""
    lines = []
    for s in servers:
        rows = _rows(run_dir, s["name"], workload)
        passing = [
            rate
            for rate, row in rows.items()
            if row.get("request_rate") and (row.get("goodput") or {}).get("share", 0) >= share
        ]
        if rows:
            best = f"{max(passing):g} requests/s" if passing else "none of the rates run"
            lines.append(f"- {s['name']}: {best}")
    return lines


def health(run_dir: Path, servers: list[dict[str, Any]], workload: str) -> list[str]:
    """Per level: did every request finish, at max_tokens, on an otherwise idle machine?"""
    lines = [
        "| server | level | ok / started / planned | errors | cancelled at cap"
        " | reached max_tokens | tokens per delta | TPOT p50 | server cores | other cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in servers:
        for c, r in sorted(_rows(run_dir, s["name"], workload).items()):
            errors = str(r["errors"]) + (f" {r['error_kinds']}" if r["error_kinds"] else "")
            level = _level_text(c, bool(r.get("request_rate")))
            lines.append(
                f"| {s['name']} | {level} | {r['ok']} / {r['started']} / {r['planned']}"
                f" | {errors} | {r['cancelled']} | {r['reached_max_tokens']}"
                f" | {r['tokens_per_delta']} | {_time(r['tpot_ms']['p50'])}"
                f" | {r.get('server_cpu_cores')} | {r.get('other_cpu_cores')} |"
            )
    return lines


def _plot(run_dir: Path, servers: list[dict[str, Any]], workload: dict[str, Any]) -> Path | None:
    """``<workload>.png`` beside the JSON lines when matplotlib is there; None otherwise."""
    files = [rows_file(run_dir, s["name"], workload["name"]) for s in servers]
    files = [f for f in files if f.exists()]
    if not files:
        return None
    out = run_dir / f"{workload['name']}.png"
    command = [sys.executable, str(ROOT / "bench/plot.py"), *map(str, files), "--out", str(out)]
    command += ["--title", workload["title"]]
    done = subprocess.run(command, capture_output=True)
    return out if done.returncode == 0 else None


def _shown_args(args: list[str]) -> str:
    return " ".join(args).replace(f"{ROOT}/", "")


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
        "Harness: `bench/serve.py` (= `rillet bench`), OpenAI chat route unless a workload says"
        " otherwise, streaming, closed loop with C requests in flight unless a workload is open"
        f" loop: `{' '.join(manifest['harness_args'])}`. Every request asks"
        " for `ignore_eos` and `stream_options.include_usage`; tokens/s counts `usage` tokens"
        " where the server sends them. TTFT = first content delta; ITL = gap between content"
        " deltas; prompt tok/s = `usage.prompt_tokens` per second. ⚠ = some requests failed"
        " or were cancelled at the level's time cap (see"
        " below). Reproduce: `.venv/bin/python bench/compare.py "
        + " ".join(manifest.get("argv", []))
        + "`",
        "",
    ]
    for workload in manifest.get("workloads") or [LEGACY_WORKLOAD]:
        name = workload["name"]
        text += [f"## {workload['title']}", ""]
        if workload["args"]:
            text += [f"Harness options of this workload: `{_shown_args(workload['args'])}`", ""]
        text += [*side_by_side(run_dir, servers, name), ""]
        plot = _plot(run_dir, servers, workload)
        if plot is not None:
            text += [f"![{workload['title']}]({os.path.relpath(plot, out.parent)})", ""]
        goal = against_best_peer(run_dir, servers, name)
        if goal:
            text += ["rillet against the best peer at each level:", "", *goal, ""]
        if any(arg == "--goodput" for arg in workload["args"]):
            text += ["Highest rate with at least 90 % goodput:", ""]
            text += [*best_rate_with_goodput(run_dir, servers, name), ""]
        text += ["<details><summary>Each level's health</summary>", ""]
        text += [*health(run_dir, servers, name), "", "</details>", ""]
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
            f"- data: `{rel}/{s['name']}*.jsonl`, server log `{rel}/{s['name']}.log`",
            "",
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    return out
