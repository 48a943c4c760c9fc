"""MTP speculative decoding: the model's multi-token-prediction block drafts k tokens, the main
model verifies them in one step, and the longest agreeing prefix is kept.

The MTP block at position t reads the main model's hidden state h_t and the embedding of
token t+1 and predicts token t+2; it has its own cache streams (its layer index in the
pools). After every step the block is run over the positions the main model just made final,
with their real hidden states and next tokens, which (re)writes its cache there; then it
drafts k tokens by feeding its own output back (the next draft reads the block's previous
output in place of h). Every cache entry is indexed by position, so rejected tokens need no
undo: their entries lie beyond the sequence's committed length and are overwritten when
those positions are computed again. Verification samples each position from the main
model's distribution and keeps drafts while they equal the sample, so the output has the
same distribution as decoding without speculation — and for greedy requests the same tokens.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import TierlmError
from .sampler import sample
from .sequence import Sequence


class MTPSpeculator:
    def __init__(self, k: int):
        self.k = k
        self.proposed = self.accepted = 0
        self.engine = None

    @classmethod
    def check(cls, model, speculative: dict) -> "MTPSpeculator":
        if not isinstance(speculative, dict) or speculative.get("method") != "mtp" \
                or set(speculative) - {"method", "num_tokens"}:
            raise TierlmError("speculative must be {'method': 'mtp', 'num_tokens': k}")
        k = speculative.get("num_tokens", 1)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise TierlmError(f"speculative num_tokens must be an integer in 1..16, got {k!r}")
        if not hasattr(model, "draft_step") or getattr(model, "num_mtp_layers", 0) < 1:
            raise TierlmError("speculative 'mtp' needs a checkpoint with an MTP block (DeepSeek V3/V3.2/V4, GLM-5)")
        return cls(k)

    def bind(self, engine) -> None:
        self.engine = engine

    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    # ------------------------------------------------------------------ after a prefill step
    def after_prefill(self, batch: list[tuple[Sequence, int]], step, h: torch.Tensor) -> None:
        """Run the MTP block over each chunk (its next tokens are all known now), then draft
        for the rows whose prompt is complete."""
        nxt = torch.zeros_like(step.positions)
        for r, (seq, n) in enumerate(batch):
            s = seq.num_computed - n
            nxt[r, :n] = torch.tensor(seq.token_ids[s + 1:s + n + 1])
        lasts = [n - 1 for _, n in batch]
        self._draft(batch, step, h, nxt.to(h.device), lasts)

    # ------------------------------------------------------------------ a decode (verify) step
    def verify(self, batch: list[tuple[Sequence, int]], step, h: torch.Tensor) -> list[str]:
        """Accept each row's drafts while they equal the main model's own samples."""
        e = self.engine
        logits = e.model.logits(h)                                       # [B, T, V]
        lens = []
        for r, (seq, n) in enumerate(batch):
            drafts, seq.drafts = seq.drafts, []
            taken = 0
            for i in range(n):
                tok = sample(logits[r, i:i + 1], [seq])[0]
                seq.token_ids.append(tok)
                taken += 1
                e._check_stop(seq)
                if seq.finish_reason is not None or i == len(drafts) or tok != drafts[i]:
                    break
            self.proposed += len(drafts)
            self.accepted += taken - 1
            seq.num_computed += taken                   # x_{L-1} and the accepted drafts are final
            lens.append(taken)
        nxt = torch.zeros_like(step.positions)
        for r, (seq, _) in enumerate(batch):
            s = seq.num_computed - lens[r]
            nxt[r, :lens[r]] = torch.tensor(seq.token_ids[s + 1:s + lens[r] + 1])
        valid = torch.arange(step.positions.shape[1], device=h.device)[None, :] < torch.tensor(lens, device=h.device)[:, None]
        sub = replace(step, valid=valid, lens=torch.tensor(lens, device=h.device))
        self._draft(batch, sub, h, nxt.to(h.device), [n - 1 for n in lens])
        return [seq.request_id for seq, _ in batch]

    # ------------------------------------------------------------------ drafting
    def _draft(self, batch, step, h, nxt, lasts: list[int]) -> None:
        """MTP over the step's valid positions, then k greedy drafts from each row's last one."""
        e = self.engine
        x, logits = e.model.draft_step(h, nxt, step)
        rows = [r for r, (seq, _) in enumerate(batch)
                if seq.finish_reason is None and seq.num_computed == len(seq) - 1]
        if not rows:
            return
        for r in rows:
            seq = batch[r][0]
            seq.drafts = [int(logits[r, lasts[r]].argmax())]
        cur = x[rows, torch.tensor([lasts[r] for r in rows], device=h.device)].unsqueeze(1)   # [R, 1, ...]
        for d in range(1, self.k):
            seqs = [batch[r][0] for r in rows]
            keep = [i for i, s in enumerate(seqs) if len(s) + d < e.max_model_len]
            if not keep:
                break
            rows, seqs, cur = [rows[i] for i in keep], [seqs[i] for i in keep], cur[keep]
            pos = torch.tensor([[len(s) - 2 + d] for s in seqs], device=h.device)   # reads token len-1+d
            chain = replace(step, positions=pos, valid=torch.ones_like(pos, dtype=torch.bool), starts=pos[:, 0],
                            lens=torch.ones(len(seqs), dtype=torch.long, device=h.device),
                            views=e.manager.pools.views(e.manager.tables(seqs, h.device)), history=None)
            ids = torch.tensor([[s.drafts[-1]] for s in seqs], device=h.device)
            cur, lg = e.model.draft_step(cur, ids, chain)
            for s, t in zip(seqs, lg[:, 0].argmax(-1).tolist()):
                s.drafts.append(int(t))
