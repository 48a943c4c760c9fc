"""Exact cache and weight bytes from a ModelSpec.

Cache bytes are summed per layer from the layer's `CacheStream`s; weight bytes per
`ParamGroup` with the format's scale overhead. Both can be given per tensor-parallel rank.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache

from ..errors import TierlmError
from ..spec.cache import CacheStream, block_size, layer_cache_streams
from ..spec.model import LayerSpec, ModelSpec
from ..spec.params import COMPONENTS, ParamGroup, param_groups
from .layouts import BITS, CACHE_DTYPES, LAYOUTS, STATE_DTYPES, record_bits, state_dtype_of, stored_entries

WEIGHT_DTYPES = ("fp32", "bf16", "fp16", "fp8", "fp4", "int4")


@dataclass(frozen=True)
class LayerCache:
    layer: int
    attention: str
    compress_ratio: int
    mtp: bool
    kv_bytes: int
    indexer_bytes: int
    state_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.indexer_bytes + self.state_bytes


def _dtype_for(stream: CacheStream, kv_dtype: str, indexer_dtype: str, state_dtype: str = "auto") -> str:
    if stream.role == "state":
        return state_dtype_of(stream, state_dtype)
    return indexer_dtype if stream.role == "indexer" else kv_dtype


def check_cache_dtypes(kv_dtype: str, indexer_dtype: str, layout: str, state_dtype: str = "auto") -> None:
    for flag, value in (("--kv-dtype", kv_dtype), ("--indexer-dtype", indexer_dtype)):
        if value not in CACHE_DTYPES:
            raise TierlmError(f"{flag} must be one of {', '.join(CACHE_DTYPES)}, got {value!r}")
    if state_dtype not in STATE_DTYPES:
        raise TierlmError(f"--state-dtype must be one of {', '.join(STATE_DTYPES)}, got {state_dtype!r}")
    if layout not in LAYOUTS:
        raise TierlmError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def layer_cache_bytes(spec: ModelSpec, layer: LayerSpec, tokens: int, batch: int, kv_dtype: str,
                      indexer_dtype: str, layout: str = "ideal", tp: int = 1,
                      state_dtype: str = "auto") -> LayerCache:
    """Bytes one layer stores for `batch` sequences of `tokens` tokens on one TP rank."""
    sums = {"kv": 0, "indexer": 0, "state": 0}
    block = block_size(spec) if layout == "tierlm" else 0
    for s in layer_cache_streams(spec, layer):
        dtype = _dtype_for(s, kv_dtype, indexer_dtype, state_dtype)
        bits = record_bits(s, s.width_per_rank(tp), dtype, layout, layer.attention)
        entries = stored_entries(s, layer, tokens, layout, block=block)
        sums[s.role] += -(-bits * entries // 8)
    return LayerCache(layer.index, layer.attention, layer.compress_ratio, layer.mtp,
                      sums["kv"] * batch, sums["indexer"] * batch, sums["state"] * batch)


def cache_bytes(spec: ModelSpec, tokens: int, batch: int, kv_dtype: str, indexer_dtype: str,
                mtp: bool = False, layout: str = "ideal", tp: int = 1, state_dtype: str = "auto") -> list[LayerCache]:
    check_cache_dtypes(kv_dtype, indexer_dtype, layout, state_dtype)
    return [layer_cache_bytes(spec, layer, tokens, batch, kv_dtype, indexer_dtype, layout, tp, state_dtype)
            for layer in spec.all_layers(mtp)]


def cache_total(layers: list[LayerCache]) -> int:
    return sum(c.total_bytes for c in layers)


@lru_cache(maxsize=256)
def layer_kinds(spec: ModelSpec, mtp: bool) -> tuple[tuple[LayerSpec, int], ...]:
    """Distinct layer structures with their multiplicity (cache bytes do not depend on the index)."""
    counts = Counter(replace(l, index=0) for l in spec.all_layers(mtp))
    return tuple(counts.items())


def cache_total_bytes(spec: ModelSpec, tokens: int, batch: int, kv_dtype: str, indexer_dtype: str,
                      mtp: bool = False, layout: str = "ideal", tp: int = 1, state_dtype: str = "auto") -> int:
    """Same as cache_total(cache_bytes(...)), computed once per distinct layer structure."""
    return sum(n * layer_cache_bytes(spec, layer, tokens, batch, kv_dtype, indexer_dtype, layout, tp,
                                     state_dtype).total_bytes
               for layer, n in layer_kinds(spec, mtp))


# Fixed state a decode step reads in full (linear-attention and short-conv state); the V4
# compressor buffers are only written.
READ_STATE = ("conv_state", "recurrent_state", "sconv_state")


def read_entries(stream: CacheStream, layer: LayerSpec, spec: ModelSpec, context: int) -> int:
    """Entries one decode query at `context` reads from this stream (stored != read)."""
    if stream.role == "state":
        return stream.fixed_entries if stream.name in READ_STATE else 0
    n = stream.entries(context)
    if layer.attention == "msa" and stream.role == "kv" and spec.msa is not None:
        m = spec.msa                           # top-k blocks plus the local blocks
        return min(n, (m.topk_blocks + m.local_blocks) * m.block_size)
    ix = spec.indexer
    if stream.name == "latent" and layer.attention == "dsa" and ix is not None:
        return min(n, ix.topk)                 # DSA attends to the indexer's top-k only
    if stream.name == "compressed" and layer.csa and ix is not None:
        return min(n, ix.topk)                 # CSA: top-k compressed entries
    return n                                   # full, window, HCA (all), indexer keys (scanned)


def cache_read_bytes(spec: ModelSpec, context: int, kv_dtype: str, indexer_dtype: str, mtp: bool,
                     layout: str = "ideal", tp: int = 1, state_dtype: str = "auto") -> int:
    """Cache bytes one sequence reads per decode step (all layers, one TP rank)."""
    total = 0
    for layer in spec.all_layers(mtp):
        for s in layer_cache_streams(spec, layer):
            bits = record_bits(s, s.width_per_rank(tp), _dtype_for(s, kv_dtype, indexer_dtype, state_dtype),
                               layout, layer.attention)
            total += -(-bits * read_entries(s, layer, spec, context) // 8)
    return total


# ---------------------------------------------------------------------------- weights
def default_dtype(spec: ModelSpec, g: ParamGroup) -> str:
    q = spec.quant
    if g.kind == "fp32":
        return "fp32"
    if g.kind == "int32":
        return "int32"
    if g.kind in ("embedding", "vector"):
        return q.base
    comp = g.dtype_component
    if comp == "routed_experts":
        return q.experts
    if comp == "engram":
        return q.base
    return q.linear


def group_bytes(spec: ModelSpec, g: ParamGroup, dtype: str) -> int:
    """Bytes of a parameter group in `dtype`, including block-scale overhead."""
    per = g.numel // g.count
    data_bits = per * BITS[dtype]
    scale = 0
    if len(g.shape) == 2 and g.kind in ("linear", "embedding"):
        out, inp = g.shape
        if dtype == "fp8":
            b0, b1 = spec.quant.block
            scale = 4 * (-(-out // b0)) * (-(-inp // b1))   # one fp32 scale_inv per block
        elif dtype == "fp4":
            scale = out * (-(-inp // 32))                     # MXFP4: one e8m0 byte per 32
        elif dtype == "int4":
            scale = 2 * out * (-(-inp // spec.quant.group))  # bf16 scale per group
    return g.count * (-(-data_bits // 8) + scale)


@dataclass(frozen=True)
class ComponentWeights:
    component: str
    params: int
    bytes: int
    bytes_per_device: int
    dtypes: tuple[str, ...]


def resolve_weight_dtypes(overrides: dict[str, str] | None) -> dict[str, str]:
    out = {}
    for comp, dtype in (overrides or {}).items():
        if comp != "*" and comp not in COMPONENTS:
            raise TierlmError(f"--weight-dtype: unknown component {comp!r} (one of {', '.join(COMPONENTS)})")
        if dtype not in WEIGHT_DTYPES:
            raise TierlmError(f"--weight-dtype: unknown dtype {dtype!r} (one of {', '.join(WEIGHT_DTYPES)})")
        out[comp] = dtype
    return out


def weights(spec: ModelSpec, overrides: dict[str, str] | None = None, mtp: bool = True,
            tp: int = 1, ep: int | None = None) -> dict[str, ComponentWeights]:
    """Per-component parameters and bytes (total and per rank): split groups over `tp` ranks,
    routed experts over `ep` ranks (default `tp`). Attention data-parallel is tp=1, ep=N."""
    over = resolve_weight_dtypes(overrides)
    return dict(_weights(spec, tuple(sorted(over.items())), mtp, tp, tp if ep is None else ep))


@lru_cache(maxsize=4096)
def _weights(spec: ModelSpec, over_items: tuple, mtp: bool, tp: int, ep: int) -> tuple:
    over = dict(over_items)
    acc: dict[str, list] = {}
    for g in param_groups(spec):
        if g.component == "mtp" and not mtp:
            continue
        dtype = default_dtype(spec, g)
        if g.kind in ("linear", "embedding"):
            dtype = over.get(g.component, over.get(g.dtype_component, over.get("*", dtype)))
        b = group_bytes(spec, g, dtype)
        if g.dtype_component == "routed_experts" and spec.moe is not None and g.tp != "replicate":
            e = spec.moe.num_experts          # expert parallel: whole experts per rank
            dev = b * (-(-e // ep)) // e
        elif g.tp == "replicate" or tp == 1:
            dev = b
        else:
            dev = -(-b // tp)
        a = acc.setdefault(g.component, [0, 0, 0, set()])
        a[0] += g.numel
        a[1] += b
        a[2] += dev
        a[3].add(dtype)
    if spec.vision_params:
        # A multimodal wrapper's vision tower and projector (spec/config.py counts them), in the
        # checkpoint's unquantized dtype unless `--weight-dtype vision_tower=...` says otherwise (no
        # block scales counted then); split over tp like the dense layers.
        dtype = over.get("vision_tower", spec.quant.base)
        b = -(-spec.vision_params * BITS[dtype] // 8)
        acc["vision_tower"] = [spec.vision_params, b, b if tp == 1 else -(-b // tp), {dtype}]
    return tuple((c, ComponentWeights(c, *acc[c][:3], tuple(sorted(acc[c][3])))) for c in COMPONENTS if c in acc)


def embedding_bytes(spec: ModelSpec, overrides: dict[str, str] | None = None) -> int:
    """Bytes of the input embedding table (main model)."""
    over = resolve_weight_dtypes(overrides)
    g = next(g for g in param_groups(spec) if g.name == "embed_tokens" and g.component == "embeddings")
    return group_bytes(spec, g, over.get("embeddings", over.get("*", default_dtype(spec, g))))


@lru_cache(maxsize=256)
def routed_active_params(spec: ModelSpec) -> int:
    """The part of `active_params` in routed experts (top_k / num_experts of them, main model)."""
    if spec.moe is None:
        return 0
    return sum(g.numel * spec.moe.top_k // spec.moe.num_experts for g in param_groups(spec)
               if g.component == "routed_experts")


@lru_cache(maxsize=256)
def linear_ops(spec: ModelSpec, mtp: bool = False) -> int:
    """Kernels one forward pass launches, counted as the layers' weight matrices (a routed-expert
    matrix is one grouped GEMM) plus one attention kernel per layer, plus the head: the unit the
    per-kernel latency floor (`roofline.OP_LATENCY`) is charged for."""
    from ..spec.params import _layer_groups
    per_kind: dict = {}
    n = 1                                                     # lm_head
    for layer in spec.all_layers(mtp):
        key = replace(layer, index=0)
        if key not in per_kind:
            per_kind[key] = 1 + sum(1 for g in _layer_groups(spec, layer) if g.kind == "linear")
        n += per_kind[key]
    return n


@lru_cache(maxsize=256)
def active_params(spec: ModelSpec) -> int:
    """Parameters multiplied per token (2 FLOPs each): routed experts count top_k / num_experts,
    the input embedding (a lookup) and MTP layers are excluded; a tied embedding counts once as the head."""
    total = 0
    for g in param_groups(spec):
        if g.component == "mtp" or (g.name == "embed_tokens" and not spec.tie_embeddings):
            continue
        if g.component == "routed_experts" and spec.moe is not None:
            total += g.numel * spec.moe.top_k // spec.moe.num_experts
        else:
            total += g.numel
    return total
