"""Routed-expert dispatch: the one place where tokens meet their experts.

Every MoE family routes with its own router, then calls `dispatch` to run the chosen experts
and sum their weighted outputs, so per-expert execution (and, later, expert offloading) lives
here only. The order is fixed: experts in ascending id, each over its tokens in ascending
row order, accumulated with index_add_ in the model dtype, so results do not depend on how a
family lists its experts.
"""

from __future__ import annotations

from typing import Callable

import torch


def dispatch(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
             expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_j weights[n, j] * expert(idx[n, j], x[n]) for each row n: x [N, D], idx and weights
    [N, k] -> [N, D] in x's dtype. Each product is taken in the promoted dtype of the expert
    output and `weights`, then cast to x's dtype: callers that want the weight rounded to the
    model dtype first pass weights.to(x.dtype)."""
    out = torch.zeros_like(x)
    k = idx.shape[1]
    # One stable sort groups the (row, slot) pairs by expert, rows ascending within each, as
    # torch.where(idx == e) per expert would list them, without a pass over idx per expert.
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    experts, counts = flat[order].unique_consecutive(return_counts=True)
    rows_of, slots_of = order // k, order % k
    start = 0
    for e, n in zip(experts.tolist(), counts.tolist()):
        rows, slot = rows_of[start:start + n], slots_of[start:start + n]
        start += n
        out.index_add_(0, rows, (expert(e, x[rows]) * weights[rows, slot, None]).to(x.dtype))
    return out
