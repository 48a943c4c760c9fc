"""Cache bytes of every attention kind against hand-computed values.

Each expected number is computed here from the published formula (written out in the
test, not taken from tierlm) with its source in a comment.
"""

import pytest

from tierlm.plan.memory import cache_bytes, cache_read_bytes
from tierlm.spec import load_spec

GiB = 2**30


def total(model, tokens, kv="bf16", idx="bf16", batch=1, mtp=False, layout="ideal", tp=1):
    layers = cache_bytes(load_spec(model), tokens, batch, kv, idx, mtp, layout, tp)
    return sum(c.kv_bytes + c.indexer_bytes for c in layers), sum(c.state_bytes for c in layers)


# --- GQA, full attention ----------------------------------------------------------------
# bytes/token = 2 (K and V) x layers x kv_heads x head_dim x bytes
# (calculators.md §4.1; SGLang get_cell_size_per_token; Llama-3.1 dims from llama-models sku_list.py)
@pytest.mark.parametrize("model,layers,kv_heads,head_dim", [
    ("meta-llama/Llama-3.1-8B-Instruct", 32, 8, 128),
    ("meta-llama/Llama-3.1-70B-Instruct", 80, 8, 128),
    ("meta-llama/Llama-3.1-405B-Instruct", 126, 8, 128),
    ("Qwen/Qwen3-235B-A22B", 94, 4, 128),
    ("Qwen/Qwen3-0.6B", 28, 8, 128),
])
def test_gqa_full(model, layers, kv_heads, head_dim):
    for tokens, batch in ((1, 1), (131072, 1), (4096, 3)):
        kv, state = total(model, tokens, batch=batch)
        assert kv == 2 * layers * kv_heads * head_dim * 2 * tokens * batch
        assert state == 0
    kv8, _ = total(model, 1000, kv="fp8")
    assert kv8 == 2 * layers * kv_heads * head_dim * 1 * 1000


def test_gqa_reference_values():
    # calculators.md §4.1 reference table: Llama-3.1-70B BF16 = 327,680 B/token;
    # Qwen3-235B-A22B BF16 = 192,512, FP8 = 96,256 B/token.
    assert total("meta-llama/Llama-3.1-70B-Instruct", 1)[0] == 327_680
    assert total("Qwen/Qwen3-235B-A22B", 1)[0] == 192_512
    assert total("Qwen/Qwen3-235B-A22B", 1, kv="fp8")[0] == 96_256
    # model_configs.md §5 sanity values at 131072 tokens, BF16: 8B 16.0 GiB, 70B 40.0 GiB, 405B 63.0 GiB.
    assert total("meta-llama/Llama-3.1-8B-Instruct", 131072)[0] == 16 * GiB
    assert total("meta-llama/Llama-3.1-70B-Instruct", 131072)[0] == 40 * GiB
    assert total("meta-llama/Llama-3.1-405B-Instruct", 131072)[0] == 63 * GiB


# --- GQA with sliding windows -------------------------------------------------------------
def test_sliding_window_hybrids():
    # gpt-oss: 2 x 8 kv heads x 64 x 2 B = 2048 B per token per layer; even layers window 128
    # (openai/gpt-oss model.py). 120b: 36 layers -> 18 full + 18 sliding.
    S = 131072
    per = 2 * 8 * 64 * 2
    assert total("openai/gpt-oss-120b", S)[0] == 18 * per * S + 18 * per * 128
    assert total("openai/gpt-oss-20b", S)[0] == 12 * per * S + 12 * per * 128
    # model_configs.md §5: gpt-oss-120b 4.50 GiB, gpt-oss-20b 3.00 GiB at 131072 (BF16).
    assert round(total("openai/gpt-oss-120b", S)[0] / GiB, 2) == 4.50
    assert round(total("openai/gpt-oss-20b", S)[0] / GiB, 2) == 3.00
    # Gemma 3 27B: 62 layers, pattern 5 local : 1 global -> 10 global, 52 local with window 1024,
    # 16 kv heads x 128 (google-deepmind/gemma _gemma.py via model_configs.md): 10.41 GiB at 131072.
    per = 2 * 16 * 128 * 2
    assert total("google/gemma-3-27b-it", S)[0] == 10 * per * S + 52 * per * 1024
    assert round(total("google/gemma-3-27b-it", S)[0] / GiB, 2) == 10.41
    # Mistral-7B-v0.1: SWA 4096 on all 32 layers (transformers configuration_mistral.py).
    per = 2 * 8 * 128 * 2
    assert total("mistralai/Mistral-7B-v0.1", 100_000)[0] == 32 * per * 4096
    assert total("mistralai/Mistral-7B-v0.1", 1000)[0] == 32 * per * 1000


