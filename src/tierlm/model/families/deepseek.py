"""DeepSeek-V2 / V3 (Kimi-K2) / V3.2 and GLM-5 (glm_moe_dsa): MLA, DSA, DeepSeekMoE, MTP.

One readable file in the style of DeepSeek's `inference/model.py`; tensors are laid out
[batch, tokens, heads, dim] ("bshd") and every state_dict name is the Hugging Face
checkpoint name (`rename` maps the official DeepSeek names onto them).

Shapes: B batch, T new tokens, S visible tokens (cache + new), K entries selected by the DSA
indexer, H heads, D model dim, C kv_lora_rank (the MLA latent), R qk_rope_head_dim,
N qk_nope_head_dim, V v_head_dim.

Reference. `model.set_reference("official" | "transformers", exact_fp32=None)` picks the
behaviour where DeepSeek's official inference code and transformers differ in a way that is
more than rounding (see docs/models.md). The only such switchable difference is the V3.2
lightning indexer: "official" (the default for deepseek_v32) rotates the indexer queries and
keys with a Hadamard transform and fake-quantises them to FP8 (block 128; ue8m0 power-of-two
scales when the config has `scale_fmt`, else amax / 448) before scoring, caches the quantised
keys and folds the d^-0.5 score scale into the head weights, as `Indexer` in
deepseek-ai/DeepSeek-V3.2-Exp `inference/model.py` does; "transformers" does none of that.
GLM-5 (glm_moe_dsa) has no DeepSeek official code, so its indexer always follows transformers
(its default reference is "transformers" and "official" changes nothing there); for V2 / V3 /
Kimi-K2 the two references currently compute the same thing.

Precision. transformers and DeepSeek's own code compute RMSNorm statistics, RoPE tables,
router logits/scores, attention softmax and the DSA indexer scores in float32 even when
the model runs in a wider dtype. With `exact_fp32 = True` (the default for the transformers
reference; `set_reference` sets it unless given) these ops are done in float32 exactly as
there, so a float64 model matches transformers bit for bit in the tests (every float32 cast
re-quantises the activations). Float32
results depend on reduction order and GEMM shape, so with `exact_fp32 = True` a decode step
can differ from the full forward by float32 rounding; `exact_fp32 = False` (the default for
the official reference) computes those ops
in max(dtype, float32) instead (identical to `True` for bf16/fp16/fp32 models), which
makes a float64 model exact to ~1e-15 between prefill+decode and the full forward. A float32
sum also rounds by where its terms sit, so for a float64 model with `exact_fp32` the DSA
softmax of the K selected scores is taken over the dense row of positions, as transformers'
masked softmax is (`dense_softmax`); the attention still reads only the K selected latents.

Cache. Every layer runs over the paged cache contract (`tierlm.model.ops`): it `store`s its
new entry [normalised c_kv | rotated k_pe] in its `latent` stream (DSA layers with their own
indexer also the indexer key in `indexer`) and `gather`s what its queries may see, with
per-row positions, so the cache-less forward, `Cache` decoding and the engine's ragged steps
run the same code. Dense MLA gathers every visible entry once per row [B,S]; DSA gathers
only each query's top-k entries [B,T,K] (GLM-5 IndexShare layers reuse the previous layer's
top-k positions). MTP blocks cache under their own layer index.

`absorb` selects the MLA path: True the absorbed (latent-space, MQA-style) one, False the
naive one that decompresses K/V, None (the default) absorbed for decode steps (one token per
row) and for DSA layers (decompressing K latents per query costs more than absorbing), naive
for dense-MLA prefill. Both read the same cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import TierlmError
from ...spec.model import LayerSpec, ModelSpec, RopeConfig
from ..cache import Cache
from ..layers import SwiGLU, linear, rope_inv_freq
from ..moe import dispatch
from ..ops import Step, gather, gather_rows, store
from ..quant import fake_quant, hadamard

REFERENCES = ("official", "transformers")
INDEX_QUANT_BLOCK = 128          # official `block_size` of the indexer's act_quant


# ------------------------------------------------------------------------------ args
@dataclass
class Args:
    family: str
    dim: int
    vocab: int
    n_layers: int
    inter_dim: int
    moe_inter_dim: int
    n_routed: int
    n_shared: int
    topk: int
    n_group: int
    topk_group: int
    score_func: str              # softmax | sigmoid
    route_scale: float
    norm_topk_prob: bool
    router_bias: bool            # e_score_correction_bias (selection only)
    group_limited: bool          # group-limited routing (V2: topk_method group_limited_greedy)
    n_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    eps: float
    tie: bool
    rope: RopeConfig             # default or yarn
    rope_style: str              # complex (V2) | interleave | half
    softmax_scale: float
    rope_factor: float           # attention_scaling applied to cos/sin (YaRN attention_factor)
    index_heads: int = 0
    index_dim: int = 0
    index_topk: int = 0
    index_interleave: bool = False   # GLM-5: interleaved RoPE in the indexer; V3.2: rotate-half
    indexer_types: tuple[str, ...] = ()
    index_scale_fmt: str | None = None   # official `scale_fmt` (ue8m0): power-of-two FP8 scales
    # runtime switches, shared by every module of one model
    absorb: bool | None = None       # None: absorbed for decode steps and DSA layers (module docstring)
    exact_fp32: bool = True
    reference: str = "transformers"
    dense_layers: frozenset = field(default_factory=frozenset)

    @property
    def official_indexer(self) -> bool:
        """The V3.2 indexer runs DeepSeek's official Hadamard + FP8 path (GLM-5 has no
        official DeepSeek code and always follows transformers)."""
        return self.reference == "official" and self.family == "deepseek_v32"

    def up(self, dtype: torch.dtype) -> torch.dtype:
        """dtype of the ops the references run in float32."""
        if self.exact_fp32:
            return torch.float32
        return torch.float64 if dtype == torch.float64 else torch.float32


def make_args(spec: ModelSpec) -> Args:
    mla, moe, rope = spec.mla, spec.moe, spec.rope
    assert mla is not None and moe is not None
    family, router = spec.family, moe.router
    qk_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    scale = qk_head ** -0.5
    # transformers (following DeepSeek's HF code): with yarn, cos/sin carry the spec's attention
    # factor (mscale / mscale_all_dim) and the softmax scale carries mscale_all_dim**2.
    if rope.kind == "yarn" and rope.mscale_all_dim:
        ms = rope.yarn_mscale(rope.mscale_all_dim)
        scale = scale * ms * ms
    if family == "deepseek_v2":
        style = "complex"
    else:
        style = "interleave" if rope.interleave else "half"
    n = spec.num_layers
    idx = spec.indexer
    # Which DSA layers (MTP blocks included) reuse the previous top-k (GLM-5.x IndexShare) comes from the spec.
    types = tuple("shared" if l.shared_indexer else "full" for l in spec.all_layers(True)) if idx else ()
    reference = "official" if family == "deepseek_v32" else "transformers"
    return Args(
        family=family, dim=spec.hidden_size, vocab=spec.vocab_size, n_layers=n,
        inter_dim=spec.dense_intermediate or 0, moe_inter_dim=moe.expert_intermediate,
        n_routed=moe.num_experts, n_shared=moe.num_shared, topk=moe.top_k,
        n_group=router.n_group, topk_group=router.topk_group, score_func=router.scoring,
        route_scale=router.scale, norm_topk_prob=router.norm_topk_prob,
        router_bias=moe.router_bias, group_limited=router.group_limited,
        n_heads=mla.num_heads, q_lora_rank=mla.q_lora_rank or None, kv_lora_rank=mla.kv_lora_rank,
        qk_nope=mla.qk_nope_head_dim, qk_rope=mla.qk_rope_head_dim, v_head=mla.v_head_dim,
        eps=spec.norm_eps, tie=spec.tie_embeddings, rope=rope, rope_style=style,
        softmax_scale=scale, rope_factor=rope.attention_factor,
        index_heads=idx.n_heads if idx else 0, index_dim=idx.head_dim if idx else 0,
        index_topk=idx.topk if idx else 0, index_interleave=family == "glm_moe_dsa",
        indexer_types=types, index_scale_fmt=spec.quant.scale_fmt,
        reference=reference, exact_fp32=reference == "transformers",
        dense_layers=frozenset(l.index for l in spec.layers if l.ffn == "dense"),
    )


# ------------------------------------------------------------------------------ rope
def rope_tables(args: Args, positions: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] -> cos/sin [B, T, R/2] in `dtype` (V3 family), or complex freqs [B, T, R/2] (V2)."""
    up = args.up(dtype)
    freqs = positions.to(up).unsqueeze(-1) * rope_inv_freq(args.rope, dtype=up).to(positions.device)
    if args.rope_style == "complex":
        return torch.polar(torch.ones_like(freqs), freqs) * args.rope_factor
    return (freqs.cos() * args.rope_factor).to(dtype), (freqs.sin() * args.rope_factor).to(dtype)


