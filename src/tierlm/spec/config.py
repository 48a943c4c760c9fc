"""config.json -> ModelSpec, strictly.

Accepts Hugging Face configs (transformers key names) and DeepSeek's official inference
configs (`dim`, `n_layers`, ...). A missing field, a wrong type, an unknown field or two
fields that contradict each other raise `ConfigError` naming the field. Where a value may
be absent, the default is the one the transformers config class documents for that
family (listed in docs/planner.md), never a guess.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .fields import METADATA_KEYS, Fields
from .model import (EngramConfig, GQAConfig, IndexerConfig, LayerSpec, MLAConfig, ModelSpec,
                    MoEConfig, Quantization, V4Config)

GQA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "mixtral", "qwen3_moe",
                "gpt_oss", "minimax_m2")
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32", "glm_moe_dsa")
FAMILIES = GQA_FAMILIES + MLA_FAMILIES + ("deepseek_v4",)
# Multimodal wrappers whose language model sits under `text_config`.
WRAPPERS = {"gemma3": "gemma3_text", "kimi_k25": "deepseek_v3"}
# Keys of those wrappers outside text_config (vision tower and multimodal token ids).
WRAPPER_KEYS = frozenset({"text_config", "vision_config", "quantization_config", "tie_word_embeddings",
                          "boi_token_index", "eoi_token_index", "image_token_index", "mm_tokens_per_image",
                          "ignore_index", "media_placeholder_token_id", "use_unified_vision_chunk",
                          "video_placeholder"})

# DeepSeek's official inference configs (inference/configs/*.json, inference/config.json)
# use ModelArgs names; map them onto the transformers names.
OFFICIAL_KEYS = {
    "dim": "hidden_size", "inter_dim": "intermediate_size", "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers", "n_dense_layers": "first_k_dense_replace",
    "n_heads": "num_attention_heads", "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group", "n_limited_groups": "topk_group",
    "route_scale": "routed_scaling_factor", "score_func": "scoring_func",
    "rope_head_dim": "qk_rope_head_dim", "window_size": "sliding_window",
    "n_hash_layers": "num_hash_layers", "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings", "n_mtp_layers": "num_nextn_predict_layers",
}
OFFICIAL_IGNORED = ("original_seq_len", "rope_factor", "beta_fast", "beta_slow", "mscale",
                    "max_batch_size", "scale_fmt", "expert_dtype", "dtype")

# Sparse configs (e.g. gemma-3-*-it's text_config) omit fields equal to the class
# default; these are the defaults of transformers' Gemma3TextConfig (v5.23.0).
CLASS_DEFAULTS = {"gemma3_text": {"vocab_size": 262208, "max_position_embeddings": 131072,
                                  "sliding_window_pattern": 6}}

MAX_LAYERS = 4096     # the deepest model in the registry has 126
MAX_MTP_LAYERS = 16

DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "bf16": "bf16",
               "fp16": "fp16", "fp32": "fp32", "float8_e4m3fn": "fp8", "fp8": "fp8"}


def load_config_file(path: str | Path) -> dict:
    """Read a config.json (or the config.json inside a checkpoint directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"no config.json at {path}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{p}: JSON nested too deeply") from None


