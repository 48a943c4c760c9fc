"""Benchmark: tierlm.LLM decode tokens/s against llama.cpp on the same weights at the same precision.

A random Llama-shaped checkpoint of 99.5M parameters (hidden 768, 8 layers, 12 query / 4 KV heads,
MLP 2048, vocab 32000, untied output head; weights ~N(0, 0.02), norm weights ~1 + N(0, 0.1)) is
written by transformers as safetensors, and the same tensors are written to a GGUF file at the same
precision (f32 by default; --dtype bf16 writes both in bf16, norm weights stay f32 in the GGUF) by
`gguf.GGUFWriter`, with a synthetic vocab, since nothing is tokenized. Both engines run on the CPU
with --threads threads, batch 1, KV cache in the weights' precision (llama.cpp's default would be
f16); llama.cpp keeps llama-cpp-python's default of no flash attention (slower on this CPU here).

Before anything is timed the conversion is checked: transformers (float32) decodes a 16-token
greedy continuation of a short prompt, llama.cpp evaluates prompt + continuation in one batch,
and its logits at every generated position must match transformers' (max |diff| small against the
logits' standard deviation) with the same argmax; tierlm's greedy continuation is compared too.
The script aborts if llama.cpp disagrees.

Decode: both get the same random prompt of --context tokens and then decode --tokens greedy
tokens. tierlm is timed by tierlm.runtime.bench.decode (prefill and the first decode step not
timed); llama.cpp the same way through llama-cpp-python: eval the prompt, one warm-up step, then
--tokens timed steps of `eval([token])` + argmax of the last logits. The engines alternate for
--repeat rounds and the median of each is reported, with the ratio tierlm / llama.cpp (> 1: tierlm
faster).

    python benchmarks/bench_llamacpp.py [--dtype f32|bf16] [--context 128] [--tokens 64]
                                        [--threads 2] [--repeat 3] [--json]

llama-cpp-python and gguf are not dependencies of tierlm; install them separately:

    pip install llama-cpp-python gguf      # llama-cpp-python builds llama.cpp from source (cmake)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import transformers as T

from tierlm import LLM, SamplingParams
from tierlm.runtime import bench

try:
    import gguf
    import llama_cpp
except ImportError as e:                                        # pragma: no cover - optional tools
    raise SystemExit(f"{e.name} is not installed: pip install llama-cpp-python gguf") from None

CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
              num_attention_heads=12, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=4096, tie_word_embeddings=False)
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
GGML_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "bf16": gguf.GGMLQuantizationType.BF16}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16}
# llama.cpp compares in f32 against the f32 reference; bf16 rounds activations too, so it gets more room.
TOLERANCE = {"f32": 1e-2, "bf16": 1e-1}
CHECK_PROMPT, CHECK_TOKENS = 12, 16


# ---------------------------------------------------------------------------------- checkpoint
def make_checkpoint(path: Path, dtype: str) -> Path:
    """A random Llama checkpoint in `path`, stored in `dtype`."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))      # not all ones, so a swapped norm would show
            else:
                p.copy_(0.02 * torch.randn_like(p))
    model.to(TORCH_DTYPES[dtype]).save_pretrained(path)
    return path


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


# ---------------------------------------------------------------------------------- GGUF
def rope_permutation(n_head: int, head_dim: int) -> torch.Tensor:
    """Row order that turns a rotate-half q/k projection into an interleaved one.

    HF Llama rotates dimension i of a head with dimension i + head_dim/2 (both at frequency i);
    llama.cpp's llama arch (GGML "normal" RoPE) rotates 2i with 2i+1. So row 2i of a GGUF head
    must be HF row i and row 2i+1 HF row i + head_dim/2: new_rows = old_rows[perm].
    """
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)   # 0, h, 1, h+1, ...
    return (torch.arange(n_head)[:, None] * head_dim + within).reshape(-1)


