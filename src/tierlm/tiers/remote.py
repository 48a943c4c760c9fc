"""The remote tier: KV blocks in a Redis (or Valkey) server that many engines share.

A value is the same record as on disk (`segment.encode_record`): a run of chained blocks
(header with magic, version, fingerprint, layout, every block's key, parent and token ids,
checksums, then the payloads), stored under its last block's key, so every read re-verifies
it exactly as a disk read does: a foreign, stale or damaged value is dropped and its prefix
recomputed, never served. `TierStore` writes a prefix as aligned chunks of `CHUNK_BLOCKS`
blocks, and the unfinished chunk a prompt or a sequence ends in, so that per-value costs (a
key, its bookkeeping, two checksums) are paid once per chunk rather than per block.

Keys, all under one hash tag so that a Redis Cluster keeps a model's namespace on one slot:
  tierlm:v<format>:{<fingerprint hex>}:b:<block hash hex>   a run ending at that block (TTL: the retention)
  tierlm:v<format>:{<fingerprint hex>}:lru                  sorted set: value key -> last use
  tierlm:v<format>:{<fingerprint hex>}:size                 hash: value key -> value bytes
  tierlm:v<format>:{<fingerprint hex>}:bytes                bytes of the namespace's values
  tierlm:v<format>:{<fingerprint hex>}:layout               the layout (model, streams) as JSON

Writes, reads and lookups each take one round trip per batch: a write is the values' SETs
(with their TTL) and a Lua script that counts new ones into the namespace's bytes and evicts
least-recently-used values while over the byte budget, so that engines sharing a namespace
share one budget; a read is MGETs and a script that refreshes the TTL and the LRU order of what
it found; a lookup is one script of EXISTS. Scripts declare themselves the Redis 7 way, so
that a server under `maxmemory` evicts before running one: Redis >= 7 or Valkey. Redis' own
eviction (`maxmemory` with an LRU policy) and expiry are misses.

Faults: any Redis error (refused connection, timeout, a server restarting) makes the tier
sit out for `RETRY_S` with one warning; lookups then miss and writes are dropped, so the
engine recomputes and keeps serving. Imports no torch (`tierlm cache` uses it).
"""

from __future__ import annotations

import gc
import json
import os
import re
import threading
import time
import warnings
from contextlib import contextmanager
from urllib.parse import urlsplit

from ..errors import TierlmError
from .segment import FORMAT_VERSION, checksum, encode_record, parse_header

SCHEMES = ("redis", "rediss", "unix")
DEFAULT_TIMEOUT_S = 0.5            # per operation; a slower server is treated as down for RETRY_S
BATCH_BYTES = 4 << 20              # values per script call stay under this
GET_BATCH = 64                     # keys per MGET (a long prefix: several round trips)
LINK_GUESS = 1e9                   # bytes/s a remote read is assumed to run at until one is measured

# after the batch's SETs, in the same round trip: KEYS = lru, size, bytes, layout, the values'
# keys; ARGV = ttl, now, budget, layout JSON, the values' sizes (ARGV[i] is KEYS[i]'s)
_ACCOUNT = """#!lua
local ttl, now, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[4]) == 0 then redis.call('SET', KEYS[4], ARGV[4]) end
local added = 0
for i = 5, #KEYS do
  if redis.call('ZADD', KEYS[1], now, KEYS[i]) == 1 then
    redis.call('HSET', KEYS[2], KEYS[i], ARGV[i])
    added = added + tonumber(ARGV[i])
  end
end
local total = redis.call('INCRBY', KEYS[3], added)
while total > budget do
  local old = redis.call('ZPOPMIN', KEYS[1])
  if #old == 0 then
    redis.call('SET', KEYS[3], 0)
    total = 0
  else
    local n = tonumber(redis.call('HGET', KEYS[2], old[1]) or '0')
    redis.call('HDEL', KEYS[2], old[1])
    redis.call('DEL', old[1])
    total = redis.call('DECRBY', KEYS[3], n)
  end
end
for j = 1, 4 do redis.call('EXPIRE', KEYS[j], ttl) end
return total
"""

