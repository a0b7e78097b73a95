"""The training loop: build in dependency order, resume if asked, then step, evaluate, save, repeat."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from curry_train import distributed
from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.plan import build_plan, model_size, plan_json, policy_of, render_plan, storage_refusal
from curry_train.checkpoint.policy import Policy, Role, roles_due
from curry_train.checkpoint.state import PER_RANK_KEYS, Contents, app_state, fidelity_record
from curry_train.checkpoint.store import Manifest, RunDir, fsync_dir
from curry_train.config import Config, ConfigError, validate
from curry_train.data import Corpus, Slicing, build_train_loader, dev_batches, load_corpus
from curry_train.history import end_unfinished_attempt
from curry_train.journal import Journal, read_journal
from curry_train.metrics import MetricsLogger
from curry_train.model import Transformer, build_model, count_params
from curry_train.optim import build_optimizer, lr_at, set_lr


class ResumeError(RuntimeError):
    """`+resume=...` cannot be honoured; the message names the run directory or path."""


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    first_loss: float | None
    last_loss: float | None


@dataclass
class ResumePoint:
    path: Path
    step: int
    contents: Contents
    world_size: int


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
) -> tuple[dict[str, float], bool]:
    """Optimizer step `step` (0-based) at the schedule's lr.

    Returns the metrics every rank agrees on, and whether any rank was asked to stop: the request rides on the
    loss's all-reduce, so all ranks stop after the same step at no extra collective.
    """
    lr = lr_at(step, cfg.optimizer.lr, cfg.train.steps, cfg.scheduler)
    set_lr(optimizer, lr)
    loss, grad_norm = train_step(model, optimizer, batches, cfg.train.grad_accum, cfg.train.grad_clip, device)
    loss_value, stop = distributed.all_reduce_mean([loss.item(), float(stop_requested)], device)
    values = {"loss": loss_value, "lr": lr}
    if grad_norm is not None:  # already global: clipping all-reduced it
        values["grad_norm"] = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    return values, stop > 0


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


def find_resume_point(resume: str | None, store: RunDir) -> ResumePoint | None:
    """Where `+resume=latest|auto|PATH` continues from (rank 0 reads the disk)."""
    if resume is None:
        metrics = store.path / "metrics.jsonl"
        if store.list() or (metrics.exists() and metrics.stat().st_size > 0):
            raise ResumeError(
                f"run directory {store.path} already holds a run; continue it with +resume=latest "
                "(or +resume=auto), or start a new one with run.id=NAME"
            )
        return None
    if resume in ("latest", "auto"):
        # The newest committed full checkpoint: the `latest` link names it, unless a crash came between the commit
        # and the swap of the link (the start repairs the link).
        latest = store.newest_full()
        if latest is None:
            if resume == "auto":
                return None
            raise ResumeError(
                f"+resume=latest: run directory {store.path} has no committed checkpoint with full state to resume "
                "from; start without +resume, or use +resume=auto to start fresh when there is none"
            )
        path = store.path_of(latest)
    else:
        path = Path(resume).expanduser()
    try:
        manifest = Manifest.read(path)
        return ResumePoint(path, manifest.step, Contents(manifest.extra["contents"]), int(manifest.extra["world_size"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ResumeError(
            f"+resume={resume}: {path} is not a committed curry-train checkpoint ({type(err).__name__}: {err})"
        ) from None


def agree(value: Any, group: dist.ProcessGroup) -> Any:
    """Rank 0's value (or the exception it raised), on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


@dataclass
class Run:
    """A launch's view of its run directory: where it resumes from, its plan, journal and metrics."""

    dir: Path
    point: ResumePoint | None
    plan: Any
    journal: Journal
    log: MetricsLogger


def open_run(cfg: Config, run_dir: Path, env: distributed.Dist, resume: str | None) -> Run:
    """Decide where to resume and check the storage plan before writing anything, then open journal and metrics."""
    store = RunDir(run_dir)
    point = agree(_try(find_resume_point, resume, store) if env.is_main else None, env.checkpoint_group)
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
    journal = Journal(run_dir / "journal.jsonl", enabled=env.is_main)
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
        resume=resume,
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


