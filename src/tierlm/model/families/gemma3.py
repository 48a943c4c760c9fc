"""Gemma 3 text decoder (transformers' Gemma3ForCausalLM, model_type gemma3_text).

Differences from the plain GQA block (gqa.py):
  * embeddings are multiplied by sqrt(hidden_size), rounded to the model dtype;
  * Gemma RMSNorm: x * (1 + weight), with the whole normalisation (weight included) in
    float32 and the result cast back, as transformers does;
  * four norms per layer: input, post-attention (on the attention output, before the
    residual add), pre-feedforward and post-feedforward (likewise), plus per-head q/k norms;
  * sliding-window and global layers from `layer_types`, each with its own RoPE: the
    "sliding_attention" parameters (rope_local_base_freq, no scaling) and the
    "full_attention" ones (rope_theta with rope_scaling, e.g. linear);
  * attention scale query_pre_attn_scalar ** -0.5; optional tanh soft-capping of the final
    logits (final_logit_softcapping); gelu(tanh) gated MLP; tied embeddings.

`attn_logit_softcapping` is read but NOT applied, as in transformers 5.23: Gemma3Attention keeps
the value yet never passes it to the attention function (Gemma 3 replaced Gemma 2's attention
soft-capping by q/k norms; every released config has it null). Applying it would break parity
with the reference for a config that sets it.

Sliding layers keep only the last window - 1 keys/values in the cache (all a later query
can see); global layers keep everything. Tensor names are the Hugging Face ones.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import TierlmError
from ...spec.model import LayerSpec, ModelSpec
from ..cache import Cache
from ..layers import apply_rope, rope_attention_factor, rope_cos_sin, rope_inv_freq

# Gemma3TextConfig defaults (transformers v5.23.0) for fields a config may omit.
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
DEFAULT_QUERY_PRE_ATTN_SCALAR = 256
ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}     # hidden_activation -> F.gelu(approximate=)


def rope_parameters(cfg: dict) -> dict[str, tuple[float, dict | None]]:
    """(theta, scaling or None) per layer type, as Gemma3TextConfig resolves them: a nested
    `rope_parameters` {"full_attention": {...}, "sliding_attention": {...}} (what v5 saves),
    else the v4 fields rope_theta + rope_scaling (global) and rope_local_base_freq (local).
    A legacy `rope_scaling` is merged into the global parameters, never the local ones."""
    given = cfg.get("rope_parameters")
    params = {k: dict(v) for k, v in given.items() if k in DEFAULT_THETA and isinstance(v, dict)} \
        if isinstance(given, dict) else {}
    legacy = cfg.get("rope_scaling")
    full = params.setdefault("full_attention", {"rope_type": "default"})
    if isinstance(legacy, dict):
        full.update(legacy)
    full.setdefault("rope_theta", cfg.get("rope_theta") or DEFAULT_THETA["full_attention"])
    local = params.setdefault("sliding_attention", {"rope_type": "default"})
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq") or DEFAULT_THETA["sliding_attention"])
    out = {}
    for kind, p in params.items():
        rope_type = p.get("rope_type", p.get("type", "default"))
        theta = p.get("rope_theta")
        if theta is None:
            theta = DEFAULT_THETA[kind]
        out[kind] = (float(theta), None if rope_type == "default" else {**p, "rope_type": rope_type})
    return out


class GemmaRMSNorm(nn.Module):
    """float32(x) normalised, times (1 + float32(weight)), cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x))


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec):
        super().__init__()
        g, cfg = spec.gqa, spec.config
        assert g is not None
        h, eps = spec.hidden_size, cfg.get("rms_norm_eps", 1e-6)
        bias = bool(cfg.get("attention_bias", False))
        self.heads, self.kv_heads, self.head_dim = g.num_heads, g.num_kv_heads, g.head_dim
        self.index = layer.index
        self.window = layer.window if layer.attention == "sliding" else None
        self.scale = float(cfg.get("query_pre_attn_scalar", DEFAULT_QUERY_PRE_ATTN_SCALAR)) ** -0.5
        self.q_proj = nn.Linear(h, g.num_heads * g.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, g.num_kv_heads * g.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, g.num_kv_heads * g.head_dim, bias=bias)
        self.o_proj = nn.Linear(g.num_heads * g.head_dim, h, bias=bias)
        self.q_norm = GemmaRMSNorm(g.head_dim, eps)
        self.k_norm = GemmaRMSNorm(g.head_dim, eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)   # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = int(positions[-1]) + 1
        if cache is not None:
            store = cache.layer(self.index)
            if "k" in store:
                k, v = torch.cat([store["k"], k], dim=2), torch.cat([store["v"], v], dim=2)
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
            # A sliding layer's next query (position `end`) sees keys > end - window: keep window - 1.
            store["k"] = k if keep == k.shape[2] else k[:, :, k.shape[2] - keep:].clone()
            store["v"] = v if keep == v.shape[2] else v[:, :, v.shape[2] - keep:].clone()
        key_pos = torch.arange(end - k.shape[2], end, device=x.device)
        visible = key_pos[None, :] <= positions[:, None]
        if self.window is not None:
            visible &= key_pos[None, :] > positions[:, None] - self.window
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.scale     # no attn_logit_softcapping: see the docstring
        scores = scores.masked_fill(~visible, float("-inf"))
        # Softmax in at least float32 (as transformers' eager path; float64 stays float64, as sdpa).
        work = torch.promote_types(scores.dtype, torch.float32)
        probs = torch.softmax(scores.to(work), dim=-1).to(q.dtype)
        out = probs @ v
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec, approximate: str):
        super().__init__()
        h, eps = spec.hidden_size, spec.config.get("rms_norm_eps", 1e-6)
        self.kind = "sliding_attention" if layer.attention == "sliding" else "full_attention"
        self.self_attn = Attention(spec, layer)
        self.mlp = GeluMLP(h, spec.dense_intermediate or 0, approximate)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, x, positions, cos, sin, cache):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, cos, sin, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec, approximate: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, layer, approximate) for layer in spec.layers)
        self.norm = GemmaRMSNorm(spec.hidden_size, spec.config.get("rms_norm_eps", 1e-6))


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        cfg = spec.config
        if spec.gqa is None or spec.dense_intermediate is None:
            raise TierlmError("gemma3_text needs a GQA attention spec and intermediate_size")
        if cfg.get("use_bidirectional_attention"):
            raise TierlmError("gemma3_text with use_bidirectional_attention (an encoder) is not supported; "
                              "this family is the causal decoder")
        act = cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ACTIVATIONS:
            raise TierlmError(f"gemma3_text hidden_activation {act!r} is not supported "
                              f"(supported: {', '.join(ACTIVATIONS)})")
        self.spec = spec
        self.model = Decoder(spec, ACTIVATIONS[act])
        if not spec.tie_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.embed_scale = math.sqrt(spec.hidden_size)
        self.final_softcap = cfg.get("final_logit_softcapping")
        self.rope = rope_parameters(cfg)
        for kind, (theta, scaling) in self.rope.items():   # fail at build time on an unsupported type
            rope_inv_freq(spec.gqa.head_dim, theta, scaling, max_position=spec.max_position, device="cpu")

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        T = input_ids.shape[1]
        positions = torch.arange(start, start + T, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)
        tables = {}
        for kind in {block.kind for block in self.model.layers}:
            theta, scaling = self.rope[kind]
            inv = rope_inv_freq(self.spec.gqa.head_dim, theta, scaling, device=x.device,
                                max_position=self.spec.max_position)
            tables[kind] = rope_cos_sin(positions, inv, x.dtype, rope_attention_factor(scaling, self.spec.max_position))
        for block in self.model.layers:
            x = block(x, positions, *tables[block.kind], cache)
        x = self.model.norm(x)
        if cache is not None:
            cache.length += T
        head = self.model.embed_tokens.weight if self.spec.tie_embeddings else self.lm_head.weight
        return _softcap(F.linear(x, head), self.final_softcap)


def build(spec: ModelSpec, checkpoint_names: Iterable[str] = ()) -> CausalLM:
    return CausalLM(spec)
