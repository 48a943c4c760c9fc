"""Property-based (hypothesis) tests of `tierlm plan`'s input checking.

The contract under test (cli.py, errors.py): bad input -> exactly one line on stderr that
starts with "error:" and names the offending field, exit code 2, never a traceback.
Valid input -> exit 0 and, with --json, strict JSON.

The CLI is called in-process with typer's CliRunner (click >= 8.2: `result.output` holds
stdout and stderr interleaved, `result.stderr` stderr alone), except for one subprocess
smoke test of the real `tierlm` console script.

Which config fields are *required* is learned once, at import time, by deleting each key
of each registry config and seeing whether `parse_config` rejects the result; which
hardware numbers are *read* is learned from the `sources` the hardware parser records.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tierlm.cli import app
from tierlm.plan.hardware import CATALOG_DIR, parse_hardware
from tierlm.spec.config import FAMILIES, WRAPPERS, parse_config
from tierlm.spec.fields import METADATA_KEYS
from tierlm.spec.registry import entries

RUNNER = CliRunner()
# derandomize: the same examples on every run, so a red test is not a flake.
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_TMP = tempfile.TemporaryDirectory(prefix="tierlm-fuzz-")
TMP = Path(_TMP.name)


# ---------------------------------------------------------------------------- helpers
def run_cli(*args: str):
    result = RUNNER.invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info))
        pytest.fail(f"`tierlm {' '.join(args)}` raised instead of exiting 2:\n{tb}")
    return result


def plan_config(cfg_text: str | bytes, *extra: str):
    d = TMP / "model"
    d.mkdir(exist_ok=True)
    p = d / "config.json"
    if isinstance(cfg_text, bytes):
        p.write_bytes(cfg_text)
    else:
        p.write_text(cfg_text)
    return run_cli("plan", str(d), "--context", "4096", "--json", *extra)


def plan_hardware(hw_text: str, model: str = "qwen3-8b"):
    p = TMP / "hw.json"
    p.write_text(hw_text)
    return run_cli("plan", model, "--context", "4096", "--hardware", str(p), "--json"), str(p)


def assert_one_line_error(result, *names: str, strip: str = "") -> str:
    """exit 2, output = one non-empty 'error:' line (no traceback), naming every `names`."""
    out = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}, output:\n{out}"
    assert "Traceback" not in out, out
    assert out.endswith("\n") and out.count("\n") == 1, f"not exactly one line: {out!r}"
    line = out[:-1]
    assert line.startswith("error:") and line[len("error:"):].strip(), repr(line)
    assert result.stdout == "", f"stdout not empty: {result.stdout!r}"
    msg = line.replace(strip, "") if strip else line
    for n in names:
        assert n in msg, f"error does not name {n!r}: {line!r}"
    return line


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON)."""
    def bad(c):
        raise ValueError(f"non-JSON constant {c} in output")
    return json.loads(text, parse_constant=bad)


def _path_get(cfg, path):
    for p in path:
        cfg = cfg[p]
    return cfg


# ---------------------------------------------------------------------------- learned facts
ENTRIES = entries()
IDS = sorted(ENTRIES)
# Counts where 0 means "none of these" (MTP layers, shared experts, hash layers, dense
# prefix layers, full-attention prefix); every other required integer must be >= 1.
ZERO_OK = {"num_nextn_predict_layers", "n_shared_experts", "num_hash_layers", "first_k_dense_replace",
           "max_window_layers", "num_mtp_modules"}


def _targets(cfg: dict) -> list[tuple]:
    """Where the fields of a config live: the top level, and text_config for wrappers."""
    out = [()]
    if cfg.get("model_type") in WRAPPERS and isinstance(cfg.get("text_config"), dict):
        out.append(("text_config",))
    return out


def _learn_required() -> dict[str, list[tuple[tuple, str]]]:
    req: dict[str, list[tuple[tuple, str]]] = {}
    for mid, e in ENTRIES.items():
        for path in _targets(e.config):
            for key in list(_path_get(e.config, path)):
                m = copy.deepcopy(e.config)
                del _path_get(m, path)[key]
                try:
                    parse_config(m, mid)
                except Exception:
                    req.setdefault(mid, []).append((path, key))
    return req


