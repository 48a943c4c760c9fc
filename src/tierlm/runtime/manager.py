"""Which blocks each sequence holds in each cache group: allocation, window freeing, prefix hits.

Group 0 keeps every block of a sequence; a group W > 0 needs, for a step over positions
[start, end), only the blocks from the one holding `start - W` on (older keys are never read
again), and frees the rest after the step. A prefix hit of n blocks needs group 0's blocks
0..n-1 and each window group's blocks covering the W positions before n * block, all still
cached under their hash names; the hit then resumes exactly, since every cached state
(window entries, compressor buffers, compressed entries) is indexed by position.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from ..spec.cache import first_held_block
from .blocks import BlockPool, block_hash, hash_chain
from .pools import CachePools
from .sequence import Sequence


class CacheManager:
    def __init__(self, pools: CachePools, root: bytes, prefix_caching: bool = True, keep_last_block: bool = False):
        """keep_last_block: a hit gives back its last matched block (MTP draft layers: the draft's
        entry at a block's last position depends on the next block's first token)."""
        self.pools, self.root, self.prefix_caching = pools, root, prefix_caching
        self.drop = int(keep_last_block)
        self.block = pools.block
        self.groups = pools.groups
        self.bp = {g: BlockPool(pools.blocks[g]) for g in self.groups}
        self.hit_tokens = 0

    # ------------------------------------------------------------------ sizing
    def span(self, g: int, start: int, end: int) -> range:
        """Logical blocks group g must hold for a step over positions [start, end)."""
        return range(first_held_block(g, start, self.block), -(-end // self.block))

    def fits_ever(self, total_tokens: int, chunk: int) -> str | None:
        """Why one sequence of total_tokens, prefilled in chunks of `chunk`, can never fit (None: it can)."""
        for g in self.groups:
            need = max(len(self.span(g, s, min(s + chunk, total_tokens))) for s in range(0, total_tokens, chunk))
            if need > self.bp[g].num_blocks:
                kind = "full-attention" if g == 0 else f"window-{g}"
                return f"needs {need} {kind} cache blocks of {self.block} tokens, the pools hold {self.bp[g].num_blocks}"
        return None

    def missing(self, seq: Sequence, end: int) -> dict[int, int]:
        out = {}
        for g in self.groups:
            table = seq.tables.get(g, [])
            out[g] = sum(1 for i in self.span(g, seq.num_computed, end) if i >= len(table) or table[i] < 0)
        return out

    def can_allocate(self, seq: Sequence, end: int) -> bool:
        return all(n <= self.bp[g].num_free for g, n in self.missing(seq, end).items())

    def allocate(self, seq: Sequence, end: int) -> None:
        """Give seq the blocks a step over [num_computed, end) needs (call can_allocate first)."""
        for g in self.groups:
            table = seq.tables.setdefault(g, [])
            r = self.span(g, seq.num_computed, end)
            table.extend([-1] * (r.stop - len(table)))
            for i in r:
                if table[i] < 0:
                    table[i] = self.bp[g].allocate()

    def trim(self, seq: Sequence) -> None:
        """Free window blocks wholly older than every position the sequence will read again."""
        for g in self.groups:
            if g == 0:
                continue
            table = seq.tables.get(g, [])
            # held blocks are contiguous: walk back from the cut to the freed ones, release oldest first
            cut = min(first_held_block(g, seq.num_computed, self.block), len(table))
            first = cut
            while first > 0 and table[first - 1] >= 0:
                first -= 1
            for i in range(first, cut):
                self.bp[g].release(table[i])
                table[i] = -1

    def free(self, seq: Sequence) -> None:
        for g, table in seq.tables.items():
            for b in reversed(table):      # the tail first, so a prefix outlives its continuations
                if b >= 0:
                    self.bp[g].release(b)
        seq.tables, seq.hashes = {}, []

    # ------------------------------------------------------------------ prefix cache
    def commit(self, seq: Sequence) -> None:
        """Name the blocks that became full, so later requests can hit them."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block
        parent = seq.hashes[-1] if seq.hashes else self.root
        for i in range(len(seq.hashes), full):
            toks = seq.token_ids[i * self.block:(i + 1) * self.block]
            parent = block_hash(parent, toks)
            seq.hashes.append(parent)
            for g in self.groups:
                table = seq.tables.get(g, [])
                if i < len(table) and table[i] >= 0:
                    self.bp[g].name(table[i], parent, toks)

    def match(self, seq: Sequence) -> int:
        """Take the longest cached prefix of seq (whole blocks, never its last token); returns tokens hit."""
        if not self.prefix_caching or seq.num_computed:
            return 0
        toks = seq.token_ids
        chain = hash_chain(self.root, toks[:len(toks) - 1], self.block)

        def hit(g: int, i: int) -> int | None:
            return self.bp[g].lookup(chain[i], toks[i * self.block:(i + 1) * self.block])

        n = len(chain)
        if 0 in self.groups:
            n = next((i for i in range(len(chain)) if hit(0, i) is None), len(chain))
        n = max(0, n - self.drop)
        while n > 0 and not all(hit(g, i) is not None for g in self.groups if g
                                for i in self.span(g, n * self.block, n * self.block)):
            n -= 1
        if n == 0:
            return 0
        for g in self.groups:
            r = self.span(g, n * self.block, n * self.block)
            table = [-1] * n
            for i in r:
                b = hit(g, i)
                self.bp[g].take(b)
                table[i] = b
            seq.tables[g] = table
        seq.hashes = chain[:n]
        seq.num_computed = n * self.block
        self.hit_tokens += seq.num_computed
        return seq.num_computed

    # ------------------------------------------------------------------ step inputs
    def tables(self, seqs: Seq[Sequence], device) -> dict[int, torch.Tensor]:
        out = {}
        for g in self.groups:
            rows = [s.tables.get(g, []) for s in seqs]
            width = max(1, max(len(r) for r in rows))
            out[g] = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
        return out

    def blocks_in_use(self) -> int:
        return sum(bp.num_blocks - bp.num_free for bp in self.bp.values())

    def bytes_in_use(self) -> int:
        per = self.pools.bytes_per_block()
        return sum((bp.num_blocks - bp.num_free) * per[g] for g, bp in self.bp.items())
