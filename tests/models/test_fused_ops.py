"""The fused native layer ops against the torch versions they replace (``models.ops``)."""

from __future__ import annotations

import pytest
import torch

from rillet.models import ops
from rillet.models.attention import (
    allocate_kv_caches,
    dequantize_kv_rows,
    kv_row_width,
    quantize_kv_rows,
)
from rillet.models.rope import RotaryEmbedding

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


def _rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
@pytest.mark.parametrize("width", [576, 40])  # 40: a tail after the 16-lane loop
@pytest.mark.parametrize("rows", [1, 37])  # 37: more than one parallel task
def test_add_rms_norm(native, dtype, tol, width, rows) -> None:  # type: ignore[no-untyped-def]
    x, residual = _rand(rows, width, dtype=dtype, seed=1), _rand(rows, width, dtype=dtype, seed=2)
    weight = _rand(width, dtype=dtype, seed=3)
    want_out, want_res = ops.add_rms_norm(x, residual, weight, 1e-5, None)
    got_out, got_res = ops.add_rms_norm(x.clone(), residual.clone(), weight, 1e-5, native)
    torch.testing.assert_close(got_res, want_res, rtol=tol, atol=tol)
    torch.testing.assert_close(got_out, want_out, rtol=tol, atol=tol)
    # First layer: no residual yet; x is the stream and must be left as it was.
    stream = x.clone()
    got_out, got_res = ops.add_rms_norm(stream, None, weight, 1e-5, native)
    want_out, _ = ops.add_rms_norm(x, None, weight, 1e-5, None)
    torch.testing.assert_close(got_out, want_out, rtol=tol, atol=tol)
    assert got_res is stream and torch.equal(stream, x)


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 2, 24)])
def test_rotary_and_cache(native, dtype, tol, heads, kv_heads, head_dim) -> None:  # type: ignore[no-untyped-def]
    rope = RotaryEmbedding(head_dim, 512, 10000.0, None, dtype)
    rows, num_blocks, block_size = 35, 8, 16
    qkv = _rand(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=4)
    positions = torch.randint(0, 512, (rows,), generator=torch.Generator().manual_seed(5))
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(6))
    slots = slots[:rows]

    def cache() -> tuple[torch.Tensor, torch.Tensor]:
        shape = (num_blocks, block_size, kv_heads, head_dim)
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    want_cache, got_cache = cache(), cache()
    want = ops.rotary_and_cache(qkv, positions, rope, want_cache, slots, heads, kv_heads, None)
    got = ops.rotary_and_cache(
        qkv.clone(), positions, rope, got_cache, slots, heads, kv_heads, native
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    for g, w in zip(got_cache, want_cache, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 2, 24)])
def test_rotary_and_cache_into_an_8bit_cache(native, dtype, heads, kv_heads, head_dim) -> None:  # type: ignore[no-untyped-def]
    """The kernel writes exactly the bytes quantize_kv_rows makes of the rotated k and v; the
    torch path writes the same rows and returns what the cache holds."""
    rope = RotaryEmbedding(head_dim, 512, 10000.0, None, dtype)
    rows = 35
    qkv = _rand(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=4)
    positions = torch.randint(0, 512, (rows,), generator=torch.Generator().manual_seed(5))
    slots = torch.randperm(128, generator=torch.Generator().manual_seed(6))[:rows]
    got_cache, want_cache = (
        allocate_kv_caches(1, 8, 16, kv_heads, head_dim, torch.int8, "cpu")[0] for _ in range(2)
    )
    _, k, v = ops.rotary_and_cache(
        qkv.clone(), positions, rope, got_cache, slots, heads, kv_heads, native
    )
    for cache, new in zip(got_cache, (k, v), strict=True):
        written = cache.view(-1, kv_heads, kv_row_width(head_dim, torch.int8))[slots]
        assert torch.equal(written, quantize_kv_rows(new))
        assert (
            cache.view(-1, kv_heads, kv_row_width(head_dim, torch.int8))
            .count_nonzero(-1)
            .count_nonzero()
            == rows * kv_heads
        )
    _, k_held, v_held = ops.rotary_and_cache(
        qkv.clone(), positions, rope, want_cache, slots, heads, kv_heads, None
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(got_cache, want_cache, strict=True):
        # the two paths rotate within tol of each other, which may move a code by one step
        step = float(want[..., head_dim:].contiguous().view(torch.float32).max())
        torch.testing.assert_close(
            dequantize_kv_rows(got, torch.float32),
            dequantize_kv_rows(want, torch.float32),
            rtol=tol,
            atol=tol + step,
        )
    for held, cache in zip((k_held, v_held), want_cache, strict=True):
        rows_held = cache.view(-1, kv_heads, kv_row_width(head_dim, torch.int8))[slots]
        assert torch.equal(held, dequantize_kv_rows(rows_held, dtype))


def test_rotary_and_cache_rejects_bad_slots(native) -> None:  # type: ignore[no-untyped-def]
    rope = RotaryEmbedding(64, 16, 10000.0, None, torch.float32)
    qkv = torch.zeros(1, 5 * 64)
    cache = torch.zeros(1, 16, 1, 64), torch.zeros(1, 16, 1, 64)
    with pytest.raises(RuntimeError, match="slot"):
        native.rotary_and_cache(
            qkv, torch.tensor([0]), rope.cos, rope.sin, *cache, torch.tensor([16]), 3, 1
        )
    with pytest.raises(RuntimeError, match="position"):
        native.rotary_and_cache(
            qkv, torch.tensor([16]), rope.cos, rope.sin, *cache, torch.tensor([0]), 3, 1
        )


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
@pytest.mark.parametrize("width", [1536, 40])
def test_silu_and_mul(native, dtype, tol, width) -> None:  # type: ignore[no-untyped-def]
    x = _rand(37, 2 * width, dtype=dtype, seed=7) * 4
    torch.testing.assert_close(
        ops.silu_and_mul(x, native), ops.silu_and_mul(x, None), rtol=tol, atol=tol
    )


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
@pytest.mark.parametrize(
    ("width", "group"), [(640, None), (40, None), (4 * 256, 256), (3 * 24, 24)]
)
def test_scaled_rms_norm(native, dtype, tol, width, group) -> None:  # type: ignore[no-untyped-def]
    """Gemma's norm, whole rows and per head (QK-norm), out of place and in place on the
    strided q part of a fused row, against the torch version and transformers' formula."""
    size = group or width
    x = _rand(37, width, dtype=dtype, seed=7)
    scale = 1.0 + _rand(size, dtype=torch.float32, seed=8)
    want = ops.scaled_rms_norm(x, scale, 1e-6, None, group=group)
    h = x.float().unflatten(-1, (-1, size))
    hf = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * scale).flatten(-2)
    torch.testing.assert_close(want, hf.to(dtype))
    got = ops.scaled_rms_norm(x, scale, 1e-6, native, group=group)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    fused = torch.cat([x, _rand(37, 32, dtype=dtype, seed=9)], dim=1)  # [q | other]
    rest = fused[:, width:].clone()
    ops.scaled_rms_norm(fused[:, :width], scale, 1e-6, native, group=group, in_place=True)
    torch.testing.assert_close(fused[:, :width], want, rtol=tol, atol=tol)
    assert torch.equal(fused[:, width:], rest)


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
@pytest.mark.parametrize("width", [2048, 40])
def test_gelu_tanh_and_mul(native, dtype, tol, width) -> None:  # type: ignore[no-untyped-def]
    x = _rand(19, 2 * width, dtype=dtype, seed=10) * 3
    want = ops.gelu_tanh_and_mul(x.float(), None)
    got = ops.gelu_tanh_and_mul(x, native)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * 3)