REQUIRED = _learn_required()
REQUIRED_INT = {mid: [(p, k) for p, k in fields
                      if isinstance(_path_get(ENTRIES[mid].config, p)[k], int)
                      and not isinstance(_path_get(ENTRIES[mid].config, p)[k], bool)]
                for mid, fields in REQUIRED.items()}
ALL_KEYS = {mid: [(p, k) for p in _targets(e.config) for k in _path_get(e.config, p)]
            for mid, e in ENTRIES.items()}


def test_learned_required_fields_are_plausible():
    """Sanity of the import-time learning: every family needs its basic shape fields."""
    for mid in IDS:
        keys = {k for _, k in REQUIRED[mid]}
        if ENTRIES[mid].config.get("model_type") in WRAPPERS:
            assert "text_config" in keys
        else:
            assert {"model_type", "hidden_size", "num_hidden_layers", "vocab_size"} <= keys, (mid, keys)
        assert REQUIRED_INT[mid], mid


# ---------------------------------------------------------------------------- registry mutations
@pytest.mark.parametrize("model_id", IDS)
@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_deleting_a_required_field_names_it(model_id, data):
    path, key = data.draw(st.sampled_from(REQUIRED[model_id]), label="field")
    cfg = copy.deepcopy(ENTRIES[model_id].config)
    del _path_get(cfg, path)[key]
    assert_one_line_error(plan_config(json.dumps(cfg)), key)


def _wrong_int_values(key: str, good: int):
    bad = [st.just(str(good)), st.text(max_size=5), st.floats(allow_nan=True).filter(lambda x: not float(x).is_integer()),
           st.booleans(), st.just([good]), st.lists(st.integers(), max_size=3), st.just({"value": good}),
           st.none(), st.integers(max_value=-1), st.just(-max(good, 1))]
    if key not in ZERO_OK:
        bad.append(st.just(0))
    return st.one_of(bad)


@pytest.mark.parametrize("model_id", IDS)
@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_wrong_type_or_range_for_a_required_integer_names_it(model_id, data):
    path, key = data.draw(st.sampled_from(REQUIRED_INT[model_id]), label="field")
    good = _path_get(ENTRIES[model_id].config, path)[key]
    value = data.draw(_wrong_int_values(key, good), label="value")
    cfg = copy.deepcopy(ENTRIES[model_id].config)
    _path_get(cfg, path)[key] = value
    assert_one_line_error(plan_config(json.dumps(cfg, allow_nan=True)), key)


# Numbers the model families read (norm eps, RoPE bases, router scale, clamps, mHC): where a
# registry config has one, a wrong type, NaN, an infinity or a negative value names it.
NUMERIC_KEYS = ("rms_norm_eps", "rope_theta", "compress_rope_theta", "routed_scaling_factor", "swiglu_limit",
                "hc_eps", "query_pre_attn_scalar")
NUMERIC = {mid: [(p, k) for p, k in ALL_KEYS[mid] if k in NUMERIC_KEYS] for mid in IDS}


@pytest.mark.parametrize("model_id", [mid for mid in IDS if NUMERIC[mid]])
@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_bad_numeric_field_names_it(model_id, data):
    path, key = data.draw(st.sampled_from(NUMERIC[model_id]), label="field")
    value = data.draw(st.sampled_from([float("nan"), float("inf"), -1.0, -1, "1e-6", [1.0], True, {"value": 1}]),
                      label="value")
    cfg = copy.deepcopy(ENTRIES[model_id].config)
    _path_get(cfg, path)[key] = value
    assert_one_line_error(plan_config(json.dumps(cfg, allow_nan=True)), key)


# Keys that look like config keys but are read by nobody; the parser must name them.
UNKNOWN_KEYS = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_.\-]{0,24}\Z").filter(
    lambda k: k not in METADATA_KEYS).map(lambda k: "zz_" + k)