def train(cfg: Config, run_dir: Path, env: distributed.Dist, resume: str | None = None) -> TrainResult:
    validate(cfg, env.world_size)
    policy = policy_of(cfg.checkpoint)
    t = cfg.train
    run = open_run(cfg, run_dir, env, resume)
    log, journal, point = run.log, run.journal, run.point
    if point is not None:
        log.print(f"curry-train: resuming from step {point.step} of {point.path}")

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
    ckpt.clean_leftovers(point.step if point else 0)

    progress: dict[str, int | float] = {"step": 0, "samples_seen": 0, "world_size": env.world_size}
    scheduler: dict[str, int | float] = {"step": 0, "lr": 0.0}
    slicing = Slicing(t.batch_size, env.world_size, env.rank, t.grad_accum)
    # The loader's own saved position is exact on the same world size; on another, or from a checkpoint that has
    # no loader state (parameters only), the global sample cursor (the step) rebuilds it.
    same_world = point is None or point.world_size == env.world_size
    from_cursor = point is not None and not (same_world and point.contents is Contents.FULL)
    loader = build_train_loader(corpus.train, cfg.data, slicing, t.seed, start_step=point.step if from_cursor else 0)
    dev = dev_batches(corpus.dev, cfg.data, Slicing(t.batch_size, env.world_size, env.rank, 1), t.seed, t.eval_batches)

    saved_fidelity: dict[str, Any] = {}

    def fidelity_now() -> dict[str, Any]:
        return fidelity_record(model, env.device, slicing.indices(int(progress["step"]), 0))

    def state(contents: Contents) -> dict:
        return app_state(
            contents,
            model,
            optimizer,
            progress,
            scheduler,
            env.rank,
            loader,
            env.device,
            fidelity=(fidelity_now, saved_fidelity.update),
        )

    if point is not None:
        resume_from(point, ckpt, state, same_world, env, journal, log)
        check_fidelity(saved_fidelity, fidelity_now())

    start_step = int(progress["step"])
    preemption = Preemption()
    batches = iter(loader)
    if point is not None:
        batches = check_next_batch(batches, slicing.indices(start_step, 0))
    tokens_per_step = t.batch_size * cfg.data.seq_len
    first_loss = last_loss = None
    for step in range(start_step, t.steps):
        started = time.perf_counter()
        values, stop = optimizer_step(step, model, optimizer, batches, cfg, env.device, preemption.requested)
        values["tokens_per_s"] = tokens_per_step / (time.perf_counter() - started)
        done = step + 1  # completed optimizer steps
        progress.update(step=done, samples_seen=done * t.batch_size, world_size=env.world_size)
        scheduler.update(step=done, lr=values["lr"])
        if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            values["dev_loss"] = evaluate(model, dev, env.device)
        log.log(done, values)
        save_checkpoint(ckpt, policy, done, values, state)
        first_loss = values["loss"] if first_loss is None else first_loss
        last_loss = values["loss"]
        if stop:
            save_on_preemption(ckpt, policy, done, state, preemption, log)
            break

    ckpt.wait()
    preemption.uninstall()
    final_step = int(progress["step"])
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


