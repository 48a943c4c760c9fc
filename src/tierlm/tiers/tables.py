"""Engram tables off the device: each layer's n-gram embedding rows kept in host memory or
memory-mapped from the checkpoint's safetensors (never read whole). Lookup indices depend on
token ids only, so a step's rows are gathered where the table lives as soon as the step's
ids are known, before any layer runs (`MultiHeadEmbedding.prefetch`), and moved over."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import TierlmError
from .experts import PLACES, SafetensorsMmap

TABLE = re.compile(r".*\.engram\.multi_head_embedding\.embedding\.weight$")


def is_engram_table(name: str) -> bool:
    return TABLE.match(name) is not None


def offload_engram(model: nn.Module, where: str, source: SafetensorsMmap | None = None) -> int:
    """Move every Engram table off the device; returns the bytes moved."""
    from ..model.engram import MultiHeadEmbedding
    if where not in PLACES[1:]:
        raise TierlmError(f"engram_on must be one of {', '.join(PLACES)}, got {where!r}")
    tables = [(n, m) for n, m in model.named_modules() if isinstance(m, MultiHeadEmbedding)]
    if not tables:
        raise TierlmError("this model has no Engram tables to keep off the device")
    ref = next(p for p in model.parameters() if p.is_floating_point() and p.device.type != "meta")
    moved = 0
    for name, m in tables:
        weight = m.embedding.weight
        if where == "host":
            t = weight.detach().cpu()
            m.table = t.pin_memory() if ref.device.type == "cuda" else t.clone()
        else:
            key = f"{name}.embedding.weight"
            if key not in source:
                raise TierlmError(f"engram_on='disk': {key} is not in the checkpoint's safetensors files")
            m.table = source.get(key)
        m.rows_dtype = ref.dtype
        moved += m.table.numel() * m.table.element_size()
        m.embedding.weight = nn.Parameter(torch.empty(0, dtype=ref.dtype, device=ref.device), requires_grad=False)
    return moved