@pytest.mark.parametrize("model_id", IDS)
@settings(max_examples=4, **SETTINGS)
@given(key=UNKNOWN_KEYS, value=st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.just([1])))
def test_unknown_key_is_named(model_id, key, value):
    """The key goes where the parser checks for unknown fields: the top level, or the
    text_config of a multimodal wrapper (see test_unknown_key_outside_text_config_is_rejected)."""
    cfg = copy.deepcopy(ENTRIES[model_id].config)
    _path_get(cfg, _targets(cfg)[-1])[key] = value
    assert_one_line_error(plan_config(json.dumps(cfg)), key)


@pytest.mark.parametrize("model_id", IDS)
@settings(max_examples=5, **SETTINGS)
@given(data=st.data())
def test_deleting_any_field_never_crashes(model_id, data):
    """Any key, required or not: the planner either plans (exit 0) or gives one error line."""
    path, key = data.draw(st.sampled_from(ALL_KEYS[model_id]), label="field")
    cfg = copy.deepcopy(ENTRIES[model_id].config)
    del _path_get(cfg, path)[key]
    r = plan_config(json.dumps(cfg))
    if r.exit_code == 0:
        strict_json(r.stdout)
    else:
        assert_one_line_error(r)


# ---------------------------------------------------------------------------- random configs
CONFIG_KEYS = sorted({"model_type", "text_config", "dim", "n_layers", "hidden_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                      "max_position_embeddings", "intermediate_size", "original_seq_len", "rope_factor",
                      "compress_ratios", "index_n_heads", "quantization_config", "quant_method",
                      "layer_types", "sliding_window", "engram_config", "torch_dtype", "dtype",
                      "num_local_experts", "num_experts_per_tok", "kv_lora_rank", "q_lora_rank"})
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                        st.sampled_from(FAMILIES + tuple(WRAPPERS)))
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=6),
                                                         ch, max_size=6),
    max_leaves=20)


# Objects made of known config keys (each optional) with random values: reaches the
# family dispatch, the wrapper unwrapping and the DeepSeek official-config path.
KEYED_CONFIGS = st.fixed_dictionaries({}, optional={k: JSON_VALUES for k in CONFIG_KEYS})


@settings(max_examples=150, phases=(Phase.explicit, Phase.generate), **SETTINGS)
@given(value=st.one_of(JSON_VALUES, KEYED_CONFIGS))
def test_random_json_config_is_rejected_in_one_line(value):
    assert_one_line_error(plan_config(json.dumps(value, allow_nan=True)))


@settings(max_examples=60, **SETTINGS)
@given(blob=st.binary(max_size=300))
def test_random_bytes_config_is_rejected_in_one_line(blob):
    assert_one_line_error(plan_config(blob))


# ---------------------------------------------------------------------------- valid llama configs
@st.composite
def llama_configs(draw):
    heads = draw(st.integers(1, 32))
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    head_dim = draw(st.sampled_from([8, 16, 32, 64, 80, 96, 128, 256]) | st.integers(1, 300))
    explicit_head_dim = draw(st.booleans())
    hidden = draw(st.integers(8, 8192)) if explicit_head_dim else heads * head_dim
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "num_attention_heads": heads, "num_key_value_heads": kv,
           "intermediate_size": draw(st.integers(8, 16384)), "num_hidden_layers": draw(st.integers(1, 8)),
           "vocab_size": draw(st.integers(2, 200_000)),
           "max_position_embeddings": draw(st.integers(1, 1 << 20)), "torch_dtype": "bfloat16",
           "tie_word_embeddings": draw(st.booleans())}
    if explicit_head_dim:
        cfg["head_dim"] = head_dim
    return cfg, head_dim


@settings(max_examples=40, **SETTINGS)
@given(cfg_hd=llama_configs(), context=st.integers(1, 300_000), batch=st.integers(1, 8),
       kv_dtype=st.sampled_from(["bf16", "fp8"]))
def test_valid_llama_config_kv_bytes_follow_gqa_formula(cfg_hd, context, batch, kv_dtype):
    """calculators.md §4.1: GQA stores 2 * h_kv * d * b bytes per token per layer."""
    cfg, head_dim = cfg_hd
    d = TMP / "llama"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("plan", str(d), "--context", str(context), "--batch", str(batch), "--kv-dtype", kv_dtype, "--json")
    assert r.exit_code == 0, r.output
    plans = strict_json(r.stdout)["plans"]
    assert len(plans) == 1
    kv = plans[0]["kv_cache"]
    L, h = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    bf16 = 2 * L * h * head_dim * 2 * context * batch
    expected = bf16 if kv_dtype == "bf16" else bf16 // 2
    assert kv["total_bytes"] == expected
    assert kv["kv_bytes"] == expected and kv["indexer_bytes"] == 0 and kv["state_bytes"] == 0
    assert kv["bytes_per_token"] == expected // (context * batch)
    assert plans[0]["context"] == context and plans[0]["batch"] == batch


