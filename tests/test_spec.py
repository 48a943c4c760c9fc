"""Registry entries parse, round-trip through config.json files, and match published sizes."""

import json
import math
from dataclasses import replace

import pytest

from tierlm.errors import ConfigError
from tierlm.plan.memory import active_params, weights
from tierlm.spec import entries, load_spec, parse_config, resolve
from tierlm.spec.model import RopeConfig, RouterConfig
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


# ---------------------------------------------------------------------------- typed numerics
def _registry(model_id, **changes):
    """A registry config (its text_config for wrappers) with keys replaced (None: deleted)."""
    cfg = json.loads(json.dumps(entries()[model_id].config))
    inner = cfg["text_config"] if "text_config" in cfg else cfg
    for k, v in changes.items():
        if v is None:
            inner.pop(k, None)
        else:
            inner[k] = v
    return cfg


def test_typed_numerics_of_registry_models():
    """What the family code reads comes from the config, typed: eps, RoPE, router, extras."""
    llama = load_spec("meta-llama/Llama-3.1-8B-Instruct")
    assert llama.norm_eps == 1e-5
    assert (llama.rope.kind, llama.rope.theta, llama.rope.factor, llama.rope.original_max_position,
            llama.rope.dim) == ("llama3", 500000.0, 8.0, 8192, 128)
    oss = load_spec("openai/gpt-oss-20b")
    assert (oss.rope.kind, oss.rope.truncate, oss.moe.swiglu_limit, oss.moe.swiglu_alpha) == ("yarn", False, 7.0, 1.702)
    assert oss.rope.attention_factor == 0.1 * math.log(32.0) + 1.0          # yarn's mscale(factor)
    v3 = load_spec("deepseek-ai/DeepSeek-V3").moe.router
    assert (v3.scoring, v3.scale, v3.norm_topk_prob, v3.group_limited, v3.n_group, v3.topk_group) == \
        ("sigmoid", 2.5, True, True, 8, 4)
    v4 = load_spec("deepseek-ai/DeepSeek-V4-Flash")
    assert (v4.rope.kind, v4.rope.theta, v4.rope.interleave) == ("default", 10000.0, True)
    c = v4.v4.compress_rope
    assert (c.kind, c.theta, c.factor, c.original_max_position, c.attention_factor) == ("yarn", 160000.0, 16.0, 65536, 1.0)
    assert (v4.v4.hc_eps, v4.v4.hc_sinkhorn_iters, v4.moe.swiglu_limit, v4.quant.scale_fmt) == (1e-6, 20, 10.0, "ue8m0")
    gemma = load_spec("google/gemma-3-27b-it")
    assert (gemma.rope.kind, gemma.rope.factor, gemma.rope.theta, gemma.gemma.sliding_rope.theta) == \
        ("linear", 8.0, 1e6, 1e4)
    assert gemma.gemma.query_pre_attn_scalar == 168.0 and gemma.gemma.final_logit_softcapping is None
    assert load_spec("MiniMaxAI/MiniMax-M2").rope.dim == 64                # legacy rotary_dim, head_dim 128


