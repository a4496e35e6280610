"""How close one stream's decode comes to this machine's memory read bandwidth.

A decode step at one stream is a matrix-vector product per weight matrix: it reads every
weight once, so its best time is the bytes it reads divided by the memory bandwidth. This
prints three things:

1. A STREAM-style bandwidth measurement (C loops on uint64 arrays, compiled here with
   ``-O3 -march=native -fopenmp``): ``read`` (sum of one array: bytes read), ``copy``
   (b = a: 2 x bytes, STREAM's convention, which ignores the write-allocate read) and
   ``triad`` (a = b + 3 c: 3 x bytes), on 1 and 2 threads, best of ``--reps``, at several
   array sizes: this VM reports a 480 MiB L3, so only the largest (the reference) is far
   past every cache.
2. For each installed catalogue model (``rillet.models.catalogue``), the bytes a one-stream
   decode step reads: in rillet's prepared layout (the model is loaded as the engine loads
   it, then every tensor a one-row step reads is summed once by storage: each linear
   layer's quantized copy where it takes a one-row step, else its packed or float weight,
   plus biases and norm weights; the LM head included, the embedding excluded since a step
   reads one row of it) and in the GGUF as llama.cpp reads it (every tensor's bytes in the
   file, the token embedding excluded, except that a model without ``output.weight`` reads
   its tied embedding whole as the LM head).
3. With ``--decode``, decode tok/s at one stream for rillet and llama-server on one model,
   over HTTP (an OpenAI chat stream, ``--max-tokens`` out, greedy): (tokens - 1) over the
   time from the first token to the last, so the prompt is not counted; the median of
   ``--decode-reps`` requests after one warm-up. Then the fraction of bandwidth each reaches:
   tok/s x bytes/token / the best 1-thread and 2-thread ``read`` bandwidth.

    .venv/bin/python bench/bandwidth.py                                  # 1 and 2
    .venv/bin/python bench/bandwidth.py --decode --llama-server PATH     # + 3, Qwen 1.5B
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import free_port, wait_ready

GB = 1e9


# ---------------------------------------------------------------------------------------------
# 1. Bandwidth


@dataclass
class Bandwidth:
    kernel: str
    threads: int
    mib: int
    gb_per_s: float


#: STREAM's loops on uint64 arrays (integer sums vectorize without reassociation flags), with
#: OpenMP threads; compiled with the system C compiler for this CPU (``-march=native``).
STREAM_C = r"""
#include <stddef.h>
#include <stdint.h>
uint64_t stream_read(const uint64_t* a, size_t n, int threads) {
  uint64_t total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
  for (size_t i = 0; i < n; ++i) total += a[i];
  return total;
}
void stream_copy(uint64_t* b, const uint64_t* a, size_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (size_t i = 0; i < n; ++i) b[i] = a[i];
}
void stream_triad(uint64_t* a, const uint64_t* b, const uint64_t* c, size_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (size_t i = 0; i < n; ++i) a[i] = b[i] + 3 * c[i];
}
"""


def stream_library() -> ctypes.CDLL:
    """The STREAM loops above, compiled once into a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="rillet-stream-"))
    source, library = folder / "stream.c", folder / "stream.so"
    source.write_text(STREAM_C)
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    subprocess.run(["cc", *flags, str(source), "-o", str(library)], check=True)
    lib = ctypes.CDLL(str(library))
    size_t, ptr, i32 = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
    lib.stream_read.argtypes = [ptr, size_t, i32]
    lib.stream_read.restype = ctypes.c_uint64
    lib.stream_copy.argtypes = [ptr, ptr, size_t, i32]
    lib.stream_triad.argtypes = [ptr, ptr, ptr, size_t, i32]
    return lib


