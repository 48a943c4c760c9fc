"""The remote KV tier against a real Redis server (Debian's redis-server; .ci/run installs it
and starts one on loopback, exported as TIERLM_TEST_REDIS): two engine processes share one
store token-identically, and a server that is down, killed, restarted, slow, wiped, evicting
or holding corrupt / foreign values never makes the engine fail or serve a wrong token, with
one warning per fault."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import warnings

import pytest

pytest.importorskip("transformers")
redis = pytest.importorskip("redis")
import test_engine as te  # noqa: E402
from redis_server import RedisServer, _free_port, live_url  # noqa: E402
from test_tiers_engine import FAMILIES, GREEDY, KW, LONG, LONG2, OTHER, RELOAD, follow_up, run  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from tierlm import LLM  # noqa: E402
from tierlm.cli import app  # noqa: E402
from tierlm.errors import TierlmError  # noqa: E402
from tierlm.runtime.blocks import hash_chain  # noqa: E402
from tierlm.tiers import remote, segment  # noqa: E402

@pytest.fixture
def shared_url(tmp_path):
    url, server = live_url(tmp_path)
    yield url
    if server is not None:
        server.stop()


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path)
    yield s
    s.stop()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    ref, path = te.MAKERS[request.param](tmp_path_factory.mktemp(request.param))
    want = {tuple(p): te.reference_greedy(ref, p) for p in (LONG, LONG2, OTHER)}
    follow = follow_up(want)
    want[tuple(follow)] = te.reference_greedy(ref, follow)
    return request.param, path, want


@pytest.fixture
def fast_retry(monkeypatch):
    """The tier retries a failed server at once (not after RETRY_S): a restarted server is
    used again on the next call, and a dead one still warns only once."""
    monkeypatch.setattr(remote.RemoteTier, "RETRY_S", 0.0)


PHASE_ONE = """
import sys, torch
from tierlm import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype=torch.float64, reference="transformers", max_model_len=160,
          kv_tiers=("host", sys.argv[2]))
