"""Per-layer cache specs: what each attention layer stores per token (or per sequence).

A layer's cache is a list of `CacheStream`s. The planner multiplies entries by record
size; the runtime will allocate pages from the same streams. Entry counts here are the
*logical* ones (the `ideal` layout); engine layouts in `tierlm.plan.layouts` add record
overheads and block rounding on top.
"""

from __future__ import annotations

import math
from functools import lru_cache
from dataclasses import dataclass

from .model import LayerSpec, ModelSpec


@dataclass(frozen=True)
class CacheStream:
    name: str          # k, v, latent, indexer, window, compressed, compressor_state, ...
    role: str          # kv | indexer | state: which dtype flag applies (--kv/--indexer/--state-dtype)
    width: int         # elements per entry (all KV heads of the layer)
    per: str           # token: one entry per `ratio` tokens | window: last `window` tokens | fixed
    ratio: int = 1
    window: int = 0
    fixed_entries: int = 0
    rope: int = 0      # of `width`, elements that engine layouts keep in bf16
    kv_heads: int = 0  # >0: width is split across tensor-parallel ranks by head; 0: replicated
    dtype: str = "fp32"        # state: the stream's own dtype (what --state-dtype auto means)
    fixed_dtype: bool = False  # state: kept in `dtype` whatever --state-dtype says (conv histories)

    def entries(self, tokens: int) -> int:
        """Entries stored for one sequence of `tokens` tokens."""
        if self.per == "token":
            return tokens // self.ratio
        if self.per == "window":
            return min(tokens, self.window)
        return self.fixed_entries

    def width_per_rank(self, tp: int) -> int:
        """Elements per entry on one tensor-parallel rank (heads replicate when tp > heads)."""
        if self.kv_heads == 0:
            return self.width
        per_head = self.width // self.kv_heads
        return -(-self.kv_heads // tp) * per_head


@lru_cache(maxsize=16384)
def layer_cache_streams(spec: ModelSpec, layer: LayerSpec) -> tuple[CacheStream, ...]:
    e = spec.engram
    if e is not None and layer.index in e.layer_ids and not layer.mtp:
        # Engram's short conv reads the last (kernel - 1) * dilation normalised inputs of all streams.
        conv = CacheStream("engram_conv", "state", spec.hc_mult * spec.hidden_size, "window",
                           window=(e.kernel_size - 1) * e.max_ngram_size)
        return _attention_streams(spec, layer) + (conv,)
    return _attention_streams(spec, layer)


def _attention_streams(spec: ModelSpec, layer: LayerSpec) -> tuple[CacheStream, ...]:
    streams = _kv_streams(spec, layer)
    if spec.sconv_kernel:
        # Inkling's short conv runs on k, v and two hidden-size streams per layer and keeps the
        # last kernel - 1 inputs, in bf16 (vLLM / SGLang Inkling sconv, via kvcache.ai models.yaml).
        g = spec.layer_gqa(layer)
        width = 2 * g.num_kv_heads * g.head_dim + 2 * spec.hidden_size
        streams += (CacheStream("sconv_state", "state", width, "fixed", fixed_entries=spec.sconv_kernel - 1,
                                dtype="bf16", fixed_dtype=True),)
    return streams


def _kv_streams(spec: ModelSpec, layer: LayerSpec) -> tuple[CacheStream, ...]:
    kind = layer.attention
    if kind in ("full", "sliding", "msa"):
        if layer.kv_shared:
            return ()           # reads the KV of an earlier layer of the same type
        g = spec.layer_gqa(layer)
        per = "window" if kind == "sliding" else "token"
        w = layer.window or 0
        kv = (CacheStream("k", "kv", g.num_kv_heads * g.head_dim, per, window=w, kv_heads=g.num_kv_heads),
              CacheStream("v", "kv", g.num_kv_heads * g.v_head_dim, per, window=w, kv_heads=g.num_kv_heads))
        if kind == "msa":
            assert spec.msa is not None      # one index key per token, scanned by the block indexer
            kv += (CacheStream("indexer", "indexer", spec.msa.index_head_dim, "token"),)
        return kv
    if kind == "linear":
        a = spec.linear
        assert a is not None
        # Conv history: kernel - 1 past inputs of the q, k (key heads) and v (value heads) channels;
        # recurrent state: a key_head_dim x value_head_dim matrix per value head.
        conv = 2 * a.num_key_heads * a.key_head_dim + a.num_value_heads * a.value_head_dim
        return (CacheStream("conv_state", "state", conv, "fixed", fixed_entries=a.conv_kernel - 1,
                            dtype=a.conv_dtype, fixed_dtype=True),
                CacheStream("recurrent_state", "state", a.num_value_heads * a.key_head_dim * a.value_head_dim,
                            "fixed", fixed_entries=1, kv_heads=a.num_value_heads, dtype=a.state_dtype))
    if kind in ("mla", "dsa"):
        m = spec.mla
        assert m is not None
        latent = CacheStream("latent", "kv", m.kv_lora_rank + m.qk_rope_head_dim, "token", rope=m.qk_rope_head_dim)
        if kind == "mla" or layer.shared_indexer:
            return (latent,)
        assert spec.indexer is not None
        return (latent, CacheStream("indexer", "indexer", spec.indexer.head_dim, "token"))
    v = spec.v4
    assert v is not None and spec.indexer is not None
    r = layer.compress_ratio
    streams = [CacheStream("window", "kv", v.head_dim, "window", window=v.window, rope=v.rope_head_dim)]
    if r:
        coff = 2 if layer.csa else 1   # CSA compressors overlap two blocks
        streams.append(CacheStream("compressed", "kv", v.head_dim, "token", ratio=r, rope=v.rope_head_dim))
        # kv_state and score_state, [coff*r, coff*d] each, fp32 (official Compressor).
        streams.append(CacheStream("compressor_state", "state", 2 * coff * v.head_dim, "fixed",
                                   fixed_entries=coff * r))
    if layer.csa:
        d = spec.indexer.head_dim
        streams.append(CacheStream("indexer", "indexer", d, "token", ratio=r))
        streams.append(CacheStream("indexer_compressor_state", "state", 2 * 2 * d, "fixed", fixed_entries=2 * r))
    return tuple(streams)


# ----------------------------------------------------------------------------- paged layout
# How tierlm's engine pages these streams (the planner's `--layout tierlm` calls the same
# functions). Every stream is paged by logical token blocks of `block_size` positions, a
# multiple of every compression ratio, so one prefix-hash block names one page per stream:
#   per token  a page holds block_size // ratio entries; every block of the sequence is held;
#   window     a page holds block_size positions; blocks wholly older than the window are freed;
#   fixed      (V4 compressor buffers) kept per position like a window of `fixed_entries`
#              positions, so prefix hits and speculative rollback need no separate snapshot.
MIN_BLOCK = 16


def block_size(spec: ModelSpec) -> int:
    """Default engine block size: the smallest multiple of 16 and every compression ratio."""
    size = MIN_BLOCK
    for layer in spec.all_layers(True):
        if layer.compress_ratio:
            size = math.lcm(size, layer.compress_ratio)
    return size


def window_of(stream: CacheStream) -> int:
    """Positions a windowed stream must keep (0: the stream keeps every block)."""
    if stream.per == "window":
        return stream.window
    if stream.per == "fixed":
        return stream.fixed_entries
    return 0


def entries_per_page(stream: CacheStream, block: int) -> int:
    return block // stream.ratio if stream.per == "token" else block


def first_held_block(window: int, tokens: int, block: int) -> int:
    """Oldest logical block a sequence of `tokens` tokens still needs under `window` (0: all)."""
    return max(0, tokens - window) // block if window else 0


def held_pages(stream: CacheStream, tokens: int, block: int) -> int:
    """Pages the engine holds for one sequence of `tokens` tokens."""
    return -(-tokens // block) - first_held_block(window_of(stream), tokens, block)
