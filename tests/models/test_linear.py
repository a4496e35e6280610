"""Linear layers' CPU weight copies: 4- and 8-bit group-quantized (rillet's integer kernel,
close to the exact product) and packed bf16 (rillet's kernel, or oneDNN's exactly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rillet import LLM, SamplingParams
from rillet.models import group_quantization
from rillet.models.linear import Linear


def _layer(in_features: int, out_features: int) -> Linear:
    torch.manual_seed(0)
    return Linear(in_features, out_features, bias=True).to(torch.bfloat16)


@torch.no_grad()
def test_small_batches_use_the_quantized_copy_and_stay_close(native) -> None:  # type: ignore[no-untyped-def]
    _need_quantized_kernel(native)
    layer = _layer(64, 96)
    assert layer.enable_quantized(bits=8, max_rows=4, native=native)
    for rows in (1, 4):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        exact = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        got = layer(x).float()
        assert not torch.equal(got, F.linear(x, layer.weight, layer.bias).float())
        assert (got - exact).norm() < 0.02 * exact.norm()
    # Above max_rows the layer's bf16 weight (not packed here) gives the plain result.
    x = torch.randn(5, 64).to(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@torch.no_grad()
def test_shapes_the_quantized_layout_cannot_hold_are_refused(native) -> None:  # type: ignore[no-untyped-def]
    # 40 output columns are not whole 16-column blocks; 24 inputs not whole groups of 32.
    for layer in (_layer(64, 40), _layer(24, 48)):
        assert not layer.enable_quantized(bits=4, max_rows=4, native=native)
        x = torch.randn(1, layer.in_features).to(torch.bfloat16)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def _need_quantized_kernel(native) -> None:  # type: ignore[no-untyped-def]
    if not native.quantized_linear_supported():
        pytest.skip("this CPU build has no AVX512-VNNI quantized kernel")


def _exact_inputs(rows: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    """Integers whose every group of 32 has 127 as its largest magnitude: the kernel's
    8-bit rounding of the inputs is then exact (scale 1), so only fp32 sums differ."""
    x = torch.randint(-127, 128, (rows, in_features), generator=gen).float()
    x.view(rows, -1, 32)[..., 5] = 127
    return x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17])
@pytest.mark.parametrize(("out_features", "in_features"), [(80, 64), (96, 576), (112, 1536)])
@torch.no_grad()
def test_quantized_kernel_matches_the_dequantized_weight(  # type: ignore[no-untyped-def]
    native, bits, rows, out_features, in_features
) -> None:
    """Rows around the 4-row tiles; 5, 6 and 7 column blocks leave 1, 2 and 3 blocks after
    the 4-block tiles of one or two rows and 1 or none after the 2-block tiles of more."""
    _need_quantized_kernel(native)
    gen = torch.Generator().manual_seed(rows * out_features + bits)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    u, d, m = group_quantization.quantize(weight, bits)
    reference = group_quantization.dequantize(u, d, m)
    packed = group_quantization.pack(u, d, m, bits)
    x = _exact_inputs(rows, in_features, gen)
    got = native.quantized_linear(x, packed, bits)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    torch.testing.assert_close(got, x @ reference.T, rtol=1e-5, atol=1e-3)
    # bf16 inputs, rounded to 8 bits per group by the kernel: ~0.6 % off the exact product.
    xb = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    got_bf16 = native.quantized_linear(xb, packed, bits)
    assert got_bf16.dtype == torch.bfloat16
    exact = xb.float() @ reference.T
    assert (got_bf16.float() - exact).norm() < 0.015 * exact.norm()


@torch.no_grad()
def test_quantized_kernel_gives_each_row_the_same_result_in_any_batch(native) -> None:  # type: ignore[no-untyped-def]
    """Each row's inputs are quantized on their own and its sums run in one fixed order, so
    a row's output does not depend on its neighbours or their number."""
    _need_quantized_kernel(native)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(112, 576, generator=gen) * 0.05
    packed = group_quantization.pack(*group_quantization.quantize(weight, 4), bits=4)
    x = torch.randn(13, 576, generator=gen).to(torch.bfloat16)
    batch = native.quantized_linear(x, packed, 4)
    for i in range(13):
        assert torch.equal(native.quantized_linear(x[i : i + 1], packed, 4)[0], batch[i])
    assert torch.equal(native.quantized_linear(x[2:9], packed, 4), batch[2:9])


