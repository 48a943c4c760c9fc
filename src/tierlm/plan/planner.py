"""The planner: one (model, context) -> bytes, placement, limits, roofline and cost.

`plan()` is the Python API behind `tierlm plan`; it returns a `Plan` whose `.data` is the
JSON object documented in docs/planner.md, and whose `.explain` lists every formula with
its values substituted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import TierlmError
from ..spec.model import ModelSpec
from ..spec.registry import load_spec
from ..units import GB, fmt_bytes
from . import memory, roofline
from .hardware import Hardware, load_hardware, tier_prices
from .placement import budget, fits_anywhere, fits_device, largest, place

DEFAULT_HARDWARE = "h200"
MAX_DEVICES = 1024


@dataclass
class Plan:
    data: dict[str, Any]
    explain: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    batch: int = 1
    kv_dtype: str = "bf16"
    indexer_dtype: str = "bf16"
    state_dtype: str = "auto"           # fixed per-sequence state; auto: each stream's own dtype
    mtp: bool = False
    layout: str = "ideal"
    hardware: str = DEFAULT_HARDWARE
    devices: int | None = None          # tensor/expert-parallel size; None: fewest that fit (<= one node)
    weight_dtypes: dict[str, str] | None = None
    gpu_util: float = 0.9
    eta_mem: float = roofline.ETA_MEM
    eta_flops: float = roofline.ETA_FLOPS

    def check(self) -> None:
        if self.batch < 1:
            raise TierlmError(f"--batch must be >= 1, got {self.batch}")
        if self.devices is not None and not 1 <= self.devices <= MAX_DEVICES:
            raise TierlmError(f"--devices must be between 1 and {MAX_DEVICES}, got {self.devices}")
        if not 0 < self.gpu_util <= 1:
            raise TierlmError(f"--gpu-util must be in (0, 1], got {self.gpu_util}")
        for flag, v in (("--eta-mem", self.eta_mem), ("--eta-flops", self.eta_flops)):
            if not 0 < v <= 1:
                raise TierlmError(f"{flag} must be in (0, 1], got {v}")
        memory.check_cache_dtypes(self.kv_dtype, self.indexer_dtype, self.layout, self.state_dtype)
        memory.resolve_weight_dtypes(self.weight_dtypes)


def _items(spec: ModelSpec, o: Options, context: int, batch: int, tp: int) -> dict[str, int]:
    w = memory.weights(spec, o.weight_dtypes, mtp=o.mtp, tp=tp)
    cold = ("routed_experts", "mtp", "engram")
    kv = memory.cache_total_bytes(spec, context, batch, o.kv_dtype, o.indexer_dtype, o.mtp, o.layout, tp, o.state_dtype)
    return {"hot_weights": sum(c.bytes_per_device for n, c in w.items() if n not in cold),
            "kv_cache": kv,
            "mtp": w["mtp"].bytes_per_device if "mtp" in w else 0,
            "routed_experts": w["routed_experts"].bytes_per_device if "routed_experts" in w else 0,
            "engram": w["engram"].bytes_per_device if "engram" in w else 0}


def min_devices(spec: ModelSpec, o: Options, hw: Hardware, context: int, batch: int) -> int | None:
    """Fewest devices holding everything on device (per-device bytes shrink as devices grow)."""
    b = budget(hw, o.gpu_util)

    def ok(n: int) -> bool:
        return fits_device(_items(spec, o, context, batch, n), b)
    hi = 1
    while not ok(hi):
        if hi >= MAX_DEVICES:
            return None
        hi = min(2 * hi, MAX_DEVICES)
    lo = hi // 2          # ok(lo) is false (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def _auto_devices(spec: ModelSpec, o: Options, hw: Hardware, context: int, batch: int) -> int:
    """Fewest devices of one node that hold everything, among tensor-parallel sizes engines
    accept (powers of two dividing the attention heads); else the largest such size."""
    b = budget(hw, o.gpu_util)
    sizes = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= hw.devices_per_node and spec.num_heads % n == 0] or [1]
    for n in sizes:
        if fits_device(_items(spec, o, context, batch, n), b):
            return n
    return sizes[-1]


def plan(model: str | ModelSpec, context: int, options: Options | None = None, **kw: Any) -> Plan:
    """Plan one model at one context. `kw` are Options fields (batch=, kv_dtype=, ...)."""
    o = options or Options(**kw)
    o.check()
    spec = model if isinstance(model, ModelSpec) else load_spec(model)
    hw = load_hardware(o.hardware)
    if context < 1:
        raise TierlmError(f"--context must be >= 1, got {context}")
    ex: list[tuple[str, str]] = []
    B = o.batch

    # ---- cache
    layers = memory.cache_bytes(spec, context, B, o.kv_dtype, o.indexer_dtype, o.mtp, o.layout, 1, o.state_dtype)
    kv = sum(c.kv_bytes for c in layers)
    ix = sum(c.indexer_bytes for c in layers)
    st = sum(c.state_bytes for c in layers)
    _explain_cache(ex, spec, o, context, layers)

    # ---- devices and placement
    auto = o.devices is None
    tp = o.devices
    if tp is None:
        tp = _auto_devices(spec, o, hw, context, B)
    w = memory.weights(spec, o.weight_dtypes, mtp=o.mtp, tp=tp)
    items = _items(spec, o, context, B, tp)
    b = budget(hw, o.gpu_util)
    placed = place(items, b)
    on_device = fits_device(items, b)
    anywhere = all(row["unplaced"] == 0 for row in placed.values())
    ex.append(("placement", f"device budget = {hw.device_memory:,} B x gpu_util {o.gpu_util} = {b.device:,} B per device; "
               f"host {b.host:,} B; disk {b.disk:,} B per device; items per device: "
               + ", ".join(f"{k} {v:,} B" for k, v in items.items())))

    # ---- limits (inverse solvers)
    def ctx_ok_device(s: int) -> bool:
        return fits_device(_items(spec, o, s, B, tp), b)

    def ctx_ok_tiered(s: int) -> bool:
        return fits_anywhere(_items(spec, o, s, B, tp), b)

    def batch_ok(n: int) -> bool:
        return fits_device(_items(spec, o, context, n, tp), b)

    limits = {
        "max_context_on_device": max(largest(ctx_ok_device, 1, spec.max_position), 0),
        "max_context_tiered": max(largest(ctx_ok_tiered, 1, spec.max_position), 0),
        "max_batch_on_device": max(largest(batch_ok, 1, 1 << 20), 0),
        "min_devices": min_devices(spec, o, hw, context, B),
        "model_max_position": spec.max_position,
    }

    # ---- roofline
    decode = _decode(spec, o, hw, context, tp, items, placed, w, ex)
    prefill = _prefill(spec, o, hw, context, tp, w, ex)
    reload = _reload(spec, o, hw, tp, ex)
    cost = _cost(hw, tp, decode, prefill, spec, o, context, ex)

    comps = {n: {"params": c.params, "bytes": c.bytes, "per_device_bytes": c.bytes_per_device,
                 "dtypes": list(c.dtypes)} for n, c in w.items()}
    data = {
        "model": spec.name, "family": spec.family, "context": context, "batch": B,
        "kv_dtype": o.kv_dtype, "indexer_dtype": o.indexer_dtype, "state_dtype": o.state_dtype, "mtp": o.mtp,
        "layout": o.layout,
        "kv_cache": {
            "total_bytes": kv + ix + st, "kv_bytes": kv, "indexer_bytes": ix, "state_bytes": st,
            "bytes_per_token": (kv + ix) // (context * B) if context * B else 0,
            "per_device_bytes": items["kv_cache"],
            "read_bytes_per_step": memory.cache_read_bytes(spec, context, o.kv_dtype, o.indexer_dtype, o.mtp, o.layout,
                                                           1, o.state_dtype) * B,
            "layers": [{"layer": c.layer, "attention": c.attention, "compress_ratio": c.compress_ratio,
                        "mtp": c.mtp, "kv_bytes": c.kv_bytes, "indexer_bytes": c.indexer_bytes,
                        "state_bytes": c.state_bytes} for c in layers],
        },
        "weights": {
            "total_bytes": sum(c.bytes for c in w.values()),
            "total_params": sum(c.params for c in w.values()),
            "active_params": memory.active_params(spec),
            "per_device_bytes": sum(c.bytes_per_device for c in w.values()),
            "components": comps,
        },
        "hardware": {"name": hw.name, "devices": tp, "device_memory_bytes": hw.device_memory, "devices_chosen": "auto" if auto else "user",
                     "device_budget_bytes": b.device, "host_budget_bytes": b.host, "disk_budget_bytes": b.disk,
                     "unofficial": hw.unofficial},
        "placement": {"items": placed, "fits_on_device": on_device, "fits": anywhere},
        "limits": limits, "decode": decode, "prefill": prefill, "reload_vs_recompute": reload, "cost": cost,
        "notes": list(spec.notes) + ([f"context {context:,} exceeds the model's max_position_embeddings "
                                      f"{spec.max_position:,}; bytes are extrapolated"]
                                     if context > spec.max_position else []),
    }
    return Plan(data, ex)


def _explain_cache(ex, spec, o, context, layers) -> None:
    from ..spec.cache import block_size, layer_cache_streams
    from .layouts import record_bits, state_dtype_of, stored_entries
    block = block_size(spec) if o.layout == "tierlm" else 0
    seen = set()
    for layer in spec.all_layers(o.mtp):
        key = (layer.attention, layer.compress_ratio, layer.window, layer.csa, layer.kv_shared, layer.shared_indexer)
        if key in seen:
            continue
        seen.add(key)
        n = sum(1 for l in spec.all_layers(o.mtp)
                if (l.attention, l.compress_ratio, l.window, l.csa, l.kv_shared, l.shared_indexer) == key)
        parts = []
        for s in layer_cache_streams(spec, layer):
            dtype = {"indexer": o.indexer_dtype, "state": state_dtype_of(s, o.state_dtype)}.get(s.role, o.kv_dtype)
            bits = record_bits(s, s.width, dtype, o.layout, layer.attention)
            e = stored_entries(s, layer, context, o.layout, block=block)
            how = f"{block}-token blocks" if block else {"token": f"floor({context}/{s.ratio})" if s.ratio > 1 else f"{context}",
                   "window": f"min({context}, {s.window})", "fixed": "fixed"}[s.per]
            parts.append(f"{s.name}: {e:,} entries [{how}] x {bits / 8:g} B ({s.width} el, {dtype})")
        label = layer.attention + (f" {'csa' if layer.csa else 'hca' if layer.compress_ratio else 'swa'} ratio "
                                   f"{layer.compress_ratio}" if layer.attention == "v4" else "") \
            + (f" window {layer.window}" if layer.attention == "sliding" else "") \
            + (" kv-shared" if layer.kv_shared else "") + (" shared-indexer" if layer.shared_indexer else "")
        ex.append((f"cache {label} x{n} layers", ("; ".join(parts) or "nothing stored") + f"; x batch {o.batch}"))
    total = memory.cache_total(layers)
    ex.append(("cache total", f"sum over {len(layers)} layers = {total:,} B = {fmt_bytes(total)}"))


def _tier_bw(hw: Hardware, tier: str, eta: float) -> float:
    """Effective read bandwidth of a tier for one device; 0 when the hardware has no such tier."""
    if tier == "device":
        return hw.device_bandwidth * eta
    if tier == "host":
        return hw.host_read_bandwidth * eta if hw.host_memory > 0 else 0.0
    return hw.disk_read_per_device * eta if hw.disk_capacity > 0 else 0.0


def _decode(spec, o, hw, context, tp, items, placed, w, ex) -> dict:
    B = o.batch
    unplaced = sum(row["unplaced"] for row in placed.values())
    if unplaced:
        return {"error": f"does not fit: {unplaced:,} B per device have no room on device, host or disk"}
    moe = spec.moe
    frac = 1.0
    if moe is not None:
        frac = roofline.expected_experts_touched(moe.num_experts, moe.top_k, B) / moe.num_experts
    kv_read = memory.cache_read_bytes(spec, context, o.kv_dtype, o.indexer_dtype, o.mtp, o.layout, tp, o.state_dtype) * B
    # The input embedding is a lookup of B rows, not a full read (unless tied to the head).
    lookup = 0 if spec.tie_embeddings else -(-memory.embedding_bytes(spec, o.weight_dtypes) // tp)
    reads = {"hot_weights": items["hot_weights"] - lookup, "kv_cache": kv_read,
             "mtp": int(items["mtp"] * (frac if moe else 1)),
             "routed_experts": int(items["routed_experts"] * frac), "engram": 0}
    by_tier = {"device": 0.0, "host": 0.0, "disk": 0.0}
    for name, r in reads.items():
        stored = items[name]
        if not stored or not r:
            continue
        for tier in by_tier:
            by_tier[tier] += r * placed[name][tier] / stored
    t_mem = 0.0
    for tier, nbytes in by_tier.items():
        if nbytes:
            bw = _tier_bw(hw, tier, o.eta_mem)
            if bw <= 0:
                return {"error": f"{hw.name} describes no {tier} bandwidth"}
            t_mem += nbytes / bw
    active = memory.active_params(spec)
    attn = sum(n * roofline.attention_flops(spec, l, context) for l, n in memory.layer_kinds(spec, o.mtp))
    flops = 2 * active * B / tp + B * attn / tp
    peak = roofline.peak_flops(hw.flops, spec.quant.linear if not o.weight_dtypes else o.weight_dtypes.get("*", spec.quant.linear))
    t_cmp = flops / (peak[1] * o.eta_flops) if peak else None
    t = max(t_mem, t_cmp or 0.0)
    ex.append(("decode bytes/step", f"per device: hot weights {reads['hot_weights']:,} (input embedding "
               f"{lookup:,} B not read) + routed experts "
               f"{items['routed_experts']:,} x touched {frac:.4f} + KV read {kv_read:,} (batch {B}) -> "
               + ", ".join(f"{k} {v:,.0f} B" for k, v in by_tier.items())))
    ex.append(("decode time", f"t_mem = sum(bytes_tier / (bw_tier x eta {o.eta_mem})) = {t_mem * 1e3:.3f} ms; "
               + (f"t_compute = 2 x {active:,} active x {B} / {tp} + attention = {flops:.3e} FLOP / "
                  f"({peak[1]:.3e} x {o.eta_flops}) = {t_cmp * 1e3:.3f} ms" if peak else "t_compute unknown (no FLOPs in hardware file)")
               + f"; step = {t * 1e3:.3f} ms -> {B / t:,.1f} tok/s"))
    return {"bytes_read": {k: int(v) for k, v in by_tier.items()}, "flops": int(flops),
            "compute_dtype": peak[0] if peak else None,
            "t_memory_s": t_mem, "t_compute_s": t_cmp, "t_step_s": t,
            "tokens_per_s": B / t, "tokens_per_s_per_user": 1 / t,
            "bound": "memory" if t_cmp is None or t_mem >= t_cmp else "compute"}


def prefill_flops(spec, context: int, batch: int = 1) -> float:
    """FLOPs of a causal prefill of `context` tokens (the runtime's reload-or-recompute policy uses it too)."""
    active = memory.active_params(spec)
    attn = sum(n * roofline.attention_flops(spec, l, context, cumulative=True)
               for l, n in memory.layer_kinds(spec, False))
    return float(batch) * (2 * active * context + attn)


def _prefill(spec, o, hw, context, tp, w, ex) -> dict:
    flops = prefill_flops(spec, context, o.batch) / tp
    nbytes = sum(c.bytes_per_device for c in w.values())
    peak = roofline.peak_flops(hw.flops, spec.quant.linear)
    t_mem = nbytes / (hw.device_bandwidth * o.eta_mem)
    t_cmp = flops / (peak[1] * o.eta_flops) if peak else None
    t = max(t_mem, t_cmp or 0.0)
    ex.append(("prefill", f"FLOPs = batch x (2 x active x S + sum over queries of attention) / tp = {flops:.3e}; "
               f"t = max({t_cmp or 0:.4f} s compute, {t_mem:.4f} s weight read) = {t:.4f} s"))
    return {"tokens": context * o.batch, "flops": int(flops), "t_s": t,
            "tokens_per_s": context * o.batch / t, "bound": "memory" if t_cmp is None or t_mem >= t_cmp else "compute"}


def _reload(spec, o, hw, tp, ex) -> dict:
    """Context above which reloading a cached prefix from a tier beats recomputing it.

    recompute(S) = prefill FLOPs(S) / (peak x eta) (marginal compute in a busy batch);
    reload(S) = cache bytes(S) / tier read bandwidth.
    """
    peak = roofline.peak_flops(hw.flops, spec.quant.linear)
    out = {}
    for tier in ("host", "disk"):
        bw = _tier_bw(hw, tier, o.eta_mem)
        if bw <= 0 or peak is None:
            out[tier] = {"bandwidth": bw, "break_even_context": None,
                         "note": f"{hw.name} describes no {tier} tier" if bw <= 0 else "no FLOPs in hardware file"}
            continue

        def reload_wins(s: int) -> bool:
            nbytes = memory.cache_total_bytes(spec, s, 1, o.kv_dtype, o.indexer_dtype, False, o.layout, tp, o.state_dtype)
            return nbytes / bw < prefill_flops(spec, s) / tp / (peak[1] * o.eta_flops)

        grid = [1 << i for i in range(0, 40) if 1 << i <= spec.max_position] + [spec.max_position]
        losing = [s for s in grid if not reload_wins(s)]
        if not losing:
            s_star = 1
        elif losing[-1] == spec.max_position:
            s_star = None
        else:
            lo = losing[-1]
            hi = next(s for s in grid if s > lo)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if not reload_wins(mid) else (lo, mid)
            s_star = hi
        out[tier] = {"bandwidth": bw, "break_even_context": s_star}
        ex.append((f"reload vs recompute ({tier})", f"reload(S) = cache_bytes(S) / {bw:.3e} B/s vs recompute(S) = "
                   f"prefill FLOPs(S) / ({peak[1]:.3e} x {o.eta_flops}); reload wins from S = {s_star}"))
    return out


def _cost(hw, tp, decode, prefill, spec, o, context, ex) -> dict:
    if hw.price_per_hour is None:
        return {"price_per_hour": None, "note": f"{hw.name} has no price_per_hour; add one in a hardware file"}
    if "error" in decode:
        return {"price_per_hour": hw.price_per_hour * tp, "note": decode["error"]}
    price = hw.price_per_hour * tp
    per_tok = lambda tps: price / (tps * 3600) * 1e6
    kv1 = memory.cache_total_bytes(spec, context, 1, o.kv_dtype, o.indexer_dtype, False, o.layout, tp, o.state_dtype)
    per_token_kv = kv1 / context
    hit = {}
    for tier in ("device", "host", "disk"):
        bw = _tier_bw(hw, tier, o.eta_mem)
        hit[tier] = price / 3600 * per_token_kv * 1e6 / bw if bw > 0 else None
    rates = tier_prices()
    # One copy of the cache on host or disk; on the device every rank holds its share
    # (a full copy for replicated MLA / V4 latents).
    one_copy = memory.cache_total_bytes(spec, context, 1, o.kv_dtype, o.indexer_dtype, False, o.layout, 1, o.state_dtype)
    hold = {"device": kv1 * tp / GB * hw.price_per_hour / (hw.device_memory / GB),
            "host": one_copy / GB * rates["host_dram_per_gb_hour"]
            if "host_dram_per_gb_hour" in rates and hw.host_memory > 0 else None,
            "disk": one_copy / GB * rates["nvme_per_gb_hour"] if "nvme_per_gb_hour" in rates and hw.disk_capacity > 0 else None}
    out = {"price_per_hour": price, "output_per_mtok": per_tok(decode["tokens_per_s"]),
           "input_per_mtok": per_tok(prefill["tokens_per_s"]), "cache_hit_input_per_mtok": hit,
           "hold_context_per_hour": hold}
    ex.append(("cost", f"$/h = {hw.price_per_hour} x {tp} devices = {price:.2f}; output $/Mtok = $/h / (tok/s x 3600) x 1e6 "
               f"= {out['output_per_mtok']:.4f}; input $/Mtok = {out['input_per_mtok']:.4f}; holding one {context:,}-token "
               f"context ({one_copy:,} B, {kv1:,} B per device): device {hold['device']:.5f} $/h "
               f"(device $/h / device GB x bytes on all {tp} devices)"))
    return out
