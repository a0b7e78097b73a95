"""The optimizer factory and the learning-rate schedule, a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from curry_train.config import OptimizerConfig, SchedulerConfig


def lr_at(step: int, peak_lr: float, total_steps: int, cfg: SchedulerConfig) -> float:
    """The learning rate for optimizer step `step` (0-based: the step that will be step+1 once taken).

    Linear warmup from peak/warmup to peak over `warmup_steps`, then cosine decay to `min_lr_ratio * peak` at the
    last step. Because it is a function of the step alone, a resumed run needs only the step to continue it.
    """
    if cfg.name == "constant":
        return peak_lr
    min_lr = cfg.min_lr_ratio * peak_lr
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    decay_steps = total_steps - cfg.warmup_steps
    if decay_steps <= 1:
        return peak_lr
    progress = min(1.0, (step - cfg.warmup_steps) / (decay_steps - 1))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # No weight decay on norms' gains (1-D tensors), as in Llama and nanoGPT.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