# --- MLA ----------------------------------------------------------------------------------
def test_mla():
    # One latent of kv_lora_rank + rope = 512 + 64 = 576 elements per token per layer
    # (DeepSeek-V3 inference/model.py kv_cache + pe_cache); 61 layers.
    # calculators.md §4.1: V3 BF16 70,272 B/token; naive FP8 35,136.
    assert total("deepseek-ai/DeepSeek-V3", 1)[0] == 70_272
    assert total("deepseek-ai/DeepSeek-V3", 1, kv="fp8")[0] == 35_136
    assert total("deepseek-ai/DeepSeek-R1", 1)[0] == 61 * 576 * 2
    # model_configs.md §5: V3 8.58 GiB at 131072 BF16; V2-Lite 27 layers x 576.
    assert round(total("deepseek-ai/DeepSeek-V3", 131072)[0] / GiB, 2) == 8.58
    assert total("deepseek-ai/DeepSeek-V2-Lite", 10)[0] == 27 * 576 * 2 * 10
    # fp4 ideal: half a byte per element.
    assert total("deepseek-ai/DeepSeek-V3", 2, kv="fp4")[0] == 61 * 576 * 2 // 2


def test_mtp_layers_add_cache():
    # --mtp adds num_nextn_predict_layers (1) layers of the same kind (calculators.md §4.1).
    assert total("deepseek-ai/DeepSeek-V3", 1, mtp=True)[0] == 62 * 576 * 2


# --- DSA (MLA + lightning indexer) --------------------------------------------------------
def test_dsa():
    # V3.2: 576 latent + 128 indexer elements per layer (vLLM DeepSeek-V3.2 blog):
    # BF16 (512+64)x2 + 128x2 = 1408 B/layer/token -> 61 layers = 83.9 GiB at 2^20 tokens.
    assert total("deepseek-ai/DeepSeek-V3.2", 1)[0] == 61 * 1408
    assert round(total("deepseek-ai/DeepSeek-V3.2", 2**20)[0] / GiB, 1) == 83.9
    # indexer dtype is separate from the KV dtype.
    assert total("deepseek-ai/DeepSeek-V3.2", 1, kv="fp8", idx="bf16")[0] == 61 * (576 + 256)
    # GLM-5: 78 layers, kv_lora 512 + rope 64, indexer 128 (configuration_glm_moe_dsa.py).
    assert total("zai-org/GLM-5", 1, kv="fp8", idx="fp8")[0] == 78 * (576 + 128)