out = llm.generate({"prompt_token_ids": [int(t) for t in sys.argv[3].split(",")]},
                   SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
llm.close()
print(",".join(map(str, out[0].outputs[0].token_ids)))
"""


def remote_engine(path, url, **kw):
    return LLM(path, **RELOAD, kv_tiers=("host", url), **kw)


def remote_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "remote tier" in str(w.message)]


def test_two_processes_share_a_prefix(family, shared_url, tmp_path):
    """A prefix computed by one engine process is served to another as remote hits,
    token-identical to the reference; the second process also has a disk tier, and the
    remote hits are promoted to it."""
    _, path, want = family
    first = subprocess.run([sys.executable, "-c", PHASE_ONE, str(path), shared_url, ",".join(map(str, LONG))],
                           capture_output=True, text=True, check=True)
    assert [int(t) for t in first.stdout.split(",")] == want[tuple(LONG)]
    llm = LLM(path, **RELOAD, kv_tiers=("host", "disk", shared_url), cache_dir=tmp_path / "kv")
    follow = follow_up(want)
    assert run(llm, follow) == want[tuple(follow)]
    stats = llm.stats()
    assert stats["prefix_hit_tokens_by_tier"]["remote"] == 6 * llm.block      # LONG's 101 computed tokens
    assert stats["prefix_hit_tokens_by_tier"]["device"] == 0 and stats["corrupt_blocks_dropped"] == 0
    assert stats["tier_bytes"]["remote"] > 0 and stats["remote_errors"] == 0
    llm.store.flush()
    chain = [k for k in llm.store.remote.cover if llm.store.where(k) == "host"][:6]
    assert len(chain) == 6 and all(llm.store.disk.has(k) for k in chain)    # the hits promoted to the disk
    link = llm.store.bandwidth["remote"]
    assert link.learned and link.value != remote.LINK_GUESS                  # measured by the remote reload
    llm.close()
    saved = json.loads((tmp_path / "kv" / "rates.json").read_text())         # the next engine starts from it
    assert saved[f"remote_read:{remote.redact(shared_url)}"] == pytest.approx(link.value)


def test_remote_hits_are_prefetched(family, shared_url):
    _, path, want = family
    a = remote_engine(path, shared_url)
    run(a, LONG)
    a.close()
    b = remote_engine(path, shared_url)
    follow = follow_up(want)
    b.add_request({"prompt_token_ids": OTHER}, GREEDY)         # busy: a request queued now is read ahead
    rid = b.add_request({"prompt_token_ids": follow}, GREEDY)
    b.store._fetch.join()                                    # the read-ahead is done
    assert b.stats()["blocks_prefetched"] >= 6
    outs = [o for o in b._drive(False, 1) if o.request_id == rid and o.finished]
    assert outs[0].outputs[0].token_ids == want[tuple(follow)]
    assert b.stats()["prefix_hit_tokens_by_tier"]["remote"] == 6 * b.block and b.store._ahead == {}
    b.close()


def test_server_down_at_start(family, tmp_path):
    _, path, want = family
    url = f"redis://:secret-pw@127.0.0.1:{_free_port()}/0"      # nothing listens there
    with pytest.warns(RuntimeWarning, match="remote tier") as caught:
        llm = remote_engine(path, url)
        assert run(llm, LONG) == want[tuple(LONG)]
        follow = follow_up(want)
        assert run(llm, follow) == want[tuple(follow)]
        llm.close()
    got = remote_warnings(caught)
    assert len(got) == 1 and "secret-pw" not in got[0] and ":***@" in got[0]
    assert llm.stats()["prefix_hit_tokens_by_tier"]["remote"] == 0


def test_server_killed_mid_run_then_restarted(family, server, fast_retry):
    _, path, want = family
    llm = remote_engine(path, server.url)
    assert run(llm, LONG) == want[tuple(LONG)]
    llm.store.flush()
    assert llm.stats()["tier_bytes"]["remote"] > 0
    server.stop()
    with pytest.warns(RuntimeWarning, match="remote tier") as caught:
        other = remote_engine(path, server.url)                # a second engine meets the dead server
        follow = follow_up(want)
        assert run(other, follow) == want[tuple(follow)]
        assert run(llm, OTHER) == want[tuple(OTHER)]
        llm.store.flush()
    assert len(remote_warnings(caught)) == 2                   # one per engine
    assert other.stats()["prefix_hit_tokens_by_tier"]["remote"] == 0 and other.stats()["remote_errors"] > 0
    other.close()
    server.start()                                             # back, empty: used again, no warning
    new = [(5 * i + 2) % 50 for i in range(70)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expect = run(llm, new)                                # stored in the restarted server
        llm.store.flush()
        fresh = remote_engine(path, server.url)
        assert run(fresh, new) == expect == run(LLM(path, **KW), new)
    assert remote_warnings(caught) == []
    assert fresh.stats()["prefix_hit_tokens_by_tier"]["remote"] > 0
    llm.close()
    fresh.close()


def test_slow_server_times_out(family, server):
    """DEBUG SLEEP stalls the server longer than the per-operation timeout: the engine gives
    up on it (one warning) and recomputes."""
    _, path, want = family
    llm = remote_engine(path, server.url)
    run(llm, LONG)
    llm.close()
    slow = remote_engine(path, server.url + "?socket_timeout=0.2")
    sleeper = threading.Thread(target=lambda: server.client().execute_command("DEBUG", "SLEEP", "2"))
    sleeper.start()
    probe = server.client(socket_timeout=0.05)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:                       # until the server is asleep
        try:
            probe.ping()
        except redis.TimeoutError:
            break
    with pytest.warns(RuntimeWarning, match="remote tier") as caught:
        follow = follow_up(want)
        assert run(slow, follow) == want[tuple(follow)]
    sleeper.join()
    assert len(remote_warnings(caught)) == 1 and "Timeout" in remote_warnings(caught)[0]
    assert slow.stats()["prefix_hit_tokens_by_tier"]["remote"] == 0
    slow.close()


def test_corrupt_and_foreign_values_are_dropped(family, server):
    """A value with a flipped bit, another run's value under a key, and another model's run
    under a key: each is detected by a fresh engine (one warning), deleted and recomputed."""
    _, path, want = family
    llm = remote_engine(path, server.url)
    run(llm, LONG)
    run(llm, LONG2)
    ns, root = llm.store.remote.ns + b"b:", llm.store.fingerprint
    llm.close()
    c = server.client()
    follow = follow_up(want)
    chain = hash_chain(root, follow[:-1], llm.block)
    victim = ns + chain[5].hex().encode()                     # LONG's blocks 0-5, one chunk tail
    other = next(k for k in c.keys(ns + b"*") if k != victim and len(c.get(k)) > len(c.get(victim)) // 2)
    good, foreign_run = c.get(victim), c.get(other)
    head, blocks, hlen = segment.parse_header(good, 0)
    runs = [(k, parent, tokens, good[hlen:][sum(b[3] for b in blocks[:i]):][:n])
            for i, (k, parent, tokens, n, _) in enumerate(blocks)]
    flipped = bytearray(good)
    flipped[-5] ^= 1                                           # a bit of the payload
    alien_head, _ = segment.encode_record(b"\x07" * 32, head["layout"], runs)
    alien = b"".join([alien_head, *[r[3] for r in runs]])
    for bad in (bytes(flipped), foreign_run, alien):
        c.set(victim, bad)
        fresh = remote_engine(path, server.url)
        with pytest.warns(RuntimeWarning, match="remote tier") as caught:
            assert run(fresh, follow) == want[tuple(follow)]
        stats = fresh.stats()
        assert len(remote_warnings(caught)) == 1 and "1 value(s) failed verification" in remote_warnings(caught)[0]
        # never the bad value's 6 blocks; the prompt-end value of LONG (blocks 0-3) may serve when
        # the read-ahead thread dropped the bad one before the match looked
        assert stats["corrupt_blocks_dropped"] >= 1 and stats["prefix_hit_tokens_by_tier"]["remote"] in (0, 4 * 16)
        assert c.get(victim) != bad                            # deleted (then stored again, recomputed)
        fresh.close()


def test_flushall_and_maxmemory_eviction_are_misses(family, server):
    """Blocks the server dropped (FLUSHALL between the engine's lookup and its read; Redis'
    own LRU eviction under maxmemory) are recomputed without a warning."""
    _, path, want = family
    llm = remote_engine(path, server.url)
    run(llm, LONG)
    llm.close()
    fresh = remote_engine(path, server.url)
    real_get = fresh.store.remote.get_runs

    def flush_first(keys):                                   # the server is wiped just before the read
        server.client().flushall()
        return real_get(keys)

    fresh.store.remote.get_runs = flush_first
    baseline = LLM(path, **KW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        follow = follow_up(want)
        assert run(fresh, follow) == want[tuple(follow)]
        fresh.store.remote.get_runs = real_get
        assert fresh.stats()["prefix_hit_tokens_by_tier"]["remote"] == 0
        prompts = [[(7 * i + 13 * j) % 50 for i in range(70)] for j in range(12)]
        for p in prompts[:-1]:
            run(fresh, p)
        fresh.store.flush()
        c = server.client()                                  # now less room than the blocks take
        c.config_set("maxmemory-policy", "allkeys-lru")
        c.config_set("maxmemory", c.info("memory")["used_memory"] - fresh.stats()["tier_bytes"]["remote"] // 2)
        run(fresh, prompts[-1])
        fresh.store.flush()
        assert c.info("stats")["evicted_keys"] > 0
        again = remote_engine(path, server.url)
        for p in (prompts[0], prompts[-1], follow):
            assert run(again, p) == run(baseline, p)
    assert remote_warnings(caught) == [] and again.stats()["remote_errors"] == 0
    fresh.close()
    again.close()


def test_byte_budget_evicts_least_recently_used(family, server):
    _, path, want = family
    probe = remote_engine(path, server.url, remote_cache_bytes=1 << 30)
    run(probe, LONG)
    probe.store.flush()
    one_prompt = probe.stats()["tier_bytes"]["remote"]
    probe.close()
    server.client().flushall()
    budget = int(2.5 * one_prompt)
    llm = remote_engine(path, server.url, remote_cache_bytes=budget)
    prompts = [[(7 * i + 13 * j) % 50 for i in range(70)] for j in range(6)]
    for p in prompts:
        run(llm, p)
        llm.store.flush()
        assert llm.stats()["tier_bytes"]["remote"] <= budget
    c = server.client()
    ns = llm.store.remote.ns
    sizes = [len(c.get(k)) for k in c.keys(ns + b"b:*")]
    assert 0 < sum(sizes) <= budget                          # what the server holds, summed independently
    fresh = remote_engine(path, server.url, remote_cache_bytes=budget)
    assert run(fresh, prompts[-1] + [1, 2]) and fresh.stats()["prefix_hit_tokens_by_tier"]["remote"] > 0
    other = remote_engine(path, server.url, remote_cache_bytes=budget)
    run(other, prompts[0] + [1, 2])
    assert other.stats()["prefix_hit_tokens_by_tier"]["remote"] == 0    # the oldest prompt was evicted
    for e in (llm, fresh, other):
        e.close()


def test_bad_remote_arguments(family):
    _, path, _ = family
    with pytest.raises(TierlmError, match="one remote store, last"):
        LLM(path, **KW, kv_tiers=("host", "redis://127.0.0.1:1/0", "disk"))
    with pytest.raises(TierlmError, match="bad remote tier URL"):
        LLM(path, **KW, kv_tiers=("host", "redis://:pw@127.0.0.1:notaport/0"))
    with pytest.raises(TierlmError, match="remote_cache_bytes"):
        LLM(path, **KW, kv_tiers=("host", "redis://127.0.0.1:1/0"), remote_cache_bytes=-1)
    with pytest.raises(TierlmError, match="cache_ttl_s"):
        LLM(path, **KW, host_cache_bytes=1 << 20, cache_ttl_s=0)


def test_cache_cli_on_a_remote_store(server, tmp_path):
    _, path = te.MAKERS["llama"](tmp_path / "llama")
    llm = remote_engine(path, server.url)
    run(llm, LONG)        # values: the prompt's unfinished chunk (blocks 0-3) and the sequence's (0-5)
    run(llm, OTHER)       # and OTHER's two
    llm.close()
    c = server.client()
    runner = CliRunner()
    ls = runner.invoke(app, ["cache", "ls", server.url, "--json"])
    assert ls.exit_code == 0, ls.output
    got = json.loads(ls.stdout)
    assert got["values"] == 4 and got["models"][0]["values"] == 4
    assert got["bytes"] == sum(len(c.get(k)) for k in c.keys(b"tierlm:*:b:*"))
    stats = runner.invoke(app, ["cache", "stats", server.url])
    assert stats.exit_code == 0 and "4 values" in stats.output
    victim = next(iter(c.keys(b"tierlm:*:b:*")))
    c.set(victim, b"garbage")
    verify = runner.invoke(app, ["cache", "verify", server.url, "--json"])
    assert verify.exit_code == 1 and json.loads(verify.stdout)["bad"] == 1 and json.loads(verify.stdout)["good"] == 3
    cleared = runner.invoke(app, ["cache", "clear", server.url])
    assert cleared.exit_code == 0 and "removed 3 values" in cleared.output
    assert c.keys(b"tierlm:*") == []
    down = runner.invoke(app, ["cache", "ls", f"redis://:pw@127.0.0.1:{_free_port()}/0"])
    assert down.exit_code == 2 and "ConnectionError" in down.output and "pw" not in down.output.replace("***", "")


def test_serve_metrics_show_the_remote_tier(shared_url, tmp_path):
    """`tierlm serve`'s /metrics: bytes and prefix hits of the remote tier (a second engine
    served from what the first stored)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from tierlm.serve import create_app
    _, path = te.MAKERS["llama"](tmp_path / "llama")
    first = remote_engine(path, shared_url)
    run(first, LONG)
    first.close()
    with TestClient(create_app(remote_engine(path, shared_url), model_name="m")) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": LONG + [1, 2], "max_tokens": 2})
        assert r.status_code == 200, r.text
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}
    assert values[("tierlm_prefix_hit_tokens_total", (("tier", "remote"),))] == 4 * 16
    assert values[("tierlm_cache_bytes", (("tier", "remote"),))] > 0
    assert values[("tierlm_kv_remote_errors_total", ())] == 0


