"""KV tiers under the engine: greedy output is token-identical with tiers on and off, from the
host tier in one process and from the disk tier in the next process; corrupt blocks, a full
disk and the recompute policy all fall back to recomputing, never to a wrong token."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
import test_engine as te  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from tierlm import LLM, SamplingParams  # noqa: E402
from tierlm.cli import app  # noqa: E402
from tierlm.errors import TierlmError  # noqa: E402
from tierlm.tiers import segment, store as tier_store  # noqa: E402

FAMILIES = ("llama", "deepseek-v3.2", "deepseek-v4")
LONG = [(3 * i + 1) % 50 for i in range(70)]            # 4 full blocks of 16 before the last token
LONG2 = LONG[:52] + [9, 8, 7, 6]                          # shares 3 full blocks with LONG, then diverges
OTHER = [(11 * i + 5) % 50 for i in range(90)]
GREEDY = SamplingParams(temperature=0, max_tokens=te.N, ignore_eos=True)
KW = dict(dtype=torch.float64, reference="transformers", max_model_len=160)
RELOAD = dict(KW, tier_policy="reload")     # tiny models recompute a short prefix about as fast as
                                            # they reload it; "auto" is tested on its own below

PHASE_ONE = """
import sys, torch
from tierlm import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype=torch.float64, reference="transformers", max_model_len=160, cache_dir=sys.argv[2])
out = llm.generate({"prompt_token_ids": [int(t) for t in sys.argv[3].split(",")]},
                   SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
print(",".join(map(str, out[0].outputs[0].token_ids)))
"""


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    ref, path = te.MAKERS[request.param](tmp_path_factory.mktemp(request.param))
    want = {tuple(p): te.reference_greedy(ref, p) for p in (LONG, LONG2)}
    follow = follow_up(want)
    want[tuple(follow)] = te.reference_greedy(ref, follow)
    return request.param, path, want


def follow_up(want) -> list[int]:
    """The next turn after LONG: its prompt, its answer and a new question (resumes where LONG ended)."""
    return LONG + want[tuple(LONG)] + [9, 8, 7]


def run(llm, prompt):
    return llm.generate({"prompt_token_ids": prompt}, GREEDY)[0].outputs[0].token_ids


def test_host_tier_hit_is_identical(family):
    _, path, want = family
    probe = LLM(path, **KW)
    llm = LLM(path, **RELOAD, max_num_seqs=1, cache_bytes=probe.bytes_per_sequence, host_cache_bytes=1 << 26)
    assert run(llm, LONG) == want[tuple(LONG)]
    run(llm, OTHER)                                      # a one-sequence pool: evicts LONG's device blocks
    follow = follow_up(want)
    assert run(llm, follow) == want[tuple(follow)]
    stats = llm.stats()
    hits = stats["prefix_hit_tokens_by_tier"]
    assert hits["host"] > 0 and hits["host"] + hits["device"] == 6 * llm.block   # LONG's 101 computed tokens
    assert run(llm, LONG2) == want[tuple(LONG2)]          # a hit part-way into a stored sequence
    assert stats["reloads"] >= 1 and stats["tier_bytes"]["host"] > 0


def test_failed_reload_falls_back_to_the_device_hits(family, monkeypatch):
    """A lower-tier part that fails to load after its pages were allocated (a record that
    no longer verifies): the pages go back, the device hits alone are used, output unchanged."""
    _, path, want = family
    probe = LLM(path, **KW)
    llm = LLM(path, **RELOAD, max_num_seqs=1, cache_bytes=probe.bytes_per_sequence, host_cache_bytes=1 << 26)
    run(llm, LONG)
    run(llm, OTHER)                                      # evicts LONG's last device blocks, not its first
    monkeypatch.setattr(llm.store, "load", lambda keys, sizes, into=None: {})
    follow = follow_up(want)
    assert run(llm, follow) == want[tuple(follow)]
    hits = llm.stats()["prefix_hit_tokens_by_tier"]
    assert hits["device"] > 0 and hits.get("host", 0) == 0
    assert llm.manager.blocks_in_use() == 0


@pytest.fixture(params=["staged", "direct"])
def reload_path(request, monkeypatch):
    """Disk reloads through staging memory (small pages, as these tiny models have) or read
    straight into the pools' pages (as larger models' are: the threshold moved below them)."""
    if request.param == "direct":
        monkeypatch.setattr(tier_store, "DIRECT_PAGE", 0)
    return request.param


def test_disk_tier_survives_the_process(family, tmp_path, reload_path):
    _, path, want = family
    d = tmp_path / "kv"
    first = subprocess.run([sys.executable, "-c", PHASE_ONE, str(path), str(d), ",".join(map(str, LONG))],
                           capture_output=True, text=True, check=True)
    assert [int(t) for t in first.stdout.split(",")] == want[tuple(LONG)]
    llm = LLM(path, **RELOAD, cache_dir=d)               # a new process' engine over the same directory
    assert (llm.store._flat is not None) == (reload_path == "direct")
    follow = follow_up(want)
    assert run(llm, follow) == want[tuple(follow)]
    stats = llm.stats()
    assert stats["prefix_hit_tokens_by_tier"]["disk"] == 6 * llm.block
    assert stats["prefix_hit_tokens_by_tier"]["device"] == 0 and stats["corrupt_blocks_dropped"] == 0
    llm.close()


def test_corrupt_block_is_dropped_and_recomputed(family, tmp_path, reload_path):
    _, path, want = family
    d = tmp_path / "kv"
    llm = LLM(path, **KW, cache_dir=d)
    run(llm, LONG)
    llm.close()
    seg = next(d.glob("seg-*.log"))
    store = segment.SegmentStore(d, 1 << 30, read_only=True)
    second = sorted(store.index.values(), key=lambda e: (e.offset, e.at))[1]
    in_record = sum(e.offset == second.offset for e in store.index.values())
    with open(seg, "r+b") as fh:                          # flip one bit in the second block's payload
        fh.seek(second.offset + second.head + second.at + 5)
        b = fh.read(1)
        fh.seek(second.offset + second.head + second.at + 5)
        fh.write(bytes([b[0] ^ 1]))
    llm = LLM(path, **RELOAD, cache_dir=d)
    follow = follow_up(want)
    assert run(llm, follow) == want[tuple(follow)]
    assert llm.manager.blocks_in_use() == 0                # the pages the failed reload took were given back
    stats = llm.stats()
    # the record holding it (chained blocks written together) is dropped: each block of it the hit asked for
    assert 1 <= stats["corrupt_blocks_dropped"] <= in_record and stats["prefix_hit_tokens_by_tier"]["disk"] == 0
    llm.close()


def test_full_disk_warns_once_and_serves(family, tmp_path, monkeypatch):
    _, path, want = family

    def enospc(fd, buffers, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segment.os, "pwritev", enospc)
    llm = LLM(path, **KW, cache_dir=tmp_path / "kv")
    with pytest.warns(RuntimeWarning, match="is full") as caught:
        assert run(llm, LONG) == want[tuple(LONG)]
        llm.store.flush()
        assert run(llm, OTHER)
        llm.store.flush()
    assert len([w for w in caught if "is full" in str(w.message)]) == 1
    assert llm.stats()["disk_full"] is True
    llm.close()


def test_write_back_writes_on_eviction_and_close(family, tmp_path):
    """Write-back: blocks reach the disk only when the host tier evicts them or the engine
    closes; a new engine then serves the prefix from disk, token-identical."""
    _, path, want = family
    d = tmp_path / "kv"
    llm = LLM(path, **RELOAD, cache_dir=d, tier_write="back")
    assert run(llm, LONG) == want[tuple(LONG)]
    llm.store._queue.join()
    assert llm.store.disk.index == {} and llm.stats()["blocks_stored"] > 0        # all still in RAM only
    llm.close()
    llm = LLM(path, **RELOAD, cache_dir=d, tier_write="back", host_cache_bytes=0)   # host evicts at once
    follow = follow_up(want)
    assert run(llm, follow) == want[tuple(follow)]
    assert llm.stats()["prefix_hit_tokens_by_tier"]["disk"] == 6 * llm.block
    stored = len(llm.store.disk.index)
    run(llm, OTHER)
    llm.store._queue.join()
    assert len(llm.store.disk.index) > stored                  # evicted at once, so written before close
    llm.close()
    with pytest.raises(TierlmError, match="tier_write"):
        LLM(path, **KW, cache_dir=d, tier_write="later")


def test_prefetch_reads_a_queued_prompt_ahead(family, tmp_path):
    """A queued prompt's disk-only blocks are read and verified on the prefetch thread before
    its turn; its reload then uses them (counted as disk hits), token-identical."""
    _, path, want = family
    d = tmp_path / "kv"
    llm = LLM(path, **KW, cache_dir=d)
    run(llm, LONG)
    llm.close()
    llm = LLM(path, **RELOAD, cache_dir=d)
    follow = follow_up(want)
    idle = llm.add_request({"prompt_token_ids": follow}, GREEDY)     # an idle engine reloads it at once
    llm.store._fetch.join()
    assert llm.stats()["blocks_prefetched"] == 0
    llm.abort(idle)
    llm.add_request({"prompt_token_ids": OTHER}, GREEDY)                # busy: the next one is read ahead
    rid = llm.add_request({"prompt_token_ids": follow}, GREEDY)
    llm.store._fetch.join()                                    # the read-ahead is done
    ahead = llm.stats()["blocks_prefetched"]
    assert ahead >= 6 and len(llm.store._ahead) == ahead
    outs = [o for o in llm._drive(False, 1) if o.request_id == rid and o.finished]
    assert outs[0].outputs[0].token_ids == want[tuple(follow)]
    stats = llm.stats()
    assert stats["prefix_hit_tokens_by_tier"]["disk"] == 6 * llm.block and stats["reloads"] == 1
    assert llm.store._ahead == {}                              # taken by the reload, none read twice
    llm.close()


def test_recompute_policy_never_reloads(family, tmp_path):
    _, path, want = family
    llm = LLM(path, **KW, cache_dir=tmp_path / "kv")
    run(llm, LONG)
    llm.close()
    llm = LLM(path, **KW, cache_dir=tmp_path / "kv", tier_policy="recompute")
    follow = follow_up(want)
    assert run(llm, follow) == want[tuple(follow)]
    stats = llm.stats()
    assert stats["reloads"] == 0 and stats["recomputes"] == 1 and stats["prefix_hit_tokens_by_tier"]["disk"] == 0
    llm.close()


def test_auto_policy_recomputes_short_prefixes_and_reloads_long_ones(family, tmp_path):
    _, path, _ = family
    llm = LLM(path, **KW, host_cache_bytes=1 << 20)
    store = llm.store
    lat, one = store.LATENCY["disk"], store.recompute_flops(0, llm.block)
    store.flops.value = one / (lat / 2)                   # recomputing one block takes half a disk read's latency
    store.bandwidth["disk"].value = 1e12
    per_block = store.payload_bytes
    short = store.reload_wins({"disk": per_block}, one)
    long = store.reload_wins({"disk": 64 * per_block}, store.recompute_flops(0, 64 * llm.block))
    # independent arithmetic: reload = latency + bytes / bandwidth; recompute = FLOPs / rate
    assert long == (lat + 64 * per_block / 1e12 < store.recompute_flops(0, 64 * llm.block) / store.flops.value)
    assert not short and long


def test_a_guessed_rate_gives_way_to_the_first_measurement():
    guess = tier_store.Rate(2e9)
    guess.add(1e6, 0.0)                                   # nothing timed: ignored
    assert guess.value == 2e9 and guess.learned == 0
    guess.add(1e6, 0.01)
    assert guess.value == pytest.approx(1e8)              # the guess is dropped, not averaged in
    guess.add(3e6, 0.01)
    assert guess.value == pytest.approx(0.7 * 1e8 + 0.3 * 3e8) and guess.learned == 2
    earlier = tier_store.Rate(5e8, measured=True)         # learned by an earlier engine: averaged
    earlier.add(1e6, 0.01)
    assert earlier.value == pytest.approx(0.7 * 5e8 + 0.3 * 1e8)


def test_learned_rates_carry_over_to_the_next_engine(tmp_path):
    """An engine learns the prefill rate from its prefill steps and the disk's read rate from
    its reloads; the next engine on the directory starts from them, and a damaged rates.json
    falls back to the starting guesses."""
    _, path = te.MAKERS["llama"](tmp_path / "llama")
    d = tmp_path / "kv"
    first = LLM(path, **RELOAD, cache_dir=d)
    measured = first.store.flops.value                    # the matmul timed at start
    run(first, LONG)
    assert first.store.flops.learned > 0 and first.store.flops.value != measured
    first.close()
    second = LLM(path, **RELOAD, cache_dir=d)
    run(second, LONG)                                     # a disk reload: the read rate is learned
    assert second.stats()["prefix_hit_tokens_by_tier"]["disk"] > 0 and second.store.bandwidth["disk"].learned
    prefill = next(k for k in second.store.rates if k.startswith("prefill:cpu:"))
    learned = {"disk_read": second.store.bandwidth["disk"].value, prefill: second.store.flops.value}
    second.close()
    saved = json.loads((d / "rates.json").read_text())
    assert saved == pytest.approx(learned) and saved["disk_read"] != tier_store.DISK_READ_GUESS
    third = LLM(path, **RELOAD, cache_dir=d)
    assert third.store.bandwidth["disk"].value == saved["disk_read"]
    assert third.store.flops.value == saved[prefill]
    third.close()
    (d / "rates.json").write_text('{"disk_read": -1, "prefill:cpu:00": NaN, "x": "fast"}')
    fourth = LLM(path, **RELOAD, cache_dir=d)
    assert fourth.store.bandwidth["disk"].value == tier_store.DISK_READ_GUESS
    assert fourth.store.flops.value != saved[prefill]      # timed again at start
    fourth.close()
    (d / "rates.json").write_text("not json")
    LLM(path, **RELOAD, cache_dir=d).close()


def test_bad_tier_arguments(family, tmp_path):
    _, path, _ = family
    with pytest.raises(TierlmError, match="kv_tiers"):
        LLM(path, **KW, kv_tiers=("tape",))
    with pytest.raises(TierlmError, match="needs a cache_dir"):
        LLM(path, **KW, kv_tiers=("disk",))
    with pytest.raises(TierlmError, match="tier_policy"):
        LLM(path, **KW, host_cache_bytes=1 << 20, tier_policy="sometimes")
    first = LLM(path, **KW, cache_dir=tmp_path / "kv")
    with pytest.raises(TierlmError, match="in use by process"):
        LLM(path, **KW, cache_dir=tmp_path / "kv")
    first.close()
    LLM(path, **KW, cache_dir=tmp_path / "kv").close()


def test_cache_cli(tmp_path):
    _, path = te.MAKERS["llama"](tmp_path / "llama")
    d = tmp_path / "kv"
    llm = LLM(path, **KW, cache_dir=d)
    run(llm, LONG)
    llm.close()
    runner = CliRunner()
    ls = runner.invoke(app, ["cache", "ls", str(d), "--json"])
    assert ls.exit_code == 0, ls.output
    got = json.loads(ls.stdout)
    assert got["blocks"] == 6 and got["models"][0]["blocks"] == 6      # 70 + 32 tokens, 101 computed: 6 full blocks
    stats = runner.invoke(app, ["cache", "stats", str(d)])
    assert stats.exit_code == 0 and "blocks stored" in stats.output
    rate = next(v for k, v in got["rates"].items() if k.startswith("prefill:cpu:"))     # learned by the prefill
    assert f"learned here: prefill {rate / 1e9:,.1f} GFLOP/s (cpu, model " in stats.output
    verify = runner.invoke(app, ["cache", "verify", str(d), "--json"])
    assert verify.exit_code == 0 and json.loads(verify.stdout)["bad"] == 0
    seg = next(d.glob("seg-*.log"))
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF
    seg.write_bytes(bytes(data))
    bad = runner.invoke(app, ["cache", "verify", str(d)])
    assert bad.exit_code == 1 and "1 corrupt" in bad.output
    cleared = runner.invoke(app, ["cache", "clear", str(d)])
    assert cleared.exit_code == 0
    assert json.loads(runner.invoke(app, ["cache", "ls", str(d), "--json"]).stdout)["blocks"] == 0
    assert runner.invoke(app, ["cache", "ls", str(tmp_path / "nope")]).exit_code == 2
    assert os.path.isdir(d)
    args = ["generate", str(path), "--prompt-ids", ",".join(map(str, LONG)), "--dtype", "fp64", "--json",
            "--cache-dir", str(d), "--tier-policy", "reload", "--host-cache", "64MiB", "--max-tokens", "4"]
    first, again = (runner.invoke(app, args) for _ in range(2))
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    hits = json.loads(again.stdout)["prefix_hit_tokens_by_tier"]
    assert hits["disk"] == 4 * 16 and json.loads(first.stdout)["token_ids"] == json.loads(again.stdout)["token_ids"]
    bad = runner.invoke(app, args[:-2] + ["--host-cache", "lots"])
    assert bad.exit_code == 2 and "byte size" in bad.output


ENGINE_WRITER = """
import random, sys, torch
from tierlm import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype=torch.float64, reference="transformers", max_model_len=160, cache_dir=sys.argv[2],
          tier_policy="reload")