@pytest.mark.parametrize("model_id,deleted,read", [
    # transformers 5.23.0 config class defaults (configuration_<family>.py)
    ("mistralai/Mixtral-8x7B-v0.1", ("rope_theta", "rms_norm_eps"), lambda s: (s.rope.theta, s.norm_eps) == (1e6, 1e-5)),
    ("openai/gpt-oss-20b", ("rope_theta", "rope_scaling", "swiglu_limit", "rms_norm_eps"),
     lambda s: (s.rope.theta, s.rope.kind, s.moe.swiglu_limit, s.norm_eps) == (150000.0, "default", 7.0, 1e-5)),
    ("MiniMaxAI/MiniMax-M2", ("rope_theta", "rotary_dim"), lambda s: (s.rope.theta, s.rope.dim) == (5e6, 128)),
    ("Qwen/Qwen3-8B", ("rope_theta", "rms_norm_eps"), lambda s: (s.rope.theta, s.norm_eps) == (10000.0, 1e-6)),
    ("deepseek-ai/DeepSeek-V2-Lite", ("scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor"),
     lambda s: s.moe.router == RouterConfig("softmax", 1.0, False, False, 1, 1)),
    ("deepseek-ai/DeepSeek-V3", ("scoring_func", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob"),
     lambda s: s.moe.router == RouterConfig("sigmoid", 2.5, True, True, 8, 4)),
    ("deepseek-ai/DeepSeek-V3", ("rope_scaling",), lambda s: s.rope == RopeConfig(10000.0, 64, interleave=True)),
    ("zai-org/GLM-5", ("rms_norm_eps", "n_group", "topk_group"),
     lambda s: (s.norm_eps, s.moe.router.n_group, s.moe.router.topk_group) == (1e-5, 1, 1)),
    ("deepseek-ai/DeepSeek-V4-Pro", ("scoring_func", "routed_scaling_factor", "swiglu_limit", "hc_eps",
                                     "hc_sinkhorn_iters", "compress_rope_theta", "rope_scaling"),
     lambda s: (s.moe.router.scoring, s.moe.router.scale, s.moe.swiglu_limit, s.v4.hc_eps, s.v4.hc_sinkhorn_iters,
                s.v4.compress_rope) == ("sqrtsoftplus", 1.5, 10.0, 1e-6, 20, RopeConfig(160000.0, 64, interleave=True))),
    ("google/gemma-3-27b-it", ("rope_scaling", "query_pre_attn_scalar"),
     lambda s: (s.rope, s.gemma.query_pre_attn_scalar) == (RopeConfig(1e6, 128), 256.0)),
])
def test_family_defaults(model_id, deleted, read):
    spec = parse_config(_registry(model_id, **dict.fromkeys(deleted)), model_id)
    assert read(spec), spec


def test_official_deepseek_defaults_and_v4_yarn():
    """Official (ModelArgs) configs: V3's router defaults are ModelArgs' (softmax, scale 1, no
    groups), and V4's original_seq_len / rope_factor / beta_* are the compressed layers' YaRN."""
    v3 = {"vocab_size": 1000, "dim": 64, "inter_dim": 128, "moe_inter_dim": 32, "n_layers": 2, "n_heads": 4,
          "n_routed_experts": 8, "n_activated_experts": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
          "qk_rope_head_dim": 8, "v_head_dim": 8, "max_seq_len": 4096}
    assert parse_config(v3).moe.router == RouterConfig("softmax", 1.0, True, True, 1, 1)
    v4 = dict(entries()["deepseek-ai/DeepSeek-V4-Flash"].config)
    official = {"dim": v4["hidden_size"], "n_layers": v4["num_hidden_layers"], "n_heads": v4["num_attention_heads"],
                "head_dim": v4["head_dim"], "rope_head_dim": 64, "q_lora_rank": v4["q_lora_rank"],
                "o_groups": v4["o_groups"], "o_lora_rank": v4["o_lora_rank"], "window_size": 128,
                "vocab_size": v4["vocab_size"], "moe_inter_dim": v4["moe_intermediate_size"],
                "n_routed_experts": v4["n_routed_experts"], "n_shared_experts": 1, "n_activated_experts": 6,
                "n_hash_layers": 3, "hc_mult": 4, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
                "compress_ratios": v4["compress_ratios"], "compress_rope_theta": 160000.0,
                "original_seq_len": 65536, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1}
    spec = parse_config(official)
    assert spec.max_position == 65536 * 16
    assert spec.v4.compress_rope == load_spec("deepseek-ai/DeepSeek-V4-Flash").v4.compress_rope
    del official["original_seq_len"]
    official["max_seq_len"] = 4096
    assert parse_config(official).v4.compress_rope.kind == "default"


@pytest.mark.parametrize("model_id,changes,field", [
    ("Qwen/Qwen3-8B", dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    ("Qwen/Qwen3-8B", dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
    ("Qwen/Qwen3-8B", dict(rms_norm_eps="1e-6"), "rms_norm_eps"),
    ("Qwen/Qwen3-8B", dict(rope_theta=0), "rope_theta"),
    ("Qwen/Qwen3-8B", dict(rope_theta=float("inf")), "rope_theta"),
    ("Qwen/Qwen3-8B", dict(rope_scaling={"rope_type": "bogus", "factor": 2.0}), "rope_type"),
    ("Qwen/Qwen3-8B", dict(rope_scaling={"rope_type": "linear"}), "rope_scaling.factor"),
    ("Qwen/Qwen3-8B", dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "fator": 3.0}), "rope_scaling.fator"),
    ("Qwen/Qwen3-8B", dict(rope_scaling="yarn"), "rope_scaling"),
    ("meta-llama/Llama-3.1-8B-Instruct", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    ("openai/gpt-oss-20b", dict(swiglu_limit=-7.0), "swiglu_limit"),
    ("openai/gpt-oss-20b", dict(rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 0}), "beta_fast"),
    ("MiniMaxAI/MiniMax-M2", dict(scoring_func="softmax"), "scoring_func"),
    ("MiniMaxAI/MiniMax-M2", dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    ("MiniMaxAI/MiniMax-M2", dict(rotary_dim=1), "rotary_dim"),
    ("deepseek-ai/DeepSeek-V3", dict(scoring_func="tanh"), "scoring_func"),
    ("deepseek-ai/DeepSeek-V3", dict(topk_method="greedy"), "topk_method"),
    ("deepseek-ai/DeepSeek-V3", dict(n_group=7), "n_group"),
    ("deepseek-ai/DeepSeek-V3", dict(topk_group=9), "topk_group"),
    ("deepseek-ai/DeepSeek-V3", dict(routed_scaling_factor=True), "routed_scaling_factor"),
    ("deepseek-ai/DeepSeek-V3", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type"),
    ("deepseek-ai/DeepSeek-V2-Lite", dict(topk_method="random"), "topk_method"),
    ("zai-org/GLM-5", dict(rope_interleave=False), "rope_interleave"),
    ("deepseek-ai/DeepSeek-V4-Flash", dict(hc_sinkhorn_iters=0), "hc_sinkhorn_iters"),
    ("deepseek-ai/DeepSeek-V4-Flash", dict(hc_eps=float("nan")), "hc_eps"),
    ("deepseek-ai/DeepSeek-V4-Flash", dict(scoring_func="relu"), "scoring_func"),
    ("deepseek-ai/DeepSeek-V4-Flash", dict(compress_rope_theta=-1), "compress_rope_theta"),
    ("google/gemma-3-27b-it", dict(hidden_activation="relu"), "hidden_activation"),
    ("google/gemma-3-27b-it", dict(final_logit_softcapping=0), "final_logit_softcapping"),
    ("google/gemma-3-27b-it", dict(rope_parameters={"rope_type": "default"}), "rope_parameters.rope_type"),
])
def test_bad_numeric_fields_are_one_line_errors(model_id, changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as e:
        parse_config(_registry(model_id, **changes), model_id)
    assert "\n" not in str(e.value)


def test_bad_scale_fmt_is_named():
    cfg = _registry("deepseek-ai/DeepSeek-V3.2")
    cfg["quantization_config"]["scale_fmt"] = "e8m0"
    with pytest.raises(ConfigError, match=r"quantization_config\.scale_fmt"):
        parse_config(cfg)


def test_typed_fields_are_hashable_and_compared():
    """Specs key the planner's caches: the new fields hash, and a RoPE or eps change makes a
    different spec."""
    a = load_spec("deepseek-ai/DeepSeek-V4-Flash")
    b = parse_config(_registry("deepseek-ai/DeepSeek-V4-Flash"), "deepseek-ai/DeepSeek-V4-Flash")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    for changes in (dict(rms_norm_eps=1e-5), dict(compress_rope_theta=1e5), dict(swiglu_limit=3.0)):
        c = parse_config(_registry("deepseek-ai/DeepSeek-V4-Flash", **changes), "deepseek-ai/DeepSeek-V4-Flash")
        assert c != a
    hash(load_spec("google/gemma-3-27b-it"))
