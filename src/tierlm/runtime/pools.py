"""Paged cache pools allocated from the model's `CacheStream`s.

Streams fall into groups by how long they are kept (`tierlm.spec.cache.window_of`): group 0
holds per-token streams (every block of a sequence), group W > 0 holds streams whose blocks
are freed once they are wholly older than W positions (sliding windows, V4 compressor
buffers). Each group has its own block ids and one page tensor per (layer, stream), so one
block id of a group names the same token range in all of that group's pages. Each page tensor
has one spare page past the group's blocks, never written, which entries not held read from.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Sequence

import torch

from ..dtypes import dtype_name
from ..errors import TierlmError
from ..model.ops import StreamView
from ..plan.layouts import tierlm_record_bytes
from ..spec.cache import CacheStream, entries_per_page, layer_cache_streams, window_of
from ..spec.model import LayerSpec, ModelSpec

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
KV_DTYPES = ("auto", "bf16", "fp8")


def resolve_kv_dtype(kv_dtype: str | None, dtype: torch.dtype, what: str = "kv_dtype") -> str:
    """'auto' / None -> the model's own dtype name; bf16, fp8, fp16, fp32 and fp64 in any spelling
    (`tierlm.dtypes`: BF16, bfloat16, torch.bfloat16, a torch.dtype) -> that name."""
    name = "auto" if kv_dtype is None else dtype_name(kv_dtype, what, KV_DTYPES + ("fp16", "fp32", "fp64"))
    if name == "auto":
        if dtype not in DTYPE_NAMES:
            raise TierlmError(f"no cache dtype for model dtype {dtype}")
        return DTYPE_NAMES[dtype]
    return name


def stream_dtype(s: CacheStream, kv: str, ix: str, dtype: torch.dtype) -> str:
    """Storage dtype of a stream: state in float32 (float64 for a float64 model, whose parity
    tests would otherwise measure the state's rounding), indexer keys and KV as configured."""
    if s.role == "state":
        return "fp64" if dtype == torch.float64 else "fp32"
    return ix if s.role == "indexer" else kv


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeroed pages; in CPU memory advised, before the zeroing first touches it, to use 2 MiB
    pages where the kernel allows (Linux THP `madvise`): a reload or prefill writes a fresh
    pool, and its 4 KiB pages would each cost a fault (a first write ran at a third of the
    speed of a copy into touched memory here) and a TLB entry."""
    t = torch.empty(shape, dtype=dtype, device=device)
    n = t.numel() * t.element_size()
    if t.device.type == "cpu" and sys.platform == "linux" and n >= 2 * HUGE_PAGE:
        lo = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE          # the whole 2 MiB pages inside it
        hi = (t.data_ptr() + n) // HUGE_PAGE * HUGE_PAGE
        if hi > lo:
            _madvise(lo, hi - lo, MADV_HUGEPAGE)
    return t.zero_()


def _madvise(address: int, length: int, advice: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise(address, length, advice)          # advice only: a refusal changes nothing


class CachePools:
    """One page tensor per (layer, stream): [blocks of its group, entries per page, record]."""

    def __init__(self, spec: ModelSpec, layers: Sequence[LayerSpec], blocks: dict[int, int], block: int,
                 dtype: torch.dtype, kv_dtype: str = "auto", indexer_dtype: str = "auto", device="cpu"):
        self.block, self.dtype = block, dtype
        self.kv_dtype, self.indexer_dtype = resolve_kv_dtype(kv_dtype, dtype), resolve_kv_dtype(indexer_dtype, dtype)
        self.streams = {l.index: layer_cache_streams(spec, l) for l in layers}
        for streams in self.streams.values():
            for s in streams:
                if s.per == "token" and block % s.ratio:
                    raise TierlmError(f"block size {block} is not a multiple of compression ratio {s.ratio}")
        self.groups = sorted({window_of(s) for ss in self.streams.values() for s in ss})
        missing = [g for g in self.groups if g not in blocks]
        if missing:
            raise TierlmError(f"no block count for cache group(s) {missing}")
        self.blocks = {g: blocks[g] for g in self.groups}
        self.pages: dict[tuple[int, str], torch.Tensor] = {}
        for li, streams in self.streams.items():
            for s in streams:
                name = self.dtype_name(s)
                shape = (self.blocks[window_of(s)] + 1, entries_per_page(s, block))   # + the spare page
                if name == "fp8":
                    t = _zeros((*shape, tierlm_record_bytes(s, s.width, "fp8")), torch.uint8, device)
                else:
                    t = _zeros((*shape, s.width), TORCH_DTYPES[name], device)
                self.pages[li, s.name] = t

    def dtype_name(self, s: CacheStream) -> str:
        return stream_dtype(s, self.kv_dtype, self.indexer_dtype, self.dtype)

    @staticmethod
    def block_bytes(spec: ModelSpec, layers: Sequence[LayerSpec], block: int, dtype: torch.dtype,
                    kv_dtype: str, indexer_dtype: str) -> dict[int, int]:
        """Bytes one block of each group takes across all layers (without allocating)."""
        kv, ix = resolve_kv_dtype(kv_dtype, dtype), resolve_kv_dtype(indexer_dtype, dtype)
        out: dict[int, int] = {}
        for l in layers:
            for s in layer_cache_streams(spec, l):
                name = stream_dtype(s, kv, ix, dtype)
                g = window_of(s)
                out[g] = out.get(g, 0) + entries_per_page(s, block) * tierlm_record_bytes(s, s.width, name)
        return out

    def group_of(self, key: tuple[int, str]) -> int:
        """The cache group of the page tensor `key` = (layer, stream name)."""
        li, name = key
        return next(window_of(s) for s in self.streams[li] if s.name == name)

    def bytes_per_block(self) -> dict[int, int]:
        out = dict.fromkeys(self.groups, 0)
        for key, t in self.pages.items():
            out[self.group_of(key)] += t[0].numel() * t.element_size()
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pages.values())

    def views(self, tables: dict[int, torch.Tensor]) -> dict[int, dict[str, StreamView]]:
        """Views of every stream for one step, given each group's block table [B, max_pages]."""
        memo: dict = {}
        return {li: {s.name: StreamView(s, self.pages[li, s.name], tables[window_of(s)],
                                        entries_per_page(s, self.block), self.dtype,
                                        self.dtype_name(s) == "fp8", memo)
                     for s in streams}
                for li, streams in self.streams.items()}
