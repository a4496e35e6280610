"""``rillet bench``'s command line, shared with ``python bench/serve.py``: the arguments,
the subcommand's registration and the entry point.

Output: one JSON object per level on stdout (and appended to ``--out``), a progress bar
and a summary table on stderr. Exit code 0 when every level ran without errors, 1 when
some requests failed or were cut by a time cap, 2 when the run could not start.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rillet.benchmark.workload import BenchConfig

DESCRIPTION = (
    "Load generator for any OpenAI-compatible streaming endpoint, closed loop (a level per "
    "concurrency) or open loop (a level per request rate): TTFT, inter-token latency, "
    "tokens/s, goodput and errors at each level."
)
EXAMPLE = """examples:
  rillet bench --url http://127.0.0.1:8080 --model smollm2 --concurrency 1,4,16,64 \\
      --max-tokens 128 --out bench/out/rillet.jsonl --plot bench/out/rillet.png
  rillet bench --dataset bench/data/sharegpt-sample.json --request-rate 0.5,1,2 \\
      --concurrency 64 --goodput ttft=1000,itl=100
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the benchmark's options on ``parser`` (imports nothing heavy)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLE
    add = parser.add_argument
    add("--url", default="http://127.0.0.1:8080", help="server base URL (a /v1 suffix is fine)")
    add("--model", default="smollm2", help="the request's model field")
    add(
        "--api",
        choices=["chat", "completions", "grpc"],
        default="chat",
        help="OpenAI route to load, or grpc: Triton's ModelStreamInfer (--grpc-url, --model "
        "must be the served name)",
    )
    add("--grpc-url", default="127.0.0.1:8001", help="host:port of the gRPC door (--api grpc)")
    add(
        "--concurrency",
        default="1,4,16,64",
        help="comma-separated levels (default: 1,4,16,64); with --request-rate, one cap on "
        "requests in flight",
    )
    add(
        "--request-rate",
        help="open loop: comma-separated levels of requests/s, Poisson arrivals (default: "
        "closed loop)",
    )
    add("--seed", type=int, default=0, help="seeds arrival times and the dataset's order")
    add(
        "--goodput",
        help="latency targets in ms, e.g. ttft=500,itl=50 (also tpot, e2el): report the share "
        "of requests meeting them all",
    )
    add("--max-tokens", type=int, default=128, help="output tokens per request (default: 128)")
    add("--requests-per-level", type=int, help="requests per level (default: max(8, 4 x C))")
    add("--temperature", type=float, default=0.0)
    add("--no-ignore-eos", dest="ignore_eos", action="store_false", help="do not send ignore_eos")
    add(
        "--no-usage",
        dest="include_usage",
        action="store_false",
        help="do not ask for stream_options.include_usage (tokens are then counted as deltas)",
    )
    add(
        "--input-tokens",
        type=int,
        help="prompts of exactly N tokens of real text, a different one per request (no "
        "prefix cache can help); exact for --api completions, the chat template adds its own",
    )
    add(
        "--shared-prefix-tokens",
        type=int,
        help="every prompt starts with the same N-token text, then a short question of its own",
    )
    add(
        "--dataset",
        type=Path,
        help="ShareGPT-format JSON: one conversation per request, its history as the prompt "
        "and its answer's length as max_tokens (bench/data/sharegpt-sample.json is ours)",
    )
    add(
        "--code-edit",
        type=Path,
        metavar="FILE",
        help="code editing: each prompt is FILE with a request to rename one of its functions "
        "and return it whole, so most output tokens are in the prompt (the work speculative "
        "decoding by prompt lookup is for); bench/data/code_edit_block_manager.py is ours",
    )
    add(
        "--tokenizer",
        help="model folder or .gguf whose tokenizer counts --input-tokens (default: the bundled "
        "SmolLM2, which vLLM and llama.cpp serve with the same tokenizer)",
    )
    add(
        "--response-format",
        choices=["json_object", "json_schema"],
        help="constrain every answer: json_object, or json_schema with --schema (default: a "
        "built-in list of at least 64 people, longer than --max-tokens); ignore_eos is then "
        "not sent",
    )
    add("--schema", type=Path, help="JSON Schema file for --response-format json_schema")
    add("--extra-body", default="{}", help="JSON object merged into every request body")
    add("--request-timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    add(
        "--level-timeout",
        type=float,
        default=300.0,
        help="seconds per level: then in-flight requests are cancelled (default: 300)",
    )
    add("--warmup", type=int, default=1, help="untimed requests before the levels (default: 1)")
    add("--no-keepalive", dest="keepalive", action="store_false", help="new connection per request")
    add("--api-key", help="sent as `Authorization: Bearer KEY`")
    add("--label", default="", help="name of the system under test, copied into every line")
    add("--server-pid", type=int, help="report CPU used by this process tree (Linux /proc)")
    add("--out", type=Path, help="append the level JSON lines to this file")
    add("--requests-out", type=Path, help="append one JSON line per request (raw timings)")
    add(
        "--server-timing",
        action="store_true",
        help="send X-Rillet-Timing: 1 (rillet only) and split each request's TTFT into queue, "
        "prefill, server and network (client TTFT minus the server's ttft_s); prints their "
        "p50/p90 and, with --plot, draws them into PATH-ttft.png",
    )
    add("--plot", type=Path, help="draw tok/s and TTFT vs concurrency into this PNG")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object (``rillet.cli``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible streaming server (TTFT, ITL, tokens/s)",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser, for ``python bench/serve.py``."""
    parser = argparse.ArgumentParser(prog="bench/serve.py", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Build and validate the run's settings; ValueError names the bad option."""
    try:
        levels = tuple(int(x) for x in str(args.concurrency).split(",") if x.strip())
    except ValueError:
        raise ValueError(
            f"--concurrency must be integers like 1,4,16, got {args.concurrency!r}"
        ) from None
    try:
        extra = json.loads(args.extra_body)
    except ValueError as exc:
        raise ValueError(f"--extra-body is not JSON: {exc}") from exc
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    try:
        rates = tuple(float(x) for x in (args.request_rate or "").split(",") if x.strip())
    except ValueError:
        text = args.request_rate
        raise ValueError(f"--request-rate must be numbers like 0.5,1,2, got {text!r}") from None
    config = BenchConfig(
        url=args.url,
        model=args.model,
        api=args.api,
        concurrency=levels,
        max_tokens=args.max_tokens,
        requests_per_level=args.requests_per_level,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        include_usage=args.include_usage,
        extra_body=extra,
        request_timeout=args.request_timeout,
        level_timeout=args.level_timeout,
        warmup=args.warmup,
        keepalive=args.keepalive,
        api_key=args.api_key,
        label=args.label,
        server_pid=args.server_pid,
        grpc_target=args.grpc_url,
        prompts=_prompt_set(args),
        request_rates=rates,
        goodput=parse_targets(args.goodput or ""),
        seed=args.seed,
        response_format=_response_format(args),
        server_timing=args.server_timing,
    )
    config.validate()
    return config


def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.response_format is None:
        if args.schema is not None:
            raise ValueError("--schema goes with --response-format json_schema")
        return None
    from rillet.benchmark.constraint import response_format

    return response_format(args.response_format, args.schema)


def parse_targets(text: str) -> dict[str, float]:
    """``ttft=500,itl=50`` as ``{"ttft": 500.0, "itl": 50.0}`` (checked by validate())."""
    targets: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            targets[name.strip()] = float(value)
        except ValueError:
            hint = "name=ms pairs like ttft=500,itl=50"
            raise ValueError(f"--goodput takes {hint}, got {item!r}") from None
    return targets


def _prompt_set(args: argparse.Namespace) -> Any:
    """The workload the options ask for (long prompts, a dataset), or None (the built-in
    prompts)."""
    chosen = [args.input_tokens, args.shared_prefix_tokens, args.dataset, args.code_edit]
    if all(option is None for option in chosen):
        return None
    if sum(option is not None for option in chosen) > 1:
        raise ValueError(
            "choose one of --input-tokens, --shared-prefix-tokens, --dataset and --code-edit"
        )
    if args.code_edit is not None:
        from rillet.benchmark.code_edit import CodeEditPrompts

        return CodeEditPrompts(args.code_edit)
    for option in (args.input_tokens, args.shared_prefix_tokens):
        if option is not None and option < 1:
            raise ValueError("--input-tokens and --shared-prefix-tokens must be at least 1")
    from rillet.models.loader import load_model_files

    tokenizer = load_model_files(args.tokenizer).tokenizer

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    if args.dataset is not None:
        from rillet.benchmark.dataset import Conversations

        return Conversations(args.dataset, lambda text: len(encode(text)), args.seed)
    from rillet.benchmark.long_prompts import PromptSet

    return PromptSet(encode, tokenizer.decode, args.input_tokens, args.shared_prefix_tokens)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed arguments describe; the process exit code."""
    import asyncio  # here, not at module level: `rillet --help` must stay fast

    from rillet.benchmark.progress import Progress
    from rillet.benchmark.runner import WarmupFailed, json_line, run_benchmark
    from rillet.benchmark.stats import format_table, format_ttft_split

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"rillet bench: {exc}", file=sys.stderr)
        return 2
    progress = Progress(enabled=args.progress)

    def emit(row: dict[str, Any], records: list[Any]) -> None:
        line = json_line(row)
        print(line, flush=True)
        _append(args.out, [line])
        if args.requests_out:
            extra = {"label": row["label"], "concurrency": row["concurrency"]}
            _append(args.requests_out, [json_line({**extra, **r.to_json()}) for r in records])
        progress.note(format_table([row]))
        if "spec_acceptance" in row:
            drafts = int(row["spec_draft_tokens"])
            progress.note(f"speculation: {row['spec_acceptance']:.1%} of {drafts} drafts accepted")

    progress.note(f"rillet bench: {config.name} -> {config.endpoint}")
    try:
        rows = asyncio.run(run_benchmark(config, progress, emit))
    except WarmupFailed as exc:
        print(f"rillet bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rillet bench: interrupted", file=sys.stderr)
        return 130
    print(f"\n{config.name} (times in ms)\n{format_table(rows)}", file=sys.stderr)
    split = format_ttft_split(rows)
    if config.server_timing:
        if split:
            print(f"\nTTFT by the server's timing (ms)\n{split}", file=sys.stderr)
        else:
            print("rillet bench: the server sent no timing (not rillet?)", file=sys.stderr)
    if args.plot:
        from rillet.benchmark.plot import PlotUnavailable, plot_levels, plot_ttft_split

        try:
            print(f"plot: {plot_levels(rows, args.plot, config.name)}", file=sys.stderr)
            if split:
                path = args.plot.with_name(f"{args.plot.stem}-ttft{args.plot.suffix}")
                print(f"plot: {plot_ttft_split(rows, path, config.name)}", file=sys.stderr)
        except PlotUnavailable as exc:
            print(f"rillet bench: {exc}", file=sys.stderr)
            return 2
    clean = all(r["errors"] == 0 and r["cancelled"] == 0 for r in rows)
    return 0 if clean else 1


def _append(path: Path | None, lines: list[str]) -> None:
    if path is None or not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")
