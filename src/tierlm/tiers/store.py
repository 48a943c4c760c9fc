"""Tiers under the engine's pools: a host-RAM LRU and the disk segment store, one stored
block = every cache stream of one prefix block (all layers, all groups: latent, indexer,
window, compressed entries, compressor state), keyed by the engine's prefix hash.

`save` snapshots a block the moment the engine names it (while every group still holds it:
window blocks are freed right after) into one contiguous uint8 payload and puts it in the host
tier. A background writer appends it to the disk and the remote store (`remote`, a Redis
server shared by many engines) at once (write-through) or when the host tier evicts it or the
engine closes (write-back), chained blocks coalesced into one disk record, so decode never
waits on either. `prefetch` reads a queued request's disk-only and remote-only blocks on
another thread while the engine computes; `load` returns payloads from the host tier, the
prefetched ones, the disk or the remote store (verified, then promoted to the tiers above);
`restore` copies one group's part of a payload into freshly allocated pages.

Policy: a hit found only below the device is reloaded when the planner's cost model says
reloading beats recomputing: reload = the tier's latency + bytes / its read bandwidth, recompute =
prefill FLOPs of those positions (`tierlm.plan.planner.prefill_flops`) / this machine's
compute rate. Both rates start from what earlier engines learned in the cache directory
(`rates.json`), else from a guess (disk) or a matmul timed at start (compute), and are then
learned from every disk reload and prefill step the engine runs.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import TierlmError
from ..runtime.blocks import block_hash
from .remote import LINK_GUESS, RemoteTier, is_remote
from .segment import DEFAULT_TTL_S, RUN_BYTES, SegmentStore, Staging

TIERS = ("host", "disk")                   # and, last, a remote store's URL (redis://...)
DISK_READ_GUESS = 2e9      # bytes/s a disk reload is assumed to read at until one is measured
POLICIES = ("auto", "reload", "recompute")
WRITES = ("through", "back")
COVER_MAX = 1 << 20                         # block keys remembered as held by the remote store
# mean page size from which a disk reload reads into the pools' pages directly: each page is a
# buffer of its own (a preadv iovec, a checksum update), about 1 us apiece here, as much as
# copying 4-8 KiB; smaller pages are read into staging rows, then copied with one copy per stream
DIRECT_PAGE = 4096


class HostTier:
    """Payloads in RAM under a byte budget, least recently used evicted first."""

    def __init__(self, budget: int, pin: bool = False, evicted=None):
        self.budget, self.pin, self.evicted = budget, pin, evicted     # evicted(key, payload): write-back
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        t = self.blocks.get(key)
        if t is not None:
            self.blocks.move_to_end(key)
        return t

    def put(self, key: bytes, payload: torch.Tensor) -> None:
        if key in self.blocks or payload.numel() > self.budget:
            return
        if self.pin:
            payload = payload.pin_memory()
        self.blocks[key] = payload
        self.bytes += payload.numel()
        while self.bytes > self.budget:
            k, old = self.blocks.popitem(last=False)
            self.bytes -= old.numel()
            if self.evicted is not None:
                self.evicted(k, old)


class Rate:
    """An exponentially weighted estimate of a rate (units per second). A starting value that
    is only a guess or a proxy (a timed matmul for prefill) gives way to the first real
    measurement; one learned earlier (`measured`) is averaged with the new ones."""

    def __init__(self, first: float, measured: bool = False):
        self.value = first
        self.measured = measured
        self.learned = 0           # measurements added

    def add(self, units: float, seconds: float) -> None:
        if seconds > 0 and units > 0:
            rate = units / seconds
            self.value = 0.7 * self.value + 0.3 * rate if self.measured else rate
            self.measured = True
            self.learned += 1


class TierStore:
    # seconds a reload pays before its first byte (a disk read's seek and syscalls; a remote
    # store's measured round trip), so that a prefix of a block or two is recomputed: prefill
    # cost and reload bytes both grow linearly
    LATENCY = {"host": 0.0, "disk": 2e-4}
    # besides the last block of every sequence, every RESUME_EVERY-th block stores what window
    # streams need to resume after it: a hit resumes at the longest such point
    RESUME_EVERY = 16
    # a disk record holds up to this many chained blocks: one pair of checksums per run of a
    # prefix instead of per block, yet a short hit does not verify a long record
    RUN_BLOCKS = 32
    # a remote value holds an aligned chunk of this many blocks (256 tokens at 16 per block,
    # LMCache's chunk size): one key and one round-trip share per chunk
    CHUNK_BLOCKS = 16

    def __init__(self, spec, pools, fingerprint: bytes, tiers=TIERS, cache_dir=None, host_bytes: int = 1 << 30,
                 disk_bytes: int = 64 << 30, policy: str = "auto", ttl_s: float | None = None,
                 write: str = "through", remote_bytes: int = 64 << 30):
        tiers = tuple(tiers)
        bad = [t for t in tiers if t not in TIERS and not is_remote(t)]
        if bad:
            raise TierlmError(f"kv_tiers may name {', '.join(TIERS)} and a redis:// URL, got {bad[0]!r}")
        urls = [t for t in tiers if is_remote(t)]
        if len(urls) > 1 or (urls and tiers[-1] != urls[0]):
            raise TierlmError("kv_tiers takes one remote store, last (host, disk, redis://...)")
        if policy not in POLICIES:
            raise TierlmError(f"tier_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if write not in WRITES:
            raise TierlmError(f"tier_write must be one of {', '.join(WRITES)}, got {write!r}")
        if "disk" in tiers and cache_dir is None:
            raise TierlmError("the disk tier needs a cache_dir")
        for name, v in (("host_cache_bytes", host_bytes), ("disk_cache_bytes", disk_bytes),
                        ("remote_cache_bytes", remote_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TierlmError(f"{name} must be a non-negative integer, got {v!r}")
        ttl_s = DEFAULT_TTL_S if ttl_s is None else ttl_s
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
            raise TierlmError(f"cache_ttl_s must be a positive number of seconds, got {ttl_s!r}")
        self.spec, self.pools, self.fingerprint, self.policy = spec, pools, fingerprint, policy
        # payload layouts, pages in sorted (layer, stream) order: a block record holds one page of
        # each per-token stream (group 0); a resume record one page of each window stream for
        # every block a group needs to resume after its block (span(g, end), oldest first)
        self.keys = sorted(pools.pages)
        self.group = {k: pools.group_of(k) for k in self.keys}
        self.sizes = {k: pools.pages[k][0].numel() * pools.pages[k].element_size() for k in self.keys}
        self.windows = sorted({g for g in self.group.values() if g})
        self.keys_of = {g: [k for k in self.keys if self.group[k] == g] for g in {0, *self.windows}}
        self.per_group = {g: sum(self.sizes[k] for k in keys) for g, keys in self.keys_of.items()}
        self.payload_bytes = self.per_group[0]
        layout = {"model": spec.name, "block_size": pools.block, "resume_every": self.RESUME_EVERY, "streams": [
            {"layer": k[0], "stream": k[1], "group": self.group[k], "dtype": str(pools.pages[k].dtype),
             "shape": list(pools.pages[k].shape[1:]), "nbytes": self.sizes[k]} for k in self.keys]}
        layout_json = json.dumps(layout, sort_keys=True).encode()
        self.layout_id = hashlib.sha256(layout_json).digest()
        device = next(iter(pools.pages.values())).device
        # write-back: blocks wait in the host tier (self._dirty) until it evicts them or close()
        self.write_back = write == "back" and "host" in tiers and ("disk" in tiers or bool(urls))
        self._dirty: dict[bytes, tuple[bytes, tuple, str]] = {}     # key -> (parent, tokens, stream)
        self._from_remote: set[bytes] = set()    # remote hits on their way to the disk: not sent back
        self.host = (HostTier(host_bytes, pin=device.type == "cuda", evicted=self._evicted if self.write_back else None)
                     if "host" in tiers else None)
        self.disk = None
        if "disk" in tiers:
            self.disk = SegmentStore(Path(cache_dir), disk_bytes, ttl_s=ttl_s)
            try:
                self.disk.put_layout(layout)
            except OSError as e:
                self.disk.full = True
                warnings.warn(f"cannot write to cache directory {cache_dir} ({e.strerror or e}): the disk tier "
                              "only serves what it already holds", RuntimeWarning, stacklevel=2)
        self.remote = (RemoteTier(urls[0], fingerprint, self.layout_id, remote_bytes, ttl_s, layout_json)
                       if urls else None)
        self.stats = {"reloads": 0, "recomputes": 0, "stored": 0, "prefetched": 0, "disk_full": False,
                      "reload_seconds": 0.0}
        # the rates earlier engines learned on this machine (rates.json), else a guess or a proxy
        learned = self.disk.rates() if self.disk is not None else {}
        self.rates: dict[str, Rate] = {}             # rates.json name -> the rate, saved at close

        def rate(name: str, start) -> Rate:
            got = learned.get(name)
            self.rates[name] = Rate(got or start(), measured=bool(got))
            return self.rates[name]

        self.bandwidth = {"host": Rate(_host_copy_rate()), "disk": rate("disk_read", lambda: DISK_READ_GUESS)}
        self.latency = dict(self.LATENCY)
        if self.remote is not None:
            self.bandwidth["remote"] = rate(f"remote_read:{self.remote.url}", lambda: LINK_GUESS)
            self.latency["remote"] = self.remote.latency
        self.flops = rate(f"prefill:{device.type}:{fingerprint.hex()}", lambda: _matmul_rate(pools.dtype))
        self._queue: queue.Queue = queue.Queue()
        self._pending: list = []       # this step's blocks for the disk, queued together by end_step()
        self._writer = self._reader = None
        # prefetched payloads, verified: key -> (tier, payload, (parent, tokens) of a remote one)
        self._ahead: OrderedDict[bytes, tuple[str, torch.Tensor, tuple | None]] = OrderedDict()
        self._ahead_mu = threading.Lock()
        self._ahead_budget, self._ahead_bytes = host_bytes, 0
        self._fetch: queue.Queue = queue.Queue()
        self._staging = Staging()                 # synchronous disk reloads read into it
        self._heads = Staging()                   # the record headers of reads into pages or staging rows
        # group 0's pages of CPU pools as [block, bytes] arrays: a disk reload reads straight into
        # them, unless pages are so small that handling each costs more than copying it
        direct = device.type == "cpu" and self.payload_bytes >= DIRECT_PAGE * max(1, len(self.keys_of[0]))
        self._flat = ([pools.pages[k].view(pools.pages[k].shape[0], -1).view(torch.uint8).numpy()
                       for k in self.keys_of[0]] if direct else None)
        if self._flat is None and self.disk is not None and policy != "recompute":
            self._staging.reserve(pools.blocks.get(0, 0) * self.payload_bytes)    # the largest reload into rows
        if self.disk is not None or self.remote is not None:
            self._writer = threading.Thread(target=self._write_loop, name="tierlm-disk-writer", daemon=True)
            self._writer.start()
            if policy != "recompute":
                self._reader = threading.Thread(target=self._fetch_loop, name="tierlm-disk-prefetch", daemon=True)
                self._reader.start()

    # ------------------------------------------------------------------ save
    def where(self, key: bytes) -> str | None:
        if self.host is not None and key in self.host.blocks:
            return "host"
        if self.disk is not None and self.disk.has(key):
            return "disk"
        if self.remote is not None and key in self.remote.cover:
            return "remote"
        return None

    def probe(self, chain: list[bytes]) -> None:
        """Ask the remote store (one round trip) which chunks of a prompt's prefix chain (the
        whole chain: chunks are aligned from its start) and which resume records after its
        blocks it holds, so that `where` knows. A chunk is held whole (under its last block's
        key) or as the unfinished tail a sequence stopped in; the prefix covered ends at the
        first chunk not held whole."""
        if self.remote is None or not chain:
            return
        resumes = [self.resume_key(k) for k in chain] if self.windows else []
        held = self.remote.probe(chain + resumes)
        cover, c = {}, self.CHUNK_BLOCKS
        for a in range(0, len(chain), c):
            group = chain[a:a + c]
            ends = [j for j, k in enumerate(group) if k in held]
            if not ends:
                break
            for k in group[:ends[-1] + 1]:
                cover[k] = group[ends[-1]]
            if ends[-1] < c - 1:
                break
        cover.update((r, r) for r in resumes if r in held)
        if len(self.remote.cover) > COVER_MAX:      # bounded: older prompts are simply probed again
            self.remote.cover.clear()
        for k in chain + resumes:                   # what this probe did not find is gone
            if k not in cover:
                self.remote.cover.pop(k, None)
        self.remote.cover.update(cover)

    def _lower(self, stream: str) -> bool:
        """Whether a stored block of `stream` has somewhere to go below the host tier (the
        remote store takes blocks as chunks, `save_chunk`, and resume records one by one)."""
        return (self.disk is not None and not self.disk.full) or (self.remote is not None and stream == "resume")

    def _pages(self, keys, block: int) -> list[torch.Tensor]:
        return [self.pools.pages[k][block].reshape(-1).view(torch.uint8) for k in keys]

    def _put(self, parent: bytes, key: bytes, tokens, parts: list[torch.Tensor], stream: str) -> None:
        payload = torch.cat(parts).cpu() if parts else torch.empty(0, dtype=torch.uint8)
        if self.write_back and payload.numel() <= self.host.budget:
            self._dirty[key] = (parent, tuple(tokens), stream)
        elif self._lower(stream):
            self._pending.append((parent, key, tuple(tokens), payload, stream))
        if self.host is not None:
            self.host.put(key, payload)
        self.stats["stored"] += 1

    def _evicted(self, key: bytes, payload: torch.Tensor) -> None:
        """Write-back: a block leaving the host tier goes to the disk writer."""
        meta = self._dirty.pop(key, None)
        if meta is not None and self._lower(meta[2]):
            parent, tokens, stream = meta
            self._pending.append((parent, key, tokens, payload, stream))

    def save(self, parent: bytes, key: bytes, tokens, block0: int | None) -> None:
        """Snapshot the per-token pages of block `key` (physical block `block0` of group 0)."""
        if self.where(key) is None:
            self._put(parent, key, tokens, self._pages(self.keys_of[0], block0) if block0 is not None else [], "blocks")

    def save_chunk(self, keys: list[bytes], parents: list[bytes], tokens: list, blocks: list[int] | None) -> None:
        """Queue chained blocks (a chunk of the prefix, or its unfinished tail) for the remote
        store as one value: their per-token pages gathered from physical blocks `blocks` of
        group 0, one indexed copy per stream."""
        if self.remote.cover.get(keys[-1]) == keys[-1]:
            return
        if blocks is not None and self.keys_of[0]:
            device = self.pools.pages[self.keys_of[0][0]].device
            idx = torch.tensor(blocks, device=device)
            rows = torch.cat([self.pools.pages[k].view(self.pools.pages[k].shape[0], -1).view(torch.uint8)[idx]
                              for k in self.keys_of[0]], dim=1).cpu()
            payloads = [r.numpy().data for r in rows]
        else:
            payloads = [b""] * len(keys)
        self._pending.append((None, keys[-1], None, list(zip(keys, parents, map(tuple, tokens), payloads)), "chunk"))

    @staticmethod
    def resume_key(key: bytes) -> bytes:
        """Key of the resume record after block `key`: the prefix hash of an empty block after it."""
        return block_hash(key, ())

    def save_resume(self, key: bytes, blocks: dict[int, list[int]]) -> None:
        """Snapshot what the window streams need to resume after block `key`: for each window
        group, its physical blocks `blocks[g]` (the group's span before the boundary)."""
        rkey = self.resume_key(key)
        if not self.windows or self.where(rkey) is not None:
            return
        parts = []
        for g in self.windows:
            for b in blocks[g]:
                parts += self._pages(self.keys_of[g], b)
        self._put(key, rkey, (), parts, "resume")

    def _write_loop(self) -> None:
        """Append queued blocks: whatever is queued is taken at once, and chained blocks (each
        one's parent the previous one's key) go into one record of up to RUN_BLOCKS."""
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                flat = [b for batch in items if batch is not None for b in batch]
                for stream, blocks in self._runs([b for b in flat if b[4] != "chunk"]):
                    self._write(stream, blocks)
                chunks = [b[3] for b in flat if b[4] == "chunk"]
                if chunks:
                    self._write_remote(chunks)
            finally:
                for _ in items:
                    self._queue.task_done()
            if None in items:
                return

    def end_step(self) -> None:
        """Hand the blocks stored since the last call to the writer at once (the engine calls
        this after each step), so that a prefill chunk's chained blocks become one record."""
        if self._pending:
            self._queue.put(self._pending)
            self._pending = []

    def _runs(self, items) -> list[tuple[str, list]]:
        runs, tails = [], {}
        for parent, key, tokens, payload, stream in items:
            run = tails.pop(parent, None) if stream == "blocks" else None
            if run is None or len(run[1]) >= self.RUN_BLOCKS or run[2] + payload.numel() > RUN_BYTES:
                run = [stream, [], 0]
                runs.append(run)
            run[1].append((key, parent, tokens, payload.numpy().data))
            run[2] += payload.numel()
            if stream == "blocks":
                tails[key] = run
        return [(stream, blocks) for stream, blocks, _ in runs]

    def _write(self, stream: str, blocks: list) -> None:
        if self.disk is not None and not self.disk.full:
            self._write_disk(stream, blocks)
        if self.remote is not None and stream == "resume":
            self._write_remote([[b] for b in blocks if b[0] not in self._from_remote])
        self._from_remote.difference_update(b[0] for b in blocks)

    def _write_remote(self, runs: list) -> None:
        try:
            self.remote.put_runs(runs)
        except Exception as e:                      # a Redis error is handled inside; anything else too
            if not self.stats.get("remote_error"):
                self.stats["remote_error"] = str(e)
                warnings.warn(f"remote tier write failed ({e}); continuing without it", RuntimeWarning, stacklevel=1)

    def _write_disk(self, stream: str, blocks: list) -> None:
        try:
            if not self.disk.put_run(self.fingerprint, self.layout_id, blocks, stream):
                if self.disk.full and not self.stats["disk_full"]:
                    self.stats["disk_full"] = True
                    warnings.warn(f"cache directory {self.disk.path} is full: new blocks are no longer "
                                  "written to disk (they are recomputed when needed)", RuntimeWarning, stacklevel=1)
        except Exception as e:                      # the writer must outlive any one bad write
            if not self.stats.get("disk_error"):
                self.stats["disk_error"] = str(e)
                warnings.warn(f"disk tier write failed ({e}); continuing without it", RuntimeWarning, stacklevel=1)

    def flush(self) -> None:
        """Wait until every stored block is on disk (write-back: the host tier's too)."""
        if self._writer is None:
            return
        if self.write_back:
            for key in [k for k in self._dirty if k in self.host.blocks]:
                self._evicted(key, self.host.blocks[key])
            self._dirty.clear()
        self.end_step()
        self._queue.join()

    def close(self, hit_tokens: dict[str, int] | None = None) -> None:
        """Finish writes, add this run's counters to the directory's usage.json, release it."""
        if self._writer is not None:
            self.flush()
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        if self._reader is not None:
            self._fetch.put(None)
            self._reader.join()
            self._reader = None
        if self.disk is not None and self.disk._lock is not None:
            try:
                self.disk.add_usage({"stored": self.stats["stored"], "reloads": self.stats["reloads"],
                                     "recomputes": self.stats["recomputes"], "hit_tokens": hit_tokens or {}})
                if any(r.learned for r in self.rates.values()):
                    self.disk.put_rates({k: r.value for k, r in self.rates.items() if r.learned})
            except OSError:
                pass
            self.disk.close()
        if self.remote is not None:
            self.remote.close()

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, chain: list[bytes], start: int = 0) -> None:
        """Read ahead, on the prefetch thread, the disk-only and remote-only blocks of a queued
        request's prefix chain after its first `start` blocks (held on the device) and the
        resume record of its longest stored part, so that its reload (when it is scheduled,
        while other requests compute meanwhile) finds them verified in RAM."""
        if self._reader is not None:
            self._fetch.put((chain, start))

    def _fetch_loop(self) -> None:
        while True:
            job = self._fetch.get()
            try:
                if job is None:
                    return
                self._read_ahead(*job)
            except Exception:                       # a failed read-ahead only means a later synchronous read
                pass
            finally:
                self._fetch.task_done()

    def _read_ahead(self, chain: list[bytes], start: int) -> None:
        if start >= len(chain):
            return                                  # all on the device
        self.probe(chain)
        keys = []
        for k in chain[start:]:
            t = self.where(k)
            if t is None:
                break
            if t != "host":
                keys.append(k)
        resume = next((r for r in map(self.resume_key, reversed(chain)) if self.where(r) is not None), None)
        if self.windows and resume is not None and self.where(resume) != "host":
            keys.append(resume)
        for tier, got in self._read(keys).items():
            total = 0
            with self._ahead_mu:
                for k, (t, meta) in got.items():
                    if k not in self._ahead:
                        self._ahead[k] = (tier, t, meta)
                        total += t.numel()
                        self.stats["prefetched"] += 1
                self._ahead_bytes += total
                while self._ahead_bytes > self._ahead_budget:
                    self._ahead_bytes -= self._ahead.popitem(last=False)[1][1].numel()

    def _read(self, keys: list[bytes], staged: bool = False) -> dict[str, dict[bytes, tuple[torch.Tensor, tuple | None]]]:
        """{tier: {key: (payload, (parent, tokens) of a remote one)}} of the keys the disk or
        the remote store hold, verified; each tier's bandwidth estimate learns from the read.
        `staged`: disk payloads are views of the reused staging memory (valid until the next
        staged read)."""
        out: dict[str, dict] = {"disk": {}, "remote": {}}
        on_disk = [k for k in keys if self.disk is not None and self.disk.has(k)]
        if on_disk:
            start = time.perf_counter()
            for k, body in zip(on_disk, self.disk.get_many(on_disk, self.fingerprint,
                                                            self._staging if staged else None)):
                if body is not None:
                    out["disk"][k] = (_tensor(body), None)
            self.bandwidth["disk"].add(sum(t.numel() for t, _ in out["disk"].values()), time.perf_counter() - start)
        rest = [k for k in keys if k not in out["disk"] and self.remote is not None and k in self.remote.cover]
        if rest:
            start = time.perf_counter()
            runs = list(dict.fromkeys(self.remote.cover[k] for k in rest))
            wanted, total = set(rest), 0
            for rk, run in zip(runs, self.remote.get_runs(runs)):
                if run is None:                     # gone (evicted, expired, wiped) or dropped as bad
                    for k in [k for k in rest if self.remote.cover.get(k) == rk]:
                        self.remote.cover.pop(k, None)
                for key, parent, tokens, body in run or ():
                    total += len(body)
                    if key in wanted:
                        out["remote"][key] = (_tensor(body), (parent, tokens))
            self.bandwidth["remote"].add(total, time.perf_counter() - start)
        return out

    # ------------------------------------------------------------------ load
    def load(self, keys: list[bytes], sizes: list[int],
             into: list[int | None] | None = None) -> dict[bytes, tuple[str, torch.Tensor | None]]:
        """{key: (tier, payload)} for the keys a lower tier holds whose payload verifies and has
        the expected size. With `into` (per key, a physical block of group 0, or None), a
        block read from disk now is put into that block right away (`_read_into`) and comes
        back with payload None: nothing to restore. Other payloads read from disk now are
        views of the staging memory: restore them before the next load. Neither is copied to
        the host tier (the pools now hold them, and the copy would double the reload's memory
        traffic).
        What was read ahead, and a remote hit, is promoted: to the host tier, and a remote
        hit to disk too."""
        start = time.perf_counter()
        out = {}
        missing = []
        if (self.host is None or not self.host.blocks) and not self._ahead:   # nothing in RAM (a fresh engine)
            missing = list(zip(keys, sizes))
        else:
            for k, n in zip(keys, sizes):
                t = self.host.get(k) if self.host is not None else None
                if t is not None and t.numel() == n:
                    out[k] = ("host", t)
                    continue
                ahead = None
                if self._ahead:                         # (a read-ahead racing this one only costs a read)
                    with self._ahead_mu:
                        ahead = self._ahead.pop(k, None)
                        self._ahead_bytes -= ahead[1].numel() if ahead is not None else 0
                if ahead is not None and ahead[1].numel() == n:
                    self._promote(k, *ahead)
                    out[k] = ahead[:2]                  # read ahead of time
                else:
                    missing.append((k, n))
        if missing and (self.disk is not None or self.remote is not None):
            self.end_step()                         # a block may still be on its way down
            self._queue.join()
            start = time.perf_counter()
            sizes_of = dict(missing)
            if into is not None and self.disk is not None:
                block_of, held = dict(zip(keys, into)), self.disk.index
                blocks = [k for k, n in missing if n == self.payload_bytes and block_of[k] is not None and k in held]
                done = self._read_into(blocks, [block_of[k] for k in blocks]) if blocks else []
                self.bandwidth["disk"].add(len(done) * self.payload_bytes, time.perf_counter() - start)
                out.update(dict.fromkeys(done, ("disk", None)))
                missing = [(k, n) for k, n in missing if k not in out]
            for tier, got in self._read([k for k, _ in missing], staged=True).items():
                for k, (t, meta) in got.items():
                    if t.numel() == sizes_of[k]:
                        if tier == "remote":
                            self._promote(k, tier, t, meta)
                        out[k] = (tier, t)
        self.stats["reload_seconds"] += time.perf_counter() - start
        return out

    def _promote(self, key: bytes, tier: str, payload: torch.Tensor, meta: tuple | None) -> None:
        """Put a block read from a lower tier (into memory of its own) in the host tier; a
        remote one also on disk."""
        if self.host is not None:
            self.host.put(key, payload)
        if tier == "remote" and self.disk is not None and not self.disk.full and not self.disk.has(key):
            parent, tokens = meta
            self._from_remote.add(key)
            self._pending.append((parent, key, tokens, payload, "blocks" if tokens else "resume"))

    def _read_into(self, keys: list[bytes], blocks: list[int]) -> list[bytes]:
        """Read blocks `keys` from disk into physical blocks `blocks` of group 0; the keys
        that verified. Straight into their pages (CPU pools, pages of DIRECT_PAGE or more), or
        into one row per block of the staging memory (a record's blocks one piece) and from
        there one copy per stream for all."""
        if self._flat is not None:
            ok = self.disk.read_into(keys, self.fingerprint, self._heads, dests=[self._dests(b) for b in blocks])
        else:
            buf = self._staging.take(len(keys) * self.payload_bytes)
            ok = self.disk.read_into(keys, self.fingerprint, self._heads, rows=(buf, self.payload_bytes))
            rows = _tensor(buf).view(len(keys), -1)
            if any(ok):
                self._scatter(rows, [b if good else -1 for b, good in zip(blocks, ok)], self.keys_of[0])
        return [k for k, good in zip(keys, ok) if good]

    def _dests(self, block: int) -> list:
        """Physical block `block` of group 0 as writable bytes, one view per stream page, in
        payload order."""
        return [rows[block] for rows in self._flat]

    def restore(self, payloads: list[torch.Tensor], blocks: list[int]) -> None:
        """Copy block payloads (from the host tier, read ahead, or remote) into physical
        blocks `blocks` of group 0."""
        start = time.perf_counter()
        self._scatter(torch.stack(payloads), blocks, self.keys_of[0])
        self.stats["reload_seconds"] += time.perf_counter() - start

    def restore_resume(self, payload: torch.Tensor, spans: dict[int, list[int]]) -> None:
        """Copy a resume record into each window group's blocks `spans[g]` (the whole span,
        oldest first; -1 for a block the device already holds)."""
        start, at = time.perf_counter(), 0
        for g in self.windows:
            n, size = len(spans[g]), self.per_group[g]
            self._scatter(payload[at:at + n * size].view(n, size), spans[g], self.keys_of[g])
            at += n * size
        self.stats["reload_seconds"] += time.perf_counter() - start

    def resume_bytes(self, spans: dict[int, int]) -> int:
        """Size of a resume record whose groups' spans have these numbers of blocks."""
        return sum(spans[g] * self.per_group[g] for g in self.windows)

    def _scatter(self, rows: torch.Tensor, blocks: list[int], keys) -> None:
        """rows[i] (uint8) holds physical block blocks[i]'s pages of `keys`, back to back; a
        block -1 is skipped. Runs of consecutive block ids (a fresh allocation's) are one slice
        copy per stream; scattered ids one indexed copy per stream, in the widest integer the
        alignment allows (a byte-wise indexed copy ran at a tenth of memcpy's speed)."""
        if blocks and blocks == list(range(blocks[0], blocks[0] + len(blocks))) and blocks[0] >= 0:
            ids, runs = blocks, [0]                 # a fresh allocation: one run
        else:
            keep = [i for i, b in enumerate(blocks) if b >= 0]
            if not keep:
                return
            rows = rows if len(keep) == len(blocks) else rows[keep]
            ids = [blocks[i] for i in keep]
            runs = [0] + [j for j in range(1, len(ids)) if ids[j] != ids[j - 1] + 1]    # where a run starts
        device = self.pools.pages[keys[0]].device
        rows = rows.to(device, non_blocking=True)
        idx = torch.tensor(ids, device=device) if len(runs) * 4 > len(ids) else None
        at = 0
        for k in keys:
            pages = self.pools.pages[k]
            dst, src = pages.view(pages.shape[0], -1).view(torch.uint8), rows[:, at:at + self.sizes[k]]
            if idx is None:
                for a, b in zip(runs, runs[1:] + [len(ids)]):
                    dst[ids[a]:ids[a] + b - a].copy_(src[a:b])
            else:
                w = _widest(src, dst)
                dst.view(w)[idx] = src.view(w)
            at += self.sizes[k]

    # ------------------------------------------------------------------ policy
    def reload_wins(self, tier_bytes: dict[str, int], flops: float) -> bool:
        """Whether reading these bytes from their tiers is faster than `flops` of prefill."""
        if self.policy != "auto":
            return self.policy == "reload"
        reload = sum(self.latency[t] + n / self.bandwidth[t].value for t, n in tier_bytes.items())
        return reload < flops / self.flops.value

    def recompute_flops(self, start: int, end: int) -> float:
        """Prefill FLOPs of positions [start, end) after `start` cached ones."""
        from ..plan.planner import prefill_flops
        return prefill_flops(self.spec, end) - prefill_flops(self.spec, start)

    def corrupt(self) -> int:
        """Records dropped because they failed verification (torn tails at start included, and
        remote values)."""
        return ((self.disk.corrupt if self.disk is not None else 0)
                + (self.remote.stats["corrupt"] if self.remote is not None else 0))

    def bytes_by_tier(self) -> dict[str, int]:
        out = {"host": self.host.bytes if self.host is not None else 0,
               "disk": self.disk.nbytes() if self.disk is not None else 0}
        if self.remote is not None:
            out["remote"] = self.remote.nbytes()
        return out


