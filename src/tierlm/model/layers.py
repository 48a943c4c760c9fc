"""Small building blocks shared by the families: RMSNorm, RoPE tables, SwiGLU.

Precision follows the reference implementations: normalisation statistics and RoPE
angles are computed in float32 even when the model runs in float64 (transformers and
DeepSeek's inference code do the same), so float64 parity tests compare like with like.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..spec.model import RopeConfig


class RMSNorm(nn.Module):
    """cast_last=False (Llama): weight * x.to(dtype); True (gpt-oss): (weight * x).to(dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6, cast_last: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.cast_last = cast_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.cast_last:
            return (self.weight * x).to(dtype)
        return self.weight * x.to(dtype)


def rope_inv_freq(rope: RopeConfig, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse frequencies [rope.dim / 2] for default, linear, llama3 and yarn RoPE scaling,
    computed in `dtype` (float32, as the references do, unless a family asks for more)."""
    dim, theta = rope.dim, rope.theta
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(dtype) / dim))
    if rope.kind == "default":
        return inv
    if rope.kind == "yarn":
        return _yarn_inv_freq(rope, device, dtype)
    if rope.kind == "linear":
        return inv / rope.factor
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor     # llama3
    old = float(rope.original_max_position)
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(is_mid, mid, scaled)


def _yarn_inv_freq(rope: RopeConfig, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """YaRN (arXiv:2309.00071) as transformers computes it: blend interpolated (1/factor) and
    original frequencies with a linear ramp over the dimensions whose number of rotations
    within original_max_position_embeddings lies between beta_slow and beta_fast."""
    dim, theta, factor = rope.dim, rope.theta, rope.factor
    old = float(rope.original_max_position)

    def dim_of(rotations: float) -> float:        # the dimension that turns `rotations` times in `old` tokens
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(rope.beta_fast), dim_of(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device, dtype)
    base = theta ** (torch.arange(0, dim, 2, device=device).to(dtype) / dim)
    keep = 1 - ramp                               # weight of the original (extrapolated) frequency
    return (1.0 / (factor * base)) * (1 - keep) + (1.0 / base) * keep


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, dim] for the 'rotate half' convention, computed in float32
    (and scaled there by yarn's attention factor when it is not 1)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D]."""
    return x * cos + rotate_half(x) * sin


# Activations written with exp / tanh / logsumexp. torch's own silu, sigmoid, softplus,
# tanh-gelu and logaddexp give other bits at other thread counts on CPU (measured: ~3e-8 in
# float32 on a [117, 688] tensor between 1 and 2 threads): their vectorised and scalar-tail
# paths round differently, and the thread split moves the tail. These compose ops that do
# not, so float32 inference does not depend on OMP_NUM_THREADS
# (tests/test_layers.py::test_activations_are_independent_of_the_thread_count).
def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x), as torch's (threshold 20: x itself above it)."""
    return torch.where(x > 20, x, torch.log1p(torch.exp(x.clamp(max=20))))


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))
    return F.gelu(x)


def logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = torch.broadcast_tensors(a, b)
    return torch.logsumexp(torch.stack([a, b]), dim=0)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), the dense FFN of every family here."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class SwiGLUW(nn.Module):
    """The same SwiGLU under the names Mixtral / MiniMax / DeepSeek checkpoints use:
    w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu(self.w1(x)) * self.w3(x))


def _onednn_dtypes() -> frozenset:
    """The dtypes oneDNN's linear runs in this torch build on this CPU (CPU builds for x86
    and ARM have it; bfloat16 needs CPU support: an AVX2-only AMD EPYC refused it with "could
    not create a primitive descriptor")."""
    ok = set()
    for dtype in (torch.float32, torch.bfloat16):
        try:
            torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 2, dtype=dtype), torch.zeros(3, 2, dtype=dtype), None,
                                               "none", [], "")
            ok.add(dtype)
        except (AttributeError, RuntimeError):
            pass
    return frozenset(ok)


ONEDNN_DTYPES = _onednn_dtypes()
ONEDNN = torch.float32 in ONEDNN_DTYPES
_onednn = torch.ops.mkldnn._linear_pointwise if ONEDNN_DTYPES else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, run by oneDNN for float32 / bfloat16 inference on CPU, each where this CPU
    has oneDNN's kernel for it (`ONEDNN_DTYPES`).

    Why: torch's CPU F.linear goes to MKL, whose results change with the thread count (its
    reductions split differently: a 256 x 256 matrix-vector product at 3+ threads, 16-row
    products from K = 1024 at 2 threads, measured here), and which on the AMD CPUs measured
    here streams a matrix-vector product at ~11-15 GB/s, a 128-row product at ~40 % of
    oneDNN's speed. oneDNN's linear on the same row-major weight gives the same bits at
    1-8 threads, runs 1.5x (decode) to 2.5x (prefill) faster there
    (benchmarks/bench_llamacpp.py) and 1.1-2.5x slower than MKL on the Intel VM measured
    later. Same weight, no repacking. Training (autograd), float64 and other devices keep
    F.linear.
    """
    if (x.dtype in ONEDNN_DTYPES and x.device.type == "cpu" and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return _onednn(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear`; `use_fast_linears` swaps it in for inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_fast_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` a `Linear` (same parameters, same state dict);
    returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
            n += 1
    return n
