"""DeepSeek-V4 (model_type deepseek_v4): shared-KV sliding-window attention with CSA/HCA
compressed entries, a lightning indexer, mHC residual streams, hash-routed + sqrtsoftplus
MoE and an optional MTP block, in the layout of DeepSeek's `inference/model.py`.

State-dict names are the ones transformers' `save_pretrained` writes for
`DeepseekV4ForCausalLM` (official sub-module names under `model.`, plus `head.weight`);
MTP tensors use the official `mtp.<i>.` prefix. `rename` also maps a raw official
checkpoint (`embed.weight`, `layers.*`, `hc_head_fn`, ...) onto these names.

Numerics. Every op runs in the model dtype except where the references compute in float32
(RMS statistics, RoPE angles and the rope slice, compressor gate softmax, mHC projections,
indexer scores); those casts are reproduced so a float64 model matches transformers to
~1e-12. `reference` picks the behaviour where DeepSeek's official code and transformers
differ (see docs/models.md and `Transformer.__init__`):
  "official"      (default) FP8 fake-quant of the KV non-rope dims (window and compressed
                  entries, block 64, ue8m0 scales), Hadamard rotation + FP4 fake-quant of
                  the indexer queries and keys (block 32), YaRN inverse frequencies as
                  `freqs / factor`;
  "transformers"  none of those simulations, YaRN as `1 / (factor * base**(i/d))`.
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
from ..quant import fake_quant, hadamard   # shared with deepseek.py (tests patch these names here)

REFERENCES = ("official", "transformers")


class Mode:
    """official: apply the official QAT simulations; exact: reproduce transformers bit for
    bit: its float32 matmuls (mHC projections, hc head, indexer scores) stay float32 even in
    a float64 model, and indexer ties go to whatever torch.topk picks. float32 GEMMs round
    differently for different row counts and topk's tie order depends on the shapes, so
    exact=False (those matmuls in max(float32, model dtype), ties to the older entry) is
    what makes token-by-token decoding equal the full forward (~1e-15 in float64)."""

    def __init__(self, official: bool, exact: bool):
        self.official, self.exact = official, exact

    def f32(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if self.exact else x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- small blocks
class RMSNorm(nn.Module):
    """Weighted RMSNorm: statistics in float32, weight applied afterwards, cast back once."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(dtype)


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMS normalisation; the reciprocal root is taken in float32."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Rope:
    """Interleaved RoPE on the last `dim` channels, angles in float32, computed on the fly."""

    def __init__(self, dim: int, theta: float, yarn: dict | None, reference: str):
        self.dim = dim
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
        self.scale = 1.0
        if yarn:
            factor, orig = float(yarn["factor"]), yarn["original"]
            fast, slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

            def corr(rot: float) -> float:
                return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

            low, high = max(math.floor(corr(fast)), 0), min(math.ceil(corr(slow)), dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
            keep = 1 - ramp                                     # 1: keep the original frequency
            if reference == "official":
                freqs = freqs / factor * (1 - keep) + freqs * keep
            else:
                pos = theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)
                freqs = 1.0 / (factor * pos) * (1 - keep) + 1.0 / pos * keep
            self.scale = float(yarn.get("attention_factor") or 1.0)
        self.inv_freq = freqs

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, dim/2] (float32 angles, cast to dtype)."""
        angles = positions[..., None].float() * self.inv_freq.to(positions.device)
        return (angles.cos() * self.scale).to(dtype), (angles.sin() * self.scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [..., T, (heads,) D]; rotates the last 2*cos.shape[-1] channels pairwise (0,1), (2,3)...
    cos/sin [B, T, dim/2]; `inverse` rotates by the negative angle."""
    cos = cos.repeat_interleave(2, dim=-1)
    sin = sin.repeat_interleave(2, dim=-1)
    if inverse:
        sin = -sin
    if x.dim() == 4:                               # [B, T, H, D]
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rd = cos.shape[-1]
    nope, rope = x[..., :-rd], x[..., -rd:]
    pairs = rope.unflatten(-1, (-1, 2))
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    rotated = (rope.float() * cos + swapped.float() * sin).to(x.dtype)
    return torch.cat([nope, rotated], dim=-1)


