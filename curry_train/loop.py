"""The training loop: build in dependency order, resume if asked, then step, evaluate, save, roll back on a spike."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curry_train import distributed, spike, warm_start, watchdog
from curry_train.checkpoint import resume as resuming
from curry_train.checkpoint import rollback, upload
from curry_train.checkpoint.auto_cadence import AutoCadence
from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.plan_text import plan_json, render_plan
from curry_train.checkpoint.policy import Contents, Policy, SaveReason, decide_save
from curry_train.checkpoint.preemption import Preemption, ensure_full_save, save_on_preemption
from curry_train.checkpoint.resume import ResumeError, Trainee
from curry_train.checkpoint.rollback import SpikeError
from curry_train.checkpoint.state import Progress, app_state, fidelity_record
from curry_train.checkpoint.store import RunDir
from curry_train.config import Config, ConfigError, Launch, validate
from curry_train.data import Corpus, Slicing, build_train_loader, dev_batches, load_corpus
from curry_train.distributed import on_rank0
from curry_train.journal import Journal
from curry_train.optim import build_optimizer, lr_at, set_lr
from curry_train.run import open_run

__all__ = ["ResumeError", "SpikeError", "TrainResult", "optimizer_step", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    first_loss: float | None
    last_loss: float | None


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


def load_checked_corpus(cfg: Config) -> Corpus:
    corpus = load_corpus(cfg.data)
    if corpus.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({corpus.vocab_size} token ids in {cfg.data.name} data)"
        )
    return corpus


def train(cfg: Config, run_dir: Path, env: distributed.Dist, launch: Launch | None = None) -> TrainResult:
    """Train `cfg` in `run_dir`, watched by this rank's hang watchdog (stopped however the loop ends)."""

    def follow(seconds: float) -> None:  # the collective timeout follows an automatic hang timeout that grew
        distributed.set_collective_timeout(seconds, [env.checkpoint_group])

    with watchdog.Watchdog(env.rank, run_dir, cfg.train.hang_timeout_s, on_timeout=follow) as dog:
        return _train(cfg, run_dir, env, launch or Launch(), dog)


