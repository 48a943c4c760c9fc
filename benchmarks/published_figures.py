"""Published deployment figures next to what tierlm's planner says for the same setting.

Each `Figure` quotes a public source (URL, or repository@commit:path, and its date) for the
published number and for every setting the source states; what a source leaves unstated is
listed under `assumed`. Three kinds, with the acceptance of issue #10:

- decode: output tokens/s per GPU at a stated batch. tierlm's decode roofline is an upper
  bound, so tierlm / published must be in [1, 5].
- tpot: time per output token (ms) at batch 1. tierlm / published within [1/3, 3].
- capacity: sequences or weight bytes per GPU. tierlm / published within [0.75, 1.25].

    python benchmarks/published_figures.py            # print the markdown table
    python benchmarks/published_figures.py --write    # and replace it in docs/planner.md

tests/test_published_figures.py imports this file, checks every ratio and that the table in
docs/planner.md is the one `table()` generates now.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tierlm import plan  # noqa: E402

DOC = ROOT / "docs" / "planner.md"
START, END = "<!-- published-figures:start -->", "<!-- published-figures:end -->"
BOUNDS = {"decode": (1.0, 5.0), "tpot": (1 / 3, 3.0), "capacity": (0.75, 1.25)}

DEEPSEEK = ("DeepSeek inference-system overview, deepseek-ai/open-infra-index:202502OpenSourceWeek/"
            "day_6_one_more_thing_deepseekV3R1_inference_system_overview.md (2025-03-01)")
LMSYS_EP = "LMSYS blog, lm-sys/lm-sys.github.io@2db4e404:blog/2025-05-05-large-scale-ep.md (2025-05-05)"
LMSYS_GB200 = "LMSYS blog, lm-sys/lm-sys.github.io@0f320187:blog/2025-09-25-gb200-part-2.md (2025-09-25)"
LMSYS_LONG = "LMSYS blog, lm-sys/lm-sys.github.io@5b8a5044:blog/2025-02-19-gb300-longctx.md (dated 2026-02-19)"
VLLM_FP8KV = "vLLM blog, vllm-project/vllm-project.github.io@c3a01c4:_posts/2026-04-22-fp8-kvcache.md (2026-04-22)"
TRTLLM_BLOG1 = ("TensorRT-LLM tech blog 1, NVIDIA/TensorRT-LLM@01c4ece911eb:docs/source/blogs/tech_blog/"
                "blog1_Pushing_Latency_Boundaries_Optimizing_DeepSeek-R1_Performance_on_NVIDIA_B200_GPUs.md (2025)")
R1_NVFP4 = {"routed_experts": "fp4", "shared_experts": "fp4", "dense_ffn": "fp4", "attention": "bf16"}


@dataclass(frozen=True)
class Figure:
    kind: str                 # decode | tpot | capacity
    source: str
    setting: str              # what was run, in words
    published: float
    unit: str                 # tok/s/GPU | ms | seq/GPU | GB/GPU | GiB/GPU
    quote: str                # the source's words for the number and the setting
    model: str
    context: int
    options: dict = field(default_factory=dict)
    assumed: str = ""

    def tierlm(self) -> float:
        d = plan(self.model, self.context, **self.options).data
        n = d["hardware"]["devices"]
        if self.kind == "decode":
            return d["decode"]["tokens_per_s"] / n
        if self.kind == "tpot":
            return d["decode"]["t_step_s"] * 1e3
        if self.unit == "seq/GPU":
            return d["batch"] / n
        return d["weights"]["per_device_bytes"] / (2**30 if self.unit == "GiB/GPU" else 1e9)

    def ratio(self) -> float:
        return self.tierlm() / self.published


FIGURES = [
    # ---- decode throughput at a stated batch (tierlm must be an upper bound, at most 5x)
    Figure("decode", f"{DEEPSEEK}; batch from {LMSYS_EP}",
           "DeepSeek-V3/R1 production decode, 18 nodes x 8 H800, DP144 attention + EP144, 128 seq/GPU, "
           "KV 4,989 tokens", 14_800 / 8, "tok/s/GPU",
           "'Decoding Phase [Routed Expert EP144, MLA/Shared Expert DP144]'; 'the average kvcache length per "
           "output token was 4,989 tokens'; '~14.8k tokens/s output during decoding' per node; LMSYS's table: "
           "'DeepSeek Blog ... Batch Size 128 ... Number of Nodes 18 ... Throughput (per node) 14,800'",
           "deepseek-ai/DeepSeek-V3", 4989,
           dict(hardware="h800", devices=144, dp_attention=True, batch=128 * 144),
           "bf16 KV (the overview: 'core MLA computations ... use the BF16 format'); every sequence at 4,989 "
           "tokens; no MTP"),
    Figure("decode", f"{LMSYS_EP} (DeepSeek's profile data)",
           "DeepSeek-V3 decode profile, 16 nodes x 8 H800, DP128 + EP128, 128 seq/GPU, KV 4,096 tokens",
           18_598 / 8, "tok/s/GPU",
           "'DeepSeek Profile ... Batch Size 128 ... KV Cache Length 4,096 ... Number of Nodes 16 ... "
           "Throughput (per node) 18,598'", "deepseek-ai/DeepSeek-V3", 4096,
           dict(hardware="h800", devices=128, dp_attention=True, batch=128 * 128), "bf16 KV; no MTP"),
    Figure("decode", LMSYS_EP,
           "SGLang PD + large-scale EP, DeepSeek-V3 decode on 9 nodes x 8 H100, DP72 + EP72, 256 seq/GPU, "
           "2,000-token inputs", 22_282 / 8, "tok/s/GPU",
           "'Evaluated on 9 nodes (9x8xH100, EP72 ...), the system achieved 22,282 tokens/sec per node for 2K "
           "inputs'; table: 'SGLang (Default) ... Batch Size 256 ... KV Cache Length 2,000'",
           "deepseek-ai/DeepSeek-V3", 2000,
           dict(hardware="h100", devices=72, dp_attention=True, batch=256 * 72), "bf16 KV; no MTP"),
    Figure("decode", LMSYS_GB200,
           "SGLang, DeepSeek-V3/R1 decode on GB200 NVL72, 48 ranks DP-attention + EP48, FP8 KV, NVFP4 experts, "
           "1,408 seq/GPU, 2,000-token inputs", 13_386, "tok/s/GPU",
           "'When using FP8 attention and NVFP4 MoE, SGLang achieved 26,156 input and 13,386 output tokens per "
           "second per GPU ... for 2000-token input sequences'; 'For decode, we use 48 ranks'; 'The batch size is "
           "chosen to make KV cache roughly full (thus 768 for 4k ISL and 1408 for 2k ISL)'",
           "deepseek-ai/DeepSeek-R1", 2000,
           dict(hardware="gb200", devices=48, dp_attention=True, batch=1408 * 48, kv_dtype="fp8",
                weight_dtypes={"routed_experts": "fp4"}),
           "1,408 is per rank; context = the 2,000 input tokens; the NVFP4 output projection is not modelled"),
    Figure("decode", LMSYS_GB200,
           "SGLang, DeepSeek-V3/R1 decode on GB200 NVL72, 48 ranks DP-attention + EP48, BF16 KV, FP8 experts, "
           "batch that fills the KV cache, 2,000-token inputs", 9_087, "tok/s/GPU",
           "'Even with traditional BF16 attention and FP8 MoE, SGLang still achieves 18,471 input and 9,087 output "
           "tokens per second'; 'The batch size is chosen to make KV cache roughly full'",
           "deepseek-ai/DeepSeek-R1", 2000,
           dict(hardware="gb200", devices=48, dp_attention=True, batch="max"),
           "--batch max stands for 'roughly full'; context = the 2,000 input tokens"),
    # ---- time per output token at batch 1 (within 3x)
    Figure("tpot", VLLM_FP8KV,
           "vLLM, Llama-3.1-8B on 1 H100, concurrency 1, BF16 KV, 1,024-token input",
           6.44 + 4.37e-05 * 1024, "ms",
           "'All Hopper experiments run on a single H100 GPU'; 'vllm bench serve with concurrency 1'; fit "
           "'ITL = slope x input_len + intercept': BF16 'slope ... 4.37e-05 ... ms/token', 'intercept ... 6.44 ms' "
           "(6.44 + 4.37e-05 x 1,024)", "meta-llama/Llama-3.1-8B-Instruct", 1024, dict(hardware="h100", devices=1)),
    Figure("tpot", VLLM_FP8KV,
           "vLLM, Llama-3.1-8B on 1 B200, concurrency 1, BF16 KV, 1,024-token input",
           3.93 + 1.80e-05 * 1024, "ms",
           "'For Llama-3.1-8B on B200, the fitted ITL slope drops from 1.80e-05 ... ms/token, while the intercept "
           "changes only from 3.93' (BF16: 3.93 + 1.80e-05 x 1,024)",
           "meta-llama/Llama-3.1-8B-Instruct", 1024, dict(hardware="b200", devices=1)),
    Figure("tpot", VLLM_FP8KV,
           "vLLM, gpt-oss-20b on 1 H100, concurrency 1, BF16 KV, 1,024-token input",
           4.03 + 8.94e-06 * 1024, "ms",
           "'The fitted ITL slope drops from 8.94e-06 ms/token in BF16 ...', 'intercepts remain tightly clustered "
           "between 4.03 and 4.07 ms' (4.03 + 8.94e-06 x 1,024)", "openai/gpt-oss-20b", 1024,
           dict(hardware="h100", devices=1), "the lower end (4.03 ms) of the quoted intercept range"),
    Figure("tpot", VLLM_FP8KV,
           "vLLM, gpt-oss-20b on 1 B200, concurrency 1, BF16 KV, 1,024-token input",
           3.15 + 3.56e-06 * 1024, "ms",
           "'For gpt-oss-20b on B200, the fitted ITL slope drops from 3.56e-06 ... and the intercept changes from "
           "3.15' (BF16: 3.15 + 3.56e-06 x 1,024)", "openai/gpt-oss-20b", 1024, dict(hardware="b200", devices=1)),
    Figure("tpot", TRTLLM_BLOG1,
           "TensorRT-LLM, DeepSeek-R1 on 8 B200, concurrency 1, no MTP, TP8, NVFP4 FFN + BF16 attention, "
           "ISL 1k / OSL 2k", 1000 / 111, "ms",
           "'min-latency scenarios on NVIDIA's 8xB200'; 'Input Sequence Length (ISL): 1k tokens', 'Output Sequence "
           "Length (OSL): 2k tokens'; MTP table: 'Without MTP | 1.00 | 111' TPS/User (1000 / 111 ms)",
           "deepseek-ai/DeepSeek-R1", 2048, dict(hardware="b200", devices=8, weight_dtypes=R1_NVFP4),
           "TP8 for every part (the blog's best setting splits experts TP4 x EP2); context 1,024 + half the output"),
    # ---- capacity (within 25 %)
    Figure("capacity", LMSYS_LONG,
           "SGLang, DeepSeek-R1 NVFP4 on GB200, DP-attention + EP16, mem_fraction_static 0.75, FP8 KV, "
           "128K + 8K tokens per request: requests per GPU", 24, "seq/GPU",
           "'We fix mem_fraction_static = 0.75'; 'KV footprint ... 35,136 B'; '136K (128K+8K)'; 'Theoretical cap "
           "| KV pool / KV per req | ... ≈ 24 req/GPU' (GB200)", "deepseek-ai/DeepSeek-R1", 136_000,
           dict(hardware="gb200", devices=16, dp_attention=True, batch="max", kv_dtype="fp8", gpu_util=0.75,
                weight_dtypes={"routed_experts": "fp4"}),
           "the blog takes 192 GB of HBM per GPU; tierlm takes the driver's 189,471 MiB"),
    Figure("capacity", LMSYS_LONG,
           "the same deployment: DeepSeek-R1 NVFP4 weights per GPU at EP16", 40, "GB/GPU",
           "'Model weights per GPU | FP4-quantized DeepSeek-R1, EP16/TP16 | ≈ 40 GB'", "deepseek-ai/DeepSeek-R1",
           136_000, dict(hardware="gb200", devices=16, dp_attention=True, batch=1, kv_dtype="fp8",
                         weight_dtypes={"routed_experts": "fp4"})),
    Figure("capacity", "SemiAnalysis InferenceX, https://github.com/SemiAnalysisAI/InferenceX/issues/2128 (2026-07-09)",
           "SGLang, DeepSeek-V4-Pro on 8 H200 at TP8: weight memory per GPU", 125.65, "GiB/GPU",
           "'the DeepSeek-V4-Pro FP8 weights occupy ~125.65 GB/GPU at tp-8'; log 'Load weight end. quant=fp8 ... "
           "mem usage=125.65 GB'", "deepseek-ai/DeepSeek-V4-Pro", 8192, dict(hardware="h200", devices=8),
           "SGLang's 'GB' are GiB (the issue's '~140.4 GB/GPU' H200 is 143,771 MiB); its figure also holds the "
           "CUDA context and buffers, which tierlm does not count"),
]


def _fmt(x: float, unit: str) -> str:
    if unit == "ms":
        return f"{x:.2f} ms"
    return f"{x:,.0f} {unit}" if x >= 100 else f"{x:,.1f} {unit}"


def table() -> str:
    rows = ["| kind | source | setting | published | tierlm | tierlm / published |", "|---|---|---|---|---|---|"]
    for f in FIGURES:
        value = f.tierlm()
        rows.append(f"| {f.kind} | {f.source} | {f.setting} | {_fmt(f.published, f.unit)} | {_fmt(value, f.unit)} | "
                    f"{value / f.published:.2f} |")
    return "\n".join(rows) + "\n"


def write_docs(text: str, path: Path = DOC) -> None:
    doc = path.read_text()
    new = re.sub(re.escape(START) + r".*?" + re.escape(END), START + "\n" + text + END, doc, flags=re.S)
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="replace the table in docs/planner.md")
    args = ap.parse_args()
    text = table()
    print(text, end="")
    if args.write:
        write_docs(text)


if __name__ == "__main__":
    main()
