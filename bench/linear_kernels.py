"""rillet's bf16 linear kernel against oneDNN on SmolLM2-135M's matmul shapes.

For each row count, times the model's five weight shapes (fused QKV, output projection,
fused gate/up, down projection, LM head) through oneDNN with a packed weight
(``mkldnn._linear_pointwise``, what ``F.linear`` becomes) and through
``csrc/bf16_linear.cpp``, and adds them up as one decode step does (30 layers + the head).
Also prints each kernel's largest error against fp32 math on the same bf16 inputs.

    .venv/bin/python bench/linear_kernels.py [ROWS ...]      # default: 1 4 16 64 512

Random weights, the cache as warm as a repeated call leaves it: the step totals are the
kernels' own speed, not a served step's (bench/profile_step.py measures those).

``--whole-model`` instead builds all 121 distinct weights of the model and times full
passes through them, so weights come from memory as in a real step, for rillet's bf16
kernel and rillet's quantized kernel (4-bit layers and 8-bit LM head, groups of 32,
``csrc/quantized_linear.cpp``; the serving default for 4-bit checkpoints):

    .venv/bin/python bench/linear_kernels.py --whole-model 1 4 16 64 512

``--qwen`` instead times the quantized kernel on Qwen2.5 1.5B Q4_K_M's matmuls, each in the
mode it is served in (mode 41 for Q4_K, 6 bits for Q6_K, 8 bits for the QKV layers whose V
is Q6_K and Q/K Q4_K), random codes, and prints G multiply-adds/s per shape and mode and
the step's total (28 layers + the LM head), best of ``--repeats`` timings. On a shared
machine ``--threads 1 --thread-time`` counts this thread's CPU time instead of wall time
(one thread, so the kernel runs on the calling thread), which others' work moves far less:

    .venv/bin/python bench/linear_kernels.py --qwen 1 16 64
    .venv/bin/python bench/linear_kernels.py --qwen --threads 1 --thread-time 16 64

``--qwen --whole-model`` builds a step's distinct weights instead (28 layers, 1.04 GB, half
of the QKV and down projections in their second mode) and times passes through them in a
layer's order, so they come from memory as in a served step (wall and all threads' CPU time):

    .venv/bin/python bench/linear_kernels.py --qwen --whole-model --repeats 8 16 64
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from types import ModuleType

import torch

from rillet.models import cpu_kernels, group_quantization

LAYERS = 30
#: (out_features, in_features) of one layer's matmuls, then the LM head.
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD_SHAPE = (49152, 576)


def seconds_per_call(
    fn: Callable[[], object], calls: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    fn()
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def whole_model_passes(native: ModuleType, rows_list: list[int]) -> None:
    """Median time of full passes through every distinct weight, bf16 and quantized."""
    gen = torch.Generator().manual_seed(0)
    shapes = LAYER_SHAPES * LAYERS + [HEAD_SHAPE]
    bf16, quantized = [], []
    for n, k in shapes:
        weight = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
        bf16.append((native.pack_bf16_weight(weight), k))
        bits = 8 if (n, k) == HEAD_SHAPE else 4
        u, d, m = group_quantization.quantize(weight, bits)
        quantized.append((group_quantization.pack(u, d, m, bits), bits, k))
    print(
        f"# weight bytes: bf16 {sum(w.numel() * 2 for w, _ in bf16) / 1e6:.0f} MB, "
        f"quantized {sum(w.numel() for w, _, _ in quantized) / 1e6:.0f} MB"
    )
    for rows in rows_list:
        inputs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for k in (576, 1536)}

        def bf16_pass() -> None:
            for w, k in bf16:
                native.bf16_linear(inputs[k], w)  # noqa: B023 (called in this iteration)

        def quantized_pass() -> None:
            for w, bits, k in quantized:
                native.quantized_linear(inputs[k], w, bits)  # noqa: B023 (same)

        passes: dict[str, Callable[[], None]] = {"bf16": bf16_pass}
        if native.quantized_linear_supported():
            passes["quantized"] = quantized_pass
        line = [f"rows={rows}: a whole pass"]
        for name, run in passes.items():
            times = sorted(seconds_per_call(run, 1) for _ in range(9))
            line.append(f"{name} {times[4] * 1e3:.2f} ms (min {times[0] * 1e3:.2f})")
        print(", ".join(line))


#: Qwen2.5 1.5B Q4_K_M: (name, out_features, in_features, kernel mode, matmuls a step).
QWEN_SHAPES = [
    ("qkv", 2048, 1536, group_quantization.K4, 14),
    ("qkv", 2048, 1536, 8, 14),
    ("o", 1536, 1536, group_quantization.K4, 28),
    ("gate_up", 17920, 1536, group_quantization.K4, 28),
    ("down", 1536, 8960, group_quantization.K4, 14),
    ("down", 1536, 8960, 6, 14),
    ("lm_head", 151936, 1536, 6, 1),
]


def random_packed(n: int, k: int, mode: int, gen: torch.Generator) -> torch.Tensor:
    """A packed ``[n, k]`` weight of random codes and scales in kernel ``mode``."""
    groups = k // group_quantization.GROUP
    top = {group_quantization.K4: 16, 6: 64, 8: 256}[mode]
    u = torch.randint(0, top, (n, groups, group_quantization.GROUP), generator=gen)
    u = u.to(torch.uint8)
    per_group = group_quantization.scales_per_group(mode)
    d = (torch.rand(n, groups * per_group, generator=gen) * 1e-3).half()
    if mode == group_quantization.K4:
        supers = k // 256
        scale = torch.randint(0, 64, (n, groups), generator=gen).to(torch.uint8)
        low = torch.randint(0, 64, (n, groups), generator=gen).to(torch.uint8)
        neg_dmin = -(torch.rand(n, supers, generator=gen) * 1e-3).half()
        return group_quantization.pack_k4(u, d[:, :supers].contiguous(), neg_dmin, scale, low)
    return group_quantization.pack(u, d, -(top // 2) * d, mode)


def qwen_matmuls(
    native: ModuleType, rows_list: list[int], repeats: int, clock: Callable[[], float]
) -> None:
    """The quantized kernel on Qwen2.5 1.5B's shapes, in G multiply-adds/s of ``clock``."""
    gen = torch.Generator().manual_seed(0)
    weights = [(*shape, random_packed(*shape[1:4], gen)) for shape in QWEN_SHAPES]
    for rows in rows_list:
        total_s, total_macs = 0.0, 0
        by_mode: dict[int, list[float]] = {}
        for name, n, k, mode, count, packed in weights:
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            calls = max(1, int(2e9 // (rows * n * k)))
            took = min(
                seconds_per_call(partial(native.quantized_linear, x, packed, mode), calls, clock)
                for _ in range(repeats)
            )
            macs = rows * n * k
            total_s += took * count
            total_macs += macs * count
            seconds_macs = by_mode.setdefault(mode, [0.0, 0.0])
            seconds_macs[0] += took * count
            seconds_macs[1] += macs * count
            print(
                f"rows={rows:3d} {name:8s} {n:6d}x{k:4d} mode {mode:2d}: "
                f"{took * 1e3:7.3f} ms, {macs / took / 1e9:6.1f} G multiply-adds/s"
            )
        modes = ", ".join(
            f"mode {mode} {s * 1e3:.1f} ms ({m / s / 1e9:.0f} G/s)"
            for mode, (s, m) in sorted(by_mode.items())
        )
        print(
            f"rows={rows}: one step's matmuls {total_s * 1e3:.1f} ms, "
            f"{total_macs / total_s / 1e9:.0f} G multiply-adds/s; {modes}"
        )


def qwen_whole_step(native: ModuleType, rows_list: list[int], repeats: int) -> None:
    """Passes through a step's distinct Qwen2.5 1.5B weights (from memory), sorted times."""
    gen = torch.Generator().manual_seed(0)
    shapes = {(name, mode): (n, k, mode) for name, n, k, mode, _ in QWEN_SHAPES}
    weights = []
    for layer in range(28):  # 14 layers each way, as the Q4_K_M file mixes them
        second = layer % 2
        for key in (
            ("qkv", (group_quantization.K4, 8)[second]),
            ("o", group_quantization.K4),
            ("gate_up", group_quantization.K4),
            ("down", (group_quantization.K4, 6)[second]),
        ):
            n, k, mode = shapes[key]
            weights.append((k, mode, random_packed(n, k, mode, gen)))
    n, k, mode = shapes[("lm_head", 6)]
    weights.append((k, mode, random_packed(n, k, mode, gen)))
    print(f"# {sum(w.numel() for _, _, w in weights) / 1e9:.2f} GB of weights")
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for k in (1536, 8960)}
        walls, cpus = [], []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            for k, mode, packed in weights:
                native.quantized_linear(xs[k], packed, mode)
            walls.append((time.perf_counter() - start) * 1e3)
            cpus.append((time.process_time() - cpu_start) * 1e3)
        walls.sort()
        print(
            f"rows={rows}: a step's matmuls from memory {walls[0]:.1f} ms min, "
            f"{walls[len(walls) // 2]:.1f} median; CPU {', '.join(f'{c:.0f}' for c in cpus)} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="*", type=int, default=[1, 4, 16, 64, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole-model", action="store_true", help="weights from memory")
    parser.add_argument("--qwen", action="store_true", help="Qwen2.5 1.5B's quantized matmuls")
    parser.add_argument("--repeats", type=int, default=5, help="--qwen: timings, best kept")
    parser.add_argument(
        "--thread-time", action="store_true", help="--qwen: this thread's CPU time (--threads 1)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = cpu_kernels.load()
    if args.qwen:
        if native is None or not native.quantized_linear_supported():
            raise SystemExit("rillet's quantized kernel is not available on this machine")
        if args.thread_time and args.threads != 1:
            raise SystemExit("--thread-time counts one thread: give --threads 1")
        clock = time.thread_time if args.thread_time else time.perf_counter
        print(f"# torch {torch.__version__}, {args.threads} threads, {clock.__name__}")
        if args.whole_model:
            qwen_whole_step(native, args.rows, args.repeats)
            return
        qwen_matmuls(native, args.rows, args.repeats, clock)
        return
    if native is None or not native.bf16_linear_supported():
        raise SystemExit("rillet's bf16 kernel is not available on this machine")
    print(f"# torch {torch.__version__}, {args.threads} threads")
    if args.whole_model:
        whole_model_passes(native, args.rows)
        return
    gen = torch.Generator().manual_seed(0)
    for rows in args.rows:
        totals = {"onednn": 0.0, "rillet": 0.0}
        flops = 0
        for n, k in [*LAYER_SHAPES, HEAD_SHAPE]:
            repeat = 1 if (n, k) == HEAD_SHAPE else LAYERS
            weight = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            onednn_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
            rillet_weight = native.pack_bf16_weight(weight)
            kernels: dict[str, Callable[[], torch.Tensor]] = {
                "onednn": partial(
                    torch.ops.mkldnn._linear_pointwise, x, onednn_weight, None, "none", [], ""
                ),
                "rillet": partial(native.bf16_linear, x, rillet_weight),
            }
            exact = x.float() @ weight.float().T
            line = [f"rows={rows:4d} {n:5d}x{k:4d}:"]
            for name, fn in kernels.items():
                took = seconds_per_call(fn, 20)
                totals[name] += took * repeat
                error = (fn().float() - exact).abs().max().item()
                line.append(f"{name} {took * 1e6:8.1f} us (max error {error:.3g})")
            flops += 2 * rows * n * k * repeat
            print("  ".join(line))
        summary = ", ".join(
            f"{name} {t * 1e3:.2f} ms ({flops / t / 1e9:.0f} GFLOP/s)" for name, t in totals.items()
        )
        print(f"rows={rows}: one step's matmuls: {summary}")


if __name__ == "__main__":
    main()
