"""The cache contract: how an attention layer reads and writes paged cache memory.

A step runs B sequences, sequence b bringing `lens[b]` new tokens after `starts[b]` cached
ones; tokens are laid out [B, T] (T = max new tokens, shorter rows padded). Each layer gets
one `StreamView` per `CacheStream` of `tierlm.spec.cache` (the planner's names): the
stream's pages, the step's block table for the stream's group and how entries map onto
pages. Every attention kind then does the same three things: compute its new entries and
`store` them at their logical index; compute the logical indices each query may see (causal
range, window, `pos // ratio`, indexer top-k); `gather` those entries and attend.

Logical entry i of a stream with ratio r lives in logical page i // (block // r) of the
sequence, whose physical page is `table[b, page]` (-1: not held). Every page tensor ends with
one spare page that is never written: entries not held read from it, as zeros. Storing before reading
means the chunk's own entries come from the same pages as everything else, so a float64
model run through the pages is the same arithmetic as one run without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..spec.cache import CacheStream

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_BLOCK = 128          # channels per fp32 scale in an fp8 record


@dataclass
class StreamView:
    stream: CacheStream
    pages: torch.Tensor    # [n_pages, per_page, record]: entries in `storage` dtype, or uint8 fp8 records
    table: torch.Tensor    # [B, max_pages] int64: physical page of each logical page, -1 = not held
    per_page: int          # entries per page: block // ratio (window-like streams: block)
    dtype: torch.dtype     # dtype entries are returned in (the model's compute dtype)
    fp8: bool = False
    memo: dict = field(default_factory=dict)   # shared by one step's views: slots per (table, page size, index)

    def slots(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """index [B, ...] logical entries -> (flat slots, held mask), same shape; entries not
        held map to the spare page's first slot. Every layer of a group asks for the same
        indices, so the result is kept for the step."""
        key = (id(self.table), self.per_page, id(index))
        hit = self.memo.get(key)
        if hit is not None and hit[0] is index:
            return hit[1], hit[2]
        b = index.shape[0]
        flat = index.reshape(b, -1)
        page = (flat.clamp(min=0) // self.per_page).clamp(max=self.table.shape[1] - 1)
        phys = self.table.gather(1, page)
        ok = (flat >= 0) & (phys >= 0)
        spare = (self.pages.shape[0] - 1) * self.per_page
        slot = torch.where(ok, phys * self.per_page + flat.clamp(min=0) % self.per_page, spare)
        out = slot.view(index.shape), ok.view(index.shape)
        self.memo[key] = (index, *out)
        return out

    def run(self, index: torch.Tensor) -> int | None:
        """The first slot when index [1, ...] (one sequence) names held entries in consecutive
        slots, as a sequence whose pages were allocated together has them; else None. Only
        for CPU pages (the check reads the slots, which on an accelerator would wait for it).
        Kept for the step, like `slots`."""
        key = ("run", id(self.table), self.per_page, id(index))
        hit = self.memo.get(key)
        if hit is not None and hit[0] is index:
            return hit[1]
        first = None
        if index.shape[0] == 1 and index.numel() > 1 and self.pages.device.type == "cpu":
            slot, ok = self.slots(index)
            flat = slot.reshape(-1)
            if bool(ok.all()) and bool((flat[1:] - flat[:-1] == 1).all()):
                first = int(flat[0])
        self.memo[key] = (index, first)
        return first

    def runs(self, index: torch.Tensor) -> list[list[tuple[int, int]]] | None:
        """Per row of index [B, ...], its entries as runs of consecutive slots [(first slot,
        entries)], in order, when every entry it names is held and only -1 follows its last
        (a sequence's key index, padded past its end); else None. A sequence whose pages were
        allocated together is one run. CPU pages only, like `run`; kept for the step."""
        key = ("runs", id(self.table), self.per_page, id(index))
        hit = self.memo.get(key)
        if hit is not None and hit[0] is index:
            return hit[1]
        out = None
        if index.numel() > index.shape[0] and self.pages.device.type == "cpu":
            b = index.shape[0]
            slot, ok = self.slots(index)
            slot, ok, want = slot.reshape(b, -1), ok.reshape(b, -1), index.reshape(b, -1) >= 0
            if bool((ok == want).all()) and not bool((want[:, 1:] & ~want[:, :-1]).any()):
                n = want.sum(1).tolist()
                rows, cols = ((slot[:, 1:] - slot[:, :-1] != 1) & want[:, 1:]).nonzero(as_tuple=True)
                cuts = [[0] for _ in range(b)]                   # where each row's runs start
                for r, c in zip(rows.tolist(), (cols + 1).tolist()):
                    cuts[r].append(c)
                width = max(map(len, cuts))
                firsts = slot.gather(1, torch.tensor([c + [0] * (width - len(c)) for c in cuts])).tolist()
                out = [[(f, e - c) for f, c, e in zip(firsts[r], cuts[r], cuts[r][1:] + [n[r]])] for r in range(b)]
        self.memo[key] = (index, out)
        return out

    def targets(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(flat slots, flat rows) of the held entries among index [B, ...]; rows None when all
        are held (a decode step: the write is then one indexed copy). Kept for the step, like
        `slots`: every layer stores at the same indices."""
        key = ("targets", id(self.table), self.per_page, id(index))
        hit = self.memo.get(key)
        if hit is not None and hit[0] is index:
            return hit[1], hit[2]
        slot, ok = self.slots(index)
        slot, ok = slot.reshape(-1), ok.reshape(-1)
        rows = None if bool(ok.all()) else ok.nonzero().squeeze(1)
        out = (slot if rows is None else slot[rows]), rows
        self.memo[key] = (index, *out)
        return out


def store(view: StreamView, index: torch.Tensor, x: torch.Tensor) -> None:
    """Write x [B, ..., width] at logical entries index [B, ...] (-1: skip)."""
    slot, rows = view.targets(index)
    x = x.reshape(-1, x.shape[-1])
    flat = view.pages.view(-1, view.pages.shape[-1])
    flat[slot] = encode(view, x if rows is None else x[rows])


def gather(view: StreamView, index: torch.Tensor) -> torch.Tensor:
    """Entries at logical index [B, ...] -> [B, ..., width]; entries not held read as 0. The
    result may be a view of the pages (callers only read it, before the step's next store
    into that stream)."""
    flat = view.pages.view(-1, view.pages.shape[-1])
    first = view.run(index)
    if first is not None:       # consecutive slots: the pages themselves, nothing copied (read-only use)
        return decode(view, flat[first:first + index.numel()]).view(*index.shape, -1)
    slot, _ = view.slots(index)
    # index_select, not flat[slot]: advanced indexing ran 2-3x slower for these row copies
    return decode(view, flat.index_select(0, slot.reshape(-1))).view(*index.shape, -1)


ROW_BYTES = 256 << 10  # a row's entries worth attending in place rather than copying into one batch


def gather_rows(view: StreamView, index: torch.Tensor) -> list[torch.Tensor] | None:
    """Each row's entries of index [B, S] (held, then -1 past the row's end), [n_b, width]:
    a view of the pages where the row is one run of slots (read-only use, like `gather`),
    else its runs' views joined. None when the rows are short or not such runs. Why: a
    decode step of B sequences otherwise copies every context entry by entry into one padded
    [B, S] tensor; at 2k context and B = 16 that copy took over half of a tiny Llama's step
    here, where B attention calls cost a few microseconds each and joining a row's few runs
    is a memcpy. Below ROW_BYTES per row the one copy and one call are cheaper."""
    if index.dim() != 2 or index.shape[1] * view.pages.shape[-1] * view.pages.element_size() < ROW_BYTES:
        return None
    runs = view.runs(index)
    if runs is None:
        return None
    flat = view.pages.view(-1, view.pages.shape[-1])
    out = []
    for row in runs:
        parts = [flat[first:first + n] for first, n in row]
        out.append(decode(view, parts[0] if len(parts) == 1 else torch.cat(parts)))
    return out


def encode(view: StreamView, x: torch.Tensor) -> torch.Tensor:
    """x [M, width] -> records [M, record] in the pool's storage format."""
    if not view.fp8:
        return x.to(view.pages.dtype)
    rope = view.stream.rope
    nope = x[:, :x.shape[1] - rope].float()
    m, n = nope.shape
    nb = -(-n // SCALE_BLOCK)
    blocks = torch.nn.functional.pad(nope, (0, nb * SCALE_BLOCK - n)).view(m, nb, SCALE_BLOCK)
    scale = (blocks.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)                       # [M, nb]
    q = (blocks / scale.unsqueeze(-1)).to(FP8).view(m, -1)[:, :n]
    parts = [q.view(torch.uint8), scale.contiguous().view(torch.uint8)]
    if rope:
        parts.append(x[:, n:].to(torch.bfloat16).contiguous().view(torch.uint8))
    return torch.cat(parts, dim=1)


def decode(view: StreamView, rec: torch.Tensor) -> torch.Tensor:
    """records [M, record] -> entries [M, width] in the compute dtype."""
    if not view.fp8:
        return rec.to(view.dtype)
    width, rope = view.stream.width, view.stream.rope
    n = width - rope
    nb = -(-n // SCALE_BLOCK)
    m = rec.shape[0]
    q = rec[:, :n].contiguous().view(FP8).float()
    scale = rec[:, n:n + 4 * nb].contiguous().view(torch.float32)
    q = torch.nn.functional.pad(q, (0, nb * SCALE_BLOCK - n)).view(m, nb, SCALE_BLOCK) * scale.unsqueeze(-1)
    out = [q.view(m, -1)[:, :n]]
    if rope:
        out.append(rec[:, n + 4 * nb:].contiguous().view(torch.bfloat16).float())
    return torch.cat(out, dim=1).to(view.dtype)


@dataclass
class Step:
    """One forward step of a ragged batch over paged caches."""
    positions: torch.Tensor                    # [B, T] position of each new token (padding: the row's first)
    valid: torch.Tensor                        # [B, T] False on padding
    starts: torch.Tensor                       # [B] tokens cached before the step
    lens: torch.Tensor                         # [B] new tokens
    views: dict[int, dict[str, StreamView]]    # layer index -> stream name -> view
    history: torch.Tensor | None = None        # [B, c] tokens just before the step, -1 where none (Engram)

    def view(self, layer: int, name: str) -> StreamView:
        return self.views[layer][name]

    @property
    def ends(self) -> torch.Tensor:
        return self.starts + self.lens

    def new_index(self, ratio: int = 1) -> torch.Tensor:
        """[B, T] logical index of the entry each new token completes (ratio r: one entry per
        r tokens, made by the token at position r*i + r - 1), -1 where it completes none."""
        return self._memo(("new", ratio), self._new_index, ratio)

    def visible(self, window: int = 0) -> torch.Tensor:
        """[B, T, S] which of key_index(window) each query sees: causal, and within the
        window when there is one. One mask per step for all layers alike."""
        return self._memo(("visible", window), self._visible, window)

    def sees_all(self, window: int = 0) -> bool:
        """Whether every query sees every key of key_index(window): a decode step whose
        sequences are all as long as each other, whose attention then needs no mask."""
        return self._memo(("all", window), lambda w: bool(self.visible(w).all()), window)

    def causal(self, window: int = 0) -> bool:
        """Whether the step's mask is plain causal over its own tokens: every row starts at
        position 0 with all T > 1 tokens new (a prompt's first prefill chunk), none past a
        window. Attention can then skip the masked blocks instead of reading a mask: the same
        bits, and at 1,024 / 2,048 tokens SDPA took 9 / 33 ms against 15 / 60 ms here."""
        def plain(w: int) -> bool:
            t = self.positions.shape[1]
            return (t > 1 and (not w or t <= w) and bool((self.starts == 0).all())
                    and bool((self.lens == t).all()))
        return self._memo(("causal", window), plain, window)

    def _visible(self, window: int) -> torch.Tensor:
        kp, qp = self.key_index(window)[:, None, :], self.positions[:, :, None]
        mask = (kp >= 0) & (kp <= qp)
        return mask & (kp > qp - window) if window else mask

    def key_index(self, window: int = 0) -> torch.Tensor:
        """[B, S] logical positions the step's queries may need: all cached and new ones, or
        with a window only from the first query's window start. -1 past a row's end."""
        return self._memo(("key", window), self._key_index, window)

    def _memo(self, key, fn, arg):
        # The same tensor object for every layer, so StreamView.slots can reuse its slots.
        memo = self.__dict__.setdefault("_indices", {})
        if key not in memo:
            memo[key] = fn(arg)
        return memo[key]

    def _new_index(self, ratio: int) -> torch.Tensor:
        if ratio == 1:
            return torch.where(self.valid, self.positions, -1)
        done = self.valid & ((self.positions + 1) % ratio == 0)
        return torch.where(done, (self.positions + 1) // ratio - 1, -1)

    def _key_index(self, window: int) -> torch.Tensor:
        ends = self.ends
        lo = (self.starts - window + 1).clamp(min=0) if window else torch.zeros_like(self.starts)
        s = int((ends - lo).max())
        idx = lo.unsqueeze(1) + torch.arange(s, device=lo.device)
        return torch.where(idx < ends.unsqueeze(1), idx, -1)
