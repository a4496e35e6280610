"""Two or more builds of the CPU kernels, A/B on Qwen2.5 1.5B's one-row matmuls, interleaved.

On this shared VM the same command moves by 20-30 % within one lock hold, so builds timed
one after the other (a process each) are not comparable. Here each build runs in its own
worker process (pybind types cannot be registered twice in one), all with the same seeded
weights (``one_row.py``'s, in a ``MADV_HUGEPAGE`` buffer as the served weight file mostly
is), and the coordinator runs one pass at a time, build after build, for ``--rounds``
rounds: the drift falls on every build alike. Prints each worker's sum of all outputs
(equal sums: the builds give the same results) and each pass's median and minimum.

A build is a folder under the kernels cache (``rillet_cpu_kernels_<digest>``, see
``rillet.models.cpu_kernels``); build one from a checkout with
``PYTHONPATH=src .venv/bin/python -m rillet.models.cpu_kernels``.

    PYTHONPATH=src .venv/bin/python bench/kernel_ab.py DIGEST_A DIGEST_B --rounds 30
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).parent))
from one_row import LAYERS, into_hugepages, qwen_layers

from rillet.config import kernels_dir

PASSES = ["step", "lm_head", "gate_up", "down", "qkv", "o"]


def load_build(digest: str) -> ModuleType:
    """The compiled kernels module of one build, by its digest."""
    name = f"rillet_cpu_kernels_{digest}"
    loader = importlib.machinery.ExtensionFileLoader(name, str(kernels_dir() / name / f"{name}.so"))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def worker(digest: str) -> None:
    """Times the pass named on each stdin line; prints seconds, one line each."""
    torch.set_num_threads(2)
    native = load_build(digest)
    layers, gen = qwen_layers()
    into_hugepages(layers)
    inputs = {k: torch.randn(1, k, generator=gen).to(torch.bfloat16) for k in (1536, 8960)}
    head = layers["lm_head"]
    order = [n for n in layers if n != "lm_head"]
    step = [w for i in range(LAYERS) for w in (layers[n][i] for n in order)] + head
    passes = {"step": step, **layers}
    check = sum(
        float(native.quantized_linear(inputs[k], p, mode).double().sum()) for p, mode, k in step
    )
    print(f"ready, sum of all outputs {check!r}", flush=True)
    flush = torch.ones(64 << 20, dtype=torch.uint8)
    for line in sys.stdin:
        calls = passes[line.strip()]
        flush.sum()
        start = time.perf_counter()
        for packed, mode, k in calls:
            native.quantized_linear(inputs[k], packed, mode)
        print(time.perf_counter() - start, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("digests", nargs="+", help="builds: rillet_cpu_kernels_<digest>")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.digests[0])
        return
    procs = {
        digest: subprocess.Popen(
            [sys.executable, "-W", "ignore", __file__, "--worker", digest],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ,
        )
        for digest in args.digests
    }
    for digest, proc in procs.items():
        assert proc.stdout is not None
        print(digest, proc.stdout.readline().strip(), flush=True)
    times: dict[tuple[str, str], list[float]] = {(p, d): [] for p in PASSES for d in procs}
    for _ in range(args.rounds):
        for name in PASSES:
            for digest, proc in procs.items():
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(name + "\n")
                proc.stdin.flush()
                times[(name, digest)].append(float(proc.stdout.readline()))
    for name in PASSES:
        cells = [
            f"{d[:8]} {statistics.median(times[(name, d)]) * 1e3:7.2f} ms "
            f"(min {min(times[(name, d)]) * 1e3:7.2f})"
            for d in procs
        ]
        print(f"{name:8s} " + "  ".join(cells))
    for proc in procs.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()


if __name__ == "__main__":
    main()
