"""The training loop: build in dependency order, resume if asked, then step, evaluate, save, roll back on a spike."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from curry_train import distributed, faults, spike, warm_start, watchdog
from curry_train.checkpoint import remote_start, rollback, upload
from curry_train.checkpoint import resume as resuming
from curry_train.checkpoint.auto_cadence import AutoCadence
from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.plan_text import plan_json, render_plan
from curry_train.checkpoint.policy import Contents, Policy, SaveReason, decide_save, largest_save
from curry_train.checkpoint.preemption import Preemption, ensure_full_save, save_on_preemption
from curry_train.checkpoint.remote import RemoteStore
from curry_train.checkpoint.resume import ResumeError
from curry_train.checkpoint.rollback import SpikeError
from curry_train.checkpoint.state import Progress, TrainState
from curry_train.checkpoint.store import RunDir
from curry_train.config import Config, Launch, validate
from curry_train.data import Corpus, Slicing, build_train_loader, dev_batches, load_checked_corpus
from curry_train.distributed import on_rank0
from curry_train.optim import build_optimizer
from curry_train.run import Run, open_run
from curry_train.step import evaluate, optimizer_step

__all__ = ["ResumeError", "SpikeError", "TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    first_loss: float | None
    last_loss: float | None


@dataclass
class Session:
    """One launch's training, built in dependency order by `start`: what the loop reads and changes."""

    cfg: Config
    env: distributed.Dist
    launch: Launch
    run: Run
    dog: watchdog.Watchdog
    corpus: Corpus
    slicing: Slicing
    state: TrainState
    checkpointer: Checkpointer
    preemption: Preemption  # stop signals, from the start of loading until the launch has nothing left to save

    def batches_from(self, cursor: int) -> Iterator[dict]:
        """The loader at the global sample cursor: the whole data position, so a resume on any world size or worker
        count, and a rollback that skips samples, all start here."""
        t = self.cfg.train
        return iter(build_train_loader(self.corpus.train, self.cfg.data, self.slicing, t.seed, start_sample=cursor))

    def say(self, line: str) -> None:
        self.run.log.print(line)


def train(cfg: Config, run_dir: Path, env: distributed.Dist, launch: Launch | None = None) -> TrainResult:
    """Train `cfg` in `run_dir`, watched by this rank's hang watchdog (stopped however the loop ends)."""

    def follow(seconds: float) -> None:  # the collective timeout follows an automatic hang timeout that grew
        distributed.set_collective_timeout(seconds, [env.checkpoint_group])

    dog = watchdog.Watchdog(env.rank, run_dir, cfg.train.hang_timeout_s, on_timeout=follow, peers=env.peers)
    with dog, remote_start.lease_scope():  # checkpoint.remote: the run's lease, released at a clean end
        session = start(cfg, run_dir, env, launch or Launch(), dog)
        if isinstance(session, TrainResult):  # the run had already finished
            return session
        batches = load(session)
        first_loss, last_loss = run_steps(session, batches)
        return finish(session, first_loss, last_loss)