# ---------------------------------------------------------------------------- hardware files
HW_FILES = [p for p in sorted(CATALOG_DIR.glob("*.json")) if not p.name.startswith("_")]
HW_DATA = {p.stem: json.loads(p.read_text()) for p in HW_FILES}
# The numbers the parser reads (it records the source of each one it reads).
HW_READ = {name: sorted(parse_hardware(copy.deepcopy(d), name).sources) for name, d in HW_DATA.items()}
HW_INTEGER = {"device.memory_bytes", "host.devices_per_node", "host.memory_bytes", "disk.capacity_bytes"}
HW_ZERO_OK = {"host.memory_bytes"}   # docs/planner.md: "0 for none"


def _hw_node(data: dict, path: str) -> tuple[dict, str]:
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    return node, last


def _hw_set_number(data: dict, path: str, value) -> None:
    """Replace a number, inside its {"value": ..., "source": ...} wrapper when it has one."""
    node, last = _hw_node(data, path)
    if isinstance(node[last], dict):
        node[last]["value"] = value
    else:
        node[last] = value


def _bad_hw_numbers(path: str):
    bad = [st.integers(max_value=-1), st.floats(max_value=-1e-9, allow_infinity=True),
           st.just(float("nan")), st.just(float("inf")), st.just("NaN"), st.just("12"),
           st.text(max_size=6), st.booleans(), st.none(), st.lists(st.integers(1, 9), max_size=2)]
    if path not in HW_ZERO_OK:
        bad += [st.just(0), st.just(0.0)]
    if path in HW_INTEGER:
        bad.append(st.floats(0.5, 1e15).filter(lambda x: not x.is_integer()))
    return st.one_of(bad)


@pytest.mark.parametrize("hw", sorted(HW_DATA))
@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_bad_hardware_number_is_named(hw, data):
    path = data.draw(st.sampled_from(HW_READ[hw]), label="field")
    value = data.draw(_bad_hw_numbers(path), label="value")
    hwd = copy.deepcopy(HW_DATA[hw])
    _hw_set_number(hwd, path, value)
    r, fname = plan_hardware(json.dumps(hwd, allow_nan=True))
    assert_one_line_error(r, path, strip=fname)


@pytest.mark.parametrize("hw", sorted(HW_DATA))
def test_hardware_structural_mutations_are_named(hw):
    """Missing device.memory_bytes, and a {"source": ...} number without its "value"."""
    hwd = copy.deepcopy(HW_DATA[hw])
    del hwd["device"]["memory_bytes"]
    r, fname = plan_hardware(json.dumps(hwd))
    assert_one_line_error(r, "device.memory_bytes", strip=fname)
    for path in HW_READ[hw]:
        hwd = copy.deepcopy(HW_DATA[hw])
        node, last = _hw_node(hwd, path)
        node[last] = {"source": "a number without its value"}
        r, fname = plan_hardware(json.dumps(hwd))
        assert_one_line_error(r, path, strip=fname)


HW_KEYS = ["name", "device", "memory_bytes", "memory_bandwidth", "flops", "bf16", "fp8", "host", "link",
           "devices_per_node", "link_bandwidth", "disk", "capacity_bytes", "read_bandwidth", "value",
           "price_per_hour"]
HW_JSON = st.recursive(
    JSON_LEAVES,
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.sampled_from(HW_KEYS) | st.text(max_size=6), ch, max_size=6),
    max_leaves=20)


@settings(max_examples=120, **SETTINGS)
@given(value=HW_JSON)
def test_random_json_hardware_file(value):
    r, fname = plan_hardware(json.dumps(value, allow_nan=True))
    if r.exit_code == 0:          # a random file may happen to be a valid description
        strict_json(r.stdout)
    else:
        assert_one_line_error(r)


