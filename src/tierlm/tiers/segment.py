"""The disk tier: cached KV blocks in append-only segment files, durable across crashes.

Directory layout (private to the user: 0700 directory, 0600 files):
  lock                  held with flock by the one process that owns the directory
  layout-<id>.json      what a payload holds: the model, one entry per (layer, stream) with its
                        dtype, shape, offset and size; <id> is the sha256 of the file's content
  usage.json            counters accumulated by the engines that used the directory
  used.json             when each segment was last written or read, saved at close (LRU eviction)
  rates.json            the disk's read rate, each model's prefill rate and each remote store's
                        read rate, as engines learned them here (the reload-or-recompute policy
                        starts from them)
  seg-<n>.log           records, appended; a new segment starts past `SEGMENT_BYTES`. Block
                        records and resume records go to different open segments, so the
                        blocks of a prefix lie one after another

A record holds a run of chained blocks of one prefix (all integers little-endian):
  magic      8 B   b"TLMKVREC"
  version    u16   FORMAT_VERSION
  n_blocks   u16
  payload    u64   payload bytes (all blocks)
  fingerprint 32 B root of the engine's prefix-hash chain (model, layout, dtypes)
  layout     32 B  id of the layout file describing a block's payload
  created    f64   unix time
  crc        u64   xxh3-64 of the payload
  n_blocks x (hash 32 B = sha256(parent || tokens as int64), parent 32 B, n_tokens u16, nbytes u64)
  tokens     every block's n_tokens x i64, in block order
  hcrc       u64   xxh3-64 of everything above
  payload    the blocks' payloads, in block order

Durability: a record counts only when it is whole and both checksums match, so a process
killed mid-append leaves a tail that the next start truncates; appends are fsynced before
the blocks are reported as stored. A block is indexed only if sha256(parent || tokens) is its
key; every read re-checks, from the bytes just read, the header checksum, the key, the
fingerprint and the payload checksum. A corrupted record is dropped and counted; its blocks
are then simply recomputed. Many blocks per record keep the per-record work (two checksums,
a few comparisons) small against the bytes read, so a reload runs near the disk's speed
even for small blocks. Imports no torch (`tierlm cache` uses it).
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import hashlib
import json
import mmap
import os
import struct
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from itertools import accumulate
from operator import attrgetter
from pathlib import Path

import xxhash

from ..errors import TierlmError

MAGIC = b"TLMKVREC"
FORMAT_VERSION = 3                             # 3: xxh3-64 checksums (2: crc32, 30x slower to check)
HEAD = struct.Struct("<8sHHQ32s32sdQ")       # fixed part of a record header
SUM = struct.Struct("<Q")                      # the header checksum that ends a header
BLOCK = struct.Struct("<32s32sHQ")            # one block's entry in the header: hash, parent, n_tokens, nbytes
FP_AT = 20                                     # offset of the fingerprint in the header
SEGMENT_BYTES = 64 << 20
RUN_BYTES = 8 << 20                            # a record's payload stays under this (unless one block is larger)
DEFAULT_TTL_S = 6 * 3600
READ_BYTES = 1 << 20                           # one read of a staged reload
HEADER_GUESS = 16 << 10                        # read at once when scanning a header (RUN_BLOCKS' fit)
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024    # buffers one preadv takes


class Staging:
    """Memory a synchronous reload reads into, reused across reloads: on this machine the
    first touch of fresh pages costs about as much as reading them from disk. It is anonymous
    mapped memory advised to use 2 MiB pages; `reserve` faults it in ahead of time (an
    engine reserves what its largest reload needs when it starts), so that even a fresh
    engine's first reload does not pay for it. A view handed out stays valid until the next
    `take`; a very large one is not kept."""

    KEEP = 256 << 20
    PAGE = 2 << 20

    def __init__(self):
        self.buf: mmap.mmap | bytearray = bytearray()

    def reserve(self, n: int) -> None:
        """Have at least min(n, KEEP) bytes mapped and faulted in now."""
        n = min(n, self.KEEP)
        if n > len(self.buf):
            self._map(n)
            view = memoryview(self.buf)
            view[::4096] = bytes(len(view[::4096]))    # one write per page faults it in
            view.release()

    def take(self, n: int) -> memoryview:
        if n > len(self.buf):                  # earlier views keep the old mapping alive
            self._map(n)
        view = memoryview(self.buf)[:n]
        if n > self.KEEP:
            self.buf = bytearray()
        return view

    def _map(self, n: int) -> None:
        self.buf = mmap.mmap(-1, -(-n // self.PAGE) * self.PAGE)
        if hasattr(self.buf, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            self.buf.madvise(mmap.MADV_HUGEPAGE)


@dataclass(slots=True, eq=False)          # compared by identity: a reload scans thousands of lists of them
class Entry:
    """Where one block lies: in the record at `offset` (`length` bytes, header `head` bytes,
    payload crc `crc`), entry `slot` of its header, payload bytes [at, at + size) of the record's.
    `record` is (segment, offset), one object shared by the record's blocks: a reload groups
    thousands of blocks by it."""
    segment: int
    offset: int
    length: int
    head: int
    slot: int
    at: int
    size: int
    fingerprint: bytes
    parent: bytes
    layout: bytes
    tokens: tuple[int, ...]
    created: float
    crc: int
    hcrc: int
    record: tuple[int, int]
    count: int                 # blocks in the record


class DirectoryInUse(TierlmError):
    pass


def encode_record(fingerprint: bytes, layout: bytes, blocks, created: float | None = None) -> tuple[bytes, list]:
    """(header bytes, payloads) of one record; `blocks` are (key, parent, tokens, payload)."""
    payloads = [p for *_, p in blocks]
    crc = xxhash.xxh3_64()
    for p in payloads:
        crc.update(p)
    head = HEAD.pack(MAGIC, FORMAT_VERSION, len(blocks), sum(len(p) for p in payloads), fingerprint, layout,
                     time.time() if created is None else created, crc.intdigest())
    head += b"".join(BLOCK.pack(k, parent, len(t), len(p)) for k, parent, t, p in blocks)
    tokens = [t for _, _, ts, _ in blocks for t in ts]
    head += struct.pack(f"<{len(tokens)}q", *tokens)
    return head + SUM.pack(checksum(head)), payloads


def checksum(data) -> int:
    """The records' checksum: xxh3-64, about 30x faster than zlib's crc32 here, so checking
    a reload costs little next to reading it."""
    return xxhash.xxh3_64_intdigest(data)


def parse_header(buf, at: int) -> tuple[dict, list[tuple], int] | None:
    """(fields, blocks as (key, parent, tokens, nbytes, keyed), header length) of the record
    at buf[at:]; None if the header is not whole or not valid. `keyed`: the block's key is
    sha256(parent || its token ids), `runtime.blocks.block_hash`, hashed here straight from the
    header's int64 token bytes (packing the ids again cost 4x as much as the hash)."""
    if len(buf) - at < HEAD.size:
        return None
    magic, version, n, plen, fp, layout, created, crc = HEAD.unpack_from(buf, at)
    if magic != MAGIC or version != FORMAT_VERSION:
        return None
    tok_at = at + HEAD.size + n * BLOCK.size
    if len(buf) < tok_at:
        return None
    entries = list(BLOCK.iter_unpack(memoryview(buf)[at + HEAD.size:tok_at]))
    ntok = sum(e[2] for e in entries)
    end = tok_at + 8 * ntok
    if len(buf) < end + SUM.size:
        return None
    (hcrc,) = SUM.unpack_from(buf, end)
    if checksum(memoryview(buf)[at:end]) != hcrc:
        return None
    tokens = struct.unpack_from(f"<{ntok}q", buf, tok_at)
    raw, sha256 = memoryview(buf)[tok_at:end], hashlib.sha256
    blocks, t = [], 0
    for key, parent, nt, nbytes in entries:
        h = sha256(parent)
        h.update(raw[8 * t:8 * (t + nt)])
        blocks.append((key, parent, tokens[t:t + nt], nbytes, h.digest() == key))
        t += nt
    return ({"payload": plen, "fingerprint": fp, "layout": layout, "created": created, "crc": crc, "hcrc": hcrc},
            blocks, end + SUM.size - at)