def _tensor(body) -> torch.Tensor:
    """A uint8 tensor over a payload's bytes (no copy). A remote value's bytes are the client's
    read-only `bytes`: the tensors over them are only ever read (restored into the pools, kept
    by the host tier, written down to disk), so they are not copied into writable memory."""
    return torch.frombuffer(body, dtype=torch.uint8) if len(body) else torch.empty(0, dtype=torch.uint8)


with warnings.catch_warnings():      # torch warns once per process about a tensor over read-only
    warnings.simplefilter("ignore")  # memory; `_tensor`'s are read-only by contract, so spend it here
    torch.frombuffer(b"\0", dtype=torch.uint8)


def _widest(*ts: torch.Tensor) -> torch.dtype:
    """The widest integer dtype every (uint8, last dim contiguous) tensor can be viewed as."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        w = dtype.itemsize
        if all(t.shape[-1] % w == 0 and t.data_ptr() % w == 0 and all(s % w == 0 for s in t.stride()[:-1])
               for t in ts):
            return dtype
    return torch.uint8


def _host_copy_rate() -> float:
    """Bytes/s of a RAM copy, measured once (a first estimate for host reloads)."""
    a = torch.empty(16 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    start = time.perf_counter()
    b.copy_(a)
    return a.numel() / max(time.perf_counter() - start, 1e-6)


def _matmul_rate(dtype: torch.dtype) -> float:
    """FLOP/s of a mid-sized matmul on this machine (a first estimate for recompute)."""
    dtype = dtype if dtype in (torch.float32, torch.float64, torch.bfloat16) else torch.float32
    a = torch.randn(256, 256, dtype=torch.float32).to(dtype)
    a @ a
    start = time.perf_counter()
    for _ in range(4):
        a @ a
    return 4 * 2 * 256 ** 3 / max(time.perf_counter() - start, 1e-6)
