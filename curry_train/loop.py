"""The training loop: build in dependency order, resume if asked, then step, evaluate, save, roll back on a spike."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from curry_train import distributed, spike
from curry_train.checkpoint import resume as resuming
from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.plan import build_plan, model_size, plan_json, policy_of, render_plan, storage_refusal
from curry_train.checkpoint.policy import Policy, Role, roles_due
from curry_train.checkpoint.preemption import Preemption, save_on_preemption
from curry_train.checkpoint.resume import ResumeError, ResumePoint, SpikeError, Trainee, agree
from curry_train.checkpoint.state import Contents, Progress, app_state, fidelity_record
from curry_train.checkpoint.store import RunDir, fsync_dir
from curry_train.config import Config, ConfigError, Launch, validate
from curry_train.data import Corpus, Slicing, build_train_loader, dev_batches, load_corpus
from curry_train.history import end_unfinished_attempt
from curry_train.journal import Journal, read_journal
from curry_train.metrics import MetricsLogger
from curry_train.model import Transformer, build_model, count_params
from curry_train.optim import build_optimizer, lr_at, set_lr

__all__ = ["ResumeError", "SpikeError", "TrainResult", "optimizer_step", "train"]


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


def optimizer_step(
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[dict],
    cfg: Config,
    device: torch.device,
    stop_requested: bool = False,
    lr_scale: float = 1.0,
) -> tuple[dict[str, float], bool]:
    """Optimizer step `step` (0-based) at the schedule's lr times `lr_scale` (a re-warmup after a rollback).

    Returns the metrics every rank agrees on, and whether any rank was asked to stop: the request rides on the
    loss's all-reduce, so all ranks stop after the same step at no extra collective.
    """
    lr = lr_at(step, cfg.optimizer.lr, cfg.train.steps, cfg.scheduler) * lr_scale
    set_lr(optimizer, lr)
    loss, grad_norm = train_step(model, optimizer, batches, cfg.train.grad_accum, cfg.train.grad_clip, device)
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


def build_sharded_model(cfg: Config, env: distributed.Dist) -> tuple[Transformer, int]:
    """The model on meta, sharded, then materialised: no rank ever holds the whole unsharded model."""
    model = build_model(cfg.model)
    n_params = count_params(model)
    distributed.shard_model(model, env.mesh, use_bf16(cfg, env.device))
    distributed.materialize(model, cfg.model, env.device, cfg.train.seed)
    return model, n_params


@dataclass
class Run:
    """A launch's view of its run directory: where it resumes from, its plan, journal and metrics."""

    dir: Path
    point: ResumePoint | None
    plan: Any
    journal: Journal
    log: MetricsLogger


