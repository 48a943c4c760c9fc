"""`tierlm` command line. Bad input -> one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import TierlmError, os_error

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="tierlm: plan and run LLMs on cheap memory (HBM, host DRAM, NVMe).")
err = Console(stderr=True, emoji=False, markup=False, highlight=False)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__
        print(f"tierlm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the tierlm version and exit.")) -> None:
    """tierlm: plan and run LLMs on cheap memory (HBM, host DRAM, NVMe)."""


def _fail(msg: str) -> None:
    """One line on stderr, exit 2. Control characters from user input are shown escaped."""
    safe = "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in msg)
    err.print(f"error: {safe}", soft_wrap=True)
    raise typer.Exit(2)


def _weight_dtypes(values: List[str]) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" in v:
            comp, dtype = v.split("=", 1)
        else:
            comp, dtype = "*", v
        out[comp.strip()] = dtype.strip()
    return out


@app.command()
def plan(
    models: List[str] = typer.Argument(..., help="Registry ids/aliases or paths to config.json / checkpoint dirs."),
    context: str = typer.Option("128k", "--context", "-c", help="Comma list; k=1e3, M=1e6, Ki=2^10, Mi=2^20."),
    batch: str = typer.Option("1", "--batch", "-b", help="Concurrent sequences: a whole number (8, 1k), or max "
                              "(the largest batch that fits on the device)."),
    kv_dtype: str = typer.Option("bf16", "--kv-dtype", help="bf16 | fp8 | fp4 | fp16 | fp32"),
    indexer_dtype: str = typer.Option("bf16", "--indexer-dtype", help="bf16 | fp8 | fp4 | fp16 | fp32 (DSA / V4 indexer keys)"),
    state_dtype: str = typer.Option("auto", "--state-dtype", help="auto (each model's own) | fp32 | bf16 | fp16: "
                                    "recurrent / compressor state"),
    mtp: bool = typer.Option(False, "--mtp", help="Include MTP / draft layers (cache and weights)."),
    hardware: str = typer.Option("h200", "--hardware", help="Catalog name (see `tierlm hardware`) or a JSON file."),
    devices: Optional[int] = typer.Option(None, "--devices", "--tp", help="Devices (tensor/expert parallel). Default: fewest that fit, up to one node."),
    layout: str = typer.Option("ideal", "--layout", help="ideal | vllm | sglang | tierlm (the engine's own pools)"),
    weight_dtype: List[str] = typer.Option([], "--weight-dtype", help="COMPONENT=DTYPE or DTYPE for all, repeatable."),
    dp_attention: bool = typer.Option(False, "--dp-attention", help="Attention data-parallel across the devices "
                                      "(each holds its own sequences' cache, all heads), routed experts expert-parallel, "
                                      "the rest replicated: the DeepSeek / SGLang / TensorRT-LLM deployment."),
    expert_imbalance: float = typer.Option(1.0, "--expert-imbalance", help="Busiest device's routed-expert load "
                                           "over the mean (1 = perfectly even)."),
    gpu_util: float = typer.Option(0.9, "--gpu-util", help="Fraction of device memory tierlm may plan for."),
    as_json: bool = typer.Option(False, "--json", help="Print the plans as JSON."),
    explain: bool = typer.Option(False, "--explain", help="Print every formula with its values."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write cache-vs-context plot (.png or .svg)."),
    export: Optional[str] = typer.Option(None, "--export", help="Print the serving flags the plan implies: vllm | sglang."),
    allow_unknown_fields: bool = typer.Option(False, "--allow-unknown-fields", help="Ignore config fields tierlm does not know."),
) -> None:
    """Memory, placement, throughput and cost of MODELS at each --context."""
    from .plan.planner import Options
    from .plan.planner import plan as make_plan
    from .spec.registry import load_spec
    from .units import as_count, parse_count_list
    try:
        contexts = parse_count_list(context)
        batch = batch if batch == "max" else as_count(batch, "--batch")
        if export is not None and export not in ("vllm", "sglang"):
            raise TierlmError(f"--export must be vllm or sglang, got {export!r}")
        opts = Options(batch=batch, kv_dtype=kv_dtype, indexer_dtype=indexer_dtype, state_dtype=state_dtype,
                       mtp=mtp, layout=layout,
                       hardware=hardware, devices=devices, weight_dtypes=_weight_dtypes(weight_dtype) or None,
                       gpu_util=gpu_util, dp_attention=dp_attention, expert_imbalance=expert_imbalance)
        opts.check()
        specs = [load_spec(m, allow_unknown_fields) for m in models]
        plans = [make_plan(s, c, opts) for s in specs for c in contexts]
        if plot:
            from .plan.plot import plot_memory
            plot_memory(specs, plot, opts.kv_dtype, opts.indexer_dtype, 1 if batch == "max" else batch, mtp, layout)
    except TierlmError as e:
        _fail(str(e))
    except OSError as e:                   # a file path no reader turned into a TierlmError
        _fail(str(os_error(e.filename or "file", e)))
        return
    if as_json:
        sys.stdout.write(json.dumps({"plans": [p.data for p in plans]}, indent=2) + "\n")
        return
    if export:
        from .plan.export import serving_flags
        for p in plans:
            print(f"# {p.data['model']} @ {p.data['context']} tokens")
            print(serving_flags(p.data, export))
        return
    from .plan.report import print_plans
    print_plans(plans, explain)
    if plot:
        Console().print(f"wrote {plot}")


@app.command()
def models(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the built-in model registry."""
    from .plan.report import print_table
    from .spec.registry import entries
    rows = [{"id": e.id, "aliases": list(e.aliases), "model_type": e.config.get("model_type"),
             "source": e.source.get("url"), "published": e.published} for e in entries().values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title="tierlm registry")
    for col in ("id", "aliases", "model_type", "source"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["id"], ", ".join(r["aliases"]), str(r["model_type"]), str(r["source"]))
    print_table(t)


