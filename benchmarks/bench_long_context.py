"""Benchmark: decode step time at a long context against a short one, for a DeepSeek-V4-shaped
model (sliding window + CSA with an indexer top-k + HCA) and, for contrast, dense MLA
(DeepSeek-V3-shaped, every layer attends to every token).

V4 reads a fixed window, the indexer's top-k of the CSA entries (it scores all of them, a
small key each) and the HCA entries (one per 128 tokens), so its step time should barely grow
with context (goal: 64k / 4k <= 1.5x); dense MLA reads every latent. The prefill is not run:
`bench.decode_at` fills the pages with random entries (a step's work depends on how many it
reads, not their values). Both models are random, float32, CPU.

    python benchmarks/bench_long_context.py [--contexts 4096,65536] [--tokens 16] [--threads 2]
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


def make_v4(path: Path, max_pos: int) -> Path:
    csa, hca, swa = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
    cfg = T.DeepseekV4Config(vocab_size=1024, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4,
                             layer_types=[swa, csa, hca, csa], mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
                             compress_rates={csa: 4, hca: 128}, sliding_window=128, index_topk=512, hc_mult=2,
                             num_attention_heads=8, head_dim=128, q_lora_rank=128, partial_rotary_factor=0.5,
                             num_experts_per_tok=2, n_routed_experts=8, n_shared_experts=1, o_groups=2,
                             o_lora_rank=64, index_n_heads=8, index_head_dim=64, max_position_embeddings=max_pos)
    T.DeepseekV4ForCausalLM(cfg).save_pretrained(path / "v4")
    return path / "v4"


def make_mla(path: Path, max_pos: int) -> Path:
    cfg = T.DeepseekV3Config(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                             num_hidden_layers=4, first_k_dense_replace=4, num_attention_heads=8,
                             num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=32,
                             qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2,
                             max_position_embeddings=max_pos)
    T.DeepseekV3ForCausalLM(cfg).save_pretrained(path / "mla")
    return path / "mla"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,65536")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    top = max(contexts) + args.tokens + 8
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("v4", make_v4), ("dense-mla", make_mla)):
            path = make(Path(tmp), top)
            for n in contexts:
                llm = LLM(path, dtype=torch.float32, max_num_seqs=1, max_model_len=top)
                rows.append({"model": name, **bench.decode_at(llm, n, args.tokens)})
                del llm
    for name in ("v4", "dense-mla"):
        mine = [r for r in rows if r["model"] == name]
        for r in mine:
            r["vs_shortest"] = r["step_ms"] / mine[0]["step_ms"]
            if args.json:
                print(json.dumps(r))
            else:
                print(f"{name:9s} context {r['context']:7d}: {r['step_ms']:8.2f} ms/step  "
                      f"({r['vs_shortest']:.2f}x the {mine[0]['context']}-token step)  "
                      f"cache {r['cache_bytes_per_seq'] / 2**20:8.2f} MiB/seq")


if __name__ == "__main__":
    main()
