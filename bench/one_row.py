"""Qwen2.5 1.5B's one-row decode matmuls with their weights coming from memory.

``linear_kernels.py --qwen 1`` repeats one weight, so every shape but the LM head runs from
this VM's 32 MiB L3 and overstates a served step, which reads ~1 GB of weights once. Here
every layer has its own weights (random codes, each matrix in the mode it is served in, as
``linear_kernels.QWEN_SHAPES``): 28 layers + the LM head, ~1.04 GB. It prints

- per matrix kind: one pass over all 28 layers' matrices of that kind (a 64 MiB buffer is
  read before each pass, so no weight starts in cache), the time a matrix and the GB/s it
  reads at, on ``--threads`` threads; and the LM head alone;
- a whole step's matmuls in layer order (qkv, o, gate_up, down, ..., the head), as the
  decoder stack runs them, and the GB/s of the whole;
- what one call costs with next to nothing to read (a 128-column matrix: one parallel
  region on two threads), on one thread and on ``--threads``: the fixed cost of a call.

Each figure is the best of ``--repeats`` passes; the Python loop around the calls is
included (~1-2 us a call, ~150 calls a pass).

    PYTHONPATH=src .venv/bin/python bench/one_row.py --threads 2 --repeats 7
"""

from __future__ import annotations

import argparse
import mmap
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from linear_kernels import QWEN_SHAPES, random_packed

from rillet.models import cpu_kernels, group_quantization

LAYERS = 28


def qwen_layers() -> tuple[dict[str, list[tuple[torch.Tensor, int, int]]], torch.Generator]:
    """Kind -> every layer's (packed, mode, in_features) of Qwen 1.5B's shapes, from seed 0,
    the two modes' layers alternating as Q4_K_M's do; and the generator, to draw inputs on."""
    gen = torch.Generator().manual_seed(0)
    layers: dict[str, list[tuple[torch.Tensor, int, int]]] = {}
    for name, n, k, mode, count in QWEN_SHAPES:
        per = layers.setdefault(name, [])
        per.extend((random_packed(n, k, mode, gen), mode, k) for _ in range(count))
    for per in layers.values():
        if len(per) == LAYERS:
            per[:] = [per[i // 2 + (i % 2) * LAYERS // 2] for i in range(LAYERS)]
    return layers, gen


def into_hugepages(layers: dict[str, list[tuple[torch.Tensor, int, int]]]) -> None:
    """Moves every weight into one anonymous mapping advised to take 2 MiB pages."""
    total = sum((p.numel() + 4095) // 4096 * 4096 for per in layers.values() for p, _, _ in per)
    buffer = mmap.mmap(-1, total + (2 << 20))
    buffer.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(buffer, dtype=torch.uint8)
    at = 0
    for per in layers.values():
        for i, (packed, mode, k) in enumerate(per):
            view = memory[at : at + packed.numel()].view(packed.shape)
            view.copy_(packed)
            per[i] = (view, mode, k)
            at += (packed.numel() + 4095) // 4096 * 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument(
        "--hugepages", action="store_true", help="weights in one madvise(MADV_HUGEPAGE) buffer"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = cpu_kernels.load()
    if native is None or not native.quantized_linear_supported():
        raise SystemExit("rillet's quantized kernel is not available on this machine")
    layers, gen = qwen_layers()
    if args.hugepages:
        into_hugepages(layers)
    head = layers.pop("lm_head")
    inputs = {k: torch.randn(args.rows, k, generator=gen).to(torch.bfloat16) for k in (1536, 8960)}
    flush = torch.ones(64 << 20, dtype=torch.uint8)

    def timed(calls: list[tuple[torch.Tensor, int, int]]) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            flush.sum()
            start = time.perf_counter()
            for packed, mode, k in calls:
                native.quantized_linear(inputs[k], packed, mode)
            best = min(best, time.perf_counter() - start)
        return best

    print(f"# torch {torch.__version__}, {args.threads} threads, rows {args.rows}")
    for name, per in [*layers.items(), ("lm_head", head)]:
        took = timed(per)
        size = sum(p.numel() for p, _, _ in per)
        modes = sorted({m for _, m, _ in per})
        print(
            f"{name:8s} modes {modes}: {took / len(per) * 1e6:8.1f} us a matrix, "
            f"{size / len(per) / 1e6:6.2f} MB, {size / took / 1e9:5.1f} GB/s"
        )
    step = [w for i in range(LAYERS) for w in (layers[n][i] for n in layers)] + head
    took = timed(step)
    size = sum(p.numel() for p, _, _ in step)
    print(
        f"step's matmuls in layer order: {took * 1e3:.2f} ms for {size / 1e6:.0f} MB, "
        f"{size / took / 1e9:.1f} GB/s, {len(step)} calls"
    )
    tiny = random_packed(128, 1536, group_quantization.K4, gen)
    x = inputs[1536]
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        calls = 2000
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(calls):
                native.quantized_linear(x, tiny, group_quantization.K4)
            best = min(best, (time.perf_counter() - start) / calls)
        print(f"a 128x1536 call on {threads} thread(s): {best * 1e6:.2f} us")


if __name__ == "__main__":
    main()
