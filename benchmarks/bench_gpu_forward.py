"""GPU path check and timing: tiny random models of each family, CUDA vs CPU.

For each family a small config is parsed into a ModelSpec, the module is built with random
weights, and the same weights run (a) on the CPU in float64 — the reference — and (b) on the
GPU in float32 and bf16. Prints the median |Δlogits| against the float64 reference, relative
to the reference's standard deviation (the max is dominated by tokens whose top-k expert choice
flips near a tie, which any precision change can do), and the median forward time of each. Needs no transformers and no checkpoint download.

    python benchmarks/bench_gpu_forward.py [--seq 1024] [--repeat 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tierlm.model.families import get
from tierlm.spec import parse_config

CONFIGS = {
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=8192, hidden_size=1024, intermediate_size=2048,
                      moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                      head_dim=64, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
                      max_position_embeddings=8192, torch_dtype="bfloat16"),
    "deepseek_v3": dict(model_type="deepseek_v3", vocab_size=8192, hidden_size=1024, intermediate_size=2048,
                        moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=16, n_routed_experts=32,
                        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                        num_nextn_predict_layers=0, max_position_embeddings=8192, torch_dtype="bfloat16"),
    "deepseek_v4": dict(model_type="deepseek_v4", vocab_size=8192, hidden_size=1024, num_hidden_layers=6,
                        num_attention_heads=16, num_key_value_heads=1, head_dim=256, qk_rope_head_dim=64,
                        q_lora_rank=384, o_groups=4, o_lora_rank=256, n_routed_experts=32, n_shared_experts=1,
                        num_experts_per_tok=4, moe_intermediate_size=512, num_hash_layers=2, sliding_window=128,
                        index_n_heads=16, index_head_dim=64, index_topk=128, hc_mult=4, num_nextn_predict_layers=0,
                        compress_ratios=[0, 4, 128, 4, 128, 4], max_position_embeddings=8192, torch_dtype="bfloat16",
                        scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0, hc_sinkhorn_iters=20,
                        hc_eps=1e-6),
}


def build(name: str):
    spec = parse_config(CONFIGS[name], name)
    family = get(spec.family)
    model = family.build(spec, ())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
        for n, b in model.named_buffers():
            if b.dtype == torch.long:          # V4 hash routing table: random experts per token
                b.copy_(torch.randint(0, spec.moe.num_experts, b.shape, generator=g))
    if hasattr(model, "set_reference"):
        model.set_reference("transformers", exact_fp32=False)
    elif hasattr(model, "exact_fp32"):
        model.exact_fp32 = False
    return model.eval()


def timed(fn, repeat: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, seq {args.seq}")
    for name in CONFIGS:
        model = build(name)
        ids = torch.randint(0, CONFIGS[name]["vocab_size"], (1, args.seq), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            ref = model.double()(ids)
            t_cpu = timed(lambda: model(ids), 1, False)
            row = [f"{name:12s} cpu fp64 {t_cpu * 1e3:9.1f} ms"]
            for dtype in (torch.float32, torch.bfloat16):
                m = model.to("cuda", dtype)
                out = m(ids.cuda())
                err = ((out.double().cpu() - ref).abs().median() / ref.std()).item()
                t = timed(lambda: m(ids.cuda()), args.repeat, True)
                row.append(f"cuda {str(dtype)[6:]} {t * 1e3:7.2f} ms (median err / std {err:.1e})")
            model.to("cpu", torch.float64)
        print(" | ".join(row))


if __name__ == "__main__":
    main()