class Preemption:
    """SIGTERM (what schedulers and torchrun send before killing) and SIGUSR1 (SLURM's `--signal` warning) ask
    the run to finish its step, save a full checkpoint and stop, instead of dying mid-step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def save_on_preemption(
    ckpt: Checkpointer,
    policy: Policy,
    step: int,
    state: Any,
    preemption: Preemption,
    log: MetricsLogger,
) -> None:
    """Make sure an exact-resume checkpoint of `step` exists, journal the preemption, and say how to go on."""
    due = roles_due(policy, step)
    full_rollback = policy.rollback_every > 0 and policy.full_rollback
    if not (Role.RECOVERY in due or (Role.ROLLBACK in due and full_rollback)):
        # Saved under a role whose retention will delete it in due course; with both cadences off it is a
        # recovery checkpoint that stays until removed by hand.
        role = Role.ROLLBACK if full_rollback and policy.recovery_every == 0 else Role.RECOVERY
        ckpt.save(step, [role], Contents.FULL, state(Contents.FULL))
    ckpt.wait()
    name = signal.Signals(preemption.received).name if preemption.received else "a signal on another rank"
    ckpt.journal.append("preempt", step, signal=name)
    log.print(f"curry-train: {name} received: saved step {step} and stopped; continue with +resume=latest")


def resume_from(
    point: ResumePoint,
    ckpt: Checkpointer,
    state: Any,
    same_world: bool,
    env: distributed.Dist,
    journal: Journal,
    log: MetricsLogger,
) -> None:
    wanted = state(point.contents)
    if not same_world:
        # Per-rank states belong to the old layout of ranks; the data position comes from the step instead.
        for key in PER_RANK_KEYS:
            wanted.pop(key, None)
    ckpt.load(point.path, wanted)
    try:
        relpath = point.path.resolve().relative_to(ckpt.store.path.resolve()).as_posix()
    except ValueError:  # a checkpoint of another run directory
        relpath = str(point.path)
    journal.append(
        "resume",
        point.step,
        path=str(relpath),
        contents=point.contents,
        exact=point.contents is Contents.FULL and same_world,
        world_size=env.world_size,
        saved_world_size=point.world_size,
    )
    if not same_world:
        journal.append("world_size_change", point.step, old=point.world_size, new=env.world_size)
    if env.is_main:
        rewind_latest(ckpt.store, point, relpath, journal)
    log.print(
        f"curry-train: resumed from step {point.step} of {relpath}"
        + ("" if same_world else f" (world size {point.world_size} -> {env.world_size})")
        + ("" if point.contents is Contents.FULL else " (parameters only: optimizer state starts fresh)")
    )


def rewind_latest(store: RunDir, point: ResumePoint, relpath: str, journal: Journal) -> None:
    """Resuming this run from an older checkpoint (a rollback after a loss spike) abandons the steps after it:
    `latest` must name the checkpoint the run now continues from, and the newer rollback and recovery checkpoints
    leave the run's view (kept on disk as .abandoned-, outside retention), or a crash would resume the abandoned
    path and retention would weigh its checkpoints against the current ones."""
    latest = store.latest()
    resumed = next((c for c in store.list() if c.relpath == relpath), None)
    if latest is None or resumed is None or latest.step <= point.step or point.contents is not Contents.FULL:
        return
    store.set_latest(resumed)
    newer = [c for c in store.list() if c.role is not Role.BEST_K and c.step > point.step]
    abandoned = [str(store.set_aside(c).relative_to(store.path)) for c in newer]
    journal.append(
        "rollback",
        point.step,
        path=relpath,
        abandoned_from=latest.step,
        abandoned=abandoned,
        reason=f"resumed from step {point.step} while latest was step {latest.step}",
    )


def check_fidelity(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """After a resume on the same world size: parameters and RNG must be bitwise what was saved."""
    for key in ("params", "rng"):
        if key in saved and saved[key] != now[key]:
            raise ResumeError(
                f"resume fidelity check failed: the {key} digest after loading is {now[key]}, "
                f"the checkpoint recorded {saved[key]}; the checkpoint or the code that loads it is "
                "not what saved it"
            )
    if "next_indices" in saved and saved["next_indices"] != now["next_indices"]:
        raise ResumeError(
            f"resume fidelity check failed: the next batch would be samples {now['next_indices'][:4]}..., "
            f"the checkpoint recorded {saved['next_indices'][:4]}..."
        )


def check_next_batch(batches: Iterator[dict], expected: list[int]) -> Iterator[dict]:
    """The first batch after a resume must be the one the global sample cursor names; it is then passed on."""
    first = next(batches)
    got = first["index"].tolist()
    if got != expected:
        raise ResumeError(
            f"resume fidelity check failed: the data loader resumed at samples {got[:4]}..., "
            f"the step's cursor names {expected[:4]}..."
        )
    return itertools.chain([first], batches)


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
