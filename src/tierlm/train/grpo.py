"""GRPO (DeepSeekMath, arXiv:2402.03300, section 4.1) with a verifiable reward.

For each prompt the policy samples a group of G completions; each gets a reward it can be
checked against (here: does prompt + completion parse as Python). Advantages are
group-relative: A_i = (r_i - mean(r)) / (std(r) + eps), the same for every token of
completion i, with no value model. The objective per token is the clipped policy ratio
min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) minus beta times the KL estimate
pi_ref / pi - log(pi_ref / pi) - 1 against the starting model; tokens are averaged within
a completion, completions within the batch.

Rollouts come from `tierlm.LLM` (`SamplingParams(n=G)`; the prefix cache shares each
prompt across its group) and the policy being trained is the engine's own module, so after
every update the engine's prefix cache is reset: its blocks were computed by old weights.
"""

from __future__ import annotations

import ast
import copy
import re
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import TierlmError

STD_EPS = 1e-4


def python_reward(prompt: str, completion: str, length_weight: float = 0.1, length_chars: int = 40) -> float:
    """1 when prompt + completion parses as Python (`ast.parse`), plus a small bonus growing
    with the completion's length up to `length_chars`, so an empty or trivial body does not
    earn as much as real code; 0 when it does not parse."""
    try:
        with warnings.catch_warnings():          # generated code may trip SyntaxWarnings; only errors count
            warnings.simplefilter("ignore")
            ast.parse(prompt + completion)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return 0.0
    return 1.0 + length_weight * min(len(completion.strip()), length_chars) / length_chars


def group_advantages(rewards: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: each group normalised by its own mean and
    (Bessel-corrected) standard deviation; a group of equal rewards gets advantage 0."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise TierlmError(f"rewards must be [prompts, group >= 2], got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, adv: torch.Tensor,
              mask: torch.Tensor, clip: float = 0.2, beta: float = 0.04) -> torch.Tensor:
    """Negative GRPO objective. logp / old_logp / ref_logp [N, L]: per-token log-probs of the
    sampled tokens under the policy, the policy that sampled them and the reference; adv [N];
    mask [N, L] marks completion tokens."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv[:, None], ratio.clamp(1 - clip, 1 + clip) * adv[:, None])
    log_r = ref_logp - logp
    kl = torch.exp(log_r) - log_r - 1
    per_token = (surrogate - beta * kl) * mask
    per_seq = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return -per_seq.mean()


def token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """ids [N, S] (prompt + completion, right-padded) -> [N, S - 1] log p(ids[:, t + 1] | ids[:, :t + 1])
    (causal, so the padding after a row's end changes nothing before it; the caller masks)."""
    logits = model(ids[:, :-1])
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]


def assignment_prompts(texts: list[str], limit: int | None = None, max_body_lines: int = 40,
                       max_chars: int = 1200) -> list[str]:
    """Prompts that end inside a top-level function just after `name =`: the function's header
    and the body lines before an assignment; the completion is the right-hand side, one line.
    Only places where the original line makes prompt + completion parse are kept."""
    out = []
    for text in texts:
        lines = text.splitlines(keepends=True)
        head = None
        for i, line in enumerate(lines):
            if re.match(r"def \w+\(.*\):\s*$", line):
                head = i
                continue
            if head is None or (line.strip() and not line[0].isspace()):
                head = None if line.strip() else head
                continue
            m = re.match(r"(\s+[A-Za-z_][\w.]* =)( \S.*)$", line)   # the space starts the completion's first token
            if m and i - head <= max_body_lines:
                prompt = "".join(lines[head:i]) + m.group(1)
                if len(prompt) > max_chars:
                    continue
                try:
                    ast.parse(prompt + m.group(2))
                except (SyntaxError, ValueError):
                    continue
                out.append(prompt)
                head = None                      # one prompt per function
                if limit is not None and len(out) >= limit:
                    return out
    return out


@dataclass
class GRPOLog:
    reward_mean: list[float] = field(default_factory=list)
    reward_std: list[float] = field(default_factory=list)
    rollout_tokens: int = 0
    rollout_seconds: float = 0.0

    @property
    def rollout_tokens_per_s(self) -> float:
        return self.rollout_tokens / self.rollout_seconds if self.rollout_seconds else 0.0


@dataclass
class GRPOConfig:
    group: int = 8
    prompts_per_step: int = 4
    max_tokens: int = 24
    temperature: float = 1.0
    lr: float = 1.5e-3
    clip: float = 0.2
    beta: float = 0.04
    inner_steps: int = 2          # updates per rollout batch (the ratio leaves 1 after the first)
    stop: tuple[str, ...] = ("\n",)