@torch.no_grad()
def test_4_bit_quantization_gives_back_weights_that_were_4_bit() -> None:
    """Weights dequantized from Q4_1-style groups (fp16 scale and offset, codes 0..15 that
    reach both ends) quantize back to the same codes and dequantize to the same numbers."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 4, 32), generator=gen, dtype=torch.uint8)
    codes[..., 0], codes[..., 1] = 0, 15
    scale = (torch.rand(32, 4, generator=gen) / 50 + 1e-3).half()
    offset = (-torch.rand(32, 4, generator=gen) / 5).half()
    weight = group_quantization.dequantize(codes, scale, offset)
    u, d, m = group_quantization.quantize(weight, 4)
    assert torch.equal(u, codes) and torch.equal(d, scale) and torch.equal(m, offset)
    assert torch.equal(group_quantization.dequantize(u, d, m), weight)


def _prompt_logprobs(model: Path, quantized: int) -> tuple[list[float], int]:
    llm = LLM(
        str(model),
        dtype="bfloat16",
        quantized_max_batch_tokens=quantized,
        max_num_batched_tokens=8,
        max_num_seqs=8,
    )
    layers = sum(
        m.quantized_native is not None
        for m in llm.core.runner.model.modules()
        if isinstance(m, Linear)
    )
    out = llm.generate(
        "Streaming sends every token the moment it is sampled, 一个接一个 🚀",
        SamplingParams(max_new_tokens=1, prompt_logprobs=True),
    )[0]
    assert out.prompt_tokens is not None
    return [t.logprob for t in out.prompt_tokens if t.logprob is not None], layers


def test_engine_with_quantized_weights_scores_text_like_bf16(native, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _need_quantized_kernel(native)
    reference, no_layers = _prompt_logprobs(tiny_model_dir, 0)
    quantized, layers = _prompt_logprobs(tiny_model_dir, 8)
    assert no_layers == 0
    assert layers == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and lm_head
    mean_ref = sum(reference) / len(reference)
    mean_q = sum(quantized) / len(quantized)
    # 4-bit copies of random (not 4-bit) weights: a few percent, not a broken model.
    assert abs(mean_q - mean_ref) < 0.05 * abs(mean_ref)


@torch.no_grad()
def test_packed_weights_give_exactly_the_plain_result() -> None:
    layer = _layer(64, 96)
    assert layer.enable_packed()
    for rows in (1, 5, 64, 300):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@torch.no_grad()
def test_float32_weights_are_not_packed() -> None:
    # fp32 is the exact mode; it keeps torch's plain path.
    assert not Linear(64, 96).enable_packed()


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 16, 23, 64, 130])
@pytest.mark.parametrize(("out_features", "in_features"), [(16, 62), (160, 576), (176, 1536)])
@torch.no_grad()
def test_rillet_bf16_kernel_matches_fp32_math(native, rows, out_features, in_features) -> None:  # type: ignore[no-untyped-def]
    """Row counts around the 8-row register tile; 10 and 11 column blocks leave one and
    two blocks after the 3-block tiles; an inner size that is even but not a multiple of 32."""
    if not native.bf16_linear_supported():
        pytest.skip("this CPU build has no AVX512-BF16 bf16 kernel")
    gen = torch.Generator().manual_seed(rows * out_features)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.05).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    got = native.bf16_linear(x, native.pack_bf16_weight(weight))
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    torch.testing.assert_close(got.float(), x.float() @ weight.float().T, rtol=1e-2, atol=1e-2)


@torch.no_grad()
def test_layers_take_rillets_bf16_kernel_where_it_serves_the_shape(native) -> None:  # type: ignore[no-untyped-def]
    layer = _layer(64, 96)
    assert layer.enable_packed(native)
    assert (layer.packed_native is native) == bool(native.bf16_linear_supported())
    x = torch.randn(12, 64).to(torch.bfloat16)
    exact = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    torch.testing.assert_close(layer(x).float(), exact, rtol=1e-2, atol=1e-2)
    odd = _layer(64, 40)  # 40 output columns: not whole 16-column blocks, so oneDNN's layout
    assert odd.enable_packed(native)
    assert odd.packed_native is None
    assert torch.equal(odd(x), F.linear(x, odd.weight, odd.bias))
