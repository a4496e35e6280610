"""rillet.models.gguf_codes: a GGUF matrix's own integers as the integer kernel's groups,
checked against gguf's own dequantization, through the kernel, and through the loader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from model_files import QTYPES, k_quant_bytes, tiny_state_dict, write_gguf
from rillet import LLM
from rillet.models import group_quantization, load_model_files
from rillet.models.gguf_codes import CODE_BITS, GroupCodes, group_codes
from rillet.models.linear import Linear

ROWS, COLS = 32, 512  # two K-quant super-blocks a row; two 16-column blocks


def _raw(qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Blocks of ``qtype`` for a [ROWS, COLS] matrix: quantized by gguf where it can, random
    bytes with sane fp16 scales for the K-quants (which gguf cannot write)."""
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return k_quant_bytes(qtype, ROWS, rng)
    return quantize(rng.normal(size=(ROWS, COLS)).astype(np.float32), qtype)


def _codes(qtype: Q, seed: int = 0) -> tuple[GroupCodes, torch.Tensor]:
    """(codes, gguf's own float32 dequantization of the same blocks)."""
    raw = _raw(qtype, np.random.default_rng(seed + int(qtype)))
    codes = group_codes(raw, qtype, (ROWS, COLS))
    assert codes is not None
    reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(ROWS, COLS).copy())
    return codes, reference


@pytest.mark.parametrize("qtype", sorted(CODE_BITS, key=int))
def test_codes_stand_for_the_files_numbers(qtype: Q) -> None:
    codes, reference = _codes(qtype)
    assert codes.bits == CODE_BITS[qtype]
    per_group = 2 if qtype == Q.Q6_K else 1  # Q6_K: a scale per 16
    assert codes.u.shape == (ROWS, COLS // 32, 32)
    assert codes.d.shape == codes.m.shape == (ROWS, COLS // 32 * per_group)
    top = {Q.Q4_0: 15, Q.Q4_1: 15, Q.Q4_K: 15, Q.Q5_K: 31, Q.Q6_K: 63}.get(qtype, 255)
    assert int(codes.u.max()) <= top
    got = group_quantization.dequantize(codes.u, codes.d, codes.m)
    if qtype == Q.Q6_K:
        # d x scale rounded to fp16 (m = -32 d exactly): half an ulp of d times |u - 32|.
        d = codes.d.float().abs().repeat_interleave(16, dim=1)
        centred = (codes.u.float().reshape(ROWS, COLS) - 32).abs()
        bound = 2.0**-11 * d * centred + 2.0**-24
        assert bool(((got - reference).abs() <= bound).all())
        assert torch.equal(codes.m, (codes.d.float() * -32).half())
        assert not torch.equal(got, reference)
    elif qtype in (Q.Q4_K, Q.Q5_K):
        # The only change: a sub-block's d x scale and dmin x min are rounded to fp16, half
        # an ulp (2^-11 relative) each, so an element moves by at most that times its terms.
        d = codes.d.float().abs().repeat_interleave(32, dim=1)
        m = codes.m.float().abs().repeat_interleave(32, dim=1)
        bound = 2.0**-11 * (codes.u.float().reshape(ROWS, COLS) * d + m) + 2.0**-24
        assert bool(((got - reference).abs() <= bound).all())
        assert not torch.equal(got, reference)  # (the rounding is real, and this sees it)
    else:
        assert torch.equal(got, reference)


def test_types_without_codes_are_left_to_the_loader() -> None:
    _, block_bytes = gguf.GGML_QUANT_SIZES[Q.Q3_K]
    raw = np.random.default_rng(0).integers(0, 256, (ROWS, 2 * block_bytes), dtype=np.uint8)
    assert group_codes(raw, Q.Q3_K, (ROWS, COLS)) is None
    assert group_codes(np.zeros((ROWS, COLS), np.float32), Q.F32, (ROWS, COLS)) is None


def _need_quantized_kernel(native) -> None:  # type: ignore[no-untyped-def]
    if not native.quantized_linear_supported():
        pytest.skip("this CPU build has no AVX512-VNNI quantized kernel")


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q4_0, Q.Q5_1])
@torch.no_grad()
def test_kernel_on_codes_equals_fp32_math_on_the_files_numbers(native, qtype: Q) -> None:  # type: ignore[no-untyped-def]
    """Inputs whose 8-bit rounding is exact (integers, 127 in every group), so the kernel's
    result must equal fp32 math on the dequantized weight up to the order of sums; and
    each row alone equals it in a batch of 37 (>= 32 rows: Q6_K's batches of many rows take
    the kernel's unpacked path, one row its small-step path; 37 leaves a 1-row tile)."""
    _need_quantized_kernel(native)
    codes, reference = _codes(qtype, seed=1)
    packed = group_quantization.pack(codes.u, codes.d, codes.m, codes.bits)
    gen = torch.Generator().manual_seed(int(qtype))
    rows = 37
    x = torch.randint(-127, 128, (rows, COLS), generator=gen).float()
    x.view(rows, -1, 32)[..., 3] = 127
    got = native.quantized_linear(x, packed, codes.bits)
    # The first 9 rows against fp32 math (more rows meet a near-cancelling sum, where the
    # order of fp32 sums shows above these tolerances), all 37 alone against the batch.
    exact = x[:9] @ group_quantization.dequantize(codes.u, codes.d, codes.m).T
    torch.testing.assert_close(got[:9], exact, rtol=1e-4, atol=1e-3)  # sums in another order
    # The file's own numbers, not a re-quantization of them: as close to gguf's as fp16 allows.
    assert (got[:9] - x[:9] @ reference.T).norm() < 1e-3 * exact.norm()
    xb = x.to(torch.bfloat16)  # the same integers, as a served step's activations
    got_bf16 = native.quantized_linear(xb, packed, codes.bits)
    for i in range(rows):
        assert torch.equal(native.quantized_linear(x[i : i + 1], packed, codes.bits)[0], got[i])
        alone = native.quantized_linear(xb[i : i + 1], packed, codes.bits)[0]
        assert torch.equal(alone, got_bf16[i])


