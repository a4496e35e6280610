"""The native paged attention kernels (decode and prefill) against SDPA, and their invariances."""

from __future__ import annotations

import pytest
import torch

from rillet.models import cpu_kernels
from rillet.models.attention import (
    AttentionMetadata,
    _decode_with_sdpa,
    allocate_kv_caches,
    dequantize_kv_rows,
    kv_head_dim,
    kv_row_width,
    quantize_kv_rows,
)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [
        (9, 3, 64),
        (8, 2, 64),
        (14, 2, 64),
        (8, 4, 128),
        (6, 2, 128),
        (4, 1, 256),
        (4, 4, 32),
        (8, 2, 24),
    ],
)
def test_kernel_matches_sdpa(native, dtype, tol, heads, kv_heads, head_dim) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    num_seqs, block_size, num_blocks = 7, 16, 64
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 2, 15, 16, 17, 100, 130])
    width_blocks = int(lens.max() + block_size - 1) // block_size
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * width_blocks].view(num_seqs, -1)
    q = torch.randn(num_seqs, heads, head_dim, generator=gen).to(dtype)
    width = width_blocks * block_size
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        positions=torch.zeros(0, dtype=torch.long),
        num_decode_tokens=num_seqs,
        decode_block_ids=tables,
        decode_mask=(torch.arange(width)[None] < lens[:, None]).view(num_seqs, 1, 1, width),
    )
    expected = torch.empty_like(q)
    _decode_with_sdpa(q, key_cache, value_cache, meta, head_dim**-0.5, expected)
    got = cpu_kernels.paged_decode_attention(
        native, q, key_cache, value_cache, tables, lens, head_dim**-0.5
    )
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 1, 256), (8, 2, 24)])
def test_decode_kernel_honours_a_sliding_window(
    native, dtype, tol, heads, kv_heads, head_dim
) -> None:  # type: ignore[no-untyped-def]
    """Contexts shorter than, equal to and longer than the window of 17 (from mid-block)."""
    gen = torch.Generator().manual_seed(11)
    key_cache = torch.randn(64, 16, kv_heads, head_dim, generator=gen).to(dtype)
    value_cache = torch.randn(64, 16, kv_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 17, 18, 40, 130])
    tables = torch.randperm(64, generator=gen)[: 5 * 9].view(5, 9)
    q = torch.randn(5, heads, head_dim, generator=gen).to(dtype)
    width = 9 * 16
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        positions=torch.zeros(0, dtype=torch.long),
        num_decode_tokens=5,
        decode_block_ids=tables,
        decode_mask=(torch.arange(width)[None] < lens[:, None]).view(5, 1, 1, width),
        decode_context_lens=lens,
    )
    expected = torch.empty_like(q)
    _decode_with_sdpa(q, key_cache, value_cache, meta, 0.1, expected, window=17)
    got = cpu_kernels.paged_decode_attention(
        native, q, key_cache, value_cache, tables, lens, 0.1, window=17
    )
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
    unwindowed = torch.empty_like(q)
    _decode_with_sdpa(q, key_cache, value_cache, meta, 0.1, unwindowed)
    # the window did cut something
    assert not torch.allclose(got[3:].float(), unwindowed[3:].float(), rtol=tol, atol=tol)