class SegmentStore:
    """Blocks on disk under a byte budget and a retention TTL; the least recently used
    segments (written or read) are evicted first."""

    def __init__(self, path: str | os.PathLike, budget_bytes: int, ttl_s: float = DEFAULT_TTL_S,
                 read_only: bool = False):
        self.path = Path(path)
        self.budget, self.ttl, self.read_only = budget_bytes, ttl_s, read_only
        self.index: dict[bytes, Entry] = {}
        self.segments: dict[int, int] = {}        # segment number -> bytes
        self.open: dict[str, int] = {}            # stream -> the segment it appends to (this run)
        self.used: dict[int, float] = {}          # segment number -> last write or read (unix time)
        self.corrupt = 0
        self.stale = 0                             # segments of another format version, dropped
        self.full = False                          # a write hit ENOSPC: no more writes this run
        # the engine reads while its background writer appends and evicts: one lock for the index
        self._mu = threading.RLock()
        self._lock = None
        if read_only:
            if not self.path.is_dir():
                raise TierlmError(f"{self.path} is not a tierlm cache directory")
        else:
            try:
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(self.path, 0o700)
            except OSError as e:
                raise TierlmError(f"cannot use {self.path} as a cache directory: {e.strerror or e}") from None
            self._take_lock()
        self._scan()
        if not read_only:
            self.evict()

    # ------------------------------------------------------------------ ownership
    def _take_lock(self) -> None:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DirectoryInUse(f"cache directory {self.path} is in use by process {other}; give each engine "
                                 "its own --cache-dir") from None
        try:                                       # the owner's pid, for the message above
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass
        self._lock = fd

    def close(self) -> None:
        """Record when each segment was last used (for LRU eviction across runs) and release
        the directory."""
        if self._lock is not None:
            try:
                with self._mu:
                    used = json.dumps({str(n): t for n, t in self.used.items()}).encode()
                self._atomic_write(self.path / "used.json", used)
            except OSError:
                pass
            os.close(self._lock)
            self._lock = None

    # ------------------------------------------------------------------ index
    def _segment_path(self, n: int) -> Path:
        return self.path / f"seg-{n:08d}.log"

    def _scan(self) -> None:
        """Rebuild the index from the segments' record headers (payloads are not read: a
        cache directory may hold far more than RAM, and each read verifies what it reads);
        cut each segment after its last whole record."""
        for f in sorted(self.path.glob("seg-*.log")):
            try:
                n = int(f.stem[4:])
            except ValueError:
                continue
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                if hasattr(os, "posix_fadvise"):       # headers only: no read-ahead of the payloads
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                if self._other_version(f, os.pread(fd, HEAD.size, 0)):
                    continue
                at = 0
                while at < size:
                    parsed = _header_at(fd, at)
                    if parsed is None:
                        break
                    head, blocks, hlen = parsed
                    length = hlen + head["payload"]
                    if at + length > size or sum(b[3] for b in blocks) != head["payload"]:
                        break
                    self._index_record(n, at, length, hlen, head, blocks)
                    at += length
            finally:
                os.close(fd)
            if at < size:                          # a torn or corrupted tail
                self.corrupt += 1
                if not self.read_only:
                    with open(f, "r+b") as fh:
                        fh.truncate(at)
                        os.fsync(fh.fileno())
            self.segments[n] = at
        stamps = {e.segment: e.created for e in sorted(self.index.values(), key=lambda e: e.created)}
        try:                                       # last reads of earlier runs
            seen = {int(k): float(v) for k, v in json.loads((self.path / "used.json").read_text()).items()}
        except (OSError, ValueError, AttributeError):
            seen = {}
        self.used = {n: max(stamps.get(n, 0.0), seen.get(n, 0.0)) for n in self.segments}

    def _other_version(self, f: Path, buf: bytes) -> bool:
        """A segment written by another format version is not ours to read or repair: it is
        removed (said once; its blocks are recomputed when needed), or left alone read-only."""
        if len(buf) < HEAD.size or buf[:len(MAGIC)] != MAGIC:
            return False
        version = struct.unpack_from("<H", buf, len(MAGIC))[0]
        if version == FORMAT_VERSION:
            return False
        if not self.read_only:
            f.unlink(missing_ok=True)
        if not self.stale:
            warnings.warn(f"{self.path}: cached blocks in record format {version} (this tierlm writes "
                          f"{FORMAT_VERSION}) are {'ignored' if self.read_only else 'removed'}; they are "
                          "recomputed when needed", UserWarning, stacklevel=2)
        self.stale += 1
        return True

    def _index_record(self, n: int, at: int, length: int, hlen: int, head: dict, blocks) -> None:
        off, record = 0, (n, at)
        for slot, (key, parent, tokens, nbytes, keyed) in enumerate(blocks):
            if not keyed:
                self.corrupt += 1                       # whole, but its tokens do not make its key
            else:
                self.index[key] = Entry(n, at, length, hlen, slot, off, nbytes, head["fingerprint"], parent,
                                        head["layout"], tuple(tokens), head["created"], head["crc"], head["hcrc"],
                                        record, len(blocks))
            off += nbytes

    def has(self, key: bytes) -> bool:
        return key in self.index

    def nbytes(self) -> int:
        with self._mu:
            return sum(self.segments.values())

    # ------------------------------------------------------------------ layouts
    def put_layout(self, layout: dict) -> bytes:
        body = json.dumps(layout, sort_keys=True).encode()
        lid = hashlib.sha256(body).digest()
        f = self.path / f"layout-{lid.hex()}.json"
        if not f.is_file():
            self._atomic_write(f, body)
        return lid

    def layout(self, lid: bytes) -> dict | None:
        f = self.path / f"layout-{lid.hex()}.json"
        try:
            body = f.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(body).digest() != lid:
            return None
        return json.loads(body)

    def _atomic_write(self, f: Path, body: bytes) -> None:
        tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, f)

    # ------------------------------------------------------------------ writes
    def put(self, fingerprint: bytes, key: bytes, parent: bytes, layout: bytes, tokens, payload,
            stream: str = "blocks") -> bool:
        """Append one block as its own record (see `put_run`)."""
        return self.put_run(fingerprint, layout, [(key, parent, tokens, payload)], stream)

    def put_run(self, fingerprint: bytes, layout: bytes, blocks, stream: str = "blocks") -> bool:
        """Append blocks (key, parent, tokens, payload) as one record to the open segment of
        `stream` (records of one stream stay adjacent, so a prefix reads back in one mapping);
        blocks already held are left out. False when nothing was written because the disk is
        full (then no further writes are tried)."""
        with self._mu:
            blocks = [b for b in blocks if b[0] not in self.index]
            if self.read_only or self.full or not blocks:
                return False
            head, payloads = encode_record(fingerprint, layout, blocks)
            size = len(head) + sum(len(p) for p in payloads)
            n = self.open.get(stream)
            if n is None or self.segments.get(n, SEGMENT_BYTES) + size > SEGMENT_BYTES:
                n = self.open[stream] = max(self.segments, default=0) + 1
                self.segments[n] = 0
            f = self._segment_path(n)
            at = self.segments[n]
            try:
                fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    os.pwritev(fd, [head, *payloads], at)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                try:                                    # drop what may have been written
                    with open(f, "r+b") as fh:
                        fh.truncate(at)
                except OSError:
                    pass
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    self.full = True
                    return False
                raise
            self.segments[n] = at + size
            self.used[n] = time.time()
            fields, entries, _ = parse_header(head, 0)
            self._index_record(n, at, size, len(head), fields, entries)
            if self.nbytes() > self.budget:
                self.evict()
            return True

    def evict(self) -> None:
        """Drop whole segments, least recently used first, while over budget or unused for
        longer than the TTL (the segment being written is kept unless it alone is over budget;
        a segment with no valid block counts as never used)."""
        with self._mu:
            now = time.time()
            for n in sorted(self.segments, key=lambda n: self.used.get(n, 0.0)):
                expired = now - self.used.get(n, 0.0) > self.ttl
                if not (self.nbytes() > self.budget or expired) or (n in self.open.values() and not expired
                                                                     and self.segments[n] <= self.budget):
                    continue
                self._drop_segment(n)

    def _drop_segment(self, n: int) -> None:
        for k in [k for k, e in self.index.items() if e.segment == n]:
            del self.index[k]
        self.segments.pop(n, None)
        self.used.pop(n, None)
        self.open = {k: v for k, v in self.open.items() if v != n}
        try:
            self._segment_path(n).unlink()
        except FileNotFoundError:
            pass

    def usage(self) -> dict:
        """Counters the engines that used this directory accumulated (usage.json)."""
        try:
            return json.loads((self.path / "usage.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def rates(self) -> dict[str, float]:
        """Rates engines learned on this machine (rates.json): name -> units per second; a
        damaged file, or a value that is not a positive number, is ignored."""
        try:
            got = json.loads((self.path / "rates.json").read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(got, dict):
            return {}
        return {k: float(v) for k, v in got.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")}

    def put_rates(self, rates: dict[str, float]) -> None:
        """Record learned rates (atomically replaced), keeping the others'."""
        self._atomic_write(self.path / "rates.json", json.dumps({**self.rates(), **rates}, sort_keys=True).encode())

    def add_usage(self, counts: dict) -> None:
        """Add an engine's counters to usage.json (atomically replaced)."""
        total = self.usage()
        for k, v in counts.items():
            if isinstance(v, dict):
                sub = total.setdefault(k, {})
                for kk, vv in v.items():
                    sub[kk] = sub.get(kk, 0) + vv
            else:
                total[k] = total.get(k, 0) + v
        self._atomic_write(self.path / "usage.json", json.dumps(total).encode())

    def clear(self) -> None:
        with self._mu:
            for n in list(self.segments):
                self._drop_segment(n)
            for f in [*self.path.glob("layout-*.json"), *(self.path / n for n in ("usage.json", "used.json", "rates.json"))]:
                f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reads
    def _by_record(self, keys: list[bytes]) -> dict[tuple[int, int], list[tuple[int, Entry]]]:
        """record -> [(i, block)] of the keys held, in key order. A run of keys that is a
        whole record in slot order (how a prefix comes back) is taken in one slice."""
        wanted: dict[tuple[int, int], list[tuple[int, Entry]]] = {}
        entries = list(map(self.index.get, keys))
        i, end = 0, len(keys)
        while i < end:
            e = entries[i]
            if e is None:
                i += 1
                continue
            rec, n = e.record, e.count
            chunk = entries[i:i + n]
            if (e.slot == 0 and n > 1 and rec not in wanted and len(chunk) == n and None not in chunk
                    and list(map(_RECORD, chunk)).count(rec) == n):
                wanted[rec] = list(zip(range(i, i + n), chunk))
                i += n
                continue
            group = wanted.get(rec)
            if group is None:
                wanted[rec] = [(i, e)]
            else:
                group.append((i, e))
            i += 1
        return wanted

    def read_into(self, keys: list[bytes], fingerprint: bytes, staging: Staging, dests: list[list] | None = None,
                  rows: tuple[memoryview, int] | None = None) -> list[bool]:
        """Read blocks straight into their destinations, so that a reload copies nothing
        after the read: either dests[i], writable buffers that take block keys[i]'s payload in
        order (its page of every stream of a CPU pool), or rows = (buffer, size), block i into
        buffer[i * size:(i + 1) * size] (blocks that follow each other both in a record and in
        the buffer are then one piece: a reload of small blocks costs a few buffers per record,
        not one per block). One `preadv` series per record; its header and the blocks no one
        asked for land in `staging`. Each record is verified from the bytes just read, as
        `get_many` does. False where a block is missing, of another size or not intact: its
        destination then holds no valid block."""
        with self._mu:
            ok = [False] * len(keys)
            wanted = self._by_record(keys)
            now, fds = time.time(), {}
            try:
                for rec in sorted(wanted):
                    blocks = wanted[rec]
                    e0 = blocks[0][1]
                    whole = rows is not None and _whole(blocks, rows[1])   # the record is one piece of rows
                    if whole:
                        i0, n = blocks[0][0], len(blocks)
                        head, parts = staging.take(e0.head), [rows[0][i0 * rows[1]:(i0 + n) * rows[1]]]
                    else:
                        blocks, head, parts = _pieces(blocks, staging, dests, rows)
                    self.used[e0.segment] = now
                    fd = fds.get(e0.segment)
                    if fd is None:
                        fd = fds[e0.segment] = self._open(e0.segment)
                    if fd is not None and _read_hashed(fd, e0.offset, head, parts) == e0.crc and _head_ok(head, e0, fingerprint):
                        if whole:
                            ok[i0:i0 + n] = [True] * n
                        else:
                            for i, _ in blocks:
                                ok[i] = True
                    else:
                        for i, _ in wanted[rec]:
                            self.corrupt += 1
                            self.index.pop(keys[i], None)
            finally:
                for fd in fds.values():
                    if fd is not None:
                        os.close(fd)
            return ok

    def _open(self, segment: int) -> int | None:
        try:
            return os.open(self._segment_path(segment), os.O_RDONLY)
        except OSError:
            return None

    def get_many(self, keys: list[bytes], fingerprint: bytes, staging: Staging | None = None) -> list[memoryview | None]:
        """Payloads of keys (None where missing or corrupt): one read per run of adjacent
        records, each record verified once from the bytes read (`_intact`). With `staging`
        the runs are read into its reused memory (the views stay valid until its next use);
        without, mapped (the views own their pages)."""
        with self._mu:
            out: list[memoryview | None] = [None] * len(keys)
            wanted = self._by_record(keys)
            runs: list[list[list[tuple[int, Entry]]]] = []
            last = None
            for rec in sorted(wanted):
                e = wanted[rec][0][1]
                if last is not None and last.segment == e.segment and last.offset + last.length == e.offset:
                    runs[-1].append(wanted[rec])
                else:
                    runs.append([wanted[rec]])
                last = e
            now = time.time()
            spans = [(r[0][0][1], r[-1][0][1].offset + r[-1][0][1].length) for r in runs]
            into = staging.take(sum(end - first.offset for first, end in spans)) if staging is not None else None
            for run, (first, end) in zip(runs, spans):
                self.used[first.segment] = now
                if into is None:
                    view = self._map(first.segment, first.offset, end)
                    fill, close = (lambda n: True), (lambda: None)
                else:
                    view, into = into[:end - first.offset], into[end - first.offset:]
                    fill, close = self._reader(first.segment, first.offset, view)
                try:
                    for blocks in run:
                        e0 = blocks[0][1]
                        at = e0.offset - first.offset
                        body = at + e0.head
                        if fill(at + e0.length) and self._intact(view, at, e0, fingerprint):
                            for i, e in blocks:
                                out[i] = view[body + e.at:body + e.at + e.size]      # no copy
                        else:
                            for i, _ in blocks:
                                self.corrupt += 1
                                self.index.pop(keys[i], None)
                finally:
                    close()
            return out

    def _reader(self, segment: int, start: int, out: memoryview):
        """(fill, close): fill(n) reads the segment from `start` into out[:n], 1 MiB at a
        time, so that checking one record overlaps the kernel's read-ahead of the next; it
        says whether out[:n] now holds those bytes (not if the file is gone or short)."""
        try:
            fd = os.open(self._segment_path(segment), os.O_RDONLY)
        except OSError:
            return (lambda n: False), (lambda: None)
        done = 0

        def fill(n: int) -> bool:
            nonlocal done
            while done < n:
                try:
                    got = os.preadv(fd, [out[done:done + READ_BYTES]], start + done)
                except OSError:
                    got = 0
                if got <= 0:
                    return False
                done += got
            return True

        return fill, lambda: os.close(fd)

    def _map(self, segment: int, start: int, end: int) -> memoryview:
        """Bytes [start, end) of a segment, mapped copy-on-write (writable for torch, never
        written back) rather than read into a fresh buffer: no allocation, no zero-fill, and
        the OS reads the range ahead (MADV_WILLNEED). Empty if the file is gone or short."""
        try:
            with open(self._segment_path(segment), "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size == 0:
                    return memoryview(b"")
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):
            return memoryview(b"")
        end = min(end, size)
        if start >= end:
            return memoryview(b"")
        page = mmap.PAGESIZE
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_WILLNEED, start // page * page, end - start // page * page)
        return memoryview(mm)[start:end]

    @staticmethod
    def _intact(view: memoryview, at: int, e: Entry, fingerprint: bytes) -> bool:
        """The record at view[at:] as read now: whole, its header the one indexed (the same
        checksum, which covers every key and token id, checked against each other when
        indexed) and intact, fingerprint as expected, payload checksum."""
        if at + e.length > len(view):
            return False
        head_end = at + e.head - SUM.size
        (hcrc,) = SUM.unpack_from(view, head_end)
        return (hcrc == e.hcrc and checksum(view[at:head_end]) == hcrc
                and view[at + FP_AT:at + FP_AT + 32] == fingerprint
                and checksum(view[at + e.head:at + e.length]) == e.crc)

    def verify(self) -> tuple[int, int]:
        """(good, bad) blocks, every record's checksums and every key re-checked against the file."""
        with self._mu:
            by_fp: dict[bytes, list[bytes]] = {}
            for key, e in self.index.items():
                by_fp.setdefault(e.fingerprint, []).append(key)
            good = sum(p is not None for fp, keys in by_fp.items() for p in self.get_many(keys, fp))
            return good, sum(map(len, by_fp.values())) - good


def _header_at(fd: int, at: int) -> tuple[dict, list[tuple], int] | None:
    """`parse_header` of the record at offset `at` of a file, reading only its header: a
    guess first, then exactly as much as the block count and the token counts say."""
    buf = os.pread(fd, HEADER_GUESS, at)
    if len(buf) >= HEAD.size:
        tok_at = HEAD.size + HEAD.unpack_from(buf)[2] * BLOCK.size
        if len(buf) < tok_at:
            buf = os.pread(fd, tok_at, at)
        if len(buf) >= tok_at:
            end = tok_at + 8 * sum(e[2] for e in BLOCK.iter_unpack(buf[HEAD.size:tok_at])) + SUM.size
            if len(buf) < end:
                buf = os.pread(fd, end, at)
    return parse_header(buf, 0)


def _read_hashed(fd: int, offset: int, head, parts: list) -> int | None:
    """Read a record's header into `head` and its payload into `parts`, in order, from the
    file at `offset`; the payload's xxh3-64, or None if the file is short or unreadable. The
    reads go about READ_BYTES at a time (IOV_MAX buffers at most) and each batch is hashed
    right after it arrives, while it is still in the CPU's cache (hashing the payload after
    reading all of it ran at a tenth of the speed here). Pages of small models are a few
    hundred bytes, so the work per buffer stays in C (map, accumulate, bisect)."""
    views = [head, *parts]
    lens = list(map(len, views))
    if max(lens) > READ_BYTES:                      # split very large buffers into batches
        views = [v[a:a + READ_BYTES] for v, n in zip(views, lens) for a in range(0, max(n, 1), READ_BYTES)]
        lens = list(map(len, views))
    ends = list(accumulate(lens))
    crc, i, done = xxhash.xxh3_64(), 0, 0
    while i < len(views):
        j = min(max(bisect.bisect_right(ends, done + READ_BYTES, i), i + 1), i + IOV_MAX)
        if not _fill(fd, offset + done, views[i:j], ends[j - 1] - done):
            return None
        done = ends[j - 1]
        deque(map(crc.update, views[max(i, 1):j]), maxlen=0)
        i = j
    return crc.intdigest()


def _fill(fd: int, offset: int, batch: list, want: int) -> bool:
    """Fill the buffers of `batch` (`want` bytes in all) from the file at `offset`: one
    preadv, continued where a short read stopped."""
    try:
        got = os.preadv(fd, batch, offset)
    except OSError:
        return False
    if got == want:
        return True
    k = 0
    while True:
        if got <= 0:
            return False
        offset, want = offset + got, want - got
        while k < len(batch) and got >= len(batch[k]):
            got -= len(batch[k])
            k += 1
        if k == len(batch) or want == 0:
            return True
        batch = [batch[k][got:], *batch[k + 1:]]
        k = 0
        try:
            got = os.preadv(fd, batch, offset)
        except OSError:
            return False


_RECORD, _SLOT, _SIZE = attrgetter("record"), attrgetter("slot"), attrgetter("size")


def _whole(blocks: list[tuple[int, Entry]], size: int) -> bool:
    """Whether blocks [(i, entry)] are all of one record, in slot order, at consecutive i,
    each `size` bytes: its whole payload is then one piece of consecutive rows."""
    e0, n = blocks[0][1], len(blocks)
    if n != e0.count or blocks[-1][0] - blocks[0][0] != n - 1 or e0.length - e0.head != n * size:
        return False
    entries = [e for _, e in blocks]
    return list(map(_SLOT, entries)) == list(range(n)) and list(map(_SIZE, entries)).count(size) == n


def _pieces(blocks: list[tuple[int, Entry]], staging: Staging, dests, rows):
    """(blocks taken, header buffer, payload pieces in order) of one record's `read_into`:
    each block's destinations (dests[i], or rows, consecutive ones merged), and `staging`
    for the header and the bytes no one takes."""
    blocks = sorted(blocks, key=lambda b: b[1].slot)
    e0 = blocks[0][1]
    if rows is None:
        blocks = [(i, e) for i, e in blocks if sum(map(len, dests[i])) == e.size]
    else:
        blocks = [(i, e) for i, e in blocks if e.size == rows[1]]
    blocks = [b for j, b in enumerate(blocks) if j == 0 or b[1] is not blocks[j - 1][1]]   # asked twice: once
    parts, skipped, at = [], [], 0       # the payload's pieces in order; the bytes no one takes
    run = None                           # rows: [first row, rows] of the last piece
    for i, e in blocks:
        if e.at > at:
            skipped.append((len(parts), e.at - at))
            parts.append(None)
            run = None
        if rows is None:
            parts += dests[i]
        elif run is not None and run[0] + run[1] == i:
            run[1] += 1
        else:
            run = [i, 1]
            parts.append(run)
        at = e.at + e.size
    if e0.length - e0.head > at:
        skipped.append((len(parts), e0.length - e0.head - at))
        parts.append(None)
    if rows is not None:
        buf, size = rows
        parts = [buf[p[0] * size:(p[0] + p[1]) * size] if p is not None else None for p in parts]
    spare = staging.take(e0.head + sum(n for _, n in skipped))
    head, spare = spare[:e0.head], spare[e0.head:]
    for j, n in skipped:
        parts[j], spare = spare[:n], spare[n:]
    return blocks, head, parts


def _head_ok(head, e: Entry, fingerprint: bytes) -> bool:
    """A record's header as read now: the one indexed (the same checksum, which covers every
    key and token id, checked against each other when indexed), intact, fingerprint as expected."""
    (hcrc,) = SUM.unpack_from(head, e.head - SUM.size)
    return hcrc == e.hcrc and checksum(head[:e.head - SUM.size]) == hcrc and head[FP_AT:FP_AT + 32] == fingerprint
