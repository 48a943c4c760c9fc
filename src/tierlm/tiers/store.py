"""Tiers under the engine's pools: a host-RAM LRU and the disk segment store, one stored
block = every cache stream of one prefix block (all layers, all groups: latent, indexer,
window, compressed entries, compressor state), keyed by the engine's prefix hash.

`save` snapshots a block the moment the engine names it (while every group still holds it:
window blocks are freed right after) into one contiguous uint8 payload, puts it in the host
tier and queues it for a background writer (write-through), so decode never waits on the
disk. `load` returns payloads from the host tier or the disk (verified, then promoted to
host); `restore` copies one group's part of a payload into freshly allocated pages.

Policy: a hit found only below the device is reloaded when the planner's cost model says
reloading beats recomputing: reload = the tier's latency + bytes / its read bandwidth, recompute =
prefill FLOPs of those positions (`tierlm.plan.planner.prefill_flops`) / this machine's
compute rate. Both rates are measured once at start and then learned from every reload and
prefill step the engine runs.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import TierlmError
from ..runtime.blocks import block_hash
from .segment import SegmentStore

TIERS = ("host", "disk")
DISK_READ_GUESS = 2e9      # bytes/s a disk reload is assumed to read at until one is measured
POLICIES = ("auto", "reload", "recompute")


class HostTier:
    """Payloads in RAM under a byte budget, least recently used evicted first."""

    def __init__(self, budget: int, pin: bool = False):
        self.budget, self.pin = budget, pin
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
            _, old = self.blocks.popitem(last=False)
            self.bytes -= old.numel()


class Rate:
    """An exponentially weighted estimate of a rate (units per second)."""

    def __init__(self, first: float):
        self.value = first

    def add(self, units: float, seconds: float) -> None:
        if seconds > 0 and units > 0:
            self.value = 0.7 * self.value + 0.3 * units / seconds


class TierStore:
    # seconds a reload pays before its first byte (a disk read's seek and syscalls), so that a
    # prefix of a block or two is recomputed: prefill cost and reload bytes both grow linearly
    LATENCY = {"host": 0.0, "disk": 2e-4}
    # besides the last block of every sequence, every RESUME_EVERY-th block stores what window
    # streams need to resume after it: a hit resumes at the longest such point
    RESUME_EVERY = 16

    def __init__(self, spec, pools, fingerprint: bytes, tiers=TIERS, cache_dir=None, host_bytes: int = 1 << 30,
                 disk_bytes: int = 64 << 30, policy: str = "auto", ttl_s: float | None = None):
        tiers = tuple(tiers)
        bad = [t for t in tiers if t not in TIERS]
        if bad:
            raise TierlmError(f"kv_tiers may name {', '.join(TIERS)}, got {bad[0]!r}")
        if policy not in POLICIES:
            raise TierlmError(f"tier_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if "disk" in tiers and cache_dir is None:
            raise TierlmError("the disk tier needs a cache_dir")
        for name, v in (("host_cache_bytes", host_bytes), ("disk_cache_bytes", disk_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TierlmError(f"{name} must be a non-negative integer, got {v!r}")
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
        device = next(iter(pools.pages.values())).device
        self.host = HostTier(host_bytes, pin=device.type == "cuda") if "host" in tiers else None
        self.disk = None
        if "disk" in tiers:
            kw = {} if ttl_s is None else {"ttl_s": ttl_s}
            self.disk = SegmentStore(Path(cache_dir), disk_bytes, **kw)
            try:
                self.layout_id = self.disk.put_layout(layout)
            except OSError as e:
                self.disk.full = True
                warnings.warn(f"cannot write to cache directory {cache_dir} ({e.strerror or e}): the disk tier "
                              "only serves what it already holds", RuntimeWarning, stacklevel=2)
        self.stats = {"reloads": 0, "recomputes": 0, "stored": 0, "disk_full": False}
        self.bandwidth = {"host": Rate(_host_copy_rate()), "disk": Rate(DISK_READ_GUESS)}
        self.flops = Rate(_matmul_rate(pools.dtype))
        self._queue: queue.Queue = queue.Queue()
        self._writer = None
        if self.disk is not None:
            self._writer = threading.Thread(target=self._write_loop, name="tierlm-disk-writer", daemon=True)
            self._writer.start()

    # ------------------------------------------------------------------ save
    def where(self, key: bytes) -> str | None:
        if self.host is not None and key in self.host.blocks:
            return "host"
        if self.disk is not None and self.disk.has(key):
            return "disk"
        return None

    def _pages(self, keys, block: int) -> list[torch.Tensor]:
        return [self.pools.pages[k][block].reshape(-1).view(torch.uint8) for k in keys]

    def _put(self, parent: bytes, key: bytes, tokens, parts: list[torch.Tensor], stream: str) -> None:
        payload = torch.cat(parts).cpu() if parts else torch.empty(0, dtype=torch.uint8)
        if self.host is not None:
            self.host.put(key, payload)
        if self.disk is not None and not self.disk.full:
            self._queue.put((parent, key, tuple(tokens), payload, stream))
        self.stats["stored"] += 1

    def save(self, parent: bytes, key: bytes, tokens, block0: int | None) -> None:
        """Snapshot the per-token pages of block `key` (physical block `block0` of group 0)."""
        if self.where(key) is None:
            self._put(parent, key, tokens, self._pages(self.keys_of[0], block0) if block0 is not None else [], "blocks")

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
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                parent, key, tokens, payload, stream = item
                if not self.disk.put(self.fingerprint, key, parent, self.layout_id, tokens, payload.numpy().data,
                                     stream):
                    if self.disk.full and not self.stats["disk_full"]:
                        self.stats["disk_full"] = True
                        warnings.warn(f"cache directory {self.disk.path} is full: new blocks are no longer "
                                      "written to disk (they are recomputed when needed)", RuntimeWarning,
                                      stacklevel=1)
            except Exception as e:                  # the writer must outlive any one bad write
                if not self.stats.get("disk_error"):
                    self.stats["disk_error"] = str(e)
                    warnings.warn(f"disk tier write failed ({e}); continuing without it", RuntimeWarning,
                                  stacklevel=1)
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued block is on disk."""
        if self._writer is not None:
            self._queue.join()

    def close(self, hit_tokens: dict[str, int] | None = None) -> None:
        """Finish queued writes, add this run's counters to the directory's usage.json, release it."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        if self.disk is not None and self.disk._lock is not None:
            try:
                self.disk.add_usage({"stored": self.stats["stored"], "reloads": self.stats["reloads"],
                                     "recomputes": self.stats["recomputes"], "hit_tokens": hit_tokens or {}})
            except OSError:
                pass
            self.disk.close()

    # ------------------------------------------------------------------ load
    def load(self, keys: list[bytes], sizes: list[int]) -> dict[bytes, tuple[str, torch.Tensor]]:
        """{key: (tier, payload)} for the keys a lower tier holds whose payload verifies and has
        the expected size."""
        out = {}
        missing = []
        for k, n in zip(keys, sizes):
            t = self.host.get(k) if self.host is not None else None
            if t is not None and t.numel() == n:
                out[k] = ("host", t)
            else:
                missing.append((k, n))
        if missing and self.disk is not None:
            self.flush()                            # a block may still be in the write queue
            start = time.perf_counter()
            got = self.disk.get_many([k for k, _ in missing], self.fingerprint)
            total = 0
            for (k, n), body in zip(missing, got):
                if body is not None and len(body) == n:
                    t = torch.frombuffer(body, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
                    out[k] = ("disk", t)
                    total += n
                    if self.host is not None:
                        self.host.put(k, t)
            self.bandwidth["disk"].add(total, time.perf_counter() - start)
        return out

    def restore(self, payload: torch.Tensor, block: int) -> None:
        """Copy a block record's pages into physical block `block` of group 0."""
        self._copy(payload, {0: [block]})

    def restore_resume(self, payload: torch.Tensor, spans: dict[int, list[int]]) -> None:
        """Copy a resume record into each window group's blocks `spans[g]` (the whole span,
        oldest first; -1 for a block the device already holds)."""
        self._copy(payload, {g: spans[g] for g in self.windows})

    def resume_bytes(self, spans: dict[int, int]) -> int:
        """Size of a resume record whose groups' spans have these numbers of blocks."""
        return sum(spans[g] * self.per_group[g] for g in self.windows)

    def _copy(self, payload: torch.Tensor, blocks: dict[int, list[int]]) -> None:
        at = 0
        for g, ids in blocks.items():
            for b in ids:
                for k in self.keys_of[g]:
                    if b >= 0:
                        page = self.pools.pages[k][b].view(-1).view(torch.uint8)
                        page.copy_(payload[at:at + self.sizes[k]].to(page.device, non_blocking=True))
                    at += self.sizes[k]

    # ------------------------------------------------------------------ policy
    def reload_wins(self, tier_bytes: dict[str, int], flops: float) -> bool:
        """Whether reading these bytes from their tiers is faster than `flops` of prefill."""
        if self.policy != "auto":
            return self.policy == "reload"
        reload = sum(self.LATENCY[t] + n / self.bandwidth[t].value for t, n in tier_bytes.items())
        return reload < flops / self.flops.value

    def recompute_flops(self, start: int, end: int) -> float:
        """Prefill FLOPs of positions [start, end) after `start` cached ones."""
        from ..plan.planner import prefill_flops
        return prefill_flops(self.spec, end) - prefill_flops(self.spec, start)

    def corrupt(self) -> int:
        """Records dropped because they failed verification (torn tails at start included)."""
        return self.disk.corrupt if self.disk is not None else 0

    def bytes_by_tier(self) -> dict[str, int]:
        return {"host": self.host.bytes if self.host is not None else 0,
                "disk": self.disk.nbytes() if self.disk is not None else 0}


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
