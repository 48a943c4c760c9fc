"""Engram (deepseek-ai/Engram engram_demo_v1.py): hashing, primes, parameter inventory,
training on a toy task, and incremental decoding inside a Llama-style model."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tierlm.model import Cache
from tierlm.model.engram import (Engram, EngramHashing, compression_table, engram_primes, normalize_python,
                                 normalize_token)
from tierlm.model.families import gqa
from tierlm.spec import parse_config
from tierlm.spec.model import EngramConfig
from tierlm.spec.params import _engram_groups, engram_table_rows

VOCAB = 61
LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, num_hidden_layers=3, max_position_embeddings=256, rms_norm_eps=1e-6,
             tie_word_embeddings=False)
ENGRAM = dict(engram_vocab_size=[97, 89], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=4,
              layer_ids=[2, 0], pad_id=5, seed=3, kernel_size=4)


def spec(**engram):
    return parse_config(dict(LLAMA, engram_config=dict(ENGRAM, **engram)))


# ---------------------------------------------------------------------------- hashing
def _wrap64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _reference_hashes(ids, table, pad_id, seed, layer_ids, sizes, max_n, heads):
    """The demo's arithmetic re-derived with plain Python ints and explicit int64 wraparound."""
    seen, primes = set(), {}
    for layer in layer_ids:                       # primes: unique over heads, orders and layers
        primes[layer] = []
        for size in sizes:
            p, mine = size - 1, []
            for _ in range(heads):
                p += 1
                while p in seen or not _is_prime(p):
                    p += 1
                seen.add(p)
                mine.append(p)
            primes[layer].append(mine)
    n_compressed = max(table) + 1
    half = max(1, ((2 ** 63 - 1) // n_compressed) // 2)
    pad = table[pad_id]
    out = {}
    for layer in layer_ids:
        r = np.random.default_rng(seed + 10007 * layer).integers(0, half, size=(max_n,), dtype=np.int64)
        mult = [int(v) * 2 + 1 for v in r]
        rows = []
        for seq in ids:
            comp = [table[t] for t in seq]
            row = []
            for t in range(len(comp)):
                tok = [comp[t - k] if t - k >= 0 else pad for k in range(max_n)]
                heads_out = []
                for n in range(2, max_n + 1):
                    mix = _wrap64(tok[0] * mult[0])
                    for k in range(1, n):
                        mix = _wrap64(mix ^ _wrap64(tok[k] * mult[k]))
                    heads_out += [mix % p for p in primes[layer][n - 2]]   # numpy %: sign of the divisor
                row.append(heads_out)
            rows.append(row)
        out[layer] = rows
    return out, primes


def test_hashing_matches_an_independent_rederivation():
    rng = np.random.default_rng(0)
    for max_n, sizes, heads, layers, seed in [(3, (97, 89), 4, (2, 0), 3), (2, (50,), 3, (1,), 0),
                                              (4, (40, 40, 40), 2, (0, 7, 3), 11)]:
        cfg = EngramConfig(layers, sizes, max_n, heads * 4, heads)
        table = [int(v) for v in rng.integers(0, 23, VOCAB)]   # a many-to-one compression
        table[0] = 22                                          # ids dense in 0..22
        ids = rng.integers(0, VOCAB, (3, 17)).tolist()
        hashing = EngramHashing(cfg, VOCAB, np.array(table), pad_id=5, seed=seed)
        got = hashing(torch.tensor(ids))
        want, primes = _reference_hashes(ids, table, 5, seed, layers, sizes, max_n, heads)
        for layer in layers:
            assert got[layer].dtype == torch.int64
            assert got[layer].tolist() == want[layer]
            assert [list(o) for o in hashing.primes[layer]] == primes[layer]


def test_demo_primes_and_multipliers():
    primes = engram_primes((1, 15), (129280 * 5, 129280 * 5), 8)
    assert primes[1][0][:3] == (646403, 646411, 646421)              # module_specs.md §5.3
    rows = engram_table_rows((1, 15), (129280 * 5, 129280 * 5), 8)
    assert tuple(sum(sum(o) for o in primes[layer]) for layer in (1, 15)) == rows
    h = EngramHashing(EngramConfig((1, 15), (646400, 646400), 3, 512, 8), 129280)
    for layer in (1, 15):
        m = h.multipliers[layer]
        assert m.dtype == np.int64 and (m % 2 == 1).all() and (m < np.iinfo(np.int64).max // 129280).all()


def test_indices_deterministic_in_bounds_and_primes_distinct():
    s = spec()
    h1, h2 = EngramHashing.from_spec(s), EngramHashing.from_spec(s)
    assert h1.pad_id == 5 and h1.seed == 3
    ids = torch.randint(0, VOCAB, (4, 40), generator=torch.Generator().manual_seed(2))
    a, b = h1(ids), h2(ids.clone())
    all_primes = [p for layer in s.engram.layer_ids for order in h1.primes[layer] for p in order]
    assert len(all_primes) == len(set(all_primes)) == 2 * 2 * 4     # heads x orders x layers
    assert all(_is_prime(p) for p in all_primes)
    for layer in s.engram.layer_ids:
        assert torch.equal(a[layer], b[layer])
        sizes = torch.tensor(h1.head_sizes(layer))
        assert a[layer].shape == (4, 40, 8)
        assert (a[layer] >= 0).all() and (a[layer] < sizes).all()
    assert not torch.equal(a[0], a[2])                                 # layers hash differently
    # Token-id only, and causal: a later token never changes earlier indices.
    ids2 = ids.clone()
    ids2[:, 30:] = (ids2[:, 30:] + 1) % VOCAB
    c = h1(ids2)
    assert all(torch.equal(c[layer][:, :30], a[layer][:, :30]) for layer in s.engram.layer_ids)
    # Incremental hashing with the left context equals the full-sequence hashing.
    parts = []
    for lo, hi in [(0, 1), (1, 2), (2, 9), (9, 10), (10, 40)]:
        before = ids[:, max(0, lo - h1.context):lo]           # the history a step carries, -1 padded
        history = torch.cat([before.new_full((ids.shape[0], h1.context - before.shape[1]), -1), before], dim=1)
        parts.append(h1.step(ids[:, lo:hi], SimpleNamespace(history=history)))
    for layer in s.engram.layer_ids:
        assert torch.equal(torch.cat([p[layer] for p in parts], dim=1), a[layer])


def test_compression_table():
    decoded = ["Hello", "hello", " HÉLLO ", "\t\n", " ", "café", "CAFE", "\ufffd", "\ufffd", "", "ﬁ", "fi"]
    raw = ["Hello", "hello", "ĠHELLO", "ĉĊ", "Ġ", "café", "CAFE", "<0xE2>", "<0xE3>", "", "ﬁ", "fi"]
    table, n = compression_table(decoded, raw)
    assert table.dtype == np.int64
    assert table.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 6]
    assert n == 7
    assert normalize_token("  ") == " " and normalize_python("  ") == " " and normalize_python("ΑΣ") == "ασ"
    pytest.importorskip("tokenizers")          # normalize_token is then the demo's own normalizer
    for text in decoded + ["Straße", "İstanbul", "  a  b  ", "x\x0by", "\u3000Ｈｅｌｌｏ\u2028"]:
        assert normalize_token(text) == normalize_python(text)


# ---------------------------------------------------------------------------- module
def test_parameters_match_the_planner_inventory():
    for hc in (1, 4):
        s = replace(spec(), hc_mult=hc)
        mods = [Engram.from_spec(s, layer) for layer in s.engram.layer_ids]
        got = sum(p.numel() for m in mods for p in m.parameters())
        assert got == sum(g.numel for g in _engram_groups(s))
        tables = [m.multi_head_embedding.embedding.weight.shape[0] for m in mods]
        assert tuple(tables) == engram_table_rows(s.engram.layer_ids, s.engram.vocab_sizes, 4)
    model = gqa.build(spec())
    assert sum(p.numel() for n, p in model.named_parameters() if ".engram." in n) == \
        sum(g.numel for g in _engram_groups(spec()))
    names = set(model.state_dict())
    assert "model.layers.2.engram.multi_head_embedding.embedding.weight" in names
    assert "model.layers.0.engram.key_projs.0.bias" in names and "model.layers.1.engram.value_proj.weight" not in names
    assert not any("offsets" in n for n in names)


def test_hc_streams_shapes():
    s = replace(spec(), hc_mult=3)
    torch.manual_seed(0)
    m = Engram.from_spec(s, 2)
    idx = EngramHashing.from_spec(s)(torch.randint(0, VOCAB, (2, 7)))[2]
    out = m(torch.randn(2, 7, 3, 32), idx)
    assert out.shape == (2, 7, 3, 32) and torch.isfinite(out).all()


def test_engram_learns_a_copy_task():
    """Predict the previous token: a bigram lookup, the job Engram's hashed tables are for."""
    torch.manual_seed(0)
    cfg = EngramConfig((0,), (257,), 2, 32, 4, kernel_size=2)
    V, D = 16, 32
    hashing = EngramHashing(cfg, V, pad_id=0)
    emb, engram, head = torch.nn.Embedding(V, D), Engram(cfg, 0, D), torch.nn.Linear(D, V)
    params = [*emb.parameters(), *engram.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(200):
        ids = torch.randint(1, V, (16, 24), generator=gen)
        idx = hashing(ids)[0]
        x = emb(ids)
        logits = head(x + engram(x, idx))
        loss = torch.nn.functional.cross_entropy(logits[:, 1:].reshape(-1, V), ids[:, :-1].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert first > 2.3 and last < 0.5 * first and last < 1.0


# ---------------------------------------------------------------------------- in a model
def test_llama_with_engram_decodes_incrementally():
    s = spec()
    torch.manual_seed(0)
    model = gqa.build(s).to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = Cache()
        steps = [model(ids[:, :1], cache), model(ids[:, 1:5], cache)]
        steps += [model(ids[:, t:t + 1], cache) for t in range(5, 15)]
        assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-9
        assert cache.length == 15
        # The Engram layers do change the output, and only through the token-id indices.
        plain = gqa.build(replace(s, engram=None)).to(torch.float64)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".engram." not in k})
        assert (plain(ids) - full).abs().max().item() > 1e-3
        # A compression table (merging ids) changes the indices, hence the logits.
        model.engram_hashing = EngramHashing.from_spec(s, np.arange(VOCAB) // 2)
        assert (model(ids) - full).abs().max().item() > 1e-6
