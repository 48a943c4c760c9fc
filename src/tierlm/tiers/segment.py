"""The disk tier: cached KV blocks in append-only segment files, durable across crashes.

Directory layout (private to the user: 0700 directory, 0600 files):
  lock                  held with flock by the one process that owns the directory
  layout-<id>.json      what a payload holds: the model, one entry per (layer, stream) with its
                        dtype, shape, offset and size; <id> is the sha256 of the file's content
  usage.json            counters accumulated by the engines that used the directory
  seg-<n>.log           records, appended; a new segment starts past `SEGMENT_BYTES`. Block
                        records and resume records go to different open segments, so the
                        blocks of a prefix lie one after another

A record (all integers little-endian):
  magic      8 B   b"TLMKVREC"
  version    u16   FORMAT_VERSION
  n_tokens   u16
  payload    u64   payload bytes
  fingerprint 32 B root of the engine's prefix-hash chain (model, layout, dtypes)
  hash       32 B  this block's prefix hash = sha256(parent || tokens as int64)
  parent     32 B  the previous block's hash (the fingerprint for block 0)
  layout     32 B  id of the layout file describing the payload
  created    f64   unix time
  crc        u32   crc32 of the payload
  tokens     n_tokens x i64
  hcrc       u32   crc32 of everything above
  payload

Durability: a record counts only when it is whole and both checksums match, so a process
killed mid-append leaves a tail that the next start truncates; appends are fsynced before
the block is reported as stored. A record is indexed only if sha256(parent || tokens) is its
key; every read re-checks, from the bytes just read, the header checksum, the key, the
fingerprint and the payload checksum. A corrupted record is dropped and
counted; the block is then simply recomputed. Imports no torch (`tierlm cache` uses it).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import TierlmError
from ..runtime.blocks import block_hash

MAGIC = b"TLMKVREC"
FORMAT_VERSION = 1
HEAD = struct.Struct("<8sHHQ32s32s32s32sdI")          # fixed part of a record header
FP_AT, KEY_AT = 20, 52                                 # offsets of the fingerprint and the key in it
SEGMENT_BYTES = 64 << 20
DEFAULT_TTL_S = 6 * 3600


@dataclass
class Entry:
    segment: int
    offset: int           # of the record
    length: int           # whole record
    payload_at: int       # offset of the payload within the record
    fingerprint: bytes
    parent: bytes
    layout: bytes
    tokens: tuple[int, ...]
    created: float
    crc: int


class DirectoryInUse(TierlmError):
    pass


def encode_record(fingerprint: bytes, key: bytes, parent: bytes, layout: bytes, tokens, payload,
                  created: float | None = None) -> tuple[bytes, bytes]:
    """(header bytes, payload) of one record."""
    head = HEAD.pack(MAGIC, FORMAT_VERSION, len(tokens), len(payload), fingerprint, key, parent, layout,
                     time.time() if created is None else created, zlib.crc32(payload))
    head += struct.pack(f"<{len(tokens)}q", *tokens)
    return head + struct.pack("<I", zlib.crc32(head)), payload


def parse_header(buf: bytes, at: int) -> tuple[dict, int] | None:
    """The header fields of the record at buf[at:] and its header length; None if not whole/valid."""
    if len(buf) - at < HEAD.size:
        return None
    magic, version, n, plen, fp, key, parent, layout, created, crc = HEAD.unpack_from(buf, at)
    if magic != MAGIC or version != FORMAT_VERSION:
        return None
    end = at + HEAD.size + 8 * n
    if len(buf) < end + 4:
        return None
    (hcrc,) = struct.unpack_from("<I", buf, end)
    if zlib.crc32(buf[at:end]) != hcrc:
        return None
    tokens = struct.unpack_from(f"<{n}q", buf, at + HEAD.size)
    return ({"payload": plen, "fingerprint": fp, "hash": key, "parent": parent, "layout": layout,
             "created": created, "crc": crc, "tokens": tokens}, end + 4 - at)


class SegmentStore:
    """Blocks on disk under a byte budget and a retention TTL, oldest segments evicted first."""

    def __init__(self, path: str | os.PathLike, budget_bytes: int, ttl_s: float = DEFAULT_TTL_S,
                 read_only: bool = False):
        self.path = Path(path)
        self.budget, self.ttl, self.read_only = budget_bytes, ttl_s, read_only
        self.index: dict[bytes, Entry] = {}
        self.segments: dict[int, int] = {}        # segment number -> bytes
        self.open: dict[str, int] = {}            # stream -> the segment it appends to (this run)
        self.corrupt = 0
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
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # ------------------------------------------------------------------ index
    def _segment_path(self, n: int) -> Path:
        return self.path / f"seg-{n:08d}.log"

    def _scan(self) -> None:
        """Rebuild the index from the segments; cut each segment after its last whole record."""
        for f in sorted(self.path.glob("seg-*.log")):
            try:
                n = int(f.stem[4:])
            except ValueError:
                continue
            buf = f.read_bytes()
            at = 0
            while at < len(buf):
                parsed = parse_header(buf, at)
                if parsed is None:
                    break
                head, hlen = parsed
                length = hlen + head["payload"]
                if at + length > len(buf):
                    break
                if block_hash(head["parent"], head["tokens"]) != head["hash"]:
                    self.corrupt += 1                   # whole, but its tokens do not make its key
                else:
                    self.index[head["hash"]] = Entry(n, at, length, hlen, head["fingerprint"], head["parent"],
                                                     head["layout"], head["tokens"], head["created"], head["crc"])
                at += length
            if at < len(buf):                      # a torn or corrupted tail
                self.corrupt += 1
                if not self.read_only:
                    with open(f, "r+b") as fh:
                        fh.truncate(at)
                        os.fsync(fh.fileno())
            self.segments[n] = at

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
        """Append one record to the open segment of `stream` (records of one stream stay
        adjacent, so a prefix reads back in one pread); False when the disk is full (then no
        further writes are tried)."""
        with self._mu:
            if self.read_only or self.full or key in self.index:
                return False
            head, payload = encode_record(fingerprint, key, parent, layout, tokens, payload)
            n = self.open.get(stream)
            if n is None or self.segments.get(n, SEGMENT_BYTES) + len(head) + len(payload) > SEGMENT_BYTES:
                n = self.open[stream] = max(self.segments, default=0) + 1
                self.segments[n] = 0
            f = self._segment_path(n)
            at = self.segments[n]
            try:
                fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    os.pwrite(fd, head + bytes(payload), at)
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
            self.segments[n] = at + len(head) + len(payload)
            self.index[key] = Entry(n, at, len(head) + len(payload), len(head), fingerprint, parent, layout,
                                    tuple(tokens), time.time(), zlib.crc32(payload))
            if self.nbytes() > self.budget:
                self.evict()
            return True

    def evict(self) -> None:
        """Drop whole segments, oldest first, while over budget or older than the TTL (the
        segment being written is kept unless it alone is over budget)."""
        with self._mu:
            now = time.time()
            for n in sorted(self.segments):
                created = [e.created for e in self.index.values() if e.segment == n]
                expired = bool(created) and now - max(created) > self.ttl
                if not (self.nbytes() > self.budget or expired) or (n in self.open.values() and not expired
                                                                     and self.segments[n] <= self.budget):
                    continue
                self._drop_segment(n)

    def _drop_segment(self, n: int) -> None:
        for k in [k for k, e in self.index.items() if e.segment == n]:
            del self.index[k]
        self.segments.pop(n, None)
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
            for f in [*self.path.glob("layout-*.json"), self.path / "usage.json"]:
                f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reads
    def get_many(self, keys: list[bytes], fingerprint: bytes) -> list[memoryview | None]:
        """Payloads of keys (None where missing or corrupt): one mapping per run of adjacent
        records, each record verified from the bytes read (`_intact`)."""
        with self._mu:
            out: list[bytes | None] = [None] * len(keys)
            entries = [(i, self.index.get(k)) for i, k in enumerate(keys)]
            runs: list[list[tuple[int, Entry]]] = []
            for i, e in entries:
                if e is None:
                    continue
                last = runs[-1][-1][1] if runs else None
                if last is not None and last.segment == e.segment and last.offset + last.length == e.offset:
                    runs[-1].append((i, e))
                else:
                    runs.append([(i, e)])
            for run in runs:
                first, end = run[0][1], run[-1][1].offset + run[-1][1].length
                view = self._map(first.segment, first.offset, end)
                for i, e in run:
                    at = e.offset - first.offset
                    if not self._intact(view, at, e, keys[i], fingerprint):
                        self.corrupt += 1
                        self.index.pop(keys[i], None)
                        continue
                    out[i] = view[at + e.payload_at:at + e.length]      # no copy
            return out

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
    def _intact(view: memoryview, at: int, e: Entry, key: bytes, fingerprint: bytes) -> bool:
        """The record as read now: whole, header checksum, key and fingerprint as expected,
        payload checksum (the header's tokens were checked against the key when indexed)."""
        if at + e.length > len(view):
            return False
        head_end = at + e.payload_at - 4
        (hcrc,) = struct.unpack_from("<I", view, head_end)
        return (zlib.crc32(view[at:head_end]) == hcrc and view[at + KEY_AT:at + KEY_AT + 32] == key
                and view[at + FP_AT:at + FP_AT + 32] == fingerprint
                and zlib.crc32(view[at + e.payload_at:at + e.length]) == e.crc)

    def verify(self) -> tuple[int, int]:
        """(good, bad) records, every payload checksum and hash re-checked against the file."""
        with self._mu:
            good = bad = 0
            for key, e in list(self.index.items()):
                ok = self.get_many([key], e.fingerprint)[0] is not None
                good, bad = good + ok, bad + (not ok)
            return good, bad
