"""Percentiles and the summary of one concurrency level (one JSON line).

Definitions, so that numbers from different servers mean the same thing:

* TTFT: request sent -> first non-empty content delta, over successful requests.
* ITL: gaps between consecutive content deltas, pooled over successful requests. A server
  that merges several tokens into one delta shows fewer, longer gaps: ``tokens_per_delta``
  says how much merging happened, and TPOT does not depend on it.
* TPOT: per request, (latency - TTFT) / (tokens - 1), tokens from ``usage`` when sent.
* output tok/s: every token received during the level (cancelled requests' partial output
  included, counted as deltas) divided by the level's wall time.
* prompt tok/s: the ``usage.prompt_tokens`` of successful requests over the wall time.
* goodput: the share of started requests that succeeded and met every latency target
  (``--goodput ttft=500,itl=50``, in ms), and those requests per second. A request's ``itl``
  is the p99 of its own gaps, so one long stall fails it; ``tpot`` its mean time per token;
  ``e2el`` its whole latency.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from rillet.benchmark.stream import RequestRecord

PERCENTILES: tuple[int, ...] = (50, 90, 99)
#: Where a request's time to first token went, by the server's timing (``--server-timing``;
#: ``RequestRecord.ttft_split``): the parts add up to the TTFT the client measured.
TTFT_PARTS: tuple[str, ...] = ("queue", "prefill", "server", "network")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, p50/p90/p99 and max of values in seconds, reported in milliseconds."""

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000.0, 3)

    summary: dict[str, float | None] = {"mean": ms(sum(values) / len(values)) if values else None}
    for q in PERCENTILES:
        summary[f"p{q}"] = ms(percentile(values, q))
    summary["max"] = ms(max(values)) if values else None
    return summary


