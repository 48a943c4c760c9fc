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

`attn_logit_softcapping` is ignored, as in transformers 5.23: Gemma3Attention keeps the value
yet never passes it to the attention function (Gemma 3 replaced Gemma 2's attention
soft-capping by q/k norms; every released config has it null). Applying it would break parity
with the reference for a config that sets it.

Attention is gqa.Attention (paged store/gather, per-row masks) with Gemma's norms, o_proj bias
and score scale. Its sliding-window rule is transformers 5.23's for gemma3 sliding layers
(masking_utils.sliding_window_overlay, kv_idx > q_idx - sliding_window): a query at position p
sees keys p - window < j <= p, itself and window - 1 earlier ones. The layer reads only
`step.key_index(window)`, which starts at the first query's window, so the engine may free
older blocks. Tensor names are the Hugging Face ones.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import TierlmError
from ...spec.model import LayerSpec, ModelSpec
from ..layers import gelu, linear, rope_cos_sin, rope_inv_freq
from ..ops import Step
from . import gqa

ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}     # hidden_activation -> F.gelu(approximate=)


class GemmaRMSNorm(nn.Module):
    """float32(x) normalised, times (1 + float32(weight)), cast back to x's dtype (then times
    `gain`, in that dtype, when one is given)."""

    def __init__(self, dim: int, eps: float = 1e-6, gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = (y * (1.0 + self.weight.float())).to(x.dtype)
        return y if self.gain == 1.0 else y * self.gain


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.gate_proj(x), self.approximate) * self.up_proj(x))


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class Attention(gqa.Attention):
    """gqa.Attention (o_proj biased like q/k/v by attention_bias, as the spec says) with Gemma's
    (1 + weight) per-head q/k norms and scores scaled by query_pre_attn_scalar ** -0.5. No
    attention soft-capping (see the module docstring)."""

    def __init__(self, spec: ModelSpec, layer: LayerSpec):
        super().__init__(spec, layer)
        g = spec.gqa
        # gqa.Attention scales scores by head_dim ** -0.5. RoPE and q.k are linear in q, so the rest
        # of Gemma's scale is applied to q as it leaves its norm (after the cast: a float64 model
        # stays exact, the norm itself still runs in float32).
        scalar = spec.gemma.query_pre_attn_scalar
        self.q_norm = GemmaRMSNorm(g.head_dim, spec.norm_eps, gain=(g.head_dim / scalar) ** 0.5)
        self.k_norm = GemmaRMSNorm(g.head_dim, spec.norm_eps)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec, approximate: str):
        super().__init__()
        h, eps = spec.hidden_size, spec.norm_eps
        self.kind = "sliding_attention" if layer.attention == "sliding" else "full_attention"
        self.self_attn = Attention(spec, layer)
        self.mlp = GeluMLP(h, spec.dense_intermediate or 0, approximate)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, x, cos, sin, step: Step):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, step))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec, approximate: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, layer, approximate) for layer in spec.layers)
        self.norm = GemmaRMSNorm(spec.hidden_size, spec.norm_eps)


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        gemma = spec.gemma
        if spec.gqa is None or spec.dense_intermediate is None or gemma is None:
            raise TierlmError("gemma3_text needs a GQA attention spec, intermediate_size and Gemma settings")
        if gemma.bidirectional:
            raise TierlmError("gemma3_text with use_bidirectional_attention (an encoder) is not supported; "
                              "this family is the causal decoder")
        self.spec = spec
        self.model = Decoder(spec, ACTIVATIONS[gemma.hidden_activation])
        if not spec.tie_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.embed_scale = math.sqrt(spec.hidden_size)
        self.final_softcap = gemma.final_logit_softcapping
        self.rope = {"full_attention": spec.rope, "sliding_attention": gemma.sliding_rope}

    # The step protocol of the GQA families: Cache -> Step -> hidden -> advance -> logits.
    cache_layers = gqa.CausalLM.cache_layers
    forward = gqa.CausalLM.forward

    def hidden(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        """Final hidden states [B, T, D] of input_ids [B, T] over the step's cache views."""
        x = self.model.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)
        positions = step.positions                                         # [B, T]
        tables = {}                                                        # kind -> cos, sin [B, T, D]
        for kind in {block.kind for block in self.model.layers}:
            rope = self.rope[kind]
            cos, sin = rope_cos_sin(positions.reshape(-1), rope_inv_freq(rope, device=x.device), x.dtype,
                                    rope.attention_factor)
            tables[kind] = cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)
        for block in self.model.layers:
            x = block(x, *tables[block.kind], step)
        return self.model.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens.weight if self.spec.tie_embeddings else self.lm_head.weight
        return _softcap(linear(h, head), self.final_softcap)


def build(spec: ModelSpec, checkpoint_names: Iterable[str] = ()) -> CausalLM:
    return CausalLM(spec)
