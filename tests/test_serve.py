"""`tierlm serve`: the OpenAI-compatible app (FastAPI TestClient), a live uvicorn for disconnects,
and `tierlm serve` in a subprocess driven by the `openai` client and stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
transformers = pytest.importorskip("transformers")
import httpx  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import tierlm  # noqa: E402
from tierlm import LLM, SamplingParams  # noqa: E402
from tierlm.serve import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(120)]
SPECIAL = {"<s>": 120, "</s>": 121, "<|system|>": 122, "<|user|>": 123, "<|assistant|>": 124}
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"


def make_checkpoint(path: Path, template: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=120, eos_token_id=121)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({**{w: i for i, w in enumerate(WORDS)}, **SPECIAL}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")       # joins words with spaces
    tok.add_special_tokens(list(SPECIAL))
    tok.save(str(path / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "w0"}
    if template:
        tc["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    return path


def words(ids) -> str:
    return " ".join(WORDS[i] for i in ids)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def ref(ckpt):
    """A second engine over the same checkpoint: what LLM.generate returns."""
    return LLM(ckpt, dtype=torch.float32, max_model_len=256, max_num_seqs=4)


@pytest.fixture(scope="module")
def server(ckpt):
    llm = LLM(ckpt, dtype=torch.float32, max_model_len=256, max_num_seqs=4)
    app = create_app(llm, model_name=MODEL, api_key=KEY, max_queue=8, max_request_bytes=64 * 1024,
                     max_tokens_limit=200)
    with TestClient(app) as client:
        client.headers.update(AUTH)
        yield client, app


@pytest.fixture
def client(server):
    return server[0]


def engine_stats(app) -> dict:
    return app.state.engine.call(lambda llm: llm.stats()).result(10)


def sse(lines) -> list:
    """Parse `data: ...` lines; the last must be [DONE]."""
    events = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


GREEDY = dict(temperature=0, ignore_eos=True)


# ---------------------------------------------------------------------------------------------- completions
def test_completion_greedy_matches_generate(client, ref):
    ids = [5, 17, 42, 8, 9]
    want = ref.generate([ids], SamplingParams(max_tokens=12, **GREEDY))[0].outputs[0]
    for prompt in (ids, words(ids)):
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                                 "return_token_ids": True, **GREEDY})
        assert r.status_code == 200, r.text
        body = r.json()
        c = body["choices"][0]
        assert c["token_ids"] == want.token_ids and c["prompt_token_ids"] == ids
        assert c["text"] == want.text == words(want.token_ids) and c["finish_reason"] == "length"
        assert body["object"] == "text_completion" and body["model"] == MODEL
        u = body["usage"]
        assert u["prompt_tokens"] == 5 and u["completion_tokens"] == 12 and u["total_tokens"] == 17
        assert u["prompt_tokens_details"]["cached_tokens"] == u["prompt_cache_hit_tokens"]
        assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == 5


def test_batch_prompts_and_n(client, ref):
    prompts = [[3, 4, 5], [6, 7, 8, 9]]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompts, "max_tokens": 6, "n": 2,
                                             "return_token_ids": True, **GREEDY})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        want = ref.generate([prompt], SamplingParams(max_tokens=6, **GREEDY))[0].outputs[0].token_ids
        assert choices[2 * p]["token_ids"] == want and choices[2 * p + 1]["token_ids"] == want
    assert r.json()["usage"]["completion_tokens"] == 24 and r.json()["usage"]["prompt_tokens"] == 7


def test_seeded_sampling_matches_generate(client, ref):
    params = dict(temperature=1.0, top_p=0.9, top_k=20, min_p=0.01, seed=11, n=2, max_tokens=8, ignore_eos=True)
    want = ref.generate([[1, 2, 3]], SamplingParams(**params))[0]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "return_token_ids": True,
                                             **params})
    assert r.status_code == 200, r.text
    assert [c["token_ids"] for c in r.json()["choices"]] == [o.token_ids for o in want.outputs]


def test_stop_strings_and_stop_token_ids(client, ref):
    ids = [10, 11, 12]
    greedy = ref.generate([ids], SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0].token_ids
    third = WORDS[greedy[2]]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 8, "stop": third, **GREEDY})
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "stop" and third not in c["text"].split()
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 8,
                                             "stop_token_ids": [greedy[1]], "return_token_ids": True, **GREEDY})
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "stop" and c["token_ids"] == greedy[:greedy.index(greedy[1]) + 1]


def test_stream_concatenates_to_the_full_text(client):
    ids = [20, 21, 22, 23]
    full = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 10,
                                                "return_token_ids": True, **GREEDY}).json()
    with client.stream("POST", "/v1/completions",
                       json={"model": MODEL, "prompt": ids, "max_tokens": 10, "stream": True, "return_token_ids": True,
                             "stream_options": {"include_usage": True}, **GREEDY}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse(r.iter_lines())
    usage_only = chunks.pop()
    assert usage_only["choices"] == [] and usage_only["usage"] == full["usage"]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == full["choices"][0]["text"]
    assert sum((ch["choices"][0]["token_ids"] for ch in chunks), []) == full["choices"][0]["token_ids"]
    # one chunk per engine step that made tokens: how many depends on how fast the client reads
    assert all(ch["choices"][0]["token_ids"] for ch in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])
    assert chunks[-1]["usage"] == full["usage"]


def test_stream_n_and_batch(client):
    body = {"model": MODEL, "prompt": [[40, 41], [42, 43, 44]], "max_tokens": 5, "n": 2, "temperature": 0.8,
            "seed": 3, "ignore_eos": True}
    full = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = sse(r.iter_lines())
    texts, reasons = {}, {}
    for ch in chunks:
        for c in ch["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    assert texts == {c["index"]: c["text"] for c in full["choices"]} and len(texts) == 4
    assert set(reasons.values()) == {"length"} and chunks[-1]["usage"] == full["usage"]


def test_stream_holds_back_a_partial_stop_string(client, ref):
    ids = [30, 31, 32]
    greedy = ref.generate([ids], SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0].token_ids
    stop = words(greedy[3:5])                  # spans two tokens: "wA wB"
    body = {"model": MODEL, "prompt": ids, "max_tokens": 8, "stop": [stop], **GREEDY}
    full = client.post("/v1/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = sse(r.iter_lines())
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == full["text"]
    assert full["text"] == words(greedy[:3]) + " "         # cut right before the stop string
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------- chat
MESSAGES = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"},
            {"role": "assistant", "content": "w6"}, {"role": "user", "content": [{"type": "text", "text": "w7 w8"}]}]


def test_chat_template_matches_transformers(client, ref, ckpt):
    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    plain = [{**m, "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
             for m in MESSAGES]
    want_ids = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    if not isinstance(want_ids, list):
        want_ids = want_ids["input_ids"]
    assert want_ids[0] == SPECIAL["<s>"] and want_ids[-1] == SPECIAL["<|assistant|>"]
    want = ref.generate([want_ids], SamplingParams(max_tokens=7, **GREEDY))[0].outputs[0]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 7,
                                                  "return_token_ids": True, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    c = body["choices"][0]
    assert c["prompt_token_ids"] == want_ids and c["token_ids"] == want.token_ids
    assert c["message"] == {"role": "assistant", "content": want.text} and body["object"] == "chat.completion"
    assert body["usage"]["prompt_tokens"] == len(want_ids)

    with client.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 7,
                                                             "stream": True, **GREEDY}) as r:
        chunks = sse(r.iter_lines())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == body["usage"]


def test_chat_without_template_is_a_clear_400(tmp_path):
    path = make_checkpoint(tmp_path / "plain", template=False)
    with TestClient(create_app(LLM(path, dtype=torch.float32, max_model_len=64), model_name="plain")) as c:
        r = c.post("/v1/chat/completions", json={"model": "plain", "messages": [{"role": "user", "content": "w1"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        assert "chat template" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "plain", "prompt": "w1 w2", "max_tokens": 2})
        assert r.status_code == 200                         # completions still work, and no key is needed


# ---------------------------------------------------------------------------------------------- usage, cache
def test_repeated_prompt_reports_cached_tokens(client):
    ids = [(7 * i) % 110 + 1 for i in range(40)]
    body = {"model": MODEL, "prompt": ids, "max_tokens": 3, **GREEDY}
    first = client.post("/v1/completions", json=body).json()["usage"]
    second = client.post("/v1/completions", json=body).json()["usage"]
    assert first["prompt_tokens"] == second["prompt_tokens"] == 40
    assert second["prompt_tokens_details"]["cached_tokens"] == 32          # two full 16-token blocks
    assert second["prompt_cache_hit_tokens"] == 32 and second["prompt_cache_miss_tokens"] == 8
    assert first["prompt_cache_hit_tokens"] == 0
    chat = {"model": MODEL, "messages": [{"role": "user", "content": words(ids)}], "max_tokens": 2, **GREEDY}
    client.post("/v1/chat/completions", json=chat)
    again = client.post("/v1/chat/completions", json=chat).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] == 32 and again["prompt_tokens"] == 43


# ---------------------------------------------------------------------------------------------- bad requests
def err(r, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if param is not None:
        assert e["param"] == param, e
    if code is not None:
        assert e["code"] == code, e
    return e


def test_api_key(server):
    client, _ = server
    raw = TestClient(client.app)
    e = err(raw.get("/v1/models"), 401, code="invalid_api_key")
    assert "API key" in e["message"]
    err(raw.post("/v1/completions", json={"model": MODEL, "prompt": "w1"}, headers={"Authorization": "Bearer no"}), 401)
    err(raw.post("/v1/plan", json={"models": ["deepseek-v3"]}, headers={"Authorization": KEY}), 401)
    assert raw.get("/health").json() == {"status": "ok", "model": MODEL}
    assert raw.get("/metrics").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 256


@pytest.mark.parametrize("body,param,code", [
    ({"model": MODEL, "prompt": "w1", "max_tokens": -1}, "max_tokens", "greater_than_equal"),
    ({"model": MODEL, "prompt": "w1", "max_tokens": "5"}, "max_tokens", "int_type"),
    ({"model": MODEL, "prompt": "w1", "max_tokens": 5.5}, "max_tokens", "int_type"),
    ({"model": MODEL, "prompt": "w1", "bogus": 1}, "bogus", "extra_forbidden"),
    ({"model": MODEL, "prompt": "w1", "temperature": -1}, "temperature", "greater_than_equal"),
    ({"model": MODEL, "prompt": "w1", "top_p": 0}, "top_p", "greater_than"),
    ({"model": MODEL, "prompt": "w1", "stream": "yes"}, "stream", "bool_type"),
    ({"model": MODEL, "prompt": "w1", "n": 0}, "n", "greater_than_equal"),
    ({"prompt": "w1"}, "model", "missing"),
    ({"model": MODEL, "prompt": {"a": 1}}, "prompt", None),
    ({"model": MODEL, "prompt": "w1", "logprobs": 2}, "logprobs", "unsupported_parameter"),
    ({"model": MODEL, "prompt": "w1", "presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"model": MODEL, "prompt": "w1", "max_tokens": 201}, "max_tokens", "max_tokens_too_large"),
    ({"model": MODEL, "prompt": []}, "prompt", "invalid_value"),
    ({"model": MODEL, "prompt": [1, 500]}, "prompt", "invalid_prompt"),
    ({"model": MODEL, "prompt": [[1, 2]] * 13}, "prompt", "too_many_prompts"),
    ({"model": MODEL, "prompt": list(range(1, 100)) * 3}, "prompt", "invalid_prompt"),
])
def test_bad_completion_requests(client, body, param, code):
    e = err(client.post("/v1/completions", json=body), 400, param, code)
    assert "Traceback" not in e["message"]


def test_bad_bodies(client):
    e = err(client.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type":
                                                                                          "application/json"}), 400)
    assert e["code"] == "json_invalid" and "malformed JSON" in e["message"]
    err(client.post("/v1/completions", json=[1, 2]), 400)
    e = err(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "w1"}), 404, "model", "model_not_found")
    assert "'tiny'" in e["message"]
    err(client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}),
        400, "messages.0.role")
    err(client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400, "messages")
    err(client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "tools": [{"type": "x"}]}),
        400, "tools")
    err(client.post("/v1/completions", json={"model": MODEL, "prompt": "w1 " * 30000}), 413, code="request_too_large")
    err(client.get("/v1/nothing"), 404)
    err(client.get("/v1/completions"), 405)
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "w1", "max_tokens": 1}).status_code == 200


def test_engine_error_fails_only_that_request(server, ref):
    client, app = server
    llm = app.state.engine.llm
    real = llm.step
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device fault")
        return real()
    llm.step = flaky
    try:
        e = err(client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 3}), 500)
        assert "simulated device fault" in e["message"] and e["code"] == "engine_error"
    finally:
        llm.step = real
    want = ref.generate([[1, 2]], SamplingParams(max_tokens=3, **GREEDY))[0].outputs[0].token_ids
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 3,
                                             "return_token_ids": True, **GREEDY})
    assert r.json()["choices"][0]["token_ids"] == want
    s = engine_stats(app)
    assert s["num_running"] == 0 and s["blocks_in_use"] == 0


def test_queue_full_gets_429(ckpt):
    llm = LLM(ckpt, dtype=torch.float32, max_model_len=256, max_num_seqs=1)
    with TestClient(create_app(llm, model_name=MODEL, max_queue=1)) as c:
        body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 200, "stream": True, **GREEDY}
        with c.stream("POST", "/v1/completions", json=body) as a, c.stream("POST", "/v1/completions", json=body) as b:
            assert a.status_code == 200 and b.status_code == 200
            e = err(c.post("/v1/completions", json={**body, "stream": False}), 429, code="queue_full")
            assert "server busy" in e["message"] and "limit 2" in e["message"]
        for _ in range(300):                # the two streams are aborted or finish
            if c.app.state.engine.pending == 0:
                break
            time.sleep(0.05)
        assert c.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2}).status_code == 200
        assert "tierlm_requests_rejected_total{reason=\"queue_full\"} 1" in c.get("/metrics").text


def test_shutdown_ends_unfinished_streams_with_an_error_event(ckpt):
    llm = LLM(ckpt, dtype=torch.float32, max_model_len=256, max_num_seqs=2)
    step = llm.step
    llm.step = lambda: (time.sleep(0.01), step())[1]
    app = create_app(llm, model_name=MODEL)
    with TestClient(app) as c:
        body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 190, "stream": True, **GREEDY}
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data: "))
            app.state.engine.drain(0.0)                 # what SIGTERM does, with --shutdown-grace 0
            events = sse([first, *lines])
        assert events[-1]["error"]["code"] == "engine_error" and "shutting down" in events[-1]["error"]["message"]
        assert all("choices" in e for e in events[:-1])
        err(c.post("/v1/completions", json={**body, "stream": False}), 503, code="shutting_down")
        assert c.get("/health").status_code == 503
        for _ in range(100):
            if not app.state.engine._thread.is_alive():
                break
            time.sleep(0.05)
        assert app.state.engine.pending == 0 and app.state.engine.stats["blocks_in_use"] == 0


# ---------------------------------------------------------------------------------------------- metrics, plan
def test_metrics_are_prometheus_text(client):
    client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2})
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    text = text.text
    line = re.compile(r'^(# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+|[a-zA-Z_:][a-zA-Z0-9_:]*'
                      r'(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*",?)*\})? (-?[0-9.e+-]+|NaN|\+Inf|-Inf))$')
    for ln in text.strip().split("\n"):
        assert line.match(ln), ln
    values = {}
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        families = None
    else:
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for f in families.values():
            for s in f.samples:
                values[(s.name, tuple(sorted(s.labels.items())))] = s.value
        assert families["tierlm_request_latency_seconds"].type == "histogram"
        assert families["tierlm_prefix_hit_tokens"].type == "counter"
    for name in ("tierlm_num_requests_running", "tierlm_num_requests_waiting", "tierlm_generation_tokens_total",
                 "tierlm_cache_bytes", "tierlm_prefix_hit_tokens_total", "tierlm_kv_reloads_total",
                 "tierlm_kv_recomputes_total", "tierlm_request_latency_seconds_bucket",
                 "tierlm_time_to_first_token_seconds_count", "tierlm_generation_tokens_per_second"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    for tier in ("device", "host", "disk"):
        assert f'tierlm_prefix_hit_tokens_total{{tier="{tier}"}}' in text
    if values:
        assert values[("tierlm_generation_tokens_total", ())] >= 2
        assert values[("tierlm_num_requests_running", ())] == 0
        assert values[("tierlm_request_latency_seconds_count", ())] >= 1


def test_plan_endpoint_matches_tierlm_plan(client):
    body = {"models": ["deepseek-v4-pro", "Qwen/Qwen3-235B-A22B"], "context": "128k,1M", "kv_dtype": "fp8",
            "indexer_dtype": "bf16", "batch": 2}
    r = client.post("/v1/plan", json=body)
    assert r.status_code == 200, r.text
    want = [tierlm.plan(m, c, kv_dtype="fp8", indexer_dtype="bf16", batch=2).data
            for m in body["models"] for c in (128000, 1000000)]
    assert r.json() == json.loads(json.dumps({"plans": want}))
    from typer.testing import CliRunner
    from tierlm.cli import app
    cli = CliRunner().invoke(app, ["plan", "deepseek-v4-pro", "Qwen/Qwen3-235B-A22B", "--context", "128k,1M",
                                   "--kv-dtype", "fp8", "--batch", "2", "--json"])
    assert json.loads(cli.output) == r.json()
    served = client.post("/v1/plan", json={"models": [MODEL], "context": 200, "layout": "tierlm"}).json()
    assert served["plans"][0]["context"] == 200
    cfg = client.post("/v1/plan", json={"models": [tierlm.spec.registry.resolve("deepseek-v3").config],
                                         "context": [4096]})
    assert cfg.status_code == 200, cfg.text
    assert cfg.json()["plans"][0]["kv_cache"] == tierlm.plan("deepseek-v3", 4096).data["kv_cache"]
    e = err(client.post("/v1/plan", json={"models": ["/etc/passwd"]}), 400)
    assert "unknown model" in e["message"]
    err(client.post("/v1/plan", json={"models": ["deepseek-v3"], "hardware": "/tmp/x.json"}), 400)
    err(client.post("/v1/plan", json={"models": ["deepseek-v3"], "kv_dtype": "fp3"}), 400)
    err(client.post("/v1/plan", json={"models": ["deepseek-v3"], "context": "lots"}), 400)



def test_plan_endpoint_unknown_model_suggests_ids():
    c = TestClient(create_app(None))
    e = err(c.post("/v1/plan", json={"models": ["DeepSeek-V3.3"]}), 400)
    assert e["message"].startswith("unknown model 'DeepSeek-V3.3': not a registry id or alias, nor the served "
                                   "model's name. Did you mean 'deepseek-v3.2'")
    assert "config.json object" in e["message"] and "path" not in e["message"]   # the server refuses paths
    assert "Did you mean 'Qwen/Qwen3-8B'" in err(c.post("/v1/plan", json={"models": ["QWEN/QWEN3-8C"]}), 400)["message"]
    assert "Did you mean" not in err(c.post("/v1/plan", json={"models": ["zzzz"]}), 400)["message"]

def test_planner_only_imports_no_torch():
    code = ("import sys; from fastapi.testclient import TestClient; from tierlm.serve import create_app\n"
            "c = TestClient(create_app(None))\n"
            "r = c.post('/v1/plan', json={'models': ['deepseek-v3'], 'context': 4096}); assert r.status_code == 200\n"
            "assert c.get('/v1/models').json()['data'] == []\n"
            "assert c.post('/v1/completions', json={'model': 'x', 'prompt': 'a'}).status_code == 404\n"
            "assert 'tierlm_prompt_tokens_total 0' in c.get('/metrics').text\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "import tierlm.cli; assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    code = "import sys, tierlm.cli; assert not {'fastapi', 'uvicorn', 'torch', 'jinja2'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------- live servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_disconnect_mid_stream_aborts(ckpt):
    """A live uvicorn (TestClient cannot disconnect): the request is aborted, its blocks freed."""
    import uvicorn
    llm = LLM(ckpt, dtype=torch.float32, max_model_len=256, max_num_seqs=2)
    step = llm.step
    llm.step = lambda: (time.sleep(0.01), step())[1]       # 190 tokens take > 2 s
    app = create_app(llm, model_name=MODEL)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        body = {"model": MODEL, "prompt": list(range(1, 60)), "max_tokens": 190, "stream": True, **GREEDY}
        for kind in ("stream", "plain"):
            with httpx.Client(base_url=url, timeout=30) as h:
                if kind == "stream":
                    with h.stream("POST", "/v1/completions", json=body) as r:
                        got = 0
                        for ln in r.iter_lines():
                            got += ln.startswith("data: ")
                            if got == 3:
                                break
                else:                                      # a non-streaming request whose client times out
                    with pytest.raises(httpx.ReadTimeout):
                        h.post("/v1/completions", json={**body, "stream": False}, timeout=0.5)
            for _ in range(100):
                s = engine_stats(app)
                if app.state.engine.pending == 0 and s["num_running"] == 0:
                    break
                time.sleep(0.05)
            assert app.state.engine.pending == 0, kind
            assert s["num_running"] == 0 and s["num_waiting"] == 0 and s["blocks_in_use"] == 0, (kind, s)
            assert app.state.metrics.generation_tokens == 0, kind    # nothing ran to completion
        r = httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_concurrent_streaming_clients(ckpt):
    """16 streaming clients x 2 requests, shared prefixes, mixed lengths, through a live uvicorn:
    every stream equals the engine's own greedy output, nothing fails, nothing stays allocated."""
    import concurrent.futures
    import uvicorn
    kw = dict(dtype=torch.float64, max_model_len=256, max_num_seqs=8)
    shared = [(3 * i) % 110 + 1 for i in range(33)]
    prompts = [shared[: 5 + (k * 7) % 29] + [k % 100 + 1, (k * 13) % 100 + 1] for k in range(32)]
    base = LLM(ckpt, **kw)
    want = [o.outputs[0].token_ids for o in base.generate(prompts, SamplingParams(max_tokens=6, **GREEDY))]
    app = create_app(LLM(ckpt, **kw), model_name=MODEL, max_queue=32)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

        def client(c: int) -> list:
            got = []
            with httpx.Client(base_url=url, timeout=60) as h:
                for k in (c, c + 16):
                    body = {"model": MODEL, "prompt": prompts[k], "max_tokens": 6, "stream": True,
                            "return_token_ids": True, **GREEDY}
                    with h.stream("POST", "/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        chunks = sse(r.iter_lines())
                    got.append((k, sum((ch["choices"][0]["token_ids"] for ch in chunks), []),
                                chunks[-1]["usage"]))
            return got

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = [x for f in [pool.submit(client, c) for c in range(16)] for x in f.result()]
        assert sorted(k for k, _, _ in results) == list(range(32))
        for k, ids, usage in results:
            assert ids == want[k], k
            assert usage["prompt_tokens"] == len(prompts[k]) and usage["completion_tokens"] == 6
        assert sum(u["prompt_cache_hit_tokens"] for _, _, u in results) > 0       # the shared prefix was reused
        s = engine_stats(app)
        assert s["num_running"] == 0 and s["blocks_in_use"] == 0 and app.state.engine.pending == 0
    finally:
        server.should_exit = True
        thread.join(30)


def test_tierlm_serve_subprocess_openai_client_and_sigterm(ckpt, tmp_path, ref):
    port = free_port()
    exe = shutil.which("tierlm", path=str(Path(sys.executable).parent)) or "tierlm"
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([exe, "serve", str(ckpt), "--port", str(port), "--api-key", KEY, "--dtype", "fp32",
                             "--max-model-len", "256", "--served-model-name", MODEL, "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        ids = [5, 17, 42, 8]
        want = ref.generate([ids], SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0]
        try:
            import openai
        except ImportError:
            openai = None
        if openai is not None:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
            c = client.completions.create(model=MODEL, prompt=words(ids), max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
            assert c.choices[0].text == want.text and c.choices[0].token_ids == want.token_ids
            assert c.usage.prompt_tokens == 4 and c.usage.completion_tokens == 8
            parts = [ch.choices[0].text for ch in client.completions.create(
                model=MODEL, prompt=words(ids), max_tokens=8, temperature=0, stream=True,
                extra_body={"ignore_eos": True}) if ch.choices]
            assert "".join(parts) == want.text
            chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w3 w4"}],
                                                  max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
            assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
            with pytest.raises(openai.BadRequestError, match="max_tokens"):
                client.completions.create(model=MODEL, prompt="w1", max_tokens=-3)
        else:
            r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={
                "model": MODEL, "prompt": words(ids), "max_tokens": 8, "return_token_ids": True, **GREEDY})
            assert r.json()["choices"][0]["token_ids"] == want.token_ids
        # SIGTERM while a stream is running: it finishes, then the server exits 0
        body = {"model": MODEL, "prompt": ids, "max_tokens": 40, "stream": True, **GREEDY}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            lines = r.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            chunks = sse([first, *lines])
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 40
        assert proc.wait(60) == 0, (tmp_path / "server.log").read_text()
        assert "Traceback" not in (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_cli_errors(ckpt, tmp_path):
    from typer.testing import CliRunner
    from tierlm.cli import app
    for args, msg in ((["serve"], "give a MODEL"), (["serve", str(ckpt), "--planner-only"], "give a MODEL"),
                      (["serve", str(tmp_path / "missing")], "error:"), (["serve", str(ckpt), "--port", "70000"], "--port"),
                      (["serve", str(ckpt), "--max-request-bytes", "lots"], "--max-request-bytes"),
                      (["serve", str(ckpt), "--threads", "0"], "--threads must be >= 1"),
                      (["serve", str(ckpt), "--max-queue", "-1"], "--max-queue")):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)


def test_serve_planner_only_cli_imports_no_torch():
    code = ("import sys, uvicorn\n"
            "seen = {}\n"
            "def run(self, sockets=None):\n"
            "    seen['app'] = self.config.app; seen['host'] = self.config.host; self.started = True\n"
            "uvicorn.Server.run = run\n"
            "from typer.testing import CliRunner\n"
            "from tierlm.cli import app\n"
            "r = CliRunner().invoke(app, ['serve', '--planner-only', '--port', '0'])\n"
            "assert r.exit_code == 0, r.output\n"
            "assert seen['host'] == '127.0.0.1' and seen['app'].state.llm is None\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_kv_tiers_metrics_and_llm_closed_on_shutdown(ckpt, tmp_path):
    kw = dict(dtype=torch.float32, max_model_len=256, cache_dir=tmp_path / "kv", tier_policy="reload")
    body = {"model": MODEL, "prompt": list(range(1, 41)), "max_tokens": 2, **GREEDY}
    with TestClient(create_app(LLM(ckpt, **kw), model_name=MODEL)) as c:
        assert c.post("/v1/completions", json=body).json()["usage"]["prompt_cache_hit_tokens"] == 0
        assert re.search(r'^tierlm_cache_bytes\{tier="host"\} [1-9]', c.get("/metrics").text, re.M)
    # shutting the app down ran LLM.close(): the directory is released and holds the blocks
    with TestClient(create_app(LLM(ckpt, **kw), model_name=MODEL)) as c:
        u = c.post("/v1/completions", json=body).json()["usage"]
        assert u["prompt_tokens_details"]["cached_tokens"] == u["prompt_cache_hit_tokens"] == 32
        text = c.get("/metrics").text
        assert 'tierlm_prefix_hit_tokens_total{tier="disk"} 32' in text
        assert re.search(r"^tierlm_kv_reloads_total [1-9]", text, re.M)
