"""Attention over a paged KV cache, for a flat batch of mixed decodes and prefill chunks.

Layout of one step's batch (built by the model runner): the first ``num_decode_tokens``
rows are decodes, one token per sequence; then each prefill chunk's rows, contiguous.
Each layer's cache is a pair of tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``;
new tokens are written (by ``ops.rotary_and_cache``, before attention) through the flat
view ``[num_slots, ...]`` with slot = block_id * block_size + offset.

The 8-bit cache (``--kv-cache-dtype int8``) is int8 ``[..., head_dim + 4 * groups]``: each
row's codes, then one fp32 scale per group of 32 values (``quantize_kv_rows``; the kernels'
``csrc/kv_int8.h``). At head size 64 a row is 72 bytes instead of bf16's 128: the cache
holds 1.8x the tokens in the same memory, and decode attention at long contexts, which is
bound by the bytes it reads, reads 1.8x fewer.

With the native kernels (``cpu_kernels``), decodes and prefill chunks read their contexts in
place through the block tables, and a prefill row's result does not depend on how its
prompt was chunked or whether its prefix came from the prefix cache.

Without them, contexts are read by gathering whole blocks (``index_select`` over the block
axis: a few large contiguous copies instead of one small copy per token), padded to a whole
number of blocks and masked. Decodes run as one batched SDPA: the GQA group is folded into the
query-length axis (``[D, kv_heads, group, head_dim]``) so no K/V head is copied
``group`` times. Prefill chunks run one SDPA each; a chunk with no cached prefix uses its
own fresh K/V with a causal mask and never touches the cache for reading.
"""

from __future__ import annotations

import math
import mmap
import warnings
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F

from rillet.models import cpu_kernels

KVCache = tuple[torch.Tensor, torch.Tensor]

#: Values per fp32 scale in the 8-bit cache (as llama.cpp's q8_0).
KV_GROUP = 32


def kv_row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of a cache row: ``head_dim``, or for the 8-bit cache its codes and then
    one fp32 scale (four int8 elements) per group of 32 values."""
    if dtype != torch.int8:
        return head_dim
    return head_dim + 4 * -(-head_dim // KV_GROUP)


def kv_head_dim(cache: torch.Tensor) -> int:
    """The head size of a cache tensor (the inverse of ``kv_row_width``)."""
    width = cache.shape[-1]
    return width - 4 * -(-width // (KV_GROUP + 4)) if cache.dtype == torch.int8 else width


def quantize_kv_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows [..., d] -> 8-bit cache rows: per group of 32 values, round(x / s) with
    s = max |x| / 127; then the groups' scales as bytes. The kernels' arithmetic
    (``csrc/kv_int8.h``: multiplications by reciprocals, round half to even), so both
    write the same bytes."""
    codes, scales = [], []
    for group in x.float().split(KV_GROUP, dim=-1):
        scale = group.abs().amax(dim=-1, keepdim=True) * (1 / 127)
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        codes.append(torch.round(group * inverse).clamp_(-127, 127).to(torch.int8))
        scales.append(scale)
    return torch.cat([*codes, torch.cat(scales, dim=-1).view(torch.int8)], dim=-1)


