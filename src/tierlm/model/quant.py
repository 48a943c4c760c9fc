"""Quantise-dequantise simulations of DeepSeek's official inference kernels, shared by the
DeepSeek families (`families/deepseek.py`: the V3.2 lightning indexer; `families/deepseek_v4.py`:
the V4 KV cache and indexer).

The official code quantises activations to FP8 / FP4 with one scale per block of the last dim
(`act_quant`, `fp4_act_quant` in its TileLang `kernel.py`) and computes with the quantised
values and the scales. `fake_quant` returns `dequant(quant(x))` in x's dtype, which gives the
same products while staying in ordinary tensors; `hadamard` is the `rotate_activation`
(`fast_hadamard_transform.hadamard_transform(x, scale=d**-0.5)`) applied before quantising.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import TierlmError

QMAX = {"fp8": 448.0, "fp4": 6.0}


def _round_fp4(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (0, .5, 1, 1.5, 2, 3, 4, 6), ties to even mantissa."""
    a = v.abs().clamp(max=6.0)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).to(v.dtype)
    return torch.sign(v) * torch.round(a / step) * step


def block_scales(x: torch.Tensor, block: int, fmt: str, pow2: bool = True) -> torch.Tensor:
    """Per-block scales [..., ceil(d / block), 1] of the last dim: amax (clamped at 1e-4) / qmax,
    rounded up to a power of two when `pow2` (ue8m0 / e8m0 scales, the official `round_scale`
    / `scale_fmt` path). A trailing partial block is its own block."""
    d = x.shape[-1]
    pad = (-d) % block
    h = F.pad(x, (0, pad)) if pad else x
    amax = h.unflatten(-1, (-1, block)).abs().amax(-1, keepdim=True).clamp(min=1e-4)
    scale = amax / QMAX[fmt]
    return torch.exp2(torch.ceil(torch.log2(scale))) if pow2 else scale


def fake_quant(x: torch.Tensor, block: int, fmt: str, pow2: bool = True) -> torch.Tensor:
    """Per-block absmax quantise-dequantise along the last dim, as the official `act_quant`
    (fmt "fp8": E4M3, max 448) and `fp4_act_quant` (fmt "fp4": E2M1, max 6) do.
    pow2=True: power-of-two scales (ue8m0 / e8m0, DeepSeek-V4 and V3.2 with `scale_fmt`);
    pow2=False: scale = amax / qmax (`act_quant` without `scale_fmt`).
    A trailing partial block is its own block."""
    d = x.shape[-1]
    pad = (-d) % block
    h = F.pad(x, (0, pad)) if pad else x
    h = h.unflatten(-1, (-1, block))
    qmax = QMAX[fmt]
    scale = block_scales(x, block, fmt, pow2)
    y = (h / scale).clamp(-qmax, qmax)
    y = y.to(torch.float8_e4m3fn).to(x.dtype) if fmt == "fp8" else _round_fp4(y)
    return (y * scale).flatten(-2)[..., :d]


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Sylvester-ordered Walsh-Hadamard transform of the last dim, scaled by d^-1/2."""
    d = x.shape[-1]
    if d & (d - 1):
        raise TierlmError(f"the Hadamard rotation needs a power-of-two dimension, got {d}")
    h = x.reshape(-1, d)
    step = 1
    while step < d:
        h = h.view(-1, d // (2 * step), 2, step)
        h = torch.stack([h[:, :, 0] + h[:, :, 1], h[:, :, 0] - h[:, :, 1]], dim=2)
        step *= 2
    return h.reshape(x.shape) * d ** -0.5
