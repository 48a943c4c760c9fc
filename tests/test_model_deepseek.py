"""Parity of tierlm's DeepSeek family (deepseek.py) with transformers 5.23 in float64.

Tiny random configurations of DeepseekV2/V3/V32 and GlmMoeDsa; each is saved with
save_pretrained, loaded with tierlm.model.load and compared logit by logit (with
`set_reference("transformers")`; V3.2 defaults to DeepSeek's official indexer, pinned by the
`test_official_indexer_*` tests).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from tierlm.model import Cache, load  # noqa: E402
from tierlm.model.families import deepseek  # noqa: E402
from tierlm.spec.config import parse_config  # noqa: E402
from fp_grids import e4m3_values  # noqa: E402

COMMON = dict(vocab_size=61, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=3, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12,
              v_head_dim=10, max_position_embeddings=256, rms_norm_eps=1e-6)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 0.8}

# (name, transformers class, config class, overrides)
CASES = [
    ("v2-lite-qproj", "DeepseekV2ForCausalLM", "DeepseekV2Config",
     dict(q_lora_rank=None, num_hidden_layers=3, first_k_dense_replace=1)),
    ("v2-qlora-group", "DeepseekV2ForCausalLM", "DeepseekV2Config",
     dict(q_lora_rank=24, num_hidden_layers=2, first_k_dense_replace=0, topk_method="group_limited_greedy",
          n_group=4, topk_group=2, routed_scaling_factor=1.5, rope_parameters=dict(YARN))),
    ("v3-qlora-group", "DeepseekV3ForCausalLM", "DeepseekV3Config",
     dict(q_lora_rank=24, num_hidden_layers=3, first_k_dense_replace=1, n_group=4, topk_group=2,
          routed_scaling_factor=2.5)),
    ("v3-qproj-yarn-half", "DeepseekV3ForCausalLM", "DeepseekV3Config",
     dict(q_lora_rank=None, num_hidden_layers=2, first_k_dense_replace=0, n_group=1, topk_group=1,
          norm_topk_prob=False, rope_interleave=False, rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.7))),
    ("v32-dsa", "DeepseekV32ForCausalLM", "DeepseekV32Config",
     dict(q_lora_rank=24, num_hidden_layers=3, first_k_dense_replace=1, n_group=2, topk_group=1,
          index_topk=5, index_head_dim=16, index_n_heads=16)),
    ("v32-dsa-yarn", "DeepseekV32ForCausalLM", "DeepseekV32Config",
     dict(q_lora_rank=24, num_hidden_layers=2, first_k_dense_replace=0, n_group=1, topk_group=1,
          index_topk=7, index_head_dim=16, index_n_heads=16, rope_parameters=dict(YARN))),
    ("glm5-dsa-shared", "GlmMoeDsaForCausalLM", "GlmMoeDsaConfig",
     dict(q_lora_rank=24, num_hidden_layers=4, first_k_dense_replace=1, n_group=1, topk_group=1,
          index_topk=6, index_head_dim=16, index_n_heads=16, indexer_types=["full", "shared", "full", "shared"],
          rms_norm_eps=1e-5)),
    ("glm5-dsa-all-full-group", "GlmMoeDsaForCausalLM", "GlmMoeDsaConfig",
     dict(q_lora_rank=20, num_hidden_layers=3, first_k_dense_replace=2, n_group=4, topk_group=2,
          routed_scaling_factor=2.5, index_topk=4, index_head_dim=16, index_n_heads=16, rms_norm_eps=1e-5)),
]

T = 16


def make(tmp_path, case):
    name, cls, cfg_cls, over = case
    torch.manual_seed(sum(map(ord, name)))
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **over})
    cfg._experts_implementation = "eager"
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls)(cfg).to(torch.float64).eval()
    with torch.no_grad():   # make every zero / one initialised tensor matter
        for n, p in list(model.named_parameters()) + list(model.named_buffers()):
            if n.endswith(("layernorm.weight", "norm.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif n.endswith(("e_score_correction_bias", "k_norm.bias")):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2:     # unit-scale activations, so every path shows in the logits
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


def load_ours(path):
    return load(path, dtype=torch.float64, progress=False)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity_with_transformers(tmp_path, case):
    hf, path = make(tmp_path, case)
    ours = load_ours(path)
    ours.set_reference("transformers")
    assert ours.exact_fp32
    ids = torch.randint(0, COMMON["vocab_size"], (2, T))
    ref = hf_logits(hf, ids)
    with torch.no_grad():
        out = ours(ids)
        diff = (out - ref).abs().max().item()
        print(f"{case[0]}: max |logits - transformers| = {diff:.2e}")
        assert diff <= 1e-9
        # In float64 every float32 cast of the reference (RMSNorm, softmax...) re-quantises the
        # activations, so naive vs absorbed are compared with those ops in float64.
        ours.exact_fp32 = False
        ours.absorb = False
        naive = ours(ids)
        ours.absorb = True
        absorbed = ours(ids)
        d_abs = (absorbed - naive).abs().max().item()
        print(f"{case[0]}: float64 ops: max |absorbed - naive| = {d_abs:.2e}; "
              f"max |naive - transformers| = {(naive - ref).abs().max():.2e}")
        assert d_abs <= 1e-12


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("absorb", [False, True, None])     # None: absorbed for decode and DSA
def test_prefill_then_decode_equals_full(tmp_path, case, absorb):
    _, path = make(tmp_path, case)
    ours = load_ours(path)
    ours.set_reference("transformers")    # the official V3.2 indexer: test_official_indexer_decode
    ours.exact_fp32 = False       # exact float64 (see deepseek.py's docstring)
    ours.absorb = absorb
    ids = torch.randint(0, COMMON["vocab_size"], (2, T))
    with torch.no_grad():
        full = ours(ids)
        cache = Cache()
        steps = [ours(ids[:, :5], cache)] + [ours(ids[:, t:t + 1], cache) for t in range(5, T)]
        assert cache.length == T
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    print(f"{case[0]} absorb={absorb}: max |prefill+decode - full| = {diff:.2e}")
    assert diff <= 1e-9
    # with the reference's float32 ops, decode differs from the full forward by float32 rounding only
    ours.exact_fp32 = True
    with torch.no_grad():
        full = ours(ids)
        cache = Cache()
        steps = [ours(ids[:, :5], cache)] + [ours(ids[:, t:t + 1], cache) for t in range(5, T)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-4


def test_dsa_selection_matters(tmp_path):
    """top-k smaller than the visible entries really changes the attention (vs dense)."""
    _, path = make(tmp_path, CASES[4])
    ours = load_ours(path)
    ids = torch.randint(0, COMMON["vocab_size"], (1, T))
    with torch.no_grad():
        sparse = ours(ids)
        ours.args.index_topk = 10 ** 6
        dense = ours(ids)
    assert (sparse[:, :5] - dense[:, :5]).abs().max() < 1e-12      # rows with <= top-k visible entries
    assert (sparse - dense).abs().max() > 1e-3


RAGGED = [CASES[1], CASES[2], CASES[4], CASES[6]]       # V2 (complex RoPE), V3, V3.2, GLM-5 IndexShare


@pytest.mark.parametrize("case", RAGGED, ids=[c[0] for c in RAGGED])
def test_ragged_paged_batch(tmp_path, case):
    """Rows of different lengths in one step, blocks scattered over the pools: with float64 ops
    each row equals the model on that row alone (1e-9), and with transformers' float32 ops it
    equals transformers on that row alone up to float32 rounding (a float32 softmax rounds
    differently over rows of different widths, as decode vs full forward does)."""
    from paged import ragged_logits
    hf, path = make(tmp_path, case)
    ours = load_ours(path)
    ours.set_reference("transformers")
    seqs = [list(range(3, 40)), [5, 9, 11, 2, 8, 1, 7], list(range(20, 60))]
    cuts = [[5, 20, 21, 22, 37], [1, 2, 7], [19, 20, 40]]       # step 3 decodes one row alone
    outs = ragged_logits(ours, seqs, cuts)
    with torch.no_grad():
        for s, got in zip(seqs, outs):
            assert (got - hf(torch.tensor([s])).logits[0]).abs().max().item() <= 1e-5
        ours.exact_fp32 = False
        outs = ragged_logits(ours, seqs, cuts)
        for s, got in zip(seqs, outs):
            assert (got - ours(torch.tensor([s]))[0]).abs().max().item() <= 1e-9


@pytest.mark.parametrize("case", [CASES[4], CASES[6]], ids=[CASES[4][0], CASES[6][0]])
def test_dsa_reads_only_topk_latents(tmp_path, case, monkeypatch):
    """A DSA layer gathers [B, T, top-k] latents, and only those: with every latent that no query
    selected replaced by NaN, a decode step is unchanged (top-k 5 / 6 of 16 visible)."""
    _, path = make(tmp_path, case)
    ours = load_ours(path)
    ours.set_reference("transformers")
    ids = torch.randint(0, COMMON["vocab_size"], (2, T))
    layers = ours.model.layers[: ours.args.n_layers]
    tops, shapes = {}, []
    for i, blk in enumerate(layers):
        if blk.self_attn.has_indexer:
            blk.self_attn.indexer.register_forward_hook(lambda m, a, out, i=i: tops.__setitem__(i, out))
    real_gather = deepseek.gather
    monkeypatch.setattr(deepseek, "gather", lambda view, index: shapes.append((view.stream.name, tuple(index.shape)))
                        or real_gather(view, index))
    with torch.no_grad():
        cache = Cache()
        ours(ids[:, :-1], cache)
        poisoned = copy.deepcopy(cache)
        tops.clear()
        shapes.clear()
        clean = ours(ids[:, -1:], cache)
        k = ours.args.index_topk
        assert sorted(set(shapes)) == [("indexer", (2, T)), ("latent", (2, 1, k))]
        top = None
        for i in range(len(layers)):
            top = tops.get(i, top)                                 # IndexShare layers reuse the previous top-k
            assert top.shape == (2, 1, k) and (top >= 0).all()
            pages = poisoned.pools.pages[i, "latent"][:-1]             # without the spare page
            entries = pages.view(2, -1, pages.shape[-1])           # row b: blocks b * capacity...
            keep = torch.zeros(entries.shape[:2], dtype=torch.bool).scatter_(1, top[:, 0], True)
            entries[~keep] = float("nan")
        assert torch.equal(ours(ids[:, -1:], poisoned), clean)


def test_mtp_layer_loads_and_drafts(tmp_path):
    _, path = make(tmp_path, CASES[2])                 # deepseek_v3, 3 layers -> MTP is layer 3
    cfg = json.loads((path / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    cfg["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(path / "model.safetensors"))
    base = load_ours(path)                             # config says 1 MTP layer, checkpoint has none: skipped
    assert base.num_mtp_layers == 0
    with torch.device("meta"):
        shapes = deepseek.build(parse_config(cfg), list(tensors) + [f"model.layers.{n}.embed_tokens.weight",
                                                              f"model.layers.{n}.shared_head.head.weight"]).state_dict()
    g = torch.Generator().manual_seed(0)
    for name, ref in shapes.items():
        if name.startswith(f"model.layers.{n}."):
            t = torch.randn(ref.shape, generator=g, dtype=torch.float64) / (ref.shape[-1] ** 0.5 if ref.dim() > 1 else 1)
            tensors[name] = t if ref.dim() > 1 else 1 + 0.1 * t
    assert f"model.layers.{n}.eh_proj.weight" in tensors and f"model.layers.{n}.mlp.experts.7.up_proj.weight" in tensors
    save_file(tensors, str(path / "model.safetensors"))
    ours = load_ours(path)
    assert ours.num_mtp_layers == 1
    assert tuple(ours.model.layers[n].eh_proj.weight.shape) == (COMMON["hidden_size"], 2 * COMMON["hidden_size"])
    ids = torch.randint(0, COMMON["vocab_size"], (2, T))
    with torch.no_grad():
        logits, draft = ours.forward_with_draft(ids)
        main = base(ids)
    assert draft.shape == (2, T - 1, COMMON["vocab_size"]) and torch.isfinite(draft).all()
    assert (logits - main).abs().max() == 0           # the MTP layer does not touch the main model
    assert (draft - logits[:, 1:]).abs().max() > 1e-3
    # the MTP block caches its own latents (layer n): drafting in chunks equals the full draft
    ours.exact_fp32 = False                            # exact float64 (see deepseek.py's docstring)
    with torch.no_grad():
        _, full = ours.forward_with_draft(ids)
        h = ours.hidden(ids, Cache().step(ours, ids, torch.float64))
        mtp, parts = Cache(), []
        for a, b in ((0, 6), (6, 7), (7, T - 1)):
            parts.append(ours.draft(h[:, a:b], ids[:, a + 1:b + 1], mtp.step(ours, ids[:, a:b], torch.float64)))
            mtp.advance(ids[:, a:b])
    assert (torch.cat(parts, dim=1) - full).abs().max() <= 1e-9


def test_official_names_map_to_hf():
    cases = {
        "embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight", "norm.weight": "model.norm.weight",
        "layers.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "layers.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "layers.0.attn.wq.weight": "model.layers.0.self_attn.q_proj.weight",
        "layers.0.attn.wq_a.weight": "model.layers.0.self_attn.q_a_proj.weight",
        "layers.0.attn.wq_a.scale": "model.layers.0.self_attn.q_a_proj.weight_scale_inv",
        "layers.0.attn.q_norm.weight": "model.layers.0.self_attn.q_a_layernorm.weight",
        "layers.0.attn.wq_b.weight": "model.layers.0.self_attn.q_b_proj.weight",
        "layers.0.attn.wkv_a.weight": "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "layers.0.attn.kv_norm.weight": "model.layers.0.self_attn.kv_a_layernorm.weight",
        "layers.0.attn.wkv_b.weight": "model.layers.0.self_attn.kv_b_proj.weight",
        "layers.0.attn.wo.weight": "model.layers.0.self_attn.o_proj.weight",
        "layers.0.attn.indexer.wq_b.weight": "model.layers.0.self_attn.indexer.wq_b.weight",
        "layers.0.attn.indexer.k_norm.bias": "model.layers.0.self_attn.indexer.k_norm.bias",
        "layers.0.ffn.w1.weight": "model.layers.0.mlp.gate_proj.weight",
        "layers.0.ffn.w2.weight": "model.layers.0.mlp.down_proj.weight",
        "layers.3.ffn.gate.weight": "model.layers.3.mlp.gate.weight",
        "layers.3.ffn.gate.bias": "model.layers.3.mlp.gate.e_score_correction_bias",
        "layers.3.ffn.experts.5.w3.weight": "model.layers.3.mlp.experts.5.up_proj.weight",
        "layers.3.ffn.shared_experts.w1.weight": "model.layers.3.mlp.shared_experts.gate_proj.weight",
        "layers.61.embed.weight": "model.layers.61.embed_tokens.weight",
        "layers.61.shared_head.head.weight": "model.layers.61.shared_head.head.weight",
        "layers.61.shared_head.norm.weight": "model.layers.61.shared_head.norm.weight",
        "layers.61.eh_proj.weight": "model.layers.61.eh_proj.weight",
        "model.layers.0.self_attn.q_a_proj.weight": "model.layers.0.self_attn.q_a_proj.weight",
    }
    for official, hf in cases.items():
        assert deepseek.rename(official) == hf, official


def test_v2_norm_topk_prob_follows_deepseek_code():
    """DeepSeek's V2 code renormalises the top-k weights *instead of* scaling them when
    norm_topk_prob is set; transformers' DeepseekV2 router ignores norm_topk_prob."""
    cfg = {**COMMON, "model_type": "deepseek_v2", "num_hidden_layers": 1, "q_lora_rank": None,
           "norm_topk_prob": True, "routed_scaling_factor": 3.0}
    with torch.device("meta"):
        model = deepseek.build(parse_config(cfg), [])
    gate = model.model.layers[0].mlp.gate
    gate.to_empty(device="cpu")
    torch.nn.init.normal_(gate.weight)
    w, idx = gate(torch.randn(5, COMMON["hidden_size"]))
    assert torch.allclose(w.sum(-1), torch.ones(5))
    model.args.norm_topk_prob = False
    w2, idx2 = gate(torch.randn(5, COMMON["hidden_size"]))
    assert (w2.sum(-1) < 3.0).all() and (w2.sum(-1) > 0).all()


