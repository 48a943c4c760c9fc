"""The planner: one (model, context) -> bytes, placement, limits, roofline and cost.

`plan()` is the Python API behind `tierlm plan`; it returns a `Plan` whose `.data` is the
JSON object documented in docs/planner.md, and whose `.explain` lists every formula with
its values substituted.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..dtypes import canonical
from ..errors import TierlmError, did_you_mean
from ..spec.model import ModelSpec
from ..spec.registry import load_spec
from ..units import GB, as_count, fmt_bytes
from . import memory, roofline
from .hardware import Hardware, load_hardware, tier_prices
from .placement import budget, fits_anywhere, fits_device, largest, place

DEFAULT_HARDWARE = "h200"
MAX_DEVICES = 1024
MAX_BATCH = 1 << 20


@dataclass
class Plan:
    data: dict[str, Any]
    explain: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    batch: int | str = 1                # sequences, or "max": the largest batch that fits on the device
    kv_dtype: str = "bf16"
    indexer_dtype: str = "bf16"
    state_dtype: str = "auto"           # fixed per-sequence state; auto: each stream's own dtype
    mtp: bool = False
    layout: str = "ideal"
    hardware: str = DEFAULT_HARDWARE
    devices: int | None = None          # tensor/expert-parallel size; None: fewest that fit (<= one node)
    dp_attention: bool = False          # attention data-parallel, routed experts expert-parallel, rest replicated
    expert_imbalance: float = 1.0       # busiest device's routed-expert load / the mean (>= 1)
    weight_dtypes: dict[str, str] | None = None
    gpu_util: float = 0.9
    eta_mem: float = roofline.ETA_MEM
    eta_flops: float = roofline.ETA_FLOPS

    def __post_init__(self) -> None:
        # Any spelling of a dtype name (BF16, bfloat16, torch.bfloat16) becomes tierlm's canonical
        # one; unknown names are left as given for check() to report with the accepted values.
        for key in ("kv_dtype", "indexer_dtype", "state_dtype"):
            object.__setattr__(self, key, canonical(getattr(self, key)) or getattr(self, key))
        if isinstance(self.weight_dtypes, dict):
            object.__setattr__(self, "weight_dtypes", {c: canonical(d) or d for c, d in self.weight_dtypes.items()})

    def check(self) -> None:
        if self.batch != "max" and (isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1):
            raise TierlmError(f"--batch must be a whole number >= 1 or 'max', got {self.batch!r}")
        x = self.expert_imbalance
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 1 <= x <= 1e3:
            raise TierlmError(f"--expert-imbalance must be a number in [1, 1000], got {x!r}")
        if self.devices is not None and not 1 <= self.devices <= MAX_DEVICES:
            raise TierlmError(f"--devices must be between 1 and {MAX_DEVICES}, got {self.devices}")
        if not 0 < self.gpu_util <= 1:
            raise TierlmError(f"--gpu-util must be in (0, 1], got {self.gpu_util}")
        for flag, v in (("--eta-mem", self.eta_mem), ("--eta-flops", self.eta_flops)):
            if not 0 < v <= 1:
                raise TierlmError(f"{flag} must be in (0, 1], got {v}")
        memory.check_cache_dtypes(self.kv_dtype, self.indexer_dtype, self.layout, self.state_dtype)
        memory.resolve_weight_dtypes(self.weight_dtypes)


def _tp_ep(o: Options, n: int) -> tuple[int, int]:
    """(tensor-parallel size of attention and dense parts, expert-parallel size) on n devices."""
    return (1, n) if o.dp_attention else (n, n)


def _items(spec: ModelSpec, o: Options, context: int, batch: int, n: int) -> dict[str, int]:
    """Bytes one device holds of each placement item. Tensor parallel: every device holds its
    share of every sequence's cache; DP attention: the whole cache of ceil(batch / n) sequences."""
    tp, ep = _tp_ep(o, n)
    w = memory.weights(spec, o.weight_dtypes, mtp=o.mtp, tp=tp, ep=ep)
    cold = ("routed_experts", "mtp", "engram")
    seqs = -(-batch // n) if o.dp_attention else batch
    kv = memory.cache_total_bytes(spec, context, seqs, o.kv_dtype, o.indexer_dtype, o.mtp, o.layout, tp, o.state_dtype)
    return {"hot_weights": sum(c.bytes_per_device for k, c in w.items() if k not in cold),
            "kv_cache": kv,
            "mtp": w["mtp"].bytes_per_device if "mtp" in w else 0,
            "routed_experts": w["routed_experts"].bytes_per_device if "routed_experts" in w else 0,
            "engram": w["engram"].bytes_per_device if "engram" in w else 0}


def _vision_bytes(spec: ModelSpec, o: Options, n: int) -> int:
    """Per-device bytes of the vision tower: held with the hot weights, not read per text token."""
    if not spec.vision_params:
        return 0
    tp, ep = _tp_ep(o, n)
    return memory.weights(spec, o.weight_dtypes, mtp=o.mtp, tp=tp, ep=ep)["vision_tower"].bytes_per_device


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
    accept (powers of two dividing the attention heads; any power of two under DP attention);
    else the largest such size."""
    b = budget(hw, o.gpu_util)
    sizes = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= hw.devices_per_node
             and (o.dp_attention or spec.num_heads % n == 0)] or [1]
    for n in sizes:
        if fits_device(_items(spec, o, context, batch, n), b):
            return n
    return sizes[-1]


_DEFAULTS = {f.name: f.default for f in fields(Options)}


def merge_options(options: Options | None, kw: dict[str, Any]) -> Options:
    """`options` with the keyword options filled in. A keyword naming no Options field, or one
    that contradicts a value `options` already sets (not its default), is an error."""
    if options is not None and not isinstance(options, Options):
        raise TierlmError(f"options must be a tierlm.Options, got {type(options).__name__}")
    for k in kw:
        if k not in _DEFAULTS:
            raise TierlmError(f"unknown option {k!r}.{did_you_mean(difflib.get_close_matches(k, _DEFAULTS))} "
                              f"The options are the fields of tierlm.Options: {', '.join(_DEFAULTS)}")
    if options is None:
        o = Options(**kw)
    else:
        for k, v in kw.items():
            mine = getattr(options, k)
            if mine != _DEFAULTS[k] and mine != v:
                raise TierlmError(f"option {k!r} given twice with different values: Options({k}={mine!r}) "
                                  f"and {k}={v!r}")
        o = replace(options, **kw) if kw else options
    if type(o.batch) is not int and o.batch != "max":   # '8' or '1k' like the CLI; 1.5, True, None are errors
        o = replace(o, batch=as_count(o.batch, "batch"))
    return o


def plan(model: str | ModelSpec, context: int | str, options: Options | None = None, **kw: Any) -> Plan:
    """Plan one model at one context ('128k' and '1Mi' read as on the command line). `kw` are
    Options fields (batch=, kv_dtype=, ...); they fill in what `options` leaves at its defaults."""
    o = merge_options(options, kw)
    context = as_count(context, "context")
    o.check()
    spec = model if isinstance(model, ModelSpec) else load_spec(model)
    hw = load_hardware(o.hardware)
    ex: list[tuple[str, str]] = []
    notes: list[str] = list(spec.notes)
    dp = o.dp_attention

    # ---- devices, batch and placement
    auto = o.devices is None
    n = o.devices
    if n is None:
        n = _auto_devices(spec, o, hw, context, 1 if o.batch == "max" else o.batch)
    tp, ep = _tp_ep(o, n)
    b = budget(hw, o.gpu_util)

    def batch_ok(k: int) -> bool:
        return fits_device(_items(spec, o, context, k, n), b)

    max_batch = max(largest(batch_ok, 1, MAX_BATCH), 0)
    B = o.batch
    if B == "max":
        B = max(max_batch, 1)
        ex.append(("batch max", f"largest batch whose per-device items fit the device budget at {context:,} tokens "
                   f"on {n} devices = {max_batch:,}"))
        if not max_batch:
            notes.append(f"--batch max: not one sequence of {context:,} tokens fits on the device; planned at batch 1")
    seqs = -(-B // n) if dp else B           # sequences whose cache (all heads) one device holds
    w = memory.weights(spec, o.weight_dtypes, mtp=o.mtp, tp=tp, ep=ep)
    items = _items(spec, o, context, B, n)
    placed = place(items, b)
    on_device = fits_device(items, b)
    anywhere = all(row["unplaced"] == 0 for row in placed.values())
    ex.append(("placement", f"device budget = {hw.device_memory:,} B x gpu_util {o.gpu_util} = {b.device:,} B per device; "
               f"host {b.host:,} B; disk {b.disk:,} B per device; items per device: "
               + ", ".join(f"{k} {v:,} B" for k, v in items.items())))
    if dp:
        ex.append(("dp attention", f"{n} devices: each holds the whole attention, dense FFN, shared experts and head "
                   f"(replicated) and the cache of ceil({B}/{n}) = {seqs} sequences with all heads; routed experts "
                   f"by expert parallelism, ceil(E/{n}) per device"))
    if not anywhere and not b.host and not b.disk:
        notes.append(f"{hw.name} describes no host or disk tier, so what does not fit on the device has nowhere to go")

    # ---- cache
    layers = memory.cache_bytes(spec, context, B, o.kv_dtype, o.indexer_dtype, o.mtp, o.layout, 1, o.state_dtype)
    kv = sum(c.kv_bytes for c in layers)
    ix = sum(c.indexer_bytes for c in layers)
    st = sum(c.state_bytes for c in layers)
    _explain_cache(ex, spec, o, context, layers, B)

    # ---- limits (inverse solvers)
    def ctx_ok_device(s: int) -> bool:
        return fits_device(_items(spec, o, s, B, n), b)

    def ctx_ok_tiered(s: int) -> bool:
        return fits_anywhere(_items(spec, o, s, B, n), b)

    limits = {
        "max_context_on_device": max(largest(ctx_ok_device, 1, spec.max_position), 0),
        "max_context_tiered": max(largest(ctx_ok_tiered, 1, spec.max_position), 0),
        "max_batch_on_device": max_batch,
        "min_devices": min_devices(spec, o, hw, context, B),
        "model_max_position": spec.max_position,
    }

    # ---- roofline
    decode = _decode(spec, o, hw, context, n, B, items, placed, ex, notes)
    prefill = _prefill(spec, o, hw, context, n, B, items, placed, ex, notes)
    reload = _reload(spec, o, hw, n, ex)
    cost = _cost(hw, n, decode, prefill, spec, o, context, ex)

    comps = {k: {"params": c.params, "bytes": c.bytes, "per_device_bytes": c.bytes_per_device,
                 "dtypes": list(c.dtypes)} for k, c in w.items()}
    link, link_bw = hw.device_link(n) if n > 1 else ("none", 0.0)
    data = {
        "model": spec.name, "family": spec.family, "context": context, "batch": B,
        "batch_chosen": "max" if o.batch == "max" else "user",
        "kv_dtype": o.kv_dtype, "indexer_dtype": o.indexer_dtype, "state_dtype": o.state_dtype, "mtp": o.mtp,
        "layout": o.layout, "dp_attention": dp, "expert_imbalance": o.expert_imbalance,
        "kv_cache": {
            "total_bytes": kv + ix + st, "kv_bytes": kv, "indexer_bytes": ix, "state_bytes": st,
            "bytes_per_token": (kv + ix) // (context * B) if context * B else 0,
            "per_device_bytes": items["kv_cache"],
            "sequences_per_device": seqs,
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
        "hardware": {"name": hw.name, "devices": n, "device_memory_bytes": hw.device_memory, "devices_chosen": "auto" if auto else "user",
                     "parallelism": "dp-attention" if dp else "tensor", "tensor_parallel": tp, "expert_parallel": ep,
                     "device_link": link, "device_link_bandwidth": link_bw,
                     "device_budget_bytes": b.device, "host_budget_bytes": b.host, "disk_budget_bytes": b.disk,
                     "unofficial": hw.unofficial},
        "placement": {"items": placed, "fits_on_device": on_device, "fits": anywhere},
        "limits": limits, "decode": decode, "prefill": prefill, "reload_vs_recompute": reload, "cost": cost,
        "notes": notes + ([f"context {context:,} exceeds the model's max_position_embeddings "
                           f"{spec.max_position:,}; bytes are extrapolated"] if context > spec.max_position else []),
    }
    return Plan(data, ex)


def _explain_cache(ex, spec, o, context, layers, batch) -> None:
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
        ex.append((f"cache {label} x{n} layers", ("; ".join(parts) or "nothing stored") + f"; x batch {batch}"))
    total = memory.cache_total(layers)
    ex.append(("cache total", f"sum over {len(layers)} layers = {total:,} B = {fmt_bytes(total)}"))


def _tier_bw(hw: Hardware, tier: str, eta: float) -> float:
    """Effective read bandwidth of a tier for one device; 0 when the hardware has no such tier."""
    if tier == "device":
        return hw.device_bandwidth * eta
    if tier == "host":
        return hw.host_read_bandwidth * eta if hw.host_memory > 0 else 0.0
    return hw.disk_read_per_device * eta if hw.disk_capacity > 0 else 0.0


def _peak(hw: Hardware, spec: ModelSpec, o: Options) -> tuple[str, float] | None:
    """The tensor peak GEMMs run at, decode and prefill alike: fp8 for fp8/fp4 weights (the
    checkpoint's linear dtype, or a --weight-dtype override for all components)."""
    dtype = (o.weight_dtypes or {}).get("*", spec.quant.linear)
    return roofline.peak_flops(hw.flops, dtype)


def _read_time(hw, o, reads, items, placed):
    """Bytes each item reads, split over tiers as it is placed; t = sum over tiers of bytes / bw."""
    by_tier = {"device": 0.0, "host": 0.0, "disk": 0.0}
    for name, r in reads.items():
        stored = items[name]
        if not stored or not r:
            continue
        for tier in by_tier:
            by_tier[tier] += r * placed[name][tier] / stored
    t = 0.0
    for tier, nbytes in by_tier.items():
        if nbytes:
            bw = _tier_bw(hw, tier, o.eta_mem)
            if bw <= 0:
                return by_tier, None, f"{hw.name} describes no {tier} bandwidth"
            t += nbytes / bw
    return by_tier, t, None


def _communication(spec, o, hw, n, tokens) -> dict:
    """Bytes one device sends per forward pass of `tokens` tokens on it, and the collectives.

    Tensor parallel: two ring all-reduces per layer (after attention, after the FFN / MoE), each
    moving 2 (N-1)/N x tokens x hidden x 2 B per device. DP attention: a dispatch (fp8) and a
    combine (bf16) per MoE layer, each token to top_k experts, (N-1)/N of them on other devices,
    the busiest device receiving expert_imbalance x the mean.
    """
    if n == 1:
        return {"bytes": 0, "collectives": 0, "t": 0.0, "link": "none", "bandwidth": 0.0}
    h = spec.hidden_size
    layers = spec.all_layers(o.mtp)
    if o.dp_attention:
        moe_layers = sum(1 for l in layers if l.ffn != "dense") if spec.moe is not None else 0
        k = spec.moe.top_k if spec.moe is not None else 0
        per = roofline.DISPATCH_BYTES + roofline.COMBINE_BYTES
        nbytes = int(moe_layers * tokens * k * h * per * (n - 1) / n * o.expert_imbalance)
        collectives = 2 * moe_layers
    else:
        nbytes = int(len(layers) * 2 * 2 * (n - 1) / n * tokens * h * roofline.ALLREDUCE_BYTES)
        collectives = 2 * len(layers)
    link, bw = hw.device_link(n)
    return {"bytes": nbytes, "collectives": collectives, "t": nbytes / bw if bw > 0 else None,
            "link": link, "bandwidth": bw}


def _latency(spec, o, comm) -> float:
    """Per-pass floor: every kernel's and every collective's fixed latency (roofline constants)."""
    return memory.linear_ops(spec, o.mtp) * roofline.OP_LATENCY + comm["collectives"] * roofline.COLLECTIVE_LATENCY


def _bound(parts: dict[str, float | None]) -> str:
    return max(((v or 0.0, k) for k, v in parts.items()))[1]


def _decode(spec, o, hw, context, n, B, items, placed, ex, notes) -> dict:
    unplaced = sum(row["unplaced"] for row in placed.values())
    if unplaced:
        return {"error": f"does not fit: {unplaced:,} B per device have no room on device, host or disk"}
    tp, _ = _tp_ep(o, n)
    seqs = -(-B // n) if o.dp_attention else B
    imb = o.expert_imbalance if n > 1 else 1.0
    moe = spec.moe
    frac = 1.0
    if moe is not None:
        frac = roofline.expected_experts_touched(moe.num_experts, moe.top_k, B) / moe.num_experts
    hot = min(1.0, frac * imb)           # share of its experts the busiest device reads
    kv_read = memory.cache_read_bytes(spec, context, o.kv_dtype, o.indexer_dtype, o.mtp, o.layout, tp, o.state_dtype) * seqs
    # The input embedding is a lookup of B rows, not a full read (unless tied to the head).
    lookup = 0 if spec.tie_embeddings else -(-memory.embedding_bytes(spec, o.weight_dtypes) // tp)
    vision = _vision_bytes(spec, o, n)
    reads = {"hot_weights": items["hot_weights"] - lookup - vision, "kv_cache": kv_read,
             "mtp": int(items["mtp"] * (hot if moe else 1)),
             "routed_experts": int(items["routed_experts"] * hot), "engram": 0}
    by_tier, t_mem, err = _read_time(hw, o, reads, items, placed)
    if err:
        return {"error": err}
    active, routed = memory.active_params(spec), memory.routed_active_params(spec)
    attn = sum(k * roofline.attention_flops(spec, l, context) for l, k in memory.layer_kinds(spec, o.mtp))
    flops = 2 * (active - routed) * seqs / tp + seqs * attn / tp + 2 * routed * B * imb / n
    peak = _peak(hw, spec, o)
    t_cmp = flops / (peak[1] * o.eta_flops) if peak else None
    comm = _communication(spec, o, hw, n, seqs)
    if comm["t"] is None:
        notes.append(f"{n} devices talk over a {comm['link']} link {hw.name} does not describe: "
                     "communication is not timed")
    t_lat = _latency(spec, o, comm)
    t = max(t_mem, t_cmp or 0.0, comm["t"] or 0.0) + t_lat
    ex.append(("decode bytes/step", f"per device: hot weights {reads['hot_weights']:,} (input embedding "
               f"{lookup:,} B not read" + (f", vision tower {vision:,} B not read" if vision else "") + ") + routed experts {items['routed_experts']:,} x touched min(1, {frac:.4f} x "
               f"imbalance {imb:g}) + KV read {kv_read:,} ({seqs} sequences) -> "
               + ", ".join(f"{k} {v:,.0f} B" for k, v in by_tier.items())))
    ex.append(("decode time", f"t_mem = sum(bytes_tier / (bw_tier x eta {o.eta_mem})) = {t_mem * 1e3:.3f} ms; "
               + (f"t_compute = 2 x ({active:,} - {routed:,} routed) active x {seqs} / {tp} + attention + 2 x {routed:,} "
                  f"x {B} x {imb:g} / {n} = {flops:.3e} FLOP / ({peak[1]:.3e} x {o.eta_flops}) = {t_cmp * 1e3:.3f} ms"
                  if peak else "t_compute unknown (no FLOPs in hardware file)")
               + (f"; t_comm = {comm['bytes']:,} B / {comm['bandwidth']:.3e} B/s ({comm['link']}) = {comm['t'] * 1e3:.3f} ms"
                  if comm["t"] else "")
               + f"; latency floor = {memory.linear_ops(spec, o.mtp)} kernels x {roofline.OP_LATENCY * 1e6:g} us + "
                 f"{comm['collectives']} collectives x {roofline.COLLECTIVE_LATENCY * 1e6:g} us = {t_lat * 1e3:.3f} ms"
               + f"; step = max(memory, compute, communication) + floor = {t * 1e3:.3f} ms -> {B / t:,.1f} tok/s"))
    return {"bytes_read": {k: int(v) for k, v in by_tier.items()}, "flops": int(flops),
            "compute_dtype": peak[0] if peak else None,
            "t_memory_s": t_mem, "t_compute_s": t_cmp, "t_communication_s": comm["t"],
            "communication_bytes": comm["bytes"], "t_latency_s": t_lat, "t_step_s": t,
            "tokens_per_s": B / t, "tokens_per_s_per_user": 1 / t,
            "bound": _bound({"memory": t_mem, "compute": t_cmp, "communication": comm["t"], "latency": t_lat})}


def prefill_flops(spec, context: int, batch: int = 1) -> float:
    """FLOPs of a causal prefill of `context` tokens, dense MLA layers in the MHA form engines
    prefill with (the runtime's reload-or-recompute policy uses it too)."""
    active = memory.active_params(spec)
    attn = sum(n * roofline.attention_flops(spec, l, context, cumulative=True, mha=True)
               for l, n in memory.layer_kinds(spec, False))
    return float(batch) * (2 * active * context + attn)


def _prefill(spec, o, hw, context, n, B, items, placed, ex, notes) -> dict:
    """One forward pass over B prompts of `context` tokens, per device: FLOPs at the weight
    dtype's peak, weights read once from the tier placement put them on, communication and
    the latency floor."""
    tp, _ = _tp_ep(o, n)
    seqs = -(-B // n) if o.dp_attention else B
    imb = o.expert_imbalance if n > 1 else 1.0
    active, routed = memory.active_params(spec), memory.routed_active_params(spec)
    attn = sum(k * roofline.attention_flops(spec, l, context, cumulative=True, mha=True)
               for l, k in memory.layer_kinds(spec, False))
    flops = seqs * (2 * (active - routed) * context + attn) / tp + 2 * routed * context * B * imb / n
    out = {"tokens": context * B, "flops": int(flops), "compute_dtype": None,
           "bytes_read": {"device": 0, "host": 0, "disk": 0}, "t_memory_s": None, "t_compute_s": None,
           "t_communication_s": None, "t_latency_s": None, "t_s": None, "tokens_per_s": None, "bound": None, "note": None}
    unplaced = sum(row["unplaced"] for row in placed.values())
    peak = _peak(hw, spec, o)
    if unplaced:
        out["note"] = f"does not fit: {unplaced:,} B per device have no room on device, host or disk"
        return out
    moe = spec.moe
    frac = 1.0
    if moe is not None:
        frac = min(1.0, roofline.expected_experts_touched(moe.num_experts, moe.top_k, context * B) / moe.num_experts * imb)
    lookup = 0 if spec.tie_embeddings else -(-memory.embedding_bytes(spec, o.weight_dtypes) // tp)
    reads = {"hot_weights": items["hot_weights"] - lookup - _vision_bytes(spec, o, n), "kv_cache": 0, "mtp": 0,
             "routed_experts": int(items["routed_experts"] * frac), "engram": 0}
    by_tier, t_mem, err = _read_time(hw, o, reads, items, placed)
    out["bytes_read"] = {k: int(v) for k, v in by_tier.items()}
    if err:
        out["note"] = err
        return out
    comm = _communication(spec, o, hw, n, seqs * context)
    t_lat = _latency(spec, o, comm)
    out.update(t_memory_s=t_mem, t_communication_s=comm["t"], t_latency_s=t_lat)
    if peak is None:
        out["note"] = f"{hw.name} gives no FLOPs: prefill time n/a"
        notes.append(f"prefill: {out['note']} (add device.flops to a hardware file)")
        ex.append(("prefill", f"FLOPs = {flops:.3e} per device; {out['note']}"))
        return out
    t_cmp = flops / (peak[1] * o.eta_flops)
    t = max(t_cmp, t_mem, comm["t"] or 0.0) + t_lat
    out.update(compute_dtype=peak[0], t_compute_s=t_cmp, t_s=t, tokens_per_s=context * B / t,
               bound=_bound({"memory": t_mem, "compute": t_cmp, "communication": comm["t"], "latency": t_lat}))
    ex.append(("prefill", f"FLOPs per device = {seqs} x (2 x ({active:,} - {routed:,}) x S + sum over queries of "
               f"attention (MLA in MHA form)) / {tp} + 2 x {routed:,} x S x {B} x {imb:g} / {n} = {flops:.3e}; "
               f"t = max({t_cmp:.4f} s compute at {peak[0]}, {t_mem:.4f} s weights read from their tiers "
               f"({', '.join(f'{k} {v:,.0f} B' for k, v in by_tier.items())}), {comm['t'] or 0:.4f} s communication) "
               f"+ {t_lat:.4f} s latency floor = {t:.4f} s"))
    return out


def _reload(spec, o, hw, n, ex) -> dict:
    """Context above which reloading a cached prefix from a tier beats recomputing it.

    recompute(S) = prefill FLOPs(S) / tp / (peak x eta) (marginal compute in a busy batch);
    reload(S) = cache bytes(S) per device / tier read bandwidth. Under DP attention one device
    holds and computes a sequence's whole attention (tp = 1).
    """
    tp, _ = _tp_ep(o, n)
    peak = _peak(hw, spec, o)
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
                   f"prefill FLOPs(S) / {tp} / ({peak[1]:.3e} x {o.eta_flops}); reload wins from S = {s_star}"))
    return out


def _cost(hw, n, decode, prefill, spec, o, context, ex) -> dict:
    if hw.price_per_hour is None:
        return {"price_per_hour": None, "note": f"{hw.name} has no price_per_hour; add one in a hardware file"}
    if "error" in decode:
        return {"price_per_hour": hw.price_per_hour * n, "note": decode["error"]}
    tp, _ = _tp_ep(o, n)
    price = hw.price_per_hour * n
    per_tok = lambda tps: price / (tps * 3600) * 1e6
    kv1 = memory.cache_total_bytes(spec, context, 1, o.kv_dtype, o.indexer_dtype, False, o.layout, tp, o.state_dtype)
    per_token_kv = kv1 / context
    # One sequence's cache lives on the tp devices of its group (one device under DP attention);
    # they reload their shares at once, so a reload costs that group's time.
    group = hw.price_per_hour * tp
    hit = {}
    for tier in ("device", "host", "disk"):
        bw = _tier_bw(hw, tier, o.eta_mem)
        hit[tier] = group / 3600 * per_token_kv * 1e6 / bw if bw > 0 else None
    rates = tier_prices()
    # One copy of the cache on host or disk; on the device every rank of the group holds its share
    # (a full copy for replicated MLA / V4 latents).
    one_copy = memory.cache_total_bytes(spec, context, 1, o.kv_dtype, o.indexer_dtype, False, o.layout, 1, o.state_dtype)
    hold = {"device": kv1 * tp / GB * hw.price_per_hour / (hw.device_memory / GB),
            "host": one_copy / GB * rates["host_dram_per_gb_hour"]
            if "host_dram_per_gb_hour" in rates and hw.host_memory > 0 else None,
            "disk": one_copy / GB * rates["nvme_per_gb_hour"] if "nvme_per_gb_hour" in rates and hw.disk_capacity > 0 else None}
    out = {"price_per_hour": price, "output_per_mtok": per_tok(decode["tokens_per_s"]),
           "input_per_mtok": per_tok(prefill["tokens_per_s"]) if prefill["tokens_per_s"] else None,
           "cache_hit_input_per_mtok": hit, "hold_context_per_hour": hold}
    ex.append(("cost", f"$/h = {hw.price_per_hour} x {n} devices = {price:.2f}; output $/Mtok = $/h / (tok/s x 3600) x 1e6 "
               f"= {out['output_per_mtok']:.4f}; input $/Mtok = "
               + (f"{out['input_per_mtok']:.4f}" if out["input_per_mtok"] is not None else "n/a")
               + f"; holding one {context:,}-token context ({one_copy:,} B, {kv1:,} B on each of {tp} devices): "
               f"device {hold['device']:.5f} $/h (device $/h / device GB x bytes on all {tp} devices)"))
    return out
