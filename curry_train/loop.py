"""The training loop: build in dependency order, then step, evaluate, save, repeat."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from curry_train import distributed
from curry_train.config import Config, validate
from curry_train.data import Slicing, build_train_loader, dev_batches, load_corpus
from curry_train.metrics import MetricsLogger
from curry_train.model import Transformer, build_model, count_params
from curry_train.optim import build_optimizer, lr_at, set_lr


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    first_loss: float | None
    last_loss: float | None


def use_bf16(cfg: Config, device: torch.device) -> bool:
    if cfg.train.mixed_precision == "auto":
        return device.type == "cuda"
    return cfg.train.mixed_precision == "bf16"


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[dict],
    grad_accum: int,
    grad_clip: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over `grad_accum` micro-batches; returns this rank's mean loss and the grad norm."""
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
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum, grad_norm


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], device: torch.device) -> float:
    model.eval()
    losses = []
    for batch in batches:
        logits = model(batch["input"].to(device))
        losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), batch["target"].to(device).view(-1)).item())
    model.train()
    return distributed.all_reduce_mean([sum(losses) / len(losses)], device)[0]


def build_sharded_model(cfg: Config, env: distributed.Dist) -> tuple[Transformer, int]:
    """The model on meta, sharded, then materialised: no rank ever holds the whole unsharded model."""
    model = build_model(cfg.model)
    n_params = count_params(model)
    distributed.shard_model(model, env.mesh, use_bf16(cfg, env.device))
    distributed.materialize(model, cfg.model, env.device, cfg.train.seed)
    return model, n_params


def train(cfg: Config, run_dir: Path, env: distributed.Dist, resume: str | None = None) -> TrainResult:
    validate(cfg, env.world_size)
    t = cfg.train
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLogger(run_dir, cfg.logger, t.steps, env.is_main, wandb_config=asdict(cfg), run_id=run_dir.name)

    corpus = load_corpus(cfg.data)
    model, n_params = build_sharded_model(cfg, env)
    optimizer = build_optimizer(model, cfg.optimizer)
    slicing = Slicing(t.batch_size, env.world_size, env.rank, t.grad_accum)
    loader = build_train_loader(corpus.train, cfg.data, slicing, t.seed)
    dev = dev_batches(corpus.dev, cfg.data, Slicing(t.batch_size, env.world_size, env.rank, 1), t.seed, t.eval_batches)
    log.print(
        f"curry-train: model {cfg.model.name} with {n_params:,} parameters ({n_params:.3g}), "
        f"world size {env.world_size} on {env.device.type}, data: {corpus.description} "
        f"({len(corpus.train):,} train / {len(corpus.dev):,} dev tokens), run directory {run_dir}"
    )

    start_step = 0
    batches = iter(loader)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    first_loss = last_loss = None
    for step in range(start_step, t.steps):
        started = time.perf_counter()
        lr = lr_at(step, cfg.optimizer.lr, t.steps, cfg.scheduler)
        set_lr(optimizer, lr)
        loss, grad_norm = train_step(model, optimizer, batches, t.grad_accum, t.grad_clip, env.device)
        done = step + 1  # completed optimizer steps
        loss_value = distributed.all_reduce_mean([loss.item()], env.device)[0]
        values = {
            "loss": loss_value,
            "lr": lr,
            "tokens_per_s": tokens_per_step / (time.perf_counter() - started),
        }
        if grad_norm is not None:
            values["grad_norm"] = (
                grad_norm.full_tensor().item() if hasattr(grad_norm, "full_tensor") else grad_norm.item()
            )
        if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            values["dev_loss"] = evaluate(model, dev, env.device)
        log.log(done, values)
        first_loss = loss_value if first_loss is None else first_loss
        last_loss = loss_value

    log.print(f"curry-train: finished {t.steps} steps; first loss {first_loss:.4f}, last loss {last_loss:.4f}")
    log.close()
    return TrainResult(run_dir, t.steps, first_loss, last_loss)
