"""The native paged decode-attention kernel against the portable gather + SDPA path."""

from __future__ import annotations

import pytest
import torch

from rillet.models import cpu_kernels
from rillet.models.attention import AttentionMetadata, _decode_with_sdpa, allocate_kv_caches


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (8, 2, 64), (14, 2, 64), (8, 4, 128), (6, 2, 128), (4, 4, 32), (8, 2, 24)],
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
