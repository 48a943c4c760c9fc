"""Strict reading of config.json fields.

`Fields` hands out typed values and remembers which keys were consumed, so that a key
nobody read is reported as unknown instead of being silently ignored. Every error names
the field (with its path for nested configs) and says what was expected.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError

_MISSING = object()

# Keys that never change bytes, FLOPs or placement (metadata, training-only settings,
# tokenizer ids, activation names, norm epsilons, RoPE and router settings), so allowed in
# every config. Those that change the model's numerics are read, typed and checked, by the
# parsers of the families that use them (config.py); the other families ignore them.
METADATA_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype",
    "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
    "rms_norm_eps", "layer_norm_eps", "norm_eps", "hidden_act", "attention_dropout", "hidden_dropout",
    "rope_theta", "rope_scaling", "rope_parameters", "rope_interleave", "tokenizer_class",
    "output_router_logits", "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "router_jitter_noise",
    "pretraining_tp", "max_window_layers", "initializer_factor", "use_bfloat16",
    "is_encoder_decoder", "tie_encoder_decoder", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "chunk_size_feed_forward", "problem_type",
    "id2label", "label2id", "task_specific_params", "bos_token", "eos_token",
    "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
    "rope_local_base_freq", "cache_implementation", "use_sliding_window",
    "ep_size", "topk_method", "norm_topk_prob", "scoring_func", "routed_scaling_factor",
    "n_group", "topk_group", "moe_layer_freq", "swiglu_limit", "hc_sinkhorn_iters", "hc_eps",
    "compress_rope_theta", "partial_rotary_factor", "mtp_loss_scaling_factor",
    "experts_per_token_scale", "use_qk_norm_bias", "router_dtype", "layer_norm_epsilon",
    "indexer_rope_interleave", "rope_type", "initial_context_length",
    "mlp_intermediate_size", "ep_size", "_sliding_window_pattern", "swiglu_alpha", "hidden_activation",
    "use_bidirectional_attention",
    # PretrainedConfig defaults that older transformers versions saved into every config.
    "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "is_decoder", "length_penalty", "max_length",
    "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
    "output_scores", "prefix", "pruned_heads", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "temperature", "tf_legacy_loss",
    "top_k", "top_p", "typical_p",
})


# No real config has a dimension, count or vocabulary beyond 2^40; larger values are typos
# (and would make the planner allocate absurd per-layer tables).
MAX_INT = 2**40


class Fields:
    """Typed, consumption-tracking view of one config dict."""

    def __init__(self, cfg: Any, where: str = "config"):
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
        self.cfg = cfg
        self.where = where
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return key if self.where == "config" else f"{self.where}.{key}"

    def has(self, key: str) -> bool:
        return key in self.cfg and self.cfg[key] is not None

    def first_present(self, *keys: str) -> str | None:
        for k in keys:
            if self.has(k):
                return k
        return None

    def raw(self, key: str, default: Any = _MISSING, aliases: tuple[str, ...] = ()) -> Any:
        for k in (key, *aliases):
            self.used.add(k)
        k = self.first_present(key, *aliases)
        if k is None:
            if default is _MISSING:
                raise ConfigError(f"missing field '{self.name(key)}'"
                                  + (f" (or {', '.join(repr(self.name(a)) for a in aliases)})" if aliases else ""))
            return default
        return self.cfg[k]

    def int(self, key: str, default: Any = _MISSING, *, minimum: int = 1,
            aliases: tuple[str, ...] = ()) -> int:
        value = self.raw(key, default, aliases)
        if value is default and default is not _MISSING:
            return value
        return self._as_int(self.first_present(key, *aliases) or key, value, minimum)

    def _as_int(self, key: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"field '{self.name(key)}' must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"field '{self.name(key)}' must be >= {minimum}, got {value}")
        if value > MAX_INT:
            raise ConfigError(f"field '{self.name(key)}' is implausibly large ({value}; at most {MAX_INT})")
        return value

    def float(self, key: str, default: Any = _MISSING, *, positive: bool = False, minimum: float | None = None,
              aliases: tuple[str, ...] = ()) -> float:
        """A finite number (JSON int or float); NaN and infinities are errors."""
        value = self.raw(key, default, aliases)
        if value is default and default is not _MISSING:
            return value
        name = self.name(self.first_present(key, *aliases) or key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"field '{name}' must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"field '{name}' is implausibly large ({value})") from None
        if not math.isfinite(value):
            raise ConfigError(f"field '{name}' must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise ConfigError(f"field '{name}' must be > 0, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"field '{name}' must be >= {minimum}, got {value!r}")
        return value

    def opt_int(self, key: str, *, minimum: int = 1, aliases: tuple[str, ...] = ()) -> int | None:
        """An integer that may be absent or null (e.g. q_lora_rank for V2-Lite)."""
        value = self.raw(key, None, aliases)
        if value is None:
            return None
        return self._as_int(self.first_present(key, *aliases) or key, value, minimum)

    def bool(self, key: str, default: Any = _MISSING, aliases: tuple[str, ...] = ()) -> bool:
        value = self.raw(key, default, aliases)
        if not isinstance(value, bool):
            raise ConfigError(f"field '{self.name(key)}' must be true or false, got {value!r}")
        return value

    def str(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None,
            aliases: tuple[str, ...] = ()) -> str:
        value = self.raw(key, default, aliases)
        if not isinstance(value, str):
            raise ConfigError(f"field '{self.name(key)}' must be a string, got {value!r}")
        if choices is not None and value not in choices:
            raise ConfigError(f"field '{self.name(key)}' must be one of {', '.join(choices)}; got {value!r}")
        return value

    def int_list(self, key: str, default: Any = _MISSING, *, minimum: int = 0,
                 aliases: tuple[str, ...] = ()) -> list[int]:
        value = self.raw(key, default, aliases)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list):
            raise ConfigError(f"field '{self.name(key)}' must be a list of integers, got {value!r}")
        return [self._as_int(f"{key}[{i}]", v, minimum) for i, v in enumerate(value)]

    def str_list(self, key: str, default: Any = _MISSING, aliases: tuple[str, ...] = ()) -> list[str]:
        value = self.raw(key, default, aliases)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"field '{self.name(key)}' must be a list of strings, got {value!r}")
        return value

    def sub(self, key: str) -> Fields | None:
        """A nested object (e.g. quantization_config), or None when absent."""
        self.used.add(key)
        if not self.has(key):
            return None
        return Fields(self.cfg[key], self.name(key))

    def ignore(self, *keys: str) -> None:
        self.used.update(keys)

    def check_unknown(self, family: str) -> None:
        unknown = sorted(k for k in self.cfg if k not in self.used and k not in METADATA_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown field '{self.name(unknown[0])}' for model_type '{family}'"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                + "; pass allow_unknown=True / --allow-unknown-fields to ignore it")
