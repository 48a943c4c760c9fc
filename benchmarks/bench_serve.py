"""Benchmark: `tierlm serve` under load against the same load sent to `tierlm.LLM` in-process.

The demo model (trained, or reused from $TIERLM_CACHE, by `tierlm.train.demo.build`) is
served by a `tierlm serve` subprocess on loopback with --max-num-seqs 32. 32 client threads
each send 5 streaming greedy completions (OpenAI `/v1/completions`, `stream: true`); the 160
prompts are token ids from standard-library source: 8 shared prefixes of 64 tokens, each
followed by its own suffix of 4-60 tokens, so later requests hit the prefix cache. Every
response must equal `LLM.generate` on the same prompt token for token, and none may fail.

Recorded: p50 / p99 time to first token (request sent -> first streamed token), total
generated tokens / wall time, the server's peak RSS; baseline: the same closed loop run
in-process (`LLM.add_request` / `step`, 32 requests in flight, each client's next request sent
when its last one finishes) with the same engine settings. Ratio = server tokens/s / in-process
tokens/s (goal: the server adds <= 10 % to the throughput cost, ratio >= 0.9).

    python benchmarks/bench_serve.py [--clients 32] [--requests 5] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tierlm import LLM, SamplingParams
from tierlm.train import demo
from tierlm.train.data import split, stdlib_files


def prompts(llm: LLM, count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    text = "".join(split(stdlib_files(1 << 20))[0][:40])
    ids = llm.tokenizer.encode(text, add_special_tokens=False).ids
    prefixes = [ids[i * 200:i * 200 + 64] for i in range(8)]
    out = []
    for k in range(count):
        start = rng.randrange(2000, len(ids) - 100)
        out.append(prefixes[k % 8] + ids[start:start + rng.randrange(4, 61)])
    return out


def closed_loop(llm: LLM, work, clients: int, requests: int, params: SamplingParams):
    """The server's load in-process: `clients` requests in flight, each client sending its next
    one when the last finishes. Returns (tokens per prompt, tokens/s, first-token latencies)."""
    want: list[list[int]] = [[] for _ in work]
    sent, first = {}, {}
    start = time.perf_counter()

    def send(k: int) -> None:
        llm.add_request({"prompt_token_ids": work[k]}, params, request_id=str(k))
        sent[k] = time.perf_counter()

    for c in range(clients):
        send(c * requests)
    while llm.scheduler.has_work():
        for out in llm.step():
            k = int(out.request_id)
            if out.outputs[0].token_ids and k not in first:
                first[k] = time.perf_counter() - sent[k]
            if out.finished:
                want[k] = out.outputs[0].token_ids
                llm._requests.pop(out.request_id, None)
                if (k + 1) % requests:
                    send(k + 1)
    wall = time.perf_counter() - start
    return want, sum(map(len, want)) / wall, sorted(first.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    path, _ = demo.build(demo.DemoSettings())
    n = args.clients * args.requests
    kw = dict(max_model_len=512, max_num_seqs=args.clients)          # what `tierlm serve` builds
    llm = LLM(path, **kw)
    work = prompts(llm, n)
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate({"prompt_token_ids": work[0]}, greedy)                       # warm-up
    llm.reset_prefix_cache()
    want, base, base_ttft = closed_loop(llm, work, args.clients, args.requests, greedy)
    del llm

    port = free_port()
    exe = Path(sys.executable).parent / "tierlm"
    server = subprocess.Popen([str(exe), "serve", str(path), "--port", str(port), "--max-num-seqs", str(args.clients),
                               "--max-model-len", "512", "--served-model-name", "demo", "--log-level", "warning",
                               "--max-queue", str(n)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    body = {"model": "demo", "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    warm = httpx.post(f"{url}/v1/completions", json={**body, "prompt": work[0], "stream": False}, timeout=60)
    assert warm.status_code == 200, warm.text

    def client(c: int) -> list[tuple[int, float, list[int], int]]:
        got = []
        with httpx.Client(base_url=url, timeout=120) as h:
            for r in range(args.requests):
                k = c * args.requests + r
                t0, first, ids, status = time.perf_counter(), None, [], 0
                with h.stream("POST", "/v1/completions", json={**body, "prompt": work[k]}) as resp:
                    status = resp.status_code
                    for line in resp.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        for ch in chunk.get("choices", []):
                            if ch.get("token_ids"):
                                first = first or time.perf_counter() - t0
                                ids += ch["token_ids"]
                got.append((k, first, ids, status))
        return got

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        results = [x for f in [pool.submit(client, c) for c in range(args.clients)] for x in f.result()]
    wall = time.perf_counter() - start
    rss = peak_rss(server.pid)
    server.send_signal(signal.SIGTERM)
    server.wait(60)
    bad = [k for k, _, ids, status in results if status != 200 or ids != want[k]]
    ttft = sorted(t for _, t, _, _ in results)
    served = sum(len(ids) for _, _, ids, _ in results) / wall
    p50, p99 = statistics.median(ttft), ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
    print(f"{args.clients} streaming clients x {args.requests} requests ({n} prompts of 68-124 tokens, 8 shared "
          f"64-token prefixes, {args.max_tokens} greedy tokens each) on the demo model")
    print(f"  served: {served:,.1f} tok/s, TTFT p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, "
          f"{len(bad)} wrong or failed responses, server peak RSS {rss / 2**20:.0f} MiB")
    print(f"  in-process LLM, the same closed loop of {args.clients} requests in flight: {base:,.1f} tok/s, TTFT p50 "
          f"{statistics.median(base_ttft) * 1e3:.0f} ms; ratio served / in-process {served / base:.2f}")
    print(json.dumps({"served_tokens_per_s": served, "inprocess_tokens_per_s": base, "ratio": served / base,
                      "ttft_p50_s": p50, "ttft_p99_s": p99, "bad": len(bad), "server_peak_rss": rss}))
    if bad:
        raise SystemExit(f"responses differ from LLM.generate for prompts {bad[:5]}")


if __name__ == "__main__":
    main()
