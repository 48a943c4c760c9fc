"""DeepSeek-V4: parity with transformers' DeepseekV4ForCausalLM (float64), incremental decoding,
MTP loading, and pins of the official behaviour where it differs from transformers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

import tierlm.model as tm  # noqa: E402
from tierlm.model import Cache  # noqa: E402
from tierlm.model import quant  # noqa: E402
from tierlm.model.families import deepseek_v4 as v4  # noqa: E402
from tierlm.model.ops import gather  # noqa: E402
from fp_grids import e4m3_values  # noqa: E402

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"

CONFIGS = {
    # all three kinds, two hash-routed layers, window 6 < 33 tokens, 8 CSA entries > top-3
    "mixed": dict(layer_types=[SWA, CSA, HCA, CSA], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
                  compress_rates={CSA: 4, HCA: 8}, sliding_window=6, index_topk=3, hc_mult=2, batch=2, seq=33),
    # 4 streams, window 4, YaRN on the compressed layers, 8 heads in 4 output groups
    "yarn": dict(layer_types=[HCA, CSA, SWA], mlp_layer_types=["hash_moe", "moe", "moe"],
                 compress_rates={CSA: 4, HCA: 8}, sliding_window=4, index_topk=2, index_n_heads=4, hc_mult=4,
                 num_attention_heads=8, o_groups=4,
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                  "beta_fast": 8, "beta_slow": 1},
                 batch=1, seq=40),
    # HCA with a small non-overlapping rate, window 8, top-5
    "dense_hca": dict(layer_types=[CSA, HCA, SWA, CSA], mlp_layer_types=["moe", "hash_moe", "moe", "moe"],
                      compress_rates={CSA: 4, HCA: 4}, sliding_window=8, index_topk=5, hc_mult=3, batch=2, seq=24),
}


def make_checkpoint(path, name: str, seed: int = 0, **over):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    opts = {**CONFIGS[name], **over}
    batch, seq = opts.pop("batch"), opts.pop("seq")
    base = dict(vocab_size=96, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=len(opts["layer_types"]),
                num_attention_heads=4, head_dim=16, q_lora_rank=16, partial_rotary_factor=0.5, num_experts_per_tok=2,
                n_routed_experts=4, n_shared_experts=1, o_groups=2, o_lora_rank=8, index_n_heads=2,
                index_head_dim=8, max_position_embeddings=256, swiglu_limit=1.5, routed_scaling_factor=1.5)
    base.update(opts)
    cfg = DeepseekV4Config(**base)
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():        # zero-initialised ones included
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.dim() > 1 else 0.5))
            if n.endswith("norm.weight"):
                p.add_(1.0)
        for n, b in model.named_buffers():
            if n.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok]
                                     for _ in range(cfg.vocab_size)]))
            elif n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.3)
    model.save_pretrained(path)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    return model, ids


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf, ids = make_checkpoint(path, request.param)
    with torch.no_grad():
        ref = hf(ids).logits
    model = tm.load(path, dtype=torch.float64, progress=False)
    return request.param, path, ref, model, ids


def test_parity_with_transformers(case):
    name, _, ref, model, ids = case
    model.set_reference("transformers")            # transformers' numerics, float32 casts included
    with torch.no_grad():
        out = model(ids)
    diff = (out - ref).abs().max().item()
    print(f"{name}: max |dlogits| vs transformers = {diff:.3e}")
    assert diff <= 1e-9


def test_names_and_buffers(case):
    _, _, _, model, _ = case
    persistent = set(model.state_dict())
    assert {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()} == persistent
    assert any(n.endswith("ffn.gate.tid2eid") for n in persistent)
    assert "head.weight" in persistent and "model.hc_head.hc_fn" in persistent


@pytest.mark.parametrize("reference", ["official", "transformers"])
def test_incremental_equals_full(case, reference):
    name, _, _, model, ids = case
    model.set_reference(reference, exact_fp32=False)
    t = ids.shape[1]
    with torch.no_grad():
        full = model(ids)
        worst = 0.0
        for prefix in (1, 13):
            cache = Cache()
            parts = [model(ids[:, :prefix], cache)] + [model(ids[:, i:i + 1], cache) for i in range(prefix, t)]
            assert cache.length == t
            worst = max(worst, (torch.cat(parts, 1) - full).abs().max().item())
        cache = Cache()                              # uneven chunks across block boundaries
        cuts = [0, 5, 6, 15, t]
        parts = [model(ids[:, a:b], cache) for a, b in itertools.pairwise(cuts)]
        worst = max(worst, (torch.cat(parts, 1) - full).abs().max().item())
    print(f"{name}/{reference}: max |dlogits| prefill+decode vs full = {worst:.3e}")
    assert worst <= 1e-9


def test_official_differs_and_pins_qat(case):
    """Official mode = transformers mode + the FP8/FP4 QAT simulations, nothing else."""
    name, _, _, model, ids = case
    with torch.no_grad():
        model.set_reference("transformers", exact_fp32=False)
        tf = model(ids)
        model.set_reference("official")
        off = model(ids)
        assert (off - tf).abs().max().item() > 1e-6        # the simulations are active
        cache = Cache()
        model(ids, cache)
        rd, t = model.spec.v4.rope_head_dim, ids.shape[1]
        for layer in model.cache_layers():
            r = layer.compress_ratio
            nope = stored(model, cache, layer.index, "window", range(t - layer.window, t))[..., :-rd]
            assert torch.equal(quant.fake_quant(nope, 64, "fp8"), nope)     # window KV on the FP8 grid
            if r:
                nope = stored(model, cache, layer.index, "compressed", range(t // r))[..., :-rd]
                assert torch.equal(quant.fake_quant(nope, 64, "fp8"), nope)
            if layer.csa:
                keys = stored(model, cache, layer.index, "indexer", range(t // r))
                assert torch.equal(quant.fake_quant(keys, 32, "fp4"), keys)
        # with the simulations replaced by identities, official == transformers (deepseek_v4
        # calls them through its own module globals, imported from tierlm.model.quant)
        saved = v4.fake_quant, v4.hadamard
        v4.fake_quant, v4.hadamard = (lambda x, *a: x), (lambda x: x)
        try:
            same = model(ids)
        finally:
            v4.fake_quant, v4.hadamard = saved
    assert (same - tf).abs().max().item() <= 1e-12


def stored(model, cache, layer, name, index):
    """Entries [B, len(index), width] of a stream read back through a step's views; every one
    must have been written (a zero entry would pass any grid check)."""
    step = cache.step(model, cache.ids[:, :0], next(model.parameters()).dtype)     # reads only
    idx = torch.tensor(list(index)).expand(cache.ids.shape[0], -1)
    out = gather(step.view(layer, name), idx)
    assert out.shape[1] > 0 and (out != 0).any(-1).all(), (layer, name)
    return out


@pytest.mark.parametrize("reference", ["official", "transformers"])
def test_ragged_paged_batch(case, reference):
    """Rows of different lengths in one step, blocks scattered over shuffled pools, chunks cut
    inside and across compression blocks (ratios 4 and 8, 16-token pages): each row equals
    the full forward of that row alone."""
    from paged import ragged_logits
    _, _, _, model, _ = case
    model.set_reference(reference, exact_fp32=False)
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, model.spec.vocab_size, (n,), generator=g).tolist() for n in (37, 11, 23)]
    cuts = [[5, 13, 16, 17, 30, 31, 37], [3, 4, 8, 11], [8, 23]]
    outs = ragged_logits(model, seqs, cuts)
    with torch.no_grad():
        worst = max((got - model(torch.tensor([s]))[0]).abs().max().item() for s, got in zip(seqs, outs))
    print(f"ragged paged batch vs each row alone: {worst:.3e}")
    assert worst <= 1e-9


def _nearest(grid, y):
    """Round to the nearest grid value, ties to the one with an even mantissa (even index
    among the non-negative values, which alternate mantissa parity)."""
    d = (y.unsqueeze(-1) - grid).abs()
    best = d.min(-1, keepdim=True).values
    cand = (d == best)
    idx = torch.arange(grid.numel())
    pos = grid >= 0
    parity = torch.where(pos, idx - int((~pos).sum()), int((~pos).sum()) - 1 - idx) % 2
    pick = torch.where(cand & (parity == 0), 0, 1).argmin(-1)
    single = cand.sum(-1) == 1
    pick = torch.where(single, cand.int().argmax(-1), pick)
    return grid[pick]


def test_fake_quant_matches_independent_derivation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 128, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 6, dtype=torch.float64)[:, None]
    for fmt, block, qmax, grid in (("fp8", 64, 448.0, e4m3_values()),
                                   ("fp4", 32, 6.0, torch.tensor([-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2,
                                                                   3, 4, 6], dtype=torch.float64))):
        got = quant.fake_quant(x, block, fmt)
        want = torch.empty_like(x)
        for r, c in itertools.product(range(x.shape[0]), range(0, x.shape[1], block)):
            blk = x[r, c:c + block]
            scale = 2.0 ** math.ceil(math.log2(max(blk.abs().max().item(), 1e-4) / qmax))
            want[r, c:c + block] = _nearest(grid, (blk / scale).clamp(-qmax, qmax)) * scale
        assert torch.equal(got, want), fmt


def test_hadamard_is_sylvester():
    h = torch.tensor([[1.0]], dtype=torch.float64)
    for _ in range(4):
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.allclose(quant.hadamard(x), x @ h.T / 4, atol=1e-14)


def test_mhc_matches_official_formula():
    """Official hc_pre / hc_split_sinkhorn, re-derived: mixes = (x @ fn^T) * rsqrt(mean x^2 + eps),
    pre = sigmoid + eps, post = 2 sigmoid, comb = row softmax + eps then column/row
    normalisations ending on columns."""
    g = torch.Generator().manual_seed(5)
    n, d, iters, eps = 4, 8, 20, 1e-6
    x = torch.randn(2, 3, n, d, generator=g, dtype=torch.float64)
    fn = torch.randn((2 + n) * n, n * d, generator=g, dtype=torch.float64) * 0.3
    scale, base = torch.rand(3, generator=g, dtype=torch.float64) + 0.5, torch.randn((2 + n) * n, generator=g, dtype=torch.float64)
    pre, post, comb = v4.hc_weights(x, fn, scale, base, n, iters, eps, eps, v4.Mode(True, False))
    xf = x.flatten(2)
    mix = (xf @ fn.T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    want_pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + eps
    want_post = 2 * torch.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    c = torch.softmax((mix[..., 2 * n:] * scale[2] + base[2 * n:]).view(2, 3, n, n), -1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    for got, want in ((pre, want_pre), (post, want_post), (comb, c)):
        assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(comb.sum(-2), torch.ones(2, 3, n, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,n", [(1, 2), (16, 4), (128, 4), (700, 4)])
def test_sinkhorn_on_cpu_is_bit_identical_to_torch_ops(dtype, rows, n):
    """The CPU loop runs in numpy up to 128 rows; it must round exactly as the torch loop the reference uses."""
    g = torch.Generator().manual_seed(rows)
    comb = torch.softmax(torch.randn(rows, 1, n, n, generator=g, dtype=dtype) * 4, -1) + 1e-6
    want = comb / (comb.sum(-2, keepdim=True) + 1e-6)
    for _ in range(19):
        want = want / (want.sum(-1, keepdim=True) + 1e-6)
        want = want / (want.sum(-2, keepdim=True) + 1e-6)
    got = v4.sinkhorn(comb, 20, 1e-6)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(v4.sinkhorn(comb.clone().requires_grad_(), 20, 1e-6).detach(), want)   # the torch path


def test_mtp_checkpoint(tmp_path):
    hf, ids = make_checkpoint(tmp_path, "mixed", seed=1)
    plain = tm.load(tmp_path, dtype=torch.float64, progress=False)
    assert len(plain.mtp) == 0
    # add the MTP block's tensors, with the official `mtp.0.` names, in a second file
    spec = plain.spec
    with torch.device("meta"):
        full = v4.build(spec, ["mtp.0.e_proj.weight"])
    g = torch.Generator().manual_seed(7)
    extra = {}
    for n, t in full.state_dict().items():
        if n.startswith("mtp.0."):
            if t.is_floating_point():
                extra[n] = torch.randn(t.shape, generator=g, dtype=torch.float64) * (0.3 if t.dim() > 1 else 0.5)
                if n.endswith("norm.weight"):
                    extra[n] += 1.0
            else:
                extra[n] = torch.randint(0, spec.moe.num_experts, t.shape, generator=g)
    assert "mtp.0.hc_head_fn" in extra and "mtp.0.attn.wkv.weight" in extra and "mtp.0.ffn.gate.bias" in extra
    save_file(extra, str(tmp_path / "mtp.safetensors"))
    model = tm.load(tmp_path, dtype=torch.float64, progress=False)
    assert len(model.mtp) == 1
    nxt = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        logits, draft = model(ids, mtp_ids=nxt)
        assert torch.equal(logits, plain(ids))
        assert draft.shape == logits.shape and torch.isfinite(draft).all()
        assert (draft - logits).abs().max() > 1e-3
        cache, parts = Cache(), []
        for a, b in itertools.pairwise([0, 9, *range(10, ids.shape[1] + 1)]):
            parts.append(model(ids[:, a:b], cache, mtp_ids=nxt[:, a:b])[1])
        diff = (torch.cat(parts, 1) - draft).abs().max().item()
    print(f"mtp draft logits, prefill+decode vs full: {diff:.3e}")
    assert diff <= 1e-9


def test_rename_official_names():
    assert v4.rename("embed.weight") == "model.embed_tokens.weight"
    assert v4.rename("hc_head_fn") == "model.hc_head.hc_fn"
    assert v4.rename("layers.3.attn.compressor.ape") == "model.layers.3.attn.compressor.ape"
    assert v4.rename("model.layers.0.attn.wkv.weight") == "model.layers.0.attn.wkv.weight"
    assert v4.rename("head.weight") == "head.weight" and v4.rename("mtp.0.e_proj.weight") == "mtp.0.e_proj.weight"


@pytest.mark.parametrize("k", [1, 5, 16, 40])
def test_stable_topk_equals_a_stable_sort(k):
    """The indexer's top-k: the same indices, in the same order, as a full stable descending
    sort, with many exact ties (ReLU zeros, repeated values) and -inf (future entries)."""
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 6, (3, 4, 40), generator=g).float()               # ties everywhere
    scores[scores == 0] = float("-inf")
    scores[0, 0] = 0.0                                                           # one row all tied
    want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    assert torch.equal(v4.stable_topk(scores, k), want)
    scores[1, 2, ::3] = float("nan")                                             # a broken model's scores
    want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    assert torch.equal(v4.stable_topk(scores, k), want)
