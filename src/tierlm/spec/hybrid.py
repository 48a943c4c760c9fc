"""config.json -> ModelSpec for the hybrid-attention families the planner knows but the
engine does not run yet: Qwen3.5+ (gated-delta-net), Kimi K3 (KDA + MLA), MiniMax M3 (MSA),
Gemma 4 (shared-KV layers, global head dim), Cohere Command R / R7B / A, MiMo V2.x (own SWA
heads) and Inkling (SWA + SConv + an MTP draft stack).

Fields are read strictly (`Fields`), as in config.py. Everything that sizes the cache is
typed and checked; RoPE is kept at its base theta and rotated width (no model code reads it),
and weights follow the checkpoints' main projections (docs/planner.md lists what is left out).
"""

from __future__ import annotations

from ..dtypes import canonical
from ..errors import ConfigError
from .fields import Fields
from .model import (GQAConfig, LayerSpec, LinearAttnConfig, MLAConfig, ModelSpec, MoEConfig, MSAConfig,
                    RopeConfig, RouterConfig)

HYBRID_FAMILIES = ("qwen3_5_text", "qwen3_5_moe_text", "kimi_linear", "minimax_m3", "gemma4_text",
                   "cohere", "cohere2", "mimo_v2", "mimo_v2_flash", "inkling")
DTYPES = ("fp32", "bf16", "fp16")              # what hybrid configs store weights and states in
# Keys these families' configs carry that change neither cache nor the weights tierlm counts
# (activation, norm and gating flavours, training-only and multimodal settings).
IGNORED = ("attention_bias", "attn_output_gate", "output_gate_type", "full_attention_interval", "mtp_use_dedicated_embeddings",
           "mlp_only_layers", "head_dim", "layer_norm_eps", "logit_scale", "use_qk_norm", "use_embedding_sharing",
           "use_parallel_block", "rotary_pct", "position_embedding_type", "use_gated_activation",
           "use_parallel_embedding", "model_max_length", "sliding_window_pattern", "order_of_interleaved_layers",
           "attention_k_eq_v", "use_double_wide_mlp", "use_bidirectional_attention", "vocab_size_per_layer_input",
           "final_logit_softcapping", "hidden_activation", "enable_moe_block", "expert_intermediate_size",
           "activation_situ_beta", "activation_situ_linear_beta", "attn_res_block_size", "latent_moe_use_norm",
           "mla_use_nope", "mla_use_output_gate", "moe_renormalize", "moe_router_activation_func",
           "num_expert_group", "use_grouped_topk", "attention_output_gate", "qk_norm_type", "use_gemma_norm",
           "use_routing_bias", "rotary_dim", "attention_chunk_size", "attention_value_scale",
           "add_swa_attention_sink_bias", "add_full_attention_sink_bias", "swa_rope_theta", "layernorm_epsilon",
           "d_rel", "rel_extent", "log_scaling_n_floor", "log_scaling_alpha", "use_embed_norm",
           "shared_expert_sink", "route_scale", "use_gate_bias", "gate_activation", "norm_after_topk",
           "use_global_scale", "logits_mup_width_multiplier", "unpadded_vocab_size", "use_sconv",
           "inference_moe_w13_interleaved", "padded_vocab_size", "v_head_dim", "sliding_window_size",
           "moe_router_dtype", "index_share_for_mtp_iteration", "num_nextn_predict_layers")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _moe(experts: int, top_k: int, width: int, shared: int = 0, shared_width: int = 0, **kw) -> MoEConfig:
    _check(top_k <= experts, f"top-k ({top_k}) exceeds the number of experts ({experts})")
    return MoEConfig(experts, top_k, width, shared, shared_width, **kw)


def _types(f: Fields, key: str, n: int, names: dict[str, str]) -> list[str]:
    types = f.str_list(key)
    _check(len(types) == n, f"field '{key}' has {len(types)} entries but 'num_hidden_layers' is {n}")
    for i, t in enumerate(types):
        _check(t in names, f"field '{key}[{i}]' must be one of {', '.join(names)}, got {t!r}")
    return [names[t] for t in types]


def _state_dtype(name: str) -> str:
    """A recurrent state's dtype name; fp32 for anything hybrid configs do not store states in."""
    return canonical(name) if canonical(name) in DTYPES else "fp32"


