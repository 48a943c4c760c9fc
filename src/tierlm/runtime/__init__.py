"""The serving engine: paged cache pools, scheduler, sampler and `LLM` (imports torch)."""

from .engine import LLM
from .sequence import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
