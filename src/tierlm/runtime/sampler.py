"""Token sampling: greedy, temperature, top-k, top-p and min-p, with per-request seeds."""

from __future__ import annotations

import torch

from .sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [R, V] (one row per sequence) -> one token id per row."""
    greedy = [i for i, seq in enumerate(seqs) if seq.params.greedy]
    out: list[int] = [0] * len(seqs)
    if greedy:                                   # one argmax for all greedy rows (same ids as row by row)
        rows = logits if len(greedy) == len(seqs) else logits[greedy]
        for i, tok in zip(greedy, rows.argmax(dim=-1).tolist()):
            out[i] = tok
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        x = logits[i].double().cpu() / p.temperature
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
        out[i] = int(torch.multinomial(probs / probs.sum(), 1, generator=seq.generator))
    return out