def parse_config(cfg: Any, name: str = "custom", allow_unknown: bool = False) -> ModelSpec:
    """Build a ModelSpec from a config dict (HF or official DeepSeek layout)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"config must be a JSON object, got {type(cfg).__name__}")
    cfg = dict(cfg)
    model_type = cfg.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigError(f"field 'model_type' must be a string, got {model_type!r}")
    outer_quant = None
    notes = []
    if model_type in WRAPPERS or (model_type is None and "text_config" in cfg):
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"missing field 'text_config' for model_type '{model_type}'")
        outer_quant = cfg.get("quantization_config")
        inner = dict(text)
        inner.setdefault("model_type", WRAPPERS.get(model_type, None))
        if outer_quant is not None:
            inner.setdefault("quantization_config", outer_quant)
        for key in ("tie_word_embeddings", "torch_dtype", "dtype"):
            if key in cfg and key not in inner:
                inner[key] = cfg[key]
        unknown = sorted(k for k in cfg if k not in WRAPPER_KEYS and k not in METADATA_KEYS)
        if unknown and not allow_unknown:
            raise ConfigError(f"unknown field '{unknown[0]}' for model_type '{model_type}'; pass "
                              "allow_unknown=True / --allow-unknown-fields to ignore it")
        if "vision_config" in cfg:
            notes.append("vision tower (vision_config) weights are not counted; the plan covers the language model")
        cfg = inner
        model_type = cfg.get("model_type")
        if model_type is None:
            raise ConfigError("missing field 'text_config.model_type'")
    official = False
    if model_type is None:
        if "dim" in cfg and "n_layers" in cfg:
            if "max_seq_len" not in cfg and ("original_seq_len" not in cfg or "rope_factor" not in cfg):
                notes.append("max_position_embeddings = original_seq_len x rope_factor with DeepSeek ModelArgs "
                             "defaults (4096 x 40) where the file omits them")
            cfg, model_type = _from_official(cfg)
            official = True
        else:
            raise ConfigError("missing field 'model_type' (and not a DeepSeek official config with 'dim' and 'n_layers')")
    if not isinstance(model_type, str):
        raise ConfigError(f"field 'model_type' must be a string, got {model_type!r}")
    if model_type not in FAMILIES:
        raise ConfigError(f"unknown model_type '{model_type}' (supported: {', '.join(FAMILIES)})")
    for key, value in CLASS_DEFAULTS.get(model_type, {}).items():
        if key not in cfg and not (key == "sliding_window_pattern" and "layer_types" in cfg):
            cfg[key] = value
            notes.append(f"{key}={value} (transformers {model_type} config default; absent from the file)")
    f = Fields(cfg)
    if model_type in GQA_FAMILIES:
        spec = _parse_gqa(f, model_type, name)
    elif model_type == "deepseek_v4":
        spec = _parse_v4(f, name, official)
    else:
        spec = _parse_mla(f, model_type, name)
    if not allow_unknown:
        f.check_unknown(model_type)
    return replace(spec, notes=tuple(notes)) if notes else spec


def _from_official(cfg: dict) -> tuple[dict, str]:
    out: dict = {}
    for k, v in cfg.items():
        out[OFFICIAL_KEYS.get(k, k)] = v
    if "compress_ratios" in cfg:
        family = "deepseek_v4"
        out.setdefault("num_key_value_heads", 1)      # V4's single shared K=V head, by design
        out.setdefault("num_nextn_predict_layers", 1)  # ModelArgs default n_mtp_layers = 1
    elif "index_n_heads" in cfg:
        family = "deepseek_v32"
    else:
        family = "deepseek_v3"
    if "max_position_embeddings" not in out:
        # The YaRN-extended length is the model's context: original_seq_len * rope_factor, with
        # ModelArgs' defaults (4096, 40 in DeepSeek-V3 inference/model.py) when the file omits them.
        seq, factor = cfg.get("original_seq_len", 4096), cfg.get("rope_factor", 40)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (seq, factor)):
            raise ConfigError("fields 'original_seq_len' and 'rope_factor' must be positive integers")
        out["max_position_embeddings"] = seq * factor
    quant = {}
    if cfg.get("dtype") == "fp8":
        quant = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        if cfg.get("expert_dtype") in ("fp4", "mxfp4"):
            quant["expert_dtype"] = "fp4"
        if cfg.get("scale_fmt"):        # ue8m0 activation scales (the V3.2 indexer's act_quant reads it)
            quant["scale_fmt"] = cfg["scale_fmt"]
    if quant:
        out["quantization_config"] = quant
    out["torch_dtype"] = "bfloat16"
    for k in OFFICIAL_IGNORED:
        out.pop(k, None)
    out["model_type"] = family
    return out, family


def _common(f: Fields, family: str) -> dict:
    hidden = f.int("hidden_size")
    n_layers = f.int("num_hidden_layers")
    _check(n_layers <= MAX_LAYERS, f"field 'num_hidden_layers' is implausibly large ({n_layers}; at most {MAX_LAYERS})")
    return dict(hidden=hidden, n_layers=n_layers, vocab=f.int("vocab_size"),
                max_position=f.int("max_position_embeddings"))


def _bounded_mtp(f: Fields, key: str, default=None) -> int:
    n = f.int(key, minimum=0) if default is None else f.int(key, default, minimum=0)
    _check(n <= MAX_MTP_LAYERS, f"field '{key}' is implausibly large ({n}; at most {MAX_MTP_LAYERS})")
    return n


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# ---------------------------------------------------------------------------- GQA families
def _parse_gqa(f: Fields, family: str, name: str) -> ModelSpec:
    c = _common(f, family)
    n, hidden = c["n_layers"], c["hidden"]
    heads = f.int("num_attention_heads")
    kv_heads = f.int("num_key_value_heads")
    _check(kv_heads <= heads and heads % kv_heads == 0,
           f"field 'num_key_value_heads' ({kv_heads}) must divide 'num_attention_heads' ({heads})")
    if family in ("llama", "mistral", "mixtral", "qwen2") and not f.has("head_dim"):
        # These classes define head_dim as hidden_size // num_attention_heads.
        f.ignore("head_dim")
        _check(hidden % heads == 0, f"field 'hidden_size' ({hidden}) is not a multiple of "
               f"'num_attention_heads' ({heads}) and no 'head_dim' is given")
        head_dim = hidden // heads
    else:
        head_dim = f.int("head_dim")
    tie = f.bool("tie_word_embeddings", family == "gemma3_text")

    qkv_bias = o_bias = False
    if family == "qwen2":
        qkv_bias = True
    elif family in ("llama", "gpt_oss", "mistral", "mixtral"):
        qkv_bias = o_bias = f.bool("attention_bias", family == "gpt_oss")
    else:
        f.ignore("attention_bias")
        if f.has("attention_bias"):
            qkv_bias = f.bool("attention_bias")
    mlp_bias = f.bool("mlp_bias", False) if family == "llama" else False
    qk_norm = "none"
    if family in ("qwen3", "qwen3_moe", "gemma3_text"):
        qk_norm = "head"
    elif family == "minimax_m2":
        use = f.bool("use_qk_norm", True)
        kind = f.str("qk_norm_type", "per_layer")
        qk_norm = "full" if (use and kind == "per_layer") else ("head" if use else "none")
    gqa = GQAConfig(heads, kv_heads, head_dim, head_dim, qkv_bias, o_bias, qk_norm,
                    sinks=family == "gpt_oss")

    kinds = _gqa_layer_kinds(f, family, n)
    moe, ffn_of = _gqa_moe(f, family, n)
    dense_inter = None
    if any(k == "dense" for k in ffn_of):
        dense_inter = f.int("intermediate_size")
    elif family == "qwen3_moe":
        f.ignore("intermediate_size")
    layers = tuple(LayerSpec(i, kind, ffn_of[i], window) for i, (kind, window) in enumerate(kinds))
    mtp_layers: tuple[LayerSpec, ...] = ()
    if family == "minimax_m2":
        n_mtp = _bounded_mtp(f, "num_mtp_modules", 0)
        f.ignore("use_mtp", "mtp_transformer_layers")
        last = layers[-1]
        mtp_layers = tuple(LayerSpec(n + i, last.attention, last.ffn, last.window, mtp=True)
                           for i in range(n_mtp))
    f.ignore("head_dim", "rotary_dim", "attn_type_list", "layernorm_full_attention_beta",
             "layernorm_linear_attention_beta", "layernorm_mlp_beta", "full_attn_alpha_factor",
             "full_attn_beta_factor", "linear_attn_alpha_factor", "linear_attn_beta_factor",
             "mlp_alpha_factor", "mlp_beta_factor", "shared_intermediate_size", "shared_moe_mode",
             "postnorm", "qk_norm_type", "use_qk_norm", "use_routing_bias", "sliding_window_pattern")
    return ModelSpec(
        name=name, family=family, hidden_size=hidden, vocab_size=c["vocab"],
        max_position=c["max_position"], tie_embeddings=tie, dense_intermediate=dense_inter,
        layers=layers, mtp_layers=mtp_layers, gqa=gqa, moe=moe,
        norms_per_layer=4 if family == "gemma3_text" else 2, mlp_bias=mlp_bias,
        engram=_parse_engram(f, n), quant=_parse_quant(f, family), config=f.cfg)


def _gqa_layer_kinds(f: Fields, family: str, n: int) -> list[tuple[str, int | None]]:
    window = f.opt_int("sliding_window")
    if f.has("layer_types"):
        types = f.str_list("layer_types")
        _check(len(types) == n, f"field 'layer_types' has {len(types)} entries but "
               f"'num_hidden_layers' is {n}")
        out = []
        for i, t in enumerate(types):
            if t == "full_attention":
                out.append(("full", None))
            elif t == "sliding_attention":
                _check(window is not None, "field 'layer_types' has sliding_attention layers "
                       "but 'sliding_window' is missing")
                out.append(("sliding", window))
            else:
                raise ConfigError(f"field 'layer_types[{i}]' must be full_attention or "
                                  f"sliding_attention, got {t!r}")
        return out
    f.ignore("layer_types")
    if family == "gemma3_text":
        pattern = f.int("sliding_window_pattern")
        _check(window is not None, "missing field 'sliding_window'")
        return [("full", None) if (i + 1) % pattern == 0 else ("sliding", window) for i in range(n)]
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        if f.bool("use_sliding_window", False):
            _check(window is not None, "field 'use_sliding_window' is true but 'sliding_window' is missing")
            first = f.int("max_window_layers", minimum=0)
            return [("sliding", window) if i >= first else ("full", None) for i in range(n)]
        return [("full", None)] * n
    if family in ("mistral", "mixtral") and window is not None:
        return [("sliding", window)] * n
    _check(family not in ("gpt_oss",), "missing field 'layer_types'")
    return [("full", None)] * n


def _gqa_moe(f: Fields, family: str, n: int) -> tuple[MoEConfig | None, list[str]]:
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text"):
        return None, ["dense"] * n
    if family == "qwen3_moe":
        experts = f.int("num_experts", aliases=("num_local_experts",))
        width = f.int("moe_intermediate_size")
        step = f.int("decoder_sparse_step", 1)
        only = set(f.int_list("mlp_only_layers", []))
        ffn = ["dense" if (i in only or (i + 1) % step != 0) else "moe" for i in range(n)]
        moe = MoEConfig(experts, f.int("num_experts_per_tok"), width)
    elif family == "mixtral":
        moe = MoEConfig(f.int("num_local_experts"), f.int("num_experts_per_tok"), f.int("intermediate_size"))
        ffn = ["moe"] * n
    elif family == "gpt_oss":
        moe = MoEConfig(f.int("num_local_experts"),
                        f.int("num_experts_per_tok", aliases=("experts_per_token",)),
                        f.int("intermediate_size"), router_bias=True, expert_bias=True)
        ffn = ["moe"] * n
    else:  # minimax_m2
        moe = MoEConfig(f.int("num_local_experts"), f.int("num_experts_per_tok"),
                        f.int("intermediate_size"), router_bias=f.bool("use_routing_bias", True))
        ffn = ["moe"] * n
    _check(moe.top_k <= moe.num_experts, f"field 'num_experts_per_tok' ({moe.top_k}) exceeds the "
           f"number of experts ({moe.num_experts})")
    return moe, ffn


# ---------------------------------------------------------------------------- MLA families
def _parse_mla(f: Fields, family: str, name: str) -> ModelSpec:
    c = _common(f, family)
    n = c["n_layers"]
    heads = f.int("num_attention_heads")
    f.ignore("num_key_value_heads", "head_dim", "attention_bias")  # logical values; MLA caches one latent per token
    mla = MLAConfig(heads, f.opt_int("q_lora_rank"), f.int("kv_lora_rank"), f.int("qk_nope_head_dim"),
                    f.int("qk_rope_head_dim"), f.int("v_head_dim"))
    if f.has("qk_head_dim"):
        qk = f.int("qk_head_dim")
        _check(qk == mla.qk_nope_head_dim + mla.qk_rope_head_dim,
               f"field 'qk_head_dim' ({qk}) != qk_nope_head_dim + qk_rope_head_dim "
               f"({mla.qk_nope_head_dim} + {mla.qk_rope_head_dim})")
    indexer = None
    if family in ("deepseek_v32", "glm_moe_dsa"):
        indexer = IndexerConfig(f.int("index_n_heads"), f.int("index_head_dim"), f.int("index_topk"))
        _check(mla.q_lora_rank is not None, f"missing field 'q_lora_rank': the {family} indexer reads the query latent")
    moe, ffn = _deepseek_moe(f, n, router_bias=family != "deepseek_v2")
    _check(not f.bool("mlp_bias", False), "field 'mlp_bias' true is not supported for MLA models")
    if f.has("layer_types"):   # transformers v5 saves e.g. ["indexed_attention", ...]
        types = f.str_list("layer_types")
        _check(len(types) == n, f"field 'layer_types' has {len(types)} entries but 'num_hidden_layers' is {n}")
        allowed = ("indexed_attention",) if family in ("deepseek_v32", "glm_moe_dsa") else ("full_attention", "attention")
        for i, t in enumerate(types):
            _check(t in allowed, f"field 'layer_types[{i}]' must be {' or '.join(allowed)} for {family}, got {t!r}")
    if f.has("mlp_layer_types"):  # transformers v5: "dense" / "sparse" per layer
        kinds = f.str_list("mlp_layer_types")
        _check(len(kinds) == n, f"field 'mlp_layer_types' has {len(kinds)} entries but 'num_hidden_layers' is {n}")
        for i, k in enumerate(kinds):
            _check(k in ("dense", "sparse"), f"field 'mlp_layer_types[{i}]' must be dense or sparse, got {k!r}")
            _check((k == "dense") == (ffn[i] == "dense"), f"field 'mlp_layer_types[{i}]' ({k}) contradicts "
                   f"'first_k_dense_replace' / 'moe_layer_freq'")
    n_mtp = _bounded_mtp(f, "num_nextn_predict_layers", 0)
    kind = "dsa" if indexer else "mla"
    shared = _indexer_sharing(f, n) if indexer else [False] * n
    layers = tuple(LayerSpec(i, kind, ffn[i], shared_indexer=shared[i]) for i in range(n))
    mtp_layers = tuple(LayerSpec(n + i, kind, "moe", mtp=True) for i in range(n_mtp))
    dense_inter = f.int("intermediate_size") if "dense" in ffn else None
    f.ignore("intermediate_size")
    return ModelSpec(
        name=name, family=family, hidden_size=c["hidden"], vocab_size=c["vocab"],
        max_position=c["max_position"], tie_embeddings=f.bool("tie_word_embeddings", False),
        dense_intermediate=dense_inter, layers=layers, mtp_layers=mtp_layers, mla=mla,
        indexer=indexer, moe=moe, engram=_parse_engram(f, n), quant=_parse_quant(f, family),
        config=f.cfg)


def _indexer_sharing(f: Fields, n: int) -> list[bool]:
    """Which DSA layers reuse the previous layer's top-k instead of running an indexer
    (GLM-5.x IndexShare): transformers' `indexer_types` ("full"/"shared"), or the
    `index_topk_pattern` ("F"/"S") / `index_topk_freq` + `index_skip_topk_offset` schedule
    as GlmMoeDsaConfig derives it. Absent: every layer runs its own indexer."""
    if f.has("indexer_types"):
        types = f.str_list("indexer_types")
        f.ignore("index_topk_pattern", "index_topk_freq", "index_skip_topk_offset")
    elif f.has("index_topk_pattern"):
        pattern = f.raw("index_topk_pattern")
        if not isinstance(pattern, str) or any(c not in "FS" for c in pattern):
            raise ConfigError(f"field 'index_topk_pattern' must be a string of F and S, got {pattern!r}")
        types = ["full" if c == "F" else "shared" for c in pattern]
        f.ignore("index_topk_freq", "index_skip_topk_offset")
    elif f.has("index_topk_freq") or f.has("index_skip_topk_offset"):
        freq = f.int("index_topk_freq", 1)
        offset = f.int("index_skip_topk_offset", 2, minimum=0)
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
    else:
        return [False] * n
    _check(len(types) == n, f"field 'indexer_types' has {len(types)} entries but 'num_hidden_layers' is {n}")
    for i, t in enumerate(types):
        _check(t in ("full", "shared"), f"field 'indexer_types[{i}]' must be full or shared, got {t!r}")
    _check(types[0] == "full", "field 'indexer_types[0]' must be full (a shared layer reuses an earlier top-k)")
    return [t == "shared" for t in types]


def _deepseek_moe(f: Fields, n: int, router_bias: bool) -> tuple[MoEConfig, list[str]]:
    experts = f.int("n_routed_experts")
    top_k = f.int("num_experts_per_tok")
    _check(top_k <= experts, f"field 'num_experts_per_tok' ({top_k}) exceeds 'n_routed_experts' ({experts})")
    width = f.int("moe_intermediate_size")
    shared = f.int("n_shared_experts", 0, minimum=0)
    first_dense = f.int("first_k_dense_replace", 0, minimum=0)
    _check(first_dense <= n, f"field 'first_k_dense_replace' ({first_dense}) exceeds 'num_hidden_layers' ({n})")
    freq = f.int("moe_layer_freq", 1)
    ffn = ["moe" if (i >= first_dense and i % freq == 0) else "dense" for i in range(n)]
    return MoEConfig(experts, top_k, width, shared, shared * width, router_bias=router_bias), ffn


# ---------------------------------------------------------------------------- DeepSeek-V4
_V4_TYPES = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


def _parse_v4(f: Fields, name: str, official: bool) -> ModelSpec:
    c = _common(f, "deepseek_v4")
    n = c["n_layers"]
    heads = f.int("num_attention_heads")
    kv = f.int("num_key_value_heads")
    _check(kv == 1, f"field 'num_key_value_heads' must be 1 for deepseek_v4 (one shared K=V head), got {kv}")
    head_dim = f.int("head_dim")
    if f.has("qk_rope_head_dim"):
        rope = f.int("qk_rope_head_dim")
        f.ignore("partial_rotary_factor")
    else:
        _check(f.has("partial_rotary_factor"), "missing field 'qk_rope_head_dim' (or 'partial_rotary_factor')")
        factor = f.raw("partial_rotary_factor")
        _check(isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 < factor <= 1,
               f"field 'partial_rotary_factor' must be in (0, 1], got {factor!r}")
        rope = int(round(head_dim * factor))
    _check(rope <= head_dim, f"field 'qk_rope_head_dim' ({rope}) exceeds 'head_dim' ({head_dim})")
    o_groups = f.int("o_groups")
    _check(heads % o_groups == 0, f"field 'o_groups' ({o_groups}) must divide 'num_attention_heads' ({heads})")
    v4 = V4Config(heads, head_dim, rope, f.int("q_lora_rank"), o_groups, f.int("o_lora_rank"),
                  f.int("sliding_window"))
    indexer = IndexerConfig(f.int("index_n_heads"), f.int("index_head_dim"), f.int("index_topk"))
    n_mtp = _bounded_mtp(f, "num_nextn_predict_layers")

    ratios = _v4_ratios(f)
    _check(len(ratios) >= n, f"field 'compress_ratios' has {len(ratios)} entries but "
           f"'num_hidden_layers' is {n}")
    if f.has("mlp_layer_types"):
        mlp = f.str_list("mlp_layer_types")
        _check(len(mlp) >= n, f"field 'mlp_layer_types' has {len(mlp)} entries, need {n}")
        for i, t in enumerate(mlp[:n]):
            _check(t in ("moe", "hash_moe"), f"field 'mlp_layer_types[{i}]' must be moe or hash_moe, got {t!r}")
        ffn = mlp[:n]
        f.ignore("num_hash_layers")
    else:
        n_hash = f.int("num_hash_layers", minimum=0)
        _check(n_hash <= n, f"field 'num_hash_layers' ({n_hash}) exceeds 'num_hidden_layers' ({n})")
        ffn = ["hash_moe"] * n_hash + ["moe"] * (n - n_hash)
    experts = f.int("n_routed_experts")
    top_k = f.int("num_experts_per_tok")
    _check(top_k <= experts, f"field 'num_experts_per_tok' ({top_k}) exceeds 'n_routed_experts' ({experts})")
    width = f.int("moe_intermediate_size")
    shared = f.int("n_shared_experts", minimum=0)
    moe = MoEConfig(experts, top_k, width, shared, shared * width, router_bias=True)
    layers = tuple(LayerSpec(i, "v4", ffn[i], v4.window, ratios[i][0], csa=ratios[i][1]) for i in range(n))
    mtp_ratio = [ratios[n + i] if n + i < len(ratios) else (0, False) for i in range(n_mtp)]
    mtp_layers = tuple(LayerSpec(n + i, "v4", "moe", v4.window, r, mtp=True, csa=csa)
                       for i, (r, csa) in enumerate(mtp_ratio))
    f.ignore("intermediate_size", "compress_rate_csa", "compress_rate_hca", "attention_bias", "mlp_bias",
             "compress_rope_theta")
    return ModelSpec(
        name=name, family="deepseek_v4", hidden_size=c["hidden"], vocab_size=c["vocab"],
        max_position=c["max_position"], tie_embeddings=f.bool("tie_word_embeddings", False),
        dense_intermediate=None, layers=layers, mtp_layers=mtp_layers, v4=v4, indexer=indexer,
        moe=moe, hc_mult=f.int("hc_mult"), engram=_parse_engram(f, n),
        quant=_parse_quant(f, "deepseek_v4"), config=f.cfg)


def _v4_ratios(f: Fields) -> list[tuple[int, bool]]:
    """(compress ratio, is CSA) per layer, from the official `compress_ratios` (0 = window
    only, 4 = CSA, any other ratio = HCA, as in the official code) or transformers'
    `layer_types` + `compress_rates`."""
    if f.has("compress_ratios"):
        f.ignore("layer_types", "compress_rates")
        ratios = f.int_list("compress_ratios")
        return [(r, r == 4) for r in ratios]
    _check(f.has("layer_types"), "missing field 'compress_ratios' (or 'layer_types')")
    types = f.str_list("layer_types")
    rates = dict(_V4_TYPES)
    sub = f.sub("compress_rates")
    if sub is not None:
        rates["compressed_sparse_attention"] = sub.int("compressed_sparse_attention", 4)
        rates["heavily_compressed_attention"] = sub.int("heavily_compressed_attention", 128)
        sub.check_unknown("deepseek_v4")
    out = []
    for i, t in enumerate(types):
        _check(t in rates, f"field 'layer_types[{i}]' must be one of {', '.join(rates)}, got {t!r}")
        out.append((rates[t], t == "compressed_sparse_attention"))
    return out


# ---------------------------------------------------------------------------- shared blocks
def _parse_engram(f: Fields, n_layers: int) -> EngramConfig | None:
    key = f.first_present("engram_config", "engram")
    f.ignore("engram_config", "engram")
    if key is None:
        return None
    e = f.sub(key)
    assert e is not None
    max_n = e.int("max_ngram_size", minimum=2)
    sizes = e.int_list("engram_vocab_size", minimum=2)
    _check(len(sizes) == max_n - 1, f"field '{key}.engram_vocab_size' needs one size per n-gram order "
           f"2..{max_n} ({max_n - 1}), got {len(sizes)}")
    ids = e.int_list("layer_ids")
    for i, layer in enumerate(ids):
        _check(layer < n_layers, f"field '{key}.layer_ids[{i}]' ({layer}) is not a layer index (< {n_layers})")
    _check(len(set(ids)) == len(ids), f"field '{key}.layer_ids' has duplicates")
    per = e.int("n_embed_per_ngram")
    heads = e.int("n_head_per_ngram")
    _check(per % heads == 0, f"field '{key}.n_embed_per_ngram' ({per}) must be a multiple of "
           f"'n_head_per_ngram' ({heads})")
    # kernel_size, pad_id and seed default to engram_demo_v1.py's EngramConfig values.
    cfg = EngramConfig(tuple(ids), tuple(sizes), max_n, per, heads, e.int("kernel_size", 4),
                       e.int("pad_id", 2, minimum=0), e.int("seed", 0, minimum=0))
    e.ignore("tokenizer_name_or_path", "hidden_size", "hc_mult")
    e.check_unknown("engram")
    return cfg


def _parse_quant(f: Fields, family: str) -> Quantization:
    base_name = f.raw("torch_dtype", "bfloat16", aliases=("dtype",))
    base = DTYPE_NAMES.get(str(base_name))
    if base is None or base == "fp8":
        raise ConfigError(f"field 'torch_dtype' must be bfloat16, float16, float32 or float64, got {base_name!r}")
    top_expert_dtype = f.str("expert_dtype", "fp8") if family == "deepseek_v4" else "fp8"
    q = f.sub("quantization_config")
    if q is None:
        return Quantization("none", base, base, base)
    method = q.str("quant_method")
    q.ignore("activation_scheme", "fmt", "scale_fmt", "modules_to_not_convert", "ignored_layers",
             "quantization_status", "format", "global_compression_ratio", "kv_cache_scheme",
             "sparsity_config", "version", "ignore", "transform_config")
    if method == "fp8":
        block = q.int_list("weight_block_size", [128, 128], minimum=1)
        _check(len(block) == 2, "field 'quantization_config.weight_block_size' must have 2 entries")
        experts = q.str("expert_dtype", top_expert_dtype)
        _check(experts in ("fp8", "fp4", "mxfp4"), f"field 'quantization_config.expert_dtype' must be fp8 or fp4, "
               f"got {experts!r}")
        experts = "fp4" if experts == "mxfp4" else experts
        return Quantization("fp8" if experts == "fp8" else "fp8+fp4", base, "fp8", experts, (block[0], block[1]))
    if method == "mxfp4":
        return Quantization("mxfp4", base, base, "fp4")
    if method == "compressed-tensors":
        groups = q.raw("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ConfigError("field 'quantization_config.config_groups' must be a non-empty object")
        first = next(iter(groups.values()))
        w = first.get("weights") if isinstance(first, dict) else None
        if not isinstance(w, dict):
            raise ConfigError("field 'quantization_config.config_groups.*.weights' is missing")
        bits, typ = w.get("num_bits"), w.get("type")
        if bits == 4 and typ == "int":
            group = w.get("group_size")
            _check(isinstance(group, int) and not isinstance(group, bool) and group > 0,
                   f"field 'quantization_config.config_groups.*.weights.group_size' must be a positive integer, got {group!r}")
            return Quantization("compressed-tensors", base, base, "int4", group=group)
        if bits == 8 and typ == "float":
            return Quantization("compressed-tensors", base, "fp8", "fp8")
        raise ConfigError(f"field 'quantization_config.config_groups': {bits}-bit {typ} weights are not supported")
    raise ConfigError(f"field 'quantization_config.quant_method' {method!r} is not supported "
                      "(supported: fp8, mxfp4, compressed-tensors); override with --weight-dtype")