rng = random.Random(int(sys.argv[3]))
print("ready", flush=True)
while True:                                   # new prompts keep new blocks flowing to the disk
    prompt = [rng.randrange(50) for _ in range(rng.randrange(40, 120))]
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
"""


def writer_prompt(rng) -> list[int]:
    n = rng.randrange(40, 120)
    return [rng.randrange(50) for _ in range(n)]


def test_engine_killed_while_writing_serves_nothing_corrupt(tmp_path):
    """Engines writing to a cache directory are killed (SIGKILL) at random moments, each
    restart on the same directory: every record left verifies, and prompts served from it
    give the same greedy tokens as without tiers. TIERLM_ENGINE_KILL_RUNS sets the number of
    kills (5 by default here; BENCHMARKS.md / the issue note give a 50-run figure)."""
    import random
    import signal
    import time
    _, path = te.MAKERS["deepseek-v4"](tmp_path / "v4")
    d = tmp_path / "kv"
    rng = random.Random(1)
    for k in range(int(os.environ.get("TIERLM_ENGINE_KILL_RUNS", "5"))):
        p = subprocess.Popen([sys.executable, "-c", ENGINE_WRITER, str(path), str(d), str(k)], stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 1.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        store = segment.SegmentStore(d, 1 << 40, read_only=True)
        good, bad = store.verify()
        assert bad == 0 and store.corrupt <= 1          # at most a torn tail, which is never served
    store = segment.SegmentStore(d, 1 << 40, read_only=True)
    assert len(store.index) > 0
    prompts = [writer_prompt(random.Random(seed)) for seed in range(3)]      # each writer's first prompt
    plain = LLM(path, **KW)
    tiered = LLM(path, **RELOAD, cache_dir=d)
    for prompt in prompts:
        assert run(tiered, prompt) == run(plain, prompt)
    tiered.close()


@pytest.mark.parametrize("blocks", [[3, 4, 5, 6, 7, 8], [9, 2, 7, 4, 11, 5]], ids=["consecutive", "scattered"])
@pytest.mark.parametrize("offset", [8, 3], ids=["aligned", "unaligned"])
def test_restore_puts_every_stream_of_every_block_in_place(family, blocks, offset):
    """Payloads 0-4 lie back to back in one buffer (rows of the staging memory a disk reload
    read into: copied as one view, block 2's copy skipped as one that failed to verify),
    payload 5 is loose (host tier: restored). The blocks they go to are consecutive (slice
    copies) or scattered (indexed copies, in int64 where aligned)."""
    _, path, _ = family
    store = LLM(path, **KW, host_cache_bytes=1 << 20).store
    size = store.payload_bytes
    buf = torch.randint(0, 256, (offset + 6 * size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    payloads = [buf[offset + i * size:offset + (i + 1) * size] for i in range(6)]
    store._scatter(buf[offset:offset + 5 * size].view(5, size), blocks[:2] + [-1] + blocks[3:5], store.keys_of[0])
    store.restore([payloads[5].clone()], blocks[5:])
    for i, (p, b) in enumerate(zip(payloads, blocks)):
        at = 0
        for k in store.keys_of[0]:
            page = store.pools.pages[k][b].reshape(-1).view(torch.uint8)
            assert torch.equal(page, torch.zeros_like(page) if i == 2 else p[at:at + store.sizes[k]]), (b, k)
            at += store.sizes[k]
