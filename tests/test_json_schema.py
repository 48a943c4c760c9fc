"""`tierlm plan --json` output against src/tierlm/plan/plan.schema.json (draft 2020-12).

The validator used here is strict about integers: JSON Schema's "integer" accepts 1.0,
this one accepts only JSON integers (Python int, not bool), so a byte count printed as a
float fails. The output must also be strict JSON (no NaN / Infinity).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import jsonschema
import pytest
from jsonschema import Draft202012Validator, validators
from typer.testing import CliRunner

from tierlm.plan import planner as _planner_module
from tierlm.cli import app
from tierlm.spec.registry import resolve

SCHEMA_PATH = Path(_planner_module.__file__).with_name("plan.schema.json")
SCHEMA = json.loads(SCHEMA_PATH.read_text())

_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool))
StrictValidator = validators.extend(Draft202012Validator, type_checker=_TYPES)
VALIDATOR = StrictValidator(SCHEMA)

RUNNER = CliRunner()
_TMP = tempfile.TemporaryDirectory(prefix="tierlm-schema-")
TMP = Path(_TMP.name)


def _no_constants(c):
    raise ValueError(f"non-JSON constant {c} in --json output")


def run_json(*args: str) -> dict:
    r = RUNNER.invoke(app, ["plan", *args, "--json"])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 0, r.output
    assert r.stderr == "", r.stderr
    return json.loads(r.stdout, parse_constant=_no_constants)


def assert_valid(data: dict) -> None:
    errors = sorted(VALIDATOR.iter_errors(data), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{e.json_path}: {e.message[:300]}" for e in errors[:10])


def _hw_file(name: str, data: dict) -> str:
    p = TMP / f"{name}.json"
    p.write_text(json.dumps(data))
    return str(p)


# A host tier with no bandwidth to read it: a spilled model's decode step cannot be timed.
UNIFIED_NO_LINK = {"name": "unified-no-link",
                   "device": {"memory_bytes": 100 * 10**9, "memory_bandwidth": 1e12, "flops": {"bf16": 1e15}},
                   "host": {"memory_bytes": 10**12, "link": "unified"}, "price_per_hour": 2.0}
# Nothing fits anywhere, at any device count: min_devices is null, items are unplaced.
TINY = {"name": "tiny", "device": {"memory_bytes": 10**6, "memory_bandwidth": 1e11}, "price_per_hour": 0.5}

CASES = {
    "four-models-two-contexts": (["deepseek-v4-pro", "glm-5", "qwen3-8b", "gpt-oss-20b"], ["--context", "4096,1M"]),
    "mtp": (["deepseek-v4-pro", "deepseek-v3", "minimax-m2"], ["--context", "128k", "--mtp"]),
    "vllm-fp8": (["glm-5", "deepseek-v3.2", "deepseek-v4-flash", "gpt-oss-20b"],
                 ["--context", "32k", "--layout", "vllm", "--kv-dtype", "fp8", "--indexer-dtype", "fp8"]),
    "sglang-fp4-indexer": (["deepseek-v3.2", "qwen3-235b-a22b"], ["--context", "8k", "--layout", "sglang",
                                                                  "--indexer-dtype", "fp4"]),
    "ideal-fp4": (["kimi-k2.5", "mistral-7b"], ["--context", "16k", "--kv-dtype", "fp4"]),
    "batch-4": (["qwen3-8b", "gemma-3-27b-it", "mixtral-8x7b"], ["--context", "8k", "--batch", "4"]),
    "no-price-no-flops": (["qwen3-8b", "deepseek-v4-flash", "deepseek-v2-lite"], ["--context", "4096", "--hardware", "m3-ultra"]),
    "cpu-server": (["qwen3-30b-a3b"], ["--context", "4096", "--hardware", "cpu-server"]),
    "devices-2": (["llama-3.1-70b", "qwen3-32b", "deepseek-r1"], ["--context", "4096", "--devices", "2"]),
    "weight-dtype": (["llama-3.1-8b"], ["--context", "4096", "--weight-dtype", "fp8", "--weight-dtype", "embeddings=bf16",
                                        "--hardware", "h100"]),
    "beyond-max-position": (["qwen3-0.6b"], ["--context", "1Mi"]),
}


@pytest.mark.parametrize("models, opts", list(CASES.values()), ids=list(CASES))
def test_plan_json_matches_schema(models, opts):
    data = run_json(*models, *opts)
    assert_valid(data)
    contexts = opts[opts.index("--context") + 1].split(",")
    assert [p["model"] for p in data["plans"]] == [resolve(m).id for m in models for _ in contexts]


def test_schema_covers_decode_error_and_cost_note():
    data = run_json("deepseek-v3", "--context", "4096", "--hardware", _hw_file("unified", UNIFIED_NO_LINK))
    assert_valid(data)
    p = data["plans"][0]
    assert set(p["decode"]) == {"error"}
    assert p["cost"]["price_per_hour"] is not None and "note" in p["cost"]


def test_schema_covers_nothing_fits():
    data = run_json("qwen3-0.6b", "--context", "4096", "--hardware", _hw_file("tiny", TINY))
    assert_valid(data)
    p = data["plans"][0]
    assert p["limits"]["min_devices"] is None
    assert not p["placement"]["fits"]


def test_schema_covers_nulls_of_a_hardware_without_price_or_flops():
    p = run_json("qwen3-8b", "--context", "4096", "--hardware", "m3-ultra")["plans"][0]
    assert p["cost"]["price_per_hour"] is None
    assert p["decode"]["compute_dtype"] is None and p["decode"]["t_compute_s"] is None
    assert p["reload_vs_recompute"]["host"]["break_even_context"] is None


def test_one_entry_per_model_and_context_in_order_with_exact_context():
    spec = "4096,128k,1M,1Mi,128Ki,1.5k,32K"
    expected = [4096, 128_000, 1_000_000, 1_048_576, 131_072, 1500, 32_000]
    data = run_json("qwen3-0.6b", "deepseek-v2-lite", "gpt-oss-20b", "--context", spec)
    assert_valid(data)
    got = [(p["model"], p["context"]) for p in data["plans"]]
    want = [(m, c) for m in ("Qwen/Qwen3-0.6B", "deepseek-ai/DeepSeek-V2-Lite", "openai/gpt-oss-20b") for c in expected]
    assert got == want
    for p in data["plans"]:
        assert type(p["context"]) is int and p["batch"] == 1
        assert p["prefill"]["tokens"] == p["context"]


def test_batch_and_options_are_echoed():
    p = run_json("glm-5", "--context", "64k", "--batch", "3", "--layout", "vllm", "--kv-dtype", "fp8",
                 "--indexer-dtype", "fp8", "--mtp", "--devices", "8")["plans"][0]
    assert (p["context"], p["batch"], p["kv_dtype"], p["indexer_dtype"], p["mtp"], p["layout"]) == \
        (64_000, 3, "fp8", "fp8", True, "vllm")
    assert p["hardware"]["devices"] == 8 and p["hardware"]["devices_chosen"] == "user"
    assert p["prefill"]["tokens"] == 64_000 * 3


# ---------------------------------------------------------------------------- the schema itself
def test_schema_is_valid_draft_2020_12():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(SCHEMA)


def _objects(node, path="#"):
    if isinstance(node, dict):
        if "properties" in node:
            yield path, node
        for k, v in node.items():
            yield from _objects(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _objects(v, f"{path}/{i}")


def test_schema_fixed_objects_are_closed_and_fully_required():
    seen = 0
    for path, node in _objects(SCHEMA):
        seen += 1
        assert node.get("additionalProperties") is False, path
        assert set(node["required"]) == set(node["properties"]), path
    assert seen >= 20


@pytest.fixture(scope="module")
def sample() -> dict:
    return run_json("deepseek-v4-pro", "qwen3-8b", "--context", "4096")


def _broken(sample, edit):
    d = copy.deepcopy(sample)
    edit(d["plans"][0])
    return d


@pytest.mark.parametrize("edit", [
    lambda p: p.update(extra_key=1),
    lambda p: p["kv_cache"].update(total_bytes=float(p["kv_cache"]["total_bytes"])),
    lambda p: p.update(context=4096.0),
    lambda p: p["weights"]["components"]["attention"].update(params="1"),
    lambda p: p["weights"]["components"].update(vision={"params": 1, "bytes": 1, "per_device_bytes": 1, "dtypes": ["bf16"]}),
    lambda p: p.pop("cost"),
    lambda p: p["decode"].update(extra=1),
    lambda p: p["decode"].update(tokens_per_s=None),
    lambda p: p["limits"].update(max_context_on_device=None),
    lambda p: p["placement"]["items"]["kv_cache"].pop("unplaced"),
    lambda p: p["hardware"].update(devices=0),
    lambda p: p["kv_cache"]["layers"][0].update(attention="mamba"),
    lambda p: p["cost"].update(price_per_hour=None),
    lambda p: p["reload_vs_recompute"]["host"].update(break_even_context=1.5),
    lambda p: p.update(mtp=0),
], ids=["extra-key", "float-bytes", "float-context", "string-params", "unknown-component", "missing-cost",
        "decode-extra", "null-throughput", "null-limit", "missing-unplaced", "zero-devices", "bad-attention",
        "null-price-with-numbers", "fractional-context", "int-for-bool"])
def test_schema_rejects_broken_output(sample, edit):
    assert_valid(sample)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(_broken(sample, edit))
