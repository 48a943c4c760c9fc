"""Continuous batching: which sequences run in the next step, and how many tokens each.

A step is either all prefill (chunks of prompts, at most `max_num_batched_tokens` tokens in
all, so a long prompt never needs more than one chunk of activations) or all decode (one
token per running sequence, plus the draft tokens under speculation). Requests join
between steps; when the pools run out, the newest running sequence is preempted: its blocks
are freed (their names stay cached) and it goes back to the front of the queue, to be
recomputed, mostly from prefix hits, when memory allows. The samples of an n > 1 request wait
while one of them computes their prompt, then take it from the prefix cache.
"""

from __future__ import annotations

from collections import deque

from .manager import CacheManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, manager: CacheManager, max_num_seqs: int, max_num_batched_tokens: int, reserve: int = 0):
        self.manager = manager
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.reserve = reserve              # extra positions a decode step may write (draft chains)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._preempted: set[int] = set()           # preempted during the current schedule() call

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @staticmethod
    def prefilling(seq: Sequence) -> bool:
        return seq.num_computed < len(seq) - 1

    def schedule(self) -> tuple[list[tuple[Sequence, int]], bool]:
        """[(sequence, new tokens)] for the next step, and whether it is a prefill step."""
        budget, batch = self.budget, []
        self._preempted: set[int] = set()
        for seq in list(self.running):                  # unfinished prompts first
            if budget <= 0:
                break
            if seq.status is Status.RUNNING and self.prefilling(seq):
                n = min(len(seq) - seq.num_computed, budget)
                if self._reserve(seq, seq.num_computed + n + self.reserve):
                    batch.append((seq, n))
                    budget -= n
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.seq_id in self._preempted:            # not back in the step that evicted it:
                break                                   # let the older sequences run first
            if self._sibling_prefilling(seq):
                deferred.append(self.waiting.popleft())
                continue
            self.manager.match(seq)
            n = min(len(seq) - seq.num_computed, budget)
            if not self.manager.can_allocate(seq, seq.num_computed + n + self.reserve):
                self.manager.free(seq)
                seq.num_computed = 0
                break
            self.manager.allocate(seq, seq.num_computed + n + self.reserve)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if not seq.output_ids:                       # a recompute after preemption is not a prompt hit
                seq.num_cached_prompt = min(seq.num_computed, seq.num_prompt)
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        if batch:
            return batch, True
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue                                 # preempted below, in this loop
            n = 1 + len(seq.drafts)
            if self._reserve(seq, seq.num_computed + n + self.reserve):
                batch.append((seq, n))
        return batch, False

    def stalled(self) -> bool:
        """After a schedule() that chose nothing: requests wait, none runs and none was just
        preempted, so no step will ever free a block for them (blocks lost to a bug)."""
        return bool(self.waiting) and not self.running and not self._preempted

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        """A sample of an n > 1 request waits while a sibling computes their shared prompt,
        then takes its full blocks from the prefix cache instead of computing them again."""
        if not self.manager.prefix_caching or seq.output_ids or seq.num_prompt <= self.manager.block:
            return False
        return any(s.request_id == seq.request_id and self.prefilling(s) for s in self.running)

    def _reserve(self, seq: Sequence, end: int) -> bool:
        """Allocate for seq, preempting the newest other running sequences if needed;
        False when seq itself had to be preempted."""
        while not self.manager.can_allocate(seq, end):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.manager.allocate(seq, end)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.manager.free(seq)
        self._preempted.add(seq.seq_id)
        seq.num_computed, seq.drafts = 0, []
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.manager.free(seq)
        seq.status = Status.FINISHED