# after a read's MGETs: KEYS = lru, the values' keys; ARGV = ttl, now
_TOUCH = """#!lua
for i = 2, #KEYS do
  if redis.call('EXPIRE', KEYS[i], ARGV[1]) == 1 then redis.call('ZADD', KEYS[1], 'XX', ARGV[2], KEYS[i]) end
end
return 0
"""

_EXISTS = """#!lua
local out = {}
for i = 1, #KEYS do out[i] = redis.call('EXISTS', KEYS[i]) end
return out
"""


def is_remote(name) -> bool:
    """Whether a kv_tiers entry names a remote store (a redis://, rediss:// or unix:// URL)."""
    return isinstance(name, str) and "://" in name and name.split("://", 1)[0] in SCHEMES


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for messages and stats."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def namespace(fingerprint: bytes) -> bytes:
    return b"tierlm:v%d:{%s}:" % (FORMAT_VERSION, fingerprint.hex().encode())


def connect(url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A client with its own connection pool. Credentials come from the URL or, when it has
    none, from TIERLM_REDIS_PASSWORD (or redis-cli's REDISCLI_AUTH) and TIERLM_REDIS_USERNAME;
    the URL's query may set redis-py options such as socket_timeout."""
    try:
        import redis
    except ImportError:
        raise TierlmError("the remote tier needs the redis package: pip install 'tierlm[redis]'") from None
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    # fail fast: one immediate retry on a broken connection (a pooled one to a server that has
    # restarted), none after a timeout, which would stall the engine step that asked again
    kw = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
          "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))}
    kw.update(_packer())
    if urlsplit(url).password is None:
        password = os.environ.get("TIERLM_REDIS_PASSWORD") or os.environ.get("REDISCLI_AUTH")
        if password:
            kw["password"] = password
            if os.environ.get("TIERLM_REDIS_USERNAME"):
                kw["username"] = os.environ["TIERLM_REDIS_USERNAME"]
    try:
        return redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, **kw))
    except (ValueError, TypeError) as e:
        raise TierlmError(f"bad remote tier URL {redact(url)}: {e}") from None


def _packer() -> dict:
    """redis-py's own Python command packer, which hands a large value to the socket as it
    is. With hiredis installed redis-py packs every command with hiredis, which copies each
    value into a new buffer: about 110 us of a 56 KB SET here (the tier's writes ran ~1.5x
    faster without it). Replies are still parsed by hiredis."""
    try:
        from redis.connection import Encoder, PythonRespSerializer
    except ImportError:                         # a redis-py without it packs its own way
        return {}
    cutoff = 6000                                # redis-py's own buffer cutoff for large values
    return {"command_packer": PythonRespSerializer(cutoff, Encoder("utf-8", "strict", False).encode)}


def decode(value, key: bytes, fingerprint: bytes, layout: bytes | None) -> list[tuple] | None:
    """[(key, parent, tokens, payload view)] of a remote value if it is whole and is the run
    of chained blocks ending at block `key` of this model and layout (None: any layout):
    header checksum, fingerprint, every key = sha256(parent || tokens) with each block's
    parent the previous block, payload checksum; None otherwise."""
    parsed = parse_header(value, 0) if value is not None else None
    if parsed is None:
        return None
    head, blocks, hlen = parsed
    if (not blocks or blocks[-1][0] != key or head["fingerprint"] != fingerprint
            or (layout is not None and head["layout"] != layout) or len(value) != hlen + head["payload"]):
        return None
    body = memoryview(value)[hlen:]
    if checksum(body) != head["crc"]:
        return None
    out, at, prev = [], 0, blocks[0][1]
    for k, parent, tokens, nbytes, keyed in blocks:
        if parent != prev or not keyed:
            return None
        out.append((k, parent, tuple(tokens), body[at:at + nbytes]))
        at, prev = at + nbytes, k
    return out