POSITIVE = st.one_of(st.floats(min_value=5e-324, max_value=1.7e308), st.integers(1, 10**400))


@settings(max_examples=20, phases=(Phase.explicit, Phase.generate), report_multiple_bugs=False, **SETTINGS)
@given(mem=st.integers(10**9, 10**400), bw=POSITIVE, flops=POSITIVE, price=POSITIVE,
       model=st.sampled_from(["qwen3-8b", "gpt-oss-20b"]))
def test_extreme_but_positive_hardware_numbers_never_crash(mem, bw, flops, price, model):
    """Numbers the hardware parser accepts (positive, finite in the file) must give a plan
    whose --json output is JSON (no NaN/Infinity), or one error line; never a traceback."""
    hwd = {"name": "extreme", "device": {"memory_bytes": mem, "memory_bandwidth": bw, "flops": {"bf16": flops}},
           "price_per_hour": price}
    r, _ = plan_hardware(json.dumps(hwd), model)
    if r.exit_code == 0:
        strict_json(r.stdout)
    else:
        assert_one_line_error(r)


# ---------------------------------------------------------------------------- reproducers
# Deterministic cases found by the properties above (one test each, so a fix shows up as a
# pass). Each one currently fails; see the report that came with this file.
_QWEN = ENTRIES["Qwen/Qwen3-8B"].config


@pytest.mark.parametrize("model_type", [["llama"], {"a": 1}])
def test_repro_unhashable_model_type(model_type):
    """`model_type in WRAPPERS` hashes the value: a list/object model_type is a TypeError."""
    assert_one_line_error(plan_config(json.dumps({"model_type": model_type})), "model_type")


@pytest.mark.parametrize("bad", ["x", None, [1]])
def test_repro_official_deepseek_config_with_bad_original_seq_len(bad):
    """_from_official calls int(cfg['original_seq_len']) unchecked."""
    cfg = {"dim": 7168, "n_layers": 61, "original_seq_len": bad, "rope_factor": 40}
    assert_one_line_error(plan_config(json.dumps(cfg)), "original_seq_len")


def test_repro_deeply_nested_json_config():
    """json.loads raises RecursionError, which load_config_file does not catch."""
    assert_one_line_error(plan_config("[" * 100_000))


def test_repro_deeply_nested_json_hardware_file():
    """Same in load_hardware."""
    r, _ = plan_hardware("[" * 100_000)
    assert_one_line_error(r)


@pytest.mark.parametrize("model_id", ["zai-org/GLM-5", "deepseek-ai/DeepSeek-V3.2"])
def test_repro_dsa_without_q_lora_rank(model_id):
    """q_lora_rank is optional for MLA (V2-Lite) but params.py asserts it for DSA layers."""
    cfg = copy.deepcopy(ENTRIES[model_id].config)
    del cfg["q_lora_rank"]
    r = plan_config(json.dumps(cfg))
    if r.exit_code != 0:
        assert_one_line_error(r, "q_lora_rank")


@pytest.mark.parametrize("key, alternative", [("qk_rope_head_dim", "partial_rotary_factor"),
                                              ("compress_ratios", "layer_types")])
def test_repro_v4_missing_field_names_only_the_fallback(key, alternative):
    """Deleting qk_rope_head_dim / compress_ratios from DeepSeek-V4 reports the fallback
    field only ("missing field 'partial_rotary_factor'"), not the field that is missing."""
    cfg = copy.deepcopy(ENTRIES["deepseek-ai/DeepSeek-V4-Pro"].config)
    del cfg[key]
    assert_one_line_error(plan_config(json.dumps(cfg)), key, alternative)


@pytest.mark.parametrize("key", ["x:smile:", "tab\there", "new\nline", "\x1b[31mred"])
def test_repro_unknown_key_printed_verbatim_on_one_line(key):
    """The error goes through rich: ':smile:' becomes an emoji, a tab becomes spaces, a
    newline splits the error over two lines, an escape sequence reaches the terminal."""
    cfg = dict(_QWEN)
    cfg[key] = 1
    r = plan_config(json.dumps(cfg))
    escaped = json.dumps(key)[1:-1]
    line = assert_one_line_error(r)
    assert (key in line and key.isprintable()) or escaped in line, repr(line)


