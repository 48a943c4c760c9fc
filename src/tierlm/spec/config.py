"""config.json -> ModelSpec, strictly.

Accepts Hugging Face configs (transformers key names) and DeepSeek's official inference
configs (`dim`, `n_layers`, ...). A missing field, a wrong type, an unknown field or two
fields that contradict each other raise `ConfigError` naming the field. Where a value may
be absent, the default is the one the transformers config class documents for that
family (listed in docs/planner.md; for DeepSeek's official configs, its ModelArgs'), never
a guess. Everything the model code needs (norm eps, RoPE, router settings, ...) is
resolved here into typed `ModelSpec` fields, so no family reads the raw config.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..dtypes import canonical
from ..errors import ConfigError, os_error
from .fields import METADATA_KEYS, Fields
from .hybrid import HYBRID_FAMILIES, parse_hybrid
from .model import (EngramConfig, GemmaConfig, GQAConfig, IndexerConfig, LayerSpec, MLAConfig, ModelSpec,
                    MoEConfig, Quantization, RopeConfig, RouterConfig, V4Config, interned)

GQA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "mixtral", "qwen3_moe",
                "gpt_oss", "minimax_m2")
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32", "glm_moe_dsa")
FAMILIES = GQA_FAMILIES + MLA_FAMILIES + ("deepseek_v4",) + HYBRID_FAMILIES
# Multimodal wrappers whose language model sits under `text_config`.
WRAPPERS = {"gemma3": "gemma3_text", "kimi_k25": "deepseek_v3", "qwen3_5": "qwen3_5_text",
            "qwen3_5_moe": "qwen3_5_moe_text", "kimi_k3": "kimi_linear", "gemma4": "gemma4_text",
            "inkling_mm_model": "inkling"}
# Keys of those wrappers outside text_config (vision / audio towers and multimodal token ids).
WRAPPER_KEYS = frozenset({"text_config", "vision_config", "quantization_config", "tie_word_embeddings",
                          "boi_token_index", "eoi_token_index", "image_token_index", "mm_tokens_per_image",
                          "ignore_index", "media_placeholder_token_id", "use_unified_vision_chunk",
                          "video_placeholder", "image_token_id", "video_token_id", "vision_start_token_id",
                          "vision_end_token_id", "audio_config", "audio_token_id", "boa_token_id", "eoa_token_id",
                          "eoa_token_index", "boi_token_id", "eoi_token_id", "vision_soft_tokens_per_image",
                          "image_placeholder", "mtp_config", "language_model_only"})
# Wrapper keys that belong to the language model: moved into text_config (Inkling's MTP chain).
WRAPPER_TEXT_KEYS = ("mtp_config",)

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
# V4 keeps its YaRN keys: _parse_v4 reads them for the compressed layers' RoPE.
OFFICIAL_V4_ROPE = ("original_seq_len", "rope_factor", "beta_fast", "beta_slow")
# ModelArgs defaults (deepseek-ai/DeepSeek-V3 inference/model.py) of the router keys whose
# transformers defaults differ; official V3 / V3.2 files that omit them mean these.
OFFICIAL_ROUTER_DEFAULTS = {"scoring_func": "softmax", "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1}

# Sparse configs (e.g. gemma-3-*-it's text_config) omit fields equal to the class
# default; these are the defaults of transformers' Gemma3TextConfig (v5.23.0).
CLASS_DEFAULTS = {"gemma3_text": {"vocab_size": 262208, "max_position_embeddings": 131072,
                                  "sliding_window_pattern": 6}}

# Defaults of the numeric fields where a config omits them: the transformers 5.23.0 config
# classes' (configuration_<family>.py). rms_norm_eps is 1e-6 and rope_theta 10000 for every
# family not listed.
DEFAULT_NORM_EPS = {"mixtral": 1e-5, "gpt_oss": 1e-5, "glm_moe_dsa": 1e-5}
DEFAULT_ROPE_THETA = {"mixtral": 1e6, "gpt_oss": 150000.0, "minimax_m2": 5e6}   # default_theta
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Every key of transformers' RopeParameters; the ones a RoPE type does not use are ignored,
# as transformers ignores them.
ROPE_KEYS = ("rope_theta", "rope_type", "type", "factor", "original_max_position_embeddings", "attention_factor",
             "beta_fast", "beta_slow", "short_factor", "long_factor", "low_freq_factor", "high_freq_factor",
             "mscale", "mscale_all_dim", "truncate", "mrope_section", "partial_rotary_factor")

MAX_LAYERS = 4096     # the deepest model in the registry has 126
MAX_MTP_LAYERS = 16



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
    except OSError as e:                       # unreadable, EIO (/proc/self/mem), a FIFO gone away...
        raise os_error(p, e, ConfigError) from None


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
        for key in ("tie_word_embeddings", "torch_dtype", "dtype") + WRAPPER_TEXT_KEYS:
            if key in cfg and key not in inner:
                inner[key] = cfg[key]
        unknown = sorted(k for k in cfg if k not in WRAPPER_KEYS and k not in METADATA_KEYS)
        if unknown and not allow_unknown:
            raise ConfigError(f"unknown field '{unknown[0]}' for model_type '{model_type}'; pass "
                              "allow_unknown=True / --allow-unknown-fields to ignore it")
        vision = _siglip_dims(cfg.get("vision_config")) if model_type == "gemma3" else None
        if vision is None and "vision_config" in cfg:
            notes.append("vision tower (vision_config) weights are not counted; the plan covers the language model")
        cfg = inner
        model_type = cfg.get("model_type")
        if model_type is None:
            raise ConfigError("missing field 'text_config.model_type'")
    else:
        vision = None
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
    elif model_type in HYBRID_FAMILIES:
        spec = parse_hybrid(f, model_type, name, _parse_quant)
    elif model_type == "deepseek_v4":
        spec = _parse_v4(f, name, official)
    else:
        spec = _parse_mla(f, model_type, name)
    if not allow_unknown:
        f.check_unknown(model_type)
    if vision is not None:
        n = _gemma3_vision_params(*vision, spec.hidden_size)
        spec = replace(spec, vision_params=n)
        notes.append(f"vision tower (SigLIP vision_config) and multi-modal projector counted: {n:,} params "
                     "(component vision_tower, held with the hot weights, not read per text token)")
    return interned(replace(spec, notes=tuple(notes)) if notes else spec)


# transformers 5.23.0 SiglipVisionConfig defaults, for a vision_config that omits a field.
SIGLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_channels": 3,
                   "image_size": 224, "patch_size": 16}


def _siglip_dims(vc: Any) -> tuple[int, ...] | None:
    """(hidden, intermediate, layers, channels, image_size, patch_size, head) of a Gemma 3 SigLIP
    vision_config; None when it is absent or not a SigLIP vision model (not counted then)."""
    if not isinstance(vc, dict) or vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        return None
    out = []
    for key, default in SIGLIP_DEFAULTS.items():
        v = vc.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"field 'vision_config.{key}' must be a positive integer, got {v!r}")
        out.append(v)
    head = vc.get("vision_use_head", True)
    if not isinstance(head, bool):
        raise ConfigError(f"field 'vision_config.vision_use_head' must be a boolean, got {head!r}")
    return (*out, int(head))


def _gemma3_vision_params(h: int, inter: int, layers: int, channels: int, image: int, patch: int, head: int,
                          text_hidden: int) -> int:
    """Parameters of transformers' SiglipVisionModel (model.vision_tower) plus Gemma3MultiModalProjector."""
    embed = h * channels * patch * patch + h + (image // patch) ** 2 * h   # patch conv (bias) + positions
    mlp = 2 * inter * h + inter + h                                        # fc1, fc2 with biases
    layer = 4 * (h * h + h) + 2 * 2 * h + mlp                             # q/k/v/o (biases), 2 LayerNorms
    pool = (h + 3 * h * h + 3 * h + h * h + h + 2 * h + mlp) if head else 0  # probe, MHA, LayerNorm, MLP
    projector = h * text_hidden + h                                       # mm_input_projection, soft-emb norm
    return embed + layers * layer + 2 * h + pool + projector


def _from_official(cfg: dict) -> tuple[dict, str]:
    out: dict = {}
    for k, v in cfg.items():
        out[OFFICIAL_KEYS.get(k, k)] = v
    if "compress_ratios" in cfg:
        family = "deepseek_v4"
        out.setdefault("num_key_value_heads", 1)      # V4's single shared K=V head, by design
        out.setdefault("num_nextn_predict_layers", 1)  # ModelArgs default n_mtp_layers = 1
    else:
        family = "deepseek_v32" if "index_n_heads" in cfg else "deepseek_v3"
        for k, v in OFFICIAL_ROUTER_DEFAULTS.items():
            out.setdefault(k, v)
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
        if not (family == "deepseek_v4" and k in OFFICIAL_V4_ROPE):
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


# ---------------------------------------------------------------------------- RoPE
def _rope_params(f: Fields) -> Fields | None:
    """The one flat RoPE parameter object, picked as transformers 5.23 picks it: a non-empty
    legacy `rope_scaling` replaces `rope_parameters` (convert_rope_params_to_dict)."""
    legacy = f.sub("rope_scaling")
    if legacy is not None and legacy.cfg:
        f.ignore("rope_parameters")
        return legacy
    return f.sub("rope_parameters")


def _theta(p: Fields | None, fallback: float) -> float:
    """rope_theta of a RoPE parameter object, else `fallback` (the top-level or class default)."""
    return fallback if p is None else p.float("rope_theta", fallback, positive=True)


def _rope(p: Fields | None, family: str, theta: float, dim: int, max_position: int, *, interleave: bool = False,
          kinds: tuple[str, ...] = ROPE_TYPES, attention_factor: float | None = None) -> RopeConfig:
    """A RopeConfig from one flat RoPE parameter object (None: plain RoPE), with the defaults
    transformers' rope init functions use: original_max_position_embeddings = the model's
    max_position_embeddings, a yarn factor of max_position / original, beta_fast 32, beta_slow 1,
    and a yarn cos/sin scale derived from factor and mscale / mscale_all_dim unless the object
    gives one (or the family fixes one: `attention_factor`)."""
    if p is None:
        return RopeConfig(theta, dim, interleave=interleave)
    kind = p.str("rope_type", "default", choices=kinds, aliases=("type",))
    rope = RopeConfig(theta, dim, kind, interleave)
    if kind == "linear":
        rope = replace(rope, factor=p.float("factor", positive=True))
    elif kind == "llama3":
        rope = replace(rope, factor=p.float("factor", positive=True),
                       low_freq_factor=p.float("low_freq_factor", positive=True),
                       high_freq_factor=p.float("high_freq_factor", positive=True),
                       original_max_position=p.int("original_max_position_embeddings", max_position))
        _check(rope.high_freq_factor != rope.low_freq_factor, f"field '{p.name('high_freq_factor')}' must "
               f"differ from 'low_freq_factor' ({rope.low_freq_factor})")
    elif kind == "yarn":
        original = p.int("original_max_position_embeddings", max_position)
        factor = p.float("factor", None, positive=True)
        if factor is None:
            factor = max_position / original
        m, m_all = p.float("mscale", None, positive=True), p.float("mscale_all_dim", None, positive=True)
        rope = replace(rope, factor=factor, original_max_position=original,
                       beta_fast=p.float("beta_fast", 32.0, positive=True),
                       beta_slow=p.float("beta_slow", 1.0, positive=True), truncate=p.bool("truncate", True),
                       mscale_all_dim=m_all)
        scale = p.float("attention_factor", None, positive=True)
        if scale is None:
            scale = attention_factor
        if scale is None:
            scale = rope.yarn_mscale(m) / rope.yarn_mscale(m_all) if m and m_all else rope.yarn_mscale()
        rope = replace(rope, attention_factor=float(scale))
    p.ignore(*ROPE_KEYS)
    p.check_unknown(family)
    return rope


def _minimax_rope(f: Fields, head_dim: int, max_position: int) -> RopeConfig:
    """Partial RoPE: the rotated dims are int(head_dim * partial_rotary_factor), the factor read
    as transformers 5.23 reads it: from the RoPE parameters, else the top level, else the
    released checkpoints' legacy rotary_dim / head_dim (MiniMaxM2Config), else 1."""
    p = _rope_params(f)
    key, factor = "partial_rotary_factor", None
    if p is not None and p.has(key):
        key, factor = p.name(key), p.float(key)
    elif f.has(key):
        factor = f.float(key)
    elif f.has("rotary_dim"):
        key, factor = "rotary_dim", f.int("rotary_dim") / head_dim
    factor = 1.0 if factor is None else factor
    _check(0 < factor <= 1, f"field '{key}' must give a partial rotary factor in (0, 1], got {factor}")
    dim = int(head_dim * factor)
    _check(dim >= 2, f"field '{key}': rotary dimension {dim} (head_dim {head_dim} x {factor}) is too small")
    return _rope(p, "minimax_m2", _theta(p, f.float("rope_theta", DEFAULT_ROPE_THETA["minimax_m2"], positive=True)),
                 dim, max_position)


def _gemma(f: Fields, head_dim: int, max_position: int) -> tuple[RopeConfig, GemmaConfig]:
    """(the global layers' RoPE, the Gemma 3 settings) with Gemma3TextConfig's defaults. The
    RoPE of each layer type comes from a nested `rope_parameters` {"full_attention": {...},
    "sliding_attention": {...}} (what v5 saves), else the v4 fields rope_theta + rope_scaling
    (global) and rope_local_base_freq (local); a legacy rope_scaling is merged into the global
    parameters, never the local ones (Gemma3TextConfig.convert_rope_params_to_dict)."""
    nested = f.sub("rope_parameters")
    full = local = None
    if nested is not None:
        full, local = nested.sub("full_attention"), nested.sub("sliding_attention")
        flat = sorted(k for k in nested.cfg if k not in nested.used)
        if flat:
            raise ConfigError(f"field '{nested.name(flat[0])}': Gemma 3 nests its RoPE parameters by layer "
                              "type (rope_parameters.full_attention / .sliding_attention)")
    legacy = f.sub("rope_scaling")
    if legacy is not None:
        full = Fields({**(full.cfg if full is not None else {}), **legacy.cfg}, "rope_scaling")
    theta = _theta(full, f.float("rope_theta", 1e6, positive=True))
    local_theta = _theta(local, f.float("rope_local_base_freq", 1e4, positive=True))
    gemma = GemmaConfig(
        sliding_rope=_rope(local, "gemma3_text", local_theta, head_dim, max_position),
        query_pre_attn_scalar=f.float("query_pre_attn_scalar", 256.0, positive=True),
        final_logit_softcapping=f.float("final_logit_softcapping", None, positive=True),
        hidden_activation=f.str("hidden_activation", "gelu_pytorch_tanh", choices=("gelu_pytorch_tanh", "gelu"),
                                aliases=("hidden_act",)),
        bidirectional=f.bool("use_bidirectional_attention", False))
    return _rope(full, "gemma3_text", theta, head_dim, max_position), gemma


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
        o_bias = qkv_bias and family == "gemma3_text"    # Gemma3Attention biases o_proj like q/k/v
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
    gemma = None
    if family == "gemma3_text":
        rope, gemma = _gemma(f, head_dim, c["max_position"])
    elif family == "minimax_m2":
        rope = _minimax_rope(f, head_dim, c["max_position"])
    else:
        p = _rope_params(f)
        theta = _theta(p, f.float("rope_theta", DEFAULT_ROPE_THETA.get(family, 10000.0), positive=True))
        rope = _rope(p, family, theta, head_dim, c["max_position"])

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
        layers=layers, mtp_layers=mtp_layers, norm_eps=_norm_eps(f, family), rope=rope, gqa=gqa, moe=moe,
        norms_per_layer=4 if family == "gemma3_text" else 2, mlp_bias=mlp_bias,
        engram=_parse_engram(f, n), gemma=gemma, quant=_parse_quant(f, family))


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
        moe = MoEConfig(experts, f.int("num_experts_per_tok"), width,
                        router=RouterConfig(norm_topk_prob=f.bool("norm_topk_prob", False)))
    elif family == "mixtral":   # always renormalises its top-k softmax weights
        moe = MoEConfig(f.int("num_local_experts"), f.int("num_experts_per_tok"), f.int("intermediate_size"),
                        router=RouterConfig(norm_topk_prob=True))
        ffn = ["moe"] * n
    elif family == "gpt_oss":   # softmax over the top-k logits: normalised by construction
        moe = MoEConfig(f.int("num_local_experts"),
                        f.int("num_experts_per_tok", aliases=("experts_per_token",)),
                        f.int("intermediate_size"), router_bias=True, expert_bias=True,
                        router=RouterConfig(norm_topk_prob=True),
                        swiglu_limit=f.float("swiglu_limit", 7.0, positive=True),
                        swiglu_alpha=f.float("swiglu_alpha", 1.702, positive=True))
        ffn = ["moe"] * n
    else:  # minimax_m2: sigmoid scores (MiniMaxM2 knows no other), top-k renormalised
        scoring = f.str("scoring_func", "sigmoid", choices=("sigmoid",))
        moe = MoEConfig(f.int("num_local_experts"), f.int("num_experts_per_tok"),
                        f.int("intermediate_size"), router_bias=f.bool("use_routing_bias", True),
                        router=RouterConfig(scoring, norm_topk_prob=True))
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
    # GLM-5.2: the MTP layer's indexer reuse across draft steps, and the router's fp32 compute dtype.
    f.ignore("index_share_for_mtp_iteration", "moe_router_dtype")
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
    moe, ffn = _deepseek_moe(f, family, n)
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
    # V3 / Kimi-K2 rotate adjacent pairs unless rope_interleave is false (DeepseekV3Config default
    # true); V2 (complex), V3.2 and GLM-5 always do.
    interleave = f.bool("rope_interleave", True)
    _check(interleave or family in ("deepseek_v3", "kimi_k2"),
           f"field 'rope_interleave' must be true for {family} (its RoPE always rotates adjacent pairs)")
    p = _rope_params(f)
    rope = _rope(p, family, _theta(p, f.float("rope_theta", 10000.0, positive=True)), mla.qk_rope_head_dim,
                 c["max_position"], interleave=interleave, kinds=("default", "yarn"))
    return ModelSpec(
        name=name, family=family, hidden_size=c["hidden"], vocab_size=c["vocab"],
        max_position=c["max_position"], tie_embeddings=f.bool("tie_word_embeddings", False),
        dense_intermediate=dense_inter, layers=layers, mtp_layers=mtp_layers, norm_eps=_norm_eps(f, family),
        rope=rope, mla=mla, indexer=indexer, moe=moe, engram=_parse_engram(f, n), quant=_parse_quant(f, family))