@contextmanager
def _gc_paused():
    """No cyclic garbage collection while a read or write handles thousands of blocks: their
    (key, parent, tokens, payload) tuples and pipeline commands otherwise set off collections
    that walk the whole heap (torch, the model), which halved the median read rate here.
    Collections resume after (unless they were off already)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class RemoteTier:
    """Blocks of one model (fingerprint) and layout in a Redis server, under a byte budget
    and a TTL; every call survives the server being down, slow or wiped."""

    RETRY_S = 5.0

    def __init__(self, url: str, fingerprint: bytes, layout: bytes, budget: int, ttl_s: float,
                 layout_json: bytes = b"{}", timeout_s: float = DEFAULT_TIMEOUT_S):
        import redis
        self.errors_type = redis.RedisError
        self.url, self.fingerprint, self.layout = redact(url), fingerprint, layout
        self.budget, self.ttl = budget, max(1, int(ttl_s))
        self.client = connect(url, timeout_s)
        self.ns = namespace(fingerprint)
        self.index_keys = [self.ns + b"lru", self.ns + b"size", self.ns + b"bytes", self.ns + b"layout"]
        self.layout_json = layout_json
        self._account, self._touch, self._exists = (self.client.register_script(s)
                                                    for s in (_ACCOUNT, _TOUCH, _EXISTS))
        # block key -> key of the value holding it, as last probed (TierStore.probe)
        self.cover: dict[bytes, bytes] = {}
        self.down_until = 0.0
        self.warned = self.warned_corrupt = False
        self._warn_mu = threading.Lock()
        self.stats = {"errors": 0, "corrupt": 0, "bytes": 0}
        self.latency = self._round_trip()

    def key(self, block: bytes) -> bytes:
        return self.ns + b"b:" + block.hex().encode()

    # ------------------------------------------------------------------ faults
    def _call(self, fn, *args, **kw):
        """fn(...) or None when the server is down, slow or refuses (then one warning, and the
        tier sits out RETRY_S before trying again)."""
        now = time.monotonic()
        if now < self.down_until:
            return None
        try:
            out = fn(*args, **kw)
        except self.errors_type as e:
            self.stats["errors"] += 1
            self.cover.clear()                  # it may come back empty
            self.down_until = time.monotonic() + self.RETRY_S
            if self._first("warned"):
                warnings.warn(f"remote tier {self.url} unavailable ({type(e).__name__}: {e}): prefixes it holds are "
                              f"recomputed and new blocks are not shared until it answers again (retried every "
                              f"{self.RETRY_S:g} s)", RuntimeWarning, stacklevel=3)
            return None
        self.warned = False                     # answering again: a later outage warns again
        return out

    def _first(self, flag: str) -> bool:
        """Set a warned-once flag; True for the one caller that set it (the engine, read-ahead
        and writer threads all call the server)."""
        with self._warn_mu:
            first = not getattr(self, flag)
            setattr(self, flag, True)
            return first

    def _round_trip(self) -> float:
        """Seconds of a round trip (a guess when the server does not answer), the remote
        tier's latency in the policy. Writes nothing: a full server must not refuse an
        engine's start."""
        def run():
            self.client.ping()
            t = time.perf_counter()
            self.client.ping()
            return time.perf_counter() - t

        rtt = self._call(run)
        return rtt if rtt is not None else 1e-3

    # ------------------------------------------------------------------ runs
    def probe(self, keys: list[bytes]) -> set[bytes]:
        """The keys the server holds a value under now (one round trip)."""
        if not keys:
            return set()
        got = self._call(self._exists, keys=[self.key(k) for k in keys])
        return set() if got is None else {k for k, n in zip(keys, got) if n}

    def get_runs(self, keys: list[bytes]) -> list[list[tuple] | None]:
        """The runs stored under keys, each [(key, parent, tokens, payload)] verified; None where
        missing or not intact (a bad value is deleted, so that it is recomputed and stored again)."""
        names = [self.key(k) for k in keys]

        def read():
            # one MGET of a few MiB at a time: a pipeline of them all would make the server
            # buffer the whole reply first (several times slower here); the refresh rides along
            got = []
            for at in range(0, len(names), GET_BATCH):
                pipe = self.client.pipeline(transaction=False)
                pipe.mget(names[at:at + GET_BATCH])
                self._touch(keys=[self.index_keys[0], *names[at:at + GET_BATCH]], args=[self.ttl, time.time()],
                            client=pipe)
                got += pipe.execute()[0]
            return got

        out: list = [None] * len(keys)
        bad = []
        with _gc_paused():
            values = (self._call(read) if keys else None) or []
            for i, (k, v) in enumerate(zip(keys, values)):
                run = decode(v, k, self.fingerprint, self.layout) if v is not None else None
                if run is None and v is not None:
                    bad.append(k)
                out[i] = run
        if bad:
            self.stats["corrupt"] += len(bad)
            self._call(self.client.delete, *map(self.key, bad))
            if self._first("warned_corrupt"):
                warnings.warn(f"remote tier {self.url}: {len(bad)} value(s) failed verification (damaged, or not "
                              "these blocks of this model) and were deleted; their prefixes are recomputed",
                              RuntimeWarning, stacklevel=2)
        return out

    def put_runs(self, runs) -> bool:
        """Store runs of chained blocks [(key, parent, tokens, payload)], each one value under
        its last block's key, a few MiB per call (a run another engine stored meanwhile is
        overwritten with the same bytes and counted once); False if the server refused."""
        batch, size, ok = [], 0, True
        with _gc_paused():
            for run in runs:
                batch.append(run)
                size += sum(len(b[3]) for b in run)
                if size >= BATCH_BYTES:
                    ok &= self._put_batch(batch)
                    batch, size = [], 0
            if batch:
                ok &= self._put_batch(batch)
        return ok

    def _put_batch(self, runs) -> bool:
        values = []
        for run in runs:
            head, payloads = encode_record(self.fingerprint, self.layout, run)
            values.append(b"".join([head, *payloads]))
        names = [self.key(run[-1][0]) for run in runs]

        def write():
            pipe = self.client.pipeline(transaction=False)
            for name, value in zip(names, values):
                pipe.set(name, value, ex=self.ttl)
            self._account(keys=[*self.index_keys, *names],
                          args=[self.ttl, time.time(), self.budget, self.layout_json, *map(len, values)], client=pipe)
            return pipe.execute()[-1]

        total = self._call(write)
        if total is None:
            return False
        self.stats["bytes"] = int(total)
        return True

    def nbytes(self) -> int:
        """Bytes of this namespace's values on the server (the last figure seen when it is down)."""
        got = self._call(self.client.get, self.index_keys[2])
        if got is not None:
            self.stats["bytes"] = int(got)
        return self.stats["bytes"]

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()


