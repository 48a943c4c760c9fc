"""MTP speculative decoding: greedy output identical to decoding without speculation (and so to
transformers) for the families with MTP blocks, with random drafts (mostly rejected), with
oracle drafts (all accepted: multi-token acceptance) and half-right drafts (rollback after a
partial acceptance), through prefix hits, small prefill chunks and preemption."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
import test_model_deepseek as ds  # noqa: E402
from test_engine import GREEDY, PROMPTS, SECOND, reference_greedy  # noqa: E402
from test_engine import MAKERS as ENGINE_MAKERS  # noqa: E402

from tierlm import LLM  # noqa: E402
from tierlm.errors import TierlmError  # noqa: E402
from tierlm.model.families import deepseek  # noqa: E402
from tierlm.spec import parse_config  # noqa: E402

DS = {c[0]: c for c in ds.CASES}


def add_deepseek_mtp(path):
    """Append one random MTP block (layer n, own embedding, shared head) to a transformers checkpoint."""
    cfg = json.loads((path / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    cfg["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(path / "model.safetensors"))
    with torch.device("meta"):
        shapes = deepseek.build(parse_config(cfg), list(tensors) + [f"model.layers.{n}.embed_tokens.weight"]).state_dict()
    g = torch.Generator().manual_seed(0)
    for name, ref in shapes.items():
        if name.startswith(f"model.layers.{n}.") and name not in tensors:
            t = torch.randn(ref.shape, generator=g, dtype=torch.float64) / (ref.shape[-1] ** 0.5 if ref.dim() > 1 else 1)
            tensors[name] = t if ref.dim() > 1 else 1 + 0.1 * t
    save_file(tensors, str(path / "model.safetensors"))


def add_v4_mtp(path):
    """Add one random V4 MTP block (official `mtp.0.` names) in a second safetensors file."""
    from tierlm.model import load
    from tierlm.model.families import deepseek_v4
    spec = load(path, dtype=torch.float64, progress=False).spec
    with torch.device("meta"):
        shapes = deepseek_v4.build(spec, ["mtp.0.e_proj.weight"]).state_dict()
    g = torch.Generator().manual_seed(7)
    extra = {}
    for n, t in shapes.items():
        if n.startswith("mtp.0."):
            if t.is_floating_point():
                extra[n] = torch.randn(t.shape, generator=g, dtype=torch.float64) * (0.3 if t.dim() > 1 else 0.5)
                extra[n] += 1.0 if n.endswith("norm.weight") else 0.0
            else:
                extra[n] = torch.randint(0, spec.moe.num_experts, t.shape, generator=g)
    save_file(extra, str(path / "mtp.safetensors"))


MAKERS = {
    "deepseek-v3": lambda p: ds.make(p, DS["v3-qlora-group"]),
    "deepseek-v3.2": lambda p: ds.make(p, DS["v32-dsa"]),
    "glm-5": lambda p: ds.make(p, DS["glm5-dsa-shared"]),
    "deepseek-v4": ENGINE_MAKERS["deepseek-v4"],
}
ADD_MTP = {"deepseek-v3": add_deepseek_mtp, "deepseek-v3.2": add_deepseek_mtp, "glm-5": add_deepseek_mtp,
           "deepseek-v4": add_v4_mtp}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def family(request, tmp_path_factory):
    ref, path = MAKERS[request.param](tmp_path_factory.mktemp(request.param))
    ADD_MTP[request.param](path)
    want = {tuple(p): reference_greedy(ref, p) for p in PROMPTS + SECOND}
    return request.param, path, want


def spec_llm(path, k, **kw):
    return LLM(path, dtype=torch.float64, reference="transformers", speculative={"method": "mtp", "num_tokens": k}, **kw)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("k", [1, 3])
def test_random_drafts_change_nothing(family, k):
    name, path, want = family
    llm = spec_llm(path, k)
    assert tokens(llm.generate(PROMPTS, GREEDY)) == [want[tuple(p)] for p in PROMPTS]
    before = llm.stats()["prefix_hit_tokens"]
    assert tokens(llm.generate(SECOND, GREEDY)) == [want[tuple(p)] for p in SECOND]
    assert llm.stats()["prefix_hit_tokens"] > before
    assert llm.stats()["spec_acceptance_rate"] is not None and llm.stats()["blocks_in_use"] == 0
    chunked = spec_llm(path, k, max_num_batched_tokens=5, enable_prefix_caching=False)
    assert tokens(chunked.generate(PROMPTS, GREEDY)) == [want[tuple(p)] for p in PROMPTS]


def oracle(llm, full: list[int], right):
    """Make the MTP head propose the reference token at position p + 2 where right(p), else a wrong one."""
    real = llm.model.draft_step

    def draft_step(h, nxt, step):
        x, logits = real(h, nxt, step)
        logits = torch.zeros_like(logits)
        for r in range(logits.shape[0]):
            for t, p in enumerate(step.positions[r].tolist()):
                if p + 2 < len(full):
                    tok = full[p + 2] if right(p) else (full[p + 2] + 1) % logits.shape[-1]
                    logits[r, t, tok] = 1.0
        return x, logits

    llm.model.draft_step = draft_step


@pytest.mark.parametrize("k", [1, 4])
def test_oracle_drafts_are_accepted_and_rolled_back(family, k):
    name, path, want = family
    prompt = PROMPTS[3]
    full = prompt + want[tuple(prompt)]
    llm = spec_llm(path, k)
    oracle(llm, full, lambda p: True)
    out = llm.generate([prompt], GREEDY)[0]
    assert out.outputs[0].token_ids == want[tuple(prompt)]
    # every step accepts all k drafts and adds one token of its own, until max_tokens ends it
    steps = -(-(GREEDY.max_tokens - 1) // (k + 1))
    assert llm.stats()["spec_acceptance_rate"] == pytest.approx((GREEDY.max_tokens - 1 - steps) / (k * steps))
    half = spec_llm(path, k)
    oracle(half, full, lambda p: p % 3 != 0)                          # every third draft is wrong
    assert half.generate([prompt], GREEDY)[0].outputs[0].token_ids == want[tuple(prompt)]
    assert 0.2 < half.stats()["spec_acceptance_rate"] < 0.9


def test_speculation_under_preemption(family):
    name, path, want = family
    probe = spec_llm(path, 2, max_model_len=80, max_num_batched_tokens=16)
    tight = spec_llm(path, 2, max_model_len=80, max_num_batched_tokens=16, max_num_seqs=4,
                     cache_bytes=int(1.5 * probe.bytes_per_sequence))
    assert tokens(tight.generate(PROMPTS, GREEDY)) == [want[tuple(p)] for p in PROMPTS]
    assert tight.stats()["num_preemptions"] > 0


def test_bad_speculative_settings(family, tmp_path):
    name, path, want = family
    for bad in ({"method": "eagle"}, {"method": "mtp", "num_tokens": 0}, {"method": "mtp", "k": 2}, "mtp"):
        with pytest.raises(TierlmError, match="speculative"):
            LLM(path, speculative=bad)
    ref, plain = ds.make(tmp_path, DS["v3-qlora-group"])                 # no MTP block in the checkpoint
    with pytest.raises(TierlmError, match="needs a checkpoint with an MTP block"):
        LLM(plain, speculative={"method": "mtp", "num_tokens": 1})
