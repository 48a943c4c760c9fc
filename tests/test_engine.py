"""tierlm.LLM against transformers==5.23.0 for every family: random tiny float64 checkpoints
saved by transformers; the oracle is plain greedy decoding by repeated full forward passes of
the transformers model. The engine must give the same 32 tokens for one prompt, a ragged batch,
a second batch that hits the prefix cache, tiny prefill chunks and a pool too small for all
requests at once (preemption by recompute)."""

import pytest
import torch

pytest.importorskip("transformers")
import test_model_deepseek as ds  # noqa: E402
import test_model_deepseek_v4 as v4  # noqa: E402
import test_model_gemma3 as gemma3  # noqa: E402
import test_model_gqa as gqa  # noqa: E402
import test_model_minimax_m2 as minimax  # noqa: E402

from tierlm import LLM, SamplingParams  # noqa: E402

N = 32
DS = {c[0]: c for c in ds.CASES}
MAKERS = {
    "llama": lambda p: gqa.make("llama", p),
    "qwen3": lambda p: gqa.make("qwen3", p),
    "qwen3-moe": lambda p: gqa.make("qwen3-moe", p),
    "mixtral": lambda p: gqa.make("mixtral", p),
    "gpt-oss": lambda p: gqa.make("gpt-oss", p),
    "gemma3": lambda p: gemma3.make("local-global-linear", p),
    "minimax-m2": lambda p: minimax.make("partial-yarn-top3", p),
    "deepseek-v2": lambda p: ds.make(p, DS["v2-lite-qproj"]),
    "deepseek-v3": lambda p: ds.make(p, DS["v3-qlora-group"]),
    "deepseek-v3.2": lambda p: ds.make(p, DS["v32-dsa"]),
    "glm-5": lambda p: ds.make(p, DS["glm5-dsa-shared"]),
    # 8 indexer heads: with 2, a fifth of the index scores are exact zeros (ReLU), and which
    # tied entry torch.topk picks depends on the row's shape, in transformers' own repeated
    # full forwards too; with 8 zeros are rare enough that no tie reaches the top-k here.
    "deepseek-v4": lambda p: (v4.make_checkpoint(p, "mixed", index_n_heads=8)[0], p),
}
# Ragged lengths (1 to 40 tokens, across 16-token blocks); the second batch shares whole
# blocks with the first, so it must hit the prefix cache.
PROMPTS = [[5, 9, 11, 2, 8], [(7 * i + 3) % 50 for i in range(21)], [7], [(5 * i + 1) % 60 for i in range(40)]]
SECOND = [PROMPTS[3][:36] + [1, 2, 3], PROMPTS[1] + [4, 5]]
GREEDY = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)


def reference_greedy(ref, prompt, n: int = N):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, ref(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=sorted(MAKERS))
def family(request, tmp_path_factory):
    ref, path = MAKERS[request.param](tmp_path_factory.mktemp(request.param))
    want = {tuple(p): reference_greedy(ref, p) for p in PROMPTS + SECOND}
    return request.param, path, want


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_one_prompt_ragged_batch_and_prefix_hits(family):
    name, path, want = family
    llm = LLM(path, dtype=torch.float64, reference="transformers")
    assert tokens(llm.generate([PROMPTS[3]], GREEDY)) == [want[tuple(PROMPTS[3])]]
    assert tokens(llm.generate(PROMPTS, GREEDY)) == [want[tuple(p)] for p in PROMPTS]
    before = llm.stats()["prefix_hit_tokens"]
    outs = llm.generate(SECOND, GREEDY)
    assert tokens(outs) == [want[tuple(p)] for p in SECOND]
    assert llm.stats()["prefix_hit_tokens"] > before
    assert outs[0].num_cached_tokens >= llm.block
    assert llm.stats()["blocks_in_use"] == 0 and llm.stats()["num_running"] == 0


def test_small_chunks_and_preemption(family):
    name, path, want = family
    chunked = LLM(path, dtype=torch.float64, reference="transformers", max_num_batched_tokens=3,
                  enable_prefix_caching=False)
    assert tokens(chunked.generate(PROMPTS, GREEDY)) == [want[tuple(p)] for p in PROMPTS]
    probe = LLM(path, dtype=torch.float64, reference="transformers", max_model_len=80, max_num_batched_tokens=16)
    tight = LLM(path, dtype=torch.float64, reference="transformers", max_model_len=80, max_num_batched_tokens=16,
                max_num_seqs=4, cache_bytes=int(1.5 * probe.bytes_per_sequence))
    assert tokens(tight.generate(PROMPTS, GREEDY)) == [want[tuple(p)] for p in PROMPTS]
    assert tight.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("placement", ["consecutive", "scattered"])