@pytest.mark.parametrize("model_id", ["google/gemma-3-27b-it", "moonshotai/Kimi-K2.5"])
def test_unknown_key_outside_text_config_is_rejected(model_id):
    """The outer level of a multimodal wrapper is never checked: a typo there is silently
    ignored (design question: vision keys live there)."""
    cfg = copy.deepcopy(ENTRIES[model_id].config)
    cfg["zz_unknown_field"] = 1
    assert_one_line_error(plan_config(json.dumps(cfg)), "zz_unknown_field")


@pytest.mark.parametrize("hwd", [
    {"name": "big", "device": {"memory_bytes": 10**400, "memory_bandwidth": 1e12}},
    {"name": "big", "device": {"memory_bytes": 80 * 10**9, "memory_bandwidth": 10**400}},
    {"name": "slow", "device": {"memory_bytes": 80 * 10**9, "memory_bandwidth": 1e-300, "flops": {"bf16": 1e15}},
     "price_per_hour": 1},
    {"name": "weak", "device": {"memory_bytes": 80 * 10**9, "memory_bandwidth": 1e12, "flops": {"bf16": 1e-320}},
     "price_per_hour": 1},
    {"name": "dear", "device": {"memory_bytes": 80 * 10**9, "memory_bandwidth": 1e12, "flops": {"bf16": 1e15}},
     "price_per_hour": 1e308},
], ids=["huge-int-memory", "huge-int-bandwidth", "tiny-bandwidth", "tiny-flops", "huge-price"])
def test_repro_extreme_hardware_numbers(hwd):
    r, _ = plan_hardware(json.dumps(hwd))
    if r.exit_code == 0:
        strict_json(r.stdout)
    else:
        assert_one_line_error(r)


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 10**30), ("vocab_size", 10**400)],
                         ids=["layers-1e30", "vocab-1e400"])
def test_repro_absurd_config_integers(key, value):
    """An integer too large for the planner's arithmetic (OverflowError) must be an error
    line, not a traceback. (10**7 layers, or num_mtp_modules 10**30 on MiniMax-M2, do not
    crash but run for minutes; not tested here.)"""
    cfg = dict(_QWEN)
    cfg[key] = value
    r = plan_config(json.dumps(cfg))
    if r.exit_code == 0:
        strict_json(r.stdout)
    else:
        assert_one_line_error(r, key)


def test_repro_exact_large_integer_is_called_not_whole():
    """2**53 + 1 is an integer, but _Reader.number compares float(node) != int(node) and
    reports it as 'must be a whole number'."""
    hwd = {"name": "big", "device": {"memory_bytes": 2**53 + 1, "memory_bandwidth": 1e12}}
    r, _ = plan_hardware(json.dumps(hwd))
    assert "whole number" not in r.output, r.output


def test_repro_cost_note_when_decode_has_no_host_bandwidth():
    """Unified host memory without link bandwidth: decode reports an error and cost says
    the hardware 'has no price_per_hour' although the file gives one."""
    hwd = {"name": "uni", "device": {"memory_bytes": 100 * 10**9, "memory_bandwidth": 1e12},
           "host": {"memory_bytes": 10**12, "link": "unified"}, "price_per_hour": 1}
    r, _ = plan_hardware(json.dumps(hwd), "deepseek-v3")
    assert r.exit_code == 0, r.output
    p = strict_json(r.stdout)["plans"][0]
    assert "error" in p["decode"]
    assert "price_per_hour" not in p["cost"].get("note", ""), p["cost"]


# ---------------------------------------------------------------------------- console script
def test_console_script_bad_config_exits_2_without_traceback():
    exe = Path(sys.executable).with_name("tierlm")
    assert exe.exists(), exe
    with tempfile.TemporaryDirectory() as d:
        cfg = dict(_QWEN)
        cfg["num_hidden_layers"] = "thirty-six"
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        p = subprocess.run([str(exe), "plan", d, "--context", "4096", "--json"],
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error:"), p.stderr
    assert "num_hidden_layers" in p.stderr
