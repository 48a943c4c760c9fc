"""Roofline model: decode step and prefill time from bytes read per tier and FLOPs.

t_step = max(FLOPs / (peak * eta_flops), sum over tiers of bytes_read_tier / (bw_tier * eta_mem))
Sparse layers read only what they attend to (top-k, window, compressed entries), so the
bytes read per step are computed separately from the bytes stored.
"""

from __future__ import annotations

from ..spec.model import LayerSpec, ModelSpec

# Efficiency defaults: aiconfigurator's mem_bw_empirical_scaling_factor (0.8, h100_sxm.yaml)
# and llm-analysis' suggested inference FLOPs efficiency (0.7, README).
ETA_MEM = 0.8
ETA_FLOPS = 0.7

# Latency floors, aiconfigurator's empirical corrections ("some nonofficial correction based on
# observations"): every memory-bound kernel takes at least 3 us (gpu.mem_empirical_constant_latency)
# and every collective at least 10 us (node.p2p_latency), in
# ai-dynamo/aiconfigurator@77f0282e967cf0521dbb3e9a67845c005f131b49:src/aiconfigurator/systems/h800_sxm.yaml
# (read 2026-12-02). A step pays them after its bandwidth-bound parts, which overlap.
OP_LATENCY = 3e-6
COLLECTIVE_LATENCY = 10e-6
# Bytes per activation element on the wire: bf16 for tensor-parallel all-reduces and the expert
# combine, fp8 for the expert dispatch. DeepSeek's inference overview: "dispatch transmissions adopt
# the FP8 format ... while core MLA computations and combine transmissions use the BF16 format"
# (https://github.com/deepseek-ai/open-infra-index/blob/main/202502OpenSourceWeek/day_6_one_more_thing_deepseekV3R1_inference_system_overview.md,
# 2025-03-01, read 2026-12-02).
ALLREDUCE_BYTES = 2
DISPATCH_BYTES = 1
COMBINE_BYTES = 2


def sum_floor(n: int, r: int) -> int:
    """sum_{t=1..n} floor(t / r)."""
    if n <= 0:
        return 0
    q = n // r
    return r * (q - 1) * q // 2 + q * (n - q * r + 1)


def sum_min_floor(n: int, r: int, k: int) -> int:
    """sum_{t=1..n} min(floor(t / r), k)."""
    cut = k * r - 1                  # last t with floor(t/r) < k
    if n <= cut:
        return sum_floor(n, r)
    return sum_floor(cut, r) + (n - cut) * k


def sum_min(n: int, w: int) -> int:
    """sum_{t=1..n} min(t, w)."""
    if n <= w:
        return n * (n + 1) // 2
    return w * (w + 1) // 2 + (n - w) * w


def attention_flops(spec: ModelSpec, layer: LayerSpec, context: int, cumulative: bool = False,
                    mha: bool = False) -> int:
    """Attention FLOPs (QK and PV, plus indexer scoring) of one query at `context`, or of
    all queries 1..context when `cumulative` (a causal prefill). `mha`: dense MLA layers in the
    form engines prefill with (K and V decompressed per head), not the absorbed latent form."""
    def entries(kind: str, r: int = 1, cap: int | None = None, window: int | None = None) -> int:
        if window is not None:
            return sum_min(context, window) if cumulative else min(context, window)
        if cap is not None:
            return sum_min_floor(context, r, cap) if cumulative else min(context // r, cap)
        return sum_floor(context, r) if cumulative else context // r

    ix = spec.indexer
    if layer.attention in ("full", "sliding"):
        g = spec.layer_gqa(layer)
        n = entries("kv", window=layer.window if layer.attention == "sliding" else None)
        return 2 * g.num_heads * (g.head_dim + g.v_head_dim) * n
    if layer.attention == "msa":
        g, m = spec.layer_gqa(layer), spec.msa
        assert m is not None     # attention over the top-k + local blocks, indexer over every key
        n = entries("kv", window=(m.topk_blocks + m.local_blocks) * m.block_size)
        return 2 * g.num_heads * (g.head_dim + g.v_head_dim) * n + 2 * m.index_heads * m.index_head_dim * entries("ix")
    if layer.attention == "linear":
        a = spec.linear
        assert a is not None     # per token: update and read each value head's d_k x d_v state
        return 4 * a.num_value_heads * a.key_head_dim * a.value_head_dim * (context if cumulative else 1)
    if layer.attention in ("mla", "dsa"):
        m = spec.mla
        assert m is not None
        # Absorbed MLA: scores over latent+rope, values over the latent.
        per = 2 * m.num_heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
        if layer.attention == "mla":
            if mha:          # per head: QK over nope + rope dims, PV over v dims
                per = 2 * m.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
            return per * entries("latent")
        assert ix is not None
        scan = 2 * ix.n_heads * ix.head_dim * entries("index") if layer.has_indexer else 0
        return per * entries("latent", cap=ix.topk) + scan
    v = spec.v4
    assert v is not None and ix is not None
    per = 2 * v.num_heads * 2 * v.head_dim   # K = V, one shared head
    n = entries("window", window=v.window)
    r = layer.compress_ratio
    flops = 0
    if layer.csa:
        n += entries("compressed", r, cap=ix.topk)
        flops += 2 * ix.n_heads * ix.head_dim * entries("index", r)
    elif r:
        n += entries("compressed", r)
    return flops + per * n


def peak_flops(flops: dict[str, float], linear_dtype: str) -> tuple[str, float] | None:
    """The tensor peak the GEMMs run at: fp8 when weights are fp8 and the device has it."""
    if linear_dtype in ("fp8", "fp4") and "fp8" in flops:
        return "fp8", flops["fp8"]
    if "bf16" in flops:
        return "bf16", flops["bf16"]
    return None


def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts a batch of `tokens` routes to, under uniform routing."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)
