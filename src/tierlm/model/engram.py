"""Engram: conditional memory by hashed n-gram lookup (deepseek-ai/Engram `engram_demo_v1.py`).

The algorithm follows the official demo step by step (module_specs.md §5):

1. Tokenizer compression: token strings are normalised (NFKC, NFD, strip accents, lowercase,
   collapse whitespace, strip; a lone space survives) and ids with equal keys share one
   compressed id (`compression_table`).
2. N-gram hashing (`EngramHashing`), per Engram layer, in int64: odd multipliers drawn from
   `numpy.random.default_rng(seed + 10007 * layer_id)`, for every order n in 2..max_ngram_size
   `mix = (t0 * m0) ^ (t-1 * m1) ^ ...` over the compressed ids shifted right and padded with the
   compressed pad id, then one index per head: `mix mod p`, with a distinct prime p per head,
   order and layer (`engram_primes`). The indices depend on token ids only, so they are computed
   outside the module's forward pass (by the model, before its blocks run).
3. `Engram`: one embedding table with per-head offsets, per-hc-stream context gating against the
   hidden state (own key projection and norms per stream, shared value projection,
   sign * sqrt of the scaled dot product, sigmoid), and a short causal depthwise convolution
   (dilation = max_ngram_size, SiLU) added as a residual: `out = v + conv(v)`.

Tensor names follow the demo's modules (`multi_head_embedding.embedding`, `key_projs.{i}`,
`value_proj`, `norm1.{i}`, `norm2.{i}`, `short_conv.conv`, `short_conv.norms.{i}`). The offsets
are a non-persistent buffer (the demo's is persistent), so checkpoints hold parameters only.
"""

from __future__ import annotations

import math
import re
import unicodedata
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TierlmError
from ..spec.model import EngramConfig, ModelSpec
from ..spec.params import _next_prime
from .layers import sigmoid, silu
from .ops import gather, store

PRIME_1 = 10007                 # layer stride of the hashing seed, as in the demo
_SENTINEL = "\ue000"
# Rust's char::is_whitespace (Unicode White_Space), which the `tokenizers` Strip normalizer uses;
# Python's str.strip() would also remove U+001C..U+001F.
_WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
               "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_RUNS = re.compile(r"[ \t\r\n]+")


# ---------------------------------------------------------------------------- 1. compression
@lru_cache(maxsize=1)
def _tokenizers_normalizer() -> Any:
    """The demo's normalizer from the `tokenizers` package, when it is installed (no download)."""
    try:
        from tokenizers import Regex, normalizers
    except ImportError:
        return None
    return normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(), normalizers.Replace(_SENTINEL, " ")])


def normalize_token(text: str) -> str:
    """The demo's normalizer: NFKC, NFD, strip accents, lowercase, collapse [ \\t\\r\\n]+ to one
    space, keep a lone space, strip White_Space at both ends.

    Uses `tokenizers` (the demo's own normalizer) when it is installed; otherwise
    `normalize_python`, which differs from it only where the Unicode versions of Python's
    `unicodedata` and of the tokenizers crate disagree (about 300 marks of recent scripts)."""
    norm = _tokenizers_normalizer()
    return norm.normalize_str(text) if norm is not None else normalize_python(text)


def normalize_python(text: str) -> str:
    """Pure-Python version of the demo's normalizer (see `normalize_token`)."""
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = "".join(c for c in s if not unicodedata.category(c).startswith("M"))
    s = _RUNS.sub(" ", "".join(c.lower() for c in s))     # per character, as Rust: no final sigma
    if s == " ":
        s = _SENTINEL
    return s.strip(_WHITESPACE).replace(_SENTINEL, " ")