def test_kernel_result_does_not_depend_on_the_batch(native) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    key_cache = torch.randn(32, 16, 3, 64, generator=gen).to(torch.bfloat16)
    value_cache = torch.randn(32, 16, 3, 64, generator=gen).to(torch.bfloat16)
    tables = torch.arange(32).view(4, 8)
    lens = torch.tensor([128, 40, 77, 3])
    q = torch.randn(4, 9, 64, generator=gen).to(torch.bfloat16)
    batched = cpu_kernels.paged_decode_attention(
        native, q, key_cache, value_cache, tables, lens, 0.125
    )
    for i in range(4):
        alone = cpu_kernels.paged_decode_attention(
            native, q[i : i + 1], key_cache, value_cache, tables[i : i + 1], lens[i : i + 1], 0.125
        )
        assert torch.equal(alone, batched[i : i + 1])


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 24), (6, 2, 128)])
@pytest.mark.parametrize("window", [None, 20])
def test_rows_of_one_sequence_match_each_row_decoded_alone(  # type: ignore[no-untyped-def]
    native, cache_dtype, heads, kv_heads, head_dim, window
) -> None:
    """Speculative verification's layout: a sequence's positions p .. p + k as rows sharing
    one block table (``seq_starts``), each with its own length, read in one task. Each row
    equals that row decoded alone: bitwise without a window; with one, the softmax may start
    at another offset, so to rounding."""
    gen = torch.Generator().manual_seed(5)
    width = kv_row_width(head_dim, cache_dtype)
    shape = (32, 16, kv_heads, head_dim)
    if cache_dtype == torch.int8:
        key_cache = quantize_kv_rows(torch.randn(shape, generator=gen)).view(*shape[:3], width)
        value_cache = quantize_kv_rows(torch.randn(shape, generator=gen)).view(*shape[:3], width)
    else:
        key_cache = torch.randn(shape, generator=gen).to(cache_dtype)
        value_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    tables = torch.randperm(32, generator=gen).view(4, 8)
    # Sequences of 1, 5, 1 and 3 rows; the middle ones cross a block boundary.
    rows = [
        (0, 40),
        (1, 60),
        (1, 61),
        (1, 62),
        (1, 63),
        (1, 64),
        (2, 3),
        (3, 126),
        (3, 127),
        (3, 128),
    ]
    lens = torch.tensor([n for _, n in rows])
    row_tables = tables[[s for s, _ in rows]]
    starts = torch.tensor([0, 1, 6, 7, 10])
    q = torch.randn(len(rows), heads, head_dim, generator=gen).to(torch.bfloat16)
    together = cpu_kernels.paged_decode_attention(
        native, q, key_cache, value_cache, row_tables, lens, 0.125, window, starts
    )
    for i in range(len(rows)):
        alone = cpu_kernels.paged_decode_attention(
            native,
            q[i : i + 1],
            key_cache,
            value_cache,
            row_tables[i : i + 1],
            lens[i : i + 1],
            0.125,
            window,
        )
        if window is None:
            assert torch.equal(alone, together[i : i + 1]), i
        else:
            torch.testing.assert_close(
                alone.float(), together[i : i + 1].float(), atol=1e-2, rtol=1e-2
            )


def resident_bytes() -> int:
    """This process's resident set (Linux ``/proc/self/statm``, in pages)."""
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_cpu_kv_cache_is_zero_and_takes_ram_only_where_written() -> None:
    before = resident_bytes()
    caches = allocate_kv_caches(2, 4096, 16, 8, 128, torch.bfloat16, "cpu")  # 2 x 2 x 128 MiB
    assert resident_bytes() - before < 64 << 20
    key, value = caches[0]
    assert key.shape == (4096, 16, 8, 128) and key.dtype == torch.bfloat16
    key[7].fill_(1.5)  # written: that block's pages, and only those, become resident
    assert resident_bytes() - before < 64 << 20
    assert key[7].eq(1.5).all() and not key[8].any() and not value[7].any()
    assert key.count_nonzero() == key[7].numel() and not value.any()  # zero elsewhere