@app.command("hardware")
def hardware_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the hardware catalog."""
    from .plan.hardware import catalog
    from .plan.report import print_table
    rows = [{"name": h.name, "description": h.description, "memory_bytes": h.device_memory,
             "bandwidth": h.device_bandwidth, "flops": h.flops, "price_per_hour": h.price_per_hour,
             "unofficial": h.unofficial} for h in catalog().values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title="tierlm hardware catalog (per device; dense FLOPs)")
    for col in ("name", "memory", "bandwidth", "bf16 / fp8 TFLOPS", "$/h", "description"):
        t.add_column(col)
    for h in catalog().values():
        fl = " / ".join(f"{h.flops[d] / 1e12:,.0f}" if d in h.flops else "-" for d in ("bf16", "fp8"))
        t.add_row(h.name + (" (unofficial)" if h.unofficial else ""), f"{h.device_memory / 1e9:,.0f} GB",
                  f"{h.device_bandwidth / 1e12:.2f} TB/s", fl,
                  "-" if h.price_per_hour is None else f"{h.price_per_hour:.2f}", h.description)
    print_table(t)


def _engine(model: str, dtype: Optional[str], device: Optional[str], kv_dtype: str, max_model_len: Optional[int],
            tiers: dict | None = None, **kw):
    from .runtime import LLM
    return LLM(model, dtype=dtype, device=device, kv_dtype=kv_dtype, max_model_len=max_model_len, **(tiers or {}), **kw)


def _tier_options(cache_dir: Optional[str], kv_tiers: Optional[str], host_cache: Optional[str],
                  disk_cache: Optional[str], tier_policy: str, tier_write: str = "through",
                  remote_cache: Optional[str] = None, cache_ttl: Optional[str] = None) -> dict:
    """LLM keyword arguments of the --cache-dir / --kv-tiers / --host-cache / --disk-cache /
    --remote-cache / --cache-ttl options."""
    from .units import parse_bytes, parse_seconds
    return {"cache_dir": cache_dir, "tier_policy": tier_policy, "tier_write": tier_write,
            "kv_tiers": kv_tiers,                   # "host,disk,redis://...": LLM splits it
            "host_cache_bytes": parse_bytes(host_cache, "--host-cache") if host_cache else None,
            "disk_cache_bytes": parse_bytes(disk_cache, "--disk-cache") if disk_cache else None,
            "remote_cache_bytes": parse_bytes(remote_cache, "--remote-cache") if remote_cache else None,
            "cache_ttl_s": parse_seconds(cache_ttl, "--cache-ttl") if cache_ttl else None}


def _offload_options(experts_on: str, device_experts: Optional[str], engram_on: str) -> dict:
    """LLM keyword arguments of --experts-on / --device-experts / --engram-on."""
    from .units import parse_bytes
    return {"experts_on": experts_on, "engram_on": engram_on,
            "device_expert_bytes": parse_bytes(device_experts, "--device-experts") if device_experts else None}


CACHE_DIR = typer.Option(None, "--cache-dir", help="Directory of the disk KV tier (kept across runs).")
EXPERTS_ON = typer.Option("device", "--experts-on", help="device | host | disk (mapped from the checkpoint)")
DEVICE_EXPERTS = typer.Option(None, "--device-experts", help="Device budget for resident experts, e.g. 2GiB "
                              "(default: half of the routed experts).")
ENGRAM_ON = typer.Option("device", "--engram-on", help="device | host | disk: where Engram tables live")
KV_TIERS = typer.Option(None, "--kv-tiers", help="host,disk[,redis://host:port/db] (default: host, plus disk "
                        "with --cache-dir); a Redis URL last adds a store shared by many engines.")
HOST_CACHE = typer.Option(None, "--host-cache", help="Host KV tier budget, e.g. 8GiB.")
DISK_CACHE = typer.Option(None, "--disk-cache", help="Disk KV tier budget, e.g. 100GiB.")
REMOTE_CACHE = typer.Option(None, "--remote-cache", help="Remote KV tier budget of this model's blocks, shared by "
                            "the engines using it, e.g. 64GiB (default 64GiB).")
CACHE_TTL = typer.Option(None, "--cache-ttl", help="How long a block stays on disk / in the remote store after "
                         "its last use, e.g. 6h (the default), 30m, 3600.")
TIER_POLICY = typer.Option("auto", "--tier-policy", help="auto | reload | recompute")
TIER_WRITE = typer.Option("through", "--tier-write", help="through: blocks go to disk at once | back: when the "
                          "host tier evicts them or the engine stops")


@app.command()
def generate(
    model: str = typer.Argument(..., help="Checkpoint directory (config.json + safetensors)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (needs tokenizer.json)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Comma-separated prompt token ids."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos"),
    stream: bool = typer.Option(False, "--stream", help="Print text as it is generated."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32 | fp64 (default: the checkpoint's)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cpu)."),
    kv_dtype: str = typer.Option("auto", "--kv-dtype", help="auto (the model dtype) | bf16 | fp8"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len"),
    cache_dir: Optional[str] = CACHE_DIR,
    kv_tiers: Optional[str] = KV_TIERS,
    host_cache: Optional[str] = HOST_CACHE,
    disk_cache: Optional[str] = DISK_CACHE,
    remote_cache: Optional[str] = REMOTE_CACHE,
    cache_ttl: Optional[str] = CACHE_TTL,
    tier_policy: str = TIER_POLICY,
    tier_write: str = TIER_WRITE,
    experts_on: str = EXPERTS_ON,
    device_experts: Optional[str] = DEVICE_EXPERTS,
    engram_on: str = ENGRAM_ON,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with ids, text and stats."),
) -> None:
    """Generate a completion for one prompt."""
    import time
    try:
        if (prompt is None) == (prompt_ids is None):
            raise TierlmError("give exactly one of --prompt and --prompt-ids")
        if prompt_ids is not None:
            try:
                request = [int(t) for t in prompt_ids.split(",") if t.strip()]
            except ValueError:
                raise TierlmError("--prompt-ids must be comma-separated integers") from None
        else:
            request = prompt
        from .runtime import SamplingParams
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                seed=seed, ignore_eos=ignore_eos)
        llm = _engine(model, dtype, device, kv_dtype, max_model_len,
                      {**_tier_options(cache_dir, kv_tiers, host_cache, disk_cache, tier_policy, tier_write,
                                     remote_cache, cache_ttl),
                       **_offload_options(experts_on, device_experts, engram_on)})
        t0 = time.perf_counter()
        shown, out = "", None
        for out in llm.generate_stream(request, params):
            text = out.outputs[0].text
            if stream and not as_json:
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        dt = time.perf_counter() - t0
        stats = llm.stats()
        llm.close()
    except TierlmError as e:
        _fail(str(e))
    except OSError as e:                   # a file path no reader turned into a TierlmError
        _fail(str(os_error(e.filename or "file", e)))
        return
    c = out.outputs[0]
    if as_json:
        print(json.dumps({"prompt_token_ids": out.prompt_token_ids, "token_ids": c.token_ids, "text": c.text,
                          "finish_reason": c.finish_reason, "seconds": dt,
                          "cache_bytes": llm.cache_bytes(len(out.prompt_token_ids) + len(c.token_ids)),
                          "prefix_hit_tokens_by_tier": stats["prefix_hit_tokens_by_tier"]}))
        return
    if stream:
        sys.stdout.write("\n")
    elif c.text:
        print(c.text)
    if not c.text:
        print(" ".join(map(str, c.token_ids)))
    err.print(f"{len(c.token_ids)} tokens in {dt:.2f} s ({len(c.token_ids) / dt:.1f} tok/s), finish: {c.finish_reason}")


@app.command()
def bench(
    mode: str = typer.Argument(..., help="prefill | decode"),
    model: str = typer.Argument(..., help="Checkpoint directory."),
    batch: int = typer.Option(1, "--batch", "-b"),
    context: int = typer.Option(512, "--context", "-c", help="Prompt tokens per sequence."),
    tokens: int = typer.Option(32, "--tokens", help="Decode: tokens generated per sequence."),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    device: Optional[str] = typer.Option(None, "--device"),
    kv_dtype: str = typer.Option("auto", "--kv-dtype"),
    cache_dir: Optional[str] = CACHE_DIR,
    kv_tiers: Optional[str] = KV_TIERS,
    host_cache: Optional[str] = HOST_CACHE,
    disk_cache: Optional[str] = DISK_CACHE,
    remote_cache: Optional[str] = REMOTE_CACHE,
    cache_ttl: Optional[str] = CACHE_TTL,
    tier_policy: str = TIER_POLICY,
    tier_write: str = TIER_WRITE,
    experts_on: str = EXPERTS_ON,
    device_experts: Optional[str] = DEVICE_EXPERTS,
    engram_on: str = ENGRAM_ON,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Engine throughput: tokens/s and the cache bytes one sequence holds."""
    from .units import fmt_bytes
    try:
        if mode not in ("prefill", "decode"):
            raise TierlmError(f"mode must be prefill or decode, got {mode!r}")
        for name, v in (("--batch", batch), ("--context", context), ("--tokens", tokens)):
            if v < 1:
                raise TierlmError(f"{name} must be >= 1, got {v}")
        from .runtime import bench as b
        llm = _engine(model, dtype, device, kv_dtype, None,
                      {**_tier_options(cache_dir, kv_tiers, host_cache, disk_cache, tier_policy, tier_write,
                                     remote_cache, cache_ttl),
                       **_offload_options(experts_on, device_experts, engram_on)},
                      max_num_seqs=batch, max_num_batched_tokens=max(512, context))
        res = b.prefill(llm, batch, context) if mode == "prefill" else b.decode(llm, batch, context, tokens)
        llm.close()
    except TierlmError as e:
        _fail(str(e))
    except OSError as e:                   # a file path no reader turned into a TierlmError
        _fail(str(os_error(e.filename or "file", e)))
        return
    if as_json:
        print(json.dumps(res))
        return
    line = f"{mode}: batch {batch}, context {context}: {res['tokens_per_s']:,.1f} tokens/s"
    if mode == "decode":
        line += f" ({res['step_ms']:.2f} ms/step)"
    print(line + f"; cache {fmt_bytes(res['cache_bytes_per_seq'])} per sequence")


