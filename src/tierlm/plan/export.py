"""Serving flags a plan implies, for vLLM and SGLang."""

from __future__ import annotations

import json

from ..errors import TierlmError
from ..units import GiB


def serving_flags(data: dict, engine: str) -> str:
    d = data
    tp = d["hardware"]["devices"]
    moe = "routed_experts" in d["weights"]["components"]
    spilled_kv = d["placement"]["items"]["kv_cache"]["host"]
    spilled_w = sum(d["placement"]["items"][k]["host"] for k in ("hot_weights", "routed_experts", "mtp"))
    kv = d["kv_dtype"]
    if engine == "vllm":
        args = ["vllm", "serve", d["model"], f"--tensor-parallel-size {tp}", f"--max-model-len {d['context']}",
                f"--max-num-seqs {d['batch']}", f"--gpu-memory-utilization {d['hardware']['device_budget_bytes'] / _dev_mem(d):.2f}"]
        if kv == "fp8":
            args.append("--kv-cache-dtype fp8")
        elif kv == "fp4":
            args.append("--kv-cache-dtype nvfp4")
        if moe and tp > 1:
            args.append("--enable-expert-parallel")
        if d["mtp"]:
            args.append("--speculative-config '" + json.dumps({"method": "mtp", "num_speculative_tokens": 1}) + "'")
        if spilled_kv:
            args.append(f"--kv-offloading-backend native --kv-offloading-size {-(-spilled_kv * tp // GiB)}")
        if spilled_w:
            args.append(f"--cpu-offload-gb {-(-spilled_w // GiB)}")
        return " \\\n  ".join(args)
    if engine == "sglang":
        args = ["python -m sglang.launch_server", f"--model-path {d['model']}", f"--tp {tp}",
                f"--context-length {d['context']}", f"--max-running-requests {d['batch']}",
                f"--mem-fraction-static {d['hardware']['device_budget_bytes'] / _dev_mem(d):.2f}"]
        if kv == "fp8":
            args.append("--kv-cache-dtype fp8_e4m3")
        elif kv == "fp4":
            args.append("--kv-cache-dtype fp4_e2m1")
        if moe and tp > 1:
            args.append(f"--ep-size {tp}")
        if d["mtp"]:
            args.append("--speculative-algorithm EAGLE --speculative-num-steps 1 --speculative-eagle-topk 1 "
                        "--speculative-num-draft-tokens 2")
        if spilled_kv:
            args.append(f"--enable-hierarchical-cache --hicache-size {-(-spilled_kv // 10**9)}")
        if spilled_w:
            args.append(f"--cpu-offload-gb {-(-spilled_w // GiB)}")
        return " \\\n  ".join(args)
    raise TierlmError(f"--export must be vllm or sglang, got {engine!r}")


def _dev_mem(d: dict) -> int:
    return d["hardware"]["device_memory_bytes"]
