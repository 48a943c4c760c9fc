"""A simple contiguous cache for incremental decoding.

Each attention layer keeps whatever it needs (K/V, MLA latents, V4 windows, compressor
state, indexer keys) under its layer index; `length` counts the tokens already seen. The
paged pools of the runtime will replace this object behind the same calls.
"""

from __future__ import annotations

import torch


class Cache:
    def __init__(self) -> None:
        self.length = 0
        self.layers: dict[int, dict[str, torch.Tensor]] = {}

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return self.layers.setdefault(index, {})

    def append(self, index: int, name: str, value: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Concatenate `value` to the stored tensor along `dim` (the token axis) and return the result."""
        store = self.layer(index)
        old = store.get(name)
        store[name] = value if old is None else torch.cat([old, value], dim=dim)
        return store[name]
