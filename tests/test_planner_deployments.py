"""Deployments as run (issue #10): DP attention + expert parallelism, --batch max, the
communication and latency terms, and prefill from the placement's tiers, against hand-computed
values. Each test spells out its arithmetic."""

import json

import pytest
from typer.testing import CliRunner

from tierlm import plan
from tierlm.cli import app
from tierlm.plan.planner import prefill_flops
from tierlm.spec import load_spec

runner = CliRunner()

# DeepSeek-V3: 61 layers (3 dense + 58 MoE), hidden 7168, 256 routed experts of which 8 per token,
# expert width 2048, MLA latent 512 + rope 64 (bf16: 61 x 576 x 2 = 70,272 B per token),
# vocabulary 129,280 (bf16 embedding).
V3_TOKEN = 61 * 576 * 2
V3_EMBED = 129_280 * 7168 * 2
V3_ROUTED_ACTIVE = 58 * 8 * 3 * 7168 * 2048          # gate, up, down of 8 experts in 58 layers
MiB = 2**20


def _hw(tmp_path, name, data):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(data))
    return str(p)


# --------------------------------------------------------------------- 1. DP attention + EP
def test_dp_attention_per_device_cache_weights_and_reads():
    S, B, N = 4096, 16, 8
    dp = plan("deepseek-v3", S, hardware="h200", devices=N, batch=B, dp_attention=True).data
    tp = plan("deepseek-v3", S, hardware="h200", devices=N, batch=B).data
    assert dp["hardware"]["parallelism"] == "dp-attention" and tp["hardware"]["parallelism"] == "tensor"
    assert (dp["hardware"]["tensor_parallel"], dp["hardware"]["expert_parallel"]) == (1, 8)
    # Cache: tensor parallel replicates the single MLA latent on every device, so each device holds
    # all 16 sequences; DP attention gives each device ceil(16 / 8) = 2 whole sequences.
    assert tp["kv_cache"]["per_device_bytes"] == 16 * S * V3_TOKEN
    assert dp["kv_cache"]["per_device_bytes"] == 2 * S * V3_TOKEN == 575_668_224
    assert dp["kv_cache"]["sequences_per_device"] == 2 and tp["kv_cache"]["sequences_per_device"] == 16
    # Weights: every component whole on every device (tp = 1) except the routed experts, of which
    # each device holds 256 / 8 = 32 of 256.
    comps = dp["weights"]["components"]
    routed = comps["routed_experts"]["bytes"]
    rest = sum(c["bytes"] for n, c in comps.items() if n != "routed_experts")
    assert comps["routed_experts"]["per_device_bytes"] == routed * 32 // 256
    assert dp["weights"]["per_device_bytes"] == rest + routed // 8
    items = dp["placement"]["items"]
    assert items["hot_weights"]["device"] == rest and items["routed_experts"]["device"] == routed // 8
    # Bytes one decode step reads on a device: the replicated weights less the embedding lookup,
    # the share of its experts the 16 tokens touch, 1 - (1 - 8/256)^16, and its 2 sequences' cache.
    frac = 1 - (1 - 8 / 256) ** 16
    expect = rest - V3_EMBED + int(routed // 8 * frac) + 2 * S * V3_TOKEN
    d = dp["decode"]
    assert d["bytes_read"]["device"] == pytest.approx(expect, abs=1)
    assert d["t_memory_s"] == pytest.approx(expect / (4.8e12 * 0.8), rel=1e-9)
    # FLOPs: dense part and absorbed-MLA attention for the device's 2 sequences, routed experts for
    # its share of all 16 tokens. Absorbed MLA: 2 x 128 heads x (2 x 512 + 64) per cached token.
    assert load_spec("deepseek-v3") and V3_ROUTED_ACTIVE == 20_434_649_088
    active = 36_625_618_432
    attn = 61 * 2 * 128 * (2 * 512 + 64) * S
    flops = 2 * (active - V3_ROUTED_ACTIVE) * 2 + 2 * attn + 2 * V3_ROUTED_ACTIVE * 16 / 8
    assert d["flops"] == int(flops)
    assert d["t_compute_s"] == pytest.approx(flops / (1979e12 * 0.7), rel=1e-12)
    # Capacity: DP attention fits far more sequences than tensor parallelism.
    assert dp["limits"]["max_batch_on_device"] > 4 * tp["limits"]["max_batch_on_device"]


def test_dp_attention_cli_and_table():
    r = runner.invoke(app, ["plan", "deepseek-v3", "--context", "4096", "--hardware", "h200", "--devices", "8",
                            "--dp-attention", "--batch", "16"])
    assert r.exit_code == 0, r.output
    assert "DP8 + EP8" in r.output
    r = runner.invoke(app, ["plan", "deepseek-v3", "--context", "4096", "--hardware", "h200", "--devices", "8"])
    assert r.exit_code == 0 and "TP8" in r.output


# --------------------------------------------------------------------- 2. --batch max
def test_batch_max_is_the_batch_solver(tmp_path):
    toy = _hw(tmp_path, "toy", {"name": "toy", "device": {"memory_bytes": 20_000_000_000, "memory_bandwidth": 1e12,
                                                        "flops": {"bf16": 1e14}}, "price_per_hour": 2.0})
    # Llama-3.1-8B bf16: 16,060,522,496 B of weights; 131,072 B of KV per token.
    p = plan("meta-llama/Llama-3.1-8B-Instruct", 8192, hardware=toy, devices=1, batch="max").data
    assert p["batch"] == (int(20e9 * 0.9) - 16_060_522_496) // (131_072 * 8192) == 1
    assert p["batch_chosen"] == "max" and p["placement"]["fits_on_device"]
    p = plan("meta-llama/Llama-3.1-8B-Instruct", 1024, hardware=toy, devices=1, batch="max").data
    assert p["batch"] == (18_000_000_000 - 16_060_522_496) // (131_072 * 1024) == 14
    # DP attention on 8 x H200: each device holds ceil(B / 8) sequences, so the largest batch is
    # 8 x the largest per-device one: (budget - per-device weights) // (4096 x 70,272 B).
    d = plan("deepseek-v3", 4096, hardware="h200", devices=8, dp_attention=True, batch="max").data
    budget = int(143_771 * MiB * 0.9)
    per_device = (budget - d["weights"]["per_device_bytes"]) // (4096 * V3_TOKEN)
    assert d["batch"] == 8 * per_device == d["limits"]["max_batch_on_device"]
    over = plan("deepseek-v3", 4096, hardware="h200", devices=8, dp_attention=True, batch=d["batch"] + 1).data
    assert not over["placement"]["fits_on_device"]


def test_batch_max_when_nothing_fits_and_cli(tmp_path):
    tiny = _hw(tmp_path, "tiny", {"name": "tiny", "device": {"memory_bytes": 10**6, "memory_bandwidth": 1e11}})
    p = plan("qwen3-0.6b", 4096, hardware=tiny, batch="max").data
    assert p["batch"] == 1 and any("--batch max" in n for n in p["notes"])
    # Nothing fits and the file has no host or disk tier: say why the spill has nowhere to go.
    assert any("no host or disk tier" in n for n in p["notes"])
    r = runner.invoke(app, ["plan", "llama-3.1-8b", "--context", "32768", "--hardware", "h100", "--devices", "1",
                            "--batch", "max", "--json"])
    assert r.exit_code == 0, r.output
    # (0.9 x 81,559 MiB - 16,060,522,496) // (131,072 x 32,768) = 14
    assert json.loads(r.stdout)["plans"][0]["batch"] == 14
    r = runner.invoke(app, ["plan", "llama-3.1-8b", "--batch", "maxx"])
    assert r.exit_code == 2 and "--batch" in r.output


# --------------------------------------------------------------------- 3. communication + latency
def test_tensor_parallel_all_reduce_and_latency_floor():
    # Llama-3.1-70B on 8 x H200, 4 sequences: two ring all-reduces per layer of 4 x 8192 bf16
    # activations, each sending 2 x 7/8 of them: 80 x 2 x 1.75 x 4 x 8192 x 2 B = 18,350,080 B
    # over NVLink at 450e9 B/s. Latency: 80 x (q, k, v, o, gate_up, down + attention) + head =
    # 561 kernels x 3 us, plus 160 collectives x 10 us.
    d = plan("llama-3.1-70b", 4096, hardware="h200", devices=8, batch=4).data
    dec = d["decode"]
    assert (d["hardware"]["device_link"], d["hardware"]["device_link_bandwidth"]) == ("scale-up", 450e9)
    assert dec["communication_bytes"] == 18_350_080
    assert dec["t_communication_s"] == pytest.approx(18_350_080 / 450e9, rel=1e-12)
    assert dec["t_latency_s"] == pytest.approx(561 * 3e-6 + 160 * 10e-6, rel=1e-12)
    assert dec["t_step_s"] == pytest.approx(max(dec["t_memory_s"], dec["t_compute_s"], dec["t_communication_s"])
                                            + dec["t_latency_s"], rel=1e-12)


def test_expert_all_to_all_imbalance_and_links():
    # DP attention, 16 sequences on 8 H200: each device dispatches its 2 tokens to 8 experts
    # (fp8, 1 B) and combines them back (bf16, 2 B), 7/8 of them remote, in 58 MoE layers:
    # 58 x 2 x 8 x 7168 x 3 x 7/8 = 17,461,248 B; 116 collectives.
    base = plan("deepseek-v3", 4096, hardware="h200", devices=8, batch=16, dp_attention=True).data["decode"]
    assert base["communication_bytes"] == 17_461_248
    assert base["t_latency_s"] == pytest.approx(605 * 3e-6 + 116 * 10e-6, rel=1e-12)
    # The busiest device takes 1.5 x the mean expert load: 1.5 x the bytes received, 1.5 x the
    # routed-expert FLOPs (2 x 20,434,649,088 x 16 / 8 x 0.5 more) and reads 1.5 x its touched share.
    hot = plan("deepseek-v3", 4096, hardware="h200", devices=8, batch=16, dp_attention=True,
               expert_imbalance=1.5).data["decode"]
    assert hot["communication_bytes"] == int(17_461_248 * 1.5)
    assert hot["flops"] - base["flops"] == pytest.approx(2 * V3_ROUTED_ACTIVE * 16 / 8 * 0.5, abs=2)
    assert hot["bytes_read"]["device"] > base["bytes_read"]["device"]
    # 16 H100s span two 8-GPU NVLink domains: the all-to-all runs over the 400 Gb/s NIC (50e9 B/s).
    d = plan("deepseek-v3", 4096, hardware="h100", devices=16, batch=32, dp_attention=True).data
    assert (d["hardware"]["device_link"], d["hardware"]["device_link_bandwidth"]) == ("scale-out", 50e9)
    assert d["decode"]["t_communication_s"] == pytest.approx(d["decode"]["communication_bytes"] / 50e9, rel=1e-12)


def test_cards_without_a_scale_up_link(tmp_path):
    # Four PCIe cards: all-reduces go over the 32e9 B/s host link. A group beyond the node with no
    # NIC described is not timed, and the plan says so.
    pcie = _hw(tmp_path, "pcie", {"name": "pcie", "device": {"memory_bytes": 48 * 10**9, "memory_bandwidth": 9.6e11,
                                                          "flops": {"bf16": 1.81e14}},
                                  "host": {"devices_per_node": 4, "link_bandwidth": 32e9, "link": "pcie4"}})
    d = plan("qwen3-8b", 4096, hardware=pcie, devices=4).data
    assert (d["hardware"]["device_link"], d["hardware"]["device_link_bandwidth"]) == ("host link", 32e9)
    d = plan("qwen3-8b", 4096, hardware=pcie, devices=8).data
    assert d["decode"]["t_communication_s"] is None
    assert any("communication is not timed" in n for n in d["notes"])


def test_unknown_imbalance_rejected():
    r = runner.invoke(app, ["plan", "deepseek-v3", "--expert-imbalance", "0.5"])
    assert r.exit_code == 2 and "--expert-imbalance" in r.output


# --------------------------------------------------------------------- 4. prefill and hardware
def test_prefill_reads_weights_from_their_tiers(tmp_path):
    toy = _hw(tmp_path, "toy", {"name": "toy", "device": {"memory_bytes": 20_000_000_000, "memory_bandwidth": 1e12,
                                                        "flops": {"bf16": 1e14}},
                                "host": {"devices_per_node": 2, "memory_bytes": 100_000_000_000,
                                         "memory_bandwidth": 2e11, "link_bandwidth": 5e10, "link": "pcie5"},
                                "price_per_hour": 2.0})
    # Qwen3-30B-A3B on one 20 GB toy device: the routed experts spill to host. 4,096 prompt tokens
    # touch all 128 experts (1 - (15/16)^4096 = 1 to double precision), so the pass reads every
    # expert byte once: the host share over min(50e9 link, 200e9 / 2 DRAM) x 0.8, the device share
    # and the hot weights (less the embedding lookup, 151,936 x 2048 x 2 B) at 1e12 x 0.8.
    p = plan("Qwen/Qwen3-30B-A3B", 4096, hardware=toy, devices=1).data
    items, pf = p["placement"]["items"], p["prefill"]
    embed = 151_936 * 2048 * 2
    device = items["hot_weights"]["device"] - embed + items["routed_experts"]["device"]
    assert pf["bytes_read"] == {"device": device, "host": items["routed_experts"]["host"], "disk": 0}
    t_mem = device / (1e12 * 0.8) + items["routed_experts"]["host"] / (5e10 * 0.8)
    assert pf["t_memory_s"] == pytest.approx(t_mem, rel=1e-9)
    assert pf["t_s"] == pytest.approx(max(t_mem, pf["t_compute_s"]) + pf["t_latency_s"], rel=1e-12)


def test_mla_prefill_in_mha_form():
    # Per (query, key) pair DeepSeek-V3 prefills with decompressed per-head K and V:
    # 2 x 128 heads x (128 nope + 64 rope + 128 v) = 81,920 FLOPs, over S(S+1)/2 causal pairs in 61
    # layers, plus 2 x active params per token. The absorbed form would be 2 x 128 x (2 x 512 + 64)
    # = 278,528 per pair; at 131,072 tokens the MHA form is 2.96x cheaper overall.
    S = 131_072
    active = 36_625_618_432
    mha = 2 * active * S + 61 * 81_920 * S * (S + 1) // 2
    absorbed = 2 * active * S + 61 * 278_528 * S * (S + 1) // 2
    assert prefill_flops(load_spec("deepseek-v3"), S) == mha
    assert absorbed / mha == pytest.approx(2.96, abs=0.01)


def test_prefill_runs_at_the_weight_dtype_peak():
    # Llama-3.1-8B: bf16 weights run at the H100's 989e12 bf16 peak, fp8 weights at its 1979e12 fp8 peak.
    bf16 = plan("llama-3.1-8b", 8192, hardware="h100", devices=1).data["prefill"]
    fp8 = plan("llama-3.1-8b", 8192, hardware="h100", devices=1, weight_dtypes={"*": "fp8"}).data["prefill"]
    assert (bf16["compute_dtype"], fp8["compute_dtype"]) == ("bf16", "fp8")
    assert bf16["t_compute_s"] == pytest.approx(bf16["flops"] / (989e12 * 0.7), rel=1e-12)
    assert fp8["t_compute_s"] == pytest.approx(fp8["flops"] / (1979e12 * 0.7), rel=1e-12)


def test_device_memory_is_what_the_driver_reports():
    # nvidia-smi: H100 81,559 MiB, H200 143,771 MiB, B200 183,359 MiB, GB200 189,471 MiB.
    for hw, mib in (("h100", 81_559), ("h200", 143_771), ("b200", 183_359), ("gb200", 189_471)):
        h = plan("qwen3-8b", 4096, hardware=hw).data["hardware"]
        assert h["device_memory_bytes"] == mib * MiB
        assert h["device_budget_bytes"] == int(mib * MiB * 0.9)


def test_no_flops_is_na_with_a_note(tmp_path):
    noflops = _hw(tmp_path, "noflops", {"name": "noflops", "device": {"memory_bytes": 10**11, "memory_bandwidth": 1e12},
                                        "price_per_hour": 1.0})
    p = plan("qwen3-8b", 32768, hardware=noflops).data
    assert p["prefill"]["t_s"] is None and p["prefill"]["tokens_per_s"] is None and p["prefill"]["note"]
    assert p["cost"]["input_per_mtok"] is None and p["cost"]["output_per_mtok"] > 0
    assert any(n.startswith("prefill:") for n in p["notes"])
    r = runner.invoke(app, ["plan", "qwen3-8b", "--context", "32k", "--hardware", "m3-ultra"])
    assert r.exit_code == 0
    row = next(line for line in r.output.splitlines() if "prefill time" in line)
    assert "n/a" in row
