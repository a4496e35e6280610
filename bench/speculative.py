"""Speculative decoding, served: rillet with and without ``--speculative ngram`` (or
``draft:NAME``, system ``rillet-draft``), and
llama-server with and without its own n-gram speculation, on the code-editing workload at
c = 1 (``rillet bench --code-edit``), and rillet's chat workload at higher concurrency.

Each system is started, loaded with ``rillet bench`` (its JSON line: TTFT and TPOT apart,
decode rate = 1 / TPOT, and rillet's acceptance from ``/metrics``), and stopped; runs
alternate systems so a noisy machine's drift hits all of them; the summary is the median
over ``--repeats`` runs.

    PYTHONPATH=src .venv/bin/python bench/speculative.py --systems rillet-off,rillet-ngram
    PYTHONPATH=src .venv/bin/python bench/speculative.py --model qwen2.5-coder-1.5b \\
        --systems rillet-off,rillet-ngram,llama-plain,llama-ngram,llama-ngram-mod,llama-draft
    PYTHONPATH=src .venv/bin/python bench/speculative.py --workload chat --concurrency 16,64
    PYTHONPATH=src .venv/bin/python bench/speculative.py --model qwen2.5-coder-1.5b \
        --workload chat --systems rillet-off,rillet-draft --draft qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import wait_ready

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CODE = ROOT / "bench/data/code_edit_block_manager.py"
#: The llama-server that ``bench/compare.py`` builds (from llama-cpp-python 0.3.36's sdist).
LLAMA_SERVER = (
    ROOT
    / "bench/.venvs/llama-server/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"
)


def gguf_of(model: str | None) -> Path:
    """The GGUF file rillet serves for a catalogue name (llama-server gets the same file)."""
    sys.path.insert(0, str(ROOT / "src"))
    from rillet.models.loader import resolve_model_path

    return resolve_model_path(model)


def commands(args: argparse.Namespace, port: int) -> dict[str, list[str]]:
    model = ["--model", args.model] if args.model else []
    rillet = [PYTHON, "-m", "rillet", "serve", "--port", str(port), *model]
    k = str(args.num_speculative_tokens)
    draft = ["--speculative", f"draft:{args.draft}", "--num-speculative-tokens", k]
    systems = {
        "rillet-off": rillet,
        "rillet-ngram": [*rillet, "--speculative", "ngram", "--num-speculative-tokens", k],
        "rillet-draft": [*rillet, *draft],
    }
    # ``rillet-ngram-k8``, ``rillet-draft-k2``: the same with k fixed by the name, so one run
    # can set several k side by side.
    for name in args.systems.split(","):
        match = re.fullmatch(r"rillet-(ngram|draft)-k(\d+)", name)
        if match:
            method = "ngram" if match[1] == "ngram" else f"draft:{args.draft}"
            systems[name] = [*rillet, "--speculative", method, "--num-speculative-tokens", match[2]]
    if any(name.startswith("llama") for name in args.systems.split(",")):
        llama = [
            *(str(LLAMA_SERVER), "--model", str(gguf_of(args.model)), "--port", str(port)),
            *("--host", "127.0.0.1", "--threads", "2", "--threads-batch", "2"),
            *("--ctx-size", "8192", "--parallel", "1", "--no-webui"),
        ]
        systems["llama-plain"] = llama
        # Its n-gram proposers with their own defaults (the vendored llama.cpp has
        # ngram-simple, ngram-map-k, ngram-map-k4v, ngram-mod and ngram-cache).
        systems["llama-ngram"] = [*llama, "--spec-type", "ngram-simple"]
        systems["llama-ngram-mod"] = [*llama, "--spec-type", "ngram-mod"]
        # Its draft-model speculation with the same draft GGUF rillet-draft uses, on the
        # same 2 threads, with its default draft length (--spec-draft-n-max 3).
        draft_gguf = str(gguf_of(args.draft))
        systems["llama-draft"] = [
            *llama,
            *("--model-draft", draft_gguf, "--spec-type", "draft-simple"),
            *("--threads-draft", "2", "--threads-batch-draft", "2"),
        ]
    return systems


def run_system(name: str, command: list[str], port: int, args: argparse.Namespace) -> list[dict]:
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            wait_ready(url, proc, 300.0)
            lines = Path(tmp) / "rows.jsonl"
            workload = ["--code-edit", str(CODE)] if args.workload == "code-edit" else []
            bench = [
                *(PYTHON, "-m", "rillet", "bench", "--url", url, "--model", "m"),
                *("--concurrency", args.concurrency, "--max-tokens", str(args.max_tokens)),
                *("--requests-per-level", str(args.requests), "--out", str(lines)),
                *("--no-progress", "--label", name, *workload),
            ]
            subprocess.run(bench, check=True, stdout=subprocess.DEVNULL, env=env)
            return [json.loads(line) for line in lines.read_text().splitlines()]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


def summary(row: dict) -> dict[str, object]:
    tpot = row["tpot_ms"]["p50"]
    return {
        "c": row["concurrency"],
        "decode_tok_s": round(1000 / tpot, 2) if tpot else None,
        "ttft_ms": row["ttft_ms"]["p50"],
        "output_tok_s": row["output_tok_s"],
        "acceptance": row.get("spec_acceptance"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="catalogue name (default: bundled SmolLM2)")
    parser.add_argument("--systems", default="rillet-off,rillet-ngram")
    parser.add_argument("--workload", choices=("code-edit", "chat"), default="code-edit")
    parser.add_argument("--concurrency", default="1")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=3, help="requests per level")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument(
        "--draft", default="qwen2.5-coder-0.5b", help="rillet-draft's draft model (catalogue name)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    # A SIGTERM (``timeout``, a killed lock holder) unwinds through run_system's ``finally``,
    # so the server it started (a session of its own) is stopped too, not left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    port = 18600 + os.getpid() % 1000
    every = commands(args, port)
    names = args.systems.split(",")
    results: dict[str, list[list[dict[str, object]]]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:
            rows = [summary(row) for row in run_system(name, every[name], port, args)]
            results[name].append(rows)
            print(json.dumps({"system": name, "run": repeat, "levels": rows}), flush=True)
    for name, runs in results.items():
        for i, level in enumerate(runs[0]):
            medians = {
                key: statistics.median(float(run[i][key]) for run in runs)  # type: ignore[arg-type]
                for key in ("decode_tok_s", "ttft_ms", "output_tok_s")
                if all(run[i][key] is not None for run in runs)
            }
            accept = [run[i]["acceptance"] for run in runs if run[i]["acceptance"] is not None]
            line = {"system": name, "c": level["c"], "median": medians}
            if accept:
                line["acceptance"] = statistics.median(float(a) for a in accept)  # type: ignore[arg-type]
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
