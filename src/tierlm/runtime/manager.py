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
    def __init__(self, pools: CachePools, root: bytes, prefix_caching: bool = True, keep_last_block: bool = False,
                 store=None, extents: dict[int, int] | None = None):
        """keep_last_block: a hit gives back its last matched block (MTP draft layers: the draft's
        entry at a block's last position depends on the next block's first token). store: a
        `tierlm.tiers.TierStore` below the pools (None: device only). extents: blocks of each
        group one sequence of max_model_len holds (`BlockPool` places sequences by it)."""
        self.pools, self.root, self.prefix_caching, self.store = pools, root, prefix_caching, store
        self.hit_by_tier: dict[str, int] = {}
        self.drop = int(keep_last_block)
        self.block = pools.block
        self.groups = pools.groups
        self.bp = {g: BlockPool(pools.blocks[g], (extents or {}).get(g, 1)) for g in self.groups}
        # Per-token streams only: a prompt cached to its last token resumes at that token
        # (`_resume_last`), as no state at a block's end is needed to go on from inside it.
        self.resume_last = self.groups == [0] and not self.drop
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
                    table[i] = self.bp[g].allocate(table[i - 1] if i else -1)

    def trim(self, seq: Sequence) -> None:
        """Free window blocks wholly older than every position the sequence will read again."""
        for g in self.groups:
            if g == 0:
                continue
            table = seq.tables.get(g, [])
            # held blocks are contiguous: walk back from the cut to the freed ones, release oldest first;
            # with tiers, keep what resuming after the last full block needs (saved when seq is freed)
            end = seq.num_computed if self.store is None else seq.num_computed // self.block * self.block
            cut = min(first_held_block(g, end, self.block), len(table))
            first = cut
            while first > 0 and table[first - 1] >= 0:
                first -= 1
            for i in range(first, cut):
                self.bp[g].release(table[i])
                table[i] = -1

    def free(self, seq: Sequence) -> None:
        if self.store is not None and seq.hashes:
            self._save_resume(seq, len(seq.hashes) - 1)   # a follow-up request resumes right here
            if len(seq.hashes) % self.store.CHUNK_BLOCKS:
                self._save_chunk(seq, len(seq.hashes) - 1)    # and the unfinished chunk it ends in
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
            prev, parent = parent, block_hash(parent, toks)
            seq.hashes.append(parent)
            for g in self.groups:
                table = seq.tables.get(g, [])
                if i < len(table) and table[i] >= 0:
                    self.bp[g].name(table[i], parent, toks)
            if self.store is not None:
                self._save(seq, i, prev)

    def _save(self, seq: Sequence, i: int, parent: bytes) -> None:
        """Send block i down the tiers (its per-token pages), and at every RESUME_EVERY-th
        block and the prompt's last whole block what the window groups need to resume after it."""
        table = seq.tables.get(0, [])
        if 0 in self.groups and not (i < len(table) and table[i] >= 0):
            return
        self.store.save(parent, seq.hashes[i], seq.token_ids[i * self.block:(i + 1) * self.block],
                        table[i] if 0 in self.groups else None)
        prompt_end = i == (seq.num_prompt - 1) // self.block - 1
        if (i + 1) % self.store.RESUME_EVERY == 0 or prompt_end:
            self._save_resume(seq, i)          # also where the same prompt, asked again, resumes
        if (i + 1) % self.store.CHUNK_BLOCKS == 0 or prompt_end:
            self._save_chunk(seq, i)           # the same prompt asked again finds its last chunk

    def _save_chunk(self, seq: Sequence, i: int) -> None:
        """Send the prefix chunk ending at block i (or the unfinished tail of one, ending
        there) to the remote store as one value, pages taken from the blocks seq holds."""
        if self.store.remote is None:
            return
        a = i // self.store.CHUNK_BLOCKS * self.store.CHUNK_BLOCKS
        table = seq.tables.get(0, [])
        if 0 in self.groups and not all(j < len(table) and table[j] >= 0 for j in range(a, i + 1)):
            return
        b = self.block
        self.store.save_chunk(seq.hashes[a:i + 1], [seq.hashes[j - 1] if j else self.root for j in range(a, i + 1)],
                              [seq.token_ids[j * b:(j + 1) * b] for j in range(a, i + 1)],
                              table[a:i + 1] if 0 in self.groups else None)

    def _save_resume(self, seq: Sequence, i: int) -> None:
        spans = {g: [seq.tables.get(g, [])[j] if j < len(seq.tables.get(g, [])) else -1
                     for j in self._needed(g, i + 1)] for g in self.groups if g}
        if all(b >= 0 for ids in spans.values() for b in ids):
            self.store.save_resume(seq.hashes[i], spans)

    def _prompt_chain(self, toks: Seq[int]) -> list[bytes]:
        """Hashes of the blocks a prompt may hit: its whole blocks short of its last token, or
        all of them when the prompt can resume at its last token (`resume_last`)."""
        whole = self.resume_last and len(toks) % self.block == 0
        return hash_chain(self.root, toks if whole else toks[:len(toks) - 1], self.block)

    def match(self, seq: Sequence) -> int:
        """Take the longest cached prefix of seq (whole blocks, never its last token), from the
        device pools or, when the store's policy says reloading beats recomputing, from the
        host / disk tiers; returns tokens hit. A prompt cached whole may keep all but its last
        token (`_resume_last`)."""
        if not self.prefix_caching or seq.num_computed:
            return 0
        toks, b = seq.token_ids, self.block
        chain = self._prompt_chain(toks)

        def hit(g: int, i: int) -> int | None:
            return self.bp[g].lookup(chain[i], toks, i * b)

        def device_window(n: int) -> bool:
            return all(hit(g, i) is not None for g in self.groups if g for i in self._needed(g, n))

        n_dev = self._longest(len(chain), lambda i: hit(0, i) is not None, device_window)
        n, plan = n_dev, None
        if self.store is not None:
            if n_dev < len(chain):
                self.store.probe(chain)                # a remote store: one round trip
            n = self._longest(len(chain), lambda i: hit(0, i) is not None or self.store.where(chain[i]) is not None,
                              lambda n: device_window(n) or self.store.where(self.store.resume_key(chain[n - 1])))
            if n > n_dev:
                plan = self._plan(chain, n, n_dev, hit, device_window(n))
                if plan is None:
                    n = n_dev
        if n == 0:
            return 0
        self._take(seq, n, hit)                        # device hits first: loads must not evict them
        tiers = self._restore(seq, chain, n, plan) if plan is not None else {}
        if tiers is None:                              # a lower-tier block failed to load: device hits only
            self._release(seq)
            n = n_dev
            if n == 0:
                return 0
            self._take(seq, n, hit)
            tiers = {}
        seq.hashes = chain[:n]
        seq.num_computed = n * b
        if seq.num_computed == len(toks):
            self._resume_last(seq, n)
        for i in range(-(-seq.num_computed // b)):         # the blocks hit, the last one maybe in part
            tier = tiers.get(i, "device")
            self.hit_by_tier[tier] = self.hit_by_tier.get(tier, 0) + min(b, seq.num_computed - i * b)
        self.hit_tokens += seq.num_computed
        return seq.num_computed

    def _resume_last(self, seq: Sequence, n: int) -> None:
        """seq hit all n blocks of its prompt: leave its last token to compute (its logits are
        needed), which writes that token's entries into the last block again. A block only seq
        holds is written in place: its name is dropped until the step has filled it again, when
        `commit` gives it back. A block others hold too is copied first, so they only ever read
        it; with no free block for the copy, the last block is computed again instead."""
        table, old = seq.tables[0], seq.tables[0][n - 1]
        seq.num_computed -= 1
        if self.bp[0].refs[old] == 1:
            self.bp[0].unname(old)
            seq.hashes.pop()
            return
        if self.bp[0].num_free == 0:
            self.bp[0].release(old)
            del table[n - 1:]
            seq.hashes.pop()
            seq.num_computed = (n - 1) * self.block
            return
        new = self.bp[0].allocate(table[n - 2] if n > 1 else -1)
        for t in self.pools.pages.values():          # all group 0: resume_last has no other group
            t[new].copy_(t[old])
        self.bp[0].release(old)
        table[n - 1] = new

    def prefetch(self, token_ids: list[int]) -> None:
        """Have the store read ahead the lower-tier part of a queued prompt's prefix (what the
        device pools do not hold), so that `match` finds it in RAM when the prompt's turn comes."""
        if self.store is None or not self.prefix_caching:
            return
        b = self.block
        chain = self._prompt_chain(token_ids)
        on_device = 0
        if 0 in self.groups:
            on_device = next((i for i in range(len(chain))
                              if self.bp[0].lookup(chain[i], token_ids, i * b) is None), len(chain))
        self.store.prefetch(chain, on_device)

    def _longest(self, blocks: int, have0, window_ok) -> int:
        """Longest prefix of n blocks whose group-0 blocks 0..n-1 are all available (`have0`)
        and after which every window group can resume (`window_ok(n)`)."""
        n = blocks
        if 0 in self.groups:
            n = next((i for i in range(blocks) if not have0(i)), blocks)
        n = max(0, n - self.drop)
        if any(self.groups):
            while n > 0 and not window_ok(n):
                n -= 1
        return n

    def _needed(self, g: int, n: int) -> range:
        """Blocks of group g a sequence resuming after n blocks must hold."""
        return range(n) if g == 0 else self.span(g, n * self.block, n * self.block)

    def _take(self, seq: Sequence, n: int, hit) -> None:
        """Give seq the device's cached blocks of its first n blocks (the others -1)."""
        for g in self.groups:
            table = [-1] * n
            for i in self._needed(g, n):
                blk = hit(g, i)
                if blk is not None:
                    self.bp[g].take(blk)
                    table[i] = blk
            seq.tables[g] = table

    def _release(self, seq: Sequence) -> None:
        for g, table in seq.tables.items():
            for b in reversed(table):
                if b >= 0:
                    self.bp[g].release(b)
        seq.tables = {}

    def _plan(self, chain, n: int, n_dev: int, hit, window_on_device: bool):
        """(keys, sizes, need) of a hit of n blocks: the lower-tier blocks to load (and the
        resume record after the last, unless the window groups' blocks are all on the device),
        with the blocks each group lacks; None when the pools lack free blocks or the policy
        prefers recomputing."""
        store = self.store
        need = {g: [i for i in self._needed(g, n) if hit(g, i) is None] for g in self.groups}
        if window_on_device:
            need = {g: (v if g == 0 else []) for g, v in need.items()}
        for g in self.groups:
            hits_free = sum(1 for i in self._needed(g, n) if (blk := hit(g, i)) is not None and self.bp[g].refs[blk] == 0)
            if len(need[g]) > self.bp[g].num_free - hits_free:
                return None
        keys = [chain[i] for i in need.get(0, [])]
        sizes = [store.payload_bytes] * len(keys)
        if not window_on_device and store.windows:
            keys.append(store.resume_key(chain[n - 1]))
            sizes.append(store.resume_bytes({g: len(self._needed(g, n)) for g in self.groups if g}))
        by_tier: dict[str, int] = {}
        for k, size in zip(keys, sizes):
            t = store.where(k)
            by_tier[t] = by_tier.get(t, 0) + size
        if not store.reload_wins(by_tier, store.recompute_flops(n_dev * self.block, n * self.block)):
            store.stats["recomputes"] += 1
            return None
        return keys, sizes, need

    def _restore(self, seq: Sequence, chain, n: int, plan) -> dict[int, str] | None:
        """Allocate the blocks a lower-tier hit brings back, load them (disk blocks straight
        into their pages), and name them; {block: tier it came from}, or None when a block
        failed to load (a record failed verification: it is dropped, the prefix recomputed)."""
        keys, sizes, need = plan
        b, store, lost = self.block, self.store, need.get(0, [])
        for i in lost:
            seq.tables[0][i] = self.bp[0].allocate(seq.tables[0][i - 1] if i else -1)
        ids = [seq.tables[0][i] for i in lost]
        got = store.load(keys, sizes, into=ids + [None] * (len(keys) - len(ids)))
        if len(got) < len(keys):
            return None
        store.stats["reloads"] += 1
        loose = [(got[chain[i]][1], blk) for i, blk in zip(lost, ids) if got[chain[i]][1] is not None]
        if loose:
            store.restore(*map(list, zip(*loose)))
        for i in lost:
            self.bp[0].name(seq.tables[0][i], chain[i], seq.token_ids[i * b:(i + 1) * b])
        tiers = {i: got[chain[i]][0] for i in lost}
        if len(keys) == len(lost):
            return tiers
        resume = got[keys[-1]][1]
        spans = {}
        for g in self.groups:
            if g == 0:
                continue
            spans[g] = []
            for i in self._needed(g, n):
                if seq.tables[g][i] >= 0:
                    spans[g].append(-1)                   # a device hit: keep it
                else:
                    seq.tables[g][i] = self.bp[g].allocate(seq.tables[g][i - 1] if i else -1)
                    spans[g].append(seq.tables[g][i])
                    self.bp[g].name(seq.tables[g][i], chain[i], seq.token_ids[i * b:(i + 1) * b])
        store.restore_resume(resume, spans)
        return tiers

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
