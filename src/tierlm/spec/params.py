"""Weight inventory (`ParamGroup`s) of a ModelSpec, by component.

Shapes follow the checkpoints (Linear weights are [out, in]) so that block-scaled formats
(FP8 128x128 scales, MXFP4 32-element scales) can be counted exactly per matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .model import LayerSpec, ModelSpec

COMPONENTS = ("embeddings", "attention", "dense_ffn", "shared_experts", "routed_experts", "router",
              "other", "mtp", "engram", "vision_tower")


@dataclass(frozen=True)
class ParamGroup:
    component: str
    name: str
    shape: tuple[int, ...]
    count: int = 1            # identical copies (layers x experts)
    kind: str = "linear"      # linear | embedding | vector | fp32 | int32
    tp: str = "split"         # split across tensor-parallel ranks, or replicate
    dtype_of: str = ""        # component whose dtype applies (MTP groups keep their origin)

    @property
    def dtype_component(self) -> str:
        return self.dtype_of or self.component

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.count


def param_groups(spec: ModelSpec) -> list[ParamGroup]:
    return list(_param_groups(spec))


@lru_cache(maxsize=256)
def _param_groups(spec: ModelSpec) -> tuple[ParamGroup, ...]:
    h, V = spec.hidden_size, spec.vocab_size
    out = [ParamGroup("embeddings", "embed_tokens", (V, h), kind="embedding")]
    if not spec.tie_embeddings:
        out.append(ParamGroup("embeddings", "lm_head", (V, h), kind="embedding"))
    out.append(ParamGroup("other", "norm", (h,), kind="vector", tp="replicate"))
    if spec.hc_mult > 1:
        hc = spec.hc_mult
        out += [ParamGroup("other", "hc_head_fn", (hc, hc * h), kind="fp32", tp="replicate"),
                ParamGroup("other", "hc_head_base", (hc,), kind="fp32", tp="replicate"),
                ParamGroup("other", "hc_head_scale", (1,), kind="fp32", tp="replicate")]
    # Layers with identical structure share groups; count them once with a multiplicity.
    shapes: dict[tuple, int] = {}
    for layer in spec.layers:
        key = (layer.attention, layer.ffn, layer.compress_ratio, layer.csa, layer.shared_indexer)
        shapes[key] = shapes.get(key, 0) + 1
    for (attention, ffn, ratio, csa, shared), n in shapes.items():
        layer = LayerSpec(0, attention, ffn, compress_ratio=ratio, csa=csa, shared_indexer=shared)
        out += [_times(g, n) for g in _layer_groups(spec, layer)]
    for layer in spec.mtp_layers:
        out += [_as_mtp(g) for g in _layer_groups(spec, layer) + _mtp_extra(spec)]
    if spec.engram is not None:
        out += _engram_groups(spec)
    return tuple(out)


def _times(g: ParamGroup, n: int) -> ParamGroup:
    return ParamGroup(g.component, g.name, g.shape, g.count * n, g.kind, g.tp, g.dtype_of)


def _as_mtp(g: ParamGroup) -> ParamGroup:
    return ParamGroup("mtp", f"mtp.{g.name}", g.shape, g.count, g.kind, g.tp, g.component)


def _layer_groups(spec: ModelSpec, layer: LayerSpec) -> list[ParamGroup]:
    h = spec.hidden_size
    groups = [ParamGroup("other", "layer_norms", (spec.norms_per_layer * h,), kind="vector", tp="replicate")]
    groups += _attention_groups(spec, layer)
    groups += _ffn_groups(spec, layer)
    if spec.hc_mult > 1:
        hc = spec.hc_mult
        mix = (2 + hc) * hc  # pre (hc) + post (hc) + comb (hc*hc) mixing weights
        for site in ("attn", "ffn"):
            groups += [ParamGroup("other", f"hc_{site}_fn", (mix, hc * h), kind="fp32", tp="replicate"),
                       ParamGroup("other", f"hc_{site}_base", (mix,), kind="fp32", tp="replicate"),
                       ParamGroup("other", f"hc_{site}_scale", (3,), kind="fp32", tp="replicate")]
    return groups


def _attention_groups(spec: ModelSpec, layer: LayerSpec) -> list[ParamGroup]:
    h = spec.hidden_size
    A = "attention"
    if layer.attention == "linear":
        return _linear_groups(spec)
    if layer.attention in ("full", "sliding", "msa"):
        g = spec.layer_gqa(layer)
        q, kv, vo = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim, g.num_heads * g.v_head_dim
        out = [ParamGroup(A, "q_proj", (q, h)), ParamGroup(A, "k_proj", (kv, h)),
               ParamGroup(A, "v_proj", (g.num_kv_heads * g.v_head_dim, h)), ParamGroup(A, "o_proj", (h, vo))]
        if g.qkv_bias:
            out.append(ParamGroup(A, "qkv_bias", (q + kv + g.num_kv_heads * g.v_head_dim,), kind="vector"))
        if g.o_bias:
            out.append(ParamGroup(A, "o_bias", (h,), kind="vector", tp="replicate"))
        if g.qk_norm == "head":
            out.append(ParamGroup(A, "qk_norm", (2 * g.head_dim,), kind="vector", tp="replicate"))
        elif g.qk_norm == "full":
            out.append(ParamGroup(A, "qk_norm", (q + kv,), kind="vector"))
        if g.sinks:
            out.append(ParamGroup(A, "sinks", (g.num_heads,), kind="vector"))
        if layer.attention == "msa":
            m = spec.msa
            assert m is not None     # index query / key projections of the block indexer
            out += [ParamGroup(A, "indexer.wq", (m.index_heads * m.index_head_dim, h), tp="replicate"),
                    ParamGroup(A, "indexer.wk", (m.index_head_dim, h), tp="replicate")]
        return out
    if layer.attention in ("mla", "dsa"):
        m = spec.mla
        assert m is not None
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        out = []
        if m.q_lora_rank is None:
            out.append(ParamGroup(A, "wq", (m.num_heads * qk, h)))
        else:
            out += [ParamGroup(A, "wq_a", (m.q_lora_rank, h), tp="replicate"),
                    ParamGroup(A, "q_norm", (m.q_lora_rank,), kind="vector", tp="replicate"),
                    ParamGroup(A, "wq_b", (m.num_heads * qk, m.q_lora_rank))]
        out += [ParamGroup(A, "wkv_a", (m.kv_lora_rank + m.qk_rope_head_dim, h), tp="replicate"),
                ParamGroup(A, "kv_norm", (m.kv_lora_rank,), kind="vector", tp="replicate"),
                ParamGroup(A, "wkv_b", (m.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)),
                ParamGroup(A, "wo", (h, m.num_heads * m.v_head_dim))]
        if layer.has_indexer:
            ix = spec.indexer
            assert ix is not None and m.q_lora_rank is not None
            out += [ParamGroup(A, "indexer.wq_b", (ix.n_heads * ix.head_dim, m.q_lora_rank), tp="replicate"),
                    ParamGroup(A, "indexer.wk", (ix.head_dim, h), tp="replicate"),
                    ParamGroup(A, "indexer.k_norm", (2 * ix.head_dim,), kind="vector", tp="replicate"),
                    ParamGroup(A, "indexer.weights_proj", (ix.n_heads, h), tp="replicate")]
        return out
    v, ix = spec.v4, spec.indexer
    assert v is not None and ix is not None
    per_group = v.num_heads * v.head_dim // v.o_groups
    out = [ParamGroup(A, "wq_a", (v.q_lora_rank, h), tp="replicate"),
           ParamGroup(A, "q_norm", (v.q_lora_rank,), kind="vector", tp="replicate"),
           ParamGroup(A, "wq_b", (v.num_heads * v.head_dim, v.q_lora_rank)),
           ParamGroup(A, "wkv", (v.head_dim, h), tp="replicate"),
           ParamGroup(A, "kv_norm", (v.head_dim,), kind="vector", tp="replicate"),
           ParamGroup(A, "wo_a", (v.o_groups * v.o_lora_rank, per_group)),
           ParamGroup(A, "wo_b", (h, v.o_groups * v.o_lora_rank)),
           ParamGroup(A, "attn_sink", (v.num_heads,), kind="fp32")]
    r = layer.compress_ratio
    if r:
        out += _compressor(A, "compressor", h, v.head_dim, r, layer.csa)
    if layer.csa:
        out += [ParamGroup(A, "indexer.wq_b", (ix.n_heads * ix.head_dim, v.q_lora_rank), tp="replicate"),
                ParamGroup(A, "indexer.weights_proj", (ix.n_heads, h), tp="replicate")]
        out += _compressor(A, "indexer.compressor", h, ix.head_dim, r, True)
    return out


def _linear_groups(spec: ModelSpec) -> list[ParamGroup]:
    """Gated-delta-net / KDA layer: fused q/k/v, output gate, per-head decay and beta, the
    depthwise conv over the q/k/v channels and the output projection (KDA adds a full-rank
    decay-gate projection)."""
    a, h, A = spec.linear, spec.hidden_size, "attention"
    assert a is not None
    qkv = 2 * a.num_key_heads * a.key_head_dim + a.num_value_heads * a.value_head_dim
    v = a.num_value_heads * a.value_head_dim
    out = [ParamGroup(A, "in_proj_qkv", (qkv, h)), ParamGroup(A, "in_proj_z", (v, h)),
           ParamGroup(A, "in_proj_ba", (2 * a.num_value_heads, h)),
           ParamGroup(A, "conv1d", (qkv, a.conv_kernel), kind="vector"),
           ParamGroup(A, "A_log_dt_bias", (2 * a.num_value_heads,), kind="fp32"),
           ParamGroup(A, "norm", (a.value_head_dim,), kind="vector", tp="replicate"),
           ParamGroup(A, "out_proj", (h, v))]
    if a.kind == "kda":
        out.append(ParamGroup(A, "f_proj", (v, h)))
    return out


def _compressor(component: str, name: str, h: int, d: int, ratio: int, overlap: bool) -> list[ParamGroup]:
    coff = 2 if overlap else 1
    return [ParamGroup(component, f"{name}.wkv", (coff * d, h), kind="fp32", tp="replicate"),
            ParamGroup(component, f"{name}.wgate", (coff * d, h), kind="fp32", tp="replicate"),
            ParamGroup(component, f"{name}.ape", (ratio, coff * d), kind="fp32", tp="replicate"),
            ParamGroup(component, f"{name}.norm", (d,), kind="vector", tp="replicate")]


def _mlp(component: str, name: str, h: int, width: int, count: int = 1, bias: bool = False) -> list[ParamGroup]:
    out = [ParamGroup(component, f"{name}.gate_up", (2 * width, h), count),
           ParamGroup(component, f"{name}.down", (h, width), count)]
    if bias:
        out.append(ParamGroup(component, f"{name}.bias", (2 * width + h,), count, kind="vector"))
    return out


def _ffn_groups(spec: ModelSpec, layer: LayerSpec) -> list[ParamGroup]:
    h = spec.hidden_size
    if layer.ffn == "dense":
        assert spec.dense_intermediate is not None
        return _mlp("dense_ffn", "mlp", h, spec.dense_intermediate, bias=spec.mlp_bias)
    m = spec.moe
    assert m is not None
    out = _mlp("routed_experts", "experts", h, m.expert_intermediate, m.num_experts, m.expert_bias)
    # Hash-routed layers pick experts from a frozen token-id table (their gate still weights
    # the picked experts); routed layers select with the gate plus a selection bias.
    out.append(ParamGroup("router", "gate", (m.num_experts, h), kind="embedding", tp="replicate"))
    if layer.ffn == "hash_moe":
        out.append(ParamGroup("router", "tid2eid", (spec.vocab_size, m.top_k), kind="int32", tp="replicate"))
    else:
        if m.router_bias:
            out.append(ParamGroup("router", "gate_bias", (m.num_experts,), kind="fp32", tp="replicate"))
    if m.num_shared:
        out += _mlp("shared_experts", "shared_experts", h, m.shared_intermediate)
    if m.shared_gate:
        out.append(ParamGroup("shared_experts", "shared_gate", (1, h), kind="vector", tp="replicate"))
    return out


def _mtp_extra(spec: ModelSpec) -> list[ParamGroup]:
    """Per-MTP-layer glue around the decoder block."""
    h, V = spec.hidden_size, spec.vocab_size
    if spec.family == "deepseek_v4":
        # V4's MTP block shares the main embedding and head; it owns projections of the
        # embedding and of the hc streams, and its own hc head.
        hc = spec.hc_mult
        return [ParamGroup("other", "e_proj", (h, h)), ParamGroup("other", "h_proj", (h, h)),
                ParamGroup("other", "mtp_norms", (3 * h,), kind="vector", tp="replicate"),
                ParamGroup("other", "hc_head_fn", (hc, hc * h), kind="fp32", tp="replicate"),
                ParamGroup("other", "hc_head_base", (hc + 1,), kind="fp32", tp="replicate")]
    if spec.mla is not None:
        # DeepSeek-V3-style checkpoints store a copy of the embedding and the head with the
        # MTP layer (model.layers.61.embed_tokens / shared_head.head).
        return [ParamGroup("other", "eh_proj", (h, 2 * h)),
                ParamGroup("other", "mtp_norms", (3 * h,), kind="vector", tp="replicate"),
                ParamGroup("embeddings", "embed_tokens", (V, h), kind="embedding"),
                ParamGroup("embeddings", "shared_head", (V, h), kind="embedding")]
    return []


@lru_cache(maxsize=64)
def engram_table_rows(layer_ids: tuple[int, ...], vocab_sizes: tuple[int, ...], heads: int) -> tuple[int, ...]:
    """Rows of each Engram layer's table: one distinct prime per (layer, order, head).

    As in deepseek-ai/Engram `engram_demo_v1.py`: for each layer and n-gram order, search
    upward from vocab_size - 1 for primes not yet used by any head, order or layer.
    """
    seen: set[int] = set()
    rows = []
    for _ in layer_ids:
        total = 0
        for size in vocab_sizes:
            p = size - 1
            for _ in range(heads):
                p = _next_prime(p, seen)
                seen.add(p)
                total += p
        rows.append(total)
    return tuple(rows)


def _next_prime(start: int, seen: set[int]) -> int:
    n = start + 1
    while n in seen or not _is_prime(n):
        n += 1
    return n


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def _engram_groups(spec: ModelSpec) -> list[ParamGroup]:
    e = spec.engram
    assert e is not None
    h, hc = spec.hidden_size, spec.hc_mult
    dim = e.n_embed_per_ngram // e.n_head_per_ngram
    feat = (e.max_ngram_size - 1) * e.n_embed_per_ngram
    out = []
    for layer, rows in zip(e.layer_ids, engram_table_rows(e.layer_ids, e.vocab_sizes, e.n_head_per_ngram)):
        out.append(ParamGroup("engram", f"engram.{layer}.table", (rows, dim), kind="embedding", tp="replicate"))
    n = len(e.layer_ids)
    # The demo's key/value projections are nn.Linear with bias (one key projection per hc stream).
    out += [ParamGroup("engram", "engram.key_proj", (h, feat), n * hc, tp="replicate"),
            ParamGroup("engram", "engram.value_proj", (h, feat), n, tp="replicate"),
            ParamGroup("engram", "engram.proj_bias", (h,), n * (hc + 1), kind="vector", tp="replicate"),
            ParamGroup("engram", "engram.norms", (3 * h,), n * hc, kind="vector", tp="replicate"),
            ParamGroup("engram", "engram.conv", (hc * h, e.kernel_size), n, kind="vector", tp="replicate")]
    return out