def _indexer_sharing(f: Fields, n: int) -> list[bool]:
    """Which DSA layers reuse the previous layer's top-k instead of running an indexer
    (GLM-5.x IndexShare): transformers' `indexer_types` ("full"/"shared"), or the
    `index_topk_pattern` ("F"/"S") / `index_topk_freq` + `index_skip_topk_offset` schedule
    as GlmMoeDsaConfig derives it. Absent: every layer runs its own indexer."""
    if not f.has("index_topk_pattern"):
        f.ignore("index_topk_pattern")       # GLM-5.2 writes it as null next to indexer_types
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


def _deepseek_moe(f: Fields, family: str, n: int) -> tuple[MoEConfig, list[str]]:
    experts = f.int("n_routed_experts")
    top_k = f.int("num_experts_per_tok")
    _check(top_k <= experts, f"field 'num_experts_per_tok' ({top_k}) exceeds 'n_routed_experts' ({experts})")
    width = f.int("moe_intermediate_size")
    shared = f.int("n_shared_experts", 0, minimum=0)
    first_dense = f.int("first_k_dense_replace", 0, minimum=0)
    _check(first_dense <= n, f"field 'first_k_dense_replace' ({first_dense}) exceeds 'num_hidden_layers' ({n})")
    freq = f.int("moe_layer_freq", 1)
    ffn = ["moe" if (i >= first_dense and i % freq == 0) else "dense" for i in range(n)]
    moe = MoEConfig(experts, top_k, width, shared, shared * width, router_bias=family != "deepseek_v2",
                    router=_deepseek_router(f, family, experts))
    return moe, ffn