def compression_table(decoded: Sequence[str], raw: Sequence[str] | None = None) -> tuple[np.ndarray, int]:
    """old id -> compressed id (int64 numpy array) and the number of compressed ids.

    `decoded[i]` is the text of token i as `tokenizer.decode([i])` gives it; `raw[i]` the token
    string (`convert_ids_to_tokens(i)`), used as the key when the decoded text holds U+FFFD
    (a partial UTF-8 sequence). Compressed ids are numbered by first appearance.
    """
    raw = decoded if raw is None else raw
    if len(raw) != len(decoded):
        raise TierlmError(f"compression_table: {len(decoded)} decoded tokens but {len(raw)} raw ones")
    keys: dict[str, int] = {}
    table = np.empty(len(decoded), dtype=np.int64)
    for i, text in enumerate(decoded):
        if "\ufffd" in text:
            key = raw[i]
        else:
            key = normalize_token(text) or text
        table[i] = keys.setdefault(key, len(keys))
    return table, len(keys)


# ---------------------------------------------------------------------------- 2. hashing
@lru_cache(maxsize=64)
def engram_primes(layer_ids: tuple[int, ...], vocab_sizes: tuple[int, ...],
                  heads: int) -> dict[int, tuple[tuple[int, ...], ...]]:
    """Table size (a prime) of every head: {layer_id: ((order-2 heads), (order-3 heads), ...)}.

    The same search as `spec.params.engram_table_rows` (and the demo): per layer in the given
    order, per n-gram order, search upward from vocab_size - 1 for primes no head, order or
    earlier layer has taken."""
    seen: set[int] = set()
    out: dict[int, tuple[tuple[int, ...], ...]] = {}
    for layer in layer_ids:
        orders = []
        for size in vocab_sizes:
            p, primes = size - 1, []
            for _ in range(heads):
                p = _next_prime(p, seen)
                seen.add(p)
                primes.append(p)
            orders.append(tuple(primes))
        out[layer] = tuple(orders)
    return out


