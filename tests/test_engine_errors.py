"""Bad input to the engine: each bad request gets a clear error while the others are served;
strings go through the checkpoint's tokenizer.json; sampling options behave as documented."""

import json

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")
from test_model_gqa import make  # noqa: E402

from tierlm import LLM, SamplingParams  # noqa: E402
from tierlm.cli import app  # noqa: E402
from tierlm.errors import TierlmError  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ref, path = make("llama", tmp_path_factory.mktemp("ck"))
    return ref, path


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint[1], dtype=torch.float64, max_model_len=48)


def test_bad_requests_fail_alone(llm):
    good = [3, 4, 5, 6]
    outs = llm.generate([good, list(range(1, 60)), [], "text", [1, 500], {"tokens": [1]}, [1, True], [1, 2.0],
                         [7, -3], good], GREEDY)
    errors = [o.outputs[0].error for o in outs]
    assert errors[0] is None and errors[-1] is None
    assert outs[0].outputs[0].token_ids == outs[-1].outputs[0].token_ids and len(outs[0].outputs[0].token_ids) == 5
    assert "max_model_len 48" in errors[1]
    assert errors[2] == "empty prompt"
    assert "no tokenizer.json" in errors[3]
    assert "outside the vocabulary" in errors[4]
    assert "prompt_token_ids" in errors[5]
    assert "a list of token ids" in errors[6] and "a list of token ids" in errors[7]    # bool, float
    assert "token id -3 is outside the vocabulary" in errors[8]
    assert all(o.outputs[0].finish_reason == "error" for o in outs[1:-1])
    assert llm.stats()["blocks_in_use"] == 0


