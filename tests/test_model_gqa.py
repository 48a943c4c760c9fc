"""GQA families (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral, gpt-oss) against transformers==5.23.0
in float64, plus incremental decoding and the checkpoint loader's error paths."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from tierlm.errors import TierlmError  # noqa: E402
from tierlm.model import Cache, CheckpointError, load  # noqa: E402

T = transformers
BASE = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, max_position_embeddings=512)
CONFIGS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(num_key_value_heads=2, intermediate_size=48, num_hidden_layers=2)),
    "llama-mha-bias-tied": (T.LlamaConfig, T.LlamaForCausalLM, dict(num_key_value_heads=4, intermediate_size=40, num_hidden_layers=2,
                                                                  attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama3-rope": (T.LlamaConfig, T.LlamaForCausalLM, dict(num_key_value_heads=1, intermediate_size=48, num_hidden_layers=2,
                                                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                           "original_max_position_embeddings": 16})),
    "mistral-swa": (T.MistralConfig, T.MistralForCausalLM, dict(num_key_value_heads=2, intermediate_size=48, num_hidden_layers=2,
                                                              sliding_window=5)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(num_key_value_heads=2, intermediate_size=48, num_hidden_layers=2)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=16, intermediate_size=48, num_hidden_layers=2)),
    "qwen3-moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                                               moe_intermediate_size=16, num_hidden_layers=3, num_experts=6,
                                                               num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=True)),
    "qwen3-moe-unnormed": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(num_key_value_heads=1, head_dim=8, intermediate_size=48,
                                                                        moe_intermediate_size=16, num_hidden_layers=2, num_experts=4,
                                                                        num_experts_per_tok=3, norm_topk_prob=False)),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(num_key_value_heads=2, intermediate_size=16, num_hidden_layers=2,
                                                          num_local_experts=4, num_experts_per_tok=2, sliding_window=6)),
    # gpt-oss: q/k/v/o biases, sinks, per-layer windows (shorter than the 14-token test sequence),
    # YaRN (the class default: factor 32, no truncation; then a truncated one with its own theta),
    # biased router and fused biased experts; the second clamps its SwiGLU (limit 0.3 < typical |gate|).
    "gpt-oss": (T.GptOssConfig, T.GptOssForCausalLM, dict(num_key_value_heads=2, head_dim=8, intermediate_size=16,
                                                        num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2,
                                                        sliding_window=4,
                                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gpt-oss-yarn-truncated-clamped": (T.GptOssConfig, T.GptOssForCausalLM, dict(
        num_key_value_heads=1, head_dim=16, intermediate_size=24, num_hidden_layers=3, num_local_experts=5,
        num_experts_per_tok=3, sliding_window=5, swiglu_limit=0.3,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                         "original_max_position_embeddings": 64, "truncate": True})),
}


def make(name, tmp_path, dtype=torch.float64):
    cfg_cls, model_cls, kw = CONFIGS[name]
    cfg = cfg_cls(**{**BASE, **kw})
    cfg._experts_implementation = "eager"
    torch.manual_seed(len(name))
    ref = model_cls(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in ref.parameters():       # random everything, including zero/one-initialised norms and biases
            p.normal_(0, 0.3)
    path = tmp_path / name
    ref.save_pretrained(path)
    return ref, path


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_and_incremental(name, tmp_path):
    ref, path = make(name, tmp_path)
    ours = load(path, dtype=torch.float64, progress=False)
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
        assert (got - want).abs().max().item() <= 1e-9
        cache = Cache()
        steps = [ours(ids[:, :6], cache)] + [ours(ids[:, t:t + 1], cache) for t in range(6, 14)]
        assert (torch.cat(steps, dim=1) - got).abs().max().item() <= 1e-9
        assert cache.length == 14


def test_sharded_checkpoint_with_index(tmp_path):
    ref, path = make("qwen3", tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    (path / "model.safetensors").unlink()
    save_file({k: tensors[k] for k in names[:half]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(names)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    ours = load(path, dtype=torch.float64, progress=False)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-9


def test_loader_errors_name_the_problem(tmp_path):
    _, path = make("llama", tmp_path)
    good = load_file(str(path / "model.safetensors"))
    # missing tensor
    save_file({k: v for k, v in good.items() if k != "model.norm.weight"}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor model.norm.weight"):
        load(path, progress=False)
    # unexpected tensor: error when strict, accepted otherwise
    save_file({**good, "model.extra.weight": torch.zeros(2)}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor model.extra.weight"):
        load(path, progress=False)
    load(path, strict=False, progress=False)
    # config that does not match the tensors
    save_file(good, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        load(path, progress=False)
    (path / "config.json").write_text(json.dumps(cfg))
    # truncated file
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load(path, progress=False)
    # garbage header
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load(path, progress=False)
    # no weights at all / not a directory
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load(path, progress=False)
    with pytest.raises(TierlmError):
        load(tmp_path / "nope", progress=False)


def test_fp8_block_scaled_checkpoint_matches_bf16(tmp_path):
    # A bf16 model whose matrices span several 128x128 blocks, re-saved with every Linear weight
    # in float8_e4m3fn plus one fp32 scale_inv per block (the DeepSeek-V3 layout).
    cfg = T.LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = T.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ref.save_pretrained(tmp_path / "bf16")
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    quant, deq = {}, {}
    for k, w in tensors.items():
        if w.ndim == 2 and ".layers." in k:
            rows, cols = w.shape
            blocks = w.float().reshape(rows // 128, 128, cols // 128, 128)
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0          # e4m3 max
            q = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
            quant[k] = q
            quant[k + "_scale_inv"] = scale
            # the dequantised weight, computed here independently of the loader
            deq[k] = (q.float().reshape(rows // 128, 128, cols // 128, 128) * scale[:, None, :, None]).reshape(rows, cols)
        else:
            quant[k] = w
            deq[k] = w.float()
    (tmp_path / "fp8").mkdir()
    save_file(quant, str(tmp_path / "fp8" / "model.safetensors"))
    c = json.loads((tmp_path / "bf16" / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(c))
    (tmp_path / "deq").mkdir()
    save_file(deq, str(tmp_path / "deq" / "model.safetensors"))
    (tmp_path / "deq" / "config.json").write_text((tmp_path / "bf16" / "config.json").read_text())
    original = load(tmp_path / "bf16", dtype=torch.float32, progress=False)
    fp8 = load(tmp_path / "fp8", dtype=torch.float32, progress=False)
    dequantised = load(tmp_path / "deq", dtype=torch.float32, progress=False)
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        lo, lf, ld = original(ids), fp8(ids), dequantised(ids)
    # The loader's block dequantisation is exact ...
    assert (lf - ld).abs().max().item() <= 1e-5
    # ... and the FP8 model stays within FP8 tolerance of its bf16 original (e4m3: 3 mantissa bits,
    # relative rounding error up to 2^-4 per weight, compounding over two layers).
    rel = ((lo - lf).norm() / lo.norm()).item()
    assert 0 < rel < 0.1, rel


def test_mxfp4_experts_checkpoint(tmp_path):
    # A gpt-oss model re-saved as the released checkpoints are: expert matrices as MXFP4 (`*_blocks`,
    # uint8 [E, out, in/32, 16], two e2m1 codes a byte, low nibble first; `*_scales`, e8m0 [E, out, in/32]).
    cfg = T.GptOssConfig(vocab_size=97, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=32, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                         sliding_window=4, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = T.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ref.save_pretrained(tmp_path / "fp32")
    tensors = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    quant, deq = {}, {}
    for k, w in tensors.items():
        if not k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            quant[k] = deq[k] = w
            continue
        rows = w.transpose(1, 2)                                      # [E, out, in], the checkpoint's row order
        E, n_out, n_in = rows.shape
        groups = rows.reshape(E, n_out, n_in // 32, 32)
        exp = torch.ceil(torch.log2(groups.abs().amax(-1) / 6.0)).clamp(-127, 127).to(torch.int64)
        scaled = groups / (2.0 ** exp[..., None])                     # |scaled| <= 6
        index = (scaled.abs()[..., None] - magnitudes).abs().argmin(-1)   # nearest magnitude
        code = index + 8 * (scaled < 0)
        pairs = code.reshape(E, n_out, n_in // 32, 16, 2)
        quant[k + "_blocks"] = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
        quant[k + "_scales"] = (exp + 127).to(torch.uint8)
        # the dequantised weight, from the chosen values (not from the bytes)
        value = magnitudes[index] * torch.where(scaled < 0, -1.0, 1.0) * 2.0 ** exp[..., None]
        deq[k] = value.reshape(E, n_out, n_in).transpose(1, 2).contiguous()
        # transformers' own MXFP4 unpacking agrees with the layout assumed here
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
        assert torch.equal(convert_moe_packed_tensors(quant[k + "_blocks"], quant[k + "_scales"], dtype=torch.float32), deq[k])
    c = json.loads((tmp_path / "fp32" / "config.json").read_text())
    for name, state in (("mxfp4", quant), ("deq", deq)):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
        extra = {"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                 "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}} if name == "mxfp4" else {}
        (tmp_path / name / "config.json").write_text(json.dumps({**c, **extra}))
    original = load(tmp_path / "fp32", dtype=torch.float32, progress=False)
    mxfp4 = load(tmp_path / "mxfp4", dtype=torch.float32, progress=False)
    dequantised = load(tmp_path / "deq", dtype=torch.float32, progress=False)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        lo, lq, ld = original(ids), mxfp4(ids), dequantised(ids)
    # The loader's MXFP4 unpacking is exact ...
    assert torch.equal(lq, ld)
    # ... and the MXFP4 model stays near its float32 original (e2m1 per weight, shared power-of-two scale).
    rel = ((lo - lq).norm() / lo.norm()).item()
    assert 0 < rel < 0.3, rel
    # A scales tensor that does not match its blocks is named.
    bad = dict(quant)
    key = next(k for k in bad if k.endswith("_scales"))
    bad[key] = bad[key][:, :-1].contiguous()
    save_file(bad, str(tmp_path / "mxfp4" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not MXFP4 blocks"):
        load(tmp_path / "mxfp4", progress=False)


@pytest.mark.parametrize("name", ["llama", "mistral-swa", "gpt-oss", "qwen3-moe"])
def test_ragged_paged_batch(name, tmp_path):
    """Rows of different lengths in one step, blocks scattered over the pools: each row equals
    transformers on that row alone."""
    from paged import assert_rows_match_transformers
    ref, path = make(name, tmp_path)
    assert_rows_match_transformers(ref, load(path, dtype=torch.float64, progress=False))