def open_run(cfg: Config, run_dir: Path, env: distributed.Dist, launch: Launch) -> Run:
    """Tidy the run directory, decide where to resume and check the storage plan before writing anything new, then
    open journal and metrics."""
    store = RunDir(run_dir)
    # Opened lazily: a refused start creates nothing.
    journal = Journal(run_dir / "journal.jsonl", enabled=env.is_main)
    agree(_try(resuming.clean_run_dir, store, journal) if env.is_main else None, env.checkpoint_group)
    point = agree(_try(resuming.find_resume_point, launch, store) if env.is_main else None, env.checkpoint_group)
    # The plan comes from the config alone (the model on meta): a policy that does not fit the disk refuses to
    # start and leaves nothing behind.
    plan = agree(
        _try(build_plan, cfg, model_size(cfg.model), env.world_size, run_dir) if env.is_main else None,
        env.checkpoint_group,
    )
    refusal = storage_refusal(plan)
    if refusal is not None:
        if env.is_main:
            print(render_plan(plan), flush=True)
        raise ConfigError(f"checkpoint.check_storage: {refusal}")
    if env.is_main:
        make_durable_dir(run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    attempt = count_launches(journal.path) if env.is_main else 0
    end_unfinished_attempt(journal, run_dir)  # where a killed previous launch stopped, before this run_start
    log = MetricsLogger(
        run_dir,
        cfg.logger,
        cfg.train.steps,
        env.is_main,
        attempt=attempt,
        wandb_config=asdict(cfg),
        run_id=run_dir.name,
    )
    journal.append(
        "run_start",
        point.step if point else 0,
        attempt=attempt,
        world_size=env.world_size,
        resume=launch.resume,
        rollback_to=launch.rollback_to,
        config=asdict(cfg),
    )
    return Run(run_dir, point, plan, journal, log)


def make_durable_dir(path: Path) -> None:
    """mkdir -p, with every new directory entry fsynced: a power cut must not take the run directory (and the
    checkpoints committed in it) with it."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def load_checked_corpus(cfg: Config) -> Corpus:
    corpus = load_corpus(cfg.data)
    if corpus.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({corpus.vocab_size} token ids in {cfg.data.name} data)"
        )
    return corpus


def train(cfg: Config, run_dir: Path, env: distributed.Dist, launch: Launch | None = None) -> TrainResult:
    launch = launch or Launch()
    validate(cfg, env.world_size)
    policy = policy_of(cfg.checkpoint)
    t = cfg.train
    run = open_run(cfg, run_dir, env, launch)
    log, journal, point = run.log, run.journal, run.point
    if point is not None:
        if point.note:
            log.print(f"curry-train: {point.note}")
        verb = "rolling back" if point.rollback_to else "resuming"
        log.print(f"curry-train: {verb} from step {point.step} of {point.path}")
        if point.step >= t.steps and point.rollback_to is None:
            log.print(f"curry-train: run {run_dir} already finished ({point.step} of {t.steps} steps); nothing to do")
            log.close()
            journal.close()
            return TrainResult(run_dir, point.step, None, None)

    corpus = load_checked_corpus(cfg)
    model, n_params = build_sharded_model(cfg, env)
    optimizer = build_optimizer(model, cfg.optimizer)
    log.print(
        f"curry-train: model {cfg.model.name} with {n_params:,} parameters ({n_params:.3g}), "
        f"world size {env.world_size} on {env.device.type}, data: {corpus.description} "
        f"({len(corpus.train):,} train / {len(corpus.dev):,} dev tokens), run directory {run_dir}"
    )
    log.print(render_plan(run.plan))
    journal.append("policy", 0, **plan_json(run.plan))
    ckpt = Checkpointer(RunDir(run_dir), policy, journal, env.checkpoint_group, env.rank, cfg.checkpoint.async_save)

    progress = Progress(world_size=env.world_size)
    scheduler: dict[str, int | float] = {"step": 0, "lr": 0.0}
    slicing = Slicing(t.batch_size, env.world_size, env.rank, t.grad_accum)
    dev = dev_batches(corpus.dev, cfg.data, slicing, t.seed, t.eval_batches)
    saved_fidelity: dict[str, Any] = {}

    def fidelity_now() -> dict[str, Any]:
        return fidelity_record(model, env.device, slicing.indices_at(progress.cursor, 0))

    def state(contents: Contents) -> dict:
        fidelity = (lambda: slicing.indices_at(progress.cursor, 0), saved_fidelity.update)
        return app_state(contents, model, optimizer, progress, scheduler, env.rank, env.device, fidelity=fidelity)

    def data_from(cursor: int) -> Iterator[dict]:
        # The global sample cursor is the whole data position: resumes on any world size or worker count, and
        # rollbacks that skip samples, all build the loader there.
        return iter(build_train_loader(corpus.train, cfg.data, slicing, t.seed, start_sample=cursor))

    trainee = Trainee(state, optimizer, progress, saved_fidelity, fidelity_now)
    if point is not None and point.rollback_to is not None:
        cause = agree(
            _try(resuming.manual_rollback_cause, point, ckpt.store, t.batch_size) if env.is_main else None,
            env.checkpoint_group,
        )
        resuming.roll_back(point, cause, ckpt, trainee, cfg.spike, t.batch_size, env.world_size, log.print)
        log.event("rollback", progress.step, spike_step=cause.step)
    elif point is not None:
        resuming.resume(point, ckpt, trainee, env.world_size, log.print)
        log.event("resume", progress.step)
    batches = data_from(progress.cursor)
    if point is not None:
        batches = resuming.check_next_batch(batches, slicing.indices_at(progress.cursor, 0))

    rule = spike.SpikeRule(cfg.spike.window, cfg.spike.warmup_steps, cfg.spike.sigmas, cfg.spike.min_rise)
    preemption = Preemption()
    tokens_per_step = t.batch_size * cfg.data.seq_len
    first_loss = last_loss = None
    start_step = progress.step
    while progress.step < t.steps:
        step, done = progress.step, progress.step + 1  # 0-based index of this step; completed steps after it
        lr_scale = spike.rewarm_factor(step, progress.rewarm_from, cfg.spike.rewarmup_steps)
        if done == launch.inject_spike_at and done not in progress.injected:
            lr_scale *= launch.inject_lr_scale
            progress.injected.append(done)
            journal.append("spike_injected", done, lr_scale=launch.inject_lr_scale, reason="+debug.inject_spike_at")
        started = time.perf_counter()
        values, stop = optimizer_step(step, model, optimizer, batches, cfg, env.device, preemption.requested, lr_scale)
        values["tokens_per_s"] = tokens_per_step / (time.perf_counter() - started)
        verdict = spike.judge(rule, progress.loss_window, done, values["loss"]) if cfg.spike.enabled else None
        if verdict is not None and verdict.spike:
            log.log(done, {**values, "spike": True})
            target, cause = resuming.spike_rollback_point(verdict, done, progress, ckpt, cfg.spike, t.batch_size)
            resuming.roll_back(target, cause, ckpt, trainee, cfg.spike, t.batch_size, env.world_size, log.print)
            log.event("rollback", progress.step, spike_step=done)
            batches = data_from(progress.cursor)
            continue
        progress.step, progress.cursor = done, progress.cursor + t.batch_size
        progress.loss_window = spike.push(progress.loss_window, values["loss"], cfg.spike.window)
        scheduler.update(step=done, lr=values["lr"])
        if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            values["dev_loss"] = evaluate(model, dev, env.device)
        log.log(done, values)
        save_checkpoint(ckpt, policy, done, values, state)
        first_loss = values["loss"] if first_loss is None else first_loss
        last_loss = values["loss"]
        if stop:
            save_on_preemption(ckpt, policy, done, state, preemption, log.print)
            break

    ckpt.wait()
    preemption.uninstall()
    final_step = progress.step
    if final_step == t.steps:
        journal.append("run_end", final_step, last_loss=last_loss)
    if first_loss is not None:
        log.print(
            f"curry-train: {'finished' if final_step == t.steps else 'stopped after'} {final_step} steps; "
            f"{'first loss' if start_step == 0 else f'loss at step {start_step + 1} (first of this launch)'} "
            f"{first_loss:.4f}, last loss {last_loss:.4f}"
        )
    log.close()
    journal.close()
    return TrainResult(run_dir, final_step, first_loss, last_loss)


def save_checkpoint(ckpt: Checkpointer, policy: Policy, step: int, values: dict[str, float], state: Any) -> None:
    """Save what the policy says is due after `step`: the cadence roles, then best-K on a new dev metric."""
    ckpt.poll()
    roles = roles_due(policy, step)
    if roles:
        needs_full = Role.RECOVERY in roles or policy.full_rollback
        contents = Contents.FULL if needs_full else Contents.PARAMS
        ckpt.save(step, roles, contents, state(contents))
    metric = values.get(policy.best_k_metric)
    if metric is not None:
        ckpt.consider_best_k(step, metric, lambda: state(Contents.PARAMS))


def count_launches(journal_path: Path) -> int:
    if not journal_path.exists():
        return 0
    return sum(1 for e in read_journal(journal_path) if e["event"] == "run_start")


def _try(fn: Any, *args: Any) -> Any:
    """`fn(*args)`, or the exception it raised, so that `agree` raises it on every rank instead of leaving the
    other ranks waiting in a broadcast that rank 0 never reaches."""
    try:
        return fn(*args)
    except Exception as err:
        return err
