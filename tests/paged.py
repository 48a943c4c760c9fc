"""Test helper: run a family over shuffled paged pools with a ragged batch, one step at a time.

`ragged_logits(model, seqs, cuts)` feeds sequences of different lengths through the same steps
(each row's tokens split at its own cut points, rows padded to the longest chunk), with every
row's blocks scattered over the pools in a random order, and returns each row's logits
[len, V]. Comparing them with `model(ids[None])` on the row alone checks that paging, padding
and per-row positions change nothing.
"""

from __future__ import annotations

import torch

from tierlm.model.ops import Step
from tierlm.runtime.pools import CachePools
from tierlm.spec.cache import block_size


def ragged_logits(model, seqs: list[list[int]], cuts: list[list[int]], seed: int = 0) -> list[torch.Tensor]:
    spec = model.spec
    dtype = next(model.parameters()).dtype
    block = block_size(spec)
    per_row = max(-(-len(s) // block) for s in seqs) + 1
    n = len(seqs)
    groups = CachePools.block_bytes(spec, model.cache_layers(), block, dtype, "auto", "auto")
    pools = CachePools(spec, model.cache_layers(), {g: n * per_row + 3 for g in groups}, block, dtype)
    g = torch.Generator().manual_seed(seed)
    tables = {grp: torch.randperm(n * per_row + 3, generator=g)[:n * per_row].view(n, per_row) for grp in groups}
    views = pools.views(tables)
    outs: list[list[torch.Tensor]] = [[] for _ in seqs]
    done = [0] * n
    c = getattr(model, "history", 0)
    for k in range(max(len(c_) for c_ in cuts)):
        rows = [i for i in range(n) if k < len(cuts[i])]
        lens = [cuts[i][k] - done[i] for i in rows]
        t = max(lens)
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        positions = torch.zeros(len(rows), t, dtype=torch.long)
        valid = torch.zeros(len(rows), t, dtype=torch.bool)
        history = torch.full((len(rows), c), -1, dtype=torch.long)
        for r, (i, m) in enumerate(zip(rows, lens)):
            ids[r, :m] = torch.tensor(seqs[i][done[i]:done[i] + m])
            positions[r] = done[i]
            positions[r, :m] = torch.arange(done[i], done[i] + m)
            valid[r, :m] = True
            if c:
                past = seqs[i][max(0, done[i] - c):done[i]]
                if past:
                    history[r, c - len(past):] = torch.tensor(past)
        sub = {li: {name: _rows(v, rows) for name, v in streams.items()} for li, streams in views.items()}
        step = Step(positions=positions, valid=valid, starts=torch.tensor([done[i] for i in rows]),
                    lens=torch.tensor(lens), views=sub, history=history if c else None)
        with torch.no_grad():
            logits = model.logits(model.hidden(ids, step))
        for r, (i, m) in enumerate(zip(rows, lens)):
            outs[i].append(logits[r, :m])
            done[i] += m
    return [torch.cat(o) for o in outs]


def _rows(view, rows):
    from dataclasses import replace
    return replace(view, table=view.table[rows])


# Three rows (37, 7 and 20 tokens) cut into steps at different points: prefill chunks, single
# tokens, rows that join late and leave early.
SEQS = [list(range(3, 40)), [5, 9, 11, 2, 8, 1, 7], list(range(50, 70))]
CUTS = [[5, 20, 21, 22, 37], [1, 2, 7], [20]]


def assert_rows_match_transformers(ref, ours, tol: float = 1e-9) -> None:
    """ragged_logits over SEQS / CUTS equals the transformers model `ref` on each row alone."""
    outs = ragged_logits(ours, SEQS, CUTS)
    with torch.no_grad():
        for s, got in zip(SEQS, outs):
            assert (got - ref(torch.tensor([s])).logits[0]).abs().max().item() <= tol