def check_rope_permutation(head_dim: int = 8, theta: float = 10000.0) -> None:
    """q.k under rotate-half RoPE must equal q[perm].k[perm] under interleaved RoPE."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64)
    freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)

    def rotate_half(x, pos):
        c, s = torch.cos(pos * freq).repeat(2), torch.sin(pos * freq).repeat(2)
        x1, x2 = x[: head_dim // 2], x[head_dim // 2:]
        return x * c + torch.cat([-x2, x1]) * s

    def interleaved(x, pos):
        a, b = x[0::2], x[1::2]
        c, s = torch.cos(pos * freq), torch.sin(pos * freq)
        return torch.stack([a * c - b * s, a * s + b * c], dim=1).reshape(-1)

    perm = rope_permutation(1, head_dim)
    for pq, pk in ((0, 0), (5, 2), (37, 11)):
        hf = rotate_half(q, pq) @ rotate_half(k, pk)
        gg = interleaved(q[perm], pq) @ interleaved(k[perm], pk)
        assert torch.allclose(hf, gg), (pq, pk, hf, gg)


def tensor_map(n_layers: int) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name for the Llama architecture."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(n_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    return names


def write_gguf(ckpt: Path, out: Path, dtype: str) -> Path:
    """Write the checkpoint's tensors, unchanged in value and precision, as a llama-arch GGUF."""
    c = T.LlamaConfig.from_pretrained(ckpt)
    head_dim = c.head_dim
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(FILE_TYPES[dtype])
    add_vocab(w, c.vocab_size)

    names = tensor_map(c.num_hidden_layers)
    perm_q = rope_permutation(c.num_attention_heads, head_dim)
    perm_k = rope_permutation(c.num_key_value_heads, head_dim)
    state = load_state(ckpt)
    if set(state) != set(names):
        raise SystemExit(f"unexpected checkpoint tensors: {sorted(set(state) ^ set(names))}")
    for hf_name, t in state.items():
        if hf_name.endswith("q_proj.weight"):
            t = t[perm_q]
        elif hf_name.endswith("k_proj.weight"):
            t = t[perm_k]
        if t.dim() == 1:                                # norm weights: llama.cpp keeps these in f32
            w.add_tensor(names[hf_name], t.float().numpy())
        elif dtype == "bf16":                           # the raw bf16 bits, no rounding on the way
            w.add_tensor(names[hf_name], t.contiguous().view(torch.int16).numpy().view(np.uint16),
                         raw_dtype=GGML_TYPES[dtype])
        else:
            w.add_tensor(names[hf_name], t.float().contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def add_vocab(w, vocab_size: int) -> None:
    """A synthetic SentencePiece-style vocab (llama.cpp needs one to load the model; nothing is
    tokenized here): <unk> <s> </s>, the 256 byte tokens, then placeholder pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"tok{i}" for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.NORMAL] * (vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(vocab_size)])
    w.add_token_types([int(t) for t in types])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def open_llama_cpp(path: Path, dtype: str, n_ctx: int, threads: int, logits_all: bool = False,
                   flash_attn: bool = False) -> llama_cpp.Llama:
    """llama.cpp on the CPU, KV cache in the weights' precision (llama.cpp's own default is f16)."""
    kv = int(GGML_TYPES[dtype])
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, type_k=kv, type_v=kv, logits_all=logits_all,
                           flash_attn=flash_attn, n_gpu_layers=0, seed=0, verbose=False)


# ---------------------------------------------------------------------------------- check
def verify(ckpt: Path, gguf_path: Path, dtype: str, threads: int) -> dict:
    """Compare llama.cpp's and tierlm's greedy decoding with transformers' float32 reference."""
    hf = T.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, CHECK_PROMPT), generator=torch.Generator().manual_seed(1))
    seq = prompt
    with torch.no_grad():                               # plain argmax loop (generate would mask EOS)
        for _ in range(CHECK_TOKENS):
            seq = torch.cat([seq, hf(seq).logits[:, -1:].argmax(-1)], dim=1)
        ref = hf(seq).logits[0, CHECK_PROMPT - 1: -1].double()          # the logits that chose each new token
    del hf
    ref_tokens = seq[0, CHECK_PROMPT:].tolist()

    llm = open_llama_cpp(gguf_path, dtype, 64, threads, logits_all=True)
    llm.eval(seq[0].tolist())
    ours = torch.from_numpy(np.array(llm.scores[CHECK_PROMPT - 1: seq.shape[1] - 1], dtype=np.float64))
    del llm
    diff = (ours - ref).abs().max().item()
    scale = ref.std().item()
    picked = ours.argmax(-1).tolist()
    # An argmax flip only counts if transformers' margin between the two picks exceeds the tolerance
    # (never happens in f32; in bf16 a near-tie may legitimately flip).
    flips = [i for i, (a, b) in enumerate(zip(picked, ref_tokens))
             if a != b and (ref[i, b] - ref[i, a]).item() > TOLERANCE[dtype] * scale]
    if diff > TOLERANCE[dtype] * scale or flips:
        raise SystemExit(f"llama.cpp disagrees with transformers on the converted weights: max |dlogit| {diff:.3g} "
                         f"(logit std {scale:.3g}, tolerance {TOLERANCE[dtype]} x std); argmax "
                         f"{picked} vs {ref_tokens}")

    tl = LLM(ckpt, dtype=TORCH_DTYPES[dtype], max_num_seqs=1, max_model_len=64)
    out = tl.generate([prompt[0].tolist()], SamplingParams(temperature=0, max_tokens=CHECK_TOKENS,
                                                          ignore_eos=True))[0].outputs[0].token_ids
    del tl
    return {"llama_cpp_max_abs_diff": diff, "logit_std": scale, "llama_cpp_argmax_equal": picked == ref_tokens,
            "tierlm_greedy_equal": out == ref_tokens, "greedy_tokens": CHECK_TOKENS}


