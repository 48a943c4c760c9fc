"""Multimodal wrapper checkpoints (config.json with the language model under `text_config`, tensors
under a `language_model` prefix, plus a vision tower): tierlm loads the language model, leaves the
vision tower's tensors aside with one warning, and its logits equal transformers' text model's in
float64.

Two wrappers, both as transformers==5.23.0 writes them:
  * Gemma3ForConditionalGeneration with its SigLIP vision tower (`language_model.model.*`,
    `vision_tower.*`, `multi_modal_projector.*`);
  * a Kimi-K2.5-shaped wrapper of a DeepSeek-V3 text model. transformers has no class for it
    (KimiK25ForConditionalGeneration is remote code), so the test saves DeepseekV3ForCausalLM and
    rewrites the checkpoint the way Kimi-K2.5's files are laid out: config.json with model_type
    "kimi_k25", architectures ["KimiK25ForConditionalGeneration"], the text config (model_type
    "kimi_k2") under `text_config` and a `vision_config`; the text tensors under `language_model.`
    (`language_model.model.*`, `language_model.lm_head.weight`) and a few made-up vision tensors
    (`vision_tower.*`, `mm_projector.*`) in a second shard, with a model.safetensors.index.json.
"""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import test_model_deepseek as ds  # noqa: E402
from test_model_gemma3 import BASE, CONFIGS, _one_thread, _tiny_wrapper  # noqa: E402,F401  (autouse fixture)
from tierlm import LLM, SamplingParams  # noqa: E402
from tierlm.model import load  # noqa: E402
from tierlm.model.loader import unwrap_name  # noqa: E402

T = transformers


def gemma3_wrapper(tmp_path):
    text = {**BASE, **CONFIGS["local-global-linear"]}
    keep = ("text_config", "vision_config", "mm_tokens_per_image")
    cfg = T.Gemma3Config(**{k: v for k, v in _tiny_wrapper(text).items() if k in keep})
    torch.manual_seed(3)
    model = T.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():       # random everything, the zero-initialised norms included
            p.normal_(0, 0.3)
    path = tmp_path / "gemma3-mm"
    model.to(torch.float64).save_pretrained(path)
    ref = T.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float64,
                                                           attn_implementation="sdpa").eval()
    return ref, path


def kimi_wrapper(tmp_path):
    hf, text_path = ds.make(tmp_path, next(c for c in ds.CASES if c[0] == "v3-qlora-group"))
    text_cfg = json.loads((text_path / "config.json").read_text())
    text_cfg["model_type"] = "kimi_k2"                   # as in Kimi-K2.5's text_config
    path = tmp_path / "kimi-k25"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
        "media_placeholder_token_id": 60, "use_unified_vision_chunk": True, "tie_word_embeddings": False,
        "text_config": text_cfg,
        "vision_config": {"vt_hidden_size": 8, "vt_num_hidden_layers": 1, "vt_num_attention_heads": 2,
                          "vt_intermediate_size": 16, "mm_hidden_size": 8, "text_hidden_size": 32,
                          "patch_size": 14, "merge_kernel_size": [2, 2]}}))
    text = {"language_model." + k: v for k, v in load_file(text_path / "model.safetensors").items()}
    g = torch.Generator().manual_seed(0)
    vision = {"vision_tower.patch_embed.proj.weight": torch.randn(8, 3, 14, 14, generator=g, dtype=torch.float64),
              "vision_tower.encoder.blocks.0.wqkv.weight": torch.randn(24, 8, generator=g, dtype=torch.float64),
              "mm_projector.proj.0.weight": torch.randn(32, 32, generator=g, dtype=torch.float64)}
    # the vision shard sorts first: the loader must recognise the wrapper from any shard
    save_file(vision, str(path / "model-00001-of-00002.safetensors"))
    save_file(text, str(path / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in vision},
                  **{k: "model-00002-of-00002.safetensors" for k in text}}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return hf, path


