"""Benchmark: `tierlm serve` under load against the same load sent to `tierlm.LLM` in-process.

The demo model (trained, or reused from $TIERLM_CACHE, by `tierlm.train.demo.build`) is
served by a `tierlm serve` subprocess on loopback with --max-num-seqs 32. 32 client threads
each send 5 streaming greedy completions (OpenAI `/v1/completions`, `stream: true`); the 160
prompts are token ids from standard-library source: 8 shared prefixes of 64 tokens, each
followed by its own suffix of 4-60 tokens, so later requests hit the prefix cache. Every
response must equal `LLM.generate` on the same prompt token for token, and none may fail.

Then the real `openai` client checks the server on the same model: completions and chat
completions, streamed and not, return exactly `LLM.generate`'s greedy tokens, and a second
prompt sharing a long prefix reports `cached_tokens` = `prompt_cache_hit_tokens` = the shared
prefix's whole blocks.

Recorded: p50 / p99 time to first token (request sent -> first streamed token), total
generated tokens / wall time, the server process's CPU time per token and peak RSS; baseline:
the same closed loop run in-process (`LLM.add_request` / `step`, 32 requests in flight, each
client's next request sent when its last one finishes) with the same engine settings and
compute threads (`tierlm serve`'s default: all cores but one). Ratio = server tokens/s / in-process
tokens/s (goal: the server adds <= 10 % to the throughput cost, ratio >= 0.9).

    python benchmarks/bench_serve.py [--clients 32] [--requests 5] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

    cpu = time.process_time()
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
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return want, sum(map(len, want)) / wall, sorted(first.values()), cpu / sum(map(len, want))


def expected_openai(llm: LLM, path: Path, params: SamplingParams) -> dict:
    """What the openai-client checks must get back: LLM.generate on the same texts."""
    from tierlm.serve.chat import ChatTemplate
    code = Path(json.__file__).read_text()
    shared = code[:600]
    texts = {"completion": "import os\n\ndef main():\n", "long": shared + "\ndef first(", "long2": shared + "\nclass B:"}
    messages = [{"role": "user", "content": "import sys\n"}, {"role": "assistant", "content": "def run(args):"},
                {"role": "user", "content": "    for a in args:"}]
    texts["chat"] = ChatTemplate.load(path).render(messages)
    outs = llm.generate(list(texts.values()), params)
    want = {k: o.outputs[0].token_ids for k, o in zip(texts, outs)}
    ids = [llm.tokenizer.encode(texts[k], add_special_tokens=False).ids for k in ("long", "long2")]
    common = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    return {"texts": texts, "messages": messages, "want": want, "shared_blocks_tokens": common // llm.block * llm.block}


def openai_checks(url: str, model: str, exp: dict, max_tokens: int) -> list[str]:
    """The real openai client against the server; returns the failed checks."""
    import openai
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    kw = dict(model=model, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    texts, want, failed = exp["texts"], exp["want"], []
    c = client.completions.create(prompt=texts["completion"], **kw)
    got = {"completion": c.choices[0].token_ids}
    got["completion, streamed"] = [t for ch in client.completions.create(prompt=texts["completion"], stream=True, **kw)
                                   for choice in ch.choices for t in (getattr(choice, "token_ids", None) or [])]
    chat = client.chat.completions.create(messages=exp["messages"], **kw)
    got["chat"] = chat.choices[0].token_ids
    got["chat, streamed"] = [t for ch in client.chat.completions.create(messages=exp["messages"], stream=True, **kw)
                             for choice in ch.choices for t in (getattr(choice, "token_ids", None) or [])]
    for name, ids in got.items():
        if ids != want[name.split(",")[0]]:
            failed.append(name)
    client.completions.create(prompt=texts["long"], **kw)
    second = client.completions.create(prompt=texts["long2"], **kw)
    u = second.usage
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else None
    if not (cached == getattr(u, "prompt_cache_hit_tokens", None) == exp["shared_blocks_tokens"] > 0):
        failed.append(f"cached_tokens {cached} (prompt_cache_hit_tokens {getattr(u, 'prompt_cache_hit_tokens', None)}, "
                      f"shared prefix's whole blocks {exp['shared_blocks_tokens']})")
    if second.choices[0].token_ids != want["long2"]:
        failed.append("long prompt after a prefix hit")
    return failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    ap.add_argument("--rounds", type=int, default=3, help="alternating in-process / served rounds (medians reported)")
    args = ap.parse_args()
    path, _ = demo.build(demo.DemoSettings())
    n = args.clients * args.requests
    kw = dict(max_model_len=512, max_num_seqs=args.clients)          # what `tierlm serve` builds
    import tierlm.cli  # noqa: F401  (registers `serve`; tierlm.serve.cli imports it)
    from tierlm.serve.cli import _set_threads
    _set_threads(None)                            # the server's compute threads, for the same engine
    llm = LLM(path, **kw)
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    exp = expected_openai(llm, path, greedy)
    llm.reset_prefix_cache()

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

    async def client(h: httpx.AsyncClient, work, c: int) -> list[tuple[int, float, list[int], int]]:
        got = []
        for r in range(args.requests):
            k = c * args.requests + r
            t0, first, ids, status = time.perf_counter(), None, [], 0
            async with h.stream("POST", "/v1/completions", json={**body, "prompt": work[k]}) as resp:
                status = resp.status_code
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    for ch in chunk.get("choices", []):
                        if ch.get("token_ids"):
                            first = first or time.perf_counter() - t0
                            ids += ch["token_ids"]
            got.append((k, first, ids, status))
        return got

    def load(work, clients: int) -> list[tuple[int, float, list[int], int]]:
        """`clients` concurrent streaming clients (asyncio tasks on one thread, one connection each)."""
        async def run():
            limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as h:
                parts = await asyncio.gather(*(client(h, work, c) for c in range(clients)))
            return [x for part in parts for x in part]
        return asyncio.run(run())

    # warm-up, both sides, then rounds with fresh prompts (the same 8 shared prefixes): in-process, then served
    warm = prompts(llm, args.clients, seed=-1)
    llm.generate([{"prompt_token_ids": w} for w in warm], greedy)
    load(warm, args.clients // args.requests)
    rounds, bad, ttft = [], [], []
    for r in range(args.rounds):
        work = prompts(llm, n, seed=r)
        want, base, base_ttft, base_cpu = closed_loop(llm, work, args.clients, args.requests, greedy)
        start, cpu = time.perf_counter(), cpu_seconds(server.pid)
        results = load(work, args.clients)
        wall, cpu = time.perf_counter() - start, cpu_seconds(server.pid) - cpu
        bad += [(r, k) for k, _, ids, status in results if status != 200 or ids != want[k]]
        ttft += [t for _, t, _, _ in results]
        tokens = sum(len(ids) for _, _, ids, _ in results)
        rounds.append({"served": tokens / wall, "served_cpu": cpu / tokens, "base": base, "base_cpu": base_cpu,
                       "base_ttft_p50": statistics.median(base_ttft)})
        print(f"  round {r + 1}: served {tokens / wall:,.1f} tok/s vs in-process {base:,.1f} tok/s; CPU per token "
              f"{cpu / tokens * 1e3:.2f} vs {base_cpu * 1e3:.2f} ms")
    failed = openai_checks(url, "demo", exp, args.max_tokens)
    rss = peak_rss(server.pid)
    server.send_signal(signal.SIGTERM)
    server.wait(60)
    med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
    ttft.sort()
    p50, p99 = statistics.median(ttft), ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
    print(f"{args.clients} streaming clients x {args.requests} requests ({n} prompts of 68-124 tokens, 8 shared "
          f"64-token prefixes, {args.max_tokens} greedy tokens each) on the demo model, median of {args.rounds} rounds")
    print(f"  served: {med['served']:,.1f} tok/s, TTFT p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, "
          f"{len(bad)} wrong or failed responses, server peak RSS {rss / 2**20:.0f} MiB")
    print(f"  in-process LLM, the same closed loop of {args.clients} requests in flight: {med['base']:,.1f} tok/s, "
          f"TTFT p50 {med['base_ttft_p50'] * 1e3:.0f} ms; ratio served / in-process {med['served'] / med['base']:.2f}")
    print(f"  CPU time per generated token: server process {med['served_cpu'] * 1e3:.2f} ms, in-process "
          f"{med['base_cpu'] * 1e3:.2f} ms: the server adds {med['served_cpu'] / med['base_cpu'] - 1:+.0%}")
    print(f"  openai client: completions and chat completions, streamed and not, equal LLM.generate; a prompt "
          f"sharing {exp['shared_blocks_tokens']} tokens of whole blocks reports them as cached_tokens: "
          + ("all passed" if not failed else "FAILED " + "; ".join(failed)))
    print(json.dumps({"openai_checks_failed": failed, "rounds": rounds, "median": med, "ratio": med["served"] / med["base"],
                      "ttft_p50_s": p50, "ttft_p99_s": p99, "bad": len(bad), "server_peak_rss": rss}))
    if bad or failed:
        raise SystemExit(f"responses differ from LLM.generate for {bad[:5]} (round, prompt); failed checks {failed}")


if __name__ == "__main__":
    main()
