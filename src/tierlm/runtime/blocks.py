"""Block ids of the cache groups: refcounts, a prefix-hash index and an LRU of cached free blocks.

Every group (see `pools.py`) has its own `BlockPool`. A full block of a sequence is named by
a hash chain over token ids whose root fingerprints the model, layout and dtypes, so the
same prefix gets the same names in every process (the disk tier relies on that). A freed
block keeps its name and stays reusable until a new allocation evicts it, oldest first;
a freed block that never filled (no name) is reused before any named one.

Among those, where a block goes is chosen so that a sequence's blocks stay consecutive: CPU
attention then reads a sequence's entries where they lie (`model.ops.gather`, `gather_rows`)
instead of copying them. A sequence grows into the block after its last; a new one starts on
a multiple of one sequence's room (the blocks of max_model_len) after the blocks in use before
it, so that each keeps room to grow.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Sequence

import numpy as np


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
    def __init__(self, num_blocks: int, extent: int = 1):
        """extent: blocks one sequence of max_model_len holds (where new sequences are placed)."""
        self.num_blocks, self.extent = num_blocks, max(1, extent)
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # oldest first
        self.loose = bytearray(b"\1" * num_blocks)      # 1: free and holding nothing cached

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, after: int = -1) -> int:
        """A free block for a sequence whose previous block is `after` (-1: none): the next
        one when it is free and holds nothing cached, else the start of a new stretch
        (`_stretch`), else the least recently used cached block."""
        b = after + 1
        if not (0 < b < self.num_blocks and self.loose[b]):
            b = self._stretch()
        if b is None:
            b, _ = self.free.popitem(last=False)
        else:
            del self.free[b]
        self.unname(b)
        self.loose[b] = 0
        self.refs[b] = 1
        return b

    def _stretch(self) -> int | None:
        """Where a new run of blocks starts, in a stretch of free blocks holding nothing
        cached: at the stretch's start when no block in use precedes it, else at the next
        multiple of `extent` (the blocks one sequence of max_model_len takes), so that the
        sequence before it keeps room to grow (the one with the most room after that start);
        failing that, halfway into the longest stretch. None when there is no such block."""
        free = np.frombuffer(self.loose, dtype=np.uint8)
        edges = np.diff(free, prepend=0, append=0)                    # int64: +1 where a stretch starts, -1 past its end
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if not len(starts):
            return None
        after_use = np.array([s > 0 and self.refs[s - 1] > 0 for s in starts.tolist()])
        at = np.where(after_use, -(-starts // self.extent) * self.extent, starts)
        room = np.where(at < ends, ends - at, 0)
        k = int(np.argmax(room))
        if room[k] > 0:
            return int(at[k])
        k = int(np.argmax(ends - starts))
        return int(starts[k] + (ends[k] - starts[k]) // 2)

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
                self.loose[b] = 1

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
        for b in self.free:
            self.loose[b] = 1
