"""Routed experts off the device: token-identical greedy output with experts in host memory and
memory-mapped from disk under a small device budget, the budget respected, the disk mode
never reading an expert it does not run, V4's hash-routed experts prefetched, and bad input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
import test_engine as te  # noqa: E402

from tierlm import LLM, SamplingParams  # noqa: E402
from tierlm.errors import TierlmError  # noqa: E402
from tierlm.tiers.experts import routed_experts  # noqa: E402

FAMILIES = ("deepseek-v4", "deepseek-v3.2", "qwen3-moe")
PROMPTS = te.PROMPTS
KW = dict(dtype=torch.float64, reference="transformers", max_model_len=128)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    ref, path = te.MAKERS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, path, {tuple(p): te.reference_greedy(ref, p) for p in PROMPTS}


def resident_bytes(llm) -> int:
    return sum(p.numel() * p.element_size() for _, m in routed_experts(llm.model) for p in m.parameters()
               if p.device.type != "meta")


@pytest.mark.parametrize("where", ["host", "disk"])
def test_experts_off_device_are_identical(family, where):
    _, path, want = family
    full = LLM(path, **KW)
    total = resident_bytes(full)
    budget = total // 4                                   # a quarter of the experts on the device
    llm = LLM(path, **KW, experts_on=where, device_expert_bytes=budget)
    if where == "disk":
        assert resident_bytes(llm) == 0                   # nothing read before it is needed
    outs = llm.generate(PROMPTS, te.GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [want[tuple(p)] for p in PROMPTS]
    assert 0 < resident_bytes(llm) <= budget
    rate = llm.stats()["expert_cache_hit_rate"]
    assert 0 < rate < 1
    assert llm.experts.hits + llm.experts.misses > 0


def test_hash_routed_experts_are_prefetched(family):
    name, path, _ = family
    if name != "deepseek-v4":
        assert not hasattr(LLM(path, **KW).model, "known_experts")   # only V4 knows its experts early
        return
    llm = LLM(path, **KW, experts_on="host", device_expert_bytes=1 << 30)
    ids = torch.tensor([PROMPTS[1]])
    names = llm.model.known_experts(ids)
    layers = [i for i, layer in enumerate(llm.model.model.layers) if layer.ffn.gate.hash]
    want = {f"model.layers.{i}.ffn.experts.{e}" for i in layers
            for e in llm.model.model.layers[i].ffn.gate.tid2eid[ids].unique().tolist()}
    assert set(names) == want and names
    llm.generate({"prompt_token_ids": PROMPTS[1]}, SamplingParams(temperature=0, max_tokens=1))
    assert want <= set(llm.experts.resident)


def test_bad_expert_options(family, tmp_path):
    _, path, _ = family
    with pytest.raises(TierlmError, match="experts_on"):
        LLM(path, **KW, experts_on="gpu")
    with pytest.raises(TierlmError, match="device_expert_bytes"):
        LLM(path, **KW, experts_on="host", device_expert_bytes=-1)
    _, dense = te.MAKERS["llama"](tmp_path / "llama")
    with pytest.raises(TierlmError, match="no per-expert modules"):
        LLM(dense, **KW, experts_on="host")


def engram_checkpoint(path):
    """A Llama with Engram on two layers (tierlm's own module, no transformers class exists),
    random weights, written as config.json + model.safetensors."""
    import json
    from safetensors.torch import save_file
    import test_engram as te_engram
    from tierlm.model.families import gqa
    torch.manual_seed(0)
    model = gqa.build(te_engram.spec()).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dict(te_engram.LLAMA, engram_config=te_engram.ENGRAM)))
    return path


@pytest.mark.parametrize("where", ["host", "disk"])
def test_engram_tables_off_device_are_identical(tmp_path, where):
    path = engram_checkpoint(tmp_path / "engram")
    want = [o.outputs[0].token_ids for o in LLM(path, **KW).generate(PROMPTS, te.GREEDY)]
    llm = LLM(path, **KW, engram_on=where)
    tables = [m for m in llm.model.modules() if hasattr(m, "table") and m.table is not None]
    assert len(tables) == 2 and all(m.embedding.weight.numel() == 0 for m in tables)   # nothing left on the device
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, te.GREEDY)] == want
    with pytest.raises(TierlmError, match="engram_on"):
        LLM(path, **KW, engram_on="tape")


def test_cli_offload_options(family):
    import json
    from typer.testing import CliRunner
    from tierlm.cli import app
    _, path, want = family
    args = ["generate", str(path), "--prompt-ids", ",".join(map(str, PROMPTS[3])), "--dtype", "fp64",
            "--max-tokens", "8", "--json", "--experts-on", "disk", "--device-experts", "1KiB"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["token_ids"]
    plain = LLM(path, dtype=torch.float64).generate({"prompt_token_ids": PROMPTS[3]}, SamplingParams(temperature=0, max_tokens=8))
    assert got == plain[0].outputs[0].token_ids      # the CLI runs the official reference: compare like with like
    bad = CliRunner().invoke(app, args[:-2] + ["--device-experts", "some"])
    assert bad.exit_code == 2 and "byte size" in bad.output