# ----------------------------------------------------------------------------- attention
class Compressor(nn.Module):
    """Gated softmax pooling of `ratio` consecutive tokens into one compressed KV entry.

    overlap (CSA): wkv/wgate emit 2*d channels; entry i pools block i through channels d:2d
    and block i-1 through channels :d (2*ratio tokens, stride ratio). The compressed entry
    is RMS-normed and rotated at the position of its block's first token. Unfinished blocks
    (and, for overlap, the previous full block) live in the cache between calls."""

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        coff = 2 if overlap else 1
        self.wkv = nn.Linear(dim, coff * head_dim, bias=False)
        self.wgate = nn.Linear(dim, coff * head_dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim))
        self.norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, rope: Rope, state: dict | None, prefix: str) -> torch.Tensor:
        """Returns the entries completed by this call [B, n, d]; their state stays in `state`."""
        b = x.shape[0]
        r, d = self.ratio, self.head_dim
        kv, score = self.wkv(x), self.wgate(x)
        first = 0
        if state is not None:
            if prefix + "buf_kv" in state:
                kv = torch.cat([state[prefix + "buf_kv"], kv], dim=1)
                score = torch.cat([state[prefix + "buf_score"], score], dim=1)
            first = state.get(prefix + "count", 0) * r
        n = kv.shape[1] // r
        if state is not None:
            state[prefix + "buf_kv"], state[prefix + "buf_score"] = kv[:, n * r:], score[:, n * r:]
        kv = kv[:, :n * r].unflatten(1, (n, r))
        score = score[:, :n * r].unflatten(1, (n, r)) + self.ape
        if self.overlap and n > 0:
            # [B, n, 2r, d]: slots :r = previous block's first-half channels, r: = own second half
            pkv = kv.new_zeros((b, n, 2 * r, d))
            pscore = score.new_full((b, n, 2 * r, d), float("-inf"))
            pkv[:, :, r:], pscore[:, :, r:] = kv[..., d:], score[..., d:]
            pkv[:, 1:, :r], pscore[:, 1:, :r] = kv[:, :-1, :, :d], score[:, :-1, :, :d]
            if state is not None:
                if prefix + "prev_kv" in state:
                    pkv[:, 0, :r], pscore[:, 0, :r] = state[prefix + "prev_kv"], state[prefix + "prev_score"]
                state[prefix + "prev_kv"], state[prefix + "prev_score"] = kv[:, -1, :, :d], score[:, -1, :, :d]
            kv, score = pkv, pscore
        if n > 0:
            c = self.norm((kv * F.softmax(score, dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2))
            pos = (torch.arange(n, device=x.device) * r + first).expand(b, n)
            c = apply_rope(c, *rope.cos_sin(pos, c.dtype))
        else:
            c = kv.new_zeros((b, 0, d))
        if state is None:
            return c
        state[prefix + "count"] = state.get(prefix + "count", 0) + n
        return c


class Indexer(nn.Module):
    """Lightning indexer over the CSA compressed entries: sum_h w_h * ReLU(q_h . k_i),
    top-k over the causally complete entries."""

    def __init__(self, spec: ModelSpec, ratio: int, eps: float):
        super().__init__()
        ix = spec.indexer
        self.n_heads, self.head_dim, self.topk = ix.n_heads, ix.head_dim, ix.topk
        self.wq_b = nn.Linear(spec.v4.q_lora_rank, ix.n_heads * ix.head_dim, bias=False)
        self.weights_proj = nn.Linear(spec.hidden_size, ix.n_heads, bias=False)
        self.compressor = Compressor(spec.hidden_size, ix.head_dim, ratio, True, eps)
        self.ratio = ratio

    def forward(self, x, qr, positions, rope: Rope, state, mode: Mode) -> torch.Tensor:
        """Returns [B, T, k] indices of compressed entries, -1 where not selectable."""
        b, t, _ = x.shape
        keys = self.compressor(x, rope, state, "ix_")
        if state is not None:
            keys = _append(state, "ix_keys", keys, mode.official, self._quant)
        elif mode.official:
            keys = self._quant(keys)
        q = self.wq_b(qr).view(b, t, self.n_heads, self.head_dim)
        q = apply_rope(q, *rope.cos_sin(positions, q.dtype))
        if mode.official:
            q = self._quant(q)
        scores = torch.matmul(mode.f32(q), mode.f32(keys).transpose(-1, -2).unsqueeze(1))   # [B, T, H, N]
        scores = F.relu(scores) * self.head_dim ** -0.5
        weights = mode.f32(self.weights_proj(x)) * self.n_heads ** -0.5
        scores = (scores * weights.unsqueeze(-1)).sum(dim=2)                               # [B, T, N]
        n = keys.shape[1]
        visible = (positions + 1) // self.ratio                                             # [B, T]
        future = torch.arange(n, device=x.device).view(1, 1, -1) >= visible.unsqueeze(-1)
        scores, k = scores.masked_fill(future, float("-inf")), min(self.topk, n)
        if mode.exact:      # torch.topk, as transformers: its tie order depends on the shapes
            idx = scores.topk(k, dim=-1).indices
        else:               # ties (ReLU makes exact zeros common) go to the older entry, so the
            # choice does not depend on how many queries are scored together
            idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.where(idx >= visible.unsqueeze(-1), -1, idx)

    @staticmethod
    def _quant(v: torch.Tensor) -> torch.Tensor:
        return fake_quant(hadamard(v), 32, "fp4")


def _append(state: dict, name: str, new: torch.Tensor, official: bool, quant) -> torch.Tensor:
    if official:
        new = quant(new)
    old = state.get(name)
    state[name] = new if old is None else torch.cat([old, new], dim=1)
    return state[name]


class Attention(nn.Module):
    """Shared K=V single-head attention over the sliding window plus compressed entries,
    a per-head sink logit in the softmax denominator, inverse RoPE on the output's rope
    slice and the grouped low-rank output projection."""

    def __init__(self, spec: ModelSpec, layer: LayerSpec, ropes: dict[str, Rope], eps: float):
        super().__init__()
        v4 = spec.v4
        self.n_heads, self.head_dim, self.rope_dim = v4.num_heads, v4.head_dim, v4.rope_head_dim
        self.window, self.ratio, self.groups = v4.window, layer.compress_ratio, v4.o_groups
        self.o_lora_rank, self.eps = v4.o_lora_rank, eps
        self.rope = ropes["compress" if self.ratio else "main"]
        self.attn_sink = nn.Parameter(torch.zeros(v4.num_heads))
        self.wq_a = nn.Linear(spec.hidden_size, v4.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(v4.q_lora_rank, eps)
        self.wq_b = nn.Linear(v4.q_lora_rank, v4.num_heads * v4.head_dim, bias=False)
        self.wkv = nn.Linear(spec.hidden_size, v4.head_dim, bias=False)
        self.norm = RMSNorm(v4.head_dim, eps)
        self.wo_a = nn.Linear(v4.num_heads * v4.head_dim // v4.o_groups, v4.o_groups * v4.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(v4.o_groups * v4.o_lora_rank, spec.hidden_size, bias=False)
        if self.ratio:
            self.compressor = Compressor(spec.hidden_size, v4.head_dim, self.ratio, layer.csa, eps)
            self.indexer = Indexer(spec, self.ratio, eps) if layer.csa else None

    def _quant_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """Official QAT: FP8 (block 64) round trip of the non-rope channels."""
        rd = self.rope_dim
        return torch.cat([fake_quant(kv[..., :-rd], 64, "fp8"), kv[..., -rd:]], dim=-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: dict | None, mode: Mode) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        qr = self.q_norm(self.wq_a(x))
        q = unit_rms(self.wq_b(qr).view(b, t, self.n_heads, self.head_dim), self.eps)
        q = apply_rope(q, cos, sin)
        kv = apply_rope(self.norm(self.wkv(x)), cos, sin)
        if mode.official:
            kv = self._quant_kv(kv)

        # window part: the last window-1 cached tokens, then this call's tokens
        kpos = positions
        if state is not None:
            past = state.get("kv")
            if past is not None:
                back = torch.arange(-past.shape[1], 0, device=x.device).unsqueeze(0)
                kv, kpos = torch.cat([past, kv], dim=1), torch.cat([positions[:, :1] + back, positions], dim=1)
            state["kv"] = kv[:, max(kv.shape[1] - (self.window - 1), 0):]

        comp = cbias = None
        if self.ratio:
            comp = self.compressor(x, self.rope, state, "c_")
            if state is not None:
                comp = _append(state, "c_kv", comp, mode.official, self._quant_kv)
            elif mode.official:
                comp = self._quant_kv(comp)
            n = comp.shape[1]
            if self.indexer is not None:
                idx = self.indexer(x, qr, positions, self.rope, state, mode)
                cbias = torch.full((b, t, n + 1), float("-inf"), dtype=x.dtype, device=x.device)
                cbias.scatter_(-1, torch.where(idx >= 0, idx, n), 0.0)
                cbias = cbias[..., :n]
            else:
                visible = (positions + 1) // self.ratio
                hidden = torch.arange(n, device=x.device).view(1, 1, -1) >= visible.unsqueeze(-1)
                cbias = torch.zeros((b, t, n), dtype=x.dtype, device=x.device).masked_fill(hidden, float("-inf"))

        # Queries in chunks: a chunk only sees window keys from its first query's window start
        # to its last query, so the window part costs O(T * (W + chunk)) instead of O(T^2).
        chunk = max(self.window, 64)
        past = kv.shape[1] - t
        outs = []
        for s in range(0, t, chunk):
            e = min(s + chunk, t)
            lo, hi = max(past + s - self.window + 1, 0), past + e
            delta = positions[:, s:e].unsqueeze(-1) - kpos[:, lo:hi].unsqueeze(1)       # [B, C, S]
            bias = torch.zeros(delta.shape, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill((delta < 0) | (delta >= self.window), float("-inf"))
            keys = kv[:, lo:hi]
            if comp is not None:
                keys, bias = torch.cat([keys, comp], dim=1), torch.cat([bias, cbias[:, s:e]], dim=-1)
            outs.append(sink_attention(q[:, s:e], keys, bias, self.attn_sink, self.head_dim ** -0.5))
        o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        o = apply_rope(o, cos, sin, inverse=True)
        o = o.reshape(b, t, self.groups, -1)
        wo_a = self.wo_a.weight.view(self.groups, self.o_lora_rank, -1)
        o = torch.einsum("btgd,grd->btgr", o, wo_a)
        return self.wo_b(o.flatten(2))


def sink_attention(q, kv, bias, sink, scale):
    """q [B, T, H, D], kv [B, S, D] (K = V), bias [B, T, S] additive mask; the sink logit of
    each head joins the softmax denominator only."""
    h = q.shape[2]
    logits = torch.matmul(q.transpose(1, 2), kv.transpose(1, 2).unsqueeze(1)) * scale + bias.unsqueeze(1)
    # softmax over [logits, sink] without materialising the extra column
    lse = torch.logaddexp(torch.logsumexp(logits, dim=-1, keepdim=True), sink.to(logits.dtype).view(1, h, 1, 1))
    probs = torch.exp(logits - lse)
    return torch.matmul(probs, kv.unsqueeze(1)).transpose(1, 2)                # [B, T, H, D]


# ----------------------------------------------------------------------------- MoE
class Expert(nn.Module):
    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x), self.w3(x)
        if self.limit > 0:          # clamped SwiGLU
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return self.w2(F.silu(gate) * up)


class Gate(nn.Module):
    """sqrtsoftplus (or sigmoid/softmax) scores; the selection bias only picks experts; hash
    layers take the experts from `tid2eid[token]`; weights renormalised and scaled."""

    def __init__(self, spec: ModelSpec, hash_routed: bool):
        super().__init__()
        moe, cfg = spec.moe, spec.config
        self.topk, self.hash = moe.top_k, hash_routed
        self.score_func = cfg.get("scoring_func", cfg.get("score_func", "sqrtsoftplus"))
        self.route_scale = float(cfg.get("routed_scaling_factor", cfg.get("route_scale", 1.0)))
        self.weight = nn.Parameter(torch.zeros(moe.num_experts, spec.hidden_size))
        if hash_routed:
            self.register_buffer("tid2eid", torch.zeros(spec.vocab_size, moe.top_k, dtype=torch.long))
        else:
            self.bias = nn.Parameter(torch.zeros(moe.num_experts))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        if self.score_func == "softmax":
            scores = logits.softmax(dim=-1)
        elif self.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = F.softplus(logits).sqrt()
        if self.hash:
            idx = self.tid2eid[ids].long()
        else:
            idx = torch.topk(scores + self.bias, self.topk, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        if self.score_func != "softmax":
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.route_scale, idx


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec, hash_routed: bool):
        super().__init__()
        moe = spec.moe
        limit = float(spec.config.get("swiglu_limit", 0.0) or 0.0)
        self.gate = Gate(spec, hash_routed)
        self.experts = nn.ModuleList(Expert(spec.hidden_size, moe.expert_intermediate, limit)
                                     for _ in range(moe.num_experts))
        self.shared_experts = Expert(spec.hidden_size, moe.shared_intermediate, limit)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.gate(x, ids.reshape(-1))
        y = torch.zeros_like(x)
        for e in idx.unique().tolist():
            rows, slot = torch.where(idx == e)
            y.index_add_(0, rows, self.experts[e](x[rows]) * w[rows, slot, None].to(y.dtype))
        return (y + self.shared_experts(x)).view(shape)


# ----------------------------------------------------------------------------- mHC blocks
def hc_weights(x, fn, scale, base, n, iters, hc_eps, eps, mode: Mode):
    """mHC mixing weights from the n streams x [B, T, n, d]: pre [B,T,n], post [B,T,n],
    comb [B,T,n,n] (Sinkhorn: row softmax + eps, then alternate column/row normalisation,
    ending on columns). The RMS-normalised projection runs in (at least) float32."""
    flat = unit_rms(mode.f32(x.flatten(2)), eps)
    mix = F.linear(flat, fn.to(flat.dtype))
    pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.split([n, n, n * n])
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * scale[2] + comb_b.view(n, n), dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    return pre, post, comb


def hc_collapse(x, fn, scale, base, eps, hc_eps, mode: Mode):
    """The hc head: sigmoid weights (no Sinkhorn) summing the streams into one."""
    flat = unit_rms(mode.f32(x.flatten(2)), eps)
    pre = torch.sigmoid(F.linear(flat, fn.to(flat.dtype)) * scale.to(flat.dtype) + base.to(flat.dtype)) + hc_eps
    return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec, ropes: dict[str, Rope]):
        super().__init__()
        cfg = spec.config
        self.eps = float(cfg.get("rms_norm_eps", cfg.get("norm_eps", 1e-6)))
        self.hc_eps = float(cfg.get("hc_eps", 1e-6))
        self.iters = int(cfg.get("hc_sinkhorn_iters", 20))
        self.n = n = spec.hc_mult
        self.index = layer.index
        self.attn = Attention(spec, layer, ropes, self.eps)
        self.ffn = MoE(spec, layer.ffn == "hash_moe")
        self.attn_norm = RMSNorm(spec.hidden_size, self.eps)
        self.ffn_norm = RMSNorm(spec.hidden_size, self.eps)
        mix = (2 + n) * n
        self.hc_attn_fn = nn.Parameter(torch.zeros(mix, n * spec.hidden_size))
        self.hc_ffn_fn = nn.Parameter(torch.zeros(mix, n * spec.hidden_size))
        self.hc_attn_base = nn.Parameter(torch.zeros(mix))
        self.hc_ffn_base = nn.Parameter(torch.zeros(mix))
        self.hc_attn_scale = nn.Parameter(torch.zeros(3))
        self.hc_ffn_scale = nn.Parameter(torch.zeros(3))

    def _mix(self, x, f, fn, scale, base, mode):
        pre, post, comb = hc_weights(x, fn, scale, base, self.n, self.iters, self.hc_eps, self.eps, mode)
        y = f((pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype))
        # comb is applied transposed: stream k receives sum_j comb[j, k] * x_j
        return post.to(x.dtype).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(x.dtype).transpose(-1, -2), x)

    def forward(self, x, positions, ids, cache: Cache | None, mode: Mode):
        state = cache.layer(self.index) if cache is not None else None
        x = self._mix(x, lambda h: self.attn(self.attn_norm(h), positions, state, mode),
                      self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, mode)
        return self._mix(x, lambda h: self.ffn(self.ffn_norm(h), ids),
                         self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, mode)


class MTPBlock(Block):
    """Next-next-token block: e_proj(enorm(embed(next ids))) broadcast onto the streams +
    h_proj(hnorm(main streams)), a full block, its own hc head and norm; shares the
    embedding and the output head."""

    def __init__(self, spec: ModelSpec, layer: LayerSpec, ropes: dict[str, Rope]):
        super().__init__(spec, layer, ropes)
        d, n = spec.hidden_size, spec.hc_mult
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.enorm = RMSNorm(d, self.eps)
        self.hnorm = RMSNorm(d, self.eps)
        self.norm = RMSNorm(d, self.eps)
        self.hc_head_fn = nn.Parameter(torch.zeros(n, n * d))
        self.hc_head_base = nn.Parameter(torch.zeros(n))
        self.hc_head_scale = nn.Parameter(torch.zeros(1))

    def forward(self, h, emb, positions, ids, cache, mode):
        x = self.e_proj(self.enorm(emb)).unsqueeze(2) + self.h_proj(self.hnorm(h))
        x = super().forward(x, positions, ids, cache, mode)
        return x, self.norm(hc_collapse(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base,
                                        self.eps, self.hc_eps, mode))


class HCHead(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.hc_fn = nn.Parameter(torch.zeros(n, n * dim))
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.zeros(1))


class Transformer(nn.Module):
    """embed -> n identical streams -> blocks -> hc head -> norm (the `model.` prefix)."""

    def __init__(self, spec: ModelSpec, ropes: dict[str, Rope]):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, layer, ropes) for layer in spec.layers)
        eps = self.layers[0].eps if spec.layers else 1e-6
        self.norm = RMSNorm(spec.hidden_size, eps)
        self.hc_head = HCHead(spec.hc_mult, spec.hidden_size)


