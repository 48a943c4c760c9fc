"""A small pre-training loop for tierlm's own model modules: next-token cross-entropy plus
the MTP block's next-next-token loss, Muon for the blocks' hidden matrices and AdamW for
everything else.

It trains the very module `tierlm.LLM` serves (`model(ids, mtp_ids=...)` over an
identity-table cache), so what is trained is what is served.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TierlmError

BLOCK_PREFIXES = ("model.layers.", "mtp.")
GATES = ("weights_proj",)     # nn.Linear layers that emit per-head gate weights, not hidden features


def init_params(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """transformers' DeepSeek initialisation: linear, embedding, router and mHC projection
    weights ~ N(0, std); norms and mHC scales 1; biases, sinks and position biases 0.
    Hash-routing tables (`tid2eid`) get top_k distinct random experts per token id."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf.endswith("scale"):
                p.fill_(1.0)
            elif leaf.endswith(("base", "bias", "attn_sink", "ape")):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                vocab, k = b.shape
                experts = model.spec.moe.num_experts
                b.copy_(torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(vocab)]))


def muon_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names for Muon, names for AdamW). Muon orthogonalises 2-D updates, which suits the
    hidden matrices of the blocks (attention, compressor, indexer, expert and MTP
    projections: every nn.Linear weight under a block except gates); embeddings, the output
    head, norms, router and mHC gates, sinks and position biases go to AdamW."""
    muon = set()
    for mod_name, mod in model.named_modules():
        if (isinstance(mod, nn.Linear) and mod_name.startswith(BLOCK_PREFIXES)
                and mod_name.rsplit(".", 1)[-1] not in GATES):
            muon.add(f"{mod_name}.weight")
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n in muon], [n for n in names if n not in muon]


def optimizers(model: nn.Module, lr: float, weight_decay: float = 0.01) -> list[torch.optim.Optimizer]:
    """Muon (its learning rate matched to AdamW's update RMS) + AdamW, per `muon_split`."""
    params = dict(model.named_parameters())
    muon, adamw = muon_split(model)
    return [torch.optim.Muon([params[n] for n in muon], lr=lr, weight_decay=weight_decay,
                             adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW([params[n] for n in adamw], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)]


def lm_losses(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(next-token CE, MTP next-next-token CE or None) of batch [B, T + 2]."""
    t = batch.shape[1] - 2
    ids, nxt, nxt2 = batch[:, :t], batch[:, 1:t + 1], batch[:, 2:t + 2]
    if getattr(model, "num_mtp_layers", 0):
        logits, draft = model(ids, mtp_ids=nxt)
        mtp = F.cross_entropy(draft.flatten(0, 1).float(), nxt2.flatten())
    else:
        logits, mtp = model(ids), None
    return F.cross_entropy(logits.flatten(0, 1).float(), nxt.flatten()), mtp


@dataclass
class TrainLog:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    mtp_loss: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train(model: nn.Module, next_batch: Callable[[], torch.Tensor], steps: int, lr: float = 3e-3,
          mtp_weight: float = 0.3, warmup: int = 10, progress: bool = True) -> TrainLog:
    """`steps` optimiser steps of loss = CE + mtp_weight * MTP CE, linear warm-up then cosine
    decay to 10%; returns the per-step losses and the training throughput."""
    if steps < 1:
        raise TierlmError(f"steps must be >= 1, got {steps}")
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    opts = optimizers(model, lr)
    base = [[g["lr"] for g in o.param_groups] for o in opts]
    log = TrainLog()
    model.train()
    columns = (TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("train", total=steps, info="")
        for step in range(steps):
            scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            for o, lrs in zip(opts, base):
                for g, lr0 in zip(o.param_groups, lrs):
                    g["lr"] = lr0 * scale
            batch = next_batch()
            start = time.perf_counter()
            loss, mtp = lm_losses(model, batch)
            total = loss + mtp_weight * mtp if mtp is not None else loss
            if not torch.isfinite(total):
                raise TierlmError(f"training diverged at step {step}: loss {total.item()}; lower the learning rate")
            for o in opts:
                o.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for o in opts:
                o.step()
            log.seconds += time.perf_counter() - start
            log.tokens += batch.shape[0] * (batch.shape[1] - 2)
            log.steps.append(step)
            log.loss.append(loss.item())
            log.mtp_loss.append(mtp.item() if mtp is not None else float("nan"))
            info = f"loss {loss.item():.3f}" + (f"  mtp {mtp.item():.3f}" if mtp is not None else "")
            bar.update(task, advance=1, info=f"{info}  {log.tokens_per_s:,.0f} tok/s")
    model.eval()
    return log


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float | None]:
    """Mean (CE, MTP CE) over fixed held-out batches."""
    model.eval()
    ce, mtp = [], []
    for b in batches:
        loss, m = lm_losses(model, b)
        ce.append(loss.item())
        if m is not None:
            mtp.append(m.item())
    return sum(ce) / len(ce), (sum(mtp) / len(mtp) if mtp else None)
