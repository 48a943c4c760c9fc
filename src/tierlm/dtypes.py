"""The one parser of dtype names: `--dtype`, `--kv-dtype`, `--indexer-dtype`, `--state-dtype`,
`--weight-dtype`, `load(dtype=)`, `LLM(dtype=, kv_dtype=)`.

Every spelling people write is accepted, in any case: tierlm's short names (`bf16`), the
torch / config.json names (`bfloat16`), `torch.bfloat16`, and a `torch.dtype` itself. Each
caller says which canonical names it supports; anything else is a `TierlmError` that lists them.
Imports torch only when a torch.dtype is asked for.
"""

from __future__ import annotations

from typing import Any

from .errors import TierlmError

# spelling (lower case, without "torch.") -> canonical name
ALIASES = {
    "auto": "auto",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "f16": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "f32": "fp32",
    "fp64": "fp64", "float64": "fp64", "double": "fp64", "f64": "fp64",
    "fp8": "fp8", "float8": "fp8", "float8_e4m3fn": "fp8", "f8_e4m3": "fp8", "e4m3": "fp8",
    "fp4": "fp4", "float4": "fp4", "mxfp4": "fp4", "float4_e2m1fn_x2": "fp4",
    "int4": "int4",
}

TORCH_NAMES = ("bf16", "fp16", "fp32", "fp64")     # what a model's weights can be cast to


def canonical(value: Any) -> str | None:
    """The canonical name of a dtype spelling or torch.dtype, else None."""
    if type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        value = str(value)                           # "torch.bfloat16"
    if not isinstance(value, str):
        return None
    key = value.strip().lower()
    if key.startswith("torch."):
        key = key[len("torch."):]
    return ALIASES.get(key)


def dtype_name(value: Any, what: str = "dtype", accepted: tuple[str, ...] = TORCH_NAMES) -> str:
    """Canonical name of `value`, which must be one of `accepted`; else a TierlmError naming them."""
    name = canonical(value)
    if name is None or name not in accepted:
        raise TierlmError(f"{what} must be one of {', '.join(accepted)} (also spelled e.g. bfloat16, "
                          f"torch.bfloat16, BF16), got {value!r}")
    return name


def torch_dtype(value: Any, what: str = "dtype"):
    """The torch.dtype of a weight dtype name (bf16 / fp16 / fp32 / fp64, any spelling) or torch.dtype."""
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "fp64": torch.float64}[dtype_name(value, what, TORCH_NAMES)]
