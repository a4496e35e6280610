"""BlockManager: ref counts, LRU free list, chained prefix hashes (pure Python, no torch)."""

from __future__ import annotations

import pytest

from rillet.engine.block_manager import BlockManager, hash_block
from rillet.engine.request import Request
from rillet.sampling import SamplingParams


def make_request(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams(), arrival_time=0.0, max_new_tokens=8)


def compute(bm: BlockManager, request: Request, num_tokens: int | None = None) -> None:
    """Allocate for and 'run' the request's remaining tokens (what one scheduler step does)."""
    computed, num_hit = bm.get_computed_blocks(request) if not request.block_ids else ([], 0)
    num_new = (num_tokens or request.num_tokens) - request.num_computed_tokens - num_hit
    bm.allocate(request, num_new, computed)
    request.num_computed_tokens += num_hit + num_new
    bm.cache_full_blocks(request)


def check_consistent(bm: BlockManager, live: list[Request]) -> None:
    holders = [0] * bm.num_blocks
    for request in live:
        assert len(set(request.block_ids)) == len(request.block_ids)
        for block_id in request.block_ids:
            holders[block_id] += 1
    free = set(bm.free_block_ids())
    assert len(free) == bm.num_free_blocks
    for block in bm.blocks:
        assert block.ref_count == holders[block.block_id]
        assert (block.block_id in free) == (block.ref_count == 0)
    hashes = [b.block_hash for b in bm.blocks if b.block_hash is not None]
    assert len(hashes) == len(set(hashes)) == bm.num_cached_blocks
    assert bm.num_used_blocks + bm.num_free_blocks == bm.num_blocks


def test_allocate_covers_tokens_and_free_returns_blocks() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    r = make_request("a", list(range(10)))
    assert bm.can_allocate(r, 10, [])
    bm.allocate(r, 10, [])
    assert len(r.block_ids) == 3  # ceil(10 / 4)
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 7
    assert bm.usage == pytest.approx(0.3)
    assert all(bm.blocks[b].ref_count == 1 for b in r.block_ids)
    check_consistent(bm, [r])
    bm.free(r)
    assert r.block_ids == []
    assert bm.num_used_blocks == 0 and bm.usage == 0.0
    check_consistent(bm, [])


def test_decode_growth_adds_a_block_only_at_the_boundary() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    r = make_request("a", [1, 2, 3])
    compute(bm, r)
    assert len(r.block_ids) == 1
    r.append_token(4)
    bm.allocate(r, 1, [])  # position 3 still fits in block 0
    r.num_computed_tokens += 1
    assert len(r.block_ids) == 1
    r.append_token(5)
    bm.allocate(r, 1, [])  # position 4 starts block 1
    assert len(r.block_ids) == 2


def test_allocate_without_room_raises_and_can_allocate_says_no() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    r = make_request("a", list(range(9)))
    assert not bm.can_allocate(r, 9, [])
    with pytest.raises(RuntimeError):
        bm.allocate(r, 9, [])
    assert bm.num_free_blocks == 2 and r.block_ids == []


def test_free_releases_tail_first_in_lru_order() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    r = make_request("a", list(range(12)))
    compute(bm, r)
    table = list(r.block_ids)
    bm.free(r)
    # Untouched blocks first, then the freed sequence tail-first: the prefix is evicted last.
    assert bm.free_block_ids() == [3, 4, 5, *reversed(table)]


def test_shared_prefix_hits_three_blocks_and_shares_refs() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    prefix = list(range(100, 112))  # 3 full blocks
    a = make_request("a", [*prefix, 1, 2, 3])
    compute(bm, a)
    b = make_request("b", [*prefix, 7, 8])
    computed, num_hit = bm.get_computed_blocks(b)
    assert computed == a.block_ids[:3] and num_hit == 12
    bm.allocate(b, b.num_tokens - num_hit, computed)
    b.num_computed_tokens = num_hit
    assert b.block_ids[:3] == a.block_ids[:3] and b.block_ids[3] != a.block_ids[3]
    assert [bm.blocks[i].ref_count for i in b.block_ids[:3]] == [2, 2, 2]
    assert bm.num_prefix_hit_tokens == 12
    assert bm.num_prefix_queried_tokens == a.num_tokens + b.num_tokens
    check_consistent(bm, [a, b])
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_ids[:3]] == [1, 1, 1]
    check_consistent(bm, [b])


