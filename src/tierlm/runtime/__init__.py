"""The serving engine: paged cache pools, scheduler, sampler and `LLM` (imports torch; the
names below load on first use, so torch-free parts such as `blocks` import without it)."""

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from .engine import LLM
        return LLM
    if name in ("CompletionOutput", "RequestOutput", "SamplingParams"):
        from . import sequence
        return getattr(sequence, name)
    raise AttributeError(f"module 'tierlm.runtime' has no attribute {name!r}")
