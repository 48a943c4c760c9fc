"""tierlm.train: the pre-training loop (Muon split, MTP loss), the saved checkpoint against
transformers, GRPO's arithmetic against hand computation, a short GRPO run, and `tierlm demo`."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from tierlm import LLM, SamplingParams  # noqa: E402
from tierlm.cli import app  # noqa: E402
from tierlm.errors import TierlmError  # noqa: E402
from tierlm.train import demo  # noqa: E402
from tierlm.train.checkpoint import save_checkpoint  # noqa: E402
from tierlm.train.data import Batches, encode, split, stdlib_files, train_tokenizer  # noqa: E402
from tierlm.train.grpo import (GRPOConfig, assignment_prompts, group_advantages, grpo_loss,  # noqa: E402
                               mean_reward, python_reward, train_grpo)
from tierlm.train.trainer import muon_split, train  # noqa: E402

SMALL = demo.DemoSettings(vocab=512, steps=60, batch=8, seq=128, corpus_bytes=1 << 20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo architecture with a 512-token vocabulary, trained 60 steps on 1 MB of stdlib."""
    train_texts, _ = split(stdlib_files(SMALL.corpus_bytes))
    tok = train_tokenizer(train_texts, SMALL.vocab)
    config = demo.demo_config(SMALL)
    model = demo.new_model(config, SMALL.seed)
    log = train(model, Batches(encode(tok, train_texts), SMALL.batch, SMALL.seq).next, SMALL.steps, progress=False)
    path = save_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", model, config, tok,
                           chat_template=demo.CHAT_TEMPLATE)
    return path, log, model, train_texts


def test_losses_fall(trained):
    _, log, _, _ = trained
    first, last = log.loss[0], sum(log.loss[-5:]) / 5
    mtp_first, mtp_last = log.mtp_loss[0], sum(log.mtp_loss[-5:]) / 5
    print(f"loss {first:.3f} -> {last:.3f}, MTP loss {mtp_first:.3f} -> {mtp_last:.3f}, {log.tokens_per_s:.0f} tok/s")
    assert first == pytest.approx(math.log(SMALL.vocab), abs=0.3)     # N(0, 0.02) init: near-uniform predictions
    assert last < first - 1.5
    assert mtp_last < mtp_first - 1.5


def test_muon_split_is_pinned(trained):
    _, _, model, _ = trained
    muon, adamw = muon_split(model)
    params = dict(model.named_parameters())
    assert set(muon) | set(adamw) == set(params) and not set(muon) & set(adamw)
    assert all(params[n].dim() == 2 for n in muon)
    want_muon = ["model.layers.0.attn.wq_a.weight", "model.layers.0.attn.wq_b.weight", "model.layers.0.attn.wkv.weight",
                 "model.layers.0.attn.wo_a.weight", "model.layers.0.attn.wo_b.weight",
                 "model.layers.1.attn.compressor.wkv.weight", "model.layers.1.attn.compressor.wgate.weight",
                 "model.layers.1.attn.indexer.wq_b.weight", "model.layers.1.attn.indexer.compressor.wkv.weight",
                 "model.layers.2.ffn.experts.7.w2.weight", "model.layers.3.ffn.shared_experts.w3.weight",
                 "mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.attn.wq_a.weight", "mtp.0.ffn.experts.0.w1.weight"]
    want_adamw = ["model.embed_tokens.weight", "head.weight", "model.norm.weight", "model.layers.0.attn_norm.weight",
                  "model.layers.0.attn.q_norm.weight", "model.layers.0.attn.attn_sink", "model.layers.0.ffn.gate.weight",
                  "model.layers.2.ffn.gate.bias", "model.layers.1.attn.indexer.weights_proj.weight",
                  "model.layers.1.attn.compressor.ape", "model.layers.0.hc_attn_fn", "model.layers.0.hc_ffn_base",
                  "model.layers.0.hc_attn_scale", "model.hc_head.hc_fn", "mtp.0.hc_head_fn", "mtp.0.enorm.weight"]
    assert set(want_muon) <= set(muon)
    assert set(want_adamw) <= set(adamw)
    # every other 2-D tensor Muon does not take is an embedding, the head, a router or mHC gate, an ape table
    others = [n for n in adamw if params[n].dim() == 2]
    assert all(n.endswith(("embed_tokens.weight", "head.weight", "gate.weight", "weights_proj.weight", "_fn", ".ape"))
               for n in others), others


def test_checkpoint_same_greedy_in_tierlm_and_transformers(trained):
    path, _, _, _ = trained
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    hf_tok = AutoTokenizer.from_pretrained(path)
    llm = LLM(path, dtype=torch.float64, reference="transformers", max_model_len=256)
    prompts = ["def fibonacci(n):\n", "import os\n\nclass Stack:\n    def push(self, x):\n"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == out.prompt_token_ids
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()
        assert out.outputs[0].text == hf_tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    # the demo's chat template (a turn is code to continue) renders as transformers renders it
    from tierlm.serve.chat import ChatTemplate
    messages = [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "    return x"},
                {"role": "user", "content": "def g("}]
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.load(path).render(messages) == want == "def f(x):\n    return x\ndef g("