def rollouts(llm, prompts: list[str], cfg: GRPOConfig, seed: int, n: int | None = None):
    """Sample n (default: the group size) completions of each prompt through the engine;
    returns (request outputs, generated tokens, seconds)."""
    from ..runtime import SamplingParams
    params = [SamplingParams(n=n or cfg.group, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                             stop=list(cfg.stop), seed=seed + 1000 * i) for i in range(len(prompts))]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    for o in outs:
        if o.outputs[0].finish_reason == "error":
            raise TierlmError(f"rollout failed: {o.outputs[0].error}")
    return outs, sum(len(c.token_ids) for o in outs for c in o.outputs), dt


def mean_reward(llm, prompts: list[str], cfg: GRPOConfig, samples: int = 8, seed: int = 12345) -> float:
    """Mean reward of `samples` completions per prompt (a fixed seed: comparable before/after)."""
    if not prompts:
        raise TierlmError("no prompts to measure the reward on")
    outs, _, _ = rollouts(llm, prompts, cfg, seed, n=samples)
    rewards = [python_reward(o.prompt, c.text) for o in outs for c in o.outputs]
    return sum(rewards) / len(rewards)


def _batch(outs) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """(ids [N, S] right-padded with 0, mask [N, S - 1] over completion-token predictions,
    (first row, end row, width) of each prompt's group of completions)."""
    rows = [(o.prompt_token_ids, c.token_ids) for o in outs for c in o.outputs]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1)
    for r, (p, c) in enumerate(rows):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c)
        mask[r, len(p) - 1:len(p) + len(c) - 1] = 1.0
    groups, at = [], 0
    for o in outs:
        n = len(o.outputs)
        w = max(len(o.prompt_token_ids) + len(c.token_ids) for c in o.outputs)
        groups.append((at, at + n, min(width, max(w, 2))))
        at += n
    return ids, mask, groups


def _logprobs(model, ids: torch.Tensor, groups: list[tuple[int, int, int]]) -> torch.Tensor:
    """token_logprobs of each prompt's group at its own width, right-padded with 0 to
    [N, S - 1]. A group's completions share their prompt, and prompts differ in length: padding
    every row to the longest prompt computed up to several times the tokens needed."""
    full = ids.shape[1] - 1
    parts = [token_logprobs(model, ids[a:b, :w]) for a, b, w in groups]
    return torch.cat([torch.nn.functional.pad(p, (0, full - p.shape[1])) for p in parts])


def train_grpo(llm, prompts: list[str], steps: int, cfg: GRPOConfig | None = None, seed: int = 0,
               progress: bool = True, log=None) -> GRPOLog:
    """`steps` GRPO updates of the engine's own model on batches of `prompts`."""
    from .trainer import optimizers
    cfg = cfg or GRPOConfig()
    if steps < 1 or not prompts:
        raise TierlmError("GRPO needs steps >= 1 and at least one prompt")
    model = llm.model
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opts = optimizers(model, cfg.lr, weight_decay=0.0)
    out = GRPOLog()
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        pick = torch.randperm(len(prompts), generator=g)[:cfg.prompts_per_step].tolist()
        outs, made, dt = rollouts(llm, [prompts[i] for i in pick], cfg, seed * 100_003 + step)
        out.rollout_tokens += made
        out.rollout_seconds += dt
        rewards = torch.tensor([[python_reward(o.prompt, c.text) for c in o.outputs] for o in outs],
                               dtype=torch.float64)
        adv = group_advantages(rewards).flatten().float()
        ids, mask, groups = _batch(outs)
        if adv.abs().sum() > 0:
            with torch.no_grad():
                ref_lp = _logprobs(ref, ids, groups)
            old = None
            for _ in range(cfg.inner_steps):
                logp = _logprobs(model, ids, groups)
                if old is None:         # pi_old is the policy that sampled: the first update's own
                    old = logp.detach()  # log-probs, so its ratio is exactly 1 (no extra forward)
                loss = grpo_loss(logp, old, ref_lp, adv, mask, cfg.clip, cfg.beta)
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                for o in opts:
                    o.step()
            llm.reset_prefix_cache()
        out.reward_mean.append(rewards.mean().item())
        out.reward_std.append(rewards.std().item())
        if log is not None:
            log(f"GRPO step {step + 1}/{steps}: reward {rewards.mean():.3f} ± {rewards.std():.3f}, "
                f"rollouts {made / dt:,.0f} tok/s")
    model.eval()
    return out