# ------------------------------------------------------------------ official V3.2 indexer
# DeepSeek-V3.2-Exp inference/model.py `Indexer`: RoPE, rotate_activation (Hadamard, d^-0.5),
# act_quant (FP8 e4m3, block 128, ue8m0 scales when scale_fmt is set, else amax / 448), the
# quantised keys cached; transformers has neither. One 128-dim indexer head = one block.
OFFICIAL = ("v32-official", "DeepseekV32ForCausalLM", "DeepseekV32Config",
            dict(q_lora_rank=24, num_hidden_layers=2, first_k_dense_replace=1, n_group=1, topk_group=1,
                 index_topk=5, index_head_dim=128, index_n_heads=16))


def _to_grid(y):
    grid = e4m3_values()
    return grid[(y.unsqueeze(-1) - grid).abs().argmin(-1)]


def _sylvester(d):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h / math.sqrt(d)


@pytest.fixture(scope="module")
def official_model(tmp_path_factory):
    _, path = make(tmp_path_factory.mktemp("official"), OFFICIAL)
    ours = load_ours(path)
    assert ours.reference == "official" and not ours.exact_fp32    # V3.2 default
    return ours


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_official_indexer_caches_fp8_keys(official_model, scale_fmt):
    """(a) cached indexer keys = FP8(e4m3) round trip of Hadamard(rotated keys), one scale per
    128 channels; re-derived here with a dense Sylvester matrix and a hand-built e4m3 grid."""
    ours = official_model
    ours.set_reference("official")
    ours.args.index_scale_fmt = scale_fmt
    layer = 1                                                      # layer 0 is dense-FFN, both have DSA
    idx = ours.model.layers[layer].self_attn.indexer
    seen = {}
    hook = idx.register_forward_pre_hook(lambda m, a: seen.update(x=a[0], rope=a[2]))
    ids = torch.randint(0, COMMON["vocab_size"], (2, T))
    try:
        with torch.no_grad():
            cache = Cache()
            ours(ids, cache)
            R = ours.args.qk_rope
            k = idx.k_norm(idx.wk(seen["x"])).unsqueeze(2)
            k = torch.cat([deepseek.apply_rope(k[..., :R], seen["rope"], "half"), k[..., R:]], -1).squeeze(2)
    finally:
        hook.remove()
        ours.args.index_scale_fmt = None
    pages = cache.pools.pages[layer, "indexer"][:-1]               # row b holds blocks b * capacity...
    cached = pages.view(2, -1, pages.shape[-1])[:, :cache.length]  # [B, T, 128]
    assert cached.shape == (2, T, 128) and cached.dtype == torch.float64
    rotated = k @ _sylvester(128).T
    amax = rotated.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    scale = 2.0 ** torch.ceil(torch.log2(amax / 448)) if scale_fmt else amax / 448
    want = _to_grid((rotated / scale).clamp(-448, 448)) * scale
    assert (cached - want).abs().max() <= 1e-12 * amax.max()
    # on the grid: with power-of-two scales exactly, with amax / 448 up to float64 rounding
    s = cached.abs().amax(-1, keepdim=True) / 448
    if scale_fmt:
        s = 2.0 ** torch.ceil(torch.log2(s))
        assert torch.equal(_to_grid(cached / s) * s, cached)
        assert ((cached.abs().amax(-1) / s.squeeze(-1)) > 224).all()   # the smallest power of two
    else:
        assert torch.allclose(cached.abs().amax(-1), torch.full_like(s.squeeze(-1), 448) * s.squeeze(-1), rtol=0, atol=0)
        assert ((cached / s - _to_grid(cached / s)).abs() <= 1e-12 * 448).all()
    assert not torch.equal(_to_grid(k / (k.abs().amax(-1, keepdim=True) / 448)) * k.abs().amax(-1, keepdim=True) / 448,
                           cached)                                  # not the unrotated keys