def namespaces(url: str) -> list[dict]:
    """Every tierlm namespace on a server: fingerprint, model, values (runs of blocks), bytes,
    oldest and newest use (for `tierlm cache ls|stats redis://...`)."""
    client = connect(url)
    out = []
    prefix = b"tierlm:v%d:{" % FORMAT_VERSION
    for lru in client.scan_iter(match=prefix + b"*}:lru", count=1000):
        ns = lru[:-3]
        first = client.zrange(lru, 0, 0, withscores=True)
        last = client.zrange(lru, -1, -1, withscores=True)
        try:
            model = json.loads(client.get(ns + b"layout") or b"{}").get("model", "?")
        except (ValueError, AttributeError):
            model = "?"
        out.append({"fingerprint": ns[len(prefix):-2].decode(), "model": model, "values": client.zcard(lru),
                    "bytes": int(client.get(ns + b"bytes") or 0),
                    "oldest": first[0][1] if first else None, "newest": last[0][1] if last else None})
    client.close()
    return out


def verify(url: str) -> tuple[int, int]:
    """(good, bad) values of every tierlm namespace on a server, each decoded and checked
    against its key; bad ones are deleted."""
    client = connect(url)
    good = bad = 0
    prefix = b"tierlm:v%d:{" % FORMAT_VERSION
    for name in client.scan_iter(match=prefix + b"*}:b:*", count=1000):
        ns, _, hexkey = name.rpartition(b":b:")
        fp = bytes.fromhex(ns[len(prefix):-1].decode())
        value = client.get(name)
        if value is None:
            continue
        if decode(value, bytes.fromhex(hexkey.decode()), fp, None) is None:
            bad += 1
            client.delete(name)
        else:
            good += 1
    client.close()
    return good, bad


def clear(url: str) -> int:
    """Delete every tierlm key on the server; the number of values (runs of blocks) removed."""
    client = connect(url)
    n = 0
    for name in client.scan_iter(match=b"tierlm:v%d:{*" % FORMAT_VERSION, count=1000):
        n += b"}:b:" in name
        client.delete(name)
    client.close()
    return n