def _prefill_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    table: torch.Tensor,
    start: int,
    scale: float,
    window: int | None = None,
    precision: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Causal attention in ``precision`` of q [L, H, d] at positions start.. over the gathered
    context (a query at p sees keys p - window + 1 .. p under a sliding window)."""
    length, _, _ = q.shape
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    positions = torch.arange(start + length)
    slots = table[positions // block_size] * block_size + positions % block_size
    k = key_cache.view(-1, num_kv_heads, head_dim)[slots].transpose(0, 1).to(precision)
    v = value_cache.view(-1, num_kv_heads, head_dim)[slots].transpose(0, 1).to(precision)
    queries = torch.arange(start, start + length)[:, None]
    mask = positions[None] <= queries
    if window is not None:
        mask &= positions[None] > queries - window
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).to(precision), k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)


def _random_caches(
    gen: torch.Generator, num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, 16, kv_heads, head_dim)
    return (
        torch.randn(shape, generator=gen).to(dtype),
        torch.randn(shape, generator=gen).to(dtype),
    )


def _8bit_caches(
    gen: torch.Generator, num_blocks: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, 16, kv_heads, head_dim)
    return (
        quantize_kv_rows(torch.randn(shape, generator=gen)),
        quantize_kv_rows(torch.randn(shape, generator=gen)),
    )


# (start position, new tokens) of the chunks run together: a cold prompt, chunks after a
# cached prefix (mid-block and block-aligned), a one-token chunk, a long one.
CHUNKS = [(0, 45), (37, 20), (64, 1), (16, 16), (0, 1), (90, 150)]


@pytest.mark.parametrize("window", [None, 20], ids=["causal", "window20"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    # Head sizes 64/128/256 take the vectorised paths, 24 and 32 the portable one.
    [
        (9, 3, 64),
        (8, 2, 64),
        (8, 8, 64),
        (14, 2, 64),
        (8, 2, 128),
        (4, 1, 256),
        (6, 2, 24),
        (4, 4, 32),
    ],
)
@pytest.mark.parametrize("eight_bit", [False, True], ids=["cache-as-q", "cache-8bit"])
def test_prefill_kernel_matches_sdpa(
    native, eight_bit, window, dtype, tol, heads, kv_heads, head_dim
) -> None:  # type: ignore[no-untyped-def]
    """The 8-bit cache's rows against SDPA over the same rows widened in torch."""
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim)
    if eight_bit:
        key_cache, value_cache = _8bit_caches(gen, 160, kv_heads, head_dim)
        wide_k, wide_v = (dequantize_kv_rows(c, dtype) for c in (key_cache, value_cache))
    else:
        key_cache, value_cache = _random_caches(gen, 160, kv_heads, head_dim, dtype)
        wide_k, wide_v = key_cache, value_cache
    max_blocks = 16
    tables = torch.randperm(160, generator=gen)[: len(CHUNKS) * max_blocks].view(len(CHUNKS), -1)
    lens = [n for _, n in CHUNKS]
    q = torch.randn(sum(lens), heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0, *torch.tensor(lens).cumsum(0)[:-1].tolist()])
    scale = head_dim**-0.5
    got = cpu_kernels.paged_prefill_attention(
        native,
        q,
        key_cache,
        value_cache,
        tables,
        starts,
        torch.tensor(lens),
        torch.tensor([p for p, _ in CHUNKS]),
        scale,
        window,
    )
    for c, (position, length) in enumerate(CHUNKS):
        rows = slice(int(starts[c]), int(starts[c]) + length)
        expected = _prefill_reference(q[rows], wide_k, wide_v, tables[c], position, scale, window)
        torch.testing.assert_close(got[rows].float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (4, 1, 256)])
def test_prefill_kernel_follows_scores_that_keep_rising(
    native,  # type: ignore[no-untyped-def]
    dtype: torch.dtype,
    tol: float,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> None:
    """Scores that climb by ~0.2 a key for 300 keys, then one spike and a fall: a row's
    softmax shift must follow them up (the kernel rescales a row only when a score passes
    its shift by a margin, so random scores of unit size hardly ever take that path)."""
    gen = torch.Generator().manual_seed(3)
    length = 300
    direction = torch.randn(head_dim, generator=gen)
    direction /= direction.norm()
    ramp = torch.arange(length, dtype=torch.float32) * 0.2 * head_dim**0.5
    ramp[200] += 30 * head_dim**0.5  # one key far above the rest
    ramp[250:] = -ramp[250:]  # and then keys far below
    keys = ramp[:, None, None] * direction + 0.1 * torch.randn(
        length, kv_heads, head_dim, generator=gen
    )
    blocks = (length + 15) // 16
    key_cache = torch.zeros(blocks * 16, kv_heads, head_dim)
    key_cache[:length] = keys
    value_cache = torch.randn(blocks * 16, kv_heads, head_dim, generator=gen)
    key_cache, value_cache = (
        c.view(blocks, 16, kv_heads, head_dim).to(dtype) for c in (key_cache, value_cache)
    )
    table = torch.arange(blocks)
    q = (direction + 0.1 * torch.randn(length, heads, head_dim, generator=gen)).to(dtype)
    scale = head_dim**-0.5
    got = cpu_kernels.paged_prefill_attention(
        native,
        q,
        key_cache,
        value_cache,
        table[None],
        torch.tensor([0]),
        torch.tensor([length]),
        torch.tensor([0]),
        scale,
    )
    # In float64: fp32 SDPA's own error on these scores is ~1e-5, above the kernel's.
    expected = _prefill_reference(q, key_cache, value_cache, table, 0, scale, None, torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (6, 2, 24)])
