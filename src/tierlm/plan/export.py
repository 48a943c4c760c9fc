"""Serving flags a plan implies, for vLLM and SGLang.

KV cache the plan places on host memory or disk becomes the engines' KV offload tiers. Those
tiers are inclusive: every KV block the GPU fills is also written down to them (vLLM's
OffloadingConnector stores each newly full block, `_get_reqs_to_store` in
vllm-project/vllm:vllm/distributed/kv_transfer/kv_connector/v1/offloading_connector.py; LMCache
puts every chunk into every backend, `StorageManager.batched_put` in
LMCache/LMCache:lmcache/v1/storage_backend/storage_manager.py; HiCache's default policy is
write_through, sgl-project/sglang:docs/advanced_features/hicache_design.md). So a tier is sized
to hold the plan's KV on it plus the KV on every faster tier, capped at what that tier's budget
has left beside the other items the plan put there (which is never less than the KV placed on it).
"""

from __future__ import annotations

import json

from ..errors import TierlmError
from ..units import GB, GiB

# Directory of the disk KV tier in the exported commands: point it at the NVMe the plan's disk
# tier describes.
DISK_DIR = "/mnt/nvme/kv-cache"


def _ceil(n: int, unit: int) -> int:
    return -(-n // unit)


def _kv_tier(d: dict, tier: str, kv_bytes: int) -> int:
    """Per-rank bytes of an inclusive KV tier: `kv_bytes`, capped at the tier's free budget."""
    others = sum(row[tier] for name, row in d["placement"]["items"].items() if name != "kv_cache")
    return min(kv_bytes, d["hardware"][f"{tier}_budget_bytes"] - others)


def serving_flags(data: dict, engine: str) -> str:
    d = data
    n = d["hardware"]["devices"]
    tp = d["hardware"]["tensor_parallel"]                   # n, or 1 under DP attention
    dp = d["dp_attention"] and n > 1
    seqs = d["kv_cache"]["sequences_per_device"]            # ceil(batch / n) under DP attention, else batch
    moe = "routed_experts" in d["weights"]["components"]
    kv_tiers = d["placement"]["items"]["kv_cache"]          # bytes per device (rank) on each tier
    on_device, on_host, on_disk = kv_tiers["device"], kv_tiers["host"], kv_tiers["disk"]
    host_tier = _kv_tier(d, "host", on_device + on_host)    # inclusive offload tiers, bytes per rank
    disk_tier = _kv_tier(d, "disk", on_device + on_host + on_disk)
    env = []                                                # environment variables the command needs
    spilled_w = sum(d["placement"]["items"][k]["host"] for k in ("hot_weights", "routed_experts", "mtp"))
    kv = d["kv_dtype"]
    if engine == "vllm":
        # DP attention: one engine per device, each with its own scheduler and KV cache, so
        # --max-num-seqs is per DP rank; --enable-expert-parallel makes the MoE layers expert-parallel
        # over DP x TP ranks instead of tensor-parallel (vllm-project/vllm:docs/serving/data_parallel_deployment.md).
        par = f"--data-parallel-size {n}" if dp else f"--tensor-parallel-size {n}"
        args = [f"vllm serve {d['model']}", par, f"--max-model-len {d['context']}",
                f"--max-num-seqs {seqs}", f"--gpu-memory-utilization {d['hardware']['device_budget_bytes'] / _dev_mem(d):.2f}"]
        if kv == "fp8":
            args.append("--kv-cache-dtype fp8")
        elif kv == "fp4":
            args.append("--kv-cache-dtype nvfp4")
        if moe and n > 1:
            args.append("--enable-expert-parallel")
        if d["mtp"]:
            args.append("--speculative-config '" + json.dumps({"method": "mtp", "num_speculative_tokens": 1}) + "'")
        if on_disk:
            # LMCache behind vLLM's KV connector API, with a CPU and a local-disk tier, each sized
            # in GiB per worker (rank): LMCache/LMCache:docs/source/api_reference/configurations.rst
            # (env names), docs/source/kv_cache/storage_backends/local_storage.rst (the
            # --kv-transfer-config and file:// path); lmcache/v1/storage_backend/local_disk_backend.py
            # and lmcache/v1/cache_engine.py multiply both sizes by 1024**3 (the docs say "GB").
            env += ["LMCACHE_LOCAL_CPU=True",
                    f"LMCACHE_MAX_LOCAL_CPU_SIZE={_ceil(host_tier, GiB)}",
                    f"LMCACHE_LOCAL_DISK=file://{DISK_DIR}/lmcache/",
                    f"LMCACHE_MAX_LOCAL_DISK_SIZE={_ceil(disk_tier, GiB)}"]
            args.append("--kv-transfer-config '"
                        + json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}) + "'")
        elif on_host:
            # vLLM's native CPU offloading: GiB summed over the ranks of one engine (each rank gets
            # size / (TP x PP); a DP rank is an engine of its own, TP 1 here), vllm-project/vllm:
            # vllm/config/cache.py (kv_offloading_size), vllm/config/kv_offloading.py (get_num_kv_ranks).
            args.append(f"--kv-offloading-backend native --kv-offloading-size {_ceil(host_tier * tp, GiB)}")
        if spilled_w:
            args.append(f"--cpu-offload-gb {-(-spilled_w // GiB)}")
        return " \\\n  ".join(env + args)
    if engine == "sglang":
        launcher, par, running = "python -m sglang.launch_server", [f"--tp {n}"], seqs
        if dp and moe:
            # DP attention ("--dp-size must be explicitly set", sgl-project/sglang:
            # docs/advanced_features/dp_dpa_smg_guide.md): attention TP size = tp / dp = 1
            # (python/sglang/srt/layers/dp_attention.py, compute_dp_attention_world_info). Its FFN is
            # tensor-parallel unless --moe-dense-tp-size 1, and the LM head whole per rank needs
            # --enable-dp-lm-head: both as the plan counts them (docs/advanced_features/server_arguments.md).
            # --max-running-requests is for all ranks, each taking 1/dp of it
            # (python/sglang/srt/model_executor/model_runner.py, max_running_requests // dp_size).
            par = [f"--tp {n}", f"--dp-size {n}", "--enable-dp-attention", "--moe-dense-tp-size 1",
                   "--enable-dp-lm-head"]
            running = seqs * n
        elif dp:
            # --enable-dp-attention is for MoE models (server_arguments.md); for a dense one the plan is
            # n whole replicas, each with its own scheduler and --max-running-requests: data parallelism
            # behind SGLang's router, as dp_dpa_smg_guide.md recommends.
            launcher, par = "python -m sglang_router.launch_server", [f"--dp-size {n}"]
        args = [launcher, f"--model-path {d['model']}", *par,
                f"--context-length {d['context']}", f"--max-running-requests {running}",
                f"--mem-fraction-static {d['hardware']['device_budget_bytes'] / _dev_mem(d):.2f}"]
        if kv == "fp8":
            args.append("--kv-cache-dtype fp8_e4m3")
        elif kv == "fp4":
            args.append("--kv-cache-dtype fp4_e2m1")
        if moe and n > 1:
            args.append(f"--ep-size {n}")
        if d["mtp"]:
            args.append("--speculative-algorithm EAGLE --speculative-num-steps 1 --speculative-eagle-topk 1 "
                        "--speculative-num-draft-tokens 2")
        if on_host or on_disk:
            # HiCache: host pool in GB (10^9 B) per rank, overriding --hicache-ratio;
            # sgl-project/sglang:docs/advanced_features/hicache_design.md ("Related Parameters"),
            # python/sglang/srt/mem_cache/memory_pool_host.py (host_size * 1e9 // size_per_token).
            args.append(f"--enable-hierarchical-cache --hicache-size {_ceil(host_tier, GB)}")
        if on_disk:
            # HiCache's L3 on local files; the directory comes from the environment
            # (sgl-project/sglang:docs/advanced_features/server_arguments.md, --hicache-storage-backend;
            # python/sglang/srt/mem_cache/hicache_storage.py, HiCacheFile). It takes no size limit.
            env.append(f"SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR={DISK_DIR}/hicache")
            args.append("--hicache-storage-backend file")
        if spilled_w:
            args.append(f"--cpu-offload-gb {-(-spilled_w // GiB)}")
        return " \\\n  ".join(env + args)
    raise TierlmError(f"--export must be vllm or sglang, got {engine!r}")


def _dev_mem(d: dict) -> int:
    return d["hardware"]["device_memory_bytes"]
