"""The disk tier's segment store (torch-free): format round trip, restart, permissions,
ownership, corruption of every kind, a full disk, eviction, and processes killed mid-write."""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from tierlm.errors import TierlmError
from tierlm.runtime.blocks import block_hash
from tierlm.tiers import segment
from tierlm.tiers.segment import SegmentStore

FP = bytes(range(32))


def blocks(n: int, size: int = 3000, fp: bytes = FP):
    """n chained blocks: (parent, key, tokens, payload), the payload derived from the key."""
    out, parent = [], fp
    for i in range(n):
        tokens = [i * 16 + t for t in range(16)]
        key = block_hash(parent, tokens)
        payload = (key * (size // 32 + 1))[:size]
        out.append((parent, key, tokens, payload))
        parent = key
    return out


def fill(store: SegmentStore, items, layout=b"L" * 32):
    for parent, key, tokens, payload in items:
        assert store.put(FP, key, parent, layout, tokens, payload)


def get(s: SegmentStore, keys, mode: str):
    """Payloads of keys (None where missing or corrupt) as `get_many` gives them, mapped or
    read into staging memory, or as `read_into` leaves them in destinations of three pieces."""
    if mode in ("mapped", "staged"):
        return s.get_many(keys, FP, segment.Staging() if mode == "staged" else None)
    if mode == "rows":
        buf = bytearray(3000 * len(keys))
        ok = s.read_into(keys, FP, segment.Staging(), rows=(memoryview(buf), 3000))
        return [bytes(buf[i * 3000:(i + 1) * 3000]) if good else None for i, good in enumerate(ok)]
    dests = [[bytearray(1000), bytearray(1500), bytearray(500)] for _ in keys]
    ok = s.read_into(keys, FP, segment.Staging(), dests=[list(map(memoryview, d)) for d in dests])
    return [b"".join(d) if good else None for d, good in zip(dests, ok)]


MODES = ["mapped", "staged", "direct", "rows"]


def test_round_trip_restart_and_permissions(tmp_path):
    d = tmp_path / "kv"
    items = blocks(20)
    s = SegmentStore(d, 1 << 30)
    fill(s, items)
    assert s.get_many([k for _, k, _, _ in items], FP) == [p for *_, p in items]
    s.close()
    again = SegmentStore(d, 1 << 30)                         # index rebuilt from the directory
    assert len(again.index) == 20 and again.corrupt == 0
    assert again.get_many([items[7][1], b"x" * 32], FP) == [items[7][3], None]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in d.iterdir())
    again.close()


def test_second_owner_is_refused(tmp_path):
    s = SegmentStore(tmp_path / "kv", 1 << 30)
    with pytest.raises(TierlmError, match=f"in use by process {os.getpid()}"):
        SegmentStore(tmp_path / "kv", 1 << 30)
    s.close()
    SegmentStore(tmp_path / "kv", 1 << 30).close()          # free again once released


def test_torn_tail_is_cut_at_start(tmp_path):
    d = tmp_path / "kv"
    items = blocks(5)
    s = SegmentStore(d, 1 << 30)
    fill(s, items)
    s.close()
    seg = next(d.glob("seg-*.log"))
    size = seg.stat().st_size
    with open(seg, "r+b") as fh:
        fh.truncate(size - 100)                               # the last record loses its end
    s = SegmentStore(d, 1 << 30)
    assert len(s.index) == 4 and s.corrupt == 1
    assert seg.stat().st_size < size - 100                    # the torn record is gone from the file
    fill(s, blocks(6)[5:])                                   # appending continues after the cut
    s.close()
    assert len(SegmentStore(d, 1 << 30, read_only=True).index) == 5


def test_segments_of_another_format_version_are_dropped_with_one_warning(tmp_path):
    d = tmp_path / "kv"
    s = SegmentStore(d, 1 << 30)
    fill(s, blocks(5))
    s.close()
    seg = next(d.glob("seg-*.log"))
    with open(seg, "r+b") as fh:                              # as an older tierlm wrote it
        fh.seek(len(segment.MAGIC))
        fh.write((segment.FORMAT_VERSION - 1).to_bytes(2, "little"))
    with pytest.warns(UserWarning, match=f"record format {segment.FORMAT_VERSION - 1} .* are ignored"):
        ro = SegmentStore(d, 1 << 30, read_only=True)
    assert ro.index == {} and ro.stale == 1 and ro.corrupt == 0 and seg.exists()
    with pytest.warns(UserWarning, match="are removed"):
        s = SegmentStore(d, 1 << 30)
    assert s.index == {} and not seg.exists()
    fill(s, blocks(5))                                        # the directory is usable again
    s.close()
    assert len(SegmentStore(d, 1 << 30, read_only=True).index) == 5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damage", ["payload_bit", "header_bit", "foreign", "tokens"])
def test_corruption_is_detected_and_dropped(tmp_path, damage, mode):
    d = tmp_path / "kv"
    items = blocks(4)
    s = SegmentStore(d, 1 << 30)
    if damage == "foreign":                                  # another model's block under this key
        parent, key, tokens, payload = items[2]
        fill(s, items[:2])
        assert s.put(b"F" * 32, key, parent, b"L" * 32, tokens, payload)
        fill(s, items[3:])
    elif damage == "tokens":                                 # the record's tokens do not hash to its key
        parent, key, tokens, payload = items[2]
        fill(s, items[:2])
        assert s.put(FP, key, parent, b"L" * 32, [t + 1 for t in tokens], payload)
        fill(s, items[3:])
    else:
        fill(s, items)
    s.close()
    seg = next(d.glob("seg-*.log"))
    rec = segment.HEAD.size + segment.BLOCK.size + 16 * 8 + segment.SUM.size + 3000     # one record's length
    if damage.endswith("bit"):
        at = 2 * rec + (segment.HEAD.size + 40 if damage == "header_bit" else rec - 10)
        with open(seg, "r+b") as fh:
            fh.seek(at)
            b = fh.read(1)
            fh.seek(at)
            fh.write(bytes([b[0] ^ 0x10]))
    s = SegmentStore(d, 1 << 30)
    got = get(s, [k for _, k, _, _ in items], mode)
    assert got[:2] == [items[0][3], items[1][3]] and got[2] is None
    assert got[3] == (None if damage == "header_bit" else items[3][3])     # a bad header ends the scan
    assert s.corrupt >= 1 and not s.has(items[2][1])
    s.close()


def test_full_disk_stops_writes_without_failing(tmp_path, monkeypatch):
    s = SegmentStore(tmp_path / "kv", 1 << 30)
    fill(s, blocks(2))
    real = os.pwrite

    def enospc(fd, buffers, offset):
        real(fd, b"".join(buffers)[:100], offset)           # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segment.os, "pwritev", enospc)
    parent, key, tokens, payload = blocks(3)[2]
    assert s.put(FP, key, parent, b"L" * 32, tokens, payload) is False and s.full
    assert s.put(FP, b"k" * 32, key, b"L" * 32, tokens, payload) is False      # not tried again
    monkeypatch.undo()
    s.close()
    s = SegmentStore(tmp_path / "kv", 1 << 30)
    assert len(s.index) == 2 and s.corrupt == 0              # the partial write was cut off at once
    s.close()


def test_eviction_by_budget_and_ttl(tmp_path, monkeypatch):
    monkeypatch.setattr(segment, "SEGMENT_BYTES", 20_000)    # ~6 records per segment
    items = blocks(30)
    s = SegmentStore(tmp_path / "kv", 40_000)
    fill(s, items)
    assert s.nbytes() <= 40_000 + 20_000
    assert not s.has(items[0][1]) and s.has(items[-1][1])   # oldest segments went first
    s.close()
    s = SegmentStore(tmp_path / "kv", 1 << 30, ttl_s=0.0)    # everything is past a zero TTL
    assert s.index == {} and s.nbytes() == 0
    s.close()


@pytest.mark.parametrize("mode", MODES)
def test_run_records_hold_chained_blocks(tmp_path, mode):
    """Chained blocks written as one record read back one by one or in any subset, mapped,
    read into staging memory or straight into destinations; a flipped payload bit drops
    exactly that record's blocks; a restart indexes every block."""
    d = tmp_path / "kv"
    items = blocks(13)
    run = [(k, parent, t, p) for parent, k, t, p in items[:10]]
    s = SegmentStore(d, 1 << 30)
    assert s.put_run(FP, b"L" * 32, run)
    fill(s, items[10:])
    assert s.put_run(FP, b"L" * 32, run[:3]) is False           # all held already: nothing written
    one = segment.HEAD.size + segment.BLOCK.size + 16 * 8 + segment.SUM.size + 3000
    first = segment.HEAD.size + 10 * (segment.BLOCK.size + 16 * 8) + segment.SUM.size + 10 * 3000
    assert s.nbytes() == first + 3 * one                        # one record for the run, one per single block
    want = {k: p for _, k, _, p in items}
    pick = [items[i][1] for i in (11, 3, 2, 9)]
    assert get(s, pick, mode) == [want[k] for k in pick]
    s.close()
    seg = next(d.glob("seg-*.log"))
    with open(seg, "r+b") as fh:                                # a bit of block 5's payload
        fh.seek(first - 5 * 3000 + 17)
        b = fh.read(1)
        fh.seek(first - 5 * 3000 + 17)
        fh.write(bytes([b[0] ^ 1]))
    s = SegmentStore(d, 1 << 30)
    assert len(s.index) == 13
    got = get(s, [k for _, k, _, _ in items], mode)
    assert got[:10] == [None] * 10 and got[10:] == [p for *_, p in items[10:]]
    assert s.corrupt == 10 and len(s.index) == 3
    s.close()


def test_read_into_takes_only_destinations_of_the_block_size(tmp_path):
    """A destination of another size than its block gets nothing (and the block stays held);
    a block asked for twice is read into the first destination of its size; a missing key or a
    segment file gone is False."""
    items = blocks(6)
    s = SegmentStore(tmp_path / "kv", 1 << 30)
    assert s.put_run(FP, b"L" * 32, [(k, parent, t, p) for parent, k, t, p in items])
    keys = [items[4][1], items[1][1], items[1][1], b"x" * 32]
    dests = [[bytearray(3000)], [bytearray(2999)], [bytearray(10), bytearray(2990)], [bytearray(3000)]]
    ok = s.read_into(keys, FP, segment.Staging(), dests=[list(map(memoryview, d)) for d in dests])
    assert ok == [True, False, True, False] and s.corrupt == 0 and s.has(items[1][1])
    assert bytes(dests[0][0]) == items[4][3] and b"".join(dests[2]) == items[1][3]
    assert dests[1][0] == bytearray(2999) and dests[3][0] == bytearray(3000)
    next((tmp_path / "kv").glob("seg-*.log")).unlink()
    assert s.read_into(keys[:1], FP, segment.Staging(), dests=[[memoryview(bytearray(3000))]]) == [False]
    s.close()


def test_read_into_rows_whole_records_partial_and_repeated_keys(tmp_path):
    """Rows: a whole record asked in slot order is read as one piece; the same blocks out of
    order, a part of the record, or a key asked twice (read once: the second row is False)
    land in the right rows."""
    items = blocks(6)
    s = SegmentStore(tmp_path / "kv", 1 << 30)
    assert s.put_run(FP, b"L" * 32, [(k, parent, t, p) for parent, k, t, p in items])
    keys, want = [k for _, k, _, _ in items], {k: p for _, k, _, p in items}
    for pick in (keys, keys[1:] + keys[:1], keys[2:4], [keys[0], keys[1], keys[1], keys[3]], keys + [b"x" * 32]):
        got = get(s, pick, "rows")
        expect = [want.get(k) if k not in pick[:i] else None for i, k in enumerate(pick)]
        assert got == expect
    assert s.corrupt == 0
    s.close()


def test_eviction_is_least_recently_used_across_restarts(tmp_path, monkeypatch):
    """A segment read recently outlives an older-read one written after it, also after a
    restart (used.json)."""
    clock = iter(range(1_000_000, 2_000_000))
    monkeypatch.setattr(segment, "time", type("Clock", (), {"time": staticmethod(lambda: float(next(clock)))}))
    monkeypatch.setattr(segment, "SEGMENT_BYTES", 7_000)        # two records per segment
    items = blocks(8)
    s = SegmentStore(tmp_path / "kv", 1 << 30)
    fill(s, items[:6])                                         # segments 1, 2, 3
    assert sorted(s.segments) == [1, 2, 3]
    assert s.get_many([items[0][1]], FP)[0] is not None       # segment 1 is now the most recently used
    s.close()
    s = SegmentStore(tmp_path / "kv", 3 * 7_000)               # a restart, then one more segment's worth
    fill(s, items[6:])
    assert sorted(s.segments) == [1, 3, 4]                     # segment 2, least recently used, went
    assert s.has(items[0][1]) and not s.has(items[2][1])
    s.close()


WRITER = textwrap.dedent("""
    import sys
    from tierlm.runtime.blocks import block_hash
    from tierlm.tiers.segment import SegmentStore
    fp = bytes(range(32))
    s = SegmentStore(sys.argv[1], 1 << 40)
    parent, i = fp, 0
    print("ready", flush=True)
    while True:                                 # records of 1 to 4 chained blocks
        run = []
        for _ in range(1 + i % 4):
            tokens = [i * 16 + t for t in range(16)]
            key = block_hash(parent, tokens)
            run.append((key, parent, tokens, (key * 512)[:16384]))
            parent, i = key, i + 1
        s.put_run(fp, b"L" * 32, run)
""")


def test_kill_9_while_writing_never_serves_a_bad_block(tmp_path):
    """50 writer processes killed at random moments: every block the directory then serves is
    whole and correct, and the chain of stored blocks never has holes in the middle."""
    d = tmp_path / "kv"
    rng = random.Random(0)
    runs = int(os.environ.get("TIERLM_KILL_RUNS", "50"))
    for _ in range(runs):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(d)], stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.05))
        p.send_signal(signal.SIGKILL)
        p.wait()
        seen = SegmentStore(d, 1 << 40, read_only=True)     # what a restart would serve right now
        keys = list(seen.index)
        assert all(body == (key * 512)[:16384] for key, body in zip(keys, seen.get_many(keys, FP)))
    s = SegmentStore(d, 1 << 40)
    assert len(s.index) > 0
    for key, e in s.index.items():
        assert block_hash(e.parent, e.tokens) == key
    got = s.get_many(list(s.index), FP)
    assert all(body == (key * 512)[:16384] for key, body in zip(s.index, got))
    s.close()


def test_staging_memory_is_reused_and_views_stay_valid_until_the_next_read(tmp_path):
    items = blocks(6)
    s = SegmentStore(tmp_path / "kv", 1 << 30)
    fill(s, items)
    staging = segment.Staging()
    keys = [k for _, k, _, _ in items]
    first = s.get_many(keys, FP, staging)
    buf = staging.buf
    assert first == [p for *_, p in items] and len(buf) >= 6 * 3000
    second = s.get_many(keys[:3], FP, staging)                    # smaller: the same memory again
    assert staging.buf is buf and second == [p for *_, p in items[:3]]
    assert first[0].obj is buf                                    # a view of it, not a copy
    big = segment.Staging()
    big.KEEP = 100                                                # over KEEP: not kept after use
    got = s.get_many(keys, FP, big)
    assert got == [p for *_, p in items] and len(big.buf) == 0
    s.close()
