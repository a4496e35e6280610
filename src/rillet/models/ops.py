"""The decoder layer's elementwise steps, each one native call on CPU or a few torch ops.

``native`` is the compiled kernel module (``cpu_kernels.load``) or None; the torch
versions are the reference the kernels are tested against, and what runs on other
devices or when the kernels could not be built.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from rillet.models.attention import KVCache, dequantize_kv_rows, kv_head_dim, quantize_kv_rows
from rillet.models.rope import RotaryEmbedding, apply_rotary


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    native: ModuleType | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm residual step: returns (rms_norm(residual + x) * weight, residual + x).

    With ``residual=None`` (the first layer) ``x`` is the residual stream. The native
    version updates ``residual`` in place and writes the normalised rows over ``x``.
    """
    if native is not None:
        return native.add_rms_norm(x, residual, weight, eps), (x if residual is None else residual)
    stream = x if residual is None else residual + x
    return F.rms_norm(stream, weight.shape, weight, eps), stream


def rotary_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    rope: RotaryEmbedding,
    cache: KVCache,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    native: ModuleType | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate q and k, write this step's K/V into the paged cache; returns q, k, v views.

    ``qkv`` is the fused projection [T, (H + 2 Hkv) * d]; results are [T, heads, d]. With
    an 8-bit cache and no kernels, k and v are what the cache holds (quantized and back), so
    a chunk attending to its own K/V sees what a later chunk reads.
    """
    key_cache, value_cache = cache
    num_tokens, head_dim = qkv.shape[0], kv_head_dim(key_cache)
    k_end = (num_heads + num_kv_heads) * head_dim
    v = qkv[:, k_end:].view(num_tokens, num_kv_heads, head_dim)
    if native is not None:
        native.rotary_and_cache(
            qkv,
            positions,
            rope.cos,
            rope.sin,
            key_cache,
            value_cache,
            slot_mapping,
            num_heads,
            num_kv_heads,
        )
        qk = qkv[:, :k_end].view(num_tokens, num_heads + num_kv_heads, head_dim)
    else:
        cos, sin = rope.cos_sin(positions)
        # Rotate q and k heads together: one set of elementwise ops instead of two.
        qk = apply_rotary(qkv[:, :k_end].view(num_tokens, -1, head_dim), cos, sin)
        k = qk[:, num_heads:]
        eight_bit = key_cache.dtype == torch.int8
        k_rows, v_rows = (quantize_kv_rows(k), quantize_kv_rows(v)) if eight_bit else (k, v)
        key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slot_mapping, k_rows)
        value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, slot_mapping, v_rows)
        if eight_bit:
            k, v = dequantize_kv_rows(k_rows, k.dtype), dequantize_kv_rows(v_rows, v.dtype)
        return qk[:, :num_heads], k, v
    return qk[:, :num_heads], qk[:, num_heads:], v  # slices: cheaper than Tensor.split


def silu_and_mul(gate_up: torch.Tensor, native: ModuleType | None) -> torch.Tensor:
    """SwiGLU: [T, 2I] (gate then up) -> silu(gate) * up, [T, I]."""
    if native is not None:
        out: torch.Tensor = native.silu_and_mul(gate_up)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def scaled_rms_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    native: ModuleType | None,
    *,
    group: int | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """Gemma's RMSNorm: each group of ``group`` values (default: the whole row) of each row
    of ``x`` [T, width] -> ``x / rms(x) * scale`` in fp32, cast back (``scale`` fp32, as
    Gemma's ``1 + w``). ``in_place`` writes into ``x`` (whose rows may be strided)."""
    size = group or x.shape[-1]
    if native is not None:
        out: torch.Tensor = native.scaled_rms_norm(x, scale, eps, size, in_place)
        return out
    h = x.float().unflatten(-1, (-1, size))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * scale
    result = h.flatten(-2).to(x.dtype)
    return x.copy_(result) if in_place else result


def gelu_tanh_and_mul(gate_up: torch.Tensor, native: ModuleType | None) -> torch.Tensor:
    """GeGLU: [T, 2I] (gate then up) -> gelu_tanh(gate) * up, [T, I]."""
    if native is not None:
        out: torch.Tensor = native.gelu_tanh_and_mul(gate_up)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
