"""Tier placement: which bytes live on the device, in host memory, on disk.

Items are placed per device in priority order: the weights every token reads (attention,
dense FFN, shared experts, embeddings, norms) first, then the KV cache, the MTP layers,
the routed experts (cold per token), and Engram tables (addressable from token ids, so
made to live off-device). What does not fit on the device goes to host memory, then disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hardware import Hardware

PRIORITY = ("hot_weights", "kv_cache", "mtp", "routed_experts", "engram")
TIERS = ("device", "host", "disk")


@dataclass(frozen=True)
class Budget:
    device: int
    host: int
    disk: int


def budget(hw: Hardware, gpu_util: float, host_util: float = 0.9) -> Budget:
    """Bytes one device may use on each tier (host and disk are shared by the node)."""
    return Budget(int(hw.device_memory * gpu_util), int(hw.host_memory_per_device * host_util),
                  hw.disk_capacity_per_device)


def place(items: dict[str, int], b: Budget) -> dict[str, dict[str, int]]:
    """Greedy fill, in PRIORITY order, of device, then host, then disk."""
    free = {"device": b.device, "host": b.host, "disk": b.disk}
    out = {}
    for name in PRIORITY:
        need = items.get(name, 0)
        row = {}
        for tier in TIERS:
            take = min(need, free[tier])
            row[tier] = take
            free[tier] -= take
            need -= take
        row["unplaced"] = need
        out[name] = row
    return out


def fits_device(items: dict[str, int], b: Budget) -> bool:
    return sum(items.values()) <= b.device


def fits_anywhere(items: dict[str, int], b: Budget) -> bool:
    return all(row["unplaced"] == 0 for row in place(items, b).values())


def largest(ok, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with ok(n) true, for monotone ok; lo - 1 if none."""
    if not ok(lo):
        return lo - 1
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