def test_generate_cli_with_a_remote_tier(server, tmp_path):
    """`tierlm generate --kv-tiers host,redis://... --remote-cache --cache-ttl`: a second run
    (a new process' engine) is served from the remote tier, with the same tokens."""
    _, path = te.MAKERS["llama"](tmp_path / "llama")
    args = ["generate", str(path), "--prompt-ids", ",".join(map(str, LONG)), "-n", "4", "--ignore-eos",
            "--kv-tiers", f"host,{server.url}", "--remote-cache", "1GiB", "--cache-ttl", "1h",
            "--tier-policy", "reload", "--dtype", "fp64", "--json"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["token_ids"] == b["token_ids"] and a["prefix_hit_tokens_by_tier"]["remote"] == 0
    assert b["prefix_hit_tokens_by_tier"]["remote"] == 4 * 16
    assert 0 < server.client().ttl(next(iter(server.client().keys(b"tierlm:*:b:*")))) <= 3600
    bad = runner.invoke(app, args[:-1] + ["--json", "--cache-ttl", "soon"])
    assert bad.exit_code == 2 and "--cache-ttl must be a positive duration" in bad.output


def test_write_back_sends_chunks_at_once(family, shared_url):
    """With tier_write="back", chunks still reach the server as they complete (resume records
    wait for the host tier to evict them or for close); a new engine then hits the prefix."""
    _, path, want = family
    llm = remote_engine(path, shared_url, tier_write="back")
    assert run(llm, LONG) == want[tuple(LONG)]
    llm.store._queue.join()
    assert llm.stats()["tier_bytes"]["remote"] > 0                 # before close
    llm.close()
    fresh = remote_engine(path, shared_url)
    follow = follow_up(want)
    assert run(fresh, follow) == want[tuple(follow)]
    assert fresh.stats()["prefix_hit_tokens_by_tier"]["remote"] == 6 * fresh.block
    fresh.close()


def test_reads_pause_garbage_collection_and_restore_it():
    import gc
    from tierlm.tiers.remote import _gc_paused
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with _gc_paused():
            assert not gc.isenabled()
            raise KeyError("a failing read")
    assert gc.isenabled()                                   # back on after an error too
    gc.disable()
    try:
        with _gc_paused():
            pass
        assert not gc.isenabled()                           # a caller's own choice is kept
    finally:
        gc.enable()


def test_large_values_go_to_the_socket_uncopied():
    """The tier's client packs a SET's value as the very object it was given (hiredis'
    packer, redis-py's default when hiredis is installed, copies it into a new buffer)."""
    client = remote.connect("redis://127.0.0.1:1/0")          # packing needs no server
    value = bytes(range(256)) * 256
    conn = client.connection_pool.make_connection()
    packed = conn.pack_command("SET", b"k", value)
    assert any(piece is value for piece in packed)
    assert b"".join(packed) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$65536\r\n" + value + b"\r\n"
