"""The remote tier: KV blocks in a Redis (or Valkey) server that many engines share.

A stored block is the same record as on disk (`segment.encode_record`, one block per value:
header with magic, version, fingerprint, layout, key, parent, token ids, checksums, then the
payload), so every read re-verifies it exactly as a disk read does: a foreign, stale or
damaged value is dropped and its prefix recomputed, never served.

Keys, all under one hash tag so that a Redis Cluster keeps a model's namespace on one slot:
  tierlm:v<format>:{<fingerprint hex>}:b:<block hash hex>   a block record (TTL: the retention)
  tierlm:v<format>:{<fingerprint hex>}:lru                  sorted set: block key -> last use
  tierlm:v<format>:{<fingerprint hex>}:size                 hash: block key -> value bytes
  tierlm:v<format>:{<fingerprint hex>}:bytes                bytes of the namespace's values
  tierlm:v<format>:{<fingerprint hex>}:layout               the layout (model, streams) as JSON

Writes, reads and lookups each run as one Lua script per batch of blocks (one round trip,
atomic on the server; Redis >= 7 or Valkey, whose scripts declare themselves so that the server
evicts under `maxmemory` before running one): a write sets the values with their TTL, counts new ones into the
namespace's bytes and evicts least-recently-used blocks while over the byte budget, so that
engines sharing a namespace share one budget; a read refreshes the TTL and the LRU order of
what it finds. Redis' own eviction (`maxmemory` with an LRU policy) and expiry are misses.

Faults: any Redis error (refused connection, timeout, a server restarting) makes the tier
sit out for `RETRY_S` with one warning; lookups then miss and writes are dropped, so the
engine recomputes and keeps serving. Imports no torch (`tierlm cache` uses it).
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
import zlib
from urllib.parse import urlsplit

from ..errors import TierlmError
from ..runtime.blocks import block_hash
from .segment import FORMAT_VERSION, encode_record, parse_header

SCHEMES = ("redis", "rediss", "unix")
DEFAULT_TIMEOUT_S = 0.5            # per operation; a slower server is treated as down for RETRY_S
BATCH_BYTES = 4 << 20              # values per script call stay under this
GET_BATCH = 512                    # keys per read script call (a long prefix: several calls)
LINK_GUESS = 1e9                   # bytes/s a remote read is assumed to run at until one is measured

_PUT = """#!lua
local ttl, now, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local added = 0
if redis.call('EXISTS', KEYS[4]) == 0 then redis.call('SET', KEYS[4], ARGV[4]) end
for i = 5, #KEYS do
  local v = ARGV[i]
  redis.call('SET', KEYS[i], v, 'EX', ttl)
  if redis.call('ZADD', KEYS[1], now, KEYS[i]) == 1 then
    redis.call('HSET', KEYS[2], KEYS[i], #v)
    added = added + #v
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

_GET = """#!lua
local out = {}
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v then
    redis.call('EXPIRE', KEYS[i], ARGV[1])
    redis.call('ZADD', KEYS[1], 'XX', ARGV[2], KEYS[i])
  end
  out[i - 1] = v
end
return out
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
    # fail fast: a retry would stall the engine step that asked; the tier retries after RETRY_S
    kw = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "retry": Retry(NoBackoff(), 0)}
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


def decode(value, key: bytes, fingerprint: bytes, layout: bytes | None):
    """(parent, tokens, payload) of a remote value if it is whole and is block `key` of this
    model and layout (None: any layout): header checksum, key = sha256(parent || tokens),
    fingerprint, payload checksum; None otherwise."""
    parsed = parse_header(value, 0) if value is not None else None
    if parsed is None:
        return None
    head, blocks, hlen = parsed
    if len(blocks) != 1 or head["fingerprint"] != fingerprint or (layout is not None and head["layout"] != layout):
        return None
    k, parent, tokens, nbytes = blocks[0]
    if k != key or len(value) != hlen + nbytes or block_hash(parent, tokens) != key:
        return None
    body = memoryview(value)[hlen:]
    if zlib.crc32(body) != head["crc"]:
        return None
    return parent, tuple(tokens), body


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
        self._put, self._get, self._exists = (self.client.register_script(s) for s in (_PUT, _GET, _EXISTS))
        self.known: set[bytes] = set()          # block keys the server was last seen to hold
        self.down_until = 0.0
        self.warned = self.warned_corrupt = False
        self.stats = {"errors": 0, "corrupt": 0, "bytes": 0, "gets": 0, "sets": 0}
        self.latency, self.bandwidth = self._measure()

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
            self.known.clear()                  # it may come back empty
            self.down_until = time.monotonic() + self.RETRY_S
            if not self.warned:
                self.warned = True
                warnings.warn(f"remote tier {self.url} unavailable ({type(e).__name__}: {e}): prefixes it holds are "
                              f"recomputed and new blocks are not shared until it answers again (retried every "
                              f"{self.RETRY_S:g} s)", RuntimeWarning, stacklevel=3)
            return None
        self.warned = False                     # answering again: a later outage warns again
        return out

    def _measure(self) -> tuple[float, float]:
        """(seconds of a round trip, a first guess of the link's read bandwidth) for the policy;
        the bandwidth is then learned from every remote read. Writes nothing: a full server
        must not refuse an engine's start."""
        def run():
            self.client.ping()
            t = time.perf_counter()
            self.client.ping()
            return time.perf_counter() - t

        rtt = self._call(run)
        return (rtt if rtt is not None else 1e-3), LINK_GUESS

    # ------------------------------------------------------------------ blocks
    def probe(self, keys: list[bytes]) -> set[bytes]:
        """The keys the server holds now (also remembered in `known`)."""
        if not keys:
            return set()
        got = self._call(self._exists, keys=[self.key(k) for k in keys])
        if got is None:
            return set()
        held = {k for k, n in zip(keys, got) if n}
        self.known.difference_update(keys)
        self.known.update(held)
        return held

    def get_many(self, keys: list[bytes]) -> list[tuple[bytes, tuple, bytearray] | None]:
        """(parent, tokens, payload) per key, verified; None where missing or not intact (a bad
        value is deleted, so that the block is recomputed and stored again)."""
        out: list = [None] * len(keys)
        values = []
        for at in range(0, len(keys), GET_BATCH):
            got = self._call(self._get, keys=[self.index_keys[0], *map(self.key, keys[at:at + GET_BATCH])],
                             args=[self.ttl, time.time()])
            if got is None:
                break
            values += got
        bad = []
        for i, (k, v) in enumerate(zip(keys, values)):
            got = decode(v, k, self.fingerprint, self.layout) if v is not None else None
            if got is None:
                self.known.discard(k)
                if v is not None:
                    bad.append(k)
                continue
            parent, tokens, body = got
            out[i] = (parent, tokens, bytearray(body))
            self.stats["gets"] += 1
        if bad:
            self.stats["corrupt"] += len(bad)
            self._call(self.client.delete, *map(self.key, bad))
            if not self.warned_corrupt:
                self.warned_corrupt = True
                warnings.warn(f"remote tier {self.url}: {len(bad)} value(s) failed verification (damaged, or not "
                              "this block of this model) and were deleted; their prefixes are recomputed",
                              RuntimeWarning, stacklevel=2)
        return out

    def put_many(self, blocks) -> None:
        """Store blocks (key, parent, tokens, payload), a few MiB per call (a block another
        engine stored meanwhile is overwritten with the same bytes and counted once)."""
        batch, size = [], 0
        for b in blocks:
            batch.append(b)
            size += len(b[3])
            if size >= BATCH_BYTES:
                self._put_batch(batch)
                batch, size = [], 0
        if batch:
            self._put_batch(batch)

    def _put_batch(self, blocks) -> None:
        values = []
        for key, parent, tokens, payload in blocks:
            head, payloads = encode_record(self.fingerprint, self.layout, [(key, parent, tokens, payload)])
            values.append(b"".join([head, *payloads]))
        total = self._call(self._put, keys=[*self.index_keys, *(self.key(b[0]) for b in blocks)],
                           args=[self.ttl, time.time(), self.budget, self.layout_json, *values])
        if total is not None:
            self.stats["bytes"] = int(total)
            self.stats["sets"] += len(blocks)
            self.known.update(b[0] for b in blocks)

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
    """Every tierlm namespace on a server: fingerprint, blocks, bytes, oldest and newest use
    (for `tierlm cache ls|stats redis://...`)."""
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
        out.append({"fingerprint": ns[len(prefix):-2].decode(), "model": model, "blocks": client.zcard(lru),
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
    """Delete every tierlm key on the server; the number of blocks removed."""
    client = connect(url)
    n = 0
    for name in client.scan_iter(match=b"tierlm:v%d:{*" % FORMAT_VERSION, count=1000):
        n += b"}:b:" in name
        client.delete(name)
    client.close()
    return n
