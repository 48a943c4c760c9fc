"""Benchmark: decode tokens/s with a quarter of the routed experts resident on the device vs
all of them, under skewed routing, on one random DeepSeek-V3-shaped checkpoint.

The checkpoint (written by transformers): 4 MoE layers, hidden 512, 16 routed experts of
intermediate 512 (top-2, sigmoid scores, one shared expert), 12.6 M routed-expert parameters
per layer. Routing is skewed with the selection bias (`e_score_correction_bias`, which picks
experts but does not weight them): expert e gets -SLOPE * e, so low ids are chosen far more
often; the share of routes that go to each layer's 4 most used experts is printed. Experts
off the device are kept in host memory (`experts_on="host"`) or mapped from the safetensors
file (`"disk"`) with a budget of 25 % of the expert bytes. Decode: batch B, --context-token
prompts, --tokens greedy tokens, timed by `tierlm.runtime.bench.decode`; ratio = offloaded /
all resident (goal >= 0.5).

    python benchmarks/bench_experts.py [--batches 1,4] [--tokens 32] [--slope 0.15]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers as T

from tierlm import LLM
from tierlm.runtime import bench
from tierlm.tiers.experts import routed_experts


def make(path: Path, slope: float) -> Path:
    cfg = T.DeepseekV3Config(vocab_size=1024, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
                             num_hidden_layers=4, first_k_dense_replace=0, n_routed_experts=16, num_experts_per_tok=2,
                             n_shared_experts=1, n_group=1, topk_group=1, num_attention_heads=8, num_key_value_heads=8,
                             q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                             max_position_embeddings=1024, norm_topk_prob=True)
    torch.manual_seed(0)
    model = T.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.1) + (1.0 if n.endswith("norm.weight") else 0))
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(-slope * torch.arange(cfg.n_routed_experts, dtype=b.dtype))
    model.save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--slope", type=float, default=0.15)
    args = ap.parse_args()
    path = make(Path(tempfile.mkdtemp(prefix="bench-experts-")) / "v3", args.slope)
    full = LLM(path, max_model_len=args.context + args.tokens + 8)
    total = sum(p.numel() * p.element_size() for _, m in routed_experts(full.model) for p in m.parameters())
    budget = total // 4
    results = {"expert_bytes": total, "budget": budget}
    for where in ("host", "disk"):
        for b in (int(x) for x in args.batches.split(",")):
            base = bench.decode(LLM(path, max_model_len=args.context + args.tokens + 8, max_num_seqs=b), b,
                                args.context, args.tokens)
            llm = LLM(path, max_model_len=args.context + args.tokens + 8, max_num_seqs=b, experts_on=where,
                      device_expert_bytes=budget)
            off = bench.decode(llm, b, args.context, args.tokens)
            uses = llm.experts.uses
            top = []
            for layer in range(4):
                counts = sorted((v for k, v in uses.items() if k.startswith(f"model.layers.{layer}.")), reverse=True)
                top.append(sum(counts[:4]) / max(sum(counts), 1))
            ratio = off["tokens_per_s"] / base["tokens_per_s"]
            results[f"{where}-b{b}"] = {"all_resident": base["tokens_per_s"], "quarter_resident": off["tokens_per_s"],
                                        "ratio": ratio, "hit_rate": llm.experts.hit_rate(), "top4_share": top}
            print(f"experts on {where}, batch {b}: {off['tokens_per_s']:.1f} tok/s with 25% resident vs "
                  f"{base['tokens_per_s']:.1f} all resident: ratio {ratio:.2f}; expert cache hit rate "
                  f"{llm.experts.hit_rate():.2f}; routes to each layer's 4 most used experts "
                  + ", ".join(f"{t:.0%}" for t in top))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