def load_noting(path):
    """load() in float64, with every warning it issues."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(path, dtype=torch.float64, progress=False)
    return model, [str(w.message) for w in caught]


def test_gemma3_conditional_generation(tmp_path):
    ref, path = gemma3_wrapper(tmp_path)
    ours, notes = load_noting(path)
    vision = [n for n in ref.state_dict() if "language_model" not in n and not n.startswith("lm_head.")]
    assert len(vision) > 10
    assert len(notes) == 1, notes
    assert f"{len(vision)} tensors" in notes[0] and "vision_tower.*" in notes[0] and "multi_modal_projector.*" in notes[0]
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits                 # text only: the language model's logits
        got = ours(ids)
    assert want.abs().max().item() > 0.5
    assert (got - want).abs().max().item() <= 1e-9
    # a second load notes it again, once
    assert len(load_noting(path)[1]) == 1


def test_kimi_k25_shaped_deepseek_v3_wrapper(tmp_path):
    hf, path = kimi_wrapper(tmp_path)
    ours, notes = load_noting(path)
    assert len(notes) == 1, notes
    assert "3 tensors" in notes[0] and "mm_projector.*, vision_tower.*" in notes[0]
    assert ours.spec.family == "kimi_k2"
    ours.set_reference("transformers")
    ids = torch.randint(0, ds.COMMON["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-9


def test_engine_serves_the_text_model(tmp_path):
    ref, path = gemma3_wrapper(tmp_path)
    prompt = [5, 9, 11, 2, 8]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, ref(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = LLM(path, dtype=torch.float64, max_num_seqs=2, max_model_len=32)
    assert sum("multimodal checkpoint" in str(w.message) for w in caught) == 1
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert out[0].outputs[0].token_ids == ids[0, len(prompt):].tolist()


def test_unwrap_name_layouts():
    assert unwrap_name("language_model.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert unwrap_name("language_model.lm_head.weight") == "lm_head.weight"
    assert unwrap_name("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert unwrap_name("lm_head.weight") == "lm_head.weight"
    assert unwrap_name("model.vision_tower.encoder.layers.0.mlp.fc1.weight") is None
    assert unwrap_name("vision_tower.patch_embed.proj.weight") is None


def test_plain_checkpoint_is_not_a_wrapper(tmp_path):
    """A text-only checkpoint loads without the note."""
    _, path = ds.make(tmp_path, next(c for c in ds.CASES if c[0] == "v3-qlora-group"))
    assert load_noting(path)[1] == []


@pytest.mark.parametrize("vision", [
    {},                                                        # the tiny tower, with SigLIP's pooling head
    {"vision_use_head": False, "num_channels": 1, "image_size": 30, "patch_size": 7, "num_hidden_layers": 2},
])
def test_planner_counts_the_gemma3_vision_tower(vision):
    """The plan counts Gemma 3's SigLIP vision tower and multi-modal projector: exactly the
    parameters transformers 5.23.0 builds under model.vision_tower / model.multi_modal_projector."""
    from tierlm import plan
    from tierlm.spec import parse_config
    text = {**BASE, **CONFIGS["local-global-linear"]}
    wrapper = _tiny_wrapper(text)
    wrapper["vision_config"] = {**wrapper["vision_config"], **vision}
    cfg = T.Gemma3Config(**{k: v for k, v in wrapper.items() if k in ("text_config", "vision_config")})
    with torch.device("meta"):
        model = T.Gemma3ForConditionalGeneration(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("model.vision_tower.") for n in names)
    assert any(n.startswith("model.multi_modal_projector.") for n in names)
    want = sum(p.numel() for n, p in model.named_parameters()
               if n.startswith(("model.vision_tower.", "model.multi_modal_projector.")))
    spec = parse_config(cfg.to_dict(), "mm", allow_unknown=True)
    assert spec.vision_params == want
    assert any(f"counted: {want:,} params" in n for n in spec.notes)
    assert not any("not counted" in n for n in spec.notes)
    text_only = parse_config(T.Gemma3TextConfig(**text).to_dict(), "text")
    assert text_only.vision_params == 0

    p = plan(spec, 64, hardware="h200", devices=1).data
    c = p["weights"]["components"]["vision_tower"]
    assert c["params"] == want and c["bytes"] == want * 2 and c["dtypes"] == ["bf16"]
    t = plan(text_only, 64, hardware="h200", devices=1).data
    assert "vision_tower" not in t["weights"]["components"]
    assert p["weights"]["total_bytes"] == t["weights"]["total_bytes"] + want * 2
    # held with the hot weights, but a text decode step does not read it
    assert p["placement"]["items"]["hot_weights"]["device"] == t["placement"]["items"]["hot_weights"]["device"] + want * 2
    assert p["decode"]["bytes_read"] == t["decode"]["bytes_read"]


def test_uncountable_vision_config_keeps_the_note():
    """Kimi-K2.5's vt_* vision_config is not one tierlm counts: the note says so."""
    from tierlm.spec import parse_config
    text = T.DeepseekV3Config(**ds.COMMON, num_hidden_layers=2, first_k_dense_replace=1).to_dict()
    text["model_type"] = "kimi_k2"
    spec = parse_config({"model_type": "kimi_k25", "text_config": text,
                         "vision_config": {"vt_hidden_size": 8, "vt_num_hidden_layers": 1}}, "k", allow_unknown=True)
    assert spec.vision_params == 0
    assert any("not counted" in n for n in spec.notes)
