"""DeepSeek-V4 (model_type deepseek_v4): shared-KV sliding-window attention with CSA/HCA
compressed entries, a lightning indexer, mHC residual streams, hash-routed + sqrtsoftplus
MoE and an optional MTP block, in the layout of DeepSeek's `inference/model.py`.

State-dict names are the ones transformers' `save_pretrained` writes for
`DeepseekV4ForCausalLM` (official sub-module names under `model.`, plus `head.weight`);
MTP tensors use the official `mtp.<i>.` prefix. `rename` also maps a raw official
checkpoint (`embed.weight`, `layers.*`, `hc_head_fn`, ...) onto these names.

Cache. Each layer runs over the paged streams of `tierlm.spec.cache` (`window`, `compressed`,
`compressor_state`, and for CSA `indexer`, `indexer_compressor_state`) through
`tierlm.model.ops`; every stored entry is indexed by position (or compressed entry), so the
full forward, chunked prefill, decoding and ragged paged batches do the same arithmetic.

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
from ...spec.model import LayerSpec, ModelSpec, RopeConfig
from ..cache import Cache
from ..moe import dispatch
from ..layers import logaddexp, sigmoid, silu, softplus
from ..ops import Step, StreamView, gather, store
from ..quant import fake_quant, hadamard   # shared with deepseek.py (tests patch these names here)

REFERENCES = ("official", "transformers")


class Mode:
    """official: apply the official QAT simulations; exact: reproduce transformers bit for
    bit: its float32 ops (mHC projections, hc head, indexer scores, compressor softmax) stay
    float32 even in a float64 model, and indexer ties go to whatever torch.topk picks.
    float32 kernels round differently for different shapes and thread splits (GEMM row
    counts; the compressor's softmax over a non-last dim) and topk's tie order depends on
    the shapes, so exact=False (those ops in max(float32, model dtype), ties to the older
    entry) is what makes token-by-token decoding equal the full forward (~1e-15 in float64)."""

    def __init__(self, official: bool, exact: bool):
        self.official, self.exact = official, exact

    def f32(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if self.exact else x.to(torch.promote_types(x.dtype, torch.float32))

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        """exact: transformers' own float32 op; else the thread-count independent one."""
        return torch.sigmoid(x) if self.exact else sigmoid(x)


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
    """Interleaved RoPE on the last `dim` channels, angles in float32, computed on the fly.
    YaRN's ramp bounds are always rounded to whole dimensions, as in the official code."""

    def __init__(self, rope: RopeConfig, reference: str):
        self.dim = dim = rope.dim
        theta = rope.theta
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
        self.scale = 1.0
        if rope.kind == "yarn":
            factor, orig = rope.factor, rope.original_max_position
            fast, slow = rope.beta_fast, rope.beta_slow

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
            self.scale = rope.attention_factor
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
def entry_range(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[B, N] logical entries lo[b] .. hi[b] - 1 of each row (N: the widest row), -1 past hi[b]."""
    n = int((hi - lo).max())
    idx = lo.unsqueeze(1) + torch.arange(n, device=lo.device)
    return torch.where(idx < hi.unsqueeze(1), idx, -1)


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dim, highest first, equal scores in
    index order: `sort(descending, stable).indices[..., :k]`, without sorting all N (a 64k
    context's CSA layer scores 16K entries per query to keep 512)."""
    kth = scores.topk(k, dim=-1).values[..., -1:]                                   # [..., 1]
    above, tie = scores > kth, scores == kth
    need = k - above.sum(-1, keepdim=True)                                           # ties to take
    take = above | (tie & (tie.cumsum(-1) <= need))                                 # k per row
    cols = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)[take]
    if cols.numel() != take[..., 0].numel() * k:                 # NaN scores: no k-th value to cut at
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    idx = cols.view(*scores.shape[:-1], k)                                           # index order
    order = torch.sort(scores.gather(-1, idx), dim=-1, descending=True, stable=True).indices
    return idx.gather(-1, order)


class Compressor(nn.Module):
    """Gated softmax pooling of `ratio` consecutive tokens into one compressed KV entry.

    Every token stores its projections [kv | score + ape[pos % r]] at its position in a state
    stream; the token at position r*j + r - 1 completes entry j, which pools block j (positions
    r*j .. r*j + r - 1). overlap (CSA): wkv/wgate emit 2*d channels; entry j pools block j
    through channels d:2d and block j-1 through channels :d (2*ratio tokens, stride ratio;
    entry 0 has no previous block). The entry is RMS-normed, rotated at position r*j and
    stored at index j. All state being position-indexed, ragged rows, prefix reuse and
    rollback need no per-sequence buffers."""

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        coff = 2 if overlap else 1
        self.wkv = nn.Linear(dim, coff * head_dim, bias=False)
        self.wgate = nn.Linear(dim, coff * head_dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim))
        self.norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, step: Step, state: StreamView, out: StreamView, rope: Rope,
                mode: Mode, quant=None) -> None:
        """Stores x's [B, T, D] per-token state, then every entry this step completes
        (passed through `quant` when given) in `out`."""
        r, d = self.ratio, self.head_dim
        pos = step.positions
        store(state, step.new_index(), torch.cat([self.wkv(x), self.wgate(x) + self.ape[pos % r]], dim=-1))
        # the entries whose last token is in the step: the j with step.new_index(r) == j
        j = entry_range(step.starts // r, step.ends // r)                          # [B, N]
        if j.shape[1] == 0:
            return
        span = torch.arange(-r if self.overlap else 0, r, device=x.device)
        src = j.clamp(min=0).unsqueeze(-1) * r + span                             # [B, N, coff*r] positions
        kv, score = gather(state, torch.where((j.unsqueeze(-1) >= 0) & (src >= 0), src, -1)).chunk(2, dim=-1)
        if self.overlap:    # slots :r = previous block's first-half channels, r: = own second half
            kv = torch.cat([kv[..., :r, :d], kv[..., r:, d:]], dim=2)
            score = torch.cat([score[..., :r, :d], score[..., r:, d:]], dim=2)
            score = score.masked_fill((src < 0).unsqueeze(-1), float("-inf"))   # entry 0: no previous block
        # the softmax runs in float32 in the references; mode.f32 keeps it at least float32.
        # Over the pooled tokens, dim 2: torch's softmax over a non-last dim gives other bits at
        # other thread counts, so outside exact mode it runs over the last dim of a transposed copy.
        score = mode.f32(score)
        if mode.exact:
            weight = F.softmax(score, dim=2)
        else:
            weight = F.softmax(score.transpose(2, 3).contiguous(), dim=-1).transpose(2, 3)
        c = self.norm((kv * weight.to(kv.dtype)).sum(dim=2))                      # [B, N, d]
        c = apply_rope(c, *rope.cos_sin(j * r, c.dtype))
        store(out, j, quant(c) if quant is not None else c)


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

    def forward(self, x, qr, step: Step, layer: int, rope: Rope, mode: Mode) -> torch.Tensor:
        """Stores this step's indexer keys; returns [B, T, k] indices of the compressed
        entries each query attends to, -1 where not selectable."""
        b, t, _ = x.shape
        view = step.view(layer, "indexer")
        self.compressor(x, step, step.view(layer, "indexer_compressor_state"), view, rope, mode,
                        self._quant if mode.official else None)
        entries = entry_range(torch.zeros_like(step.ends), step.ends // self.ratio)   # [B, N]: column i = entry i
        n = entries.shape[1]
        if n == 0:
            return entries.new_full((b, t, 0), -1)
        keys = gather(view, entries)                                                  # [B, N, D]
        q = self.wq_b(qr).view(b, t, self.n_heads, self.head_dim)
        q = apply_rope(q, *rope.cos_sin(step.positions, q.dtype))
        if mode.official:
            q = self._quant(q)
        scores = torch.matmul(mode.f32(q), mode.f32(keys).transpose(-1, -2).unsqueeze(1))   # [B, T, H, N]
        scores = F.relu(scores) * self.head_dim ** -0.5
        weights = mode.f32(self.weights_proj(x)) * self.n_heads ** -0.5
        scores = (scores * weights.unsqueeze(-1)).sum(dim=2)                               # [B, T, N]
        visible = (step.positions + 1) // self.ratio                                        # [B, T]
        future = torch.arange(n, device=x.device).view(1, 1, -1) >= visible.unsqueeze(-1)
        scores, k = scores.masked_fill(future, float("-inf")), min(self.topk, n)
        if mode.exact:      # torch.topk, as transformers: its tie order depends on the shapes
            idx = scores.topk(k, dim=-1).indices
        else:               # ties (ReLU makes exact zeros common) go to the older entry, so the
            # choice does not depend on how many queries are scored together
            idx = stable_topk(scores, k)
        return torch.where(idx >= visible.unsqueeze(-1), -1, idx)

    @staticmethod
    def _quant(v: torch.Tensor) -> torch.Tensor:
        return fake_quant(hadamard(v), 32, "fp4")


class Attention(nn.Module):
    """Shared K=V single-head attention over the sliding window plus compressed entries,
    a per-head sink logit in the softmax denominator, inverse RoPE on the output's rope
    slice and the grouped low-rank output projection."""

    def __init__(self, spec: ModelSpec, layer: LayerSpec, ropes: dict[str, Rope], eps: float):
        super().__init__()
        v4 = spec.v4
        self.index = layer.index
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

    def forward(self, x: torch.Tensor, step: Step, mode: Mode) -> torch.Tensor:
        """x [B, T, D]: stores the step's window and compressed entries, then each query
        attends to its window, its visible (HCA) or selected (CSA) compressed entries."""
        b, t, _ = x.shape
        positions = step.positions
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        qr = self.q_norm(self.wq_a(x))
        q = unit_rms(self.wq_b(qr).view(b, t, self.n_heads, self.head_dim), self.eps)
        q = apply_rope(q, cos, sin)
        kv = apply_rope(self.norm(self.wkv(x)), cos, sin)
        if mode.official:
            kv = self._quant_kv(kv)
        view = step.view(self.index, "window")
        store(view, step.new_index(), kv)
        keys = step.key_index(self.window)                                 # [B, S] positions
        kv = gather(view, keys)                                            # [B, S, d]

        comp = shared = sbias = picked = None
        if self.ratio:
            comp = step.view(self.index, "compressed")
            self.compressor(x, step, step.view(self.index, "compressor_state"), comp, self.rope, mode,
                            self._quant_kv if mode.official else None)
            if self.indexer is not None:          # CSA: each query's top-k entries
                picked = self.indexer(x, qr, step, self.index, self.rope, mode)         # [B, T, k]
                if picked.shape[-1] == 0:
                    picked = None
            else:                                 # HCA: every entry complete before the query
                entries = entry_range(torch.zeros_like(step.ends), step.ends // self.ratio)   # [B, N]
                if entries.shape[1]:
                    shared = gather(comp, entries)                                       # [B, N, d]
                    visible = (positions + 1) // self.ratio
                    done = torch.arange(entries.shape[1], device=x.device).view(1, 1, -1) < visible.unsqueeze(-1)
                    sbias = _bias(done, x.dtype)                                         # [B, T, N]

        # Queries in chunks: a chunk's window keys span at most chunk + 2*window - 2 columns of
        # `keys` (rows start their key range up to window-1 positions before their first query),
        # so the window part costs O(T * (W + chunk)) instead of O(T^2).
        chunk = max(self.window, 64)
        outs = []
        for s in range(0, t, chunk):
            e = min(s + chunk, t)
            lo, hi = max(s - self.window + 1, 0), min(e + self.window - 1, keys.shape[1])
            qp, kp = positions[:, s:e, None], keys[:, None, lo:hi]
            win, bias = kv[:, lo:hi], _bias((kp >= 0) & (kp <= qp) & (kp > qp - self.window), x.dtype)
            if shared is not None:
                win, bias = torch.cat([win, shared], dim=1), torch.cat([bias, sbias[:, s:e]], dim=-1)
            own = own_bias = None
            if picked is not None:
                own, own_bias = gather(comp, picked[:, s:e]), _bias(picked[:, s:e] >= 0, x.dtype)
            outs.append(sink_attention(q[:, s:e], win, bias, self.attn_sink, self.head_dim ** -0.5, own, own_bias))
        o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        o = apply_rope(o, cos, sin, inverse=True)
        o = o.reshape(b, t, self.groups, -1)
        wo_a = self.wo_a.weight.view(self.groups, self.o_lora_rank, -1)
        o = torch.einsum("btgd,grd->btgr", o, wo_a)
        return self.wo_b(o.flatten(2))


def _bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: 0 where visible, -inf elsewhere."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))


def sink_attention(q, kv, bias, sink, scale, own=None, own_bias=None):
    """q [B, T, H, D]; kv [B, S, D] keys (K = V) shared by all queries, bias [B, T, S] additive
    mask; own [B, T, K, D] keys of each query alone (CSA's selected entries), own_bias [B, T, K].
    The sink logit of each head joins the softmax denominator only."""
    b, t, h, d = q.shape
    s = kv.shape[1]
    # The keys are shared by every head: fold the heads into the query rows, one [T*H, S]
    # product per sequence (a matmul broadcasting kv over the heads copies it once per head).
    logits = torch.bmm(q.reshape(b, t * h, d), kv.transpose(1, 2)).view(b, t, h, s).transpose(1, 2)
    logits = logits * scale + bias.unsqueeze(1)                                          # [B, H, T, S]
    if own is not None:
        mine = torch.einsum("bthd,btkd->bhtk", q, own) * scale + own_bias.unsqueeze(1)
        logits = torch.cat([logits, mine], dim=-1)                                      # [B, H, T, S + K]
    # softmax over [logits, sink] without materialising the extra column
    lse = logaddexp(torch.logsumexp(logits, dim=-1, keepdim=True), sink.to(logits.dtype).view(1, h, 1, 1))
    probs = torch.exp(logits - lse).transpose(1, 2)                                      # [B, T, H, S + K]
    out = torch.bmm(probs[..., :s].reshape(b, t * h, s), kv).view(b, t, h, -1)
    if own is not None:
        out = out + torch.einsum("bthk,btkd->bthd", probs[..., s:], own)
    return out                                                                           # [B, T, H, D]


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
        return self.w2(silu(gate) * up)


class Gate(nn.Module):
    """sqrtsoftplus (or sigmoid/softmax) scores; the selection bias only picks experts; hash
    layers take the experts from `tid2eid[token]`; weights renormalised and scaled."""

    def __init__(self, spec: ModelSpec, hash_routed: bool):
        super().__init__()
        moe = spec.moe
        self.topk, self.hash = moe.top_k, hash_routed
        self.score_func, self.route_scale = moe.router.scoring, moe.router.scale
        self.normalize = moe.router.norm_topk_prob
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
            scores = sigmoid(logits)
        else:
            scores = softplus(logits).sqrt()
        if self.hash:
            idx = self.tid2eid[ids].long()
        else:
            idx = torch.topk(scores + self.bias, self.topk, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        if self.normalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.route_scale, idx


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec, hash_routed: bool):
        super().__init__()
        moe = spec.moe
        limit = moe.swiglu_limit
        self.gate = Gate(spec, hash_routed)
        self.experts = nn.ModuleList(Expert(spec.hidden_size, moe.expert_intermediate, limit)
                                     for _ in range(moe.num_experts))
        self.shared_experts = Expert(spec.hidden_size, moe.shared_intermediate, limit)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.gate(x, ids.reshape(-1))
        y = dispatch(x, idx, w.to(x.dtype), lambda e, rows: self.experts[e](rows))
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
    pre = mode.sigmoid(pre_w * scale[0] + pre_b) + hc_eps
    post = 2 * mode.sigmoid(post_w * scale[1] + post_b)
    comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * scale[2] + comb_b.view(n, n), dim=-1) + hc_eps
    return pre, post, sinkhorn(comb, iters, hc_eps)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Normalise columns, then iters - 1 times rows and columns, of comb [..., n, n].

    Why numpy on CPU for a few rows (a decode step): the ~40 normalisations of a few n x n
    matrices are each three tiny ops, ~5 us apiece through torch's dispatcher and ~2 us in
    numpy (two per layer per step: 0.8 vs 0.35 ms each, measured here); from ~256 rows (a
    prefill chunk) torch is the faster one. The same IEEE operations in the same order, so
    the result is bit-identical either way (tests/test_model_deepseek_v4.py). Autograd and
    other devices keep torch."""
    cpu = (comb.device.type == "cpu" and comb.dtype in (torch.float32, torch.float64) and not comb.requires_grad
           and comb[..., 0, 0].numel() <= 128)
    a = comb.numpy() if cpu else comb
    a = a / (a.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        a = a / (a.sum(axis=-1, keepdims=True) + eps)
        a = a / (a.sum(axis=-2, keepdims=True) + eps)
    return torch.from_numpy(a) if cpu else a


def hc_collapse(x, fn, scale, base, eps, hc_eps, mode: Mode):
    """The hc head: sigmoid weights (no Sinkhorn) summing the streams into one."""
    flat = unit_rms(mode.f32(x.flatten(2)), eps)
    pre = mode.sigmoid(F.linear(flat, fn.to(flat.dtype)) * scale.to(flat.dtype) + base.to(flat.dtype)) + hc_eps
    return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec, ropes: dict[str, Rope]):
        super().__init__()
        self.eps = spec.norm_eps
        self.hc_eps, self.iters = spec.v4.hc_eps, spec.v4.hc_sinkhorn_iters
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

    def forward(self, x, step: Step, ids, mode: Mode):
        """x [B, T, n, d] streams; the attention caches under this layer's index."""
        x = self._mix(x, lambda h: self.attn(self.attn_norm(h), step, mode),
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

    def forward(self, h, emb, step: Step, ids, mode: Mode):
        x = self.e_proj(self.enorm(emb)).unsqueeze(2) + self.h_proj(self.hnorm(h))
        x = super().forward(x, step, ids, mode)
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
        self.hc_eps = spec.v4.hc_eps

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

    @property
    def mode(self) -> Mode:
        return Mode(self.reference == "official", self.exact_fp32)

    def cache_layers(self) -> tuple[LayerSpec, ...]:
        """The layers whose cache streams the pools hold: the main ones and the loaded MTP blocks'."""
        return self.spec.layers + self.spec.mtp_layers[:len(self.mtp)]

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, mtp_ids: torch.Tensor | None = None):
        """logits [B, T, V] of input_ids [B, T] appended to `cache` (none: a fresh sequence);
        with `mtp_ids` (the token after each position) and an MTP block loaded, returns
        (logits, draft_logits) where draft_logits[:, t] predicts token t+2. The MTP blocks
        cache only the steps given mtp_ids, so pass them on every step of a sequence."""
        cache = Cache() if cache is None else cache
        step = cache.step(self, input_ids, self.head.weight.dtype)
        h = self.hidden(input_ids, step)
        draft = self.draft(h, mtp_ids, step) if mtp_ids is not None else None
        cache.advance(input_ids)
        logits = self.logits(h)
        return logits if mtp_ids is None else (logits, draft)

    def hidden(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        """The mHC streams [B, T, n, d] after the last block, over the step's cache views."""
        mode, m = self.mode, self.model
        h = m.embed_tokens(input_ids).unsqueeze(2).expand(-1, -1, self.hc_mult, -1).contiguous()
        for layer in m.layers:
            h = layer(h, step, input_ids, mode)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Streams [..., n, d] -> logits [..., V] through the hc head and the final norm."""
        hc = self.model.hc_head
        return self.head(self.model.norm(hc_collapse(h, hc.hc_fn, hc.hc_scale, hc.hc_base, self.eps, self.hc_eps,
                                                     self.mode)))

    def known_experts(self, input_ids: torch.Tensor) -> list[str]:
        """Routed experts the hash-routed layers will run for input_ids (`tid2eid[token]`),
        known before the step runs (so an expert cache can load them first)."""
        out = []
        for i, layer in enumerate(self.model.layers):
            gate = layer.ffn.gate
            if gate.hash:
                out += [f"model.layers.{i}.ffn.experts.{e}" for e in gate.tid2eid[input_ids].unique().tolist()]
        return out

    @property
    def num_mtp_layers(self) -> int:
        return len(self.mtp)

    def draft_step(self, h: torch.Tensor, next_ids: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """(the first MTP block's output streams [B, T, n, d], its draft logits [B, T, V]); the
        streams stand in for h when drafting the token after next (speculative decoding)."""
        x, out = self.mtp[0](h, self.model.embed_tokens(next_ids), step, next_ids, self.mode)
        return x, self.head(out)

    def draft(self, h: torch.Tensor, mtp_ids: torch.Tensor, step: Step) -> torch.Tensor | None:
        """Draft logits [B, T, V] of the MTP blocks from the main streams h and the next tokens
        mtp_ids [B, T] (None without an MTP block); they store their entries in the step."""
        mode, emb, out = self.mode, self.model.embed_tokens(mtp_ids), None
        x = h
        for block in self.mtp:
            x, out = block(x, emb, step, mtp_ids, mode)
        return self.head(out) if out is not None else None


# ----------------------------------------------------------------------------- family API
def make_ropes(spec: ModelSpec, reference: str) -> dict[str, Rope]:
    """'main' (sliding-only layers) and 'compress' (compressed layers and the indexer; YaRN
    when configured), the yarn frequencies each reference's own way."""
    return {"main": Rope(spec.rope, reference), "compress": Rope(spec.v4.compress_rope, reference)}


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
