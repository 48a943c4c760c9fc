"""The normalised, typed description of an architecture (`ModelSpec`).

One `ModelSpec` drives the planner (bytes, FLOPs, placement) and, later, the PyTorch
modules and the paged cache pools, so that what is planned is what gets allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Attention kinds of a layer:
#   full     GQA/MQA/MHA over every previous token
#   sliding  GQA over the last `window` tokens only
#   mla      DeepSeek-V2/V3 multi-head latent attention (one latent per token)
#   dsa      MLA + DSA lightning indexer (DeepSeek-V3.2, GLM-5)
#   v4       DeepSeek-V4 shared-KV attention: sliding window plus, when compress_ratio > 0,
#            compressed entries (CSA: overlapping, with an indexer; HCA; ratio 0 = window only)
# FFN kinds: dense | moe | hash_moe (V4: experts picked by a token-id table).


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
class V4Config:
    num_heads: int
    head_dim: int                # one shared K=V head
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int


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
    attention: str                   # full | sliding | mla | dsa | v4
    ffn: str                         # dense | moe | hash_moe
    window: int | None = None        # sliding / v4 window
    compress_ratio: int = 0          # v4 only: 0 = window only, else tokens per compressed entry
    mtp: bool = False                # a multi-token-prediction (draft) layer
    csa: bool = False                # v4: compressed *sparse* attention (overlapping compressor + indexer)
    shared_indexer: bool = False     # dsa: reuses the previous layer's top-k (GLM-5.x IndexShare)

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
    gqa: GQAConfig | None = None
    mla: MLAConfig | None = None
    indexer: IndexerConfig | None = None
    v4: V4Config | None = None
    moe: MoEConfig | None = None
    hc_mult: int = 1                 # mHC residual streams (1 = plain residual)
    norms_per_layer: int = 2
    mlp_bias: bool = False
    engram: EngramConfig | None = None
    quant: Quantization = Quantization("none", "bf16", "bf16", "bf16")
    notes: tuple[str, ...] = ()      # values taken from class defaults, for --explain
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __hash__(self) -> int:
        # Specs key the planner's caches; hash the (large, immutable) layer tuples only once.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.name, self.family, self.layers, self.mtp_layers, self.gqa, self.mla,
                           self.indexer, self.v4, self.moe, self.quant, self.engram, self.hidden_size))
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

    def all_layers(self, mtp: bool) -> tuple[LayerSpec, ...]:
        return self.layers + (self.mtp_layers if mtp else ())