class DeepseekV4(nn.Module):
    def __init__(self, spec: ModelSpec, with_mtp: int = 0, reference: str = "official"):
        super().__init__()
        if reference not in REFERENCES:
            raise TierlmError(f"reference must be one of {REFERENCES}")
        self.reference = reference
        self.exact_fp32 = reference == "transformers"
        self.spec = spec
        self.hc_mult = spec.hc_mult
        self.ropes = make_ropes(spec, reference)
        self.model = Transformer(spec, self.ropes)
        self.head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPBlock(spec, layer, self.ropes) for layer in spec.mtp_layers[:with_mtp])
        self.eps = self.model.norm.eps
        self.hc_eps = float(spec.config.get("hc_eps", 1e-6))

    def set_reference(self, reference: str, exact_fp32: bool | None = None) -> None:
        """Switch between the official behaviour and transformers' (see module docstring).
        exact_fp32 (default: True for "transformers") keeps transformers' float32 matmuls
        in a float64 model; see `Mode`."""
        if reference not in REFERENCES:
            raise TierlmError(f"reference must be one of {REFERENCES}")
        self.reference = reference
        self.exact_fp32 = reference == "transformers" if exact_fp32 is None else exact_fp32
        for name, rope in make_ropes(self.spec, reference).items():
            self.ropes[name].__dict__.update(rope.__dict__)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, mtp_ids: torch.Tensor | None = None):
        """logits [B, T, V]; with `mtp_ids` (the token after each position) and an MTP block
        loaded, returns (logits, draft_logits) where draft_logits[:, t] predicts token t+2."""
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        positions = (start + torch.arange(t, device=input_ids.device)).unsqueeze(0).expand(b, t)
        mode = Mode(self.reference == "official", self.exact_fp32)
        m = self.model
        h = m.embed_tokens(input_ids).unsqueeze(2).expand(-1, -1, self.hc_mult, -1).contiguous()
        for layer in m.layers:
            h = layer(h, positions, input_ids, cache, mode)
        hc = m.hc_head
        logits = self.head(m.norm(hc_collapse(h, hc.hc_fn, hc.hc_scale, hc.hc_base, self.eps, self.hc_eps, mode)))
        draft = None
        if mtp_ids is not None and len(self.mtp):
            x = h
            for block in self.mtp:
                x, out = block(x, m.embed_tokens(mtp_ids), positions, mtp_ids, cache, mode)
                draft = self.head(out)
        if cache is not None:
            cache.length += t
        return logits if mtp_ids is None else (logits, draft)


