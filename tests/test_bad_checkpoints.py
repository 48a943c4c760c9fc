"""Bad checkpoints and inputs as people meet them (issue 12): non-finite config numbers, OS
errors on any file read, pickle-only directories, index shards outside the directory, and
dtype names in their usual spellings. Each is one error line (exit code 2 from the CLI)."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tierlm import LLM
from tierlm.cli import app
from tierlm.dtypes import canonical, dtype_name
from tierlm.errors import ConfigError, TierlmError
from tierlm.model import load
from tierlm.model import loader as loader_mod
from tierlm.plan.planner import Options

CFG = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
       "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 32, "max_position_embeddings": 64,
       "torch_dtype": "float32", "tie_word_embeddings": True}


def tensors():
    from tierlm.model.families import get
    from tierlm.spec import parse_config
    spec = parse_config(CFG)
    with torch.device("meta"):
        m = get(spec.family).build(spec, [])
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) for k, v in m.state_dict().items()}


def write(d: Path, cfg=None, files=("model.safetensors",)) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg or CFG, allow_nan=True))
    for f in files:
        save_file(tensors(), str(d / f))
    return d


def cli(*args):
    out = CliRunner().invoke(app, [str(a) for a in args])
    text = out.output
    assert out.exit_code == 2, text
    assert "Traceback" not in text and text.startswith("error: ") and text.strip().count("\n") == 0, text
    return text


def test_good_checkpoint_loads(tmp_path):
    assert next(load(write(tmp_path / "ok"), progress=False).parameters()).dtype == torch.float32


# ---------------------------------------------------------------- non-finite config numbers
@pytest.mark.parametrize("key,value", [("rms_norm_eps", float("nan")), ("rope_theta", float("inf")),
                                       ("rms_norm_eps", float("-inf"))])
def test_non_finite_config_numbers(tmp_path, key, value):
    d = write(tmp_path / "ck", {**CFG, key: value})
    assert ("NaN" if value != value else "Infinity") in (d / "config.json").read_text()
    with pytest.raises(ConfigError, match=f"field '{key}' must be a finite number"):
        load(d, progress=False)
    assert f"field '{key}' must be a finite number" in cli("plan", d)


# ---------------------------------------------------------------- OS errors on reads
@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs /proc")
def test_unreadable_special_files(tmp_path):
    assert "/proc/self/mem: cannot read (Input/output error)" in cli("plan", "/proc/self/mem")
    assert "cannot read (Input/output error)" in cli("plan", "Qwen/Qwen3-8B", "--hardware", "/proc/self/mem")
    d = write(tmp_path / "ck")
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/proc/self/mem")
    with pytest.raises(ConfigError, match="config.json: cannot read"):
        load(d, progress=False)
    assert "config.json: cannot read" in cli("generate", d, "--prompt-ids", "1,2")
    d2 = write(tmp_path / "ck2")
    (d2 / "model.safetensors.index.json").symlink_to("/proc/self/mem")
    with pytest.raises(TierlmError, match="model.safetensors.index.json: cannot read"):
        load(d2, progress=False)


def test_unreadable_file(tmp_path, monkeypatch):
    d = write(tmp_path / "ck")
    real = Path.read_text

    def denied(self, *a, **kw):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **kw)
    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match="config.json: cannot read \\(Permission denied\\)"):
        load(d, progress=False)
    assert "cannot read (Permission denied)" in cli("plan", d)


def test_directories_where_files_are_expected(tmp_path):
    d = write(tmp_path / "ck", files=())
    (d / "model.safetensors").mkdir()
    with pytest.raises(TierlmError, match="model.safetensors: cannot read"):
        load(d, progress=False)
    e = write(tmp_path / "ck2")
    (e / "config.json").unlink()
    (e / "config.json").mkdir()
    assert "no config.json" in cli("plan", e)
    f = write(tmp_path / "ck3")
    (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "sub"}}))
    (f / "sub").mkdir()
    with pytest.raises(TierlmError, match="names sub, which is missing"):
        load(f, progress=False)


# ---------------------------------------------------------------- pickle-only directories
@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_only_directory(tmp_path, name):
    d = write(tmp_path / "ck", files=())
    (d / name).write_bytes(b"\x80\x02not read")
    msg = f"only {name}: pickle checkpoints (.bin/.pt/.pth) are not read"
    with pytest.raises(TierlmError) as err:
        load(d, progress=False)
    assert msg in str(err.value) and "convert it to safetensors" in str(err.value)
    assert msg in cli("generate", d, "--prompt-ids", "1")


# ---------------------------------------------------------------- index shards outside the directory
@pytest.fixture
def opened(monkeypatch):
    seen = []
    real = loader_mod.safe_open

    def spy(path, *a, **kw):
        seen.append(Path(path).resolve())
        return real(path, *a, **kw)
    monkeypatch.setattr(loader_mod, "safe_open", spy)
    return seen


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "nested-dotdot"])
def test_index_shards_must_stay_inside(tmp_path, opened, how):
    outside = write(tmp_path / "other", files=("x.safetensors",)) / "x.safetensors"
    d = write(tmp_path / "ck", files=())
    name = {"dotdot": "../other/x.safetensors", "absolute": str(outside), "symlink": "link.safetensors",
            "nested-dotdot": "sub/../../other/x.safetensors"}[how]
    if how == "symlink":
        (d / "link.safetensors").symlink_to(outside)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in tensors()}}))
    with pytest.raises(TierlmError, match="outside the checkpoint directory; refused"):
        load(d, progress=False)
    assert "outside the checkpoint directory; refused" in cli("generate", d, "--prompt-ids", "1")
    assert outside.resolve() not in opened


def test_index_shards_inside_and_hub_cache_links(tmp_path, opened):
    repo = tmp_path / "models--org--tiny"
    blob = write(repo / "blobs", files=("abc123",)) / "abc123"
    (blob.parent / "config.json").unlink()
    d = write(repo / "snapshots" / "rev", files=())
    (d / "model-00001-of-00001.safetensors").symlink_to("../../blobs/abc123")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors()}}))
    load(d, progress=False)                                   # a Hugging Face cache snapshot still loads
    assert blob.resolve() in opened


# ---------------------------------------------------------------- dtype spellings
@pytest.mark.parametrize("spelling", ["bf16", "bfloat16", "torch.bfloat16", "BF16", "BFloat16", torch.bfloat16])
def test_dtype_spellings(tmp_path, spelling):
    m = load(write(tmp_path / "ck"), dtype=spelling, progress=False)
    assert next(m.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [123, "float7", None.__class__, "fp8"])
def test_bad_dtypes(tmp_path, bad):
    with pytest.raises(TierlmError, match="dtype must be one of bf16, fp16, fp32, fp64"):
        load(write(tmp_path / "ck"), dtype=bad, progress=False)


def test_engine_and_cli_dtype_spellings(tmp_path):
    d = write(tmp_path / "ck")
    llm = LLM(d, dtype="Float32", kv_dtype="FP8", max_model_len=32)
    assert llm.dtype == torch.float32 and llm.kv_dtype == "fp8" and llm.indexer_dtype == "bf16"
    assert LLM(d, dtype=torch.float32, kv_dtype="torch.float32", max_model_len=32).kv_dtype == "fp32"
    assert LLM(d, dtype="fp32", kv_dtype="AUTO", max_model_len=32).kv_dtype == "fp32"
    with pytest.raises(TierlmError, match="dtype must be one of bf16, fp16, fp32, fp64.*got 123"):
        LLM(d, dtype=123)
    with pytest.raises(TierlmError, match="kv_dtype must be one of auto, bf16, fp8"):
        LLM(d, dtype="fp32", kv_dtype="float7")
    out = CliRunner().invoke(app, ["generate", str(d), "--prompt-ids", "1,2", "-n", "2", "--dtype", "FLOAT32",
                                   "--kv-dtype", "BF16"])
    assert out.exit_code == 0, out.output
    assert "dtype must be one of" in cli("generate", d, "--prompt-ids", "1", "--dtype", "float7")
    assert "kv_dtype must be one of" in cli("generate", d, "--prompt-ids", "1", "--dtype", "fp32", "--kv-dtype", "x")


def test_planner_dtype_spellings():
    o = Options(kv_dtype="FP8", indexer_dtype="torch.bfloat16", state_dtype="Float32", weight_dtypes={"*": "BF16"})
    assert (o.kv_dtype, o.indexer_dtype, o.state_dtype, o.weight_dtypes) == ("fp8", "bf16", "fp32", {"*": "bf16"})
    out = CliRunner().invoke(app, ["plan", "Qwen/Qwen3-8B", "-c", "4k", "--kv-dtype", "FP8", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["plans"][0]["kv_dtype"] == "fp8"
    assert "--kv-dtype must be one of" in cli("plan", "Qwen/Qwen3-8B", "--kv-dtype", "float7")


def test_one_dtype_parser():
    assert canonical("  BFLOAT16 ") == "bf16" and canonical(torch.float8_e4m3fn) == "fp8" and canonical(7) is None
    with pytest.raises(TierlmError, match="x must be one of fp8"):
        dtype_name("bf16", "x", ("fp8",))
