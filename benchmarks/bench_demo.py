"""Benchmark: the demo model end to end — training throughput and loss, MTP acceptance and
decode speed-up, GRPO rollout tokens/s through `tierlm.LLM` against transformers `generate`
on the same weights, and the held-out reward before and after GRPO.

Rollouts: P prompts of the same token length (the last L tokens of GRPO prompts, so
transformers batches them without padding), G samples each at temperature 1, T new tokens
each (ignore_eos), all P*G sequences in one `generate` call for transformers and one
`LLM.generate` (SamplingParams(n=G)) for tierlm. Ratio = tierlm tokens/s / transformers.

    python benchmarks/bench_demo.py [--steps 300] [--grpo-steps 20] [--prompts 4] [--group 8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers as T

from tierlm import LLM, SamplingParams
from tierlm.train import demo
from tierlm.train.data import split, stdlib_files
from tierlm.train.grpo import assignment_prompts


def rollout_prompts(llm: LLM, count: int, length: int) -> list[list[int]]:
    train_texts, _ = split(stdlib_files(demo.DemoSettings().corpus_bytes))
    out = []
    for p in assignment_prompts(train_texts):
        ids = llm.tokenizer.encode(p, add_special_tokens=False).ids
        if len(ids) >= length:
            out.append(ids[-length:])
        if len(out) == count:
            return out
    raise SystemExit("not enough long prompts")


def tierlm_rollouts(llm: LLM, prompts, group: int, tokens: int) -> float:
    params = [SamplingParams(n=group, temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=i)
              for i in range(len(prompts))]
    llm.generate([{"prompt_token_ids": p} for p in prompts[:1]], params[:1])          # warm-up
    llm.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t0
    made = sum(len(c.token_ids) for o in outs for c in o.outputs)
    assert made == len(prompts) * group * tokens
    return made / dt


def hf_rollouts(model, prompts, group: int, tokens: int) -> float:
    ids = torch.tensor(prompts).repeat_interleave(group, dim=0)
    mask = torch.ones_like(ids)
    model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=True, pad_token_id=0)   # warm-up
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                         temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    dt = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == tokens
    return ids.shape[0] * tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--grpo-steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    settings = demo.DemoSettings(steps=args.steps)
    path, summary = demo.build(settings)
    print(f"training: {summary['train_tokens']:,} tokens, {summary['train_tokens_per_s']:,.0f} tok/s, "
          f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, MTP loss "
          f"{summary['first_mtp_loss']:.3f} -> {summary['final_mtp_loss']:.3f}, held-out "
          f"{summary['held_out_loss_before']:.3f} -> {summary['held_out_loss_after']:.3f}")
    rep = demo.report(path)
    mtp = rep["mtp"]
    print(f"serving: greedy {rep['tokens_per_s']:.1f} tok/s (batch 1); MTP acceptance {mtp['acceptance_rate']:.3f}, "
          f"{mtp['tokens_per_s_on']:.1f} vs {mtp['tokens_per_s_off']:.1f} tok/s (batch 4): "
          f"speed-up {mtp['speedup']:.2f}x, identical greedy output: {mtp['greedy_identical']}")
    llm = LLM(path, dtype=torch.float32, reference="transformers", max_model_len=1024, max_num_seqs=args.prompts * args.group)
    prompts = rollout_prompts(llm, args.prompts, args.prompt_tokens)
    ours = tierlm_rollouts(llm, prompts, args.group, args.tokens)
    hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf_rollouts(hf, prompts, args.group, args.tokens)
    print(f"GRPO rollouts ({args.prompts} prompts x {args.group} samples, {args.prompt_tokens} + {args.tokens} tokens): "
          f"tierlm {ours:,.1f} tok/s, transformers {theirs:,.1f} tok/s, ratio {ours / theirs:.2f}x")
    g = demo.grpo(path, settings, args.grpo_steps, progress=False, log=lambda *a: None)
    print(f"GRPO {args.grpo_steps} steps: held-out reward {g['reward_before']:.3f} -> {g['reward_after']:.3f}; "
          f"rollouts during training {g['rollout_tokens_per_s']:,.0f} tok/s")
    print(json.dumps({"train": summary, "mtp": mtp, "rollout_tokens_per_s": {"tierlm": ours, "transformers": theirs},
                      "grpo": {k: g[k] for k in ("reward_before", "reward_after", "rollout_tokens_per_s")}}))


if __name__ == "__main__":
    main()
