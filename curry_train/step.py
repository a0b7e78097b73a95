"""One optimizer step and one evaluation: the arithmetic of training, with no bookkeeping (the loop in `loop.py`
decides when to step, save, evaluate and roll back)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from curry_train import distributed
from curry_train.config import Config
from curry_train.optim import lr_at, set_lr


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[dict],
    grad_accum: int,
    grad_clip: float,
    device: torch.device,
    before_update: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over `grad_accum` micro-batches; returns this rank's mean loss and the grad norm.

    `before_update` runs just before the optimizer changes the parameters (a save in flight takes its copy of them
    during the forward and backward)."""
    total = torch.zeros((), device=device)
    for micro in range(grad_accum):
        batch = next(batches)
        inputs, targets = batch["input"].to(device), batch["target"].to(device)
        if grad_accum > 1:
            # Reduce-scatter gradients once, on the last micro-batch, not on every one.
            model.set_requires_gradient_sync(micro == grad_accum - 1)
        logits = model(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        (loss / grad_accum).backward()
        total += loss.detach()
    grad_norm = None
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if before_update is not None:
        before_update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum, grad_norm


def optimizer_step(
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[dict],
    cfg: Config,
    device: torch.device,
    stop_requested: bool = False,
    lr_scale: float = 1.0,
    before_update: Callable[[], None] | None = None,
) -> tuple[dict[str, float], bool]:
    """Optimizer step `step` (0-based) at the schedule's lr times `lr_scale` (a re-warmup after a rollback).

    Returns the metrics every rank agrees on, and whether any rank was asked to stop: the request rides on the
    loss's all-reduce, so all ranks stop after the same step at no extra collective.
    """
    lr = lr_at(step, cfg.optimizer.lr, cfg.train.steps, cfg.scheduler) * lr_scale
    set_lr(optimizer, lr)
    loss, grad_norm = train_step(
        model, optimizer, batches, cfg.train.grad_accum, cfg.train.grad_clip, device, before_update
    )
    loss_value, stop = distributed.all_reduce_mean([loss.item(), float(stop_requested)], device)
    values = {"loss": loss_value, "lr": lr}
    if grad_norm is not None:  # already global: clipping all-reduced it
        values["grad_norm"] = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    return values, stop > 0


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], device: torch.device) -> float:
    """Mean dev loss over `batches` (micro-batches of one size, from `dev_batches`) and over all ranks."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        logits = model(batch["input"].to(device))
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), batch["target"].to(device).view(-1)).double()
    model.train()
    return distributed.all_reduce_mean([total.item() / len(batches)], device)[0]
