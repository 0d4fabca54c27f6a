"""AdamW with Phi's parameter groups, and the learning-rate schedule (warmup, then cosine / linear / constant)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from phiforge.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: matrices decay; norms, biases and embeddings (1-D, or the token embedding) do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, *, sharded: bool = False) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel on CPU/CUDA where it applies (foreach for sharded params)."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if sharded:
        kwargs["foreach"] = True
    else:
        kwargs["fused"] = True  # one multi-tensor kernel per step instead of a loop over parameters
    return torch.optim.AdamW(groups, **kwargs)


class LRSchedule:
    """lr(step): linear warmup from 0 over `warmup` steps, then cosine/linear decay to min_lr, or constant."""

    def __init__(self, cfg: TrainConfig, total_steps: int) -> None:
        self.lr, self.min_lr, self.warmup = cfg.lr, cfg.min_lr, cfg.warmup
        self.schedule, self.total = cfg.schedule, total_steps
        self.step = 0  # optimizer steps taken

    def lr_at(self, step: int) -> float:
        """The learning rate for optimizer step `step` (0-based)."""
        if self.warmup and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.total - self.warmup)
        frac = min(1.0, (step - self.warmup) / span)
        if self.schedule == "linear":
            return self.lr + (self.min_lr - self.lr) * frac
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * frac))

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        lr = self.lr_at(self.step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "lr": self.lr, "min_lr": self.min_lr, "warmup": self.warmup,
                "schedule": self.schedule, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
