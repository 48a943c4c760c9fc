"""Benchmark: the disk KV tier against the raw disk, against recomputing, and against llama.cpp.

1. Reload bandwidth: a --context-token prefix's blocks reloaded from the disk tier by a fresh
   engine (`reload_seconds`: read, verified and put into the pools, timed inside the engine;
   also mapped, as the read-ahead thread reads) vs a raw sequential read (1 MiB reads
   into one reused buffer) of the same byte ranges (and, for reference, of the whole segment
   files), with the page cache dropped before every read (posix_fadvise DONTNEED). Median of
   --repeat, alternating. The planner's predicted reload time, cache bytes (`tierlm plan --layout tierlm`)
   / the raw bandwidth just measured, is compared with the measured one.
2. Time to first token of a --context-token prompt: recomputed (no tiers) vs reloaded from the
   disk tier by a fresh engine (page cache dropped), on the demo model and a random tiny V4.
3. The same prefix saved and restored by llama.cpp's state files (`llama_state_save_file` /
   `llama_state_load_file`, state file fsynced once and page cache dropped before each
   restore) + evaluating the last token, vs tierlm's disk reload + first token, each in a
   fresh context / engine, on the ~100M-parameter Llama of bench_llamacpp.py (f32 both).
   Median of --repeat, alternating, who goes first too (A B B A ...). The reload of this
   larger prefix (62.5 MiB at 4,000 tokens) is also compared with a raw read of the same
   bytes, as in 1. The save, once each: llama.cpp's `llama_state_save_file` + fsync after its
   prefill, against how long after tierlm's prefill returned its blocks were all on disk
   (and that prefill against one with no tiers); save + restore is the two added.

    python benchmarks/bench_tiers.py [--context 32768] [--llamacpp-context 4000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_engine  # noqa: E402
import tierlm  # noqa: E402
from tierlm import LLM, SamplingParams  # noqa: E402
from tierlm.runtime.blocks import block_hash, hash_chain  # noqa: E402
from tierlm.tiers.segment import SegmentStore  # noqa: E402
from tierlm.tiers.store import TierStore  # noqa: E402
from tierlm.train import demo  # noqa: E402

FIRST = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def drop_cache(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files) -> tuple[int, float]:
    drop_cache(files)
    n, start = 0, time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            while chunk := os.read(fd, 1 << 20):
                n += len(chunk)
        finally:
            os.close(fd)
    return n, time.perf_counter() - start


def raw_ranges(store: SegmentStore, ranges, files) -> tuple[int, float]:
    """Bytes and seconds of reading exactly these (segment, start, end) ranges with 1 MiB
    reads into one reused buffer, page cache dropped first: the raw disk for the same bytes."""
    drop_cache(files)
    buf = memoryview(bytearray(1 << 20))
    n, start = 0, time.perf_counter()
    for seg, lo, hi in ranges:
        fd = os.open(store._segment_path(seg), os.O_RDONLY)
        try:
            at = lo
            while at < hi:
                got = os.preadv(fd, [buf[:min(1 << 20, hi - at)]], at)
                if got <= 0:
                    break
                at += got
                n += got
        finally:
            os.close(fd)
    return n, time.perf_counter() - start


def prompt(path, n: int) -> list[int]:
    from tierlm.spec import load_config_file, parse_config
    vocab = parse_config(load_config_file(path)).vocab_size
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, vocab, (n,), generator=g).tolist()


def ttft(llm: LLM, ids: list[int]) -> float:
    start = time.perf_counter()
    llm.generate({"prompt_token_ids": ids}, FIRST)
    return time.perf_counter() - start


def fill(path, d: Path, ids, **kw) -> tuple[float, float]:
    """Prefill ids into a fresh disk tier; returns the recompute TTFT measured on the way and
    how long after it returned every block was on disk (written and fsynced; the writer
    thread writes them while the prefill runs)."""
    llm = LLM(path, cache_dir=d, tier_policy="recompute", max_model_len=len(ids) + 8, max_num_seqs=1, **kw)
    t = ttft(llm, ids)
    start = time.perf_counter()
    llm.store.flush()
    durable = time.perf_counter() - start
    llm.close()
    return t, durable


def reload_ttft(path, d: Path, ids, **kw) -> tuple[float, dict]:
    """TTFT of a fresh engine reloading ids' prefix from the disk tier, the page cache
    dropped after the engine started (its start reads the record headers)."""
    llm = LLM(path, cache_dir=d, tier_policy="reload", max_model_len=len(ids) + 8, max_num_seqs=1, **kw)
    rate = llm.store.bandwidth["disk"]               # what the policy expects of this reload: learned by
    learned = rate.value if rate.measured else None  # the earlier engines on the directory, or a guess
    drop_cache(sorted(d.glob("seg-*.log")))
    t = ttft(llm, ids)
    stats = {**llm.stats(), "learned_disk_rate": learned, "whole_prompt": llm.manager.resume_last}
    llm.close()
    return t, stats


def reload_ranges(d: Path, ids: list[int], whole: bool):
    """(store, keys, byte ranges) of what a reload of ids reads: the records holding its blocks
    and the resume record after the last one, adjacent records merged into one range. whole:
    the engine takes every block of a block-aligned prompt (it resumes at the last token),
    else the blocks short of the prompt's last token."""
    store = SegmentStore(d, 1 << 62, read_only=True)
    first = next(iter(store.index.values()))
    block = store.layout(first.layout)["block_size"]
    chain = hash_chain(first.fingerprint, ids if whole else ids[:-1], block)
    keys = [k for k in chain if k in store.index]
    keys += [k for k in (block_hash(h, ()) for h in reversed(keys)) if k in store.index][:1]
    records = {(store.index[k].segment, store.index[k].offset): store.index[k].length for k in keys}
    ranges = []
    for (seg, off), length in sorted(records.items()):
        if ranges and ranges[-1][0] == seg and ranges[-1][2] == off:
            ranges[-1][2] = off + length
        else:
            ranges.append([seg, off, off + length])
    return store, keys, ranges