def test_group_prompt_is_shared_through_the_prefix_cache(trained):
    path, _, _, _ = trained
    llm = LLM(path, dtype=torch.float32, reference="transformers", max_model_len=256)
    prompt = list(range(10, 50))                     # 40 tokens: 2 full blocks of 16 before the last token
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=4, temperature=1.0, max_tokens=4, seed=0))
    assert llm.stats()["prefix_hit_tokens"] == 3 * 32    # the first sample computes, the other three hit
    llm.reset_prefix_cache()
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2))
    assert llm.stats()["prefix_hit_tokens"] == 3 * 32    # nothing cached survived the reset
    llm.add_request(prompt, SamplingParams(max_tokens=2))
    with pytest.raises(TierlmError, match="idle"):
        llm.reset_prefix_cache()


def test_python_reward():
    assert python_reward("def f(x):\n    y =", " x + 1") == pytest.approx(1 + 0.1 * 5 / 40)
    assert python_reward("def f(x):\n    y =", " (x +") == 0.0
    assert python_reward("x =", " " + "a" * 100) == pytest.approx(1.1)            # the length term saturates
    assert python_reward("x =", "") == 0.0


def test_group_advantages_by_hand():
    rewards = [[1.0, 0.0, 1.0, 0.5], [0.2, 0.2, 0.2, 0.2]]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64))
    # group 1: mean 0.625; squared deviations 0.140625, 0.390625, 0.140625, 0.015625 sum 0.6875;
    # sample std sqrt(0.6875 / 3) = 0.478714...; group 2: all equal -> 0
    std = math.sqrt(0.6875 / 3)
    want = [[(r - 0.625) / (std + 1e-4) for r in rewards[0]], [0.0] * 4]
    assert got.flatten().tolist() == pytest.approx(want[0] + want[1], abs=1e-12)
    with pytest.raises(TierlmError):
        group_advantages(torch.tensor([1.0, 2.0]))


def test_grpo_loss_by_hand():
    # two completions, three token slots; the second has only two tokens
    logp = [[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]]
    old = [[-1.1, -1.5, -0.5], [-0.3, -1.0, 0.0]]
    ref = [[-0.9, -2.2, -0.7], [-0.4, -1.2, 0.0]]
    adv, mask = [1.5, -0.8], [[1, 1, 1], [1, 1, 0]]
    clip, beta = 0.2, 0.04
    per_seq = []
    for i in range(2):
        terms = []
        for t in range(3):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - clip), 1 + clip)
            surrogate = min(ratio * adv[i], clipped * adv[i])
            d = ref[i][t] - logp[i][t]
            kl = math.exp(d) - d - 1
            terms.append(surrogate - beta * kl)
        per_seq.append(sum(terms) / len(terms))
    want = -sum(per_seq) / 2
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = grpo_loss(t(logp), t(old), t(ref), t(adv), t(mask), clip, beta)
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_grouped_logprobs_equal_the_padded_batch(trained):
    """Each prompt's group is scored at its own width: the same log-probs as the whole batch
    padded to its longest row, at every completion token."""
    from types import SimpleNamespace as NS
    from tierlm.train.grpo import _batch, _logprobs, token_logprobs
    _, _, model, _ = trained
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()   # noqa: E731
    outs = [NS(prompt_token_ids=ids(p), outputs=[NS(token_ids=ids(c)) for c in cs])
            for p, cs in ((40, (5, 0, 9)), (7, (3, 12, 1)), (90, (2, 6, 4)))]
    batch, mask, groups = _batch(outs)
    assert groups == [(0, 3, 49), (3, 6, 19), (6, 9, 96)] and batch.shape == (9, 96)
    with torch.no_grad():
        got, want = _logprobs(model, batch, groups), token_logprobs(model, batch)
    assert got.shape == want.shape == mask.shape
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)
    assert (got[3:6, 18:] == 0).all()                           # past the short group's width


def test_grpo_raises_held_out_reward(trained):
    path, _, _, train_texts = trained
    prompts = assignment_prompts(train_texts, limit=32)
    held = assignment_prompts(split(stdlib_files(4 << 20))[1], limit=16)   # files never trained on
    assert len(prompts) == 32 and len(held) == 16
    llm = LLM(path, dtype=torch.float32, reference="transformers", max_model_len=1024, max_num_seqs=64)
    cfg = GRPOConfig()
    before = mean_reward(llm, held, cfg)
    log = train_grpo(llm, prompts, 6, cfg, seed=0, progress=False)
    after = mean_reward(llm, held, cfg)
    print(f"held-out reward {before:.3f} -> {after:.3f}; per step {[round(r, 3) for r in log.reward_mean]}; "
          f"rollouts {log.rollout_tokens_per_s:.0f} tok/s")
    assert after > before + 0.15


def test_demo_cli_trains_serves_and_reuses(tmp_path):
    out = tmp_path / "demo"
    runner = CliRunner()
    res = runner.invoke(app, ["demo", "--steps", "2", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v4"
    serve = got["serve"]
    assert serve["mtp"]["greedy_identical"] and 0 <= serve["mtp"]["acceptance_rate"] <= 1
    cache = serve["cache"]["32768"]
    assert cache["total"] == sum(cache["by_stream"].values())
    assert cache["gqa_same_width"] > 5 * cache["total"]
    assert set(cache["by_stream"]) == {"window", "compressed", "compressor_state", "indexer", "indexer_compressor_state"}
    again = runner.invoke(app, ["demo", "--steps", "2", "--out", str(out)])
    assert again.exit_code == 0 and "reusing the demo model" in again.output


def test_demo_cli_bad_input():
    res = CliRunner().invoke(app, ["demo", "--steps", "0"])
    assert res.exit_code == 2 and "--steps must be >= 1" in res.output
