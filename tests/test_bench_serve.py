"""``bench/serve.py`` (``rillet bench``) against a real ``rillet serve``, and its arithmetic.

The load test is tiny (4 requests of 8 tokens per level) and asserts what the harness
counts and how it writes it, never how fast the server was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rillet.benchmark.stats import percentile, summarize_level
from rillet.benchmark.stream import RequestRecord
from rillet.cli import build_parser
from server_process import ServerHandle

SERVE_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "serve.py"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_serve_script_measures_a_real_server(server: ServerHandle, tmp_path: Path) -> None:
    out, requests_out = tmp_path / "levels.jsonl", tmp_path / "requests.jsonl"
    argv = [sys.executable, str(SERVE_SCRIPT), "--url", f"{server.url}/v1"]
    argv += ["--concurrency", "1,2", "--requests-per-level", "4", "--max-tokens", "8"]
    argv += ["--label", "rillet-test", "--server-pid", str(server.proc.pid), "--no-progress"]
    argv += ["--out", str(out), "--requests-out", str(requests_out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr

    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert out.read_text().splitlines() == done.stdout.splitlines()
    per_request = [json.loads(line) for line in requests_out.read_text().splitlines()]
    for row in rows:
        assert row["label"] == "rillet-test"
        assert (row["planned"], row["started"], row["ok"]) == (4, 4, 4)
        assert (row["errors"], row["cancelled"], row["error_kinds"]) == (0, 0, {})
        # ignore_eos + usage: every request reports exactly max_tokens tokens.
        assert row["usage_reported"] == row["reached_max_tokens"] == 4
        assert row["output_tokens"] == 4 * 8
        assert row["finish_reasons"] == {"length": 4}
        for metric in ("ttft_ms", "itl_ms", "tpot_ms", "latency_ms"):
            d = row[metric]
            assert 0 < d["p50"] <= d["p90"] <= d["p99"] <= d["max"], (metric, d)
        assert row["ttft_ms"]["max"] <= row["latency_ms"]["max"]
        assert row["server_cpu_s"] > 0  # the server tree was found and did the work

        mine = [r for r in per_request if r["concurrency"] == row["concurrency"]]
        assert sorted(r["index"] for r in mine) == [0, 1, 2, 3]
        assert sum(r["num_tokens"] for r in mine) == row["output_tokens"]
        for r in mine:
            assert r["ok"] and r["usage_tokens"] == 8 and r["prompt_tokens"] > 0
            assert len(r["gaps_ms"]) == r["num_deltas"] - 1
            assert r["ttft_ms"] <= r["latency_ms"]
        itl_count = sum(len(r["gaps_ms"]) for r in mine)
        assert itl_count == sum(r["num_deltas"] for r in mine) - 4


def test_bench_is_a_rillet_command() -> None:
    args = build_parser().parse_args(["bench", "--concurrency", "1,2", "--no-ignore-eos"])
    assert args.command == "bench"
    assert (args.concurrency, args.ignore_eos, args.include_usage) == ("1,2", False, True)
    assert callable(args.func)


@pytest.mark.parametrize(
    "bad",
    [["--concurrency", "0,4"], ["--concurrency", "one"], ["--extra-body", "[1]"]],
)
def test_bad_options_exit_2_before_any_request(
    bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["bench", "--url", "http://127.0.0.1:9", *bad])
    assert args.func(args) == 2
    assert "rillet bench:" in capsys.readouterr().err


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def _record(index: int, **fields: Any) -> RequestRecord:
    record = RequestRecord(index)
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def test_level_counts_add_up_with_merged_deltas_errors_and_cancellations() -> None:
    merged = _record(0, ttft=0.1, latency=1.1, gaps=[0.5, 0.5], num_deltas=3, usage_tokens=6)
    no_usage = _record(1, ttft=0.2, latency=0.5, gaps=[0.3], num_deltas=2)
    failed = _record(2, error="HTTP 500: boom", num_deltas=1)
    cut = _record(3, cancelled=True, num_deltas=4)
    row = summarize_level(
        [merged, no_usage, failed, cut], concurrency=2, num_planned=5, max_tokens=6, wall=2.0
    )
    assert (row["planned"], row["started"], row["ok"]) == (5, 4, 2)
    assert (row["errors"], row["cancelled"]) == (1, 1)
    assert row["error_kinds"] == {"HTTP 500: boom": 1}
    # usage where given, deltas otherwise; a cancelled stream's deltas still count.
    assert row["output_tokens"] == 6 + 2 + 4
    assert row["output_tok_s"] == 6.0
    assert row["usage_reported"] == 1 and row["reached_max_tokens"] == 1
    assert row["tokens_per_delta"] == pytest.approx(8 / 5)
    assert row["itl_ms"]["max"] == 500.0
    # TPOT per token, not per delta: (1.1 - 0.1) / 5 and (0.5 - 0.2) / 1.
    assert row["tpot_ms"]["p50"] == pytest.approx(250.0)


def test_plot_draws_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from rillet.benchmark.plot import plot_levels

    def row(label: str, c: int, tok_s: float) -> dict[str, Any]:
        return {
            "label": label,
            "concurrency": c,
            "output_tok_s": tok_s,
            "ttft_ms": {"p50": 10.0 * c, "p99": None if c == 4 else 30.0 * c},
        }

    rows = [row("a", 1, 50.0), row("a", 4, 120.0), row("b", 1, 40.0), row("b", 4, 90.0)]
    path = plot_levels(rows, tmp_path / "sub" / "plot.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