def apply_rope(x: torch.Tensor, rope, style: str) -> torch.Tensor:
    """x [B, T, H, R]. 'complex' (V2) and 'interleave' rotate adjacent pairs (x0, x1), (x2, x3)...,
    'half' rotates (x_i, x_{i+R/2}). 'interleave' returns the rotated pairs de-interleaved,
    [even..., odd...], as transformers does: only dot products between rotated q and k are
    ever taken, and those do not depend on the order of the dimensions."""
    if style == "complex":
        xc = torch.view_as_complex(x.to(rope.real.dtype).reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * rope.unsqueeze(-2)).flatten(-2).to(x.dtype)
    cos, sin = rope[0].unsqueeze(-2), rope[1].unsqueeze(-2)
    if style == "interleave":
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ------------------------------------------------------------------------------ basics
class RMSNorm(nn.Module):
    def __init__(self, args: Args, dim: int, eps: float):
        super().__init__()
        self.args, self.eps = args, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(self.args.up(dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def dense_softmax(scores: torch.Tensor, top: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Softmax of scores [B,H,T,K] at logical positions top [B,T,K] (-1: masked), taken over
    rows of `width` positions with the others -inf as transformers' masked dense softmax is:
    a float32 sum rounds by where its terms sit (see the module docstring's Precision)."""
    B, H, T, K = scores.shape
    col = torch.where(top >= 0, top, width).unsqueeze(1).expand(B, H, T, K)          # masked: a spare column
    dense = scores.new_full((B, H, T, width + 1), float("-inf")).scatter(-1, col, scores)
    probs = dense[..., :width].softmax(dim=-1, dtype=dtype)
    return F.pad(probs, (0, 1)).gather(-1, col)


# ------------------------------------------------------------------------------ DSA indexer
class Indexer(nn.Module):
    """Lightning indexer: I[t,s] = sum_h w[t,h] * relu(q[t,h] . k[s] * d^-0.5); top-k per query.

    Official reference (V3.2, `args.official_indexer`), in the official order: RoPE on the first
    R dims, Hadamard rotation of q and k (`rotate_activation`), FP8 block quantisation of both
    (`act_quant`, block 128) with the quantised keys cached, then
    I = sum_h relu(q_fp8 . k_fp8) * (w_h * H^-0.5 * q_scale * d^-0.5) * k_scale (`fp8_index`),
    simulated here with dequantised values: relu(q . k) * (w_h * H^-0.5 * d^-0.5)."""

    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        h, d = args.index_heads, args.index_dim
        assert args.q_lora_rank, "DSA needs q_lora_rank (the indexer reads the query latent)"
        self.wq_b = nn.Linear(args.q_lora_rank, h * d, bias=False)
        self.wk = nn.Linear(args.dim, d, bias=False)
        self.k_norm = nn.LayerNorm(d, eps=1e-6)
        self.weights_proj = nn.Linear(args.dim, h, bias=False)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, rope, step: Step, layer: int) -> torch.Tensor:
        """x [B,T,D], qr [B,T,q_lora] -> top-k [B,T,K]: the logical positions of the visible
        entries each query attends to, ascending, -1 where fewer than K are visible."""
        a = self.args
        B, T, _ = x.shape
        R, style = a.qk_rope, "interleave" if a.index_interleave else "half"
        if a.rope_style == "complex":
            raise TierlmError("DSA with V2-style complex RoPE is not a known configuration")
        q = self.wq_b(qr).view(B, T, a.index_heads, a.index_dim)
        q = torch.cat([apply_rope(q[..., :R], rope, style), q[..., R:]], dim=-1)      # RoPE dims first
        k = self.k_norm(self.wk(x)).unsqueeze(2)                                         # [B,T,1,d]
        k = torch.cat([apply_rope(k[..., :R], rope, style), k[..., R:]], dim=-1).squeeze(2)
        up = a.up(x.dtype)
        if a.official_indexer:
            q, k = self._quant(q, up), self._quant(k, up)
        view = step.view(layer, "indexer")
        store(view, step.new_index(), k)
        keys = step.key_index()                                                          # [B,S]
        k = gather(view, keys)                                                           # [B,S,d]
        scores = torch.matmul(q.to(up), k.transpose(-1, -2).to(up).unsqueeze(1))        # [B,T,h,S]
        if a.official_indexer:   # the d^-0.5 score scale is folded into the head weights
            scores = F.relu(scores)
            w = (self.weights_proj(x) * a.index_heads ** -0.5).to(up) * a.index_dim ** -0.5
        else:
            scores = F.relu(scores * a.index_dim ** -0.5)
            w = self.weights_proj(x).to(up) * a.index_heads ** -0.5                      # [B,T,h]
        index = torch.matmul(w.unsqueeze(-2), scores).squeeze(-2)                        # [B,T,S]
        index = index.masked_fill(~step.visible(), float("-inf"))
        best, col = index.topk(min(a.index_topk, index.shape[-1]), dim=-1)              # [B,T,K]
        top = torch.take_along_dim(keys.unsqueeze(1), col, dim=-1)
        return torch.where(best > float("-inf"), top, -1).sort(dim=-1).values

    def _quant(self, v: torch.Tensor, up: torch.dtype) -> torch.Tensor:
        """Official `rotate_activation` then `act_quant` round trip: the Hadamard transform is
        computed in float32 (or wider) and rounded once to the activation dtype, as
        fast_hadamard_transform does for its bf16 input; the FP8 quantisation and the
        dequantised result are in the indexer's score dtype `up` (the official kernel keeps
        the fp32 scales beside the FP8 values)."""
        rotated = hadamard(v.to(up)).to(v.dtype)
        return fake_quant(rotated.to(up), INDEX_QUANT_BLOCK, "fp8", pow2=self.args.index_scale_fmt is not None)


# ------------------------------------------------------------------------------ MLA
class MLA(nn.Module):
    def __init__(self, args: Args, layer: int):
        super().__init__()
        self.args, self.layer = args, layer
        H, qk = args.n_heads, args.qk_nope + args.qk_rope
        if args.q_lora_rank:
            self.q_a_proj = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(args, args.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = nn.Linear(args.dim, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.dim, args.kv_lora_rank + args.qk_rope, bias=False)
        self.kv_a_layernorm = RMSNorm(args, args.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, H * (args.qk_nope + args.v_head), bias=False)
        self.o_proj = nn.Linear(H * args.v_head, args.dim, bias=False)
        self.has_indexer = bool(args.index_heads) and (
            not args.indexer_types or args.indexer_types[layer] == "full")
        if self.has_indexer:
            self.indexer = Indexer(args)

    def forward(self, x: torch.Tensor, rope, step: Step,
                top: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B,T,D]; top: the previous DSA layer's top-k [B,T,K] (for IndexShare layers).
        Returns (out [B,T,D], this layer's top-k or the one it reused)."""
        a = self.args
        B, T, _ = x.shape
        H, N, R, V, C = a.n_heads, a.qk_nope, a.qk_rope, a.v_head, a.kv_lora_rank
        qr = None
        if a.q_lora_rank:
            qr = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(qr)
        else:
            q = self.q_proj(x)
        q = q.view(B, T, H, N + R)
        q_nope, q_pe = q[..., :N], apply_rope(q[..., N:], rope, a.rope_style)
        kv = self.kv_a_proj_with_mqa(x)
        k_pe = apply_rope(kv[..., C:].unsqueeze(2), rope, a.rope_style).squeeze(2)     # [B,T,R]
        view = step.view(self.layer, "latent")
        store(view, step.new_index(), torch.cat([self.kv_a_layernorm(kv[..., :C]), k_pe], dim=-1))
        sparse = bool(a.index_heads)
        absorb = a.absorb if a.absorb is not None else sparse or T == 1
        if sparse:     # each query reads only its own top-k entries
            if self.has_indexer:
                top = self.indexer(x, qr, rope, step, self.layer)
            assert top is not None, "a shared DSA layer needs a previous indexer layer"
            o = self._attend(q_nope, q_pe, gather(view, top), top >= 0, "btk", absorb, top, step)  # [B,T,K,C+R]
        else:          # every query of a row reads the row's visible entries
            keys = step.key_index()                                                    # [B,S]
            rows = gather_rows(view, keys) if T == 1 and B > 1 and absorb else None
            if rows is not None:   # decode: each sequence over its own entries, where they lie
                wkv_b = self.kv_b_proj.weight.view(H, N + V, C)
                q_lat = torch.einsum("bthn,hnc->bthc", q_nope, wkv_b[:, :N])
                o = torch.cat([self._absorbed(q_lat[b:b + 1], q_pe[b:b + 1], r.unsqueeze(0), None, "bk", top, step)
                               for b, r in enumerate(rows)])
                o = torch.einsum("bthc,hvc->bthv", o, wkv_b[:, N:])
            else:
                o = self._attend(q_nope, q_pe, gather(view, keys), step.visible(), "bk", absorb, top, step)  # [B,S,C+R]
        return self.o_proj(o.reshape(B, T, H * V)), top

    def _attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, entries: torch.Tensor, mask: torch.Tensor | None,
                ks: str, absorb: bool, top: torch.Tensor | None, step: Step) -> torch.Tensor:
        """Attention of q [B,T,H,N] / [B,T,H,R] over latent entries ([B,S,C+R] for ks "bk",
        [B,T,K,C+R] for "btk") under mask ([B,T,S|K]) -> [B,T,H,V]."""
        a = self.args
        H, N, V, C = a.n_heads, a.qk_nope, a.v_head, a.kv_lora_rank
        wkv_b = self.kv_b_proj.weight.view(H, N + V, C)
        if absorb:     # MQA over the latent: fold W_UK into q and W_UV into the output
            q_lat = torch.einsum("bthn,hnc->bthc", q_nope, wkv_b[:, :N])
            o = self._absorbed(q_lat, q_pe, entries, mask, ks, top, step)
            return torch.einsum("bthc,hvc->bthv", o, wkv_b[:, N:])
        latent, k_pe = entries[..., :C], entries[..., C:]    # decompress K/V for every head
        kv_full = linear(latent, self.kv_b_proj.weight).unflatten(-1, (H, N + V))   # [B,(T,)S|K,H,N+V]
        k = torch.cat([kv_full[..., :N], k_pe.unsqueeze(-2).expand(*k_pe.shape[:-1], H, a.qk_rope)], dim=-1)
        scores = torch.einsum(f"bthd,{ks}hd->bhtk", torch.cat([q_nope, q_pe], dim=-1), k) * a.softmax_scale
        probs = self._softmax(scores, mask, ks, top, step)
        return torch.einsum(f"bhtk,{ks}hv->bthv", probs, kv_full[..., N:])

    def _absorbed(self, q_lat: torch.Tensor, q_pe: torch.Tensor, entries: torch.Tensor, mask: torch.Tensor | None,
                  ks: str, top: torch.Tensor | None, step: Step) -> torch.Tensor:
        """Absorbed MLA in latent space: q_lat [B,T,H,C] (W_UK folded in) and q_pe over the
        entries -> [B,T,H,C], W_UV still to apply. mask None: every entry is visible."""
        C = self.args.kv_lora_rank
        latent, k_pe = entries[..., :C], entries[..., C:]
        scores = (torch.einsum(f"bthc,{ks}c->bhtk", q_lat, latent)
                  + torch.einsum(f"bthr,{ks}r->bhtk", q_pe, k_pe)) * self.args.softmax_scale
        return torch.einsum(f"bhtk,{ks}c->bthc", self._softmax(scores, mask, ks, top, step), latent)

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor | None, ks: str, top: torch.Tensor | None,
                 step: Step) -> torch.Tensor:
        a = self.args
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        if ks == "btk" and a.exact_fp32 and scores.dtype == torch.float64:
            return dense_softmax(scores, top, int(step.ends.max()), torch.float32).to(scores.dtype)
        return scores.softmax(dim=-1, dtype=a.up(scores.dtype)).to(scores.dtype)      # [B,H,T,S|K]


# ------------------------------------------------------------------------------ MoE
class Gate(nn.Module):
    """Router: softmax/sigmoid scores, selection bias, group-limited top-k, routed scaling."""

    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed, args.dim))
        if args.router_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(args.n_routed), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] in the router dtype, expert indices [N, k])."""
        a = self.args
        up = a.up(x.dtype)
        logits = F.linear(x.to(up), self.weight.to(up))
        scores = logits.softmax(dim=-1, dtype=up) if a.score_func == "softmax" else logits.sigmoid()
        choice = scores + self.e_score_correction_bias if a.router_bias else scores
        if a.group_limited and a.n_group > 1:
            groups = choice.view(x.shape[0], a.n_group, -1)
            group_scores = groups.topk(2, dim=-1)[0].sum(-1) if a.router_bias else groups.amax(-1)
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(a.topk_group, dim=-1)[1], 1)
            keep = keep.bool().unsqueeze(-1).expand_as(groups).reshape(x.shape[0], -1)
            # V3: excluded experts -> -inf; V2 (no bias, scores > 0): -> 0
            choice = choice.masked_fill(~keep, float("-inf") if a.router_bias else 0.0)
        idx = choice.topk(a.topk, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if a.family == "deepseek_v2":
            # DeepSeek's V2 code: renormalise *instead of* scaling (transformers ignores norm_topk_prob)
            if a.topk > 1 and a.norm_topk_prob:
                return w / (w.sum(-1, keepdim=True) + 1e-20), idx
            return w * a.route_scale, idx
        if a.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * a.route_scale, idx


class MoE(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        self.gate = Gate(args)
        self.experts = nn.ModuleList(SwiGLU(args.dim, args.moe_inter_dim) for _ in range(args.n_routed))
        if args.n_shared:
            self.shared_experts = SwiGLU(args.dim, args.n_shared * args.moe_inter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.gate(x)
        y = dispatch(x, idx, weights.to(x.dtype), lambda e, rows: self.experts[e](rows))
        if self.args.n_shared:
            y = y + self.shared_experts(x)
        return y.view(shape)


# ------------------------------------------------------------------------------ blocks
class Block(nn.Module):
    def __init__(self, args: Args, layer: int, moe: bool):
        super().__init__()
        self.self_attn = MLA(args, layer)
        self.mlp = MoE(args) if moe else SwiGLU(args.dim, args.inter_dim)
        self.input_layernorm = RMSNorm(args, args.dim, args.eps)
        self.post_attention_layernorm = RMSNorm(args, args.dim, args.eps)

    def forward(self, x, rope, step: Step, top):
        h, top = self.self_attn(self.input_layernorm(x), rope, step, top)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, top


class SharedHead(nn.Module):
    def __init__(self, args: Args, own_head: bool):
        super().__init__()
        self.norm = RMSNorm(args, args.dim, args.eps)
        if own_head:
            self.head = nn.Linear(args.dim, args.vocab, bias=False)


class MTPBlock(Block):
    """DeepSeek-V3 next-next-token module: h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]), block, head."""

    def __init__(self, args: Args, layer: int, own_embed: bool, own_head: bool):
        super().__init__(args, layer, moe=True)
        self.enorm = RMSNorm(args, args.dim, args.eps)
        self.hnorm = RMSNorm(args, args.dim, args.eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        if own_embed:
            self.embed_tokens = nn.Embedding(args.vocab, args.dim)
        self.shared_head = SharedHead(args, own_head)


class Model(nn.Module):
    def __init__(self, args: Args, mtp: list[tuple[bool, bool]]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab, args.dim)
        blocks: list[nn.Module] = [Block(args, i, i not in args.dense_layers) for i in range(args.n_layers)]
        blocks += [MTPBlock(args, args.n_layers + j, e, h) for j, (e, h) in enumerate(mtp)]
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(args, args.dim, args.eps)


class DeepseekForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, mtp: list[tuple[bool, bool]] = ()):
        """mtp: (own embedding, own head) of each MTP block the checkpoint holds."""
        super().__init__()
        self.spec = spec
        self.args = args = make_args(spec)
        self.model = Model(args, list(mtp))
        if not args.tie:
            self.lm_head = nn.Linear(args.dim, args.vocab, bias=False)

    # runtime switches (see the module docstring)
    @property
    def absorb(self) -> bool | None:
        return self.args.absorb

    @absorb.setter
    def absorb(self, value: bool | None) -> None:
        self.args.absorb = None if value is None else bool(value)

    @property
    def exact_fp32(self) -> bool:
        return self.args.exact_fp32

    @exact_fp32.setter
    def exact_fp32(self, value: bool) -> None:
        self.args.exact_fp32 = bool(value)

    @property
    def reference(self) -> str:
        return self.args.reference

    def set_reference(self, reference: str, exact_fp32: bool | None = None) -> None:
        """Switch between DeepSeek's official behaviour and transformers' (see the module
        docstring; only the V3.2 indexer differs). exact_fp32 (default: True for
        "transformers", False for "official") keeps transformers' float32 ops in a float64
        model. A cache filled under one reference should not be continued under the other."""
        if reference not in REFERENCES:
            raise TierlmError(f"reference must be one of {REFERENCES}")
        self.args.reference = reference
        self.exact_fp32 = reference == "transformers" if exact_fp32 is None else exact_fp32

    @property
    def num_mtp_layers(self) -> int:
        return len(self.model.layers) - self.args.n_layers

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.args.tie else self.lm_head.weight

    def cache_layers(self) -> tuple[LayerSpec, ...]:
        """The layers whose cache streams the pools hold: the decoder's and the loaded MTP blocks'."""
        return self.spec.layers + self.spec.mtp_layers[: self.num_mtp_layers]

    def _run(self, blocks, x: torch.Tensor, step: Step) -> torch.Tensor:
        rope = rope_tables(self.args, step.positions, x.dtype)
        top = None
        for block in blocks:
            x, top = block(x, rope, step, top)
        return x

    def hidden(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        """Last hidden states [B,T,D] of input_ids [B,T] over the step's cache views, before the
        final norm (the MTP blocks read them there; `logits` applies it)."""
        x = self.model.embed_tokens(input_ids)
        return self._run(self.model.layers[: self.args.n_layers], x, step)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return linear(self.model.norm(h), self.head_weight())

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """logits [B,T,V] of input_ids [B,T] appended to `cache` (none: a fresh sequence)."""
        cache = Cache() if cache is None else cache
        step = cache.step(self, input_ids, self.model.embed_tokens.weight.dtype)
        h = self.hidden(input_ids, step)
        cache.advance(input_ids)
        return self.logits(h)

    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, step: Step, depth: int = 0) -> torch.Tensor:
        """MTP draft logits [B,T,V]: from the main model's hidden states h_i [B,T,D] (before the
        final norm) at the step's positions and the next tokens t_{i+1} [B,T], predict t_{i+2}.
        The MTP block stores and reads its latents under its own layer index in `step`."""
        return self.draft_step(hidden, next_ids, step, depth)[1]

    def draft_step(self, hidden: torch.Tensor, next_ids: torch.Tensor, step: Step,
                   depth: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MTP block's output [B,T,D] before its norm, draft logits [B,T,V]); the output
        stands in for h when drafting the token after next."""
        if depth >= self.num_mtp_layers:
            raise TierlmError("this checkpoint has no MTP layer "
                              f"model.layers.{self.args.n_layers + depth}.*")
        blk: MTPBlock = self.model.layers[self.args.n_layers + depth]
        embed = blk.embed_tokens if hasattr(blk, "embed_tokens") else self.model.embed_tokens
        e = blk.enorm(embed(next_ids))
        x = blk.eh_proj(torch.cat([e, blk.hnorm(hidden)], dim=-1))
        x = self._run([blk], x, step)
        head = blk.shared_head.head.weight if hasattr(blk.shared_head, "head") else self.head_weight()
        return x, linear(blk.shared_head.norm(x), head)

    def forward_with_draft(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B,T,V], draft logits [B,T-1,V]) for a full sequence (teacher forcing)."""
        T = input_ids.shape[1]
        step = Cache().step(self, input_ids, self.model.embed_tokens.weight.dtype)
        h = self.hidden(input_ids, step)
        # the draft covers positions 0..T-2: the same pages, each row's first T-1 tokens
        first = replace(step, positions=step.positions[:, :-1], valid=step.valid[:, :-1],
                        lens=step.lens.clamp(max=T - 1))
        return self.logits(h), self.draft(h[:, :-1], input_ids[:, 1:], first)


# ------------------------------------------------------------------------------ family contract
def build(spec: ModelSpec, checkpoint_names: Iterable[str]) -> DeepseekForCausalLM:
    names = set(checkpoint_names)
    mtp = []
    for layer in spec.mtp_layers:
        prefix = f"model.layers.{layer.index}."
        if not any(n.startswith(prefix) for n in names):
            break   # MTP layers are kept only when the checkpoint has them
        mtp.append((prefix + "embed_tokens.weight" in names, prefix + "shared_head.head.weight" in names))
    return DeepseekForCausalLM(spec, mtp)


_OFFICIAL = {
    "embed": "embed_tokens", "head": "lm_head", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "attn": "self_attn", "ffn": "mlp",
    "wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wkv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
}


def rename(name: str) -> str:
    """Official DeepSeek names (`layers.0.attn.wq_a.weight`, `embed.weight`, `head.weight`,
    `layers.3.ffn.experts.0.w1.weight`, `...ffn.gate.bias`, `....scale`) -> HF names."""
    if name.startswith(("model.", "lm_head.")):
        return name
    parts = name.split(".")
    if parts[-1] == "scale":                       # FP8 block scale of `X.weight`
        parts[-1] = "weight_scale_inv"
    if len(parts) >= 2 and parts[-2] == "gate" and parts[-1] == "bias":
        parts[-1] = "e_score_correction_bias"
    in_indexer = "indexer" in parts
    out = []
    for i, p in enumerate(parts):
        if in_indexer and i > parts.index("indexer"):
            out.append(p)                          # indexer.{wq_b,wk,k_norm,weights_proj} keep their names
        elif p == "head" and i > 0 and parts[i - 1] == "shared_head":
            out.append(p)                          # MTP shared_head.head
        elif p == "wq_b":
            out.append("q_b_proj")
        else:
            out.append(_OFFICIAL.get(p, p) if p != "weight" else p)
    name = ".".join(out)
    if name.startswith("lm_head"):
        return name
    if re.match(r"(layers|embed_tokens|norm)\b", name):
        return "model." + name
    return name