def test_a_prefill_row_does_not_depend_on_chunking_batch_or_threads(
    native,  # type: ignore[no-untyped-def]
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> None:
    """Bitwise: a 200-token prompt whole, in chunks after a 'cached' prefix (split points that
    are and are not multiples of the block, the kernel's 32-key step, its 64-position task
    and its row group), beside another chunk, and on one thread. This is what keeps a cold
    prompt and its prefix-cache hit on the same greedy answer."""
    gen = torch.Generator().manual_seed(7)
    key_cache, value_cache = _random_caches(gen, 40, kv_heads, head_dim, dtype)
    table = torch.randperm(40, generator=gen)[:13]
    q = torch.randn(200, heads, head_dim, generator=gen).to(dtype)

    def attend(first: int, end: int, *, beside: bool = False) -> torch.Tensor:
        rows = q[first:end]
        tables, starts, lens, positions = table[None], [0], [end - first], [first]
        if beside:  # another sequence's chunk first in the batch
            rows = torch.cat([q[:7], rows])
            tables = torch.stack([table.flip(0), table])
            starts, lens, positions = [0, 7], [7, end - first], [30, first]
        out = cpu_kernels.paged_prefill_attention(
            native,
            rows,
            key_cache,
            value_cache,
            tables,
            torch.tensor(starts),
            torch.tensor(lens),
            torch.tensor(positions),
            0.125,
        )
        return out[-(end - first) :]

    whole = attend(0, 200)
    for split in (1, 5, 16, 32, 33, 64, 100, 128, 199):
        assert torch.equal(torch.cat([attend(0, split), attend(split, 200)]), whole), split
    assert torch.equal(torch.cat([attend(0, 50, beside=True), attend(50, 200)]), whole)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(attend(0, 200), whole)
    finally:
        torch.set_num_threads(threads)


# ---- the 8-bit cache ---------------------------------------------------------------------


@pytest.mark.parametrize(("head_dim", "width"), [(64, 72), (256, 288), (24, 28), (33, 41)])
def test_8bit_rows_keep_each_value_within_half_a_step_of_its_group(
    head_dim: int, width: int
) -> None:
    x = torch.randn(5, 3, head_dim, generator=torch.Generator().manual_seed(1)) * 4
    x[..., :8] *= 50  # an outlier channel: only its own group's scale grows
    x[1, 2] = 0  # an all-zero row: scales 0, codes 0
    rows = quantize_kv_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (5, 3, width)
    assert kv_row_width(head_dim, torch.int8) == width and kv_head_dim(rows) == head_dim
    scales = rows[..., head_dim:].contiguous().view(torch.float32)  # [5, 3, groups]
    groups = x.split(32, dim=-1)
    assert scales.shape[-1] == len(groups)
    for g, group in enumerate(groups):
        torch.testing.assert_close(scales[..., g], group.abs().amax(-1) / 127)
        # each group's largest magnitude takes code +-127
        codes = rows[..., g * 32 : g * 32 + group.shape[-1]]
        live = scales[..., g] > 0
        assert codes.abs().amax(-1)[live].eq(127).all()
    assert rows[1, 2].eq(0).all()
    step = scales.repeat_interleave(32, dim=-1)[..., :head_dim]
    error = (dequantize_kv_rows(rows, torch.float32) - x).abs()
    assert (error <= step / 2 * 1.0001 + 1e-7).all()


@pytest.mark.parametrize("window", [None, 17], ids=["causal", "window17"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 4, 128), (4, 1, 256), (8, 2, 24)]
)
def test_decode_kernel_on_an_8bit_cache_matches_sdpa(
    native, window, dtype, tol, heads, kv_heads, head_dim
) -> None:  # type: ignore[no-untyped-def]
    """The kernel scales each row's dot products; the SDPA path widens the rows first."""
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    key_cache, value_cache = _8bit_caches(gen, 64, kv_heads, head_dim)
    lens = torch.tensor([1, 2, 15, 16, 17, 100, 130])
    tables = torch.randperm(64, generator=gen)[: 7 * 9].view(7, 9)
    q = torch.randn(7, heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        positions=torch.zeros(0, dtype=torch.long),
        num_decode_tokens=7,
        decode_block_ids=tables,
        decode_mask=(torch.arange(9 * 16)[None] < lens[:, None]).view(7, 1, 1, 9 * 16),
        decode_context_lens=lens,
    )
    expected = torch.empty_like(q)
    _decode_with_sdpa(q, key_cache, value_cache, meta, head_dim**-0.5, expected, window)
    got = cpu_kernels.paged_decode_attention(
        native, q, key_cache, value_cache, tables, lens, head_dim**-0.5, window
    )
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
