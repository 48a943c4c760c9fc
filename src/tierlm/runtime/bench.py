"""Throughput of the engine itself: prefill and decode tokens/s at a batch and context length.

Prompts are random token ids (the figures depend on shapes, not on text); every request
decodes with ignore_eos so all rows run the same number of steps.
"""

from __future__ import annotations

import time

import torch

from .engine import LLM
from .scheduler import Scheduler
from .sequence import SamplingParams


def _prompts(llm: LLM, batch: int, context: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, llm.spec.vocab_size, (batch, context), generator=g).tolist()


def prefill(llm: LLM, batch: int, context: int, seed: int = 0) -> dict:
    """Time to prefill `batch` prompts of `context` tokens (each different, so no prefix hits)."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for p in _prompts(llm, batch, context, seed):
        llm.add_request(p, params)
    t0 = time.perf_counter()
    while llm.scheduler.has_work():
        llm.step()
    _sync(llm)
    dt = time.perf_counter() - t0
    return {"mode": "prefill", "batch": batch, "context": context, "seconds": dt,
            "tokens_per_s": batch * context / dt, "cache_bytes_per_seq": llm.cache_bytes(context)}


def decode(llm: LLM, batch: int, context: int, tokens: int = 32, seed: int = 0) -> dict:
    """Decode tokens/s of `batch` sequences after a `context`-token prompt (prefill not timed)."""
    params = SamplingParams(temperature=0, max_tokens=tokens + 2, ignore_eos=True)   # + prefill + warm-up step
    for p in _prompts(llm, batch, context, seed):
        llm.add_request(p, params)
    while any(Scheduler.prefilling(s) for s in llm.scheduler.running) or llm.scheduler.waiting:
        llm.step()
    llm.step()                                      # the first decode step warms caches and allocators
    _sync(llm)
    made, steps = 0, 0
    in_use = llm.stats()["cache_bytes_in_use"]
    t0 = time.perf_counter()
    while llm.scheduler.has_work():
        made += sum(len(o.outputs) for o in llm.step())
        steps += 1
    _sync(llm)
    dt = time.perf_counter() - t0
    return {"mode": "decode", "batch": batch, "context": context, "steps": steps, "seconds": dt,
            "tokens_per_s": made / dt if dt else 0.0, "step_ms": 1e3 * dt / max(steps, 1),
            "cache_bytes_per_seq": llm.cache_bytes(context), "cache_bytes_in_use": in_use}


def _sync(llm: LLM) -> None:
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)


def decode_at(llm: LLM, context: int, tokens: int = 16, seed: int = 0) -> dict:
    """Decode step time of one sequence at `context` tokens, without paying for the prefill:
    the cache pages are filled with random entries and the sequence is marked as computed.
    The work a decode step does depends on how many entries it reads, not on their values,
    so this times long contexts a CPU could not prefill in reasonable time."""
    (prompt,) = _prompts(llm, 1, context, seed)
    llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True))
    seq = llm.scheduler.waiting.popleft()
    g = torch.Generator(device="cpu").manual_seed(seed)
    for t in llm.manager.pools.pages.values():
        if t.is_floating_point():                   # all but the spare page, which must read as zeros
            t[:-1].copy_(torch.randn(t[:-1].shape, generator=g, dtype=torch.float32).to(t.dtype))
    seq.num_computed = context - 1                  # only the last prompt token is left to run
    llm.manager.allocate(seq, context)
    seq.status = type(seq.status).RUNNING
    llm.scheduler.running.append(seq)
    llm.step()                                      # warm-up step (also the prompt's last token)
    _sync(llm)
    t0 = time.perf_counter()
    steps = 0
    while llm.scheduler.has_work():
        llm.step()
        steps += 1
    _sync(llm)
    dt = time.perf_counter() - t0
    return {"mode": "decode_at", "context": context, "steps": steps, "step_ms": 1e3 * dt / max(steps, 1),
            "cache_bytes_per_seq": llm.cache_bytes(context)}