@pytest.mark.parametrize("kw,field", [(dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
                                      (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
                                      (dict(min_p=2), "min_p"), (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"),
                                      (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
                                      (dict(seed="x"), "seed"), (dict(max_tokens=2.5), "max_tokens")])
def test_invalid_sampling_values(kw, field):
    with pytest.raises(TierlmError, match=f"SamplingParams.{field} "):
        SamplingParams(**kw)


def test_request_that_can_never_fit(checkpoint):
    with pytest.raises(TierlmError, match="cache_bytes 1 is too small"):
        LLM(checkpoint[1], dtype=torch.float64, max_model_len=128, cache_bytes=1)
    probe = LLM(checkpoint[1], dtype=torch.float64, max_model_len=128)
    small = LLM(checkpoint[1], dtype=torch.float64, max_model_len=128, cache_bytes=probe.bytes_per_sequence // 4)
    outs = small.generate([[i % 90 + 1 for i in range(99)], [1, 2, 3]], GREEDY)
    assert "can never fit in the cache pools" in outs[0].outputs[0].error
    assert len(outs[1].outputs[0].token_ids) == 5


def test_sampling_is_seeded_and_filters(llm):
    p = [5, 6, 7, 8]
    a = llm.generate([p], SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))[0]
    b = llm.generate([p], SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    greedy = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    top1 = llm.generate([p], SamplingParams(temperature=5.0, top_k=1, seed=3, max_tokens=8, ignore_eos=True))[0]
    assert top1.outputs[0].token_ids == greedy                  # top-k 1 is greedy at any temperature
    nucleus = llm.generate([p], SamplingParams(temperature=5.0, top_p=1e-9, seed=3, max_tokens=8, ignore_eos=True))[0]
    assert nucleus.outputs[0].token_ids == greedy               # the smallest nucleus is the argmax
    many = llm.generate([p], SamplingParams(temperature=1.0, n=3, seed=1, max_tokens=6, ignore_eos=True))[0]
    assert [o.index for o in many.outputs] == [0, 1, 2] and len({tuple(o.token_ids) for o in many.outputs}) > 1
    # greedy rows are sampled together, seeded rows one by one: a batch mixing them, in either
    # order, gives each request what it gets alone
    mixed = [SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    for params in (mixed, mixed[::-1]):
        outs = llm.generate([p, p], params)
        want = [a.outputs[0].token_ids if q.seed == 7 else greedy for q in params]
        assert [o.outputs[0].token_ids for o in outs] == want


def test_stop_tokens_and_eos(checkpoint, llm):
    p = [5, 6, 7, 8]
    greedy = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    stop = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[greedy[2]]))[0].outputs[0]
    assert stop.token_ids == greedy[:greedy.index(greedy[2]) + 1] and stop.finish_reason == "stop"
    cfg = json.loads((checkpoint[1] / "generation_config.json").read_text()) \
        if (checkpoint[1] / "generation_config.json").exists() else {}
    (checkpoint[1] / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": greedy[1]}))
    try:
        eos = LLM(checkpoint[1], dtype=torch.float64, max_model_len=48)
        out = eos.generate([p], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
        assert out.token_ids == greedy[:greedy.index(greedy[1]) + 1] and out.finish_reason == "stop"
    finally:
        (checkpoint[1] / "generation_config.json").write_text(json.dumps(cfg))


def test_string_prompts_with_a_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    ref, path = make("llama", tmp_path_factory.mktemp("tok"))
    words = [f"w{i}" for i in range(97)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")      # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    llm = LLM(path, dtype=torch.float64)
    ids = [5, 17, 42]
    by_ids = llm.generate([ids], GREEDY)[0].outputs[0]
    by_text = llm.generate(["w5 w17 w42"], GREEDY)[0]
    assert by_text.prompt_token_ids == ids and by_text.outputs[0].token_ids == by_ids.token_ids
    assert by_text.outputs[0].text == " ".join(words[t] for t in by_ids.token_ids)
    third = words[by_ids.token_ids[2]]
    cut = llm.generate(["w5 w17 w42"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, stop=[third]))[0]
    assert cut.outputs[0].finish_reason == "stop" and third not in cut.outputs[0].text
    streamed = [o.outputs[0].token_ids for o in llm.generate_stream("w5 w17 w42", GREEDY)]
    assert streamed[-1] == by_ids.token_ids and len(streamed) == 5          # one update per token


@pytest.mark.parametrize("args,msg", [(["--prompt", "x"], "no tokenizer.json"), ([], "exactly one of"),
                                      (["--prompt-ids", "1,a"], "comma-separated integers"),
                                      (["--prompt-ids", "1", "--top-p", "0"], "top_p"),
                                      (["--prompt-ids", "1", "--device", "cuda"], "cuda")])
def test_cli_errors_are_one_line(checkpoint, args, msg):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = CliRunner().invoke(app, ["generate", str(checkpoint[1]), *args])
    assert out.exit_code == 2 and msg in out.output and "Traceback" not in out.output


def test_cli_generate_and_bench(checkpoint):
    out = CliRunner().invoke(app, ["generate", str(checkpoint[1]), "--prompt-ids", "1,2,3", "-n", "4", "--json",
                                   "--dtype", "fp64"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert len(res["token_ids"]) == 4 and res["finish_reason"] == "length" and res["cache_bytes"] > 0
    out = CliRunner().invoke(app, ["bench", "decode", str(checkpoint[1]), "--batch", "2", "--context", "20",
                                   "--tokens", "3", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["tokens_per_s"] > 0 and res["steps"] == 3 and res["cache_bytes_per_seq"] > 0


def test_lost_blocks_are_an_error_not_a_hang(checkpoint):
    """If blocks were ever lost (held by no request, a bug), a request that cannot get any
    must fail with a clear error instead of the engine waiting forever; given back, it runs."""
    llm = LLM(checkpoint[1], dtype=torch.float64, max_model_len=48)
    pool = llm.manager.bp[0]
    lost = [pool.allocate() for _ in range(pool.num_free)]
    llm.add_request([3, 4, 5, 6], GREEDY)
    with pytest.raises(TierlmError, match="cannot make progress"):
        llm.step()
    for b in lost:
        pool.release(b)
    while llm.scheduler.has_work():
        llm.step()
    assert llm.stats()["blocks_in_use"] == 0
