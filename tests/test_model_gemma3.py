"""Gemma 3 text decoder (gemma3_text) against transformers==5.23.0 Gemma3ForCausalLM in float64,
plus incremental decoding that reads only within the sliding windows, ragged paged batches and
the multimodal wrapper config."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tierlm.model import Cache, load  # noqa: E402
from tierlm.spec.config import load_config_file, parse_config  # noqa: E402

T = transformers
S, F = "sliding_attention", "full_attention"
BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, max_position_embeddings=512)
CONFIGS = {
    # v5-style nested rope_parameters: linear scaling on the global layers only; windows of 4
    # (shorter than the 14-token sequence); GQA 4/2; a query_pre_attn_scalar != head_dim; tied.
    "local-global-linear": dict(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                layer_types=[S, S, F, S, F], sliding_window=4, query_pre_attn_scalar=12,
                                rope_parameters={F: {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                                                 S: {"rope_type": "default", "rope_theta": 300.0}}),
    # v4-style fields (rope_theta, rope_local_base_freq, rope_scaling), final logit soft-capping
    # (a tight cap so tanh bites), an attn_logit_softcapping that transformers' Gemma3 ignores (so
    # must we), biased attention projections, untied lm_head, head_dim != hidden / heads, one KV
    # head, window 3.
    "softcap-legacy-rope": dict(num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                layer_types=[S, F, S, S], sliding_window=3, query_pre_attn_scalar=16,
                                rope_theta=20000.0, rope_local_base_freq=500.0,
                                rope_scaling={"rope_type": "linear", "factor": 2.0},
                                attn_logit_softcapping=2.0, final_logit_softcapping=3.0, attention_bias=True,
                                tie_word_embeddings=False),
    # layer_types derived from sliding_window_pattern (every 3rd layer global), MHA, default RoPE.
    "pattern-default-rope": dict(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                 sliding_window_pattern=3, sliding_window=5, query_pre_attn_scalar=16),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny float64 matmuls: threads only add contention (seconds per test on a busy 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name, tmp_path):
    kw = CONFIGS[name]
    cfg = T.Gemma3TextConfig(**{**BASE, **kw})
    torch.manual_seed(len(name))
    model = T.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():   # random everything, including the zero-initialised norms
            p.normal_(0, 0.3)
    path = tmp_path / name
    model.to(torch.float64).save_pretrained(path)
    # Reload as transformers would run it in float64 (the embedding scale is then a float64 sqrt).
    # sdpa (the default) keeps the softmax in float64; eager would take it in float32.
    ref = T.Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa").eval()
    return ref, path


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_and_incremental(name, tmp_path):
    ref, path = make(name, tmp_path)
    assert ref.config.layer_types.count(S) >= 1 and ref.config.layer_types.count(F) >= 1
    ours = load(path, dtype=torch.float64, progress=False)
    tied = {"lm_head.weight"} if ref.config.tie_word_embeddings else set()
    assert set(ours.state_dict()) == set(ref.state_dict()) - tied
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
        assert (got - want).abs().max().item() <= 1e-9
        assert want.abs().max().item() > 0.5            # not a degenerate comparison
        # prefill longer than the window, then one token at a time; before every step, what the
        # engine may free (sliding entries older than the step's first window) is NaN
        cache = Cache()
        steps = [ours(ids[:, :6], cache)]
        for t in range(6, 14):
            poison_outside_windows(ours, cache)
            steps.append(ours(ids[:, t:t + 1], cache))
        assert (torch.cat(steps, dim=1) - got).abs().max().item() <= 1e-9
        assert cache.length == 14
        # uneven chunks, some shorter and some longer than the window
        cache = Cache()
        chunks = []
        for a, b in ((0, 2), (2, 3), (3, 10), (10, 14)):
            poison_outside_windows(ours, cache)
            chunks.append(ours(ids[:, a:b], cache))
        assert (torch.cat(chunks, dim=1) - got).abs().max().item() <= 1e-9


def poison_outside_windows(model, cache):
    """NaN every sliding-layer k/v entry a query after `cache.length` cannot see (positions up to
    length - window): a layer that read one, even masked, would turn its output into NaN. Rows of
    the contiguous Cache hold their positions in order (row b, position p: entry b * capacity *
    block + p)."""
    if cache.pools is None:
        return
    for layer in model.spec.layers:
        if layer.attention != "sliding":
            continue
        old = max(0, cache.length - layer.window + 1)
        for name in ("k", "v"):
            pages = cache.pools.pages[layer.index, name][:-1]          # [B * capacity, block, width] + spare
            rows = pages.view(-1, cache.capacity * pages.shape[1], pages.shape[2])
            rows[:, :old] = float("nan")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ragged_paged_batch(name, tmp_path):
    """Rows of different lengths (all longer than the windows) in one step, blocks scattered over
    the pools: each row equals transformers on that row alone."""
    from paged import assert_rows_match_transformers
    ref, path = make(name, tmp_path)
    assert_rows_match_transformers(ref, load(path, dtype=torch.float64, progress=False))


def _tiny_wrapper(text: dict) -> dict:
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    return T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4).to_dict()


def test_multimodal_wrapper_config_builds_the_text_decoder(tmp_path):
    """A gemma3 wrapper config (text_config + vision_config) is read as its gemma3_text decoder:
    the same module, with Gemma3ForCausalLM's tensor names; no vision tower is built. A
    Gemma3ForConditionalGeneration checkpoint loads its language model (parity and the note on
    the vision tensors: test_multimodal.py)."""
    text = {**BASE, **CONFIGS["local-global-linear"]}
    wrapper = _tiny_wrapper(text)
    assert wrapper["model_type"] == "gemma3"
    spec = parse_config(wrapper, "wrapper", allow_unknown=True)
    assert spec.family == "gemma3_text" and spec.norms_per_layer == 4
    from tierlm.model.families import gemma3
    with torch.device("meta"):
        ours = gemma3.build(spec, ())
        plain = gemma3.build(parse_config(T.Gemma3TextConfig(**text).to_dict(), "text"), ())
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert not any("vision" in n or "multi_modal" in n for n in ours.state_dict())

    keep = ("text_config", "vision_config", "mm_tokens_per_image")
    cfg = T.Gemma3Config(**{k: v for k, v in wrapper.items() if k in keep})
    model = T.Gemma3ForConditionalGeneration(cfg)
    model.save_pretrained(tmp_path / "mm")
    assert parse_config(load_config_file(tmp_path / "mm"), "mm", allow_unknown=True).family == "gemma3_text"
    with pytest.warns(UserWarning, match="vision tower and projector"):
        mm = load(tmp_path / "mm", dtype=torch.float64, progress=False)
    assert list(mm.state_dict()) == list(plain.state_dict())


def test_v4_style_config_json(tmp_path):
    """Hub checkpoints (google/gemma-3-*) were saved by transformers 4.x: flat rope_theta,
    rope_local_base_freq and rope_scaling (global layers only), sliding_window_pattern instead
    of layer_types. Rewrite a checkpoint's config.json that way; both sides must read it alike."""
    import json
    kw = dict(num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=3)
    torch.manual_seed(7)
    model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**BASE, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    path = tmp_path / "v4"
    model.to(torch.float64).save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        cfg.pop(key, None)
    cfg.update(rope_theta=30000.0, rope_local_base_freq=700.0, rope_scaling={"rope_type": "linear", "factor": 3.0},
               sliding_window_pattern=2, query_pre_attn_scalar=20)
    (path / "config.json").write_text(json.dumps(cfg))
    ref = T.Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa").eval()
    assert ref.config.layer_types == [S, F, S, F]
    assert ref.config.rope_parameters[F]["factor"] == 3.0 and ref.config.rope_parameters[S]["rope_type"] == "default"
    ours = load(path, dtype=torch.float64, progress=False)
    ids = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-9
