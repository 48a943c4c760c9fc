"""Registry entries parse, round-trip through config.json files, and match published sizes."""

import json
from dataclasses import replace

import pytest

from tierlm.errors import ConfigError
from tierlm.plan.memory import active_params, weights
from tierlm.spec import entries, load_spec, parse_config, resolve
from tierlm.spec.params import engram_table_rows

ALL = sorted(entries())
REQUIRED = {"deepseek-ai/DeepSeek-V4-Pro", "deepseek-ai/DeepSeek-V4-Flash", "deepseek-ai/DeepSeek-V3.2",
            "deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1", "deepseek-ai/DeepSeek-V2-Lite", "zai-org/GLM-5",
            "moonshotai/Kimi-K2.5", "Qwen/Qwen3-235B-A22B", "Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-32B", "Qwen/Qwen3-8B",
            "Qwen/Qwen3-0.6B", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct",
            "meta-llama/Llama-3.1-405B-Instruct", "openai/gpt-oss-120b", "openai/gpt-oss-20b",
            "mistralai/Mistral-7B-v0.1", "mistralai/Mixtral-8x7B-v0.1", "google/gemma-3-27b-it",
            "MiniMaxAI/MiniMax-M2"}


def test_registry_is_complete():
    assert REQUIRED <= set(ALL)


@pytest.mark.parametrize("model_id", ALL)
def test_entry_parses_and_round_trips(model_id, tmp_path):
    e = entries()[model_id]
    assert e.source.get("url") and e.source.get("date_read") and e.source.get("read_from")
    spec = load_spec(model_id)
    for alias in e.aliases:
        assert resolve(alias).id == model_id
    # Round trip: the same config written as a config.json (file and directory) parses to the same spec.
    (tmp_path / "config.json").write_text(json.dumps(e.config))
    assert replace(load_spec(str(tmp_path)), name=model_id) == spec
    assert replace(load_spec(str(tmp_path / "config.json")), name=model_id) == spec
    assert parse_config(json.loads(json.dumps(e.config)), model_id) == spec


def _params_b(model_id):
    spec = load_spec(model_id)
    return sum(c.params for c in weights(spec, mtp=False).values()) / 1e9, active_params(spec) / 1e9


@pytest.mark.parametrize("model_id,total_b,active_b", [
    # Published totals (model cards / READMEs, see each registry file's "published" source).
    ("deepseek-ai/DeepSeek-V3", 671, 37),
    ("deepseek-ai/DeepSeek-V4-Flash", 284, 13),
    ("deepseek-ai/DeepSeek-V4-Pro", 1600, 49),
    ("zai-org/GLM-5", 744, 40),
    ("Qwen/Qwen3-235B-A22B", 235, 22),
    ("Qwen/Qwen3-30B-A3B", 30.5, 3.3),
    ("openai/gpt-oss-120b", 117, 5.1),
    ("openai/gpt-oss-20b", 21, 3.6),
    ("mistralai/Mixtral-8x7B-v0.1", 46.7, 12.9),
    ("meta-llama/Llama-3.1-70B-Instruct", 70.6, 70.6),
    ("deepseek-ai/DeepSeek-V2-Lite", 15.7, 2.4),
])
def test_parameter_counts_match_published(model_id, total_b, active_b):
    total, active = _params_b(model_id)
    assert abs(total - total_b) / total_b < 0.03, total
    # Active excludes the input embedding (a lookup, not a matmul), as OpenAI's gpt-oss counts
    # do; Qwen's published "activated" includes it (3.3B vs 3.04B here), hence 10 %.
    assert abs(active - active_b) / active_b < 0.10, active


def test_v3_mtp_module_is_14b():
    # DeepSeek-V3 README: 671B main model + 14B MTP module = 685B on the Hub.
    spec = load_spec("deepseek-ai/DeepSeek-V3")
    w = weights(spec, mtp=True)
    assert 13 < w["mtp"].params / 1e9 < 14.5
    assert abs(sum(c.params for c in w.values()) / 1e9 - 685) < 1