def start(
    cfg: Config, run_dir: Path, env: distributed.Dist, launch: Launch, dog: watchdog.Watchdog
) -> Session | TrainResult:
    """Check, take the run directory, build the model, optimizer and checkpointer (or say the run is finished)."""
    validate(cfg, env.world_size)
    faults.check(launch.debug, env.world_size)
    init_plan = warm_start.prepare(cfg, launch, env)  # a source that cannot be used is refused before open_run
    run = open_run(cfg, run_dir, env, launch)
    point, t = run.point, cfg.train
    if point is not None:
        if point.note:
            run.log.print(f"curry-train: {point.note}")
        verb = "rolling back" if point.rollback_to else "resuming"
        run.log.print(f"curry-train: {verb} from step {point.step} of {point.path}")
        if point.step >= t.steps and point.rollback_to is None:
            said = f"already finished ({point.step} of {t.steps} steps); nothing to do"
            run.log.print(f"curry-train: run {run_dir} {said}")
            run.close()
            if cfg.checkpoint.remote is not None and env.is_main:  # this launch's lines in the remote's journal too
                upload.put_run_files(RemoteStore(cfg.checkpoint.remote, run_dir.name), run_dir)
            return TrainResult(run_dir, point.step, None, None)

    corpus = load_checked_corpus(cfg.data, cfg.model.vocab_size)
    model, n_params = distributed.build_sharded_model(cfg, env, initialize=point is None and init_plan is None)
    optimizer = build_optimizer(model, cfg.optimizer)
    if point is None and cfg.init.source is not None:  # a warm start; a resume never reads the source again
        warm_start.load_initial(init_plan, cfg, model, optimizer, env, run.journal, run.log.print)
    slicing = Slicing(t.batch_size, env.world_size, env.rank, t.grad_accum)
    progress = Progress(world_size=env.world_size)
    state = TrainState(model, optimizer, progress, env.rank, env.device, lambda cursor: slicing.indices_at(cursor, 0))
    run.log.print(
        f"curry-train: model {cfg.model.name} with {n_params:,} parameters ({n_params:.3g}), "
        f"world size {env.world_size} on {env.device.type}, data: {corpus.description} "
        f"({len(corpus.train):,} train / {len(corpus.dev):,} dev tokens), run directory {run_dir}"
    )
    run.log.print(render_plan(run.plan))
    dog.hint(run.plan.hang_timeout_s)
    run.journal.append("policy", 0, **plan_json(run.plan))
    checkpointer = Checkpointer(
        cfg.checkpoint,
        store=RunDir(run_dir),
        journal=run.journal,
        group=env.checkpoint_group,
        rank=env.rank,
        faults=launch.debug,
        uploader=upload.build(cfg.checkpoint, run_dir, env.rank, run.journal, launch.debug.upload_stall_at),
        node_local=run.node is not None,
    )
    preemption = Preemption(run_dir, env.is_main, lambda: (dog.step, dog.phase), run.plan.full_save_seconds)
    return Session(cfg, env, launch, run, dog, corpus, slicing, state, checkpointer, preemption)


def load(s: Session) -> Iterator[dict]:
    """Resume, or roll back as asked (`+rollback_to`); returns the batches from the step the run continues at."""
    point, progress, t = s.run.point, s.state.progress, s.cfg.train
    s.dog.beat(progress.step, "loading")
    if point is not None and point.rollback_to is not None:
        group = s.env.checkpoint_group
        cause = on_rank0(s.env.is_main, group, rollback.manual_cause, point, s.checkpointer.store, t.batch_size)
        rollback.roll_back(point, cause, s.checkpointer, s.state, s.cfg.spike, t.batch_size, s.env.world_size, s.say)
        s.run.log.event("rollback", progress.step, spike_step=cause.step)
    elif point is not None:
        resuming.resume(point, s.checkpointer, s.state, s.env.world_size, s.say)
        faults.perturb_after_resume(s.launch.debug, s.state.model, s.say)
        s.run.log.event("resume", progress.step)
    batches = s.batches_from(progress.cursor)
    if point is not None:
        batches = resuming.check_next_batch(batches, s.slicing.indices_at(progress.cursor, 0))
    return batches