@app.command()
def demo(
    steps: int = typer.Option(300, "--steps", help="Training steps (batch 8 x 256 tokens each)."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[str] = typer.Option(None, "--out", help="Checkpoint directory (default: a cache directory "
                                      "keyed by the settings, under $TIERLM_CACHE or ~/.cache/tierlm)."),
    run_grpo: bool = typer.Option(False, "--grpo", help="Then improve it with GRPO (reward: the code parses)."),
    grpo_steps: int = typer.Option(20, "--grpo-steps"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with every figure."),
) -> None:
    """Train a tiny DeepSeek-V4 on the Python standard library (Muon + MTP loss), serve it with
    MTP speculation, and optionally improve it with GRPO."""
    from pathlib import Path
    from .units import fmt_bytes
    try:
        for name, v in (("--steps", steps), ("--grpo-steps", grpo_steps)):
            if v < 1:
                raise TierlmError(f"{name} must be >= 1, got {v}")
        from .train import demo as d
        settings = d.DemoSettings(steps=steps, seed=seed)
        say = (lambda *a: None) if as_json else err.print
        path, summary = d.build(settings, Path(out) if out else None, progress=not as_json, log=say)
        rep = d.report(path)
        result = {"checkpoint": str(path), "train": summary, "serve": rep}
        if run_grpo:
            result["grpo"] = d.grpo(path, settings, grpo_steps, progress=not as_json, log=say)
    except TierlmError as e:
        _fail(str(e))
    except OSError as e:                   # a file path no reader turned into a TierlmError
        _fail(str(os_error(e.filename or "file", e)))
        return
    if as_json:
        print(json.dumps(result))
        return
    mtp = rep["mtp"]
    print(f"checkpoint: {path}")
    print(f"training: {summary['train_tokens']:,} tokens at {summary['train_tokens_per_s']:,.0f} tok/s, "
          f"loss {summary['first_loss']:.2f} -> {summary['final_loss']:.2f}, "
          f"MTP loss {summary['first_mtp_loss']:.2f} -> {summary['final_mtp_loss']:.2f}")
    print(f"--- {rep['prompt']!r} ->")
    print(rep["prompt"] + rep["text"])
    print(f"--- {rep['tokens']} tokens at {rep['tokens_per_s']:.1f} tok/s")
    t = Table(title="cache bytes per sequence, by stream")
    t.add_column("stream")
    for n in rep["cache"]:
        t.add_column(f"{int(n):,} tokens", justify="right")
    streams = sorted({k for c in rep["cache"].values() for k in c["by_stream"]})
    for name in streams:
        t.add_row(name, *[fmt_bytes(c["by_stream"].get(name, 0), short=True) for c in rep["cache"].values()])
    t.add_row("total", *[fmt_bytes(c["total"], short=True) for c in rep["cache"].values()])
    t.add_row("GQA, same width", *[f"{fmt_bytes(c['gqa_same_width'], short=True)} "
                                    f"({c['gqa_same_width'] / c['total']:.0f}x)" for c in rep["cache"].values()])
    Console().print(t)
    print(f"MTP speculation: acceptance {mtp['acceptance_rate']:.0%}, {mtp['tokens_per_s_on']:.1f} vs "
          f"{mtp['tokens_per_s_off']:.1f} tok/s without ({mtp['speedup']:.2f}x), greedy output identical: "
          f"{mtp['greedy_identical']}")
    if run_grpo:
        g = result["grpo"]
        print(f"GRPO: held-out reward {g['reward_before']:.3f} -> {g['reward_after']:.3f}, rollouts "
              f"{g['rollout_tokens_per_s']:,.0f} tok/s; saved to {g['saved']}")


@app.command()
def cache(
    action: str = typer.Argument(..., help="ls | stats | verify | clear"),
    directory: str = typer.Argument(..., help="A cache directory (LLM(cache_dir=...), --cache-dir) or a remote "
                                    "store's URL (redis://host:port/db)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Inspect or clear a disk or remote tier: blocks per model, bytes, ages; verify re-checks every checksum."""
    import time
    from .tiers.remote import is_remote
    from .tiers.segment import SegmentStore
    from .units import fmt_bytes
    try:
        if action not in ("ls", "stats", "verify", "clear"):
            raise TierlmError(f"action must be ls, stats, verify or clear, got {action!r}")
        if is_remote(directory):
            return _remote_cache(action, directory, as_json)
        store = SegmentStore(directory, budget_bytes=1 << 62, read_only=action != "clear")
        if action == "clear":
            n = len(store.index)
            store.clear()
            store.close()
            print(f"removed {n} blocks from {directory}")
            return
        models: dict[bytes, dict] = {}
        for e in store.index.values():
            m = models.setdefault(e.fingerprint, {"blocks": 0, "bytes": 0, "oldest": e.created, "newest": e.created,
                                                  "model": None})
            m["blocks"] += 1
            m["bytes"] += e.size
            m["oldest"], m["newest"] = min(m["oldest"], e.created), max(m["newest"], e.created)
            if m["model"] is None:
                m["model"] = (store.layout(e.layout) or {}).get("model", "?")
        usage = store.usage()
        result = {"directory": directory, "bytes": store.nbytes(), "blocks": len(store.index),
                  "segments": len(store.segments), "torn_or_corrupt": store.corrupt, "usage": usage,
                  "rates": store.rates(), "models": [{"fingerprint": fp.hex(), **m} for fp, m in models.items()]}
        if action == "verify":
            good, bad = store.verify()
            result.update(good=good, bad=bad)
    except TierlmError as e:
        _fail(str(e))
    except OSError as e:                   # a file path no reader turned into a TierlmError
        _fail(str(os_error(e.filename or "file", e)))
        return
    if as_json:
        print(json.dumps(result))
    else:
        now = time.time()
        print(f"{directory}: {result['blocks']:,} blocks, {fmt_bytes(result['bytes'])} in {result['segments']} segments")
        for m in result["models"]:
            print(f"  {m['model']} ({m['fingerprint'][:12]}): {m['blocks']:,} blocks, {fmt_bytes(m['bytes'])}, "
                  f"ages {(now - m['newest']) / 60:.0f}-{(now - m['oldest']) / 60:.0f} min")
        if action == "stats" and usage:
            hits = usage.get("hit_tokens", {})
            print(f"  since created: {usage.get('stored', 0):,} blocks stored, {usage.get('reloads', 0):,} reloads, "
                  f"{usage.get('recomputes', 0):,} recomputes; hit tokens " + ", ".join(f"{k} {v:,}" for k, v in hits.items()))
        rates = result["rates"]
        if action == "stats" and rates:
            prefill = [f"{v / 1e9:,.1f} GFLOP/s ({k.split(':')[1]}, model {k.split(':')[2][:12]})"
                       for k, v in rates.items() if k.startswith("prefill:")]
            links = [f"{k.split(':', 1)[1]} {v / 1e9:,.2f} GB/s" for k, v in rates.items() if k.startswith("remote_read:")]
            print("  learned here: " + "; ".join(
                ([f"disk reads {rates['disk_read'] / 1e9:,.2f} GB/s"] if "disk_read" in rates else [])
                + ([f"prefill {', '.join(prefill)}"] if prefill else [])
                + ([f"remote reads {', '.join(links)}"] if links else [])))
        if action == "verify":
            print(f"verified {result['good']:,} blocks, {result['bad']:,} corrupt (dropped from the index)")
    if action == "verify" and result["bad"]:
        raise typer.Exit(1)


def _remote_cache(action: str, url: str, as_json: bool) -> None:
    """`tierlm cache ACTION redis://...`: the models' namespaces on a shared store."""
    import time
    from .tiers import remote
    from .units import fmt_bytes
    shown = remote.redact(url)
    try:
        import redis
        try:
            if action == "clear":
                print(f"removed {remote.clear(url)} values from {shown}")
                return
            models = remote.namespaces(url)
            result = {"url": shown, "values": sum(m["values"] for m in models),
                      "bytes": sum(m["bytes"] for m in models), "models": models}
            if action == "verify":
                result["good"], result["bad"] = remote.verify(url)
        except redis.RedisError as e:
            raise TierlmError(f"remote store {shown}: {type(e).__name__}: {e}") from None
    except TierlmError as e:
        _fail(str(e))
        return
    if as_json:
        print(json.dumps(result))
    else:
        now = time.time()
        print(f"{shown}: {result['values']:,} values (runs of blocks), {fmt_bytes(result['bytes'])}, "
              f"{len(models)} models")
        for m in models:
            ages = (f", last used {(now - m['newest']) / 60:.0f}-{(now - m['oldest']) / 60:.0f} min ago"
                    if m["newest"] is not None else "")
            print(f"  {m['model']} ({m['fingerprint'][:12]}): {m['values']:,} values, {fmt_bytes(m['bytes'])}{ages}")
        if action == "verify":
            print(f"verified {result['good']:,} values, {result['bad']:,} corrupt (deleted)")
    if action == "verify" and result["bad"]:
        raise typer.Exit(1)


from .serve.cli import serve as _serve  # noqa: E402  (imports only typer; the server loads lazily)

app.command(name="serve")(_serve)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