def summarize_level(
    records: Sequence[RequestRecord],
    *,
    concurrency: int,
    num_planned: int,
    max_tokens: int,
    wall: float,
    goodput: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The level's counts, throughput and latency distributions (times in ms).

    Counts add up: ``started == ok + errors + cancelled`` and ``started <= planned``.
    """
    ok = [r for r in records if r.ok]
    cancelled = [r for r in records if r.cancelled]
    failed = [r for r in records if not r.ok and not r.cancelled]
    # Cancelled requests carry no usage chunk: their deltas are the best count we have.
    tokens = sum(r.num_tokens for r in ok) + sum(r.num_deltas for r in cancelled)
    deltas = sum(r.num_deltas for r in ok)
    tpots = [tpot for r in ok if (tpot := _tpot(r)) is not None]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "planned": num_planned,
        "started": len(records),
        "ok": len(ok),
        "errors": len(failed),
        "cancelled": len(cancelled),
        "error_kinds": dict(Counter(_error_kind(r.error) for r in failed)),
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "output_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "prompt_tokens": prompt_tokens,
        "prompt_tok_s": round(prompt_tokens / wall, 2) if wall > 0 else None,
        "usage_reported": sum(1 for r in ok if r.usage_tokens is not None),
        # With ignore_eos every request should hit its cap; fewer means the server ignored it.
        "reached_max_tokens": sum(1 for r in ok if r.num_tokens >= (r.max_tokens or max_tokens)),
        "tokens_per_request_mean": round(tokens / len(ok), 2) if ok else None,
        "tokens_per_delta": round(sum(r.num_tokens for r in ok) / deltas, 3) if deltas else None,
        "finish_reasons": dict(Counter(str(r.finish_reason) for r in ok)),
        "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": distribution_ms([g for r in ok for g in r.gaps]),
        "tpot_ms": distribution_ms(tpots),
        "latency_ms": distribution_ms([r.latency for r in ok if r.latency is not None]),
    }
    splits = [split for r in ok if (split := r.ttft_split()) is not None]
    if splits:
        row["ttft_split_ms"] = {
            part: distribution_ms([split[part] for split in splits]) for part in TTFT_PARTS
        }
    if goodput:
        good = sum(1 for r in ok if meets(r, goodput))
        row["goodput"] = {
            "targets_ms": dict(goodput),
            "good": good,
            "share": round(good / len(records), 4) if records else None,
            "requests_per_s": round(good / wall, 3) if wall > 0 else None,
        }
    return row


def _tpot(record: RequestRecord) -> float | None:
    """Mean seconds per token after the first, by the token count (not the deltas)."""
    if record.latency is None or record.ttft is None or record.num_tokens < 2:
        return None
    return (record.latency - record.ttft) / (record.num_tokens - 1)


def meets(record: RequestRecord, targets_ms: Mapping[str, float]) -> bool:
    """Whether a successful request met every latency target (see the module docstring)."""
    measured = {
        "ttft": record.ttft,
        "itl": percentile(record.gaps, 99) if record.gaps else 0.0,
        "tpot": _tpot(record) or 0.0,
        "e2el": record.latency,
    }
    for name, target in targets_ms.items():
        value = measured[name]
        if value is None or value * 1000.0 > target:
            return False
    return True


def _error_kind(error: str | None) -> str:
    """Errors grouped by their first words, so 64 timeouts make one entry, not 64."""
    return " ".join((error or "unknown").split()[:6])[:80]


def level_of(row: Mapping[str, Any]) -> float:
    """A row's level: its request rate in an open loop, else its concurrency."""
    rate = row.get("request_rate")
    return float(rate) if rate is not None else float(row["concurrency"])


def level_name(row: Mapping[str, Any]) -> str:
    """How a row's level reads: ``2/s`` in an open loop, ``16`` in a closed one."""
    suffix = "/s" if row.get("request_rate") is not None else ""
    return f"{level_of(row):g}{suffix}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of level rows, for the terminal (times in ms)."""
    columns: list[tuple[str, int]] = [
        ("level", 6),
        ("ok/sent", 8),
        ("err", 4),
        ("cncl", 4),
        ("wall_s", 7),
        ("tok/s", 8),
        ("in_tok/s", 8),
        ("ttft50", 7),
        ("ttft99", 7),
        ("itl50", 7),
        ("itl99", 7),
        ("tpot50", 7),
        ("tok/req", 7),
        ("good%", 6),
        ("srv_cpu", 7),
        ("other", 6),
    ]
    lines = [" ".join(name.rjust(width) for name, width in columns)]
    for row in rows:
        good = row.get("goodput")
        share = good["share"] if good else None
        cells = [
            level_name(row),
            f"{row['ok']}/{row['started']}",
            row["errors"],
            row["cancelled"],
            row["wall_s"],
            row["output_tok_s"],
            row.get("prompt_tok_s"),
            row["ttft_ms"]["p50"],
            row["ttft_ms"]["p99"],
            row["itl_ms"]["p50"],
            row["itl_ms"]["p99"],
            row["tpot_ms"]["p50"],
            row["tokens_per_request_mean"],
            None if share is None else 100.0 * share,
            row.get("server_cpu_cores"),
            row.get("other_cpu_cores"),
        ]
        lines.append(
            " ".join(_cell(v).rjust(width) for v, (_, width) in zip(cells, columns, strict=True))
        )
    return "\n".join(lines)


def format_ttft_split(rows: Sequence[dict[str, Any]]) -> str:
    """p50 / p90 of each part of TTFT per level (``--server-timing``), in ms; '' when no
    row has them (the server sent no timing)."""
    timed = [row for row in rows if row.get("ttft_split_ms")]
    if not timed:
        return ""
    header = ["level".rjust(6)] + [f"{part} p50/p90".rjust(17) for part in TTFT_PARTS]
    lines = [" ".join(header)]
    for row in timed:
        cells = [level_name(row).rjust(6)]
        for part in TTFT_PARTS:
            dist = row["ttft_split_ms"][part]
            cells.append(f"{_cell(dist['p50'])} / {_cell(dist['p90'])}".rjust(17))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
