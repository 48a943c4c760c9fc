"""Byte layouts of cache records and weights.

`ideal` is elements x nominal bytes (bf16 = 2, fp8 = 1, fp4 = 0.5; no scales, no padding):
the convention of the kvcache.ai calculator. Engine layouts add what a serving engine
really stores: quantisation scales, RoPE dims kept in bf16, block rounding and the
sliding-window reservation. Sources for each record size are in docs/planner.md.
"""

from __future__ import annotations

from ..errors import TierlmError
from ..spec.cache import CacheStream, entries_per_page, held_pages
from ..spec.model import LayerSpec

LAYOUTS = ("ideal", "vllm", "sglang", "tierlm")
CACHE_DTYPES = ("bf16", "fp8", "fp4", "fp16", "fp32")    # fp16 / fp32: plain elements (CPU engines)
PLAIN = ("bf16", "fp16", "fp32")
STATE_DTYPES = ("auto", "fp32", "bf16", "fp16")    # auto: each state stream's own dtype
BITS = {"fp64": 64, "fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "fp4": 4, "int4": 4, "int32": 32}

# vLLM defaults: KV block of 16 tokens for standard attention, 64 for FlashMLA, 256-token
# logical blocks for DeepSeek-V4; max_num_batched_tokens drives the sliding-window reservation.
VLLM_BLOCK = {"full": 16, "sliding": 16, "msa": 16, "mla": 64, "dsa": 64, "v4": 256}
VLLM_MAX_NUM_BATCHED_TOKENS = 8192
SGLANG_SWA_TENTHS = 8   # swa_full_tokens_ratio = 0.8


def record_bits(stream: CacheStream, width: int, dtype: str, layout: str, attention: str) -> int:
    """Bits of one cache entry of `width` elements (width already split for TP); for a state
    stream `dtype` is its resolved state dtype (`state_dtype_of`)."""
    if stream.role == "state":
        return width * BITS[dtype]              # fixed state is stored plain in every layout
    if layout == "ideal":
        return width * BITS[dtype]
    if layout == "tierlm":
        return 8 * tierlm_record_bytes(stream, width, dtype)
    if layout == "sglang" and attention == "v4":
        raise TierlmError("layout 'sglang' has no documented DeepSeek-V4 record; use --layout ideal or vllm")
    if stream.role == "indexer":
        return 8 * _indexer_record_bytes(width, dtype)
    if stream.rope:                             # MLA latent or V4 entry: nope part quantised, rope bf16
        return 8 * _latent_record_bytes(width - stream.rope, stream.rope, dtype, layout, attention)
    if dtype == "fp4":                          # NVFP4: 4-bit values + one fp8 scale per 16
        return width * 4 + 8 * (-(-width // 16))
    return width * BITS[dtype]


def state_dtype_of(stream: CacheStream, state_dtype: str) -> str:
    """The dtype a state stream is stored in: its own unless --state-dtype overrides it (conv
    histories keep theirs)."""
    return stream.dtype if state_dtype == "auto" or stream.fixed_dtype else state_dtype


def tierlm_record_bytes(stream: CacheStream, width: int, dtype: str) -> int:
    """Bytes of one entry in tierlm's pools. fp8: e4m3 values plus one fp32 scale per 128 of
    the quantised (non-rope) channels, the rope channels kept in bf16; other dtypes: plain."""
    if stream.role == "state":
        # fp32 as before (the engine also charges 4 B per element for a float64 model's state)
        return 4 * width if dtype in ("fp32", "fp64") else width * BITS[dtype] // 8
    if dtype == "fp8":
        nope = width - stream.rope
        return nope + 4 * (-(-nope // 128)) + 2 * stream.rope
    if dtype == "fp4":
        raise TierlmError("layout 'tierlm' stores KV as bf16 or fp8 (or the model's own float dtype), not fp4")
    return width * BITS[dtype] // 8


def _indexer_record_bytes(d: int, dtype: str) -> int:
    if dtype in PLAIN:
        return BITS[dtype] // 8 * d
    if dtype == "fp8":
        return d + 4 * (-(-d // 128))           # fp8 keys + one fp32 scale per 128 (SGLang/vLLM)
    return d // 2 + (-(-d // 32))               # fp4 keys + one ue8m0 scale byte per 32


def _latent_record_bytes(nope: int, rope: int, dtype: str, layout: str, attention: str) -> int:
    if dtype in PLAIN:
        return BITS[dtype] // 8 * (nope + rope)
    if dtype == "fp4":
        raise TierlmError(f"layout '{layout}' has no documented fp4 record for {attention} attention; "
                          "use --layout ideal or --kv-dtype fp8")
    if attention == "v4":
        # FlashMLA "MODEL1" record: fp8 nope, bf16 rope, one ue8m0 scale per 64, padded to 8 B.
        raw = nope + 2 * rope + (-(-nope // 64))
        return -(-raw // 8) * 8
    if layout == "sglang" and attention == "mla":
        return nope + rope                      # plain fp8 MLA pool in SGLang: one byte per element
    return nope + 4 * (-(-nope // 128)) + 2 * rope   # fp8_ds_mla: 512 + 16 + 128 = 656 B


def stored_entries(stream: CacheStream, layer: LayerSpec, tokens: int, layout: str,
                   max_num_batched_tokens: int = VLLM_MAX_NUM_BATCHED_TOKENS, block: int = 0) -> int:
    """Entries one sequence of `tokens` tokens occupies under a layout (`block`: tierlm's
    block size, `tierlm.spec.cache.block_size`)."""
    if layout == "tierlm":
        return held_pages(stream, tokens, block) * entries_per_page(stream, block)
    n = stream.entries(tokens)
    if layout == "ideal" or stream.per == "fixed":
        return n
    if layout == "sglang":
        if stream.per == "window":
            # SGLang sizes the SWA pool as swa_full_tokens_ratio (0.8) x the full pool,
            # whatever the window: a request is charged 0.8 x its tokens on SWA layers.
            return -(-tokens * SGLANG_SWA_TENTHS // 10)
        return n                                # page size 1
    block = VLLM_BLOCK[layer.attention]
    if stream.per == "window":
        # vLLM SlidingWindowSpec: min(W - 1 + max_num_batched_tokens, max_model_len) tokens,
        # rounded up to blocks, plus one block.
        reserve = min(stream.window - 1 + max_num_batched_tokens, tokens)
        return (-(-reserve // block) + 1) * block
    per_block = max(block // stream.ratio, 1)
    return -(-n // per_block) * per_block