@pytest.mark.parametrize("name", ["llama", "gemma3", "minimax-m2", "deepseek-v2", "deepseek-v3"])
def test_decode_attends_each_sequence_where_its_entries_lie(name, placement, tmp_path, monkeypatch):
    """A batched decode step over long rows attends each sequence over its own pages
    (`ops.gather_rows`: GQA and dense MLA), forced here for the short test prompts: the same
    greedy tokens as the reference. With blocks placed where the pool's free list puts them
    and chunks of three tokens interleaving the sequences (`scattered`), rows are several runs
    of slots."""
    from tierlm.model import ops
    from tierlm.model.families import deepseek, gqa
    from tierlm.runtime.blocks import BlockPool
    ref, path = MAKERS[name](tmp_path)
    monkeypatch.setattr(ops, "ROW_BYTES", 1)
    if placement == "scattered":
        place = BlockPool.allocate
        monkeypatch.setattr(BlockPool, "_stretch", lambda self: None)
        monkeypatch.setattr(BlockPool, "allocate", lambda self, after=-1: place(self))
    runs = []

    def spy(view, index):
        out = ops.gather_rows(view, index)
        if out is not None:
            runs.append(view.runs(index))
        return out
    for family in (gqa, deepseek):
        monkeypatch.setattr(family, "gather_rows", spy)
    llm = LLM(path, dtype=torch.float64, reference="transformers", max_num_batched_tokens=3 if placement == "scattered" else 512)
    assert tokens(llm.generate(PROMPTS, GREEDY)) == [reference_greedy(ref, p) for p in PROMPTS]
    pieces = [len(row) for step in runs for row in step]
    assert pieces and (max(pieces) > 1 if placement == "scattered" else max(pieces) == 1)

@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_a_first_prefill_chunk_attends_causally_with_the_masks_bits(name, tmp_path, monkeypatch):
    """A step whose rows all start at position 0 (a prompt's first chunk) runs SDPA with
    is_causal instead of a mask (`Step.causal`): float32 logits bit-identical to the masked
    path's, for one prompt and for a batch of two of the same length; Gemma 3's sliding
    layers, whose window is shorter than the prompt, keep the mask."""
    import tierlm.model as tm
    from tierlm.model import Cache, ops
    _, path = MAKERS[name](tmp_path)
    model = tm.load(path, dtype=torch.float32, progress=False).eval()
    ids = torch.tensor([PROMPTS[3], PROMPTS[1] + PROMPTS[1][:19]])          # [2, 40]
    calls, causal = [], ops.Step.causal

    def spy(step, window=0):
        calls.append(causal(step, window))
        return calls[-1]
    monkeypatch.setattr(ops.Step, "causal", spy)
    with torch.no_grad():
        fast = [model(ids[:1], Cache()), model(ids, Cache())]
    assert any(calls) and (all(calls) if name == "llama" else not all(calls))
    monkeypatch.setattr(ops.Step, "causal", lambda step, window=0: False)
    with torch.no_grad():
        masked = [model(ids[:1], Cache()), model(ids, Cache())]
    assert all(torch.equal(a, b) for a, b in zip(fast, masked))

@pytest.mark.parametrize("name", ["llama", "qwen3-moe", "gemma3", "deepseek-v4"])
def test_float32_logits_do_not_depend_on_the_thread_count(name, tmp_path):
    """The engine's CPU float32 path (oneDNN linears, exp-based activations) gives the same
    bits at 1-4 threads, for a prefill and for a decode step after it. DeepSeek V3 / V3.2
    and MiniMax routers keep torch's float32 sigmoid, as the references score (not covered)."""
    import tierlm.model as tm
    from tierlm.model import Cache
    from tierlm.model.layers import use_fast_linears
    _, path = MAKERS[name](tmp_path)
    model = tm.load(path, dtype=torch.float32, progress=False).eval()
    use_fast_linears(model)
    ids = torch.tensor([PROMPTS[3], PROMPTS[1] + PROMPTS[1][:19]])          # [2, 40]
    threads, runs = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            with torch.no_grad():
                cache = Cache()
                prefill = model(ids[:, :39], cache)
                runs.append((prefill, model(ids[:, 39:], cache)))
    finally:
        torch.set_num_threads(threads)
    for prefill, step in runs[1:]:
        assert torch.equal(prefill, runs[0][0]) and torch.equal(step, runs[0][1])
