"""``bench/serve.py`` (``rillet bench``) against a real ``rillet serve``, and its arithmetic.

The load test is tiny (4 requests of 8 tokens per level) and asserts what the harness
counts and how it writes it, never how fast the server was.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from rillet.benchmark.runner import arrival_offsets
from rillet.benchmark.stats import meets, percentile, summarize_level
from rillet.benchmark.stream import RequestRecord
from rillet.cli import build_parser
from server_process import ServerHandle

SERVE_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


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


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_constrained_run_sends_the_schema_and_reaches_max_tokens(
    server: ServerHandle, tmp_path: Path
) -> None:
    """``--response-format json_schema``: the built-in schema outlasts max_tokens, so
    every request is cut at the limit without ignore_eos."""
    requests_out = tmp_path / "requests.jsonl"
    argv = [sys.executable, str(SERVE_SCRIPT), "--url", server.url, "--no-progress"]
    argv += ["--concurrency", "1,2", "--requests-per-level", "2", "--max-tokens", "12"]
    argv += ["--response-format", "json_schema", "--requests-out", str(requests_out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    for row in rows:
        assert (row["ok"], row["errors"]) == (2, 0)
        assert row["finish_reasons"] == {"length": 2}
        assert row["output_tokens"] == 2 * 12


def test_the_constrained_body_has_response_format_and_no_ignore_eos() -> None:
    args = build_parser().parse_args(["bench", "--response-format", "json_schema"])
    from rillet.benchmark.cli import config_from_args
    from rillet.benchmark.constraint import LONG_SCHEMA

    body = config_from_args(args).body(config_from_args(args).prompt(0))
    assert body["response_format"]["json_schema"]["schema"] == LONG_SCHEMA
    assert "ignore_eos" not in body
    plain = config_from_args(build_parser().parse_args(["bench"]))
    assert plain.body(plain.prompt(0))["ignore_eos"] is True
    assert "response_format" not in plain.body(plain.prompt(0))


@pytest.mark.parametrize("api", ["chat", "grpc"])
def test_server_timing_splits_each_ttft_into_parts_that_add_up(
    server: ServerHandle, tmp_path: Path, api: str
) -> None:
    """``--server-timing`` against a real server: every request's TTFT has its four parts,
    they add up to it (to the rounding of each to a microsecond), and each level prints and
    plots their p50/p90."""
    requests_out, plot = tmp_path / "requests.jsonl", tmp_path / "plot.png"
    argv = [sys.executable, str(SERVE_SCRIPT), "--url", server.url, "--api", api]
    model = httpx.get(f"{server.url}/info").json()["model_id"]
    argv += ["--model", model, "--grpc-url", server.grpc_target]
    argv += ["--concurrency", "1,2", "--requests-per-level", "3", "--max-tokens", "6"]
    argv += ["--server-timing", "--no-progress", "--requests-out", str(requests_out)]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    argv += ["--plot", str(plot)] if has_matplotlib else []
    done = subprocess.run(argv, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr

    rows = [json.loads(line) for line in done.stdout.splitlines()]
    for row in rows:
        split = row["ttft_split_ms"]
        assert list(split) == ["queue", "prefill", "server", "network"]
        for dist in split.values():
            assert dist["p50"] is not None and dist["p50"] <= dist["p90"]
    per_request = [json.loads(line) for line in requests_out.read_text().splitlines()]
    assert len(per_request) == 6
    for r in per_request:
        parts = r["ttft_split_ms"]
        assert parts["queue"] >= 0 and parts["prefill"] >= 0
        assert parts["network"] >= 0  # the client's wait contains the server's
        assert abs(sum(parts.values()) - r["ttft_ms"]) < 0.01
    assert "TTFT by the server's timing (ms)" in done.stderr
    assert "queue p50/p90" in done.stderr
    if has_matplotlib:
        ttft_plot = tmp_path / "plot-ttft.png"
        assert ttft_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_is_a_rillet_command() -> None:
    args = build_parser().parse_args(["bench", "--concurrency", "1,2", "--no-ignore-eos"])
    assert args.command == "bench"
    assert (args.concurrency, args.ignore_eos, args.include_usage) == ("1,2", False, True)
    assert callable(args.func)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_open_loop_on_a_dataset_counts_goodput_and_each_requests_own_length(
    server: ServerHandle, tmp_path: Path
) -> None:
    dataset = tmp_path / "conversations.json"
    turns = [
        [("human", "Name a colour."), ("gpt", "Blue is a colour " * 2)],  # 8 tokens or so
        [("system", "Be brief."), ("human", "Say hi to me."), ("gpt", "Hi there, my friend!")],
        [
            ("human", "Count to three."),
            ("gpt", "One, two, three."),
            ("human", "Now to five."),
            ("gpt", "One, two, three, four, five."),
        ],
    ]
    entries = [
        {"id": str(i), "conversations": [{"from": f, "value": v} for f, v in conversation]}
        for i, conversation in enumerate(turns)
    ]
    dataset.write_text(json.dumps(entries))
    argv = [sys.executable, str(SERVE_SCRIPT), "--url", server.url, "--no-progress"]
    argv += ["--dataset", str(dataset), "--request-rate", "20,40", "--concurrency", "2"]
    argv += ["--requests-per-level", "6", "--goodput", "ttft=600000,itl=600000"]
    argv += ["--requests-out", str(tmp_path / "requests.jsonl")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr

    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["loop"], r["request_rate"], r["concurrency"]) for r in rows] == [
        ("open", 20.0, 2),
        ("open", 40.0, 2),
    ]
    per_request = [
        json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()
    ]
    for row in rows:
        assert (row["planned"], row["ok"], row["errors"], row["cancelled"]) == (6, 6, 0, 0)
        # Each request asked for its answer's length and got exactly that (ignore_eos).
        assert row["reached_max_tokens"] == 6
        assert row["goodput"] == {
            "targets_ms": {"ttft": 600000.0, "itl": 600000.0},
            "good": 6,
            "share": 1.0,
            "requests_per_s": row["goodput"]["requests_per_s"],
        }
        assert row["prompt_tokens"] > 0 and row["prompt_tok_s"] > 0
    # Every conversation's answer length appears: the file's three, twice each per level.
    lengths = sorted(r["max_tokens"] for r in per_request)
    assert len(set(lengths)) == 3 and lengths == sorted(lengths[::2] * 2)
    assert all(r["num_tokens"] == r["max_tokens"] for r in per_request)


@pytest.mark.parametrize(
    "bad",
    [
        ["--concurrency", "0,4"],
        ["--concurrency", "one"],
        ["--extra-body", "[1]"],
        ["--request-rate", "0"],
        ["--request-rate", "fast"],
        ["--request-rate", "1", "--concurrency", "1,4"],
        ["--goodput", "ttft"],
        ["--goodput", "latency=5"],
        ["--goodput", "ttft=-1"],
        ["--dataset", "/nonexistent.json"],
        ["--dataset", "/nonexistent.json", "--input-tokens", "16"],
        ["--schema", "/nonexistent.json"],
        ["--response-format", "json_schema", "--schema", "/nonexistent.json"],
        ["--response-format", "json_object", "--schema", "/nonexistent.json"],
        ["--response-format", "json_object", "--api", "grpc"],
    ],
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


def test_goodput_needs_every_target_met_and_counts_failures_as_missed() -> None:
    fast = _record(0, ttft=0.1, latency=0.5, gaps=[0.02] * 99 + [0.3], num_deltas=101)
    stalled = _record(1, ttft=0.1, latency=0.5, gaps=[0.02] * 90 + [0.3] * 10, num_deltas=101)
    slow_start = _record(2, ttft=0.9, latency=1.2, gaps=[0.01] * 9, num_deltas=10)
    failed = _record(3, error="HTTP 429: overloaded")
    targets = {"ttft": 500.0, "itl": 50.0}
    # One stall in a hundred gaps is under the request's p99; ten are not.
    assert [meets(r, targets) for r in (fast, stalled, slow_start)] == [True, False, False]
    row = summarize_level(
        [fast, stalled, slow_start, failed],
        concurrency=4,
        num_planned=4,
        max_tokens=100,
        wall=2.0,
        goodput=targets,
    )
    assert row["goodput"] == {
        "targets_ms": targets,
        "good": 1,
        "share": 0.25,
        "requests_per_s": 0.5,
    }
    assert "goodput" not in summarize_level(
        [fast], concurrency=1, num_planned=1, max_tokens=1, wall=1
    )


def test_poisson_arrivals_are_seeded_increasing_and_at_the_rate() -> None:
    offsets = arrival_offsets(2000, rate=4.0, seed=7)
    assert offsets == arrival_offsets(2000, rate=4.0, seed=7)
    assert offsets != arrival_offsets(2000, rate=4.0, seed=8)
    assert all(a < b for a, b in itertools.pairwise(offsets))
    # 2,000 exponential gaps of mean 0.25 s: the sum is within 10 % of 500 s (about 4.5 sigma).
    assert 450 < offsets[-1] < 550


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
