"""What the engine holds is what the planner says: `LLM.cache_bytes(n)` equals
`tierlm plan <checkpoint> --context n --layout tierlm --json`'s kv_cache.total_bytes for every
family, several n and both KV dtypes, and the pools' real tensors hold exactly that much for
a sequence of n tokens (sliding-window layers only their window)."""

import json

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")
from test_engine import MAKERS, reference_greedy  # noqa: E402

from tierlm import LLM, SamplingParams  # noqa: E402
from tierlm.cli import app  # noqa: E402
from tierlm.runtime.scheduler import Scheduler  # noqa: E402

CONTEXTS = [1, 16, 17, 40, 129]


@pytest.fixture(scope="module", params=sorted(MAKERS))
def checkpoint(request, tmp_path_factory):
    _, path = MAKERS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, path


def planned(path, n, dtype):
    out = CliRunner().invoke(app, ["plan", str(path), "--context", str(n), "--layout", "tierlm",
                                   "--kv-dtype", dtype, "--indexer-dtype", dtype, "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)["plans"][0]["kv_cache"]["total_bytes"]


@pytest.mark.parametrize("kv", ["bf16", "fp8", "fp32"])
def test_cache_bytes_equal_plan_and_pools(checkpoint, kv):
    name, path = checkpoint
    llm = LLM(path, dtype=torch.float32, kv_dtype=kv, indexer_dtype=kv, max_model_len=200)
    for n in CONTEXTS:
        assert llm.cache_bytes(n) == planned(path, n, kv), (name, n)
    # Drive one request through its prefill and check the pool tensors in use.
    llm.add_request(list(range(1, 41)), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    while Scheduler.prefilling(llm.scheduler.running[0]) if llm.scheduler.running else True:
        llm.step()
    seq = llm.scheduler.running[0]
    for _ in range(3):
        assert llm.stats()["cache_bytes_in_use"] == llm.cache_bytes(seq.num_computed)
        llm.step()
    windows = [g for g in llm.manager.groups if g]
    for g in windows:                 # only the window's blocks are held
        held = [b for b in seq.tables[g] if b >= 0]
        assert len(held) <= -(-g // llm.block) + 1


def test_fp8_record_round_trip():
    """fp8 records: e4m3 values with one fp32 scale per 128 channels, rope channels in bf16."""
    from tierlm.model.ops import StreamView, decode, encode
    from tierlm.spec.cache import CacheStream
    s = CacheStream("latent", "kv", 300, "token", rope=44)
    view = StreamView(s, torch.zeros(1, 1, 256 + 4 * 2 + 2 * 44, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.long),
                      1, torch.float64, fp8=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 5, dtype=torch.float64)[:, None]
    rec = encode(view, x)
    assert rec.shape == (5, 256 + 8 + 88) and rec.dtype == torch.uint8
    y = decode(view, rec)
    assert torch.equal(y[:, 256:], x[:, 256:].to(torch.bfloat16).double())
    for lo in (0, 128):                                  # each 128-channel block: error within e4m3's step
        blk, got = x[:, lo:lo + 128], y[:, lo:lo + 128]
        assert ((got - blk).abs() <= blk.abs().amax(1, keepdim=True) / 16).all()
        assert ((got - blk).abs() > 0).any()             # really quantised


def test_gather_of_consecutive_slots_is_a_view_and_matches_index_select():
    """One sequence whose pages follow each other reads its entries as a view of the pages
    (nothing copied); pages out of order, an entry not held, or two sequences read a copy.
    All read the same values an explicit per-entry lookup gives."""
    from tierlm.model.ops import StreamView, gather
    from tierlm.spec.cache import CacheStream
    s = CacheStream("k", "kv", 3, "token")
    pages = torch.arange(5 * 4 * 3, dtype=torch.float64).view(5, 4, 3)      # 4 pages of 4 entries + the spare
    pages[-1] = 0

    def read(table, index):
        view = StreamView(s, pages, torch.tensor(table), 4, torch.float64)
        return gather(view, torch.tensor(index))

    def expect(table, index):
        return torch.stack([torch.stack([pages[t[i // 4], i % 4] if i >= 0 and t[i // 4] >= 0 else pages[-1, 0]
                                         for i in row]) for t, row in zip(table, index)])

    cases = [([[1, 2, 3]], [list(range(2, 11))], True),          # consecutive pages: a view
             ([[2, 1, 3]], [list(range(2, 11))], False),         # out of order
             ([[1, -1, 3]], [list(range(2, 11))], False),        # page 1 not held: zeros
             ([[0, 1], [2, 3]], [[0, 1, 2], [5, 6, 7]], False)]  # two sequences
    for table, index, is_view in cases:
        got = read(table, index)
        assert torch.equal(got, expect(table, index))
        assert (got.untyped_storage().data_ptr() == pages.untyped_storage().data_ptr()) == is_view


def test_lookup_needs_the_hash_and_the_same_token_ids():
    from tierlm.runtime.blocks import BlockPool, block_hash
    pool = BlockPool(4)
    ids = list(range(40))
    h = block_hash(b"root", ids[16:32])
    b = pool.allocate()
    pool.name(b, h, ids[16:32])
    assert pool.lookup(h, ids, 16) == b
    assert pool.lookup(h, ids, 15) is None                       # same hash, other token ids: a collision
    assert pool.lookup(block_hash(b"root", ids[:16]), ids, 0) is None      # not held



def test_blocks_are_placed_so_that_sequences_stay_consecutive():
    """A sequence grows into the block after its last; a new one starts on the next multiple
    of one sequence's room (extent) after the blocks in use before it; free blocks holding
    nothing cached are taken before any cached one, and a cached one (least recently freed
    first) only when none is left."""
    from tierlm.runtime.blocks import BlockPool
    pool = BlockPool(16, extent=6)
    a = [pool.allocate()]
    for _ in range(3):
        a.append(pool.allocate(a[-1]))
    assert a == [0, 1, 2, 3]
    b = [pool.allocate()]
    b.append(pool.allocate(b[-1]))
    assert b == [6, 7]                                 # a keeps room for 6 blocks
    assert pool.allocate() == 12
    assert pool.allocate(a[-1]) == 4                   # a grows in place
    a.append(4)
    for blk in a:                                      # a ends; its blocks hold a cached prefix
        pool.name(blk, bytes([blk]) * 32, [blk] * 16)
    for blk in reversed(a):
        pool.release(blk)
    loose = [pool.allocate() for _ in range(8)]        # 5, 8-11, 13-15: nothing cached is evicted
    assert sorted(loose) == [5, 8, 9, 10, 11, 13, 14, 15]
    assert all(pool.lookup(bytes([blk]) * 32, [blk] * 16, 0) == blk for blk in a)
    assert pool.allocate() == 4                        # then the least recently freed cached block
    assert pool.lookup(bytes([4]) * 32, [4] * 16, 0) is None
    pool.forget()                                      # weights changed: every free block is loose
    assert pool.allocate() == 0
    tight = BlockPool(5, extent=6)                     # no multiple of 6 left: halfway into the stretch
    tight.allocate()
    assert tight.allocate() == 3


# Families whose streams are all per-token resume at a whole cached prompt's last token; a
# window group (Gemma 3's sliding layers) needs the state at a block's end, so it computes
# the last block again.
RESUMES = {"llama": True, "deepseek-v3.2": True, "gemma3": False}


@pytest.mark.parametrize("name", sorted(RESUMES))
def test_a_prompt_cached_whole_computes_only_its_last_token(name, tmp_path):
    ref, path = MAKERS[name](tmp_path)
    prompt = [(3 * i + 1) % 50 for i in range(32)]                   # two whole blocks
    want = reference_greedy(ref, prompt, 8)
    llm = LLM(path, dtype=torch.float64, reference="transformers")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert llm.block == 16 and llm.generate([prompt], params)[0].outputs[0].token_ids == want
    hit = 31 if RESUMES[name] else 16
    for _ in range(2):          # the block written in place is named again: the next request hits it too
        out = llm.generate([prompt], params)[0]
        assert out.outputs[0].token_ids == want and out.num_cached_tokens == hit
    assert llm.stats()["prefix_hit_tokens"] == 2 * hit


def test_a_last_block_others_hold_is_copied_not_written(tmp_path):
    ref, path = MAKERS["llama"](tmp_path)
    prompt = [(3 * i + 1) % 50 for i in range(32)]
    want = reference_greedy(ref, prompt, 8)
    llm = LLM(path, dtype=torch.float64, reference="transformers")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == want
    bp = llm.manager.bp[0]
    cached = [bp.by_hash[h] for h in llm.manager._prompt_chain(prompt)]
    for b in cached:
        bp.take(b)                                                   # held, as a running request would
    before = {k: t[cached].clone() for k, t in llm.manager.pools.pages.items()}
    out = llm.generate([prompt], params)[0]
    assert out.outputs[0].token_ids == want and out.num_cached_tokens == 31
    for k, t in before.items():                                       # the held blocks were only read
        assert torch.equal(llm.manager.pools.pages[k][cached], t), k
    assert [bp.by_hash[h] for h in llm.manager._prompt_chain(prompt)] == cached
    for b in cached:
        bp.release(b)
    assert llm.stats()["blocks_in_use"] == 0


def test_with_no_free_block_for_the_copy_the_last_block_is_computed_again(tmp_path):
    """Shared last block, no free block to copy it into: the hit stops a block short (the
    scheduler then waits for room, or preempts, as for any prompt)."""
    from tierlm.runtime.sequence import Sequence
    _, path = MAKERS["llama"](tmp_path)
    prompt = [(3 * i + 1) % 50 for i in range(32)]
    llm = LLM(path, dtype=torch.float64, cache_bytes=LLM(path, dtype=torch.float64).cache_bytes(48))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    bp = llm.manager.bp[0]
    assert bp.num_blocks == 3
    llm.generate([prompt], params)
    cached = [bp.by_hash[h] for h in llm.manager._prompt_chain(prompt)]
    for b in cached:
        bp.take(b)                                     # held by another request, as is the third block
    held = cached + [bp.allocate() for _ in range(bp.num_free)]
    seq = Sequence("r", 0, prompt, params)
    assert llm.manager.match(seq) == 16 and seq.tables[0] == cached[:1] and len(seq.hashes) == 1
    assert [bp.refs[b] for b in cached] == [2, 1]      # the last block went back to its holder alone
    llm.manager.free(seq)
    for b in held:
        bp.release(b)
    assert llm.stats()["blocks_in_use"] == 0
