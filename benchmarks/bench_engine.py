"""Benchmark: tierlm.LLM decode and prefill throughput against transformers `generate` on the
same weights (one random checkpoint written by transformers, loaded by both).

Decode: B prompts of --context tokens, then --tokens greedy tokens each; tierlm times only the
decode steps (bench.decode), transformers the whole `generate` minus a prefill-only
`generate` of one token, so both count decode time only. Prefill: tokens/s of one prompt.
Prints each figure and the ratio tierlm / transformers (> 1: tierlm faster).

    python benchmarks/bench_engine.py [--models llama,v4] [--batches 1,16] [--context 64] [--tokens 64] [--ops]

--ops also counts the ATen operators each side dispatches per decode step (a TorchDispatchMode
around a few steps): on models this small a step costs calls, not arithmetic, so the ratio
of these counts bounds what eager execution can gain.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers as T
from torch.utils._python_dispatch import TorchDispatchMode

import tierlm
from tierlm import LLM
from tierlm.runtime import bench


def make_llama(path: Path) -> Path:
    cfg = T.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    return _save(T.LlamaForCausalLM(cfg), path / "llama")


def make_v4(path: Path, max_position: int = 4096) -> Path:
    csa, hca, swa = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
    cfg = T.DeepseekV4Config(vocab_size=512, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4,
                             layer_types=[swa, csa, hca, csa], mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
                             compress_rates={csa: 4, hca: 32}, sliding_window=64, index_topk=64, hc_mult=2,
                             num_attention_heads=8, head_dim=64, q_lora_rank=128, partial_rotary_factor=0.25,
                             num_experts_per_tok=2, n_routed_experts=8, n_shared_experts=1, o_groups=2,
                             o_lora_rank=64, index_n_heads=4, index_head_dim=32, max_position_embeddings=max_position)
    return _save(T.DeepseekV4ForCausalLM(cfg), path / "v4")


def _save(model, path: Path) -> Path:
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.dim() > 1 else 0.1) + (1.0 if n.endswith("norm.weight") else 0))
    model.to(torch.float32).save_pretrained(path)
    return path


def hf_decode(model, batch: int, context: int, tokens: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def run(n):
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)
        return time.perf_counter() - t0

    run(2)                                               # warm-up
    return batch * (tokens - 1) / (run(tokens) - run(1))


class CountOps(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it (views included: each is a call too)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(llm: LLM, model, batch: int, context: int, steps: int = 4) -> tuple[float, float]:
    """ATen operators per decode step: (tierlm, transformers generate), same prompts' shape."""
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    params = tierlm.SamplingParams(temperature=0, max_tokens=2 * steps + 4, ignore_eos=True)
    for row in ids.tolist():
        llm.add_request(row, params)
    for _ in range(steps):                               # prefill and the first decode steps
        llm.step()
    with CountOps() as ours:
        for _ in range(steps):
            llm.step()
    counts = []
    for n in (2, 2 + steps):
        with torch.no_grad(), CountOps() as theirs:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        counts.append(theirs.n)
    return ours.n / steps, (counts[1] - counts[0]) / steps


def hf_prefill(model, context: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :16])
        t0 = time.perf_counter()
        model(ids)
        return context / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama,v4")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ops", action="store_true", help="also count ATen operators per decode step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = {"llama": make_llama, "v4": make_v4}[name](Path(tmp))
            hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for b in map(int, args.batches.split(",")):
                llm = LLM(path, dtype=torch.float32, max_num_seqs=b, max_model_len=args.context + args.tokens + 8)
                ours = bench.decode(llm, b, args.context, args.tokens)["tokens_per_s"]
                theirs = hf_decode(hf, b, args.context, args.tokens)
                rows.append(dict(model=name, mode="decode", batch=b, tierlm=ours, transformers=theirs))
                if args.ops:
                    llm = LLM(path, dtype=torch.float32, max_num_seqs=b, max_model_len=args.context + 64)
                    ours, theirs = ops_per_step(llm, hf, b, args.context)
                    rows.append(dict(model=name, mode="ops/step", batch=b, tierlm=ours, transformers=theirs))
            llm = LLM(path, dtype=torch.float32, max_num_seqs=1, max_num_batched_tokens=args.prefill)
            ours = bench.prefill(llm, 1, args.prefill)["tokens_per_s"]
            rows.append(dict(model=name, mode="prefill", batch=1, tierlm=ours, transformers=hf_prefill(hf, args.prefill)))
    for r in rows:
        r["ratio"] = r["tierlm"] / r["transformers"]
        if args.json:
            print(json.dumps(r))
        else:
            unit = "ops " if r["mode"] == "ops/step" else "tok/s"
            print(f"{r['model']:6s} {r['mode']:8s} batch {r['batch']:3d}: tierlm {r['tierlm']:9.1f} {unit}  "
                  f"transformers {r['transformers']:9.1f} {unit}  ratio {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
