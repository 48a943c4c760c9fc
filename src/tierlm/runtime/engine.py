"""`LLM`: load a checkpoint, size the paged pools from its cache streams, and serve requests
with continuous batching, chunked prefill, prefix caching and preemption."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import time
import weakref
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..dtypes import canonical
from ..errors import TierlmError
from ..model.layers import use_fast_linears
from ..spec.cache import block_size as default_block_size, entries_per_page, held_pages, layer_cache_streams
from ..plan.layouts import tierlm_record_bytes
from .manager import CacheManager
from .pools import CachePools, resolve_kv_dtype, stream_dtype
from .sampler import sample
from .scheduler import Scheduler
from .sequence import CompletionOutput, RequestOutput, SamplingParams, Sequence, Status

REFERENCES = ("official", "transformers")
CPU_DEFAULT_CACHE_FRACTION = 0.25      # of available RAM, when cache_bytes is not given


class LLM:
    """A vLLM-style engine over one checkpoint directory (config.json + safetensors)."""

    def __init__(self, model: str | os.PathLike, dtype: torch.dtype | str | None = None, device=None,
                 max_model_len: int | None = None, max_num_seqs: int = 16, max_num_batched_tokens: int = 512,
                 cache_bytes: int | None = None, block_size: int | None = None, enable_prefix_caching: bool = True,
                 speculative: dict | None = None, kv_dtype: str = "auto", indexer_dtype: str | None = None,
                 reference: str = "official", cache_dir: str | os.PathLike | None = None,
                 kv_tiers: tuple[str, ...] | list[str] | str | None = None, host_cache_bytes: int | None = None,
                 disk_cache_bytes: int | None = None, tier_policy: str = "auto", experts_on: str = "device",
                 device_expert_bytes: int | None = None, engram_on: str = "device", tier_write: str = "through",
                 remote_cache_bytes: int | None = None, cache_ttl_s: float | None = None):
        from ..model import load
        if reference not in REFERENCES:
            raise TierlmError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
        for name, v, low in (("max_num_seqs", max_num_seqs, 1), ("max_num_batched_tokens", max_num_batched_tokens, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise TierlmError(f"{name} must be an integer >= {low}, got {v!r}")
        try:
            device = torch.device(device) if device is not None else None
        except RuntimeError:
            raise TierlmError(f"unknown device {device!r}") from None
        if device is not None and device.type == "cuda" and not torch.cuda.is_available():
            raise TierlmError("device 'cuda' requested, but this torch has no CUDA device")
        self.path = Path(model)
        from ..tiers.experts import PLACES, is_routed_expert
        from ..tiers.tables import is_engram_table
        for name, v in (("experts_on", experts_on), ("engram_on", engram_on)):
            if v not in PLACES:
                raise TierlmError(f"{name} must be one of {', '.join(PLACES)}, got {v!r}")
        unread = [f for f, on in ((is_routed_expert, experts_on), (is_engram_table, engram_on)) if on == "disk"]
        self.model = load(self.path, dtype=dtype, device=device, progress=False,
                          skip=(lambda n: any(f(n) for f in unread)) if unread else None)
        self.experts = self._experts(experts_on, device_expert_bytes) if experts_on != "device" else None
        if engram_on != "device":
            from ..tiers.tables import offload_engram
            offload_engram(self.model, engram_on, self._mmap() if engram_on == "disk" else None)
        if hasattr(self.model, "set_reference"):
            self.model.set_reference(reference, exact_fp32=False)
        use_fast_linears(self.model)
        self.spec = spec = self.model.spec
        weight = next(self.model.parameters())
        self.dtype, self.device = weight.dtype, weight.device
        self.kv_dtype = resolve_kv_dtype(kv_dtype, self.dtype)
        self.indexer_dtype = resolve_kv_dtype(indexer_dtype if indexer_dtype is not None else
                                              ("auto" if kv_dtype is None or canonical(kv_dtype) == "auto" else "bf16"),
                                              self.dtype, "indexer_dtype")
        self.block = default_block_size(spec) if block_size is None else block_size
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise TierlmError(f"block_size must be a positive integer, got {block_size!r}")
        self.max_model_len = max_model_len or spec.max_position
        if isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) or self.max_model_len < 2:
            raise TierlmError(f"max_model_len must be an integer >= 2, got {max_model_len!r}")
        if self.max_model_len > spec.max_position:
            raise TierlmError(f"max_model_len {self.max_model_len} exceeds the model's {spec.max_position} positions")
        self.speculator = None
        if speculative is not None:
            from .speculative import MTPSpeculator
            self.speculator = MTPSpeculator.check(self.model, speculative)
        self.layers = self.model.cache_layers() if self.speculator else self.model.cache_layers()[:spec.num_layers]
        per_block = CachePools.block_bytes(spec, self.layers, self.block, self.dtype, self.kv_dtype, self.indexer_dtype)
        reserve = 2 * self.speculator.k if self.speculator else 0   # draft positions a decode step may write
        blocks = self._blocks(per_block, cache_bytes, max_num_seqs, max_num_batched_tokens + reserve)
        pools = CachePools(spec, self.layers, blocks, self.block, self.dtype, self.kv_dtype, self.indexer_dtype,
                           self.device)
        root = self.fingerprint(reference)
        self.store = None
        if cache_dir is not None or host_cache_bytes is not None or kv_tiers:
            self.store = self._tiers(pools, root, cache_dir, kv_tiers, host_cache_bytes, disk_cache_bytes,
                                     tier_policy, tier_write, enable_prefix_caching, remote_cache_bytes, cache_ttl_s)
        self.manager = CacheManager(pools, root, enable_prefix_caching,
                                    keep_last_block=self.speculator is not None, store=self.store,
                                    extents=self.blocks_per_sequence)
        self.scheduler = Scheduler(self.manager, max_num_seqs, max_num_batched_tokens, reserve=reserve)
        if self.speculator is not None:
            self.speculator.bind(self)
        self.tokenizer = _tokenizer(self.path)
        self.eos = _eos_ids(self.path)
        self._requests: dict[str, list[Sequence]] = {}
        self._counter = 0
        warm = (root, str(self.device))
        if self.experts is None and warm not in _WARMED:   # (off-device experts would be read for nothing)
            self._warm_up()
            _WARMED.add(warm)

    @torch.no_grad()
    def _warm_up(self) -> None:
        """Run one token through the model once at start, so that the first request does not pay
        for first-call setup (oneDNN builds its kernels for a shape on first use: the 99.5M
        Llama's first step took 50-80 ms longer than the next ones here). Those kernels are
        kept for the process, so a later engine of the same model and layout skips this. Its
        blocks are freed unnamed: no cache entry, tier or statistic sees it."""
        seq = Sequence("warm-up", 0, [0], SamplingParams(max_tokens=1))
        batch = [(seq, 1)]
        self.manager.allocate(seq, 1)
        try:
            h = self.model.hidden(self._ids(batch).to(self.device), self._step(batch))
            self.model.logits(h[:, -1:])
        finally:
            self.manager.free(seq)

    def _tiers(self, pools, root, cache_dir, kv_tiers, host_bytes, disk_bytes, policy, write, prefix_caching,
               remote_bytes, ttl_s):
        """The host / disk / remote tiers under the pools (`tierlm.tiers`)."""
        from ..tiers import TierStore
        if not prefix_caching:
            raise TierlmError("kv tiers store prefix blocks: they need enable_prefix_caching=True")
        if self.speculator is not None:
            raise TierlmError("kv tiers with speculative decoding are not supported yet")
        if isinstance(kv_tiers, str):
            kv_tiers = [t.strip() for t in kv_tiers.split(",") if t.strip()]
        tiers = tuple(kv_tiers) if kv_tiers else (("host", "disk") if cache_dir is not None else ("host",))
        if host_bytes is None:
            host_bytes = min(4 << 30, _memory_budget(torch.device("cpu")) // 2)
        if disk_bytes is None and cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            disk_bytes = min(64 << 30, shutil.disk_usage(cache_dir).free // 2)
        store = TierStore(self.spec, pools, root, tiers, cache_dir, host_bytes, disk_bytes or 0, policy, ttl_s=ttl_s,
                          write=write, remote_bytes=64 << 30 if remote_bytes is None else remote_bytes)
        ref = weakref.ref(self)                      # blocks still queued reach the disk on exit
        atexit.register(lambda: ref() is not None and ref().close())
        return store

    def _experts(self, where: str, budget: int | None):
        """Routed experts in host memory or mapped from the checkpoint, a device-resident set of the most used ones."""
        from ..tiers.experts import ExpertCache
        return ExpertCache(self.model, where, budget, self._mmap() if where == "disk" else None)

    def _mmap(self):
        """The checkpoint's tensors, memory-mapped by their module names."""
        from ..model.families import get
        from ..model.loader import checkpoint_files, wrapper_rename
        from ..tiers.experts import SafetensorsMmap
        files = checkpoint_files(self.path)
        return SafetensorsMmap(files, wrapper_rename(files, getattr(get(self.model.spec.family), "rename", None))[0])

    def close(self) -> None:
        """Finish queued disk writes and release the cache directory (also run at exit)."""
        if self.store is not None:
            self.store.close(self.manager.hit_by_tier)
            self.store = self.manager.store = None

    # ------------------------------------------------------------------ sizing
    def _blocks(self, per_block: dict[int, int], cache_bytes: int | None, seqs: int, chunk: int) -> dict[int, int]:
        """cache_bytes buys sequences of max_model_len: each group gets its share of blocks, a
        window group what one sequence can hold at once during a step of `chunk` positions. Default: room
        for max_num_seqs such sequences, within a quarter of free RAM (90% of free GPU memory)."""
        need = {g: (-(-self.max_model_len // self.block) if g == 0 else -(-(g + chunk) // self.block) + 1)
                for g in per_block}
        self.blocks_per_sequence = need
        self.bytes_per_sequence = sum(need[g] * per_block[g] for g in per_block)
        if cache_bytes is None:
            cache_bytes = min(seqs * self.bytes_per_sequence, max(_memory_budget(self.device), self.bytes_per_sequence))
        least = sum((need[g] if g else 1) * per_block[g] for g in per_block)
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < least:
            raise TierlmError(f"cache_bytes {cache_bytes!r} is too small: the pools need at least {least} bytes "
                              f"({self.bytes_per_sequence} for one sequence of max_model_len {self.max_model_len})")
        share = cache_bytes / self.bytes_per_sequence
        return {g: max(need[g] if g else 1, int(share * need[g])) for g in per_block}

    def fingerprint(self, reference: str) -> bytes:
        """Root of the prefix-hash chain: config, weights identity, layout and dtypes."""
        h = hashlib.sha256()
        h.update((self.path / "config.json").read_bytes())
        for f in sorted(self.path.glob("*.safetensors")):
            st = f.stat()
            h.update(f.name.encode() + st.st_size.to_bytes(8, "little"))
            with open(f, "rb") as fh:                  # header (names, shapes, offsets) + first MiB of data
                h.update(fh.read(1 << 20))
        h.update(json.dumps([self.block, self.kv_dtype, self.indexer_dtype, str(self.dtype), reference,
                             [l.index for l in self.layers]]).encode())
        return h.digest()

    def cache_bytes(self, num_tokens: int) -> int:
        """Bytes the pools hold for one sequence of num_tokens tokens (all layers and streams,
        block rounding, window freeing): what `tierlm plan --layout tierlm` reports."""
        return sum(self.cache_bytes_by_stream(num_tokens).values())

    def cache_bytes_by_stream(self, num_tokens: int) -> dict[str, int]:
        """`cache_bytes` split by cache stream name (summed over layers)."""
        out: dict[str, int] = {}
        for layer in self.layers:
            for s in layer_cache_streams(self.spec, layer):
                rec = tierlm_record_bytes(s, s.width, stream_dtype(s, self.kv_dtype, self.indexer_dtype, self.dtype))
                out[s.name] = out.get(s.name, 0) + held_pages(s, num_tokens, self.block) * entries_per_page(s, self.block) * rec
        return out

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block, e.g. after the model's weights were updated in
        place (RL training): blocks computed by other weights must not be hit."""
        if self.scheduler.has_work():
            raise TierlmError("reset_prefix_cache needs an idle engine: requests are still running")
        for bp in self.manager.bp.values():
            bp.forget()

    def stats(self) -> dict:
        return {"cache_bytes_in_use": self.manager.bytes_in_use(), "blocks_in_use": self.manager.blocks_in_use(),
                "cache_bytes_total": self.manager.pools.nbytes(), "prefix_hit_tokens": self.manager.hit_tokens,
                "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "num_preemptions": self.scheduler.num_preemptions,
                "spec_acceptance_rate": self.speculator.acceptance_rate() if self.speculator else None,
                "expert_cache_hit_rate": self.experts.hit_rate() if self.experts is not None else None,
                **self._tier_stats()}

    def _tier_stats(self) -> dict:
        by_tier = {"device": 0, "host": 0, "disk": 0, "remote": 0, **self.manager.hit_by_tier}
        if self.store is None:
            return {"prefix_hit_tokens_by_tier": by_tier}
        return {"prefix_hit_tokens_by_tier": by_tier,
                "tier_bytes": {"device": self.manager.bytes_in_use(), **self.store.bytes_by_tier()},
                "reloads": self.store.stats["reloads"], "recomputes": self.store.stats["recomputes"],
                "blocks_stored": self.store.stats["stored"], "blocks_prefetched": self.store.stats["prefetched"],
                "reload_seconds": self.store.stats["reload_seconds"],
                "corrupt_blocks_dropped": self.store.corrupt(),
                "disk_full": self.store.stats["disk_full"],
                "remote_errors": self.store.remote.stats["errors"] if self.store.remote is not None else 0}

    # ------------------------------------------------------------------ requests
    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if set(prompt) != {"prompt_token_ids"}:
                raise TierlmError("a dict prompt takes exactly one key, 'prompt_token_ids'")
            prompt = prompt["prompt_token_ids"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TierlmError(f"string prompt, but {self.path} has no tokenizer.json: pass token ids")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=False).ids
        # checked with C loops (a 32k-token prompt: 1.8 ms, was 3.9 ms): plain ints
        # only (bool is its own type), then the range
        if isinstance(prompt, (list, tuple)) and set(map(type, prompt)) <= {int}:
            if prompt and (min(prompt) < 0 or max(prompt) >= self.spec.vocab_size):
                bad = next(t for t in prompt if not 0 <= t < self.spec.vocab_size)
                raise TierlmError(f"token id {bad} is outside the vocabulary (0..{self.spec.vocab_size - 1})")
            return None, list(prompt)
        raise TierlmError("a prompt is a string, a list of token ids or {'prompt_token_ids': [...]}")

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one request; a bad one raises TierlmError and leaves the engine as it was."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TierlmError("params must be a tierlm.SamplingParams")
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise TierlmError("empty prompt")
        if len(ids) >= self.max_model_len:
            raise TierlmError(f"prompt of {len(ids)} tokens does not fit max_model_len {self.max_model_len} "
                              "(one position is needed for the first output token)")
        total = min(len(ids) + params.max_tokens, self.max_model_len)
        why = self.manager.fits_ever(total + self.scheduler.reserve, self.scheduler.budget)   # + draft positions
        if why:
            raise TierlmError(f"request can never fit in the cache pools: it {why}; raise cache_bytes "
                              "or lower max_tokens")
        rid = request_id or f"req-{self._counter}"
        self._counter += 1
        if rid in self._requests:
            raise TierlmError(f"request id {rid!r} is already in use")
        busy = self.scheduler.has_work()
        seqs = []
        for i in range(params.n):
            gen = None
            if not params.greedy:
                gen = torch.Generator()
                gen.manual_seed(params.seed + i if params.seed is not None else torch.seed())
            seq = Sequence(rid, i, ids, params, prompt=text, generator=gen)
            seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[rid] = seqs
        if busy:                               # disk reads overlap the steps before its turn (an idle
            self.manager.prefetch(ids)         # engine's next step reloads it at once: nothing to overlap)
        return rid

    def abort(self, request_id: str) -> None:
        for seq in self._requests.pop(request_id, []):
            if seq.status is Status.RUNNING:
                self.scheduler.finish(seq)
            elif seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
                self.manager.free(seq)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the requests that made progress."""
        batch, prefill = self.scheduler.schedule()
        if not batch:
            if self.scheduler.stalled():           # an error, not a loop that waits forever
                raise TierlmError(f"the engine cannot make progress: {len(self.scheduler.waiting)} request(s) wait "
                                  f"and none runs, but the pools have no room ({self.manager.blocks_in_use()} "
                                  "blocks held by no request); this is a bug in tierlm, please report it")
            return []
        start = time.perf_counter()
        flops = self._prefill_flops(batch) if prefill and self.store is not None else 0.0
        step = self._step(batch)
        ids = self._ids(batch).to(self.device)
        if self.experts is not None and hasattr(self.model, "known_experts"):
            self.experts.prefetch(self.model.known_experts(ids))     # hash-routed layers: known now
        h = self.model.hidden(ids, step)
        if self.speculator is not None and not prefill:
            touched = self.speculator.verify(batch, step, h)
        else:
            touched = self._sample_last(batch, h)
            if self.speculator is not None:
                self.speculator.after_prefill(batch, step, h)
            if flops and (self.device.type == "cpu" or touched):     # (a sampled token waited for the step)
                self.store.flops.add(flops, time.perf_counter() - start)
        for seq, _ in batch:
            if seq.status is Status.RUNNING:
                self.manager.commit(seq)
                self.manager.trim(seq)
                if seq.finish_reason is not None:
                    self.scheduler.finish(seq)
        if self.store is not None:
            self.store.end_step()
        return [self._output(rid) for rid in dict.fromkeys(touched)]

    def _prefill_flops(self, batch: list[tuple[Sequence, int]]) -> float:
        """The step's prefill FLOPs, as the reload-or-recompute policy counts them: what it
        learns the machine's compute rate from."""
        return sum(self.store.recompute_flops(seq.num_computed, seq.num_computed + n) for seq, n in batch)

    def _sample_last(self, batch: list[tuple[Sequence, int]], h: torch.Tensor) -> list[str]:
        """Count the step's tokens as cached; sample after each row that reached its last token."""
        rows, seqs = [], []
        for r, (seq, n) in enumerate(batch):
            seq.num_computed += n
            if seq.num_computed == len(seq):
                rows.append((r, n - 1))
                seqs.append(seq)
        if not rows:
            return []
        idx_r = torch.tensor([r for r, _ in rows], device=h.device)
        idx_t = torch.tensor([t for _, t in rows], device=h.device)
        logits = self.model.logits(h[idx_r, idx_t].unsqueeze(1))[:, 0]
        for seq, tok in zip(seqs, sample(logits, seqs)):
            seq.token_ids.append(tok)
            self._check_stop(seq)
        return [s.request_id for s in seqs]

    @staticmethod
    def _ids(batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """[B, T] the step's tokens (a decode row under speculation: its last token + drafts), 0-padded."""
        t = max(n for _, n in batch)
        rows = []
        for seq, n in batch:                 # built in Python: per-row tensor writes cost a call each
            s = seq.num_computed
            rows.append((seq.token_ids + seq.drafts)[s:s + n] + [0] * (t - n))
        return torch.tensor(rows, dtype=torch.long)

    def _step(self, batch: list[tuple[Sequence, int]]):
        """The Step for rows starting at each sequence's num_computed with n new tokens each."""
        from ..model.ops import Step
        dev = self.device
        seqs = [s for s, _ in batch]
        t = max(n for _, n in batch)
        c = getattr(self.model, "history", 0)
        positions, valid, history = [], [], []
        for seq, n in batch:                 # lists, then one tensor each: a decode step's rows are many
            s = seq.num_computed
            positions.append(list(range(s, s + n)) + [s] * (t - n))      # padding: the row's first position
            valid.append([True] * n + [False] * (t - n))
            if c:
                past = seq.token_ids[max(0, s - c):s]
                history.append([-1] * (c - len(past)) + past)
        return Step(positions=torch.tensor(positions, device=dev), valid=torch.tensor(valid, device=dev),
                    starts=torch.tensor([s.num_computed for s in seqs], device=dev),
                    lens=torch.tensor([n for _, n in batch], device=dev),
                    views=self.manager.pools.views(self.manager.tables(seqs, dev)),
                    history=torch.tensor(history, dtype=torch.long, device=dev) if c else None)

    def _check_stop(self, seq: Sequence) -> None:
        p, tok = seq.params, seq.token_ids[-1]
        if (not p.ignore_eos and tok in self.eos) or tok in (p.stop_token_ids or ()):
            seq.finish_reason = "stop"
        elif p.stop and self.tokenizer is not None and any(s in self._text(seq, cut=False) for s in p.stop):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"

    def _text(self, seq: Sequence, cut: bool = True) -> str:
        """The output text, ended before the first stop string (cut=False: as generated)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        for s in (seq.params.stop or ()) if cut else ():
            if s in text:
                text = text[:text.index(s)]
        return text

    def _output(self, rid: str) -> RequestOutput:
        seqs = self._requests[rid]
        first = seqs[0]
        outs = [CompletionOutput(s.index, list(s.output_ids), self._text(s), s.finish_reason) for s in seqs]
        done = all(s.finish_reason is not None for s in seqs)
        return RequestOutput(rid, first.prompt, list(first.prompt_token_ids), outs, done,
                             max(s.num_cached_prompt for s in seqs))

    # ------------------------------------------------------------------ front ends
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Outputs in prompt order. A prompt that cannot be served gets an output with
        finish_reason 'error' and the reason, and the others are served as usual."""
        results = {}
        order = []
        for prompt, p in zip(*_pair(prompts, params)):
            try:
                rid = self.add_request(prompt, p)
            except TierlmError as e:
                rid = f"error-{len(order)}"
                results[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None,
                                             prompt if isinstance(prompt, list) else [],
                                             [CompletionOutput(0, [], "", "error", str(e))], True)
            order.append(rid)
        for out in self._drive(use_tqdm, sum(1 for r in order if r not in results)):
            if out.finished:
                results[out.request_id] = out
                self._requests.pop(out.request_id, None)
        return [results[r] for r in order]

    def generate_stream(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that adds tokens (the last is finished)."""
        rid = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(rid)

    def _drive(self, use_tqdm: bool, total: int) -> Iterable[RequestOutput]:
        from rich.progress import Progress
        with Progress(disable=not use_tqdm, transient=True) as bar:
            task = bar.add_task("generating", total=total)
            while self.scheduler.has_work():
                for out in self.step():
                    if out.finished:
                        bar.advance(task)
                    yield out


_WARMED: set[tuple[bytes, str]] = set()     # (fingerprint, device) of the engines warmed up in this process


def _pair(prompts, params):
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    prompts = list(prompts)
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * len(prompts)
    if len(params) != len(prompts):
        raise TierlmError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    return prompts, params


def _tokenizer(path: Path):
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:                         # tokenizers raises its own exception types
        raise TierlmError(f"{f}: not a valid tokenizer ({e})") from None


def _eos_ids(path: Path) -> set[int]:
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.is_file():
            try:
                eos = json.loads(f.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError):
                continue
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {int(eos)}
    return set()


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 8 << 30
    return int(avail * CPU_DEFAULT_CACHE_FRACTION)