def _train(cfg: Config, run_dir: Path, env: distributed.Dist, launch: Launch, dog: watchdog.Watchdog) -> TrainResult:
    validate(cfg, env.world_size)
    if launch.stall_at is not None and not 0 <= launch.stall_rank < env.world_size:
        raise ConfigError(f"debug.stall_rank: {launch.stall_rank} is not a rank of this world of {env.world_size}")
    policy = cfg.checkpoint.policy()
    t = cfg.train
    init_plan = warm_start.prepare(cfg, launch, env)  # a source that cannot be used is refused before open_run
    run = open_run(cfg, run_dir, env, launch)
    log, journal, point = run.log, run.journal, run.point
    if point is not None:
        if point.note:
            log.print(f"curry-train: {point.note}")
        verb = "rolling back" if point.rollback_to else "resuming"
        log.print(f"curry-train: {verb} from step {point.step} of {point.path}")
        if point.step >= t.steps and point.rollback_to is None:
            log.print(f"curry-train: run {run_dir} already finished ({point.step} of {t.steps} steps); nothing to do")
            run.close()
            return TrainResult(run_dir, point.step, None, None)

    corpus = load_checked_corpus(cfg)
    model, n_params = distributed.build_sharded_model(cfg, env, initialize=point is None and init_plan is None)
    optimizer = build_optimizer(model, cfg.optimizer)
    if point is None and cfg.init.source is not None:  # a warm start; a resume never reads the source again
        warm_start.load_initial(init_plan, cfg, model, optimizer, env, journal, log.print)
    log.print(
        f"curry-train: model {cfg.model.name} with {n_params:,} parameters ({n_params:.3g}), "
        f"world size {env.world_size} on {env.device.type}, data: {corpus.description} "
        f"({len(corpus.train):,} train / {len(corpus.dev):,} dev tokens), run directory {run_dir}"
    )
    log.print(render_plan(run.plan))
    dog.hint(run.plan.hang_timeout_s)
    journal.append("policy", 0, **plan_json(run.plan))
    fault = None if launch.fail_save_at is None else (launch.fail_save_at, launch.fail_save_rank)
    c = cfg.checkpoint
    uploader = upload.build(c, run_dir, env.rank, journal, launch.upload_stall_at)
    ckpt = Checkpointer(
        RunDir(run_dir),
        policy,
        journal,
        env.checkpoint_group,
        env.rank,
        c.async_save,
        fault,
        c.direct_io,
        save_delay_s=launch.save_delay_s,
        uploader=uploader,
    )

    progress = Progress(world_size=env.world_size)
    scheduler: dict[str, int | float] = {"step": 0, "lr": 0.0}
    slicing = Slicing(t.batch_size, env.world_size, env.rank, t.grad_accum)
    dev = dev_batches(corpus.dev, cfg.data, slicing, t.seed, t.eval_batches)
    saved_fidelity: dict[str, Any] = {}

    def fidelity_now(algorithm: str) -> dict[str, Any]:
        return fidelity_record(model, env.device, slicing.indices_at(progress.cursor, 0), algorithm)

    def state(contents: Contents) -> dict:
        fidelity = (lambda: slicing.indices_at(progress.cursor, 0), saved_fidelity.update)
        return app_state(contents, model, optimizer, progress, scheduler, env.rank, env.device, fidelity=fidelity)

    def data_from(cursor: int) -> Iterator[dict]:
        # The global sample cursor is the whole data position: resumes on any world size or worker count, and
        # rollbacks that skip samples, all build the loader there.
        return iter(build_train_loader(corpus.train, cfg.data, slicing, t.seed, start_sample=cursor))

    trainee = Trainee(state, optimizer, progress, saved_fidelity, fidelity_now)
    dog.beat(progress.step, "loading")
    if point is not None and point.rollback_to is not None:
        cause = on_rank0(env.is_main, env.checkpoint_group, rollback.manual_cause, point, ckpt.store, t.batch_size)
        rollback.roll_back(point, cause, ckpt, trainee, cfg.spike, t.batch_size, env.world_size, log.print)
        log.event("rollback", progress.step, spike_step=cause.step)
    elif point is not None:
        resuming.resume(point, ckpt, trainee, env.world_size, log.print)
        if launch.perturb_resume:
            perturb_parameters(model, log.print)
        log.event("resume", progress.step)
    batches = data_from(progress.cursor)
    if point is not None:
        batches = resuming.check_next_batch(batches, slicing.indices_at(progress.cursor, 0))

    auto = AutoCadence(cfg, run_dir, journal, env, ckpt)  # checkpoint.*_every=auto: decided now, and as saves commit
    policy = auto.decide(progress.step, "resume" if point is not None else "start")
    rule = cfg.spike.rule()
    preemption = Preemption(run_dir, env.is_main, lambda: (dog.step, dog.phase), run.plan.full_save_seconds)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    first_loss = last_loss = None
    start_step = progress.step
    while progress.step < t.steps:
        step, done = progress.step, progress.step + 1  # 0-based index of this step; completed steps after it
        if watchdog.stall_due(run_dir, launch.stall_at, launch.stall_rank, env.rank, done):
            watchdog.stall_forever(run_dir, dog, done)
        dog.beat(step, f"step {done}")
        lr_scale = spike.rewarm_factor(step, progress.rewarm_from, cfg.spike.rewarmup_steps)
        lr_scale *= injected_lr_scale(launch, progress, journal, done)
        started = time.perf_counter()
        values, stop = optimizer_step(
            step, model, optimizer, batches, cfg, env.device, preemption.requested, lr_scale, ckpt.before_update
        )
        values["tokens_per_s"] = tokens_per_step / (time.perf_counter() - started)
        verdict = spike.judge(rule, progress.loss_window, done, values["loss"]) if cfg.spike.enabled else None
        if verdict is not None and verdict.spike:
            log.log(done, {**values, "spike": True})
            target, cause = rollback.spike_target(verdict, done, progress, ckpt, cfg.spike, t.batch_size)
            dog.beat(step, f"the rollback from step {done}")
            rollback.roll_back(target, cause, ckpt, trainee, cfg.spike, t.batch_size, env.world_size, log.print)
            log.event("rollback", progress.step, spike_step=done)
            batches = data_from(progress.cursor)
            continue
        progress.step, progress.cursor = done, progress.cursor + t.batch_size
        progress.loss_window = spike.push(progress.loss_window, values["loss"], cfg.spike.window)
        scheduler.update(step=done, lr=values["lr"])
        # The first completed step arms the watchdog: start-up and the first step's warm-up are not hangs.
        (dog.beat if dog.armed else dog.arm)(done, f"the end of step {done}")
        if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            dog.beat(done, f"the evaluation after step {done}")
            values["dev_loss"] = evaluate(model, dev, env.device)
        log.log(done, values)
        dog.beat(done, f"the save of step {done}")
        save_checkpoint(ckpt, policy, done, values, state)
        policy = auto.follow(done)
        first_loss = values["loss"] if first_loss is None else first_loss
        last_loss = values["loss"]
        if stop:
            save_on_preemption(ckpt, policy, done, state, preemption, log.print)
            break

    final_step = progress.step
    dog.beat(final_step, f"the save of step {final_step}")
    if final_step == t.steps and cfg.checkpoint.save_final:
        ensure_full_save(ckpt, policy, final_step, state, SaveReason.FINAL)  # run_end names an exact-resume one
    ckpt.close()
    preemption.uninstall()
    if final_step == t.steps:
        dog.beat(final_step, "the uploads to checkpoint.remote")
        ckpt.finish_uploads()
        latest = ckpt.store.latest() if env.is_main else None
        journal.append("run_end", final_step, last_loss=last_loss, checkpoint=latest.relpath if latest else None)
    if first_loss is not None:
        log.print(
            f"curry-train: {'finished' if final_step == t.steps else 'stopped after'} {final_step} steps; "
            f"{'first loss' if start_step == 0 else f'loss at step {start_step + 1} (first of this launch)'} "
            f"{first_loss:.4f}, last loss {last_loss:.4f}"
        )
    run.close()
    return TrainResult(run_dir, final_step, first_loss, last_loss)


