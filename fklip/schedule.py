"""Optimiser pieces of the original (spec 3.5): AdamW with two parameter groups, warmup + cosine."""

from __future__ import annotations

import math

import torch

LOGIT_SCALE_MAX = math.log(100.0)  # logit_scale is clamped to [0, ln 100] after every step


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup to `base_lr` over `warmup` steps, then a half cosine to 0 at `total` steps.

    step < warmup: base * (step + 1) / warmup; otherwise 0.5 * (1 + cos(pi * e / es)) * base with
    e = step - warmup and es = total - warmup (the original's `cosine_lr`).
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span)) * base_lr


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """The original's rule: no weight decay for names containing bn, ln, bias or logit_scale."""
    return any(part in name for part in ("bn", "ln", "bias", "logit_scale"))


def build_optimizer(model: torch.nn.Module, lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW(betas=(0.9, 0.98), eps=1e-6) with a decayed and a non-decayed group."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if is_no_decay(n, p)]
    decay = [p for n, p in named if not is_no_decay(n, p)]
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module) -> None:
    model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
