"""Model families: spec.family -> the module that builds it.

A family module provides
  build(spec: ModelSpec, checkpoint_names: Iterable[str]) -> nn.Module
      whose state_dict names are the Hugging Face checkpoint names and whose
      forward(input_ids[B, T], cache: Cache | None = None) -> logits[B, T, V];
      `checkpoint_names` lets it keep optional parts (MTP layers) only when present;
  rename(name: str) -> str   (optional) maps official DeepSeek names to HF names.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from ...errors import TierlmError

MODULES = {
    "llama": "gqa", "mistral": "gqa", "qwen2": "gqa", "qwen3": "gqa", "qwen3_moe": "gqa", "mixtral": "gqa",
    "gpt_oss": "gqa",
    "deepseek_v2": "deepseek", "deepseek_v3": "deepseek", "kimi_k2": "deepseek", "deepseek_v32": "deepseek",
    "glm_moe_dsa": "deepseek", "deepseek_v4": "deepseek_v4", "gemma3_text": "gemma3", "minimax_m2": "minimax_m2",
}


def get(family: str) -> ModuleType:
    name = MODULES.get(family)
    if name is None:
        raise TierlmError(f"no PyTorch implementation for model_type '{family}' yet "
                          f"(implemented: {', '.join(sorted(MODULES))}); `tierlm plan` still works")
    try:
        return import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise TierlmError(f"no PyTorch implementation for model_type '{family}' yet") from None
        raise
