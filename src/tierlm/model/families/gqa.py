"""GQA decoder families: Llama, Mistral, Qwen2, Qwen3 (dense) and Qwen3-MoE, Mixtral, gpt-oss (MoE).

One pre-norm decoder block: x + attn(norm(x)), then + ffn(norm(.)). Attention is grouped-query
with optional per-head q/k RMSNorm (Qwen3), sliding windows and learned per-head sink logits
(gpt-oss); the FFN is SwiGLU or a softmax-routed mixture of SwiGLU experts (gpt-oss: biased
router, softmax over the top-k logits, fused biased experts with a clamped SwiGLU). Tensor
names are the Hugging Face ones.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...spec.model import LayerSpec, ModelSpec
from ..cache import Cache
from ..ops import Step, gather, gather_rows, store
from ..engram import Engram, EngramHashing
from ..layers import RMSNorm, SwiGLU, SwiGLUW, apply_rope, linear, rope_cos_sin, rope_inv_freq, sigmoid
from ..moe import dispatch


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims (all of them unless the rotary dim is partial)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float, causal: bool = False) -> torch.Tensor:
    """SDPA of q [B, H, T, D] over k, v [B, KV, S, D] (query head h reads KV head h // (H / KV))
    under mask [B, 1, T, S] (None: every query sees every key, or with `causal` key j <= query
    i, `Step.causal`; SDPA's masked path took ~1.4x as long at 4k context here). A decode
    step (T = 1) folds the H / KV query heads of each KV head into its query rows, [B, KV,
    H / KV, D]: the same dot products, but each K/V head is read once instead of through
    enable_gqa's expansion (1.5-1.8x faster per layer at 4k context and at batch 16 here;
    prefill chunks gain nothing, so they keep enable_gqa)."""
    B, H, T, D = q.shape
    kv = k.shape[1]
    if T == 1 and H > kv:
        if mask is not None:
            mask = mask.expand(B, 1, H // kv, mask.shape[-1])
        out = F.scaled_dot_product_attention(q.reshape(B, kv, H // kv, D), k, v, attn_mask=mask, scale=scale)
        return out.reshape(B, H, 1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal, enable_gqa=H > kv)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec):
        super().__init__()
        g = spec.gqa
        assert g is not None
        h, eps = spec.hidden_size, spec.norm_eps
        self.heads, self.kv_heads, self.head_dim = g.num_heads, g.num_kv_heads, g.head_dim
        self.index = layer.index
        self.window = layer.window if layer.attention == "sliding" else None
        self.q_proj = nn.Linear(h, g.num_heads * g.head_dim, bias=g.qkv_bias)
        self.k_proj = nn.Linear(h, g.num_kv_heads * g.head_dim, bias=g.qkv_bias)
        self.v_proj = nn.Linear(h, g.num_kv_heads * g.v_head_dim, bias=g.qkv_bias)
        self.o_proj = nn.Linear(g.num_heads * g.v_head_dim, h, bias=g.o_bias)
        self.qk_norm = g.qk_norm
        if g.qk_norm == "head":            # per-head q/k norm (Qwen3, Gemma 3)
            self.q_norm = RMSNorm(g.head_dim, eps)
            self.k_norm = RMSNorm(g.head_dim, eps)
        elif g.qk_norm == "full":          # one norm across all heads (MiniMax-M2)
            self.q_norm = RMSNorm(g.num_heads * g.head_dim, eps)
            self.k_norm = RMSNorm(g.num_kv_heads * g.head_dim, eps)
        # gpt-oss: one learned logit per head that joins each softmax denominator (attends to nothing).
        self.sinks = nn.Parameter(torch.empty(g.num_heads)) if g.sinks else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        """x [B, T, D]; cos/sin [B, T, rot] at step.positions."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.heads, self.head_dim)
        k = k.view(B, T, self.kv_heads, self.head_dim)
        v = v.view(B, T, self.kv_heads, -1)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)                      # [B, T, H, D]
        kview, vview = step.view(self.index, "k"), step.view(self.index, "v")
        new = step.new_index()
        store(kview, new, k.flatten(2))
        store(vview, new, v.flatten(2))
        keys = step.key_index(self.window or 0)                            # [B, S] positions
        if T == 1 and B > 1 and self.sinks is None:
            rows = gather_rows(kview, keys), gather_rows(vview, keys)
            if rows[0] is not None and rows[1] is not None:                # decode: each row where it is
                return self.o_proj(self._attend_rows(q, *rows).reshape(B, 1, -1))
        k = gather(kview, keys).view(B, -1, self.kv_heads, self.head_dim)
        v = gather(vview, keys).view(B, -1, self.kv_heads, v.shape[-1])
        visible = step.visible(self.window or 0)                           # [B, T, S]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H or KV, T or S, D]
        rep = self.heads // self.kv_heads
        if self.sinks is None and step.causal(self.window or 0):
            out = _attend(q, k, v, None, self.head_dim ** -0.5, causal=True)      # [B, H, T, Dv]
        elif self.sinks is None:
            mask = None if step.sees_all(self.window or 0) else visible[:, None]
            out = _attend(q, k, v, mask, self.head_dim ** -0.5)
        else:
            # gpt-oss: a learned logit per head joins each softmax denominator (attends to nothing)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
            scores = scores.masked_fill(~visible[:, None], float("-inf"))
            sink = self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(B, -1, T, 1)
            logits = torch.cat([scores, sink], dim=-1)
            logits = logits - logits.amax(dim=-1, keepdim=True)
            out = torch.softmax(logits, dim=-1)[..., :-1] @ v                # the sink's share is dropped
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _attend_rows(self, q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
        """Decode attention one sequence at a time over its own entries, read in place: q [B, 1,
        H, D], ks / vs [S_b, KV * D] per row -> [B, H, 1, Dv]. A row's query sees every one of its
        entries (the key index holds its window or whole context), so no mask."""
        out = []
        for b, (k, v) in enumerate(zip(ks, vs)):
            k = k.view(1, -1, self.kv_heads, self.head_dim).transpose(1, 2)    # [1, KV, S_b, D]
            v = v.view(1, -1, self.kv_heads, v.shape[-1] // self.kv_heads).transpose(1, 2)
            out.append(_attend(q[b:b + 1].transpose(1, 2), k, v, None, self.head_dim ** -0.5))
        return torch.cat(out)                                                  # [B, H, 1, Dv]


class MoE(nn.Module):
    """Softmax router over E SwiGLU experts, top-k, optionally renormalised (Qwen3-MoE, Mixtral)."""

    def __init__(self, spec: ModelSpec, mixtral: bool):
        super().__init__()
        m = spec.moe
        assert m is not None
        self.top_k = m.top_k
        self.normalize = m.router.norm_topk_prob
        self.gate = nn.Linear(spec.hidden_size, m.num_experts, bias=False)
        if mixtral:
            self.experts = nn.ModuleList(SwiGLUW(spec.hidden_size, m.expert_intermediate)
                                         for _ in range(m.num_experts))
        else:
            self.experts = nn.ModuleList(SwiGLU(spec.hidden_size, m.expert_intermediate)
                                         for _ in range(m.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        # Routing probabilities in float32, as in the reference routers.
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = dispatch(x, chosen, weights.to(x.dtype), lambda e, rows: self.experts[e](rows))
        return out.reshape(shape)


class GptOssMoE(nn.Module):
    """gpt-oss: biased router, top-k on the logits then softmax over the k, and all experts in fused
    tensors as transformers stores them: gate_up_proj [E, hidden, 2I] with gate/up interleaved
    (even/odd columns), down_proj [E, I, hidden], each with a bias; SwiGLU clamped at swiglu_limit."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        m = spec.moe
        assert m is not None
        E, h, inter = m.num_experts, spec.hidden_size, m.expert_intermediate
        self.top_k = m.top_k
        self.router = nn.Linear(h, E, bias=True)
        self.experts = _GptOssExperts(E, h, inter, m.swiglu_limit, m.swiglu_alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top, chosen = torch.topk(self.router(x), self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        return dispatch(x, chosen, weights, self.experts).reshape(shape)


class _GptOssExperts(nn.Module):
    def __init__(self, experts: int, dim: int, hidden: int, limit: float, alpha: float):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(experts, dim, 2 * hidden))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(experts, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, dim))
        self.down_proj_bias = nn.Parameter(torch.empty(experts, dim))
        self.limit, self.alpha = limit, alpha

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        gate = gate_up[..., 0::2].clamp(max=self.limit)
        up = gate_up[..., 1::2].clamp(-self.limit, self.limit)
        act = (up + 1) * (gate * sigmoid(self.alpha * gate))
        return act @ self.down_proj[e] + self.down_proj_bias[e]


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec):
        super().__init__()
        eps = spec.norm_eps
        gpt_oss = spec.family == "gpt_oss"
        self.input_layernorm = RMSNorm(spec.hidden_size, eps, cast_last=gpt_oss)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps, cast_last=gpt_oss)
        mixtral = spec.family == "mixtral"
        if layer.ffn == "dense":
            ffn = SwiGLU(spec.hidden_size, spec.dense_intermediate or 0, spec.mlp_bias)
        else:
            ffn = GptOssMoE(spec) if gpt_oss else MoE(spec, mixtral)
        self.ffn_name = "block_sparse_moe" if mixtral and layer.ffn != "dense" else "mlp"
        setattr(self, self.ffn_name, ffn)
        # Optional Engram (deepseek-ai/Engram): h = h + engram(h, indices) before attention.
        e = spec.engram
        self.engram = Engram.from_spec(spec, layer.index) if e is not None and layer.index in e.layer_ids else None

    def forward(self, x, cos, sin, step: Step, engram_indices=None):
        if self.engram is not None:
            x = x + self.engram(x, engram_indices[self.engram.layer_id], step)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step)
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, layer) for layer in spec.layers)
        self.norm = RMSNorm(spec.hidden_size, spec.norm_eps, cast_last=spec.family == "gpt_oss")


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = Decoder(spec)
        if not spec.tie_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        # Engram lookup indices depend on token ids only: computed here, outside the blocks.
        # Replace with EngramHashing.from_spec(spec, lookup_table) to use a tokenizer's compression.
        self.engram_hashing = EngramHashing.from_spec(spec) if spec.engram is not None else None
        self.history = self.engram_hashing.context if self.engram_hashing is not None else 0   # tokens of left context read

    def cache_layers(self) -> tuple[LayerSpec, ...]:
        """The layers whose cache streams the pools hold."""
        return self.spec.layers

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """logits [B, T, V] of input_ids [B, T] appended to `cache` (none: a fresh sequence)."""
        cache = Cache() if cache is None else cache
        step = cache.step(self, input_ids, self.model.embed_tokens.weight.dtype)
        h = self.hidden(input_ids, step)
        cache.advance(input_ids)
        return self.logits(h)

    def hidden(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        """Final hidden states [B, T, D] of input_ids [B, T] over the step's cache views."""
        x = self.model.embed_tokens(input_ids)
        rope = self.spec.rope
        cos, sin = rope_cos_sin(step.positions.reshape(-1), rope_inv_freq(rope, device=x.device), x.dtype,
                                rope.attention_factor)
        cos, sin = cos.view(*step.positions.shape, -1), sin.view(*step.positions.shape, -1)
        engram = self.engram_hashing.step(input_ids, step) if self.engram_hashing is not None else None
        for block in self.model.layers:        # off-device Engram tables: gather every layer's rows now
            if block.engram is not None:
                block.engram.multi_head_embedding.prefetch(engram[block.engram.layer_id])
        for block in self.model.layers:
            x = block(x, cos, sin, step, engram)
        return self.model.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens.weight if self.spec.tie_embeddings else self.lm_head.weight
        return linear(h, head)


def build(spec: ModelSpec, checkpoint_names: Iterable[str] = ()) -> CausalLM:
    return CausalLM(spec)
