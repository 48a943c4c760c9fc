"""The Python API's inputs (Options merging, counts, model ids), the CLI's --version / -h / full ids,
and the KV offload flags of --export, each checked against values computed by hand."""

import io
import json
import math
import shlex

import pytest
from rich.console import Console
from typer.testing import CliRunner

import tierlm
from tierlm import Options, TierlmError, plan
from tierlm.cli import app
from tierlm.plan.export import DISK_DIR, serving_flags
from tierlm.plan.report import print_plans

runner = CliRunner()
GiB = 2**30
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA_WEIGHTS = 8_030_261_248 * 2          # bf16 parameters (tests/test_planner.py)
LLAMA_KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V x 32 layers x 8 KV heads x 128 dims x 2 B = 131,072 B

# test_planner's made-up accelerator: one 20 GB device (18 GB budget at gpu_util 0.9); the node's
# 100 GB of host memory is shared by 2 devices (45 GB each at 90 %), its 1 TB disk too (500 GB each).
from test_planner import TOY  # noqa: E402
DEVICE_BUDGET, HOST_BUDGET = 18_000_000_000, 45_000_000_000


@pytest.fixture
def toy(tmp_path):
    p = tmp_path / "toy.json"
    p.write_text(json.dumps(TOY))
    return str(p)


def error_of(fn) -> str:
    with pytest.raises(TierlmError) as e:
        fn()
    return str(e.value)


# ---- Options and keyword options

def test_keywords_fill_what_options_leave_at_default():
    merged = plan("qwen3-8b", 4096, Options(kv_dtype="fp8"), batch=3).data
    assert (merged["kv_dtype"], merged["batch"]) == ("fp8", 3)
    assert merged == plan("qwen3-8b", 4096, Options(kv_dtype="fp8", batch=3)).data
    # The same value given both ways is no conflict.
    assert plan("qwen3-8b", 4096, Options(kv_dtype="fp8"), kv_dtype="fp8").data["kv_dtype"] == "fp8"


def test_keyword_conflicting_with_options_names_field_and_both_values():
    msg = error_of(lambda: plan("qwen3-8b", 4096, Options(batch=4, kv_dtype="fp8"), kv_dtype="bf16"))
    assert msg == ("option 'kv_dtype' given twice with different values: Options(kv_dtype='fp8') "
                   "and kv_dtype='bf16'")


def test_unknown_keyword_suggests_the_field():
    msg = error_of(lambda: plan("qwen3-8b", 4096, kv_dtpye="fp8"))
    assert msg.startswith("unknown option 'kv_dtpye'. Did you mean 'kv_dtype'?")
    assert "batch, kv_dtype, indexer_dtype" in msg
    assert "Did you mean" not in error_of(lambda: plan("qwen3-8b", 4096, zzz=1))


def test_options_must_be_an_options_object():
    assert error_of(lambda: plan("qwen3-8b", 4096, {"batch": 2})) == "options must be a tierlm.Options, got dict"


# ---- contexts and batches

@pytest.mark.parametrize("bad,msg", [
    (1.5, "context must be a whole number (an int, or a string such as '128k'), got 1.5"),
    (4096.0, "context must be a whole number (an int, or a string such as '128k'), got 4096.0"),
    (True, "context must be a whole number (an int, or a string such as '128k'), got True"),
    (math.nan, "context must be a whole number (an int, or a string such as '128k'), got nan"),
    (None, "context must be a whole number (an int, or a string such as '128k'), got None"),
    (0, "context must be >= 1, got 0"),
    ("abc", "context: cannot read 'abc' as a count (use e.g. 4096, 128k, 1M, 1Mi)"),
    ("1.5", "context: '1.5' is not a whole number"),
])
def test_non_integer_context_is_an_error(bad, msg):
    assert error_of(lambda: plan("qwen3-8b", bad)) == msg


