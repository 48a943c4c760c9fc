"""A request as the engine tracks it, its sampling parameters and the outputs it returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from itertools import count

from ..errors import TierlmError


@dataclass
class SamplingParams:
    """vLLM's sampling fields. temperature 0 is greedy; top_k 0 / -1 and top_p 1 disable those filters."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    n: int = 1

    def __post_init__(self):
        def bad(field_: str, why: str):
            raise TierlmError(f"SamplingParams.{field_} {why}, got {getattr(self, field_)!r}")

        for name in ("temperature", "top_p", "min_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        for name, low in (("top_k", -1), ("max_tokens", 1), ("n", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                bad(name, f"must be an integer >= {low}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", "must be an integer")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if self.stop_token_ids is not None and not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                       for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None       # stop | length | error | None while running
    error: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0      # prompt tokens served from the prefix cache


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int                      # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    token_ids: list[int] = field(default_factory=list)       # prompt + output
    num_computed: int = 0           # tokens whose cache entries are stored
    num_cached_prompt: int = 0      # prompt tokens that were prefix-cache hits
    tables: dict[int, list[int]] = field(default_factory=dict)   # group -> logical block -> block id (-1: none)
    hashes: list[bytes] = field(default_factory=list)       # names of the full blocks so far
    status: Status = Status.WAITING
    finish_reason: str | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    generator: object = None        # torch.Generator for seeded sampling
    drafts: list[int] = field(default_factory=list)         # speculative tokens to verify next step

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    def __len__(self) -> int:
        return len(self.token_ids)
