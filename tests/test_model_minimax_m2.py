"""MiniMax-M2 against transformers==5.23.0 in float64: full-width q/k norms, partial RoPE (legacy
rotary_dim, partial_rotary_factor, with and without yarn), sigmoid router whose correction bias
only steers selection, per-expert (w1/w2/w3) and fused expert checkpoints, incremental decoding, ragged paged batches.

Expert counts are multiples of 32, like the real model's 256: the router's float32 sigmoid (as in
transformers) is then evaluated on whole SIMD blocks for any number of tokens. With, say, 4 experts a
2-token decode step takes ATen's scalar tail, which can differ by one float32 ulp from the vectorised
value of a full forward, and decode-vs-full differs by ~1e-8 in transformers itself as well."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from tierlm.model import Cache, load  # noqa: E402

T = transformers
BASE = dict(vocab_size=97, hidden_size=32, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    # The released checkpoints' form: rotary_dim (half the head), rope_theta at the top level.
    "rotary-dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, rotary_dim=8,
                       intermediate_size=16, num_hidden_layers=2, num_local_experts=32, num_experts_per_tok=2),
    # partial_rotary_factor inside rope_parameters with yarn; top-3 experts; one KV head; tied head.
    "partial-yarn-top3": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, intermediate_size=12,
                              num_hidden_layers=3, num_local_experts=32, num_experts_per_tok=3, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                               "partial_rotary_factor": 0.75, "original_max_position_embeddings": 64}),
    # Full RoPE with the class default theta, MHA heads of 12, top-4 of 64 experts.
    "full-rope-mha": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=12, intermediate_size=20,
                          num_hidden_layers=2, num_local_experts=64, num_experts_per_tok=4),
}


def make(name, tmp_path):
    cfg = T.MiniMaxM2Config(**{**BASE, **CONFIGS[name]})
    cfg._experts_implementation = "eager"
    torch.manual_seed(len(name))
    ref = T.MiniMaxM2ForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for p in ref.parameters():       # random everything, norms included
            p.normal_(0, 0.3)
        for layer in ref.model.layers:   # the correction bias is a buffer: randomise it too
            layer.mlp.e_score_correction_bias.normal_(0, 0.3)
    path = tmp_path / name
    ref.save_pretrained(path)
    return ref, path


def check(ref, ours):
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
        assert (got - want).abs().max().item() <= 1e-9
        cache = Cache()
        steps = [ours(ids[:, :6], cache)] + [ours(ids[:, t:t + 1], cache) for t in range(6, 14)]
        assert (torch.cat(steps, dim=1) - got).abs().max().item() <= 1e-9
        assert cache.length == 14
    return ids, got


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_and_incremental(name, tmp_path):
    ref, path = make(name, tmp_path)
    names = set(load_file(path / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names       # what save_pretrained writes
    assert "model.layers.0.block_sparse_moe.e_score_correction_bias" in names
    ours = load(path, dtype=torch.float64, progress=False)
    ids, got = check(ref, ours)
    # The correction bias changes which experts are chosen (and so the logits).
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.block_sparse_moe.e_score_correction_bias.zero_()
        assert (ours(ids) - got).abs().max().item() > 1e-6


def test_legacy_rotary_dim_config(tmp_path):
    """config.json as released (rope_theta and rotary_dim at the top level, no rope_parameters)."""
    ref, path = make("rotary-dim", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=5000000, rotary_dim=8)
    (path / "config.json").write_text(json.dumps(cfg))
    assert T.MiniMaxM2Config.from_pretrained(path).rope_parameters["partial_rotary_factor"] == 0.5
    check(ref, load(path, dtype=torch.float64, progress=False))


def test_fused_expert_checkpoint(tmp_path):
    """transformers' runtime layout: mlp.experts.gate_up_proj [E, 2I, h] = [w1; w3], down_proj [E, h, I]."""
    ref, path = make("full-rope-mha", tmp_path)
    tensors = load_file(path / "model.safetensors")
    out = {}
    E = CONFIGS["full-rope-mha"]["num_local_experts"]
    for i in range(CONFIGS["full-rope-mha"]["num_hidden_layers"]):
        old, new = f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
        out[new + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors.pop(f"{old}experts.{e}.w1.weight"), tensors.pop(f"{old}experts.{e}.w3.weight")])
             for e in range(E)])
        out[new + "experts.down_proj"] = torch.stack([tensors.pop(f"{old}experts.{e}.w2.weight") for e in range(E)])
        out[new + "gate.weight"] = tensors.pop(old + "gate.weight")
        out[new + "e_score_correction_bias"] = tensors.pop(old + "e_score_correction_bias")
    out.update(tensors)
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    ours = load(path, dtype=torch.float64, progress=False)
    assert ours.model.layers[0].ffn_name == "mlp"
    check(ref, ours)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ragged_paged_batch(name, tmp_path):
    """Rows of different lengths in one step, blocks scattered over the pools: each row equals
    transformers on that row alone."""
    from paged import assert_rows_match_transformers
    ref, path = make(name, tmp_path)
    assert_rows_match_transformers(ref, load(path, dtype=torch.float64, progress=False))
