"""Paged KV-cache bookkeeping: fixed-size blocks, ref counts and a prefix cache.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots. A request's block
table (``Request.block_ids``) maps its token positions onto blocks. This module only
counts and hands out block ids; the model runner owns the tensors.

Prefix caching: once a block is full and computed, it is registered under a hash that
chains the previous block's hash with the block's token ids, so a hash names a whole
prefix, not just sixteen tokens. A later request whose prompt starts with the same tokens
takes a reference on the same blocks instead of recomputing them. Freed blocks keep their
hash while they sit in the free list (least recently used first), so a prefix stays
reusable until memory pressure actually recycles its block.

Hash choice: ``blake2b`` with a 16-byte digest over ``prev_hash + token ids as int64``.
Python's built-in ``hash`` of an int tuple is 64-bit and deterministic, so a client could
craft colliding prompts and read another request's KV; a 128-bit cryptographic digest makes
that impractical and costs a few microseconds per 16-token block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from rillet.engine.request import Request

_ROOT_HASH = b""


def hash_block(prev_hash: bytes, token_ids: list[int]) -> bytes:
    """The chained hash of one full block: it depends on every token before it too."""
    return hashlib.blake2b(prev_hash + array("q", token_ids).tobytes(), digest_size=16).digest()


@dataclass(slots=True, eq=False)
class Block:
    """One KV block. ``block_hash`` is set only while the prefix cache maps the hash to it."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockManager:
    """Hands out KV blocks to requests, shares full blocks across requests by prefix hash.

    Invariant: a block is in the free list exactly when its ref count is 0. Free blocks may
    still be cached (hashed); allocating a new block evicts the least recently freed one.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Ordered oldest-freed first: popitem(last=False) evicts the least recently used.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        #: Prompt tokens looked up in the prefix cache at admission, and how many hit.
        self.num_prefix_queried_tokens = 0
        self.num_prefix_hit_tokens = 0

    # -- gauges ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with a ref count above zero."""
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, for the KV-cache usage gauge."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently registered in the prefix cache (in use or free)."""
        return len(self._cached)

    def free_block_ids(self) -> list[int]:
        """Free block ids, next to be evicted first."""
        return list(self._free)

    # -- prefix cache ----------------------------------------------------------------------

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The request's first ``num_blocks`` chained hashes, computing any not yet known."""
        hashes = request.block_hashes
        size = self.block_size
        tokens = request.all_token_ids
        while len(hashes) < num_blocks:
            i = len(hashes)
            prev = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(hash_block(prev, tokens[i * size : (i + 1) * size]))
        return hashes[:num_blocks]

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request: (block ids, number of tokens they cover).

        Never covers the last token: the model must run on at least one token to produce
        the logits for the next one.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for block_hash in self._block_hashes(request, max_blocks):
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly completed full blocks (up to ``num_computed_tokens``)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if num_full <= request.num_registered_blocks:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(request.num_registered_blocks, num_full):
            block = self.blocks[request.block_ids[i]]
            # Two requests may compute the same content at once; the first registered wins
            # and the duplicate stays an anonymous block, freed like any other.
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash = hashes[i]
                self._cached[hashes[i]] = block.block_id
        request.num_registered_blocks = num_full

    # -- allocation ------------------------------------------------------------------------

    def _num_new_blocks(
        self, request: Request, num_new_tokens: int, computed_block_ids: list[int]
    ) -> int:
        num_computed = request.num_computed_tokens + len(computed_block_ids) * self.block_size
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size)
        return max(0, num_needed - len(request.block_ids) - len(computed_block_ids))

    def num_blocks_to_allocate(
        self, request: Request, num_new_tokens: int, computed_block_ids: list[int]
    ) -> int:
        """Free blocks :meth:`allocate` would take with the same arguments (new blocks, and
        cached hits that sit in the free list)."""
        num_touched_free = sum(1 for b in computed_block_ids if self.blocks[b].ref_count == 0)
        return self._num_new_blocks(request, num_new_tokens, computed_block_ids) + num_touched_free

    def num_blocks_to_cover(self, request: Request, num_tokens: int) -> int:
        """Blocks a request holding its block table still needs for ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(request.block_ids))

    def can_allocate(
        self, request: Request, num_new_tokens: int, computed_block_ids: list[int]
    ) -> bool:
        """Whether :meth:`allocate` would succeed with the same arguments.

        Cached hits that sit in the free list count against the free blocks: touching them
        takes them out of it.
        """
        return self.num_blocks_to_allocate(request, num_new_tokens, computed_block_ids) <= len(
            self._free
        )

    def allocate(
        self, request: Request, num_new_tokens: int, computed_block_ids: list[int]
    ) -> None:
        """Grow the block table to cover ``num_computed_tokens + num_new_tokens`` tokens.

        ``computed_block_ids`` are prefix-cache hits from :meth:`get_computed_blocks` for a
        request with an empty block table; their tokens are *not* yet counted in
        ``request.num_computed_tokens`` (the scheduler adds them after this call).
        Raises RuntimeError when blocks run out: callers check :meth:`can_allocate` first.
        """
        if computed_block_ids and request.block_ids:
            raise RuntimeError("prefix-cache hits can only start an empty block table")
        if not self.can_allocate(request, num_new_tokens, computed_block_ids):
            raise RuntimeError(f"out of KV blocks for request {request.request_id!r}")
        num_new = self._num_new_blocks(request, num_new_tokens, computed_block_ids)
        if not request.block_ids and request.num_computed_tokens == 0:
            if self.enable_prefix_caching:
                self.num_prefix_queried_tokens += request.num_tokens
                self.num_prefix_hit_tokens += len(computed_block_ids) * self.block_size
            request.num_registered_blocks = len(computed_block_ids)
        for block_id in computed_block_ids:
            self._take(self.blocks[block_id])
            request.block_ids.append(block_id)
        for _ in range(num_new):
            block_id, _unused = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            request.block_ids.append(block_id)

    def _take(self, block: Block) -> None:
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def trim(self, request: Request, num_tokens: int) -> None:
        """Give back the table's blocks past the first ``num_tokens`` tokens' (the slots of
        rejected draft tokens). They were taken this step and hold nothing committed, so
        none is shared or in the prefix cache."""
        keep = -(-num_tokens // self.block_size)
        while len(request.block_ids) > keep:
            block = self.blocks[request.block_ids.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                # Nothing cached in it: first in line for reuse, before cached prefixes.
                self._free[block.block_id] = None
                self._free.move_to_end(block.block_id, last=False)
        request.num_registered_blocks = min(request.num_registered_blocks, keep)

    def free(self, request: Request) -> None:
        """Drop the request's references and clear its block table.

        Blocks are released tail first, so the end of a sequence (the part least likely to
        be shared) is evicted before its prefix.
        """
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        request.block_ids = []
        request.num_registered_blocks = 0