@pytest.mark.parametrize("bad,msg", [
    (1.5, "batch must be a whole number (an int, or a string such as '128k'), got 1.5"),
    (False, "batch must be a whole number (an int, or a string such as '128k'), got False"),
    (math.nan, "batch must be a whole number (an int, or a string such as '128k'), got nan"),
    (None, "batch must be a whole number (an int, or a string such as '128k'), got None"),
    ("abc", "batch: cannot read 'abc' as a count (use e.g. 4096, 128k, 1M, 1Mi)"),
])
def test_non_integer_batch_is_an_error(bad, msg):
    assert error_of(lambda: plan("qwen3-8b", 4096, batch=bad)) == msg
    assert error_of(lambda: plan("qwen3-8b", 4096, Options(batch=bad))) == msg


@pytest.mark.parametrize("text,tokens", [("128k", 128_000), ("32K", 32_000), ("1M", 1_000_000),
                                         ("131072", 131_072), ("128Ki", 131_072)])
def test_context_strings_read_like_the_cli(text, tokens):
    api = plan("qwen3-8b", text).data
    assert api["context"] == tokens
    assert api == plan("qwen3-8b", tokens).data
    r = runner.invoke(app, ["plan", "qwen3-8b", "--context", text, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["plans"][0] == json.loads(json.dumps(api))


def test_api_and_cli_share_one_parser(monkeypatch):
    import tierlm.units as units
    seen = []
    real = units.parse_count

    def spy(text, what="context"):
        seen.append((text, what))
        return real(text, what)
    monkeypatch.setattr(units, "parse_count", spy)
    plan("qwen3-8b", "4k", batch="2")
    assert seen == [("2", "batch"), ("4k", "context")]
    runner.invoke(app, ["plan", "qwen3-8b", "--context", "8k", "--batch", "3", "--json"])
    assert seen[2:] == [("8k", "context"), ("3", "--batch")]


@pytest.mark.parametrize("batch,needle", [("1.5", "error: --batch: '1.5' is not a whole number"),
                                          ("abc", "error: --batch: cannot read 'abc'")])
def test_cli_non_integer_batch_one_line_exit_2(batch, needle):
    r = runner.invoke(app, ["plan", "qwen3-8b", "--batch", batch])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith(needle), r.output


# ---- unknown model ids

def test_unknown_model_suggests_ids_and_says_nothing_is_downloaded():
    msg = error_of(lambda: plan("DeepSeek-V3.3", 4096))
    assert msg.startswith("unknown model 'DeepSeek-V3.3': not a registry id or alias, and no such file or "
                          "directory. Did you mean 'deepseek-v3.2'")
    assert "tierlm never downloads anything: pass the path to a config.json, or to a directory holding one" in msg
    # Ids are matched as well as aliases, case-insensitively.
    assert "Did you mean 'Qwen/Qwen3-8B'" in error_of(lambda: tierlm.load_spec("QWEN/QWEN3-8C"))
    assert "Did you mean" not in error_of(lambda: tierlm.load_spec("zzzz"))
    assert error_of(lambda: tierlm.load_spec(None)) == "model must be a registry id, an alias or a path, got None"


def test_model_may_be_a_path_object(tmp_path):
    from tierlm.spec.registry import resolve
    (tmp_path / "config.json").write_text(json.dumps(resolve("qwen3-8b").config))
    assert plan(tmp_path, 4096).data["kv_cache"] == plan("qwen3-8b", 4096).data["kv_cache"]


def test_cli_unknown_model_one_line():
    r = runner.invoke(app, ["plan", "qwen3-8", "--context", "4k"])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "Did you mean 'qwen3-8b'" in lines[0] and "never downloads" in lines[0]


# ---- --version, -h, full ids

def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output == f"tierlm {tierlm.__version__}\n"


@pytest.mark.parametrize("args", [[], ["plan"], ["models"], ["hardware"], ["serve"], ["cache"], ["generate"]])
def test_short_help_everywhere(args):
    short, long = runner.invoke(app, args + ["-h"]), runner.invoke(app, args + ["--help"])
    assert short.exit_code == 0 and "Usage:" in short.output and "Show this message and exit" in short.output
    assert short.output == long.output


def test_tables_print_full_ids_when_not_a_terminal():
    from tierlm.spec import entries
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0 and "…" not in r.output
    lines = r.output.splitlines()
    for e in entries().values():
        assert any(f"│ {e.id} " in line and e.source["url"] in line for line in lines), e.id
    r = runner.invoke(app, ["hardware"])
    assert r.exit_code == 0 and "…" not in r.output
    r = runner.invoke(app, ["plan", "deepseek-v4-pro", "zai-org/GLM-5", "Qwen/Qwen3-235B-A22B", "--context", "1M"])
    assert r.exit_code == 0 and "…" not in r.output
    header = next(line for line in r.output.splitlines() if "deepseek-ai/DeepSeek-V4-Pro" in line)
    assert "zai-org/GLM-5" in header and "Qwen/Qwen3-235B-A22B" in header


def test_tables_fit_a_terminal_with_short_names():
    out = io.StringIO()
    plans = [plan(m, 10**6) for m in ("deepseek-v4-pro", "zai-org/GLM-5", "Qwen/Qwen3-235B-A22B")]
    print_plans(plans, False, Console(file=out, force_terminal=True, color_system=None, width=80))
    text = out.getvalue()
    assert "DeepSeek-V4-Pro" in text and "deepseek-ai/" not in text
    assert max(len(line) for line in text.splitlines()) <= 80


# ---- --export: KV offload flags from the placement

def command(flags: str) -> tuple[dict[str, str], list[str]]:
    """Environment assignments and argv of an exported shell command."""
    words = shlex.split(flags.replace("\\\n", " "))
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    return env, words


def value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_no_spill_no_offload_flags():
    d = plan("qwen3-8b", 4096).data
    assert d["placement"]["fits_on_device"]
    for engine in ("vllm", "sglang"):
        env, argv = command(serving_flags(d, engine))
        assert env == {}
        assert not [w for w in argv if "offload" in w or "hicache" in w or "hierarchical" in w or "kv-transfer" in w]


def test_kv_spilled_to_host(toy):
    # Llama-3.1-8B, 2 x 131,072 tokens: 32 GiB of KV; the device holds what its budget leaves after
    # the weights, host memory the rest, nothing goes to disk.
    d = plan(LLAMA, 131072, hardware=toy, devices=1, batch=2).data
    kv = d["placement"]["items"]["kv_cache"]
    assert kv == {"device": DEVICE_BUDGET - LLAMA_WEIGHTS, "host": 32 * GiB - (DEVICE_BUDGET - LLAMA_WEIGHTS),
                  "disk": 0, "unplaced": 0}
    env, argv = command(serving_flags(d, "vllm"))
    assert env == {}
    # vLLM: inclusive CPU tier of device + host KV, GiB summed over ranks (one rank here).
    assert value(argv, "--kv-offloading-backend") == "native"
    assert value(argv, "--kv-offloading-size") == "32"
    assert "--kv-transfer-config" not in argv
    env, argv = command(serving_flags(d, "sglang"))
    assert env == {}
    # SGLang: host pool in GB per rank, 34,359,738,368 B -> 35.
    assert "--enable-hierarchical-cache" in argv and value(argv, "--hicache-size") == "35"
    assert "--hicache-storage-backend" not in argv


def test_kv_spilled_to_host_under_tensor_parallelism(toy):
    # TP 2 splits the 8 KV heads: 64 GiB of KV, 32 GiB per rank, all on device + host.
    d = plan(LLAMA, 131072, hardware=toy, devices=2, batch=4).data
    kv = d["placement"]["items"]["kv_cache"]
    assert kv["device"] + kv["host"] == 32 * GiB and kv["host"] > 0 and kv["disk"] == 0
    _, argv = command(serving_flags(d, "vllm"))
    assert value(argv, "--kv-offloading-size") == "64"          # summed over both ranks
    _, argv = command(serving_flags(d, "sglang"))
    assert value(argv, "--hicache-size") == "35"                # per rank


def test_kv_spilled_to_disk(toy):
    # 8 x 131,072 tokens: 128 GiB of KV. Device as above, host full at 45 GB, the rest on disk.
    d = plan(LLAMA, 131072, hardware=toy, devices=1, batch=8).data
    kv = d["placement"]["items"]["kv_cache"]
    on_device = DEVICE_BUDGET - LLAMA_WEIGHTS
    assert kv == {"device": on_device, "host": HOST_BUDGET, "disk": 128 * GiB - on_device - HOST_BUDGET,
                  "unplaced": 0}
    assert LLAMA_KV_PER_TOKEN * 131072 * 8 == 128 * GiB
    env, argv = command(serving_flags(d, "vllm"))
    # LMCache, GiB per rank. The inclusive CPU tier would hold device + host KV (46,939,477,504 B),
    # more than the 45 GB host budget, so it gets the budget: 45e9 B -> 42 GiB. Disk holds all 128 GiB.
    assert env == {"LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": "42",
                   "LMCACHE_LOCAL_DISK": f"file://{DISK_DIR}/lmcache/", "LMCACHE_MAX_LOCAL_DISK_SIZE": "128"}
    assert json.loads(value(argv, "--kv-transfer-config")) == {"kv_connector": "LMCacheConnectorV1",
                                                               "kv_role": "kv_both"}
    assert argv[:3] == ["vllm", "serve", LLAMA] and "--kv-offloading-size" not in argv
    env, argv = command(serving_flags(d, "sglang"))
    assert env == {"SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": f"{DISK_DIR}/hicache"}
    assert value(argv, "--hicache-size") == "45"                # the 45 GB host budget per rank
    assert value(argv, "--hicache-storage-backend") == "file"


def test_offload_tier_capped_by_what_else_the_plan_put_there(toy):
    # Qwen3-30B-A3B, 8 x 32,768 tokens: 48 layers x (K + V) x 4 KV heads x 128 dims x 2 B = 98,304 B
    # per token, 24 GiB in all. The KV takes the device room the hot weights leave, then host memory;
    # the routed experts take the rest of the host. So the inclusive host tier cannot also hold a
    # copy of the device KV: it gets exactly the host bytes the KV was given.
    d = plan("Qwen/Qwen3-30B-A3B", 32768, hardware=toy, devices=1, batch=8).data
    items = d["placement"]["items"]
    kv = items["kv_cache"]
    assert kv["device"] == DEVICE_BUDGET - items["hot_weights"]["device"]
    assert kv["host"] == 98_304 * 32768 * 8 - kv["device"] == 10_851_990_528 and kv["disk"] == 0
    assert items["routed_experts"]["host"] == HOST_BUDGET - kv["host"]
    _, argv = command(serving_flags(d, "vllm"))
    assert value(argv, "--kv-offloading-size") == "11"          # 10.11 GiB, not the 24 GiB of device + host
    _, argv = command(serving_flags(d, "sglang"))
    assert value(argv, "--hicache-size") == "11"                # 10.85 GB


def test_cli_export_carries_the_tiering(toy):
    r = runner.invoke(app, ["plan", LLAMA, "--context", "131072", "--batch", "8", "--hardware", toy,
                            "--devices", "1", "--export", "vllm"])
    assert r.exit_code == 0, r.output
    env, argv = command(r.output.split("\n", 1)[1])
    assert env["LMCACHE_MAX_LOCAL_DISK_SIZE"] == "128" and "--kv-transfer-config" in argv


# ---- --export of a DP-attention plan

def test_dp_attention_export_dense_model_is_data_parallel(toy):
    # Llama-3.1-8B, 4 x 131,072 tokens on 2 devices, DP attention: each device holds the whole model
    # (16,060,522,496 B) and the cache of ceil(4/2) = 2 sequences, 2 x 16 GiB = 32 GiB. The device
    # keeps 18e9 - 16,060,522,496 B of it, host memory the rest.
    d = plan(LLAMA, 131072, hardware=toy, devices=2, batch=4, dp_attention=True).data
    kv = d["placement"]["items"]["kv_cache"]
    assert kv == {"device": DEVICE_BUDGET - LLAMA_WEIGHTS, "host": 32 * GiB - (DEVICE_BUDGET - LLAMA_WEIGHTS),
                  "disk": 0, "unplaced": 0}
    _, argv = command(serving_flags(d, "vllm"))
    assert value(argv, "--data-parallel-size") == "2" and "--tensor-parallel-size" not in argv
    assert "--enable-expert-parallel" not in argv                 # no experts
    assert value(argv, "--max-num-seqs") == "2"                   # per DP rank
    # Each DP rank is an engine of TP 1: its 32 GiB CPU tier, not 2 x 32 as under TP 2.
    assert value(argv, "--kv-offloading-size") == "32"
    _, argv = command(serving_flags(d, "sglang"))
    assert argv[:3] == ["python", "-m", "sglang_router.launch_server"]
    assert value(argv, "--dp-size") == "2" and "--tp" not in argv and "--enable-dp-attention" not in argv
    assert value(argv, "--max-running-requests") == "2"           # per replica
    assert value(argv, "--hicache-size") == "35"                  # 34,359,738,368 B per rank -> 35 GB


def test_dp_attention_export_moe_model(toy):
    # Qwen3-30B-A3B, 9 x 32,768 tokens on 2 devices, DP attention: ceil(9/2) = 5 sequences per device,
    # 98,304 B per token x 32,768 x 5 = 16,106,127,360 B of KV. Replicated hot weights 3,082,186,752 B
    # leave 14,917,813,248 B of the device for KV; the other 1,188,314,112 B go to host, and the 64 of
    # 128 experts each device holds (27 GiB) go to host too.
    d = plan("Qwen/Qwen3-30B-A3B", 32768, hardware=toy, devices=2, batch=9, dp_attention=True).data
    items = d["placement"]["items"]
    assert items["hot_weights"]["device"] == 3_082_186_752
    assert items["kv_cache"] == {"device": 14_917_813_248, "host": 1_188_314_112, "disk": 0, "unplaced": 0}
    assert items["routed_experts"]["host"] == 27 * GiB
    env, argv = command(serving_flags(d, "vllm"))
    assert env == {}
    assert argv == ["vllm", "serve", "Qwen/Qwen3-30B-A3B", "--data-parallel-size", "2", "--max-model-len", "32768",
                    "--max-num-seqs", "5", "--gpu-memory-utilization", "0.90", "--enable-expert-parallel",
                    # host tier = min(device + host KV 16,106,127,360, 45e9 - 27 GiB of experts
                    # = 16,008,970,752) -> 14.9 GiB on the one rank of a DP engine
                    "--kv-offloading-backend", "native", "--kv-offloading-size", "15",
                    "--cpu-offload-gb", "27"]
    env, argv = command(serving_flags(d, "sglang"))
    assert env == {}
    assert argv == ["python", "-m", "sglang.launch_server", "--model-path", "Qwen/Qwen3-30B-A3B",
                    "--tp", "2", "--dp-size", "2", "--enable-dp-attention", "--moe-dense-tp-size", "1",
                    "--enable-dp-lm-head", "--context-length", "32768",
                    "--max-running-requests", "10",             # for both ranks: 5 each
                    "--mem-fraction-static", "0.90", "--ep-size", "2",
                    "--enable-hierarchical-cache", "--hicache-size", "17",   # 16,008,970,752 B -> 17 GB
                    "--cpu-offload-gb", "27"]


def test_dp_attention_on_one_device_exports_as_tensor_parallel():
    d = plan("qwen3-30b-a3b", 4096, devices=1, dp_attention=True).data
    assert serving_flags(d, "vllm") == serving_flags(plan("qwen3-30b-a3b", 4096, devices=1).data, "vllm")
    _, argv = command(serving_flags(d, "sglang"))
    assert value(argv, "--tp") == "1" and "--enable-dp-attention" not in argv and "--ep-size" not in argv


def test_cli_export_follows_dp_attention():
    # DeepSeek-V3, 64 sequences on 8 H200 with DP attention: 8 sequences per rank.
    base = ["plan", "deepseek-v3", "--context", "4096", "--hardware", "h200", "--devices", "8", "--batch", "64",
            "--dp-attention", "--export"]
    r = runner.invoke(app, base + ["vllm"])
    assert r.exit_code == 0, r.output
    _, argv = command(r.output.split("\n", 1)[1])
    assert (value(argv, "--data-parallel-size"), value(argv, "--max-num-seqs")) == ("8", "8")
    assert "--enable-expert-parallel" in argv and "--tensor-parallel-size" not in argv
    r = runner.invoke(app, base + ["sglang"])
    assert r.exit_code == 0, r.output
    _, argv = command(r.output.split("\n", 1)[1])
    flags = ("--tp", "--dp-size", "--ep-size", "--max-running-requests")
    assert [value(argv, f) for f in flags] == ["8", "8", "8", "64"]
    assert "--enable-dp-attention" in argv