def reloads(path, d: Path, ids: list[int], repeat: int, **kw) -> dict:
    """--repeat rounds, alternating: a fresh engine's TTFT reloading ids' prefix from disk
    (its reload alone timed inside the engine: `reload_seconds`, the read, checks and copies
    into the pools), a mapped read of the same records (as the read-ahead thread reads) and a
    raw read of the same byte ranges, the page cache dropped before each."""
    files = sorted(d.glob("seg-*.log"))
    ttfts, engine, mapped, raw, whole, hits, rates = [], [], [], [], [], None, []
    for i in range(repeat):
        t, stats = reload_ttft(path, d, ids, **kw)
        if i == 0:
            store, keys, ranges = reload_ranges(d, ids, stats["whole_prompt"])
            fp = store.index[keys[0]].fingerprint
        ttfts.append(t)
        engine.append(stats["reload_seconds"])
        rates.append(stats["learned_disk_rate"])
        hits = stats["prefix_hit_tokens_by_tier"]
        drop_cache(files)
        start = time.perf_counter()
        got = store.get_many(keys, fp)
        mapped.append(time.perf_counter() - start)
        assert all(g is not None for g in got)
        del got                                   # unmap, or the page cache cannot drop those pages
        gc.collect()
        n, t = raw_ranges(store, ranges, files)
        raw.append(t)
        whole.append(raw_read(files))
    nbytes = sum(hi - lo for _, lo, hi in ranges)
    # the policy's own prediction (latency + bytes / the disk rate it started with), for the runs
    # that started from a rate learned by an earlier engine, vs each run's measured reload
    policy = [(TierStore.LATENCY["disk"] + nbytes / r, e) for r, e in zip(rates, engine) if r]
    return {"bytes": nbytes, "blocks": len(keys), "records": len({store.index[k].record for k in keys}),
            "disk_bytes": sum(f.stat().st_size for f in files), "reload_ttft_s": statistics.median(ttfts),
            "reload_ttft_runs_s": ttfts, "disk_hit_tokens": hits["disk"],
            "reload_s": statistics.median(engine), "reload_runs_s": engine, "raw_s": statistics.median(raw),
            "policy_predicted_runs_s": [p for p, _ in policy], "policy_measured_runs_s": [e for _, e in policy],
            "mapped_GBps": nbytes / statistics.median(mapped) / 1e9,
            "reload_GBps": nbytes / statistics.median(engine) / 1e9, "raw_GBps": n / statistics.median(raw) / 1e9,
            "whole_files_GBps": whole[0][0] / statistics.median(t for _, t in whole) / 1e9}


