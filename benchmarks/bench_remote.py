"""Benchmark: the remote (Redis) KV tier against recomputing and against redis-benchmark.

1. Time to first token of a --context-token prompt: recomputed (no tiers) vs reloaded from the
   remote tier by a fresh engine that has no host or disk copy (its own process state is new;
   the blocks come over the socket, verified), on the demo model and a random tiny V4. Median
   of --repeat.
2. Block throughput: `RemoteTier.put_runs` / `get_runs` (values verified on read) of --blocks
   blocks of the demo model's block size, in values of one chunk (`TierStore.CHUNK_BLOCKS`
   chained blocks) as the engine writes them, vs `redis-benchmark -t set,get` with the same
   value size on the same server, pipelined (-P 16, 4 clients) and with its defaults (50
   clients, no pipelining), each over as many distinct keys as the tier writes values
   (-r <values>, 5 requests per key; without -r, redis-benchmark SETs and GETs one key over and
   over, which stays in the server's CPU caches, where the tier writes and reads thousands of
   distinct values), and
   once with its single key, for reference. redis-py alone (the same values SET and read in the
   tier's batches, nothing built, checked or accounted while timed) splits the gap between the
   client library and the tier's own work. Median of --repeat, alternating.

The server is a redis-server started by this script on loopback (no persistence), or --url.

    python benchmarks/bench_remote.py [--context 32768] [--blocks 20000] [--repeat 3] [--url redis://...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_engine  # noqa: E402
import redis  # noqa: E402
from bench_tiers import FIRST, prompt  # noqa: E402
from tierlm import LLM  # noqa: E402
from tierlm.runtime.blocks import block_hash  # noqa: E402
from tierlm.tiers.remote import GET_BATCH, RemoteTier  # noqa: E402
from tierlm.tiers.segment import encode_record  # noqa: E402
from tierlm.tiers.store import TierStore  # noqa: E402
from tierlm.train import demo  # noqa: E402


def start_server(tmp: Path) -> tuple[str, subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", proc


def ttft(path, url: str, ids: list[int], repeat: int) -> dict:
    kw = dict(max_model_len=len(ids) + 8, max_num_seqs=1)
    plain = LLM(path, **kw)
    start = time.perf_counter()
    plain.generate({"prompt_token_ids": ids}, FIRST)
    recompute = time.perf_counter() - start
    del plain
    fill = LLM(path, kv_tiers=("host", url), tier_policy="recompute", **kw)
    fill.generate({"prompt_token_ids": ids}, FIRST)
    fill.close()
    times, hits = [], None
    for _ in range(repeat):
        llm = LLM(path, kv_tiers=("host", url), tier_policy="reload", **kw)
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": ids}, FIRST)
        times.append(time.perf_counter() - start)
        stats = llm.stats()
        hits = stats["prefix_hit_tokens_by_tier"]["remote"]
        remote_bytes = stats["tier_bytes"]["remote"]
        llm.close()
    reload = statistics.median(times)
    return {"recompute_ttft_s": recompute, "reload_ttft_s": reload, "ttft_ratio": recompute / reload,
            "remote_hit_tokens": hits, "remote_bytes": remote_bytes}


def redis_benchmark(url: str, size: int, n: int, extra: list[str]) -> dict[str, float]:
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(["redis-benchmark", "-p", port, "-t", "set,get", "-d", str(size), "-n", str(n), "--csv",
                          *extra], capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines()[1:]:
        cells = [c.strip('"') for c in line.split(",")]
        rows[cells[0].lower()] = float(cells[1])
    return rows


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def values(tier: RemoteTier, runs) -> list[bytes]:
    """The values the tier stores for these runs (header + payloads), built outside the timing."""
    return [b"".join([h, *p]) for h, p in (encode_record(tier.fingerprint, tier.layout, run) for run in runs)]


def _plain_sets(client, keys, vals) -> None:
    """redis-py alone: the same values SET in pipelines of GET_BATCH, no accounting."""
    for at in range(0, len(keys), GET_BATCH):
        pipe = client.pipeline(transaction=False)
        for k, v in zip(keys[at:at + GET_BATCH], vals[at:at + GET_BATCH]):
            pipe.set(b"plain:" + k, v)
        pipe.execute()


def _plain_mgets(client, names) -> None:
    """redis-py alone: the tier's values read with the tier's MGET batches, nothing checked."""
    for at in range(0, len(names), GET_BATCH):
        client.mget(names[at:at + GET_BATCH])


def throughput(url: str, payload: int, blocks: int, repeat: int) -> dict:
    """Blocks/s of the remote tier's own writes and verified reads, vs redis-benchmark's
    values/s x blocks per value."""
    fp, layout = os.urandom(32), os.urandom(32)
    tier = RemoteTier(url, fp, layout, budget=1 << 40, ttl_s=3600)
    body = os.urandom(payload)
    items, parent = [], fp
    for i in range(blocks):
        tokens = tuple(range(i * 16, i * 16 + 16))
        key = block_hash(parent, tokens)
        items.append((key, parent, tokens, body))
        parent = key
    chunk = TierStore.CHUNK_BLOCKS
    runs = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    value = 0
    ours_set, ours_get, bench_p, bench_d, bench_1, client_set, client_get = [], [], [], [], [], [], []
    for _ in range(repeat):
        redis.Redis.from_url(url).flushdb()
        start = time.perf_counter()
        assert tier.put_runs(runs)
        ours_set.append(blocks / (time.perf_counter() - start))
        keys = [run[-1][0] for run in runs]
        start = time.perf_counter()
        got = tier.get_runs(keys)
        ours_get.append(blocks / (time.perf_counter() - start))
        assert all(g is not None and len(g) == chunk for g in got)
        value = len(redis.Redis.from_url(url).get(tier.key(keys[0])))
        # 5 requests per key: its random SETs then cover all but ~1 % of the keys, so that its GETs
        # read values (a GET of a key never SET answers nil, and ran ~2x as fast here)
        n, vals, names = max(1000, 5 * len(runs)), values(tier, runs), [tier.key(k) for k in keys]
        client_set.append(blocks / _timed(lambda: _plain_sets(tier.client, keys, vals)))
        client_get.append(blocks / _timed(lambda: _plain_mgets(tier.client, names)))
        del vals
        keyspace = ["-r", str(len(runs))]
        bench_p.append({op: v * chunk for op, v in redis_benchmark(url, value, n, ["-P", "16", "-c", "4", *keyspace]).items()})
        bench_d.append({op: v * chunk for op, v in redis_benchmark(url, value, n, keyspace).items()})
        bench_1.append({op: v * chunk for op, v in redis_benchmark(url, value, n, ["-P", "16", "-c", "4"]).items()})
    tier.close()

    def med(rows, op):
        return statistics.median(r[op] for r in rows)

    return {"value_bytes": value, "blocks": blocks, "blocks_per_value": chunk, "set_per_s": statistics.median(ours_set),
            "get_per_s": statistics.median(ours_get), "client_set_per_s": statistics.median(client_set),
            "client_get_per_s": statistics.median(client_get), "bench_pipelined_set": med(bench_p, "set"),
            "bench_pipelined_get": med(bench_p, "get"), "bench_default_set": med(bench_d, "set"),
            "bench_default_get": med(bench_d, "get"), "bench_one_key_set": med(bench_1, "set"),
            "bench_one_key_get": med(bench_1, "get")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--blocks", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--url", default=None, help="an existing server (default: start one)")
    ap.add_argument("--models", default="demo,tiny-v4", help="which of demo,tiny-v4 to run (empty: throughput only)")
    ap.add_argument("--payload", type=int, default=3328, help="block bytes for the throughput part when no model runs "
                    "(3,328: the demo model's)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    url, proc = (args.url, None) if args.url else start_server(tmp)
    results = {}
    try:
        makers = {"demo": lambda: demo.build(demo.DemoSettings())[0],
                  "tiny-v4": lambda: bench_engine.make_v4(tmp, max_position=65536)}
        payload = None
        for name in [m for m in args.models.split(",") if m]:
            path = makers[name]()
            ids = prompt(path, args.context)
            r = results[name] = ttft(path, url, ids, args.repeat)
            if payload is None:
                llm = LLM(path, kv_tiers=("host",), max_model_len=64)
                payload = llm.store.payload_bytes
                del llm
            print(f"{name}: {args.context:,}-token prefix, {r['remote_bytes'] / 2**20:.2f} MiB in Redis: TTFT "
                  f"recompute {r['recompute_ttft_s']:.2f} s vs reload from the remote tier {r['reload_ttft_s']:.3f} s "
                  f"({r['remote_hit_tokens']:,} tokens from Redis): {r['ttft_ratio']:.1f}x")
        t = results["throughput"] = throughput(url, payload or args.payload, args.blocks, args.repeat)
        print(f"throughput, {t['blocks']:,} blocks of the demo model in values of {t['blocks_per_value']} blocks "
              f"({t['value_bytes']:,} B); redis-benchmark values/s x {t['blocks_per_value']}, over "
              f"{-(-t['blocks'] // t['blocks_per_value']):,} keys (-r) as the tier's values:")
        for op in ("set", "get"):
            ours, plain = t[f"{op}_per_s"], t[f"client_{op}_per_s"]
            print(f"  {op.upper()}: tierlm {ours:,.0f} blocks/s vs redis-benchmark pipelined "
                  f"{t[f'bench_pipelined_{op}']:,.0f}/s ({ours / t[f'bench_pipelined_{op}']:.2f}), default "
                  f"{t[f'bench_default_{op}']:,.0f}/s ({ours / t[f'bench_default_{op}']:.2f}); redis-py alone, "
                  f"same values and batches, nothing checked: {plain:,.0f}/s "
                  f"({plain / t[f'bench_pipelined_{op}']:.2f} of redis-benchmark pipelined); redis-benchmark "
                  f"pipelined on its one key: {t[f'bench_one_key_{op}']:,.0f}/s")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
