"""How far each 4-/8-bit matmul is from the exact product, on the bundled model's real inputs.

Scores ``quantization_check.TEXT`` with fp32 activations and the quantized copies on, and
for every call of a quantized layer compares rillet's kernel with two references on the
same input:

- the exact product with the quantized weight (fp32 math): the kernel's whole error,
  which is its rounding of the inputs to 8 bits per group of 32;
- llama.cpp's rounding of the inputs (its Q8_1 blocks: scale = max|x| / 127 stored as
  fp16, values rounded to int8), then the exact product: what llama.cpp computes.

    .venv/bin/python bench/quantized_layer_error.py
"""

from __future__ import annotations

import collections

import torch
from quantization_check import TEXT

from rillet import LLM, SamplingParams
from rillet.models import group_quantization
from rillet.models.linear import Linear


def llama_cpp_q8_1(x: torch.Tensor) -> torch.Tensor:
    """x rounded as llama.cpp's Q8_1 activation blocks round it."""
    groups = x.float().view(x.shape[0], -1, group_quantization.GROUP)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    values = torch.round(groups / scale.clamp(min=torch.finfo(torch.float32).tiny))
    return (values.clamp(-127, 127) * scale.half().float()).view_as(x)


def main() -> None:
    llm = LLM(
        dtype="float32", quantized_max_batch_tokens=8, max_num_batched_tokens=8, max_num_seqs=8
    )
    model = llm.core.runner.model
    model.decoder_stack = None  # every call through Linear.forward, where it is measured
    exact_weights: dict[Linear, torch.Tensor] = {}
    names: dict[Linear, str] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, Linear) and layer.quantized_weight is not None:
            u, d, m = group_quantization.quantize(layer.weight, layer.quantized_bits)
            exact_weights[layer] = group_quantization.dequantize(u, d, m)
            names[layer] = name.rsplit(".", 1)[-1]
    sums: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    plain_forward = Linear.forward

    def measured_forward(layer: Linear, x: torch.Tensor) -> torch.Tensor:
        y = plain_forward(layer, x)
        if layer in exact_weights and x.shape[0] <= layer.quantized_max_rows:
            weight = exact_weights[layer]
            exact = x.float() @ weight.T
            llama_cpp = llama_cpp_q8_1(x) @ weight.T
            norm = exact.norm()
            row = sums[names[layer]]
            row[0] += float((y.float() - exact).norm() / norm)
            row[1] += float((llama_cpp - exact).norm() / norm)
            row[2] += 1
        return y

    Linear.forward = measured_forward  # type: ignore[method-assign]
    try:
        llm.generate(TEXT, SamplingParams(max_new_tokens=1))
    finally:
        Linear.forward = plain_forward  # type: ignore[method-assign]
    print("| layer | calls | rillet's kernel vs exact | llama.cpp's Q8_1 inputs vs exact |")
    print("|---|---|---|---|")
    for name, (ours, theirs, calls) in sums.items():
        print(f"| {name} | {calls:.0f} | {ours / calls:.2%} | {theirs / calls:.2%} |")


if __name__ == "__main__":
    main()