@torch.no_grad()
def test_q6_k_rows_keep_their_width_alone_and_take_8_bits_beside_others(native) -> None:  # type: ignore[no-untyped-def]
    """A layer all of whose rows are Q6_K takes the 6-bit copy with exactly their numbers
    (7 bits a weight read, not 9); fused beside Q4_K rows (a Q4_K_M file's qkv, whose v is
    Q6_K) it takes 8 bits, the Q6_K rows quantized again from their exact values."""
    _need_quantized_kernel(native)
    q6, q6_reference = _codes(Q.Q6_K, seed=2)
    q4, _ = _codes(Q.Q4_K, seed=3)
    alone = Linear(COLS, ROWS, bias=False).to(torch.bfloat16)
    alone.add_source_codes(0, q6)
    assert alone.enable_quantized(8, 64, native) and alone.quantized_bits == 6
    assert alone.quantized_weight is not None
    assert alone.quantized_weight.shape == (ROWS // 16, COLS // 32, 448)
    x = torch.randint(-127, 128, (3, COLS), generator=torch.Generator().manual_seed(5)).float()
    x.view(3, -1, 32)[..., 0] = 127
    exact = x @ group_quantization.dequantize(q6.u, q6.d, q6.m).T
    torch.testing.assert_close(alone(x), exact, rtol=1e-4, atol=1e-3)
    fused = Linear(COLS, 2 * ROWS, bias=False).to(torch.bfloat16)
    fused.add_source_codes(0, q4)
    fused.add_source_codes(ROWS, q6)
    assert fused.enable_quantized(4, 64, native) and fused.quantized_bits == 8
    got = fused(x)[:, ROWS:]
    assert (got - x @ q6_reference.T).norm() < 0.01 * exact.norm()  # 8 bits of the same values


@torch.no_grad()
def test_q4_k_rows_run_on_their_own_two_levels_of_scale(native) -> None:  # type: ignore[no-untyped-def]
    """A layer whose rows are all Q4_K takes mode 41: the file's codes under its own
    super-block d and dmin and byte scales (4.625 bits a weight read, not 5), so the
    kernel equals fp32 math on gguf's own dequantization, without the fp16 rounding of
    d x scale that mode 4 has; a row permutation (llama.cpp's q/k order) moves the scales
    with the codes."""
    _need_quantized_kernel(native)
    codes, reference = _codes(Q.Q4_K, seed=4)
    assert codes.k_scales is not None
    permutation = torch.randperm(ROWS, generator=torch.Generator().manual_seed(1))
    layer = Linear(COLS, ROWS, bias=False).to(torch.bfloat16)
    layer.add_source_codes(0, codes.rows(permutation))
    assert layer.enable_quantized(8, 64, native)
    assert layer.quantized_bits == group_quantization.K4
    assert layer.quantized_weight is not None
    assert layer.quantized_weight.shape == (ROWS // 16, COLS // 256, 2368)
    x = torch.randint(-127, 128, (5, COLS), generator=torch.Generator().manual_seed(6)).float()
    x.view(5, -1, 32)[..., 0] = 127
    torch.testing.assert_close(layer(x), x @ reference[permutation].T, rtol=1e-4, atol=1e-3)


def _quantized_per(x: torch.Tensor, inputs: int) -> torch.Tensor:
    """``x`` as the kernel rounds it to int8 with one scale per ``inputs`` (fp32 math, ties
    to even as ``cvtps_epi32``), times that scale."""
    pieces = x.float().reshape(x.shape[0], -1, inputs)
    amax = pieces.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return (torch.round(pieces * inverse) * (amax / 127)).reshape(x.shape)


@pytest.mark.parametrize("rows", [1, 3, 5, 9])
@torch.no_grad()
def test_q4_k_inputs_take_one_scale_per_super_block(native, rows: int) -> None:  # type: ignore[no-untyped-def]
    """Mode 41 quantizes each row's inputs to int8 with one scale per 256 (llama.cpp's
    Q8_K) and sums the groups' products in integers: the result is fp32 math on those
    quantized inputs and gguf's own weights, up to the order of sums, for float inputs
    whose groups' magnitudes differ by 100x (where a scale per 32 would round them far
    differently), in f32 and bf16, each row alone as in the batch."""
    _need_quantized_kernel(native)
    codes, reference = _codes(Q.Q4_K, seed=5)
    assert codes.k_scales is not None
    k = codes.k_scales
    packed = group_quantization.pack_k4(codes.u, k.d, k.neg_dmin, k.scale, k.min)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, COLS, generator=gen)
    x.view(rows, -1, 32)[:, ::3] *= 100  # every third group 100x the others
    x[0, 256:] = 0  # an all-zero super-block: scale 0, no division by it
    for inputs in (x, x.to(torch.bfloat16)):
        got = native.quantized_linear(inputs, packed, group_quantization.K4).float()
        per_super = _quantized_per(inputs, 256) @ reference.T
        per_group = _quantized_per(inputs, 32) @ reference.T
        if inputs.dtype == torch.float32:  # sums in another order
            assert (got - per_super).norm() < 1e-5 * per_super.norm()
            assert (per_group - per_super).norm() > 1e-3 * per_super.norm()  # it is per 256
        else:  # the output's bf16 rounding: half an ulp, 2^-9 of each value
            assert (got - per_super).norm() < 2.0**-8 * per_super.norm()
        for i in range(rows):
            alone = native.quantized_linear(inputs[i : i + 1], packed, group_quantization.K4)
            assert torch.equal(alone[0].float(), got[i])


def test_the_loader_yields_codes_in_hf_row_order(tmp_path: Path) -> None:
    """The tiny GGUF has q/k rows permuted as llama.cpp stores them (blk.1.attn_q is Q8_0):
    each matrix's codes must dequantize to exactly the float weights the loader reads."""
    write_gguf(tmp_path / "tiny.gguf", tiny_state_dict())
    loaded = load_model_files(str(tmp_path / "tiny.gguf"))
    assert loaded.group_codes is not None
    codes = dict(loaded.group_codes())
    weights = dict(loaded.weights())
    with_codes = {n for n, t in QTYPES.items() if t in CODE_BITS and n not in ("output.weight",)}
    assert len(codes) == len(with_codes) + 1  # + the Q8_0 LM head
    assert "model.layers.1.self_attn.q_proj.weight" in codes
    for name, group in codes.items():
        assert torch.equal(group_quantization.dequantize(group.u, group.d, group.m), weights[name])


@torch.no_grad()
def test_a_served_model_runs_the_files_integers(native, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """bf16 with the integer kernel on: layers whose rows are all 4-bit in the file take a
    4-bit copy holding exactly the file's numbers, 8-bit ones an 8-bit copy; layers fused
    from a 4-bit and a float part (blk.0 qkv: q F32, k F16, v Q8_0) take 8 bits."""
    _need_quantized_kernel(native)
    write_gguf(tmp_path / "tiny.gguf", tiny_state_dict())
    files = load_model_files(str(tmp_path / "tiny.gguf"))
    assert files.group_codes is not None
    stored = dict(files.group_codes())
    llm = LLM(str(tmp_path / "tiny.gguf"), dtype="bfloat16", quantized_max_batch_tokens=64)
    model = llm.core.runner.model
    layers = model.layers
    expected_bits = {
        layers[0].self_attn.o_proj: (4, "model.layers.0.self_attn.o_proj.weight"),  # Q4_0
        layers[0].mlp.down_proj: (8, "model.layers.0.mlp.down_proj.weight"),  # Q5_1
        layers[1].self_attn.o_proj: (4, None),  # F32: quantized from the weight at 4 bits
        layers[0].self_attn.qkv_proj: (8, None),
    }
    gen = torch.Generator().manual_seed(0)
    for layer, (bits, name) in expected_bits.items():
        assert isinstance(layer, Linear) and layer.quantized_bits == bits
        assert layer.source_codes is None  # dropped once the copy is made
        if name is None:
            continue
        x = torch.randint(-127, 128, (3, layer.in_features), generator=gen).float()
        x.view(3, -1, 32)[..., 0] = 127
        codes = stored[name]
        exact = x @ group_quantization.dequantize(codes.u, codes.d, codes.m).T
        got = layer.quantized_native.quantized_linear(x, layer.quantized_weight, bits)
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-3)