def _deepseek_router(f: Fields, family: str, experts: int) -> RouterConfig:
    """DeepSeek-V2 routes greedily or group-limited (topk_method) on softmax scores by default;
    V3 / Kimi-K2 / V3.2 / GLM-5 always group-limited (noaux_tc) on sigmoid scores. Defaults
    are the transformers classes' (DeepseekV2Config, DeepseekV3Config, DeepseekV32Config,
    GlmMoeDsaConfig; Kimi-K2 ships DeepseekV3's)."""
    scoring = f.str("scoring_func", "softmax" if family == "deepseek_v2" else "sigmoid", choices=("softmax", "sigmoid"))
    if family == "deepseek_v2":
        method = f.str("topk_method", "greedy", choices=("greedy", "group_limited_greedy"))
        router = RouterConfig(scoring, f.float("routed_scaling_factor", 1.0, positive=True),
                              f.bool("norm_topk_prob", False), method == "group_limited_greedy",
                              f.int("n_group", 1), f.int("topk_group", 1))
    else:
        f.str("topk_method", "noaux_tc", choices=("noaux_tc",))     # checked only: the one V3 routing
        groups = (1, 1) if family == "glm_moe_dsa" else (8, 4)
        router = RouterConfig(scoring, f.float("routed_scaling_factor", 2.5, positive=True),
                              f.bool("norm_topk_prob", True), True,
                              f.int("n_group", groups[0]), f.int("topk_group", groups[1]))
    _check(experts % router.n_group == 0,
           f"field 'n_group' ({router.n_group}) must divide 'n_routed_experts' ({experts})")
    _check(router.topk_group <= router.n_group, f"field 'topk_group' ({router.topk_group}) exceeds 'n_group' "
           f"({router.n_group})")
    return router


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
    main_rope, compress_rope = _v4_ropes(f, rope, c["max_position"], official)
    v4 = V4Config(heads, head_dim, rope, f.int("q_lora_rank"), o_groups, f.int("o_lora_rank"),
                  f.int("sliding_window"), compress_rope, f.float("hc_eps", 1e-6, minimum=0.0),
                  f.int("hc_sinkhorn_iters", 20))
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
    # DeepseekV4Config defaults. The router renormalises any scores but softmax's, whatever
    # norm_topk_prob says (DeepSeek's Gate); swiglu_limit 0 means an unclamped SwiGLU.
    scoring = f.str("scoring_func", "sqrtsoftplus", choices=("sqrtsoftplus", "sigmoid", "softmax"))
    router = RouterConfig(scoring, f.float("routed_scaling_factor", 1.5, positive=True), scoring != "softmax")
    moe = MoEConfig(experts, top_k, width, shared, shared * width, router_bias=True, router=router,
                    swiglu_limit=f.float("swiglu_limit", 10.0, minimum=0.0))
    layers = tuple(LayerSpec(i, "v4", ffn[i], v4.window, ratios[i][0], csa=ratios[i][1]) for i in range(n))
    mtp_ratio = [ratios[n + i] if n + i < len(ratios) else (0, False) for i in range(n_mtp)]
    mtp_layers = tuple(LayerSpec(n + i, "v4", "moe", v4.window, r, mtp=True, csa=csa)
                       for i, (r, csa) in enumerate(mtp_ratio))
    f.ignore("intermediate_size", "compress_rate_csa", "compress_rate_hca", "attention_bias", "mlp_bias")
    return ModelSpec(
        name=name, family="deepseek_v4", hidden_size=c["hidden"], vocab_size=c["vocab"],
        max_position=c["max_position"], tie_embeddings=f.bool("tie_word_embeddings", False),
        dense_intermediate=None, layers=layers, mtp_layers=mtp_layers,
        norm_eps=_norm_eps(f, "deepseek_v4"), rope=main_rope, v4=v4, indexer=indexer,
        moe=moe, hc_mult=f.int("hc_mult"), engram=_parse_engram(f, n),
        quant=_parse_quant(f, "deepseek_v4"))