# ----------------------------------------------------------------------------- family API
def make_ropes(spec: ModelSpec, reference: str) -> dict[str, Rope]:
    """'main' (sliding-only layers: rope_theta, no YaRN) and 'compress' (compressed layers and
    the indexer: compress_rope_theta, YaRN when configured)."""
    cfg, rd = spec.config, spec.v4.rope_head_dim
    rp = cfg.get("rope_parameters") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = rp["main"], rp["compress"]
        yarn = None
        if comp.get("rope_type", comp.get("type")) == "yarn":
            yarn = dict(factor=comp["factor"], original=comp["original_max_position_embeddings"],
                        beta_fast=comp.get("beta_fast"), beta_slow=comp.get("beta_slow"),
                        attention_factor=comp.get("attention_factor", 1.0))
        return {"main": Rope(rd, float(main.get("rope_theta", cfg.get("rope_theta", 10000.0))), None, reference),
                "compress": Rope(rd, float(comp.get("rope_theta", cfg.get("compress_rope_theta", 160000.0))),
                                 yarn, reference)}
    # official / flat layout
    scaling = cfg.get("rope_scaling") or (rp if rp.get("rope_type", rp.get("type")) == "yarn" else None)
    yarn = None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "yarn":
        yarn = dict(factor=scaling["factor"], original=scaling["original_max_position_embeddings"],
                    beta_fast=scaling.get("beta_fast"), beta_slow=scaling.get("beta_slow"), attention_factor=1.0)
    elif int(cfg.get("original_seq_len", 0) or 0) > 0:
        yarn = dict(factor=cfg.get("rope_factor", 1.0), original=int(cfg["original_seq_len"]),
                    beta_fast=cfg.get("beta_fast"), beta_slow=cfg.get("beta_slow"), attention_factor=1.0)
    return {"main": Rope(rd, float(cfg.get("rope_theta", 10000.0)), None, reference),
            "compress": Rope(rd, float(cfg.get("compress_rope_theta", 160000.0)), yarn, reference)}


def build(spec: ModelSpec, checkpoint_names: Iterable[str], reference: str = "official") -> nn.Module:
    names = set(checkpoint_names)
    with_mtp = sum(1 for i in range(len(spec.mtp_layers)) if f"mtp.{i}.e_proj.weight" in names)
    return DeepseekV4(spec, with_mtp, reference)


_OFFICIAL_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
                 "hc_head_scale": "model.hc_head.hc_scale"}


def rename(name: str) -> str:
    """Official DeepSeek checkpoint names -> this module's (= transformers' saved) names."""
    if name in _OFFICIAL_TOP:
        return _OFFICIAL_TOP[name]
    if name.startswith("layers."):
        return "model." + name
    return name