def _dtype(f: Fields) -> str:
    name = f.raw("torch_dtype", "bfloat16", aliases=("dtype",))
    _check(canonical(name) in DTYPES, f"field 'torch_dtype' must be bfloat16, float16 or float32, got {name!r}")
    return canonical(name)


def parse_hybrid(f: Fields, family: str, name: str, quant) -> ModelSpec:
    """ModelSpec of one of HYBRID_FAMILIES; `quant` parses quantization_config (config._parse_quant)."""
    parser = {"qwen3_5_text": _qwen35, "qwen3_5_moe_text": _qwen35, "kimi_linear": _kimi_linear,
              "minimax_m3": _minimax_m3, "gemma4_text": _gemma4, "cohere": _cohere, "cohere2": _cohere,
              "mimo_v2": _mimo, "mimo_v2_flash": _mimo, "inkling": _inkling}[family]
    n = f.int("num_hidden_layers")
    _check(n <= 4096, f"field 'num_hidden_layers' is implausibly large ({n})")
    kw = parser(f, family, n)
    f.ignore(*IGNORED)
    _dtype(f)
    spec = ModelSpec(name=name, family=family, hidden_size=f.int("hidden_size"), vocab_size=f.int("vocab_size"),
                     max_position=kw.pop("max_position", None) or f.int("max_position_embeddings"),
                     tie_embeddings=f.bool("tie_word_embeddings", kw.pop("tie_default", False)),
                     norm_eps=f.float("rms_norm_eps", 1e-6, minimum=0.0), **kw, quant=quant(f, family))
    return spec


def _gqa(f: Fields, heads_key: str = "num_attention_heads", kv_key: str = "num_key_value_heads",
         dim_key: str = "head_dim", v_key: str | None = None, hidden: int | None = None, **kw) -> GQAConfig:
    heads = f.int(heads_key)
    kv = f.int(kv_key)
    _check(heads % kv == 0, f"field '{kv_key}' ({kv}) must divide '{heads_key}' ({heads})")
    if f.has(dim_key):
        d = f.int(dim_key)
    else:
        _check(hidden is not None and hidden % heads == 0, f"missing field '{dim_key}'")
        f.ignore(dim_key)
        d = hidden // heads
    v = f.int(v_key) if v_key and f.has(v_key) else d
    return GQAConfig(heads, kv, d, v, **kw)


def _rope(f: Fields, dim: int) -> RopeConfig:
    return RopeConfig(f.float("rope_theta", 10000.0, positive=True), dim)