def test_hit_never_covers_the_last_token() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(12))
    compute(bm, make_request("a", prompt))
    _, num_hit = bm.get_computed_blocks(make_request("b", prompt))
    assert num_hit == 8  # (12 - 1) // 4 blocks: the last block is recomputed for logits
    _, num_hit = bm.get_computed_blocks(make_request("c", [*prompt, 99]))
    assert num_hit == 12


def test_partial_blocks_are_never_cached() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(7)))
    compute(bm, a)
    assert bm.num_cached_blocks == 1
    _, num_hit = bm.get_computed_blocks(make_request("b", [*range(7), 50, 51]))
    assert num_hit == 4


def test_hash_chain_same_block_after_different_prefix_misses() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_request("a", [1, 2, 3, 4, 9, 9, 9, 9, 0])
    compute(bm, a)
    same = make_request("same", [1, 2, 3, 4, 9, 9, 9, 9, 5])
    other = make_request("other", [5, 6, 7, 8, 9, 9, 9, 9, 5])
    assert bm.get_computed_blocks(same)[1] == 8
    assert bm.get_computed_blocks(other) == ([], 0)
    assert same.block_hashes[1] != other.block_hashes[1]
    assert hash_block(b"", [9, 9, 9, 9]) != same.block_hashes[1]


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_request("a", [*range(8), 100])
    compute(bm, a, 8)  # blocks 0, 1 full and cached
    bm.free(a)
    b = make_request("b", [*range(20, 28), 100])
    compute(bm, b, 8)  # takes the never-used blocks 2, 3
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 4
    assert bm.get_computed_blocks(make_request("a2", [*range(8), 7]))[1] == 8

    c = make_request("c", [*range(40, 44), 1])
    compute(bm, c, 4)  # evicts the least recently freed block: a's tail
    assert bm.get_computed_blocks(make_request("a3", [*range(8), 7]))[1] == 4
    d = make_request("d", [*range(60, 64), 1])
    compute(bm, d, 4)  # then a's head
    assert bm.get_computed_blocks(make_request("a4", [*range(8), 7]))[1] == 0
    assert bm.get_computed_blocks(make_request("b2", [*range(20, 28), 7]))[1] == 8
    check_consistent(bm, [c, d])


def test_hit_on_free_block_takes_it_out_of_the_free_list() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_request("a", [*range(12), 5])
    compute(bm, a, 12)
    bm.free(a)
    b = make_request("b", [*range(8), 70, 71, 72, 73, 74, 75, 76])
    computed, num_hit = bm.get_computed_blocks(b)
    assert num_hit == 8
    # 2 hit blocks come out of the free list and 2 new ones are needed: 4 of 4 free.
    assert bm.can_allocate(b, 7, computed)
    assert not bm.can_allocate(b, 9, computed)
    bm.allocate(b, 7, computed)
    b.num_computed_tokens = 15
    assert bm.num_free_blocks == 0
    assert b.block_ids[:2] == computed
    check_consistent(bm, [b])


def test_concurrent_identical_blocks_register_once() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request("a", [*range(8), 1])
    b = make_request("b", [*range(8), 1])
    for r in (a, b):
        bm.allocate(r, 9, [])
    for r in (a, b):
        r.num_computed_tokens = 9
        bm.cache_full_blocks(r)
    assert bm.num_cached_blocks == 2
    assert all(bm.blocks[i].block_hash is None for i in b.block_ids)
    check_consistent(bm, [a, b])
    bm.free(a)
    bm.free(b)
    check_consistent(bm, [])


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_request("a", [*range(8), 1])
    compute(bm, a)
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(make_request("b", [*range(8), 1])) == ([], 0)
    assert bm.num_prefix_queried_tokens == 0


def test_prefix_hits_cannot_extend_a_nonempty_table() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request("a", [*range(8), 1])
    compute(bm, a)
    b = make_request("b", [*range(8), 1])
    bm.allocate(b, 1, [])
    with pytest.raises(RuntimeError):
        bm.allocate(b, 1, a.block_ids[:1])