def llamacpp(tmp: Path, context: int, threads: int, repeat: int) -> dict:
    import bench_llamacpp as bl
    import llama_cpp
    ckpt = bl.make_checkpoint(tmp / "llama", "f32")
    gguf_path = bl.write_gguf(ckpt, tmp / "llama.gguf", "f32")
    ids = bl.prompt_ids(context)
    # llama.cpp: evaluate and save the state file once (on the disk, so that dropping the page
    # cache really drops it: dirty pages would stay cached and make the restore a memory copy)
    llm = bl.open_llama_cpp(gguf_path, "f32", context + 16, threads)
    start = time.perf_counter()
    llm.eval(ids[:-1])
    cpp_prefill = time.perf_counter() - start
    state = tmp / "state.bin"
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    start = time.perf_counter()                   # the save: from the prefill's end to the state on disk
    assert llama_cpp.llama_state_save_file(llm.ctx, str(state).encode(), arr, len(ids) - 1)
    fd = os.open(state, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    cpp_save = time.perf_counter() - start
    del llm
    # tierlm: the same weights and prefix into a disk tier
    d = tmp / "kv-llama"
    ours_prefill, ours_save = fill(ckpt, d, ids, dtype=torch.float32)
    plain = LLM(ckpt, max_model_len=len(ids) + 8, max_num_seqs=1, dtype=torch.float32)
    ours_plain_prefill = ttft(plain, ids)           # the same prefill with no tier to write to
    plain.close()

    def cpp_round() -> tuple[float, float]:
        """llama.cpp: restore in a fresh context, page cache dropped, then one token."""
        llm = bl.open_llama_cpp(gguf_path, "f32", context + 16, threads)
        drop_cache([state])
        out = (llama_cpp.llama_token * (context + 16))()
        n_out = ctypes.c_size_t(0)
        start = time.perf_counter()
        assert llama_cpp.llama_state_load_file(llm.ctx, str(state).encode(), out, context + 16, ctypes.byref(n_out))
        llm.n_tokens = n_out.value
        llm.input_ids[:n_out.value] = ids[:n_out.value]
        load = time.perf_counter() - start
        llm.eval(ids[-1:])
        return time.perf_counter() - start, load

    def ours_round() -> dict:
        r = reloads(ckpt, d, ids, 1, dtype=torch.float32)
        assert r["disk_hit_tokens"] > 0
        return r

    cpp, ours = [], []
    for i in range(repeat):     # fresh engines, medians; who goes first alternates (A B B A ...), so a
        if i % 2 == 0:          # machine that speeds up or slows down during the run favours neither
            cpp.append(cpp_round())
            ours.append(ours_round())
        else:
            ours.append(ours_round())
            cpp.append(cpp_round())
    cpp_restore, cpp_load = (statistics.median(x) for x in zip(*cpp))
    ours_reload, ours_load = (statistics.median(r[k] for r in ours) for k in ("reload_ttft_s", "reload_s"))
    raw = statistics.median(r["raw_s"] for r in ours)
    return {"context": context, "repeat": repeat, "llamacpp_state_bytes": state.stat().st_size,
            "llamacpp_prefill_s": cpp_prefill, "llamacpp_restore_s": cpp_restore, "llamacpp_load_s": cpp_load,
            "llamacpp_save_s": cpp_save, "tierlm_save_s": ours_save, "tierlm_prefill_no_tiers_s": ours_plain_prefill,
            "save_restore_ratio": (cpp_save + cpp_load) / (ours_save + ours_load),
            "tierlm_load_s": ours_load, "tierlm_prefill_s": ours_prefill, "tierlm_reload_s": ours_reload,
            "tierlm_disk_bytes": sum(f.stat().st_size for f in d.glob("seg-*.log")), "bytes": ours[0]["bytes"],
            "raw_s": raw, "reload_vs_raw": raw / ours_load,
            "llamacpp_restore_runs_s": [c for c, _ in cpp], "llamacpp_load_runs_s": [c for _, c in cpp],
            "tierlm_reload_runs_s": [r["reload_ttft_s"] for r in ours], "tierlm_load_runs_s": [r["reload_s"] for r in ours],
            "ratio": cpp_restore / ours_reload, "load_ratio": cpp_load / ours_load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--llamacpp-context", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--models", default="demo,tiny-v4", help="which of demo,tiny-v4 to run (empty: only llama.cpp)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tiers-", dir=os.environ.get("BENCH_DIR")))
    results = {}
    makers = {"demo": lambda: demo.build(demo.DemoSettings())[0],
              "tiny-v4": lambda: bench_engine.make_v4(tmp, max_position=65536)}
    for name in [m for m in args.models.split(",") if m]:
        path = makers[name]()
        d = tmp / f"kv-{name}"
        ids = prompt(path, args.context)
        recompute, _ = fill(path, d, ids)
        bw = reloads(path, d, ids, args.repeat)
        reload = bw["reload_ttft_s"]
        plan = tierlm.plan(str(path), args.context, layout="tierlm", kv_dtype="fp32", indexer_dtype="fp32")
        predicted = plan.data["kv_cache"]["total_bytes"] / (bw["raw_GBps"] * 1e9)
        results[name] = {"recompute_ttft_s": recompute, "ttft_ratio": recompute / reload, **bw,
                         "planner_cache_bytes": plan.data["kv_cache"]["total_bytes"],
                         "planner_reload_s": predicted, "planner_vs_measured": predicted / bw["reload_s"]}
        r = results[name]
        hits = {"disk": r["disk_hit_tokens"]}
        print(f"{name}: {args.context:,}-token prefix, a reload reads {r['bytes'] / 2**20:.2f} MiB: {r['blocks']:,} "
              f"blocks in {r['records']:,} records ({r['disk_bytes'] / 2**20:.2f} MiB on disk with the intermediate "
              "resume records)")
        print(f"  reload bandwidth {r['reload_GBps']:.2f} GB/s vs raw sequential read of the same bytes "
              f"{r['raw_GBps']:.2f} GB/s: ratio {r['reload_GBps'] / r['raw_GBps']:.2f} (the engine's reload: read, "
              f"verify, into the pools; runs " + ", ".join(f"{t * 1e3:.1f}" for t in r["reload_runs_s"]) + " ms; mapped, as "
              f"the read-ahead thread reads: {r['mapped_GBps']:.2f} GB/s; raw read of the whole segment files, "
              f"{r['disk_bytes'] / 2**20:.1f} MiB: {r['whole_files_GBps']:.2f} GB/s)")
        print(f"  TTFT recompute {recompute:.2f} s vs reload from disk {reload:.3f} s "
              f"({hits['disk']:,} tokens from disk): {recompute / reload:.1f}x")
        print(f"  planner: {r['planner_cache_bytes'] / 2**20:.1f} MiB / {bw['raw_GBps']:.2f} GB/s = "
              f"{predicted * 1e3:.1f} ms predicted vs {bw['reload_s'] * 1e3:.1f} ms measured "
              f"({r['planner_vs_measured']:.2f}x)")
        if r["policy_predicted_runs_s"]:
            ratios = [p / m for p, m in zip(r["policy_predicted_runs_s"], r["policy_measured_runs_s"])]
            print("  the policy's prediction (the disk rate learned by the earlier reloads on this directory): "
                  + ", ".join(f"{p * 1e3:.1f} ms predicted vs {m * 1e3:.1f} ms" for p, m in
                              zip(r["policy_predicted_runs_s"], r["policy_measured_runs_s"]))
                  + f" ({', '.join(f'{x:.2f}x' for x in ratios)})")
    if not args.skip_llamacpp:
        lc = llamacpp(tmp, args.llamacpp_context, args.threads, args.repeat)
        results["llamacpp"] = lc
        print(f"llama.cpp state file vs tierlm disk tier, {lc['context']:,}-token prefix, 99.5M Llama f32: "
              f"llama.cpp restore + 1 token {lc['llamacpp_restore_s']:.3f} s ({lc['llamacpp_state_bytes'] / 2**20:.1f} MiB), "
              f"tierlm reload + 1 token {lc['tierlm_reload_s']:.3f} s ({lc['tierlm_disk_bytes'] / 2**20:.1f} MiB): "
              f"tierlm {lc['ratio']:.2f}x faster; prefill llama.cpp {lc['llamacpp_prefill_s']:.1f} s, "
              f"tierlm {lc['tierlm_prefill_s']:.1f} s (medians of {lc['repeat']}, alternating: llama.cpp "
              + ", ".join(f"{t:.3f}" for t in lc["llamacpp_restore_runs_s"]) + " s; tierlm "
              + ", ".join(f"{t:.3f}" for t in lc["tierlm_reload_runs_s"]) + " s)")
        print(f"  restore alone: llama.cpp llama_state_load_file {lc['llamacpp_load_s']:.3f} s, tierlm reload "
              f"(read, verify, into the pools) {lc['tierlm_load_s']:.3f} s: tierlm {lc['load_ratio']:.2f}x faster "
              f"(runs: llama.cpp " + ", ".join(f"{t:.3f}" for t in lc["llamacpp_load_runs_s"]) + " s; tierlm "
              + ", ".join(f"{t:.3f}" for t in lc["tierlm_load_runs_s"]) + " s)")
        print(f"  save (one run each): llama.cpp llama_state_save_file + fsync after its prefill {lc['llamacpp_save_s']:.3f} s, "
              f"tierlm's blocks on disk {lc['tierlm_save_s']:.3f} s after its prefill returned (written while it ran; "
              f"that prefill {lc['tierlm_prefill_s']:.2f} s, the same prefill with no tiers {lc['tierlm_prefill_no_tiers_s']:.2f} s)")
        print(f"  save + restore: llama.cpp {lc['llamacpp_save_s'] + lc['llamacpp_load_s']:.3f} s, tierlm "
              f"{lc['tierlm_save_s'] + lc['tierlm_load_s']:.3f} s: tierlm {lc['save_restore_ratio']:.2f}x faster")
        print(f"  reload bandwidth of this {lc['bytes'] / 2**20:.1f} MiB prefix: {lc['bytes'] / lc['tierlm_load_s'] / 1e9:.2f} "
              f"GB/s vs raw sequential read of the same bytes {lc['bytes'] / lc['raw_s'] / 1e9:.2f} GB/s: "
              f"ratio {lc['reload_vs_raw']:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
