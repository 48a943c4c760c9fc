"""Tiered memory below the engine's device pools: a host-RAM LRU and a durable disk segment
store for prefix blocks (`store.TierStore`), and the torch-free disk format (`segment`)."""


def __getattr__(name: str):
    if name == "TierStore":
        from .store import TierStore
        return TierStore
    raise AttributeError(f"module 'tierlm.tiers' has no attribute {name!r}")