def injected_lr_scale(launch: Launch, progress: Progress, journal: Journal, step: int) -> float:
    """`+debug.inject_spike_at=STEP`: that step's lr times `inject_lr_scale`, once in the run's life (the progress
    state remembers it, so neither the replay after the rollback nor a requeue injects it again)."""
    if step != launch.inject_spike_at or step in progress.injected:
        return 1.0
    progress.injected.append(step)
    journal.append("spike_injected", step, lr_scale=launch.inject_lr_scale, reason="+debug.inject_spike_at")
    return launch.inject_lr_scale


def perturb_parameters(model: nn.Module, say: Callable[[str], None]) -> None:
    """`+debug.perturb_resume=true`: scale every parameter by 1 + 2^-16 once the resume's fidelity check has passed,
    so the resume is inexact in a way only the losses show (`curry-train rehearse` must catch it). Not the RNG: no
    step draws from torch's RNG, so perturbing it would change nothing."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 2**-16)
    say("curry-train: +debug.perturb_resume: parameters scaled by 1 + 2^-16 after loading: this resume is inexact")


def save_checkpoint(ckpt: Checkpointer, policy: Policy, step: int, values: dict[str, float], state: Any) -> None:
    """Save what the policy says is due after `step`: the cadence roles, then best-K on a new dev metric."""
    ckpt.poll()
    decision = decide_save(policy, step, SaveReason.CADENCE)
    if decision is not None:
        ckpt.save(step, list(decision.roles), decision.contents, state(decision.contents))
    metric = values.get(policy.best_k_metric)
    if metric is not None:
        ckpt.consider_best_k(step, metric, lambda: state(Contents.PARAMS))
