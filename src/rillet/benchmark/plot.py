"""Throughput and TTFT against concurrency, one line per server label, as a PNG; and, with
``--server-timing``, where TTFT went (queue, prefill, server, network) against the level.

matplotlib is optional (``pip install matplotlib``, or the ``bench`` extra) and imported
only when a plot is asked for, so the load generator itself needs httpx only.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rillet.benchmark.stats import TTFT_PARTS, level_of


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def read_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Level rows from JSON-lines files written by ``rillet bench --out``."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def plot_levels(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draw output tok/s and TTFT p50/p99 (log scale) vs each row's level into ``path``: its
    concurrency, or its request rate in an open loop."""
    plt = _pyplot()
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(str(row.get("label", "?")), []).append(row)

    fig, (ax_tput, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, label_rows in by_label.items():
        label_rows = sorted(label_rows, key=level_of)
        levels = [level_of(r) for r in label_rows]
        (line,) = ax_tput.plot(
            levels, [r["output_tok_s"] or 0 for r in label_rows], marker="o", label=label
        )
        color = line.get_color()
        for quantile, style in (("p50", "-"), ("p99", "--")):
            ttft = [_seconds(r["ttft_ms"][quantile]) for r in label_rows]
            ax_ttft.plot(levels, ttft, style, marker="o", color=color, label=f"{label} {quantile}")
    ticker = importlib.import_module("matplotlib.ticker")
    all_levels = sorted({level_of(r) for r in rows})
    open_loop = any(r.get("request_rate") is not None for r in rows)
    for ax in (ax_tput, ax_ttft):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_levels, [f"{c:g}" for c in all_levels])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel("request rate (requests/s, Poisson)" if open_loop else "concurrent requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    ax_tput.set_ylabel("output tokens/s (aggregate)")
    ax_tput.set_ylim(bottom=0)
    ax_ttft.set_ylabel("time to first token (s)")
    ax_ttft.set_yscale("log")
    # Plain numbers (0.05, 0.2, 1) read faster than 2x10^-1 on a latency axis.
    ax_ttft.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_ttft.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax_ttft.yaxis.set_minor_locator(ticker.NullLocator())
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def plot_ttft_split(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draw the p50 (solid) and p90 (dashed) of each part of TTFT (``ttft_split_ms``, from
    ``--server-timing``) against the level, one panel per server label, into ``path``."""
    plt = _pyplot()
    timed = [row for row in rows if row.get("ttft_split_ms")]
    labels = sorted({str(row.get("label", "?")) for row in timed})
    fig, axes = plt.subplots(1, max(1, len(labels)), figsize=(6 * max(1, len(labels)), 4.2))
    for ax, label in zip(axes if len(labels) > 1 else [axes], labels, strict=True):
        label_rows = sorted((r for r in timed if str(r.get("label", "?")) == label), key=level_of)
        levels = [level_of(r) for r in label_rows]
        for part in TTFT_PARTS:
            (line,) = ax.plot(
                levels,
                [_ms(r["ttft_split_ms"][part]["p50"]) for r in label_rows],
                marker="o",
                label=f"{part} p50",
            )
            ax.plot(
                levels,
                [_ms(r["ttft_split_ms"][part]["p90"]) for r in label_rows],
                "--",
                color=line.get_color(),
                label=f"{part} p90",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [f"{c:g}" for c in levels])
        ax.set_yscale("symlog", linthresh=1.0)  # sub-millisecond parts beside seconds of queue
        ax.set_xlabel("level")
        ax.set_ylabel("ms")
        ax.set_title(label, fontsize="small")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2)
    if title:
        fig.suptitle(f"{title}: where TTFT went")
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (its folder made) and close it."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as exc:
        raise PlotUnavailable(
            "plotting needs matplotlib: pip install matplotlib (or rillet[bench])"
        ) from exc
    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    return importlib.import_module("matplotlib.pyplot")


def _ms(value: float | None) -> float:
    return float("nan") if value is None else value


def _seconds(ms: float | None) -> float:
    # A level with no successful request has no TTFT: NaN leaves a gap in the line.
    return float("nan") if ms is None else ms / 1000.0