def test_fp8_block_scales_are_counted():
    spec = load_spec("deepseek-ai/DeepSeek-V3")
    w = weights(spec, mtp=False)
    experts = w["routed_experts"]
    # fp8 experts (weight_block_size [128, 128]): 1 byte per element plus one fp32 scale_inv per
    # 128x128 block of each of gate [2048, 7168], up [2048, 7168] and down [7168, 2048]: 16*56 blocks each.
    per_expert = 3 * 2048 * 7168 + 3 * (16 * 56) * 4
    assert experts.bytes == per_expert * 256 * 58


def test_official_deepseek_config_equals_hf():
    # deepseek-ai/DeepSeek-V3 inference/configs/config_671B.json (official ModelArgs names).
    official = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
                "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
                "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}
    a = parse_config(official, "official")
    b = load_spec("deepseek-ai/DeepSeek-V3")
    assert a.layers == b.layers and a.mla == b.mla and a.moe == b.moe
    assert a.max_position == b.max_position == 163840
    assert a.quant == b.quant
    assert any("4096 x 40" in n for n in a.notes)


def test_v4_transformers_layer_types_equal_compress_ratios():
    cfg = dict(entries()["deepseek-ai/DeepSeek-V4-Flash"].config)
    names = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    ratios = cfg.pop("compress_ratios")
    cfg["layer_types"] = [names[r] for r in ratios[: cfg["num_hidden_layers"]]]
    a = parse_config(cfg, "x")
    b = load_spec("deepseek-ai/DeepSeek-V4-Flash")
    assert a.layers == b.layers


@pytest.mark.parametrize("mutate,field", [
    (lambda c: c.pop("kv_lora_rank"), "kv_lora_rank"),
    (lambda c: c.update(num_experts_per_tok=300), "num_experts_per_tok"),
    (lambda c: c.update(first_k_dense_replace=99), "first_k_dense_replace"),
    (lambda c: c.update(hidden_size="7168"), "hidden_size"),
    (lambda c: c.update(hidden_size=True), "hidden_size"),
    (lambda c: c.update(model_type="deepseek_v9"), "deepseek_v9"),
    (lambda c: c.update(surprise_field=1), "surprise_field"),
])
def test_bad_configs_name_the_field(mutate, field):
    cfg = json.loads(json.dumps(entries()["deepseek-ai/DeepSeek-V3"].config))
    mutate(cfg)
    with pytest.raises(ConfigError, match=field):
        parse_config(cfg)


def test_unknown_fields_can_be_allowed():
    cfg = dict(entries()["Qwen/Qwen3-8B"].config, surprise_field=1)
    assert parse_config(cfg, allow_unknown=True).num_layers == 36


def test_v4_contradictions():
    cfg = dict(entries()["deepseek-ai/DeepSeek-V4-Flash"].config)
    with pytest.raises(ConfigError, match="compress_ratios"):
        parse_config(dict(cfg, compress_ratios=[4] * 10))
    with pytest.raises(ConfigError, match=r"compress_ratios\[0\]"):
        parse_config(dict(cfg, compress_ratios=[-4] + cfg["compress_ratios"][1:]))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        parse_config(dict(cfg, num_key_value_heads=8))


def test_engram_primes_match_the_demo():
    # Engram demo (engram_demo_v1.py): vocab 129280*5 per order, 8 heads, layers [1, 15];
    # module_specs.md §5.3: layer 1 primes start at 646403, 646411, 646421; about 10.34M rows per layer.
    rows = engram_table_rows((1, 15), (646400, 646400), 8)
    assert len(rows) == 2 and all(10.3e6 < r < 10.4e6 for r in rows)
    cfg = dict(entries()["Qwen/Qwen3-0.6B"].config)
    cfg["engram_config"] = {"engram_vocab_size": [646400, 646400], "max_ngram_size": 3, "n_embed_per_ngram": 512,
                            "n_head_per_ngram": 8, "layer_ids": [1, 15], "pad_id": 2, "seed": 0, "kernel_size": 4}
    spec = parse_config(cfg)
    w = weights(spec)
    # 16 heads x 64 dims per row: about 662M table parameters per layer (module_specs.md §5.3).
    tables = sum(rows) * 64
    assert w["engram"].params > tables
    assert abs(tables / 2 - 662e6) / 662e6 < 0.01
