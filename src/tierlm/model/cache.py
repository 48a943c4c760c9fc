"""A contiguous cache for incremental decoding: the identity-table case of the paged contract.

Row b of the batch is one sequence whose logical block i lives in physical block
b * capacity + i of every group, so `model(ids, cache)` runs exactly the code the engine
runs over its pools, only without freeing or sharing blocks. Pools grow (and are copied)
when a call goes past the capacity; the cache dtype is the model's own.
"""

from __future__ import annotations

import torch

from ..spec.cache import block_size
from .ops import Step


class Cache:
    def __init__(self) -> None:
        self.length = 0
        self.pools = None
        self.capacity = 0       # blocks per row
        self.ids: torch.Tensor | None = None    # [B, length] tokens seen (for families that read history)

    def advance(self, input_ids: torch.Tensor) -> None:
        """Count input_ids [B, T] as cached (call after the forward that stored them)."""
        self.ids = input_ids if self.ids is None else torch.cat([self.ids, input_ids], dim=1)
        self.length += input_ids.shape[1]

    def step(self, model, input_ids: torch.Tensor, dtype: torch.dtype) -> Step:
        """The step context for input_ids [B, T] appended to every row."""
        from ..runtime.pools import CachePools   # runtime builds on model; import late

        b, t = input_ids.shape
        device = input_ids.device
        spec = model.spec
        block = block_size(spec)
        need = -(-(self.length + t) // block)
        if self.pools is None or need > self.capacity:
            cap = max(need, 2 * self.capacity)
            groups = CachePools.block_bytes(spec, model.cache_layers(), block, dtype, "auto", "auto")
            pools = CachePools(spec, model.cache_layers(), {g: b * cap for g in groups}, block, dtype, device=device)
            if self.pools is not None:
                for key, old in self.pools.pages.items():         # the last page is the spare one
                    per = (old.shape[0] - 1) // b
                    pools.pages[key][:-1].view(b, cap, *old.shape[1:])[:, :per] = old[:-1].view(b, per, *old.shape[1:])
            self.pools, self.capacity = pools, cap
        table = torch.arange(b * self.capacity, device=device).view(b, self.capacity)
        positions = (self.length + torch.arange(t, device=device)).expand(b, t)
        c = getattr(model, "history", 0)
        history = None
        if c:
            seen = self.ids[:, -c:] if self.ids is not None else input_ids.new_empty(b, 0)
            history = torch.cat([seen.new_full((b, c - seen.shape[1]), -1), seen], dim=1)
        return Step(positions=positions, valid=torch.ones(b, t, dtype=torch.bool, device=device),
                    starts=torch.full((b,), self.length, device=device), lens=torch.full((b,), t, device=device),
                    views=self.pools.views({g: table for g in self.pools.groups}), history=history)
