"""Benchmark: tiny DeepSeek-V4 full-sequence forward on CPU, tierlm vs transformers==5.23.0
on the same weights (one checkpoint written by transformers, loaded by both).

Prints the median time of each and the ratio transformers / tierlm (> 1: tierlm faster).
tierlm is timed in both reference modes: "transformers" (the same maths) and "official"
(adds the FP8 / FP4 fake-quant simulations of DeepSeek's inference code).

    python benchmarks/bench_v4_forward.py [--seq 512] [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers as T

from tierlm.model import load


def median_time(fn, repeat: int) -> float:
    fn()                                   # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = T.DeepseekV4Config(
        vocab_size=4096, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, head_dim=128,
        partial_rotary_factor=0.25, q_lora_rank=256, o_groups=4, o_lora_rank=128, n_routed_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=256, sliding_window=64, index_n_heads=8, index_head_dim=64,
        index_topk=32, hc_mult=4, max_position_embeddings=4096,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"] * 2,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32})
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    ref = T.DeepseekV4ForCausalLM(cfg).float().eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = load(d, dtype=torch.float32, progress=False)
    with torch.inference_mode():
        t_ref = median_time(lambda: ref(ids), args.repeat)
        ours.set_reference("transformers")          # transformers' maths, its float32 casts included
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
        t_same = median_time(lambda: ours(ids), args.repeat)
        ours.set_reference("official")
        t_off = median_time(lambda: ours(ids), args.repeat)
    print(f"tiny V4: 6 layers (2 SWA, 2 CSA r4, 2 HCA r32), hidden 512, 16 experts, hc 4; "
          f"batch {args.batch} x {args.seq} tokens, fp32, {args.threads} threads")
    print(f"transformers forward            : {t_ref * 1e3:8.1f} ms")
    print(f"tierlm (transformers maths)     : {t_same * 1e3:8.1f} ms   ratio transformers/tierlm = {t_ref / t_same:.2f}x"
          f"   max |dlogits| = {diff:.1e}")
    print(f"tierlm (official, with QAT sims): {t_off * 1e3:8.1f} ms   ratio transformers/tierlm = {t_ref / t_off:.2f}x")


if __name__ == "__main__":
    main()