def measure_bandwidth(mib: int, reps: int, threads: tuple[int, ...]) -> list[Bandwidth]:
    """STREAM's read, copy and triad on arrays of ``mib`` MiB each, best of ``reps``."""
    lib = stream_library()
    n = mib * (1 << 20) // 8
    a, b, c = (torch.full((n,), v, dtype=torch.int64) for v in (1, 2, 3))
    pa, pb, pc = (t.data_ptr() for t in (a, b, c))
    size = n * 8
    results = []
    for count in threads:
        kernels: dict[str, tuple[Callable[[], object], int]] = {
            "read": (lambda: lib.stream_read(pa, n, count), size),  # noqa: B023
            "copy": (lambda: lib.stream_copy(pb, pa, n, count), 2 * size),  # noqa: B023
            "triad": (lambda: lib.stream_triad(pa, pb, pc, n, count), 3 * size),  # noqa: B023
        }
        for name, (run, moved) in kernels.items():
            run()  # warm-up
            best = min(_timed(run) for _ in range(reps))
            results.append(Bandwidth(name, count, mib, moved / best / GB))
    return results


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# 2. Bytes per token


@dataclass
class StepBytes:
    model: str
    gguf: Path
    rillet: int
    gguf_read: int
    lm_head_rillet: int
    lm_head_gguf: int


def gguf_step_bytes(path: Path) -> tuple[int, int]:
    """(bytes a llama.cpp decode step reads, the LM head's share) from the file's tensors."""
    from rillet.models.gguf_file import read_gguf

    tensors = {t.name: int(t.data.nbytes) for t in read_gguf(path).tensors}
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    total = sum(size for name, size in tensors.items() if name != "token_embd.weight")
    if "output.weight" not in tensors:
        total += head
    return total, head


def rillet_step_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes a one-row decode step reads in the prepared model, the LM head's share)."""
    from rillet.models.linear import Linear

    seen: set[int] = set()

    def once(t: torch.Tensor | None) -> int:
        if t is None or t.device.type == "meta":
            return 0
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return int(t.untyped_storage().nbytes())

    total = head = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            if module.quantized_weight is not None and module.quantized_max_rows >= 1:
                size = once(module.quantized_weight)
            elif module.packed_weight is not None:
                size = once(module.packed_weight)
            else:
                size = once(module.weight)
            size += once(module.bias)
            total += size
            if name.endswith("lm_head"):
                head = size
        elif isinstance(module, torch.nn.Embedding):
            seen.add(module.weight.untyped_storage().data_ptr())  # one row a step
    for name, param in model.named_parameters():
        if "norm" in name:
            total += once(param)
    return total, head


def step_bytes(names: list[str]) -> list[StepBytes]:
    from rillet import LLM
    from rillet.errors import ModelLoadError
    from rillet.models import catalogue, model_cache

    rows = []
    for name in names:
        entry = catalogue.find_entry(name)
        if entry is None:
            raise SystemExit(f"{name} is not in the catalogue")
        try:
            path = model_cache.model_file(entry, progress=False)
        except ModelLoadError:
            print(f"# {name}: not installed, skipped", file=sys.stderr)
            continue
        llm = LLM(name)
        r_total, r_head = rillet_step_bytes(llm.core.runner.model)
        del llm
        g_total, g_head = gguf_step_bytes(path)
        rows.append(StepBytes(name, path, r_total, g_total, r_head, g_head))
    return rows


# ---------------------------------------------------------------------------------------------
# 3. Decode tok/s over HTTP


def stream_decode_rate(url: str, model: str, max_tokens: int) -> tuple[float, int]:
    """(decode tok/s, tokens) of one greedy chat stream: (tokens - 1) / (last - first)."""
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": "Write a Python module with a linked list, a stack and "
                "a queue class, each with docstrings and type hints.",
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    first = last = 0.0
    events = 0
    usage = None
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                events += 1
    tokens = int(usage) if usage else events
    return (tokens - 1) / (last - first), tokens


