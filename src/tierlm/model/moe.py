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
    for e in idx.unique().tolist():
        rows, slot = torch.where(idx == e)
        out.index_add_(0, rows, (expert(e, x[rows]) * weights[rows, slot, None]).to(x.dtype))
    return out