# ---------------------------------------------------------------------------------- timing
def prompt_ids(context: int) -> list[int]:
    """The prompt tierlm.runtime.bench draws for batch 1 (seed 0), so both engines see the same ids."""
    return torch.randint(0, CONFIG["vocab_size"], (1, context), generator=torch.Generator().manual_seed(0))[0].tolist()


def llama_cpp_decode(llm: llama_cpp.Llama, context: int, tokens: int) -> float:
    """Decode tokens/s after a `context`-token prompt: prefill and one warm-up step are not timed."""
    n_vocab = llm.n_vocab()

    def step(ids: list[int]) -> int:                   # eval, then greedy pick from the last logits
        llm.eval(ids)                                   # (without logits_all, eval keeps no logits itself)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    llm.reset()
    tok = step(prompt_ids(context))
    tok = step([tok])                                   # warm-up step, as bench.decode does
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = step([tok])
    return tokens / (time.perf_counter() - t0)


def tierlm_decode(ckpt: Path, dtype: str, context: int, tokens: int) -> float:
    llm = LLM(ckpt, dtype=TORCH_DTYPES[dtype], max_num_seqs=1, max_model_len=context + tokens + 8)
    return bench.decode(llm, 1, context, tokens)["tokens_per_s"]


def machine(threads: int) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:                                                # other work on the cores skews both engines
        load = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        load = None
    return {"cpu": cpu, "threads": threads, "torch": torch.__version__, "llama_cpp_python": version("llama-cpp-python"),
            "gguf": version("gguf"), "transformers": T.__version__, "load_average_1min": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="f32")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    host = machine(args.threads)                        # before our own work raises the load average
    check_rope_permutation()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "llama", args.dtype)
        gguf_path = write_gguf(ckpt, Path(tmp) / "llama.gguf", args.dtype)
        params = sum(t.numel() for t in load_state(ckpt).values())
        check = verify(ckpt, gguf_path, args.dtype, args.threads)

        cpp = open_llama_cpp(gguf_path, args.dtype, args.context + args.tokens + 8, args.threads, logits_all=False)
        runs = {"tierlm": [], "llama_cpp": []}
        for _ in range(args.repeat):                    # alternate, so a busy moment hits both engines
            runs["tierlm"].append(tierlm_decode(ckpt, args.dtype, args.context, args.tokens))
            runs["llama_cpp"].append(llama_cpp_decode(cpp, args.context, args.tokens))
        del cpp

    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"model": f"llama {params / 1e6:.1f}M params", "dtype": args.dtype, "batch": 1,
              "context": args.context, "tokens": args.tokens, "repeat": args.repeat,
              "tierlm_tokens_per_s": med["tierlm"], "llama_cpp_tokens_per_s": med["llama_cpp"],
              "ratio": med["tierlm"] / med["llama_cpp"], "runs": runs, "check": check,
              "machine": host}
    if args.json:
        print(json.dumps(result))
        return
    m = result["machine"]
    print(f"{result['model']}, {args.dtype}, batch 1, context {args.context}, {args.tokens} decode tokens, "
          f"median of {args.repeat}")
    print(f"check: llama.cpp max |dlogit| {check['llama_cpp_max_abs_diff']:.2e} (logit std {check['logit_std']:.3f}), "
          f"argmax equal {check['llama_cpp_argmax_equal']}; tierlm greedy equal {check['tierlm_greedy_equal']} "
          f"({CHECK_TOKENS} tokens vs transformers f32)")
    print(f"tierlm     {med['tierlm']:8.1f} tok/s   runs {', '.join(f'{x:.1f}' for x in runs['tierlm'])}")
    print(f"llama.cpp  {med['llama_cpp']:8.1f} tok/s   runs {', '.join(f'{x:.1f}' for x in runs['llama_cpp'])}")
    print(f"ratio tierlm / llama.cpp: {result['ratio']:.2f}x")
    print(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
          f"llama-cpp-python {m['llama_cpp_python']}, gguf {m['gguf']}, load average {m['load_average_1min']} at start")


if __name__ == "__main__":
    main()