def decode_rates(
    command: list[str], port: int, served: str, args: argparse.Namespace
) -> list[float]:
    url = f"http://127.0.0.1:{port}"
    with open(Path(args.log_dir) / f"{served}-{port}.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, proc, 600.0)
            stream_decode_rate(url, served, args.max_tokens)  # warm-up
            rates = []
            for _ in range(args.decode_reps):
                rate, tokens = stream_decode_rate(url, served, args.max_tokens)
                print(f"#   {command[0]}: {rate:.1f} tok/s over {tokens} tokens", file=sys.stderr)
                rates.append(rate)
            return rates
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def servers(args: argparse.Namespace, gguf: Path, port: int) -> dict[str, list[str]]:
    commands = {
        "rillet": [
            sys.executable,
            "-m",
            "rillet",
            "serve",
            "--model",
            args.decode_model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "2",
            "--served-model-name",
            "m",
        ],
    }
    if args.llama_server:
        commands["llama-server"] = [
            args.llama_server,
            "--model",
            str(gguf),
            "--alias",
            "m",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "2",
            "--threads-batch",
            "2",
            "--ctx-size",
            "4096",
            "--no-webui",
            *shlex.split(args.llama_server_args),
        ]
    return commands


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mib", default="64,256,1024,2048", help="MiB per array; the last is the reference"
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--models", default="all", help="catalogue names, comma-separated")
    parser.add_argument("--decode", action="store_true", help="measure decode tok/s (3.)")
    parser.add_argument("--decode-model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--decode-reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--llama-server", help="a llama-server binary (else rillet only)")
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument(
        "--llama-server-args", default="", help="more llama-server options (e.g. --no-repack)"
    )
    parser.add_argument("--skip-bandwidth", action="store_true")
    args = parser.parse_args()

    from rillet.models import catalogue

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs")
    best: dict[int, float] = {}
    if not args.skip_bandwidth:
        print("\n| kernel | threads | MiB per array | GB/s |\n|---|---|---|---|")
        for mib in (int(m) for m in args.mib.split(",")):
            for bw in measure_bandwidth(mib, args.reps, (1, 2)):
                print(f"| {bw.kernel} | {bw.threads} | {bw.mib} | {bw.gb_per_s:.1f} |")
                if bw.kernel == "read" and mib == int(args.mib.split(",")[-1]):
                    best[bw.threads] = bw.gb_per_s
            sys.stdout.flush()
        sys.stdout.flush()

    names = list(catalogue.CATALOGUE) if args.models == "all" else args.models.split(",")
    names = [name for name in names if name]
    sizes = step_bytes(names)
    print("\n| model | rillet MB/token (LM head) | GGUF MB/token (LM head) | rillet / GGUF |")
    print("|---|---|---|---|")
    for s in sizes:
        print(
            f"| {s.model} | {s.rillet / 1e6:.0f} ({s.lm_head_rillet / 1e6:.0f}) "
            f"| {s.gguf_read / 1e6:.0f} ({s.lm_head_gguf / 1e6:.0f}) "
            f"| {s.rillet / s.gguf_read:.2f} |"
        )
    sys.stdout.flush()
    if not args.decode:
        return 0
    size = next(s for s in sizes if s.model == args.decode_model)
    print(
        f"\n| server | decode tok/s (median of {args.decode_reps}) | GB/s read "
        "| of 1-thread read | of 2-thread read |\n|---|---|---|---|---|"
    )
    port = free_port()
    for server, command in servers(args, size.gguf, port).items():
        try:
            rate = statistics.median(decode_rates(command, port, "m", args))
        except RuntimeError as exc:
            print(f"| {server} | failed: {exc} | | | |")
            continue
        read = size.rillet if server == "rillet" else size.gguf_read
        gbs = rate * read / GB
        fractions = " | ".join(f"{gbs / best[t]:.0%}" if t in best else "-" for t in (1, 2))
        print(f"| {server} | {rate:.1f} | {gbs:.1f} | {fractions} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
