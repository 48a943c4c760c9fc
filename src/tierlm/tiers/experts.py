"""Routed experts off the device: kept in host memory or memory-mapped from the checkpoint's
safetensors files, with a device-resident set of the most used experts under a byte budget.

Every MoE family keeps its routed experts as modules of an `nn.ModuleList` named `experts`
and runs them through `tierlm.model.moe.dispatch`, which calls one expert module at a time.
A forward pre-hook on each expert module loads its weights before it runs (on a miss), and
keeps them if the expert is among the most used ones the budget holds; otherwise a forward
hook drops them again right after. No family code changes. Layers whose routing is known before they run (V4's hash-routed layers: experts
from `tid2eid[token]`) have their experts loaded at the start of the step (`prefetch`).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import TierlmError

PLACES = ("device", "host", "disk")
EXPERT = re.compile(r"(.*\.experts\.\d+)\.(.+)$")
ST_DTYPES = {"F64": (np.float64, None), "F32": (np.float32, None), "F16": (np.float16, None),
             "BF16": (np.uint16, torch.bfloat16), "I64": (np.int64, None), "I32": (np.int32, None)}


def is_routed_expert(name: str) -> bool:
    """State-dict names of per-expert modules (`...experts.<i>.<param>`); gpt-oss's fused
    expert tensors do not match and stay on the device."""
    return EXPERT.match(name) is not None


class SafetensorsMmap:
    """Tensors of safetensors files memory-mapped without reading them: name -> zero-copy
    CPU tensor whose pages the OS reads on first touch."""

    def __init__(self, files: list[Path], rename=None):
        self.index: dict[str, tuple[Path, str, list[int], int]] = {}
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                name = rename(key) if rename else key
                if name is None:                           # a multimodal wrapper's vision tower
                    continue
                begin, _ = meta["data_offsets"]
                self.index[name] = (f, meta["dtype"], meta["shape"], 8 + n + begin)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str) -> torch.Tensor:
        f, dtype, shape, offset = self.index[name]
        if dtype not in ST_DTYPES:
            raise TierlmError(f"{name}: experts_on='disk' cannot map a {dtype} tensor; use experts_on='host'")
        np_dtype, view = ST_DTYPES[dtype]
        # copy-on-write mapping: writable for torch, never written back to the file
        t = torch.from_numpy(np.memmap(f, dtype=np_dtype, mode="c", offset=offset, shape=tuple(shape)))
        return t.view(view) if view is not None else t

    def dtype(self, name: str) -> str:
        return self.index[name][1]


def routed_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{name}.{i}", m) for name, mod in model.named_modules()
            if name.rsplit(".", 1)[-1] == "experts" and isinstance(mod, nn.ModuleList) for i, m in enumerate(mod)]


class ExpertCache:
    def __init__(self, model: nn.Module, where: str, device_bytes: int | None, source: SafetensorsMmap | None = None):
        if where not in PLACES[1:]:
            raise TierlmError(f"experts_on must be one of {', '.join(PLACES)}, got {where!r}")
        self.modules = dict(routed_experts(model))
        if not self.modules:
            raise TierlmError("this model has no per-expert modules to keep off the device")
        self.where, self.source = where, source
        ref = next(p for p in model.parameters() if p.is_floating_point() and p.device.type != "meta")
        self.device, self.dtype = ref.device, ref.dtype
        self.params = {name: [n for n, _ in m.named_parameters()] for name, m in self.modules.items()}
        self.host: dict[str, dict[str, torch.Tensor]] = {}
        self.nbytes = {}
        for name, m in self.modules.items():
            shapes = {pn: p.shape for pn, p in m.named_parameters()}
            self.nbytes[name] = sum(int(np.prod(s)) for s in shapes.values()) * ref.element_size()
            if where == "host":
                pin = self.device.type == "cuda"
                self.host[name] = {pn: (p.detach().cpu().pin_memory() if pin else p.detach().cpu().clone())
                                   for pn, p in m.named_parameters()}
            else:
                bad = [f"{name}.{pn}" for pn in shapes if f"{name}.{pn}" not in source
                       or source.dtype(f"{name}.{pn}") not in ST_DTYPES or f"{name}.{pn}_scale_inv" in source]
                if bad:
                    raise TierlmError(f"experts_on='disk': tensor {bad[0]} is not stored as a plain float tensor under "
                                      "that name (quantised or renamed experts need experts_on='host')")
            self._drop(m)
            m.register_forward_pre_hook(self._hook(name))
            m.register_forward_hook(self._after(name))
        total = sum(self.nbytes.values())
        self.budget = total // 2 if device_bytes is None else device_bytes
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 0:
            raise TierlmError(f"device_expert_bytes must be a non-negative integer, got {device_bytes!r}")
        self.resident: dict[str, nn.Module] = {}
        self.uses: dict[str, int] = {}
        self.hits = self.misses = 0

    def _hook(self, name: str):
        def pre(module, args):
            self.ensure(name)
        return pre

    def _after(self, name: str):
        def post(module, args, out):
            if name not in self.resident:          # used once, not worth a slot: drop again
                self._drop(module)
        return post

    def ensure(self, name: str) -> None:
        """Load expert `name` if it is not resident. It stays resident if it fits the budget
        or has been used more often than the least used resident expert, which it replaces
        (a frequency rule: layers run in a cycle, and under LRU a budget smaller than one
        step's experts would evict every expert just before its next use)."""
        self.uses[name] = self.uses.get(name, 0) + 1
        if name in self.resident:
            self.hits += 1
            return
        self.misses += 1
        m = self.modules[name]
        for pn in self.params[name]:
            src = self.host[name][pn] if self.where == "host" else self.source.get(f"{name}.{pn}")
            _set(m, pn, src.to(self.device, self.dtype, non_blocking=True, copy=True))
        used = sum(self.nbytes[n] for n in self.resident)
        while used + self.nbytes[name] > self.budget and self.resident:
            victim = min(self.resident, key=lambda n: self.uses[n])
            if self.uses[victim] >= self.uses[name]:
                return                              # transient: dropped after this call
            self._drop(self.resident.pop(victim))
            used -= self.nbytes[victim]
        if used + self.nbytes[name] <= self.budget:
            self.resident[name] = m

    def prefetch(self, names) -> None:
        for name in names:
            self.ensure(name)

    def _drop(self, m: nn.Module) -> None:
        for pn, p in list(m.named_parameters()):
            _set(m, pn, torch.empty(0, dtype=p.dtype, device=self.device if p.device.type != "meta" else "meta"))

    def hit_rate(self) -> float | None:
        n = self.hits + self.misses
        return self.hits / n if n else None


def _set(m: nn.Module, path: str, t: torch.Tensor) -> None:
    *mods, leaf = path.split(".")
    for part in mods:
        m = getattr(m, part)
    m._parameters[leaf] = nn.Parameter(t, requires_grad=False)
