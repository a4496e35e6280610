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


def seconds_per_call(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="*", type=int, default=[1, 4, 16, 64, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole-model", action="store_true", help="weights from memory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = cpu_kernels.load()
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
