"""Block ids of the cache groups: refcounts, a prefix-hash index and an LRU of cached free blocks.

Every group (see `pools.py`) has its own `BlockPool`. A full block of a sequence is named by
a hash chain over token ids whose root fingerprints the model, layout and dtypes, so the
same prefix gets the same names in every process (the disk tier relies on that). A freed
block keeps its name and stays reusable until a new allocation evicts it, oldest first;
a freed block that never filled (no name) is reused before any named one.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Sequence


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """sha256(parent hash || token ids as little-endian int64): deterministic across processes."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


def hash_chain(root: bytes, tokens: Sequence[int], block: int) -> list[bytes]:
    """Hashes of every full block of `tokens`."""
    out, h = [], root
    for i in range(len(tokens) // block):
        h = block_hash(h, tokens[i * block:(i + 1) * block])
        out.append(h)
    return out


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # oldest first

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        b, _ = self.free.popitem(last=False)
        self.unname(b)
        self.refs[b] = 1
        return b

    def lookup(self, h: bytes, token_ids: Sequence[int], start: int) -> int | None:
        """A cached block with this hash whose token ids really are token_ids[start:start +
        block] (a collision guard). A miss costs one dict lookup: a long reload misses on
        thousands of blocks, so the ids are only sliced on a hit."""
        b = self.by_hash.get(h)
        if b is None:
            return None
        want = self.tokens_of[b]
        return b if tuple(token_ids[start:start + len(want)]) == want else None

    def take(self, b: int) -> None:
        """One more user of a cached block (reviving it from the free list if unused)."""
        if self.refs[b] == 0:
            del self.free[b]
        self.refs[b] += 1

    def release(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] == 0:
            self.free[b] = None
            if self.hash_of[b] is None:
                self.free.move_to_end(b, last=False)     # nothing to keep: reuse first

    def name(self, b: int, h: bytes, tokens: Sequence[int]) -> None:
        """Register a block that just became full under its prefix hash."""
        if self.hash_of[b] is not None:
            return
        self.hash_of[b], self.tokens_of[b] = h, tuple(tokens)
        self.by_hash.setdefault(h, b)

    def unname(self, b: int) -> None:
        """Take block b out of the prefix index (its entries are about to be written again)."""
        h = self.hash_of[b]
        if h is not None and self.by_hash.get(h) == b:
            del self.by_hash[h]
        self.hash_of[b] = self.tokens_of[b] = None

    def forget(self) -> None:
        """Drop every block's name (the weights changed, so no cached block is valid)."""
        self.by_hash.clear()
        self.hash_of = [None] * self.num_blocks
        self.tokens_of = [None] * self.num_blocks
