"""`tierlm demo`: a tiny DeepSeek-V4 trained here, on the Python standard library, then
served by `tierlm.LLM` with MTP speculation.

The architecture is V4's in miniature: sliding-window attention on every layer, one
pure-window layer, CSA layers (ratio 4, lightning indexer top-k) and an HCA layer (ratio 16),
mHC with 2 streams, hash-routed MoE on the first two layers and learned routing after, a
shared expert per layer and one MTP block. A run is cached under a key of its settings, so a
second `tierlm demo` reuses the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
PROMPT = "def fibonacci(n):\n"
VERSION = 1          # bump when training code changes what a given set of settings produces


@dataclass(frozen=True)
class DemoSettings:
    steps: int = 300
    seed: int = 0
    batch: int = 8
    seq: int = 256
    vocab: int = 2048
    hidden: int = 128
    corpus_bytes: int = 4 << 20
    lr: float = 3e-3
    mtp_weight: float = 0.3

    def key(self) -> str:
        """Cache key: the code version, the settings, the config they make and the corpus
        (this Python's version)."""
        body = json.dumps([VERSION, asdict(self), demo_config(self), sys.version_info[:2]], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]


def demo_config(s: DemoSettings) -> dict:
    """config.json of the demo model (DeepseekV4Config field names)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": s.vocab, "hidden_size": s.hidden, "num_hidden_layers": 4,
        "layer_types": [SWA, CSA, HCA, CSA], "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe"],
        "compress_rates": {CSA: 4, HCA: 16}, "sliding_window": 32,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "partial_rotary_factor": 0.25,
        "q_lora_rank": 64, "o_groups": 2, "o_lora_rank": 64,
        "index_n_heads": 4, "index_head_dim": 32, "index_topk": 8,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 128,
        "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
        "hc_mult": 2, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "max_position_embeddings": 65536,
        "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
        "initializer_range": 0.02,
    }


def new_model(config: dict, seed: int):
    """A freshly initialised V4 module with its MTP block, in transformers' numerics."""
    from ..model.families import deepseek_v4
    from ..spec import parse_config
    from .trainer import init_params
    spec = parse_config(config, "tierlm-demo")
    model = deepseek_v4.DeepseekV4(spec, with_mtp=len(spec.mtp_layers), reference="transformers")
    model.set_reference("transformers", exact_fp32=False)
    init_params(model, seed, config["initializer_range"])
    return model


def default_dir(s: DemoSettings) -> Path:
    base = Path(os.environ.get("TIERLM_CACHE", Path.home() / ".cache" / "tierlm"))
    return base / "demo" / s.key()


# The demo model continues Python source, so a chat turn is code to continue: the template
# joins the messages' contents with newlines and adds nothing for the reply (`tierlm serve`
# then answers /v1/chat/completions with the continuation).
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"


def build(s: DemoSettings, out: Path | None = None, progress: bool = True, log=print) -> tuple[Path, dict]:
    """Train the demo model (or reuse the one saved under the same settings); returns
    (checkpoint dir, training summary)."""
    from .checkpoint import save_checkpoint
    from .data import Batches, encode, split, stdlib_files, train_tokenizer
    from .trainer import evaluate, train
    out = Path(out) if out is not None else default_dir(s)
    meta = out / "demo.json"
    if meta.is_file():
        try:
            summary = json.loads(meta.read_text())
        except json.JSONDecodeError:
            summary = {}
        if summary.get("key") == s.key():
            log(f"reusing the demo model in {out} (trained with these settings)")
            if not (out / "chat_template.jinja").is_file():     # saved by an earlier version
                (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
            return out, summary
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    files = stdlib_files(s.corpus_bytes)
    train_texts, held_texts = split(files)
    tok = train_tokenizer(train_texts, s.vocab)
    stream, held = encode(tok, train_texts), encode(tok, held_texts)
    log(f"corpus: {len(files)} standard-library files, {stream.numel():,} training tokens "
        f"({time.perf_counter() - t0:.1f} s for the {s.vocab}-token BPE tokenizer and encoding)")
    config = demo_config(s)
    model = new_model(config, s.seed)
    eval_batches = [Batches(held, s.batch, s.seq, seed=s.seed + 1).next() for _ in range(2)]
    before = evaluate(model, eval_batches)
    hist = train(model, Batches(stream, s.batch, s.seq, seed=s.seed).next, s.steps, s.lr, s.mtp_weight,
                 progress=progress)
    after = evaluate(model, eval_batches)
    summary = {"key": s.key(), "settings": asdict(s), "params": sum(p.numel() for p in model.parameters()),
               "train_tokens": hist.tokens, "train_seconds": round(hist.seconds, 1),
               "train_tokens_per_s": round(hist.tokens_per_s, 1),
               "first_loss": hist.loss[0], "final_loss": sum(hist.loss[-10:]) / len(hist.loss[-10:]),
               "first_mtp_loss": hist.mtp_loss[0], "final_mtp_loss": sum(hist.mtp_loss[-10:]) / len(hist.mtp_loss[-10:]),
               "held_out_loss_before": before[0], "held_out_loss_after": after[0],
               "held_out_mtp_loss_after": after[1]}
    save_checkpoint(out, model, config, tok, extra={"demo.json": summary}, chat_template=CHAT_TEMPLATE)
    log(f"trained {s.steps} steps in {hist.seconds:.0f} s ({hist.tokens_per_s:,.0f} tok/s): loss "
        f"{summary['first_loss']:.2f} -> {summary['final_loss']:.2f}, MTP loss {summary['first_mtp_loss']:.2f} -> "
        f"{summary['final_mtp_loss']:.2f}; held-out {before[0]:.2f} -> {after[0]:.2f}; saved to {out}")
    return out, summary


def gqa_cache_bytes(config: dict, tokens: int, dtype_bytes: int, kv_heads: int = 2) -> int:
    """Cache bytes of a Llama-style GQA model of the same width and depth (same hidden size,
    layers, query heads and head_dim; `kv_heads` K/V heads, every token kept), from the
    planner's cache streams."""
    from ..spec import layer_cache_streams, parse_config
    spec = parse_config({"model_type": "llama", "vocab_size": config["vocab_size"],
                         "hidden_size": config["hidden_size"], "num_hidden_layers": config["num_hidden_layers"],
                         "num_attention_heads": config["num_attention_heads"], "num_key_value_heads": kv_heads,
                         "head_dim": config["head_dim"], "intermediate_size": 4 * config["hidden_size"],
                         "max_position_embeddings": config["max_position_embeddings"]}, "gqa-same-width")
    return sum(s.entries(tokens) * s.width * dtype_bytes for layer in spec.layers
               for s in layer_cache_streams(spec, layer))


def _timed_generate(llm, prompts, params) -> tuple[list, float, int]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    return outs, dt, sum(len(c.token_ids) for o in outs for c in o.outputs)


def report(path: Path, prompt: str = PROMPT, max_tokens: int = 64, contexts: tuple[int, ...] = (1024, 32768),
           spec_tokens: int = 1) -> dict:
    """Serve the checkpoint: a greedy snippet and its tokens/s, cache bytes per stream against
    a same-width GQA model, and greedy decoding with MTP speculation on vs off."""
    from ..runtime import LLM, SamplingParams
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    plain = LLM(path, reference="transformers", max_model_len=4096)
    config = json.loads((Path(path) / "config.json").read_text())
    plain.generate(prompt, SamplingParams(temperature=0, max_tokens=4))               # warm-up
    (out,), dt, made = _timed_generate(plain, [prompt], greedy)
    spec = LLM(path, reference="transformers", max_model_len=4096,
               speculative={"method": "mtp", "num_tokens": spec_tokens})
    batch = [prompt, "class Stack:\n", "import os\n\n\ndef ", "    def __init__(self"]
    spec.generate(prompt, SamplingParams(temperature=0, max_tokens=4))
    base_outs, base_dt, base_made = _timed_generate(plain, batch, greedy)
    spec_outs, spec_dt, spec_made = _timed_generate(spec, batch, greedy)
    same = all(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(base_outs, spec_outs))
    return {"prompt": prompt, "text": out.outputs[0].text, "tokens": made, "tokens_per_s": made / dt,
            "cache": {str(n): {"by_stream": plain.cache_bytes_by_stream(n), "total": plain.cache_bytes(n),
                               "gqa_same_width": gqa_cache_bytes(config, n, plain.dtype.itemsize)}
                      for n in contexts},
            "mtp": {"acceptance_rate": spec.stats()["spec_acceptance_rate"],
                    "tokens_per_s_off": base_made / base_dt, "tokens_per_s_on": spec_made / spec_dt,
                    "speedup": (spec_made / spec_dt) / (base_made / base_dt), "greedy_identical": same}}


def grpo(path: Path, s: DemoSettings, steps: int, cfg=None, train_prompts: int = 64, held_prompts: int = 16,
         progress: bool = True, log=print) -> dict:
    """GRPO on the demo model with the Python-parses reward: prompts are function headers
    (with the lines above them) from the training files, the held-out reward is measured on
    headers from the held-out files before and after. Saves the result to `<path>-grpo`."""
    from ..runtime import LLM
    from .checkpoint import save_checkpoint
    from .data import split, stdlib_files
    from .grpo import GRPOConfig, assignment_prompts, mean_reward, train_grpo
    cfg = cfg or GRPOConfig()
    train_texts, held_texts = split(stdlib_files(s.corpus_bytes))
    prompts, held = assignment_prompts(train_texts, limit=train_prompts), assignment_prompts(held_texts, limit=held_prompts)
    llm = LLM(path, dtype=torch.float32, reference="transformers", max_model_len=1024, max_num_seqs=64)
    before = mean_reward(llm, held, cfg)
    log(f"held-out reward before GRPO: {before:.3f} ({len(held)} prompts x 8 samples)")
    hist = train_grpo(llm, prompts, steps, cfg, seed=s.seed, progress=progress, log=log)
    after = mean_reward(llm, held, cfg)
    log(f"held-out reward after {steps} GRPO steps: {after:.3f}")
    out = Path(str(path) + "-grpo")
    from tokenizers import Tokenizer
    save_checkpoint(out, llm.model, json.loads((Path(path) / "config.json").read_text()),
                    Tokenizer.from_file(str(Path(path) / "tokenizer.json")))
    return {"reward_before": before, "reward_after": after, "reward_mean": hist.reward_mean,
            "reward_std": hist.reward_std, "rollout_tokens_per_s": hist.rollout_tokens_per_s, "saved": str(out)}