def test_official_indexer_differs_from_transformers(official_model, monkeypatch):
    """(b) the official and transformers indexers choose different top-k sets on some input;
    both give finite logits. With the quantisation and rotation replaced by identities the
    official path equals transformers' (it only folds d^-0.5 into the weights)."""
    ours = official_model
    sel = {}
    idx = ours.model.layers[0].self_attn.indexer

    def record(module, args, out):       # first selection per reference; returns None (keeps `out`)
        sel.setdefault(ours.reference, out)

    hook = idx.register_forward_hook(record)
    ids = torch.randint(0, COMMON["vocab_size"], (4, 2 * T), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            ours.set_reference("transformers", exact_fp32=False)
            tf = ours(ids)
            ours.set_reference("official")
            off = ours(ids)
            monkeypatch.setattr(deepseek, "fake_quant", lambda x, *a, **k: x)
            monkeypatch.setattr(deepseek, "hadamard", lambda x: x)
            same = ours(ids)
    finally:
        hook.remove()
    assert torch.isfinite(tf).all() and torch.isfinite(off).all()
    changed = (sel["official"] != sel["transformers"]).any(-1)     # [B, T] rows whose top-k set differs
    print(f"official vs transformers: {int(changed.sum())}/{changed.numel()} indexer rows select differently; "
          f"max |dlogits| = {(off - tf).abs().max():.2e}")
    assert changed.any()
    assert (off - tf).abs().max() > 1e-6
    assert (same - tf).abs().max() <= 1e-12


def test_official_indexer_decode_equals_full(official_model):
    """(c) prefill + token-by-token decode == full forward with the official indexer (ue8m0
    scales, as the shipped V3.2 config; the amax / 448 path is per-token in the same way)."""
    ours = official_model
    scale_fmt = "ue8m0"
    ours.set_reference("official", exact_fp32=False)
    ours.args.index_scale_fmt = scale_fmt
    ids = torch.randint(0, COMMON["vocab_size"], (2, T))
    try:
        with torch.no_grad():
            full = ours(ids)
            cache = Cache()
            steps = [ours(ids[:, :5], cache)] + [ours(ids[:, t:t + 1], cache) for t in range(5, T)]
    finally:
        ours.args.index_scale_fmt = None
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    print(f"official indexer, scale_fmt={scale_fmt}: max |prefill+decode - full| = {diff:.2e}")
    assert diff <= 1e-9


def test_reference_defaults_and_glm_stays_transformers(tmp_path):
    """V3.2 defaults to the official indexer, GLM-5 (no DeepSeek official code) to transformers,
    and "official" leaves GLM-5 unchanged; scale_fmt is read from quantization_config."""
    with pytest.raises(ValueError):
        deepseek.DeepseekForCausalLM.set_reference(None, "vllm")
    _, path = make(tmp_path, CASES[6])
    glm = load_ours(path)
    assert glm.reference == "transformers" and glm.exact_fp32 and not glm.args.official_indexer
    ids = torch.randint(0, COMMON["vocab_size"], (1, T))
    with torch.no_grad():
        tf = glm(ids)
        glm.set_reference("official", exact_fp32=True)
        assert not glm.args.official_indexer
        assert torch.equal(glm(ids), tf)
    cfg = {**COMMON, "model_type": "deepseek_v32", "num_hidden_layers": 1, "q_lora_rank": 24,
           "index_topk": 4, "index_head_dim": 16, "index_n_heads": 2,
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                   "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    args = deepseek.make_args(parse_config(cfg))
    assert args.index_scale_fmt == "ue8m0" and args.reference == "official" and args.official_indexer