# ---------------------------------------------------------------------------- Qwen3.5 / 3.6 / 3.8
def _qwen35(f: Fields, family: str, n: int) -> dict:
    """Qwen3_5(Moe)TextConfig: layer_types linear_attention / full_attention; GDN state shapes as
    vLLM's mamba_utils (conv over q, k, v channels; one d_k x d_v state per value head)."""
    kinds = _types(f, "layer_types", n, {"linear_attention": "linear", "full_attention": "full"})
    linear = LinearAttnConfig("gdn", f.int("linear_num_key_heads"), f.int("linear_key_head_dim"),
                              f.int("linear_num_value_heads"), f.int("linear_value_head_dim"),
                              f.int("linear_conv_kernel_dim"), _state_dtype(f.str("mamba_ssm_dtype", "float32")))
    _check(linear.conv_kernel >= 2, "field 'linear_conv_kernel_dim' must be >= 2")
    gqa = _gqa(f, qk_norm="head")
    moe, ffn, dense = None, ["dense"] * n, None
    if family == "qwen3_5_moe_text":
        moe = _moe(f.int("num_experts"), f.int("num_experts_per_tok"), f.int("moe_intermediate_size"),
                   1, f.int("shared_expert_intermediate_size"), shared_gate=True,
                   router=RouterConfig(norm_topk_prob=True))
        ffn = ["moe"] * n
        f.ignore("intermediate_size")
    else:
        dense = f.int("intermediate_size")
    n_mtp = f.int("mtp_num_hidden_layers", 0, minimum=0)
    layers = tuple(LayerSpec(i, k, ffn[i]) for i, k in enumerate(kinds))
    mtp = tuple(LayerSpec(n + i, "full", ffn[-1], mtp=True) for i in range(n_mtp))
    return dict(dense_intermediate=dense, layers=layers, mtp_layers=mtp, rope=_rope(f, gqa.head_dim // 4),
                gqa=gqa, moe=moe, linear=linear)


# ---------------------------------------------------------------------------- Kimi K3
def _kimi_linear(f: Fields, family: str, n: int) -> dict:
    """KimiLinearConfig: linear_attn_config lists 1-based kda_layers / full_attn_layers; full
    layers are MLA; KDA keeps a q/k/v short conv (kernel short_conv_kernel_size) in bf16 and an
    fp32 d x d state per head (kvcache.ai kimi_kda_mla_hybrid)."""
    la = f.sub("linear_attn_config")
    _check(la is not None, "missing field 'linear_attn_config'")
    kda = set(la.int_list("kda_layers", minimum=1))
    full = set(la.int_list("full_attn_layers", minimum=1))
    _check(kda.isdisjoint(full) and kda | full == set(range(1, n + 1)),
           "fields 'linear_attn_config.kda_layers' and 'full_attn_layers' must partition layers 1..num_hidden_layers")
    heads, d = la.int("num_heads"), la.int("head_dim")
    linear = LinearAttnConfig("kda", heads, d, heads, d, la.int("short_conv_kernel_size"), "fp32")
    la.ignore("gate_lower_bound", "use_full_rank_gate")
    la.check_unknown(family)
    mla = MLAConfig(f.int("num_attention_heads"), f.opt_int("q_lora_rank"), f.int("kv_lora_rank"),
                    f.int("qk_nope_head_dim"), f.int("qk_rope_head_dim"), f.int("v_head_dim"))
    f.ignore("num_key_value_heads")
    first_dense = f.int("first_k_dense_replace", 0, minimum=0)
    freq = f.int("moe_layer_freq", 1)
    ffn = ["moe" if i >= first_dense and i % freq == 0 else "dense" for i in range(n)]
    width = f.int("moe_intermediate_size")
    shared = f.int("num_shared_experts", 0, minimum=0)
    f.ignore("routed_expert_hidden_size", "topk_group", "topk_method")
    moe = _moe(f.int("num_experts"), f.int("num_experts_per_token"), width, shared, shared * width,
               router_bias=True, router=RouterConfig("sigmoid", f.float("routed_scaling_factor", 1.0, positive=True),
                                                     True))
    _check(f.int("num_nextn_predict_layers", 0, minimum=0) == 0, "Kimi K3 draft layers are not supported")
    layers = tuple(LayerSpec(i, "mla" if i + 1 in full else "linear", ffn[i]) for i in range(n))
    return dict(dense_intermediate=f.int("intermediate_size"), layers=layers, mtp_layers=(),
                rope=RopeConfig(10000.0, mla.qk_rope_head_dim, interleave=True), mla=mla, moe=moe, linear=linear)


# ---------------------------------------------------------------------------- MiniMax M3
def _minimax_m3(f: Fields, family: str, n: int) -> dict:
    """MiniMaxM3: sparse_attention_config.sparse_attention_freq marks the MSA layers, which add a
    key-only index cache of sparse_index_dim per token (kvcache.ai minimax_msa). The MTP modules
    are not counted (the calculator excludes their KV too)."""
    sa = f.sub("sparse_attention_config")
    _check(sa is not None, "missing field 'sparse_attention_config'")
    marks = sa.int_list("sparse_attention_freq")
    _check(len(marks) == n and set(marks) <= {0, 1}, "field 'sparse_attention_config.sparse_attention_freq' must "
           "hold one 0/1 per layer")
    msa = MSAConfig(sa.int("sparse_num_index_heads"), sa.int("sparse_index_dim"), sa.int("sparse_block_size"),
                    sa.int("sparse_topk_blocks"), sa.int("sparse_local_block", 0, minimum=0))
    _check(sa.bool("use_sparse_attention", True), "field 'sparse_attention_config.use_sparse_attention' is false")
    sa.ignore("sparse_disable_index_value", "sparse_init_block", "sparse_score_type")
    sa.check_unknown(family)
    moe_marks = f.int_list("moe_layer_freq")
    _check(len(moe_marks) == n, "field 'moe_layer_freq' must hold one entry per layer")
    ffn = ["moe" if m else "dense" for m in moe_marks]
    f.ignore("first_k_dense_replace", "intermediate_size", "num_mtp_modules", "swiglu_limit", "swiglu_alpha",
             "partial_rotary_factor")
    shared = f.int("n_shared_experts", 0, minimum=0)
    moe = _moe(f.int("num_local_experts"), f.int("num_experts_per_tok"), f.int("moe_intermediate_size"),
               shared, shared * f.int("shared_intermediate_size"), router_bias=True,
               router=RouterConfig("sigmoid", f.float("routed_scaling_factor", 1.0, positive=True), True))
    gqa = _gqa(f, qk_norm="head")
    layers = tuple(LayerSpec(i, "msa" if marks[i] else "full", ffn[i]) for i in range(n))
    return dict(dense_intermediate=f.int("dense_intermediate_size"), layers=layers, mtp_layers=(),
                rope=_rope(f, gqa.head_dim // 2), gqa=gqa, moe=moe, msa=msa)


# ---------------------------------------------------------------------------- Gemma 4
def _gemma4(f: Fields, family: str, n: int) -> dict:
    """Gemma4TextConfig: full layers use global_head_dim and num_global_key_value_heads (else
    num_key_value_heads); the last num_kv_shared_layers layers reuse an earlier layer's KV and
    store none. K and V are both counted on global layers (the kvcache.ai convention)."""
    window = f.int("sliding_window")
    kinds = _types(f, "layer_types", n, {"full_attention": "full", "sliding_attention": "sliding"})
    shared = f.int("num_kv_shared_layers", 0, minimum=0)
    _check(shared < n, f"field 'num_kv_shared_layers' ({shared}) must be below 'num_hidden_layers' ({n})")
    swa = _gqa(f, qk_norm="head")
    glob_kv = f.opt_int("num_global_key_value_heads") or swa.num_kv_heads
    gdim = f.int("global_head_dim", swa.head_dim)
    gqa = GQAConfig(swa.num_heads, glob_kv, gdim, gdim, qk_norm="head")
    moe, ffn = None, ["dense"] * n
    if f.has("num_experts"):
        moe = _moe(f.int("num_experts"), f.int("top_k_experts"), f.int("moe_intermediate_size"))
        ffn = ["moe"] * n       # every layer also runs the dense MLP (intermediate_size) beside its experts
    else:
        f.ignore("num_experts", "top_k_experts", "moe_intermediate_size")
    per_layer = f.int("hidden_size_per_layer_input", 0, minimum=0)
    layers = tuple(LayerSpec(i, k, ffn[i], window if k == "sliding" else None, kv_shared=i >= n - shared)
                   for i, k in enumerate(kinds))
    return dict(dense_intermediate=f.int("intermediate_size"), layers=layers, mtp_layers=(),
                rope=_rope(f, gdim // 4), gqa=gqa, swa_gqa=swa, moe=moe, tie_default=True,
                norms_per_layer=4 + (1 if per_layer else 0))


# ---------------------------------------------------------------------------- Cohere
def _cohere(f: Fields, family: str, n: int) -> dict:
    """CohereConfig (Command R, every layer full) and Cohere2Config (Command R7B / A: layer_types,
    else 3 sliding then 1 full, the sliding_window_pattern 4 of Cohere2Config)."""
    hidden = f.int("hidden_size")
    gqa = _gqa(f, hidden=hidden)
    if family == "cohere":
        kinds = [("full", None)] * n
    else:
        window = f.int("sliding_window")
        if f.has("layer_types"):
            names = _types(f, "layer_types", n, {"full_attention": "full", "sliding_attention": "sliding"})
        else:
            pattern = f.int("sliding_window_pattern", 4)
            names = ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(n)]
        kinds = [(k, window if k == "sliding" else None) for k in names]
    layers = tuple(LayerSpec(i, k, "dense", w) for i, (k, w) in enumerate(kinds))
    return dict(dense_intermediate=f.int("intermediate_size"), layers=layers, mtp_layers=(),
                rope=_rope(f, gqa.head_dim), gqa=gqa, tie_default=True, norms_per_layer=1)


# ---------------------------------------------------------------------------- MiMo V2.x
def _mimo(f: Fields, family: str, n: int) -> dict:
    """MiMo-V2: hybrid_layer_pattern 1 = sliding (swa_* heads and dims), 0 = full; K and V head
    dims differ (head_dim / v_head_dim). The MTP block is not counted (no draft in kvcache.ai)."""
    pattern = f.int_list("hybrid_layer_pattern")
    _check(len(pattern) == n and set(pattern) <= {0, 1}, "field 'hybrid_layer_pattern' must hold one 0/1 per layer")
    window = f.int("sliding_window", aliases=("sliding_window_size",))
    gqa = _gqa(f, v_key="v_head_dim")
    swa = _gqa(f, "swa_num_attention_heads", "swa_num_key_value_heads", "swa_head_dim", "swa_v_head_dim")
    moe_marks = f.raw("moe_layer_freq")
    _check(isinstance(moe_marks, list) and len(moe_marks) == n, "field 'moe_layer_freq' must hold one entry per layer")
    ffn = ["moe" if m else "dense" for m in moe_marks]
    shared = f.opt_int("n_shared_experts", minimum=0) or 0
    width = f.int("moe_intermediate_size")
    moe = _moe(f.int("n_routed_experts"), f.int("num_experts_per_tok"), width, shared, shared * width,
               router_bias=True, router=RouterConfig("sigmoid", f.float("routed_scaling_factor", 1.0, positive=True),
                                                     f.bool("norm_topk_prob", True), True,
                                                     f.int("n_group", 1), f.int("topk_group", 1)))
    # Numerics no planner figure uses, still checked so that a typo cannot pass.
    for key in ("partial_rotary_factor", "attention_value_scale", "swa_rope_theta", "layernorm_epsilon"):
        f.float(key, 1.0, positive=True)
    f.ignore("scoring_func", "topk_method", "num_nextn_predict_layers")
    layers = tuple(LayerSpec(i, "sliding" if p else "full", ffn[i], window if p else None)
                   for i, p in enumerate(pattern))
    return dict(dense_intermediate=f.int("intermediate_size"), layers=layers, mtp_layers=(),
                rope=_rope(f, gqa.head_dim // 3), gqa=gqa, swa_gqa=swa, moe=moe)


# ---------------------------------------------------------------------------- Inkling
def _inkling(f: Fields, family: str, n: int) -> dict:
    """Inkling text model: local_layer_ids are SWA layers (swa_* heads), the rest global; every
    layer has a short conv (SConv, kernel sconv_kernel_size) on k, v and two hidden-size streams.
    The MTP chain (`mtp_config`, moved into the text config by the wrapper) is a draft stack
    with its own local_layer_ids and a dense MLP."""
    local = set(f.int_list("local_layer_ids"))
    _check(all(i < n for i in local), "field 'local_layer_ids' names a layer beyond 'num_hidden_layers'")
    window = f.int("sliding_window_size", aliases=("sliding_window",))
    gqa = _gqa(f)
    swa = _gqa(f, "swa_num_attention_heads", "swa_num_key_value_heads", "swa_head_dim")
    dense_layers = f.int("dense_mlp_idx", 0, minimum=0)
    ffn = ["dense" if i < dense_layers else "moe" for i in range(n)]
    shared = f.int("n_shared_experts", 0, minimum=0)
    width = f.int("intermediate_size")
    moe = _moe(f.int("n_routed_experts"), f.int("num_experts_per_tok"), width, shared, shared * width,
               router_bias=True, router=RouterConfig("sigmoid", norm_topk_prob=True))
    mtp: tuple[LayerSpec, ...] = ()
    m = f.sub("mtp_config")
    if m is not None:
        k = m.int("num_nextn_predict_layers", minimum=0)
        mloc = set(m.int_list("local_layer_ids"))
        m.ignore("chain_hidden_post_norm")
        m.check_unknown(family)
        mtp = tuple(LayerSpec(n + i, "sliding" if i in mloc else "full", "dense", window if i in mloc else None,
                              mtp=True) for i in range(k))
    layers = tuple(LayerSpec(i, "sliding" if i in local else "full", ffn[i], window if i in local else None)
                   for i in range(n))
    return dict(dense_intermediate=f.int("dense_intermediate_size"), layers=layers, mtp_layers=mtp,
                max_position=f.int("model_max_length"), rope=RopeConfig(10000.0, gqa.head_dim), gqa=gqa,
                swa_gqa=swa, moe=moe, sconv_kernel=f.int("sconv_kernel_size", minimum=2))
