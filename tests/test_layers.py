"""`model.layers.linear`: the engine's CPU linear (oneDNN) against a float64 product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tierlm.model import layers


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [(), (1,), (5,), (2, 3), (4, 8)])
@pytest.mark.parametrize("out,inp", [(11, 7), (512, 384)], ids=["small", "large"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_a_float64_product(dtype, tol, rows, out, inp, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*rows, inp, generator=g)
    w = torch.randn(out, inp, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    want = F.linear(x.double(), w.double(), b.double() if bias else None)
    got = layers.linear(x.to(dtype), w.to(dtype), b.to(dtype) if bias else None)
    assert got.dtype == dtype and got.shape == (*rows, out)
    scale = want.abs().max()
    assert (got.double() - want).abs().max() <= tol * scale


def test_linear_uses_onednn_when_torch_has_it(monkeypatch):
    if torch.backends.mkldnn.is_available():
        assert layers.ONEDNN
    calls = []
    real = layers._onednn
    monkeypatch.setattr(layers, "_onednn", lambda *a: calls.append(tuple(a[1].shape)) or real(*a))
    layers.linear(torch.randn(1, 768), torch.randn(256, 768))
    layers.linear(torch.randn(16, 64).bfloat16(), torch.randn(64, 64).bfloat16())
    layers.linear(torch.randn(16, 64).double(), torch.randn(64, 64).double())     # float64: F.linear
    assert calls == [(256, 768)] * layers.ONEDNN + [(64, 64)] * (torch.bfloat16 in layers.ONEDNN_DTYPES)


# MKL's F.linear gave other bits at other thread counts for most of these shapes (the
# 256 x 256 matrix-vector product at 3+ threads; 16 rows from K = 1024 at 2 threads).
@pytest.mark.parametrize("rows,out,inp", [(1, 256, 256), (1, 512, 64), (16, 768, 2048), (128, 256, 1024)])
def test_linear_is_independent_of_the_thread_count(rows, out, inp):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(rows, inp, generator=g), torch.randn(out, inp, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results.append(layers.linear(x, w))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_training_and_float64_keep_f_linear():
    w = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(layers.linear(x, w), F.linear(x, w))
    wf = torch.randn(4, 3, requires_grad=True)
    layers.linear(torch.randn(2, 3), wf).sum().backward()         # autograd goes through F.linear
    assert wf.grad is not None and wf.grad.shape == (4, 3)


def test_use_fast_linears_keeps_parameters_and_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
        assert layers.use_fast_linears(model) == 2
        got = model(x)
    assert all(type(m) is layers.Linear for m in (model[0], model[2]))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("n,k,experts", [(1, 2, 8), (16, 2, 8), (37, 6, 64)])
def test_dispatch_runs_experts_in_id_order_over_their_rows_in_order(n, k, experts):
    """dispatch's contract: per expert in ascending id, its rows in ascending order, summed
    with index_add_; checked bit for bit against that loop written out, and in float64
    against the per-row sum."""
    from tierlm.model.moe import dispatch
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 8, generator=g)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=g)
    mats = torch.randn(experts, 8, 8, generator=g)
    seen = []

    def expert(e, rows):
        seen.append(e)
        return rows @ mats[e]

    got = dispatch(x, idx, w, expert)
    assert seen == sorted(set(idx.flatten().tolist()))
    want = torch.zeros_like(x)
    for e in sorted(set(idx.flatten().tolist())):
        rows, slot = torch.where(idx == e)
        want.index_add_(0, rows, (x[rows] @ mats[e]) * w[rows, slot, None])
    assert torch.equal(got, want)
    ref = torch.stack([sum(w[i, j].double() * (x[i].double() @ mats[idx[i, j]].double()) for j in range(k))
                       for i in range(n)])
    assert torch.allclose(dispatch(x.double(), idx, w.double(), lambda e, r: r @ mats[e].double()), ref, atol=1e-12)


@pytest.mark.parametrize("name,ours,theirs", [
    ("silu", layers.silu, F.silu), ("sigmoid", layers.sigmoid, torch.sigmoid), ("softplus", layers.softplus, F.softplus),
    ("gelu-tanh", lambda t: layers.gelu(t, "tanh"), lambda t: F.gelu(t, approximate="tanh")),
    ("logaddexp", lambda t: layers.logaddexp(t, t[:1] * 0.5), lambda t: torch.logaddexp(t, t[:1] * 0.5))])
def test_activations_are_independent_of_the_thread_count(name, ours, theirs):
    """torch's own versions of these gave other bits at 1 and 2 threads on this tensor (their
    vectorised and scalar-tail paths round differently); ours must not, and must agree with
    torch's in float64."""
    x = torch.randn(117, 688, generator=torch.Generator().manual_seed(0)) * 8
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results.append(ours(x))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    x64 = x.double()
    assert torch.allclose(ours(x64), theirs(x64), rtol=1e-13, atol=1e-14)