def dequantize_kv_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """8-bit cache rows -> values [..., d] in ``dtype``."""
    head_dim = kv_head_dim(rows)
    scales = rows[..., head_dim:].contiguous().view(torch.float32)
    per_value = scales.repeat_interleave(KV_GROUP, dim=-1)[..., :head_dim]
    return (rows[..., :head_dim].float() * per_value).to(dtype)


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens (a whole prompt, a chunk of it, or a recompute).

    ``context_block_ids`` lists the blocks of the whole context up to the end of this
    chunk; it is None when the chunk starts at position 0, which allows plain causal
    attention over the chunk's own K/V. ``mask`` is the boolean
    [query_len, num_context_blocks * block_size] "may attend" matrix for the cached case.
    """

    query_start: int
    query_len: int
    context_block_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    start_position: int = 0


@dataclass
class AttentionMetadata:
    """Everything the layers need for one step besides activations, built once and shared."""

    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    positions: torch.Tensor  # [num_tokens] each token's position, for RoPE
    num_decode_tokens: int = 0
    decode_block_ids: torch.Tensor | None = None  # [D, max_blocks] block tables, padded
    # Decodes need either the compiled kernel with context lengths, or the SDPA mask.
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, max_blocks * block_size], True = attend
    decode_context_lens: torch.Tensor | None = None  # [D] int64
    # Speculative verification: rows decode_seq_starts[s] .. [s + 1] are one sequence's
    # positions p .. p + k, each a decode row with its own context length (the step writes
    # all their K/V before attention reads it). None: one row a sequence.
    decode_seq_starts: torch.Tensor | None = None  # [S + 1] int64
    native: ModuleType | None = None  # compiled CPU kernels (attention and fused ops), if any
    prefills: list[PrefillChunk] = field(default_factory=list)
    # The native prefill kernel's view of ``prefills``: every chunk, cold or not, read from
    # the cache through its block table (rows relative to the first prefill row).
    native_prefills: NativePrefills | None = None


@dataclass
class NativePrefills:
    """The prefill chunks of a step, as ``cpu_kernels.paged_prefill_attention`` reads them."""

    block_ids: torch.Tensor  # [C, max blocks] int64, padded with block 0
    query_starts: torch.Tensor  # [C] int64, each chunk's first row among the prefill rows
    query_lens: torch.Tensor  # [C] int64
    start_positions: torch.Tensor  # [C] int64, each chunk's first position


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[KVCache]:
    """One (key, value) pair of zeroed cache tensors per layer; ``torch.int8``: the 8-bit
    cache, whose rows also carry their scale."""
    shape = (num_blocks, block_size, num_kv_heads, kv_row_width(head_dim, dtype))
    return [
        (_zeroed(shape, dtype, device), _zeroed(shape, dtype, device)) for _ in range(num_layers)
    ]


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor. On CPU it lives in an anonymous mapping, which the kernel hands out
    zeroed and backs with RAM page by page as it is first written: a cache sized for the
    machine (gigabytes) costs only what the traffic fills. ``torch.zeros`` would write, and
    so take, every page at start-up."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    pages = mmap.mmap(-1, max(1, count * itemsize))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": an mmap is writable
        return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Attend; this step's K/V must already be in the cache. q [T, H, d], k/v [T, Hkv, d].

    ``window``: a sliding window (a query at p sees keys p - window + 1 .. p), None for full
    causal attention. Returns [T, H, d].
    """
    key_cache, value_cache = cache
    num_decodes = meta.num_decode_tokens
    decoded = None
    if num_decodes and meta.native is not None and meta.decode_context_lens is not None:
        assert meta.decode_block_ids is not None
        decoded = cpu_kernels.paged_decode_attention(
            meta.native,
            q[:num_decodes],
            key_cache,
            value_cache,
            meta.decode_block_ids,
            meta.decode_context_lens,
            scale,
            window,
            meta.decode_seq_starts,
        )
        if not meta.prefills:
            # A decode-only step, the steady state of streaming: the kernel's output is the
            # whole answer, with no buffer to allocate and copy into.
            return decoded

    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = q.new_empty(num_tokens, num_heads, head_dim)
    if decoded is not None:
        out[:num_decodes] = decoded
    elif num_decodes:
        _decode_with_sdpa(q, key_cache, value_cache, meta, scale, out, window)

    if meta.native_prefills is not None and meta.native is not None:
        chunks = meta.native_prefills
        out[num_decodes:] = cpu_kernels.paged_prefill_attention(
            meta.native,
            q[num_decodes:],
            key_cache,
            value_cache,
            chunks.block_ids,
            chunks.query_starts,
            chunks.query_lens,
            chunks.start_positions,
            scale,
            window,
        )
        return out
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        q_c = q[rows].transpose(0, 1)  # [H, Lq, d]
        if chunk.context_block_ids is None and window is None:
            k_c, v_c = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q_c, k_c, v_c, is_causal=True, scale=scale, enable_gqa=group > 1
            )
        else:
            if chunk.context_block_ids is None:  # a cold chunk: its own K/V, causal
                k_c, v_c = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                q_pos = torch.arange(chunk.query_len, device=q.device)
                mask = q_pos[None] <= q_pos[:, None]
            else:
                ids = chunk.context_block_ids[None]
                k_c = _gather_blocks(key_cache, ids, q.dtype)[0]  # [Hkv, L, d]
                v_c = _gather_blocks(value_cache, ids, q.dtype)[0]
                assert chunk.mask is not None
                mask = chunk.mask
            if window is not None:
                first = chunk.start_position
                q_pos = torch.arange(first, first + chunk.query_len, device=q.device)
                k_pos = torch.arange(mask.shape[1], device=q.device)
                mask = mask & (k_pos[None] > q_pos[:, None] - window)
            o = F.scaled_dot_product_attention(
                q_c, k_c, v_c, attn_mask=mask, scale=scale, enable_gqa=group > 1
            )
        out[rows] = o.transpose(0, 1)
    return out


def _gather_blocks(
    cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """[N, max_blocks] block ids -> [N, kv_heads, max_blocks * block_size, head_dim] in
    ``dtype`` (a view of the gathered blocks unless the cache is 8-bit)."""
    num_seqs, num_blocks = block_ids.shape
    block_size, num_kv_heads, head_dim = cache.shape[1], cache.shape[2], kv_head_dim(cache)
    blocks = cache.index_select(0, block_ids.reshape(-1))
    if cache.dtype == torch.int8:
        blocks = dequantize_kv_rows(blocks, dtype)
    return blocks.view(num_seqs, num_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)


def _decode_with_sdpa(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    window: int | None = None,
) -> None:
    """Portable decode path: gather padded contexts, one batched SDPA."""
    assert meta.decode_block_ids is not None and meta.decode_mask is not None
    mask = meta.decode_mask
    if window is not None:
        assert meta.decode_context_lens is not None
        k_pos = torch.arange(mask.shape[-1], device=q.device)
        first = (meta.decode_context_lens - window).view(-1, 1, 1, 1)
        mask = mask & (k_pos >= first)
    num_decodes, num_heads, head_dim = meta.num_decode_tokens, q.shape[1], q.shape[2]
    num_kv_heads = key_cache.shape[2]
    q_dec = q[:num_decodes].view(num_decodes, num_kv_heads, num_heads // num_kv_heads, head_dim)
    k_ctx = _gather_blocks(key_cache, meta.decode_block_ids, q.dtype)  # [D, Hkv, L, d]
    v_ctx = _gather_blocks(value_cache, meta.decode_block_ids, q.dtype)
    o = F.scaled_dot_product_attention(q_dec, k_ctx, v_ctx, attn_mask=mask, scale=scale)
    out[:num_decodes] = o.reshape(num_decodes, num_heads, head_dim)
