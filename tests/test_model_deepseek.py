"""Parity of tierlm's DeepSeek family (deepseek.py) with transformers 5.23 in float64.

Tiny random configurations of DeepseekV2/V3/V32 and GlmMoeDsa; each is saved with
save_pretrained, loaded with tierlm.model.load and compared logit by logit.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from tierlm.model import Cache, load  # noqa: E402
from tierlm.model.families import deepseek  # noqa: E402
from tierlm.spec.config import parse_config  # noqa: E402

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
        naive = ours(ids)
        ours.absorb = True
        absorbed = ours(ids)
        d_abs = (absorbed - naive).abs().max().item()
        print(f"{case[0]}: float64 ops: max |absorbed - naive| = {d_abs:.2e}; "
              f"max |naive - transformers| = {(naive - ref).abs().max():.2e}")
        assert d_abs <= 1e-12


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("absorb", [False, True])
def test_prefill_then_decode_equals_full(tmp_path, case, absorb):
    _, path = make(tmp_path, case)
    ours = load_ours(path)
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