def _v4_ropes(f: Fields, dim: int, max_position: int, official: bool) -> tuple[RopeConfig, RopeConfig]:
    """(main, compress) interleaved RoPEs: window-only layers rotate at rope_theta without
    scaling, compressed layers and the indexer at compress_rope_theta with YaRN when configured,
    its cos/sin scale 1 unless given (DeepseekV4Config sets attention_factor 1.0). Read from
    transformers' nested rope_parameters {"main", "compress"}, else a flat rope_scaling /
    rope_parameters (the compressed layers'), else the official original_seq_len / rope_factor."""
    theta = f.float("rope_theta", 10000.0, positive=True)
    compress_theta = f.float("compress_rope_theta", 160000.0, positive=True)
    main = RopeConfig(theta, dim, interleave=True)
    given = f.raw("rope_parameters", None)
    if isinstance(given, dict) and isinstance(given.get("main"), dict) and isinstance(given.get("compress"), dict):
        nested = f.sub("rope_parameters")
        p_main, p_comp = nested.sub("main"), nested.sub("compress")
        nested.check_unknown("deepseek_v4")
        main = _rope(p_main, "deepseek_v4", _theta(p_main, theta), dim, max_position, interleave=True,
                     kinds=("default",))
        return main, _rope(p_comp, "deepseek_v4", _theta(p_comp, compress_theta), dim, max_position,
                           interleave=True, kinds=("default", "yarn"), attention_factor=1.0)
    if official:
        compress = RopeConfig(compress_theta, dim, interleave=True)
        original = f.int("original_seq_len", 0, minimum=0)
        # rope_factor: the ModelArgs default _from_official also assumes for max_position.
        factor = f.float("rope_factor", 40.0, positive=True)
        fast, slow = f.float("beta_fast", 32.0, positive=True), f.float("beta_slow", 1.0, positive=True)
        if original > 0:
            compress = replace(compress, kind="yarn", factor=factor, original_max_position=original,
                               beta_fast=fast, beta_slow=slow)
        return main, compress
    return main, _rope(_rope_params(f), "deepseek_v4", compress_theta, dim, max_position, interleave=True,
                       kinds=("default", "yarn"), attention_factor=1.0)


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
def _norm_eps(f: Fields, family: str) -> float:
    aliases = ("norm_eps",) if family == "deepseek_v4" else ()    # the official name, in V4 HF-layout files too
    return f.float("rms_norm_eps", DEFAULT_NORM_EPS.get(family, 1e-6), minimum=0.0, aliases=aliases)


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
    base = canonical(base_name)
    if base not in ("bf16", "fp16", "fp32", "fp64"):
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
        scale_fmt = q.str("scale_fmt", choices=("ue8m0",)) if q.has("scale_fmt") else None
        return Quantization("fp8" if experts == "fp8" else "fp8+fp4", base, "fp8", experts, (block[0], block[1]),
                            scale_fmt=scale_fmt)
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
        if bits == 4 and typ == "float" and w.get("group_size") == 32:
            # MXFP4 experts (Kimi K3 "mxfp4-pack-quantized"; `ignore` keeps attention and dense MLPs bf16)
            return Quantization("compressed-tensors", base, base, "fp4")
        raise ConfigError(f"field 'quantization_config.config_groups': {bits}-bit {typ} weights are not supported")
    raise ConfigError(f"field 'quantization_config.quant_method' {method!r} is not supported "
                      "(supported: fp8, mxfp4, compressed-tensors); override with --weight-dtype")
