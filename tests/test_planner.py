"""Placement, inverse solvers, roofline and cost against independent arithmetic."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tierlm import plan
from tierlm.cli import app
from tierlm.errors import TierlmError
from tierlm.plan.roofline import sum_floor, sum_min, sum_min_floor
from tierlm.units import parse_count, parse_count_list

runner = CliRunner()

# A small made-up accelerator so that placement decisions are easy to compute by hand.
TOY = {"name": "toy", "device": {"memory_bytes": 20_000_000_000, "memory_bandwidth": 1e12,
                                  "flops": {"bf16": 1e14}},
       "host": {"devices_per_node": 2, "memory_bytes": 100_000_000_000, "memory_bandwidth": 2e11,
                "link_bandwidth": 5e10, "link": "pcie5"},
       "disk": {"capacity_bytes": 1_000_000_000_000, "read_bandwidth": 1e10},
       "price_per_hour": 2.0}


@pytest.fixture
def toy(tmp_path):
    p = tmp_path / "toy.json"
    p.write_text(json.dumps(TOY))
    return str(p)


def test_planner_does_not_import_torch():
    code = ("import sys, tierlm, tierlm.cli; from tierlm import plan; "
            "plan('deepseek-v4-pro', 1000000, kv_dtype='fp8'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_context_parsing():
    assert parse_count("1M") == 1_000_000
    assert parse_count("1Mi") == 2**20
    assert parse_count("128k") == 128_000
    assert parse_count("128Ki") == 131_072
    assert parse_count("1.5k") == 1500
    assert parse_count_list("4096,1M") == [4096, 1_000_000]
    for bad in ("", "0", "-5", "1.5", "12x", "1e6", "1.0001k"):
        with pytest.raises(TierlmError):
            parse_count(bad)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 3000), r=st.integers(1, 200), k=st.integers(1, 50))
def test_causal_sums_match_brute_force(n, r, k):
    assert sum_floor(n, r) == sum(t // r for t in range(1, n + 1))
    assert sum_min_floor(n, r, k) == sum(min(t // r, k) for t in range(1, n + 1))
    assert sum_min(n, k) == sum(min(t, k) for t in range(1, n + 1))


def test_dense_model_on_one_device(toy):
    # Llama-3.1-8B bf16: 8,030,261,248 params x 2 B; KV 2 x 32 x 8 x 128 x 2 B = 131,072 B/token.
    S = 8192
    p = plan("meta-llama/Llama-3.1-8B-Instruct", S, hardware=toy, devices=1).data
    w = 8_030_261_248 * 2
    kv = 131_072 * S
    assert p["weights"]["total_bytes"] == w
    assert p["kv_cache"]["total_bytes"] == kv
    assert p["placement"]["fits_on_device"]
    budget = int(20e9 * 0.9)
    # Largest context that fits on the device: weights + 131072 x S <= budget.
    assert p["limits"]["max_context_on_device"] == min((budget - w) // 131_072, 131072)
    assert p["limits"]["max_batch_on_device"] == (budget - w) // kv
    # Decode at batch 1 is memory-bound: (weights read minus the input embedding lookup) + KV.
    embed = 128256 * 4096 * 2
    t_mem = (w - embed + kv) / (1e12 * 0.8)
    assert p["decode"]["t_memory_s"] == pytest.approx(t_mem, rel=1e-9)
    # Plus the latency floor: 32 layers x (q, k, v, o, gate_up, down + the attention kernel) + the
    # head = 225 kernels x 3 us; one device, so no collectives.
    t_step = t_mem + 225 * 3e-6
    assert p["decode"]["t_latency_s"] == pytest.approx(225 * 3e-6, rel=1e-12)
    assert p["decode"]["tokens_per_s"] == pytest.approx(1 / t_step, rel=1e-9)
    # $/Mtok = $/h / (tok/s x 3600) x 1e6.
    assert p["cost"]["output_per_mtok"] == pytest.approx(2.0 / (3600 / t_step) * 1e6, rel=1e-9)


def test_spill_order_and_decode_from_host(toy):
    # Qwen3-30B-A3B bf16 on one 20 GB toy device: hot weights and KV stay, routed experts spill
    # to host (the node's 100 GB shared by 2 devices, 90 % usable -> 45 GB per device).
    p = plan("Qwen/Qwen3-30B-A3B", 4096, hardware=toy, devices=1).data
    items = p["placement"]["items"]
    assert items["hot_weights"]["host"] == 0 and items["kv_cache"]["host"] == 0
    assert items["routed_experts"]["host"] > 0
    free = int(20e9 * 0.9) - items["hot_weights"]["device"] - items["kv_cache"]["device"]
    assert items["routed_experts"]["device"] == free
    assert not p["placement"]["fits_on_device"] and p["placement"]["fits"]
    # Host bytes are read over min(link 50 GB/s, 200 GB/s / 2 devices) x 0.8.
    d = p["decode"]
    expect = d["bytes_read"]["device"] / (1e12 * 0.8) + d["bytes_read"]["host"] / (5e10 * 0.8)
    assert d["t_memory_s"] == pytest.approx(expect, rel=1e-9)
    # The host share of expert reads equals the host share of experts stored (uniform routing).
    frac_host = items["routed_experts"]["host"] / (items["routed_experts"]["host"] + items["routed_experts"]["device"])
    touched = 128 * (1 - (1 - 8 / 128) ** 1) / 128
    stored = items["routed_experts"]["device"] + items["routed_experts"]["host"]
    assert d["bytes_read"]["host"] == pytest.approx(stored * touched * frac_host, rel=1e-6)


def test_min_devices_and_replication():
    # DeepSeek-V3 fp8 on H200: min devices is the first N whose per-device share fits 0.9 x 141 GB.
    p = plan("deepseek-ai/DeepSeek-V3", 4096, hardware="h200").data
    n = p["limits"]["min_devices"]
    assert n is not None and n <= 8
    # the automatic choice is the smallest tensor-parallel size >= n that divides the 128 heads
    assert p["hardware"]["devices"] == next(k for k in (1, 2, 4, 8) if k >= n)
    fewer = plan("deepseek-ai/DeepSeek-V3", 4096, hardware="h200", devices=n - 1).data
    assert not fewer["placement"]["fits_on_device"]
    # MLA cache is replicated across devices: per-device KV equals the total.
    assert p["kv_cache"]["per_device_bytes"] == p["kv_cache"]["total_bytes"]


def test_reload_break_even_is_a_crossover(toy):
    p = plan("meta-llama/Llama-3.1-8B-Instruct", 4096, hardware=toy, devices=1).data
    s = p["reload_vs_recompute"]["disk"]["break_even_context"]
    assert s is not None
    # At the crossover, reload from disk (1e10 / 2 devices B/s) is cheaper than recompute,
    # and one token earlier it is not (unless it wins from the first token).
    per_tok = 131_072
    active = 8_030_261_248 - 128256 * 4096

    def recompute(n):   # 2 x active x n + attention sum_{t<=n} 2 x 32 heads x 256 x t, per layer
        return (2 * active * n + 32 * 2 * 32 * 256 * n * (n + 1) // 2) / (1e14 * 0.7)
    assert per_tok * s / 5e9 < recompute(s)
    if s > 1:
        assert per_tok * (s - 1) / 5e9 >= recompute(s - 1)


def test_no_price_no_cost():
    p = plan("Qwen/Qwen3-8B", 4096, hardware="m3-ultra").data
    assert p["cost"]["price_per_hour"] is None


def test_context_beyond_model_is_noted():
    p = plan("Qwen/Qwen3-235B-A22B", 1_000_000).data
    assert any("exceeds" in n for n in p["notes"])


def test_cli_table_explain_export_plot(tmp_path):
    r = runner.invoke(app, ["plan", "deepseek-v3", "qwen3-8b", "--context", "32k", "--explain"])
    assert r.exit_code == 0, r.output
    assert "GiB" in r.output and "GB" in r.output and "fp8" not in r.output.split("tierlm plan")[0]
    assert "cache mla x61 layers" in r.output
    r = runner.invoke(app, ["plan", "deepseek-v3", "--context", "32k", "--export", "vllm", "--kv-dtype", "fp8"])
    assert r.exit_code == 0 and "--tensor-parallel-size" in r.output and "--kv-cache-dtype fp8" in r.output
    r = runner.invoke(app, ["plan", "deepseek-v3", "--context", "32k", "--export", "sglang", "--mtp"])
    assert r.exit_code == 0 and "--tp " in r.output and "--speculative-algorithm" in r.output
    for name in ("m.png", "m.svg"):
        r = runner.invoke(app, ["plan", "deepseek-v4-pro", "qwen3-8b", "--context", "4096", "--plot", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "m.svg").read_bytes()[:1000]


@pytest.mark.parametrize("args,needle", [
    (["plan", "no-such-model"], "unknown model"),
    (["plan", "qwen3-8b", "--context", "12x"], "context"),
    (["plan", "qwen3-8b", "--kv-dtype", "int3"], "--kv-dtype"),
    (["plan", "qwen3-8b", "--batch", "0"], "--batch"),
    (["plan", "qwen3-8b", "--hardware", "tpu-v9"], "unknown hardware"),
    (["plan", "qwen3-8b", "--weight-dtype", "attention=int2"], "--weight-dtype"),
    (["plan", "qwen3-8b", "--export", "trt"], "--export"),
    (["plan", "deepseek-v3", "--layout", "vllm", "--kv-dtype", "fp4"], "fp4"),
    (["plan", "qwen3-8b", "--plot", "x.pdf"], "--plot"),
])
def test_bad_flags_one_line_exit_2(args, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.output


def test_weight_dtype_override():
    base = plan("Qwen/Qwen3-8B", 4096).data["weights"]["components"]
    fp8 = plan("Qwen/Qwen3-8B", 4096, weight_dtypes={"attention": "fp8"}).data["weights"]["components"]
    assert fp8["dense_ffn"]["bytes"] == base["dense_ffn"]["bytes"]
    assert fp8["attention"]["bytes"] < base["attention"]["bytes"]


def test_every_registry_model_plans_fast_at_four_contexts():
    # `tierlm plan` of each registry model at four contexts stays under a second (all models of
    # the kvcache.ai calculator included) and reports fixed state apart from KV.
    import time

    from tierlm.spec import entries
    for model in sorted(entries()):
        t0 = time.perf_counter()
        for context in (4096, 32_768, 131_072, 1_000_000):
            p = plan(model, context).data
            kv = p["kv_cache"]
            assert kv["total_bytes"] == kv["kv_bytes"] + kv["indexer_bytes"] + kv["state_bytes"]
        assert time.perf_counter() - t0 < 1.0, model


def test_state_dtype_option():
    # Qwen3.5-27B's GDN state: --state-dtype bf16 halves the fp32 recurrent matrices (48 layers x
    # 48 heads x 128 x 128), the bf16 conv history stays; kv bytes do not move.
    auto = plan("Qwen/Qwen3.5-27B", 4096).data
    bf16 = plan("Qwen/Qwen3.5-27B", 4096, state_dtype="bf16").data
    assert auto["state_dtype"] == "auto" and bf16["state_dtype"] == "bf16"
    assert auto["kv_cache"]["state_bytes"] - bf16["kv_cache"]["state_bytes"] == 48 * 48 * 128 * 128 * 2
    assert auto["kv_cache"]["kv_bytes"] == bf16["kv_cache"]["kv_bytes"]
    r = runner.invoke(app, ["plan", "qwen3.5-27b", "--context", "4096", "--state-dtype", "fp8"])
    assert r.exit_code == 2 and "--state-dtype" in r.output