# --- DeepSeek-V4 --------------------------------------------------------------------------
def test_v4_pro_and_flash():
    # Per layer with compress ratio r: min(S, 128) x 512 + floor(S / r) x 512, plus on r = 4
    # layers floor(S / 4) x 128 indexer elements (kvcache.ai deepseek_v4_hybrid; vLLM V4 blog).
    def v4(S, n_csa, n_hca, n_swa, b=2, bi=2):
        w = min(S, 128) * 512 * b
        return (n_csa * (w + S // 4 * 512 * b + S // 4 * 128 * bi) + n_hca * (w + S // 128 * 512 * b)
                + n_swa * w)
    S = 2**20
    # Pro: 30 CSA + 31 HCA (model_configs.md §2a); Flash: 21 CSA, 20 HCA, 2 SWA-only (§2b).
    assert total("deepseek-ai/DeepSeek-V4-Pro", S)[0] == v4(S, 30, 31, 0)
    assert total("deepseek-ai/DeepSeek-V4-Flash", S)[0] == v4(S, 21, 20, 2)
    # vLLM blog: 9.62 GiB for Pro at 2^20 BF16; the Reddit thread: Flash 6.72 GiB.
    assert round(total("deepseek-ai/DeepSeek-V4-Pro", S)[0] / GiB, 2) == 9.62
    assert round(total("deepseek-ai/DeepSeek-V4-Flash", S)[0] / GiB, 2) == 6.72
    assert total("deepseek-ai/DeepSeek-V4-Pro", 1000, kv="fp8", idx="fp4")[0] == v4(1000, 30, 31, 0, 1, 0.5)
    # blocks not yet complete hold no compressed entry: at S=3 only the window.
    assert total("deepseek-ai/DeepSeek-V4-Pro", 3)[0] == 61 * 3 * 512 * 2


def test_v4_compressor_state():
    # fp32 kv_state + score_state [coff*r, coff*d] (official Compressor): CSA 64 KiB,
    # CSA indexer 16 KiB, HCA 512 KiB per layer (module_specs.md §3.6) -> Pro about 17.8 MiB.
    _, state = total("deepseek-ai/DeepSeek-V4-Pro", 10)
    assert state == 30 * (64 + 16) * 1024 + 31 * 512 * 1024
    _, state = total("deepseek-ai/DeepSeek-V4-Flash", 10, batch=2)
    assert state == 2 * (21 * 80 * 1024 + 20 * 512 * 1024)


def test_v4_mtp_layer_is_window_only():
    # compress_ratios' trailing entry (0) belongs to the MTP layer: 128 x 512 elements.
    with_mtp = total("deepseek-ai/DeepSeek-V4-Pro", 5000, mtp=True)[0]
    without = total("deepseek-ai/DeepSeek-V4-Pro", 5000)[0]
    assert with_mtp - without == 128 * 512 * 2


# --- engine layouts ------------------------------------------------------------------------
def test_vllm_layouts():
    # fp8_ds_mla: 512 fp8 + 4 fp32 scales + 64 bf16 rope = 656 B (vLLM FlashMLA-sparse backend);
    # V3 = 61 x 656 = 40,016 B/token; V3.2 adds a 132 B fp8 indexer key -> 48,068 (calculators.md §4.1).
    # vLLM's MLA block is 64 tokens, so measure at a multiple of 64.
    assert total("deepseek-ai/DeepSeek-V3", 64, kv="fp8", layout="vllm")[0] == 61 * 656 * 64
    assert total("deepseek-ai/DeepSeek-V3.2", 64, kv="fp8", idx="fp8", layout="vllm")[0] == 48_068 * 64
    # block rounding: one token still occupies a whole 64-token block.
    assert total("deepseek-ai/DeepSeek-V3", 1, kv="fp8", layout="vllm")[0] == 61 * 656 * 64
    # V4 record: 448 fp8 + 64 bf16 rope + 7 ue8m0 scales + 1 pad = 584 B (module_specs.md §3.6).
    S = 256 * 40
    kv = total("deepseek-ai/DeepSeek-V4-Flash", S, kv="fp8", idx="fp8", layout="vllm")[0]
    # window reservation: min(128 - 1 + 8192, S) -> ceil(8319 / 256) + 1 = 34 blocks of 256.
    window = 34 * 256 * 584
    expected = (21 * (window + S // 4 * 584 + S // 4 * 132) + 20 * (window + S // 128 * 584) + 2 * window)
    assert kv == expected


def test_sglang_layouts():
    # SGLang: SWA pool = 0.8 x full pool (server_args swa_full_tokens_ratio); plain MLA fp8 576 B.
    per = 2 * 8 * 64 * 2
    assert total("openai/gpt-oss-20b", 1000, layout="sglang")[0] == 12 * per * 1000 + 12 * per * 800
    assert total("deepseek-ai/DeepSeek-V3", 1, kv="fp8", layout="sglang")[0] == 61 * 576


# --- tensor parallelism -------------------------------------------------------------------
def test_tensor_parallel_rules():
    # GQA splits by KV head (ceil), replicating heads when TP > kv heads (llm-analysis
    # max(n_kv/tp, 1); aiconfigurator ceil). Qwen3-235B has 4 kv heads.
    full = total("Qwen/Qwen3-235B-A22B", 100)[0]
    assert total("Qwen/Qwen3-235B-A22B", 100, tp=2)[0] == full // 2
    assert total("Qwen/Qwen3-235B-A22B", 100, tp=8)[0] == full // 4
    # MLA latents are replicated, not split (aiconfigurator base.py; SGLang MLA branch).
    assert total("deepseek-ai/DeepSeek-V3", 100, tp=8)[0] == total("deepseek-ai/DeepSeek-V3", 100)[0]


# --- read volume vs stored volume ---------------------------------------------------------
def test_sparse_read_volume():
    spec = load_spec("deepseek-ai/DeepSeek-V3.2")
    S = 100_000
    # DSA reads top-k (2048) latents and scans every indexer key.
    assert cache_read_bytes(spec, S, "bf16", "bf16", False) == 61 * (2048 * 576 * 2 + S * 128 * 2)
    spec = load_spec("deepseek-ai/DeepSeek-V4-Pro")
    # V4-Pro: window 128 + CSA top-k 1024 of S/4 compressed + indexer scan S/4; HCA all S/128.
    expected = 30 * ((128 + 1024) * 1024 + S // 4 * 256) + 31 * (128 + S // 128) * 1024
    assert cache_read_bytes(spec, S, "bf16", "bf16", False) == expected
    spec = load_spec("meta-llama/Llama-3.1-8B-Instruct")
    assert cache_read_bytes(spec, S, "bf16", "bf16", False) == 32 * 2 * 8 * 128 * 2 * S


# --- hybrid attention kinds (kvcache.ai kv-cache-calculator.js @9753288; models.yaml fields) ---
def state(model, tokens=1000, batch=1, state_dtype="auto", mtp=False):
    layers = cache_bytes(load_spec(model), tokens, batch, "bf16", "bf16", mtp, "ideal", 1, state_dtype)
    return sum(c.state_bytes for c in layers)


def test_gated_delta_net():
    # Qwen3.5-27B: 16 full layers x 2 x 4 KV heads x 256 hold KV; the 48 GDN layers hold a fixed state:
    # conv (4 - 1) x (2 x 16 x 128 + 48 x 128) bf16 + recurrent 48 x 128 x 128 (mamba_ssm_dtype float32).
    assert total("Qwen/Qwen3.5-27B", 5000)[0] == 16 * 2 * 4 * 256 * 2 * 5000
    conv, rec = 3 * (2 * 16 * 128 + 48 * 128), 48 * 128 * 128
    assert state("Qwen/Qwen3.5-27B") == 48 * (conv * 2 + rec * 4) == state("Qwen/Qwen3.5-27B", tokens=9)
    # --state-dtype bf16 halves the recurrent state only; the conv history stays bf16.
    assert state("Qwen/Qwen3.5-27B", state_dtype="bf16", batch=2) == 2 * 48 * (conv * 2 + rec * 2)


def test_kda_linear_attention():
    # Kimi K3: 24 MLA layers x (512 + 64); 69 KDA layers of 96 heads x 128 hold
    # conv (4 - 1) x (3 x 96 x 128) bf16 + recurrent 96 x 128 x 128 fp32.
    assert total("moonshotai/Kimi-K3", 3000)[0] == 24 * 576 * 2 * 3000
    assert state("moonshotai/Kimi-K3") == 69 * (3 * 3 * 96 * 128 * 2 + 96 * 128 * 128 * 4)


def test_msa_block_sparse_with_indexer():
    # MiniMax M3: all 60 layers keep 2 x 4 x 128 K/V elements per token; the 57 MSA layers add a
    # 128-element index key per token (the calculator pins it to bf16).
    assert total("MiniMaxAI/MiniMax-M3", 2048, kv="fp8")[0] == (60 * 2 * 4 * 128 * 1 + 57 * 128 * 2) * 2048
    # Decode reads the top 16 + 1 local blocks of 128 tokens on MSA layers, all keys on full ones.
    spec = load_spec("MiniMaxAI/MiniMax-M3")
    S = 100_000
    assert cache_read_bytes(spec, S, "bf16", "bf16", False) == (
        3 * 2 * 4 * 128 * 2 * S + 57 * (2 * 4 * 128 * 2 * 17 * 128 + 128 * 2 * S))


def test_shared_kv_layers_and_global_head_dim():
    # Gemma 4 E2B: 35 layers, the last 20 reuse earlier KV; the 15 stored are 3 global (1 KV head x
    # (512 + 512)) and 12 sliding (1 x (256 + 256), window 512).
    S = 10_000
    assert total("google/gemma-4-E2B", S)[0] == (3 * 1024 * S + 12 * 512 * 512) * 2
    # 26B-A4B: global layers have their own KV head count (2) and head dim (512); sliding 8 x 256.
    assert total("google/gemma-4-26B-A4B", S)[0] == (5 * 2 * 1024 * S + 25 * 8 * 512 * 1024) * 2


def test_per_layer_type_heads_and_dims():
    # MiMo-V2.5: full layers 4 KV heads, SWA layers 8, both with K 192 + V 128 (window 128).
    S = 50_000
    assert total("XiaomiMiMo/MiMo-V2.5", S)[0] == (9 * 4 * 320 * S + 39 * 8 * 320 * 128) * 2


def test_sconv_state_and_draft_stack():
    # Inkling: 11 global (8 KV x 2 x 128) + 55 SWA (16 KV, window 512); the 8-layer draft stack adds
    # 2 global + 6 SWA layers. SConv keeps (4 - 1) x (2 x kv x d + 2 x 6144) bf16 per layer.
    S = 4096
    glob, swa = 8 * 2 * 128, 16 * 2 * 128
    assert total("thinkingmachines/Inkling", S)[0] == (11 * glob * S + 55 * swa * 512) * 2
    assert total("thinkingmachines/Inkling", S, mtp=True)[0] == (13 * glob * S + 61 * swa * 512) * 2
    sconv = lambda kv: 3 * (2 * kv * 128 + 2 * 6144) * 2
    assert state("thinkingmachines/Inkling") == 11 * sconv(8) + 55 * sconv(16)
    assert state("thinkingmachines/Inkling", mtp=True) == 13 * sconv(8) + 61 * sconv(16)
    assert state("thinkingmachines/Inkling", state_dtype="fp32") == state("thinkingmachines/Inkling")  # conv: bf16


def test_state_dtype_applies_to_v4_compressor_state():
    # V4's own state dtype is fp32 (official Compressor); --state-dtype bf16 halves it.
    assert state("deepseek-ai/DeepSeek-V4-Pro", state_dtype="bf16") * 2 == state("deepseek-ai/DeepSeek-V4-Pro")
