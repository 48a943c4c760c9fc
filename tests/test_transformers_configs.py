"""Configs saved by transformers==5.23.0 parse, and tierlm's parameter inventory matches the
tensors transformers writes, tensor for tensor in count: the reference implementations are
the oracle for ParamSpec."""

import json

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from tierlm.plan.memory import cache_bytes, weights  # noqa: E402
from tierlm.spec import load_spec  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, max_position_embeddings=4096)


def _cases():
    t = transformers
    moe_ds = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                  first_k_dense_replace=1, intermediate_size=48, n_group=1, topk_group=1)
    mla = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=12)
    return {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, dict(num_key_value_heads=2, intermediate_size=48, num_hidden_layers=2)),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, dict(num_key_value_heads=2, intermediate_size=48,
                                                                num_hidden_layers=2, sliding_window=16)),
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM, dict(num_key_value_heads=2, intermediate_size=16, num_hidden_layers=2,
                                                                num_local_experts=4, num_experts_per_tok=2)),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=8, intermediate_size=48, num_hidden_layers=2)),
        "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM, dict(num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                                                   moe_intermediate_size=16, num_hidden_layers=3, num_experts=4,
                                                                   num_experts_per_tok=2, mlp_only_layers=[1])),
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM, dict(num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                                                num_hidden_layers=7, sliding_window=16)),
        "gpt_oss": (t.GptOssConfig, t.GptOssForCausalLM, dict(num_key_value_heads=2, head_dim=8, intermediate_size=16,
                                                             num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                                             sliding_window=16)),
        "minimax_m2": (t.MiniMaxM2Config, t.MiniMaxM2ForCausalLM, dict(num_key_value_heads=2, head_dim=8, intermediate_size=16,
                                                                      num_hidden_layers=2, num_local_experts=4,
                                                                      num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)),
        "deepseek_v2": (t.DeepseekV2Config, t.DeepseekV2ForCausalLM, dict(num_hidden_layers=3, **dict(mla, q_lora_rank=None), **moe_ds)),
        "deepseek_v3": (t.DeepseekV3Config, t.DeepseekV3ForCausalLM, dict(num_hidden_layers=3, **mla, **moe_ds)),
        "deepseek_v32": (t.DeepseekV32Config, t.DeepseekV32ForCausalLM, dict(num_hidden_layers=3, index_n_heads=2, index_head_dim=8,
                                                                            index_topk=4, **mla, **moe_ds)),
        "glm_moe_dsa": (t.GlmMoeDsaConfig, t.GlmMoeDsaForCausalLM, dict(num_hidden_layers=3, index_n_heads=2, index_head_dim=8,
                                                                       index_topk=4, **mla, **moe_ds)),
        "glm_moe_dsa_indexshare": (t.GlmMoeDsaConfig, t.GlmMoeDsaForCausalLM, dict(
            num_hidden_layers=4, index_n_heads=2, index_head_dim=8, index_topk=4, index_topk_pattern="FSFS", **mla, **moe_ds)),
        "deepseek_v4": (t.DeepseekV4Config, t.DeepseekV4ForCausalLM, dict(
            num_hidden_layers=4, head_dim=16, q_lora_rank=16, o_groups=2, o_lora_rank=8, n_routed_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=16, sliding_window=4, index_n_heads=2, index_head_dim=8,
            index_topk=2, hc_mult=2, partial_rotary_factor=0.25,
            layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                         "compressed_sparse_attention"],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8})),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, (cfg_cls, model_cls, kw) in CASES.items():
        cfg = cfg_cls(**{**SMALL, **kw})
        torch.manual_seed(0)
        model = model_cls(cfg)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (d, cfg)
    return out


def _checkpoint_numel(d):
    total = 0
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n = 1
            for s in f.get_slice(k).get_shape():
                n *= s
            total += n
    return total


@pytest.mark.parametrize("name", sorted(CASES))
def test_saved_config_parses_and_param_count_matches(saved, name):
    d, cfg = saved[name]
    spec = load_spec(str(d))
    assert spec.num_layers == cfg.num_hidden_layers
    # transformers does not instantiate MTP layers, so compare without them.
    ours = sum(c.params for c in weights(spec, mtp=False).values())
    assert ours == _checkpoint_numel(d), json.loads((d / "config.json").read_text())["model_type"]


def test_indexshare_layers_cache_no_indexer_keys(saved):
    # GLM-5.x IndexShare: "shared" layers reuse the previous top-k, so they store only the
    # 16 + 4 latent (bf16), while "full" layers add an 8-wide indexer key.
    d, cfg = saved["glm_moe_dsa_indexshare"]
    spec = load_spec(str(d))
    assert [l.shared_indexer for l in spec.layers] == [t == "shared" for t in cfg.indexer_types]
    c = cache_bytes(spec, 10, 1, "bf16", "bf16")
    assert [x.indexer_bytes for x in c] == [10 * 8 * 2, 0, 10 * 8 * 2, 0]
    assert all(x.kv_bytes == 10 * 20 * 2 for x in c)


def test_layer_kinds_follow_transformers(saved):
    d, cfg = saved["gemma3"]
    spec = load_spec(str(d))
    assert [l.attention for l in spec.layers] == ["sliding" if t == "sliding_attention" else "full"
                                                   for t in cfg.layer_types]
    d, cfg = saved["deepseek_v4"]
    spec = load_spec(str(d))
    assert [(l.compress_ratio, l.csa) for l in spec.layers] == [(0, False), (4, True), (8, False), (4, True)]
    assert [l.ffn for l in spec.layers] == cfg.mlp_layer_types
    # Cache of the HCA layer with ratio 8 at 20 tokens: window min(20, 4) + floor(20/8) entries of 16.
    c = cache_bytes(spec, 20, 1, "bf16", "bf16")
    assert c[2].kv_bytes == (4 + 20 // 8) * 16 * 2
