"""The normalised, typed description of an architecture (`ModelSpec`).

One `ModelSpec` drives the planner (bytes, FLOPs, placement) and, later, the PyTorch
modules and the paged cache pools, so that what is planned is what gets allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Attention kinds of a layer:
#   full     GQA/MQA/MHA over every previous token
#   sliding  GQA over the last `window` tokens only
#   mla      DeepSeek-V2/V3 multi-head latent attention (one latent per token)
#   dsa      MLA + DSA lightning indexer (DeepSeek-V3.2, GLM-5)
#   v4       DeepSeek-V4 shared-KV attention: sliding window plus, when compress_ratio > 0,
#            compressed entries (CSA: overlapping, with an indexer; HCA; ratio 0 = window only)
#   linear   gated-delta-net (Qwen3.5+) or KDA (Kimi K3) linear attention: a fixed per-sequence
#            conv history and recurrent state instead of per-token KV
#   msa      MiniMax M3 block-sparse attention: full GQA KV plus per-token index keys
# FFN kinds: dense | moe | hash_moe (V4: experts picked by a token-id table).


@dataclass(frozen=True)
class RopeConfig:
    """One rotary embedding with every default resolved by the parser, so that the model code
    reads numbers, not config keys. Fields that do not apply to `kind` stay None."""
    theta: float
    dim: int                                  # channels rotated per head (partial RoPE: < head_dim)
    kind: str = "default"                     # default | linear | llama3 | yarn
    interleave: bool = False                  # rotate pairs (x0, x1), (x2, x3)... instead of (x_i, x_{i+dim/2})
    factor: float | None = None               # linear, llama3, yarn
    original_max_position: int | None = None  # llama3, yarn: the context the model was trained on
    low_freq_factor: float | None = None      # llama3
    high_freq_factor: float | None = None     # llama3
    beta_fast: float | None = None            # yarn: the ramp between interpolated and original frequencies
    beta_slow: float | None = None            # yarn
    truncate: bool = True                     # yarn: ramp bounds rounded to whole dimensions
    mscale_all_dim: float | None = None       # yarn: DeepSeek MLA also scales its softmax by it
    attention_factor: float = 1.0             # yarn: scale of cos/sin

    def yarn_mscale(self, mscale: float = 1.0) -> float:
        """YaRN's attention temperature for this RoPE's context extension `factor`."""
        return 1.0 if self.factor <= 1 else 0.1 * mscale * math.log(self.factor) + 1.0


@dataclass(frozen=True)
class RouterConfig:
    """How a MoE layer turns router logits into expert weights (the router code itself stays
    with each family)."""
    scoring: str = "softmax"          # softmax | sigmoid | sqrtsoftplus
    scale: float = 1.0                # routed_scaling_factor, applied to the final weights
    norm_topk_prob: bool = False      # renormalise the top-k weights to sum to one
    group_limited: bool = False       # pick experts only from the best topk_group of n_group groups
    n_group: int = 1
    topk_group: int = 1


@dataclass(frozen=True)
class GQAConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"        # none | head (per-head RMS weight of head_dim) | full (n_heads*head_dim)
    sinks: bool = False          # gpt-oss learned per-head sink logits (parameters, not cache)


@dataclass(frozen=True)
class MLAConfig:
    num_heads: int
    q_lora_rank: int | None      # None: q projected directly (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class IndexerConfig:
    n_heads: int
    head_dim: int
    topk: int


@dataclass(frozen=True)
class LinearAttnConfig:
    """Linear-attention layers (kind gdn | kda). Each keeps a short-conv history of its q, k and v
    channels and one key_head_dim x value_head_dim recurrent matrix per value head."""
    kind: str
    num_key_heads: int
    key_head_dim: int
    num_value_heads: int
    value_head_dim: int
    conv_kernel: int
    state_dtype: str                 # the recurrent state's own dtype (mamba_ssm_dtype; KDA fp32)
    conv_dtype: str = "bf16"         # the conv history is kept in the activation dtype


@dataclass(frozen=True)
class MSAConfig:
    """MiniMax M3 sparse attention: an indexer scores blocks of `block_size` tokens from one
    cached index key per token; attention reads the top-k blocks plus the local ones."""
    index_heads: int
    index_head_dim: int
    block_size: int
    topk_blocks: int
    local_blocks: int


@dataclass(frozen=True)
class V4Config:
    num_heads: int
    head_dim: int                # one shared K=V head
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    compress_rope: RopeConfig        # compressed layers and the indexer (spec.rope: window-only layers)
    hc_eps: float                    # mHC: added to the Sinkhorn-normalised mixing weights
    hc_sinkhorn_iters: int


@dataclass(frozen=True)
class GemmaConfig:
    """Gemma 3 settings no other family has."""
    sliding_rope: RopeConfig         # the sliding-window layers' RoPE (spec.rope: the global layers')
    query_pre_attn_scalar: float     # scores scaled by its inverse square root instead of head_dim's
    final_logit_softcapping: float | None
    hidden_activation: str           # gelu_pytorch_tanh | gelu
    bidirectional: bool              # use_bidirectional_attention: an encoder, not a causal LM


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    expert_intermediate: int
    num_shared: int = 0
    shared_intermediate: int = 0     # width of the shared-expert MLP (all shared experts together)
    router_bias: bool = False        # selection bias (e_score_correction_bias) or router Linear bias
    expert_bias: bool = False        # gpt-oss: biases inside each expert
    shared_gate: bool = False        # qwen2_moe-style sigmoid gate on the shared expert
    router: RouterConfig = RouterConfig()
    swiglu_limit: float = 0.0        # clamp of the experts' SwiGLU inputs (gpt-oss, V4); 0 = none
    swiglu_alpha: float | None = None    # gpt-oss: slope of its sigmoid-gated activation


@dataclass(frozen=True)
class EngramConfig:
    """Optional Engram block, field names as in deepseek-ai/Engram `engram_demo_v1.py`."""
    layer_ids: tuple[int, ...]
    vocab_sizes: tuple[int, ...]     # one per n-gram order 2..max_ngram_size
    max_ngram_size: int
    n_embed_per_ngram: int
    n_head_per_ngram: int
    kernel_size: int = 4
    pad_id: int = 2                  # compressed before hashing; demo default
    seed: int = 0                    # multipliers: default_rng(seed + 10007 * layer_id)


@dataclass(frozen=True)
class LayerSpec:
    index: int
    attention: str                   # full | sliding | mla | dsa | v4 | linear | msa
    ffn: str                         # dense | moe | hash_moe
    window: int | None = None        # sliding / v4 window
    compress_ratio: int = 0          # v4 only: 0 = window only, else tokens per compressed entry
    mtp: bool = False                # a multi-token-prediction (draft) layer
    csa: bool = False                # v4: compressed *sparse* attention (overlapping compressor + indexer)
    shared_indexer: bool = False     # dsa: reuses the previous layer's top-k (GLM-5.x IndexShare)
    kv_shared: bool = False          # full/sliding: reuses an earlier layer's KV and stores none (Gemma 4)

    @property
    def has_indexer(self) -> bool:
        """The layer runs (and caches keys for) its own lightning indexer."""
        return (self.attention == "dsa" and not self.shared_indexer) or (self.attention == "v4" and self.csa)


@dataclass(frozen=True)
class Quantization:
    """Checkpoint weight formats: the default dtype of each weight component."""
    method: str                      # none | fp8 | mxfp4 | compressed-tensors | fp8+fp4
    base: str                        # torch_dtype: embeddings, norms, unquantised matrices
    linear: str                      # dtype of attention / dense FFN / shared expert matrices
    experts: str                     # dtype of routed expert matrices
    block: tuple[int, int] = (128, 128)
    group: int = 32
    scale_fmt: str | None = None     # ue8m0: power-of-two activation scales (the V3.2 indexer's act_quant)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str                      # normalised model_type
    hidden_size: int
    vocab_size: int
    max_position: int
    tie_embeddings: bool
    dense_intermediate: int | None   # width of dense FFN layers (None when every layer is MoE)
    layers: tuple[LayerSpec, ...]
    mtp_layers: tuple[LayerSpec, ...]
    norm_eps: float                  # RMSNorm epsilon of the decoder norms
    rope: RopeConfig
    gqa: GQAConfig | None = None
    mla: MLAConfig | None = None
    indexer: IndexerConfig | None = None
    v4: V4Config | None = None
    moe: MoEConfig | None = None
    hc_mult: int = 1                 # mHC residual streams (1 = plain residual)
    norms_per_layer: int = 2
    mlp_bias: bool = False
    engram: EngramConfig | None = None
    gemma: GemmaConfig | None = None
    swa_gqa: GQAConfig | None = None     # sliding layers' heads when they differ from `gqa` (the full layers')
    linear: LinearAttnConfig | None = None
    msa: MSAConfig | None = None
    sconv_kernel: int = 0            # Inkling short conv on k, v and two hidden-size streams (0: none)
    quant: Quantization = Quantization("none", "bf16", "bf16", "bf16")
    vision_params: int = 0           # multimodal wrapper's vision tower + projector (0: none counted)
    notes: tuple[str, ...] = ()      # values taken from class defaults, for --explain

    def __hash__(self) -> int:
        # Specs key the planner's caches; hash the (large, immutable) layer tuples only once.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.name, self.family, self.layers, self.mtp_layers, self.gqa, self.mla,
                           self.indexer, self.v4, self.moe, self.quant, self.engram, self.hidden_size,
                           self.norm_eps, self.rope, self.gemma, self.swa_gqa, self.linear, self.msa,
                           self.sconv_kernel))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        for c in (self.gqa, self.mla, self.v4):
            if c is not None:
                return c.num_heads
        raise AssertionError("spec without attention")

    def layer_gqa(self, layer: LayerSpec) -> GQAConfig:
        """Attention shape of a full / sliding / msa layer (sliding layers may have their own)."""
        if layer.attention == "sliding" and self.swa_gqa is not None:
            return self.swa_gqa
        assert self.gqa is not None
        return self.gqa

    def all_layers(self, mtp: bool) -> tuple[LayerSpec, ...]:
        return self.layers + (self.mtp_layers if mtp else ())


_INTERNED: dict[int, ModelSpec] = {}


def interned(spec: ModelSpec) -> ModelSpec:
    """The first ModelSpec built equal to `spec`. Specs key the planner's caches; handing out one
    object per distinct spec makes those lookups match by identity instead of comparing every
    layer again each time a config is parsed anew (one comparison here instead)."""
    old = _INTERNED.get(hash(spec))
    if old is not None and old == spec:
        return old
    if len(_INTERNED) >= 1024:
        _INTERNED.clear()
    _INTERNED[hash(spec)] = spec
    return spec
