"""MiniMax-M2 (MiniMaxM2ForCausalLM): a pre-norm GQA decoder whose every FFN is a mixture of experts.

What differs from the other GQA families (gqa.py):
  * q/k RMSNorm over the whole projection ("full": q_norm has num_heads * head_dim weights,
    k_norm num_kv_heads * head_dim), applied before the heads are split;
  * partial RoPE: only the first int(head_dim * partial_rotary_factor) dimensions of each head
    rotate (rotate-half convention), the rest pass through (spec.rope.dim; the parser reads the
    factor as transformers 5.23 does, the released checkpoints' legacy rotary_dim included);
  * a sigmoid router: scores = sigmoid(logits) in float32; the top-k experts are chosen on
    scores + e_score_correction_bias (selection only), their weights are the unbiased scores
    renormalised to sum to one (no extra scaling factor);
  * experts named as checkpoints store them: block_sparse_moe.experts.N.{w1 (gate), w3 (up),
    w2 (down)}.weight, which is also what transformers' save_pretrained writes. A checkpoint in
    transformers' fused runtime layout (mlp.experts.gate_up_proj [E, 2I, h] = [w1; w3],
    mlp.experts.down_proj [E, h, I]) is recognised from its tensor names and built that way.

Multi-token-prediction modules (num_mtp_modules) are not built: transformers does not instantiate
them either, so this model is the next-token model only; a checkpoint that carries MTP tensors
needs strict=False in `tierlm.model.load`. Attention is full (causal) in every layer, as in
transformers, which has no sliding window for this family.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import TierlmError
from ...spec.model import LayerSpec, ModelSpec
from ..layers import RMSNorm, SwiGLUW, linear, rope_cos_sin, rope_inv_freq, silu
from ..moe import dispatch
from ..ops import Step
from . import gqa


class FusedExperts(nn.Module):
    """transformers' runtime layout: gate_up_proj [E, 2I, h] (gate rows then up rows), down_proj [E, h, I]."""

    def __init__(self, experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(experts, dim, hidden))

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return linear(silu(gate) * up, self.down_proj[e])


class SparseMoE(nn.Module):
    def __init__(self, spec: ModelSpec, fused: bool):
        super().__init__()
        m = spec.moe
        assert m is not None
        E, h, inter = m.num_experts, spec.hidden_size, m.expert_intermediate
        self.top_k = m.top_k
        self.gate = nn.Linear(h, E, bias=False)
        self.fused = fused
        if fused:
            self.experts = FusedExperts(E, h, inter)
        else:
            self.experts = nn.ModuleList(SwiGLUW(h, inter) for _ in range(E))
        if m.router_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(E))
        else:
            self.e_score_correction_bias = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, h] -> (weights [N, k] float32, chosen [N, k])."""
        scores = torch.sigmoid(self.gate(x).float())
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        chosen = torch.topk(choice, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, chosen)
        return weights / weights.sum(dim=-1, keepdim=True), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.route(x)
        # The float32 weights multiply the expert outputs before the cast to the model dtype.
        expert = self.experts if self.fused else lambda e, rows: self.experts[e](rows)
        return dispatch(x, chosen, weights, expert).reshape(shape)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec, fused: bool):
        super().__init__()
        eps = spec.norm_eps
        self.input_layernorm = RMSNorm(spec.hidden_size, eps)
        self.self_attn = gqa.Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps)
        self.ffn_name = "mlp" if fused else "block_sparse_moe"
        setattr(self, self.ffn_name, SparseMoE(spec, fused))

    def forward(self, x, cos, sin, step: Step):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step)
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec, fused: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, layer, fused) for layer in spec.layers)
        self.norm = RMSNorm(spec.hidden_size, spec.norm_eps)


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, fused: bool = False):
        super().__init__()
        self.spec = spec
        self.model = Decoder(spec, fused)
        if not spec.tie_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    # The step protocol and output head of the GQA families: Cache -> Step -> hidden -> advance -> logits.
    cache_layers = gqa.CausalLM.cache_layers
    forward = gqa.CausalLM.forward
    logits = gqa.CausalLM.logits

    def hidden(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        """Final hidden states [B, T, D] of input_ids [B, T] over the step's cache views."""
        x = self.model.embed_tokens(input_ids)
        rope = self.spec.rope                                              # partial: rope.dim < head_dim
        cos, sin = rope_cos_sin(step.positions.reshape(-1), rope_inv_freq(rope, device=x.device), x.dtype,
                                rope.attention_factor)
        cos, sin = cos.view(*step.positions.shape, -1), sin.view(*step.positions.shape, -1)   # [B, T, rot]
        for block in self.model.layers:
            x = block(x, cos, sin, step)
        return self.model.norm(x)


def build(spec: ModelSpec, checkpoint_names: Iterable[str] = ()) -> CausalLM:
    if spec.gqa is None or spec.moe is None:
        raise TierlmError("minimax_m2 needs attention (gqa) and MoE settings in its spec")
    if any(layer.ffn != "moe" for layer in spec.layers):
        raise TierlmError("minimax_m2: every layer is expected to be a MoE layer")
    fused = any(".mlp.experts.gate_up_proj" in n for n in checkpoint_names)
    return CausalLM(spec, fused)