def layer_multipliers(seed: int, layer_id: int, max_ngram_size: int, compressed_vocab: int) -> np.ndarray:
    """Odd int64 multipliers 2r+1, r ~ U[0, (int64_max // compressed_vocab) // 2) from
    default_rng(seed + 10007 * layer_id): products with compressed ids cannot overflow."""
    half = max(1, int(np.iinfo(np.int64).max // compressed_vocab) // 2)
    r = np.random.default_rng(int(seed + PRIME_1 * int(layer_id))).integers(
        low=0, high=half, size=(max_ngram_size,), dtype=np.int64)
    return r * 2 + 1


class EngramHashing:
    """Token ids -> per-layer lookup indices [B, T, (max_ngram_size - 1) * n_head_per_ngram].

    Host-side bookkeeping, not an nn.Module: it holds the compression table, the compressed pad
    id, the multipliers and primes of every Engram layer. int64 torch arithmetic on the ids'
    device; it equals the demo's numpy arithmetic (multiplication and XOR in two's complement,
    `%` with the sign of the divisor)."""

    def __init__(self, cfg: EngramConfig, vocab_size: int, lookup_table: Any = None,
                 pad_id: int | None = None, seed: int | None = None):
        """pad_id / seed override the config's (used by tests on hand-built configs)."""
        self.cfg = cfg
        pad_id = cfg.pad_id if pad_id is None else pad_id
        seed = cfg.seed if seed is None else seed
        # always on the CPU: the loader builds modules under torch.device("meta")
        if lookup_table is None:
            table = torch.arange(vocab_size, dtype=torch.int64, device="cpu")
        else:
            table = torch.as_tensor(np.asarray(lookup_table), dtype=torch.int64, device="cpu").reshape(-1).clone()
        self.table = table
        self.compressed_vocab = int(table.max().item()) + 1
        self.pad_id = int(table[pad_id].item())
        self.seed = seed
        self.primes = engram_primes(tuple(cfg.layer_ids), tuple(cfg.vocab_sizes), cfg.n_head_per_ngram)
        self.multipliers = {layer: layer_multipliers(seed, layer, cfg.max_ngram_size, self.compressed_vocab)
                            for layer in cfg.layer_ids}

    @classmethod
    def from_spec(cls, spec: ModelSpec, lookup_table: Any = None) -> "EngramHashing":
        assert spec.engram is not None
        return cls(spec.engram, spec.vocab_size, lookup_table)

    def head_sizes(self, layer_id: int) -> list[int]:
        return [p for order in self.primes[layer_id] for p in order]

    @property
    def context(self) -> int:
        """Tokens of left context the next indices depend on."""
        return self.cfg.max_ngram_size - 1

    def compress(self, ids: torch.Tensor) -> torch.Tensor:
        """Compressed ids; negative ids pass through unchanged, as in the demo."""
        table = self.table.to(ids.device)
        ids = ids.to(torch.int64)
        return torch.where(ids >= 0, table[ids.clamp_min(0)], ids)

    def hash_compressed(self, x: torch.Tensor, layer_id: int) -> torch.Tensor:
        B, T = x.shape
        m = self.multipliers[layer_id].tolist()
        pad = torch.full((B, self.cfg.max_ngram_size), self.pad_id, dtype=torch.int64, device=x.device)
        shifted = [torch.cat([pad[:, :k], x], dim=1)[:, :T] for k in range(self.cfg.max_ngram_size)]
        mixes = []
        mix = shifted[0] * m[0]
        for k in range(1, self.cfg.max_ngram_size):
            mix = torch.bitwise_xor(mix, shifted[k] * m[k])
            mixes.append(mix)                     # order k + 1
        mixes_t = torch.stack(mixes, dim=-1)      # [B, T, orders]
        primes = torch.tensor(self.primes[layer_id], dtype=torch.int64, device=x.device)   # [orders, heads]
        return torch.remainder(mixes_t[..., None], primes).flatten(-2)

    def __call__(self, input_ids: torch.Tensor, context: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Indices of every Engram layer for `input_ids` [B, T]; `context` [B, c] are the tokens
        just before them (none: the sequence starts here and is padded)."""
        ids = input_ids if context is None else torch.cat([context.to(input_ids.device), input_ids], dim=1)
        x = self.compress(ids)
        start = ids.shape[1] - input_ids.shape[1]
        return {layer: self.hash_compressed(x, layer)[:, start:] for layer in self.cfg.layer_ids}

    def step(self, input_ids: torch.Tensor, step: Any = None) -> dict[int, torch.Tensor]:
        """As __call__, with the left context a step carries (`Step.history`, the tokens just
        before input_ids, -1 where the sequence had none: those read as padding)."""
        if step is None or step.history is None:
            return self(input_ids)
        history = step.history[:, step.history.shape[1] - self.context:] if self.context else step.history[:, :0]
        return self(input_ids, torch.where(history < 0, self.cfg.pad_id, history))


# ---------------------------------------------------------------------------- 3. module
class MultiHeadEmbedding(nn.Module):
    """One table for all heads; head j's rows start at offsets[j].

    `table` (set by `tierlm.tiers.tables`) keeps the rows off the device, in host memory or
    memory-mapped from the checkpoint: `prefetch` gathers a step's rows there as soon as its
    indices are known (from token ids alone, before the layer runs) and moves them over."""

    def __init__(self, sizes: Sequence[int], dim: int):
        super().__init__()
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64, device="cpu"), persistent=False)
        self.embedding = nn.Embedding(sum(sizes), dim)
        self.table: torch.Tensor | None = None
        self.rows_dtype = torch.float32              # the model's dtype, set with `table`
        self._ready: tuple[torch.Tensor, torch.Tensor] | None = None

    def prefetch(self, indices: torch.Tensor) -> None:
        if self.table is not None:
            rows = self.table[(indices + self.offsets).cpu()]
            self._ready = (indices, rows.to(self.offsets.device, self.rows_dtype, non_blocking=True))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return self.embedding(indices + self.offsets)
        if self._ready is None or self._ready[0] is not indices:
            self.prefetch(indices)
        rows, self._ready = self._ready[1], None
        return rows


class ShortConv(nn.Module):
    """Per-stream RMSNorm, causal depthwise Conv1d over hc_mult * hidden channels (no bias,
    zero left padding of (kernel - 1) * dilation), SiLU. With a cache state, the last
    (kernel - 1) * dilation normalised inputs are kept there, so decoding one token at a time
    gives the full-sequence result."""

    def __init__(self, hidden_size: int, kernel_size: int, dilation: int, hc_mult: int, norm_eps: float = 1e-5):
        super().__init__()
        channels = hidden_size * hc_mult
        self.hc_mult, self.dilation = hc_mult, dilation
        self.past = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False,
                              padding=self.past, dilation=dilation)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult))

    def forward(self, x: torch.Tensor, step: Any = None, layer_id: int = 0) -> torch.Tensor:
        """x [B, T, G, C]; with a step, the normalised inputs are stored in (and the past ones
        read from) the layer's `engram_conv` cache stream; without, the past is zeros."""
        B, T, G, C = x.shape
        xn = torch.cat([self.norms[i](x[:, :, i]) for i in range(G)], dim=-1)     # [B, T, G*C]
        if step is None or self.past == 0:
            past = xn.new_zeros(B, self.past, G * C)
        else:
            view = step.view(layer_id, "engram_conv")
            store(view, step.new_index(), xn)
            idx = step.starts.unsqueeze(1) - self.past + torch.arange(self.past, device=xn.device)
            past = gather(view, torch.where(idx >= 0, idx, -1)).to(xn.dtype)     # zeros before the start
        full = torch.cat([past, xn], dim=1)
        y = F.conv1d(full.transpose(1, 2), self.conv.weight, groups=G * C, dilation=self.dilation)
        return silu(y).transpose(1, 2).reshape(B, T, G, C)


class Engram(nn.Module):
    """One Engram layer. forward(hidden [B, T, hc, D] or [B, T, D], indices [B, T, heads]) returns
    the update to add to the hidden state (same shape); the block does `h = h + engram(h, idx)`."""

    def __init__(self, cfg: EngramConfig, layer_id: int, hidden_size: int, hc_mult: int = 1,
                 head_sizes: Sequence[int] | None = None):
        super().__init__()
        self.layer_id, self.hidden_size, self.hc_mult = layer_id, hidden_size, hc_mult
        if head_sizes is None:
            primes = engram_primes(tuple(cfg.layer_ids), tuple(cfg.vocab_sizes), cfg.n_head_per_ngram)[layer_id]
            head_sizes = [p for order in primes for p in order]
        feat = (cfg.max_ngram_size - 1) * cfg.n_embed_per_ngram
        self.multi_head_embedding = MultiHeadEmbedding(list(head_sizes), cfg.n_embed_per_ngram // cfg.n_head_per_ngram)
        self.short_conv = ShortConv(hidden_size, cfg.kernel_size, cfg.max_ngram_size, hc_mult)
        self.value_proj = nn.Linear(feat, hidden_size)
        self.key_projs = nn.ModuleList(nn.Linear(feat, hidden_size) for _ in range(hc_mult))
        self.norm1 = nn.ModuleList(nn.RMSNorm(hidden_size) for _ in range(hc_mult))
        self.norm2 = nn.ModuleList(nn.RMSNorm(hidden_size) for _ in range(hc_mult))

    @classmethod
    def from_spec(cls, spec: ModelSpec, layer_id: int) -> "Engram":
        assert spec.engram is not None
        return cls(spec.engram, layer_id, spec.hidden_size, spec.hc_mult)

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor, step: Any = None) -> torch.Tensor:
        single = hidden.dim() == 3
        if single:
            hidden = hidden.unsqueeze(2)
        e = self.multi_head_embedding(indices.to(hidden.device)).flatten(-2)     # [B, T, feat]
        gates = []
        for i in range(self.hc_mult):
            key = self.norm1[i](self.key_projs[i](e))
            query = self.norm2[i](hidden[:, :, i])
            g = (key * query).sum(-1) / math.sqrt(self.hidden_size)
            g = g.abs().clamp_min(1e-6).sqrt() * g.sign()
            gates.append(sigmoid(g))
        value = torch.stack(gates, dim=2)[..., None] * self.value_proj(e)[:, :, None]   # [B, T, hc, D]
        out = value + self.short_conv(value, step, self.layer_id)
        return out.squeeze(2) if single else out
