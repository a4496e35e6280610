"""Linear layers' CPU weight copies: int8 for small batches (close to bf16, used only where
correct) and oneDNN-packed bf16 (exactly the plain result)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rillet import LLM, SamplingParams
from rillet.models.linear import Linear


def _layer(in_features: int, out_features: int) -> Linear:
    torch.manual_seed(0)
    return Linear(in_features, out_features, bias=True).to(torch.bfloat16)


@torch.no_grad()
def test_small_batches_use_int8_and_stay_close() -> None:
    layer = _layer(64, 96)
    assert layer.enable_int8(max_rows=4)
    for rows in (1, 4):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        exact = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        got = layer(x).float()
        assert not torch.equal(got, F.linear(x, layer.weight, layer.bias).float())
        assert (got - exact).norm() < 0.02 * exact.norm()


@torch.no_grad()
def test_larger_batches_keep_the_bf16_weights() -> None:
    layer = _layer(64, 96)
    assert layer.enable_int8(max_rows=4)
    x = torch.randn(5, 64).to(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@torch.no_grad()
def test_shapes_the_kernel_gets_wrong_are_refused() -> None:
    # torch's int8 kernel miscomputes inner sizes that are not a multiple of 16.
    layer = _layer(24, 40)
    assert not layer.enable_int8(max_rows=4)
    x = torch.randn(1, 24).to(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def _prompt_logprobs(model: Path, int8: int) -> tuple[list[float], int]:
    # Steps of at most 8 tokens, so with int8 on every matmul takes the int8 path.
    llm = LLM(
        str(model),
        dtype="bfloat16",
        int8_max_batch_tokens=int8,
        max_num_batched_tokens=8,
        max_num_seqs=8,
    )
    layers = sum(
        m.int8_weight is not None for m in llm.core.runner.model.modules() if isinstance(m, Linear)
    )
    out = llm.generate(
        "Streaming sends every token the moment it is sampled, 一个接一个 🚀",
        SamplingParams(max_new_tokens=1, prompt_logprobs=True),
    )[0]
    assert out.prompt_tokens is not None
    return [t.logprob for t in out.prompt_tokens if t.logprob is not None], layers


def test_engine_with_int8_scores_text_like_bf16(tiny_model_dir: Path) -> None:
    reference, no_layers = _prompt_logprobs(tiny_model_dir, 0)
    quantized, layers = _prompt_logprobs(tiny_model_dir, 8)
    assert no_layers == 0
    assert layers == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and lm_head
    mean_ref = sum(reference) / len(reference)
    mean_q = sum(quantized) / len(quantized)
    assert abs(mean_q - mean_ref) < 0.02 * abs(mean_ref)


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


@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize("helpers", [0, 1])
@torch.no_grad()
def test_rillet_int8_kernel_matches_dequantized_weights(native, rows, helpers) -> None:  # type: ignore[no-untyped-def]
    if not native.int8_linear_supported():
        pytest.skip("this CPU build has no AVX512-BF16 int8 kernel")
    gen = torch.Generator().manual_seed(rows)
    # 1000 output rows: not a multiple of the kernel's 32-row items or its row blocks.
    weight = torch.randint(-127, 128, (1000, 576), dtype=torch.int8, generator=gen)
    scales = (torch.rand(1000, generator=gen) / 50).to(torch.bfloat16)
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    expected = x.float() @ (weight.float() * scales.float()[:, None]).T
    got = native.int8_linear(x, weight, scales, helpers).float()
    assert (got - expected).norm() < 0.01 * expected.norm()
    torch.testing.assert_close(
        got, torch._weight_int8pack_mm(x, weight, scales).float(), rtol=2e-2, atol=2e-2
    )


@torch.no_grad()
def test_int8_layers_take_rillets_kernel_when_built(native) -> None:  # type: ignore[no-untyped-def]
    layer = _layer(64, 96)
    assert layer.enable_int8(max_rows=8, native=native, helpers=1)
    assert (layer.int8_native is native) == bool(native.int8_linear_supported())
    x = torch.randn(3, 64).to(torch.bfloat16)
    through_torch = torch._weight_int8pack_mm(x, layer.int8_weight, layer.int8_scales) + layer.bias
    torch.testing.assert_close(layer(x).float(), through_torch.float(), rtol=2e-2, atol=2e-2)


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
