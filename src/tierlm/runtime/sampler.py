"""Token sampling: greedy, temperature, top-k, top-p and min-p, with per-request seeds."""

from __future__ import annotations

import torch

from .sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [R, V] (one row per sequence) -> one token id per row."""
    out = []
    for row, seq in zip(logits, seqs):
        p = seq.params
        if p.greedy:
            out.append(int(row.argmax()))
            continue
        x = row.double().cpu() / p.temperature
        if p.top_k > 0 and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0)
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            drop = (sorted_p.cumsum(0) - sorted_p) >= p.top_p     # keep the smallest set reaching top_p
            probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0))
        out.append(int(torch.multinomial(probs / probs.sum(), 1, generator=seq.generator)))
    return out