def run_steps(s: Session, batches: Iterator[dict]) -> tuple[float | None, float | None]:
    """The loop: step, judge the loss, evaluate, save; roll back on a spike, stop after a stop signal's save.
    Returns this launch's first and last loss."""
    cfg, t, env, dog, log = s.cfg, s.cfg.train, s.env, s.dog, s.run.log
    model, progress, checkpointer = s.state.model, s.state.progress, s.checkpointer
    dev = dev_batches(s.corpus.dev, cfg.data, s.slicing, t.seed, t.eval_batches)
    auto = AutoCadence(cfg, s.run.dir, s.run.journal, env, checkpointer)  # *_every=auto: now, and as saves commit
    policy = auto.decide(progress.step, "resume" if s.run.point is not None else "start")
    rule = cfg.spike.rule()
    first_loss = last_loss = None
    while progress.step < t.steps:
        step, done = progress.step, progress.step + 1  # 0-based index of this step; completed steps after it
        faults.stall_if_due(s.launch.debug, s.run.dir, dog, env.rank, done)
        dog.beat(step, f"step {done}")
        lr_scale = spike.rewarm_factor(step, progress.rewarm_from, cfg.spike.rewarmup_steps)
        lr_scale *= faults.injected_lr_scale(s.launch.debug, progress, s.run.journal, done)
        started = time.perf_counter()
        values, stop = optimizer_step(
            step,
            model,
            s.state.optimizer,
            batches,
            cfg,
            env.device,
            s.preemption.requested,
            lr_scale,
            checkpointer.before_update,
        )
        values["tokens_per_s"] = t.batch_size * cfg.data.seq_len / (time.perf_counter() - started)
        verdict = spike.judge(rule, progress.loss_window, done, values["loss"]) if cfg.spike.enabled else None
        if verdict is not None and verdict.spike:
            log.log(done, {**values, "spike": True})
            target, cause = rollback.spike_target(verdict, done, progress, checkpointer, cfg.spike, t.batch_size)
            dog.beat(step, f"the rollback from step {done}")
            rollback.roll_back(target, cause, checkpointer, s.state, cfg.spike, t.batch_size, env.world_size, s.say)
            log.event("rollback", progress.step, spike_step=done)
            batches = s.batches_from(progress.cursor)
            continue
        progress.step, progress.cursor = done, progress.cursor + t.batch_size
        progress.loss_window = spike.push(progress.loss_window, values["loss"], cfg.spike.window)
        s.state.schedule.update(step=done, lr=values["lr"])
        # The first completed step arms the watchdog: start-up and the first step's warm-up are not hangs.
        (dog.beat if dog.armed else dog.arm)(done, f"the end of step {done}")
        if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            dog.beat(done, f"the evaluation after step {done}")
            values["dev_loss"] = evaluate(model, dev, env.device)
        log.log(done, values)
        dog.beat(done, f"the save of step {done}")
        checkpointer.poll()  # commits a save in flight once every rank's bytes are durable
        save_checkpoint(checkpointer, policy, done, values, s.state)
        if first_loss is None:  # the launch's first step: the state has its final structure (optimizer state too)
            # A full collection of the garbage collector scans every object the process holds (torch's modules, the
            # model, the optimizer: 0.14 s for model=small on CPU) with the interpreter lock held, and a save's
            # allocations are what trigger one; frozen, those objects are left out of every later collection.
            gc.freeze()
            if (largest := largest_save(policy)) is not None:
                checkpointer.prepare(s.state.state(largest))  # staging allocated and faulted in ahead of the save
        policy = auto.follow(done)
        first_loss = values["loss"] if first_loss is None else first_loss
        last_loss = values["loss"]
        if stop:
            save_on_preemption(checkpointer, policy, done, s.state.state, s.preemption, log.print)
            break
    if progress.step == t.steps and cfg.checkpoint.save_final:
        dog.beat(progress.step, f"the save of step {progress.step}")
        ensure_full_save(checkpointer, policy, progress.step, s.state.state, SaveReason.FINAL)  # run_end names it
    return first_loss, last_loss


def finish(s: Session, first_loss: float | None, last_loss: float | None) -> TrainResult:
    """Wait for the save in flight; at the end of the run, for its uploads too, then journal `run_end`."""
    final_step, steps, checkpointer = s.state.progress.step, s.cfg.train.steps, s.checkpointer
    s.dog.beat(final_step, f"the save of step {final_step}")
    checkpointer.close()
    if final_step == steps:
        s.dog.beat(final_step, "the uploads to checkpoint.remote")
        checkpointer.finish_uploads()
        latest = checkpointer.latest() if s.env.is_main else None
        s.run.journal.append("run_end", final_step, last_loss=last_loss, checkpoint=latest.relpath if latest else None)
    s.preemption.settle()  # saved and journaled: a late stop signal must not turn this end into a failure
    if first_loss is not None:
        start_step = s.run.point.step if s.run.point is not None else 0
        s.say(
            f"curry-train: {'finished' if final_step == steps else 'stopped after'} {final_step} steps; "
            f"{'first loss' if start_step == 0 else f'loss at step {start_step + 1} (first of this launch)'} "
            f"{first_loss:.4f}, last loss {last_loss:.4f}"
        )
    s.run.close()
    uploader = checkpointer.uploader
    if uploader is not None and s.env.is_main and (problem := uploader.put_run_files()) is not None:
        # After the metrics logger closed (all it wrote is in the file uploaded): straight to stderr.
        print(f"curry-train: WARNING: checkpoint.remote: run files not uploaded at the end: {problem}", file=sys.stderr)
    return TrainResult(s.run.dir, final_step, first_loss, last_loss)


def save_checkpoint(
    checkpointer: Checkpointer, policy: Policy, step: int, values: dict[str, float], state: TrainState
) -> None:
    """Save what the policy says is due after `step`: the cadence roles, then best-K on a new dev metric."""
    decision = decide_save(policy, step, SaveReason.CADENCE)
    if decision is not None:
        checkpointer.save(step, list(decision.roles), decision.contents, state.state(decision.contents))
    metric = values.get(policy.best_k_metric)
    if metric is not None:
        checkpointer.consider_best_k(step, metric, lambda: state.state(Contents.PARAMS))
