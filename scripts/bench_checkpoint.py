"""What checkpointing costs, against its floors, measured side by side in one run on one machine and one state.

    python scripts/bench_checkpoint.py --model small --nproc 2 --json bench.json     # launches torchrun itself
    python scripts/bench_checkpoint.py --model tiny --nproc 2 --reps 1 --io-reps 1 --loop-steps 8 --save-every 3 \\
        --step-rounds 2 --step-steps 2 --policy-steps 4                             # a smoke run, seconds

Rows (each repetition runs every row of its section, in an order that rotates between repetitions, so drift on a
shared machine cancels; a figure is the median over repetitions, the slowest rank's time):
  disk write / read   each rank writes its checkpoint share sequentially and fsyncs (as `dd conv=fdatasync`),
                      then reads it back after dropping its pages from the cache (posix_fadvise)
  disk write direct   the same write with O_DIRECT from an aligned buffer (as `dd oflag=direct`): the device's floor
  dcp.save / load     raw `dcp.save` / `dcp.load` of the harness's full state, the floor curry-train builds on
                      (the load reads curry-train's newest save, the files the resume rows read)
  sync save           curry-train's synchronous save (stage-free write, checksums, commit, journal)
  sync save buffered  the same with checkpoint.direct_io=false (through the page cache)
  resume load         curry-train's resume load (DCP load plus the fidelity check)
  resume verified     what +resume=latest does: check every file against the manifest, then the resume load
  ... warm            dcp.load and the resume load with the files in the page cache: the harness's own overhead
  blocking ...        what an asynchronous save holds the training thread (`Checkpointer.save` until it returns),
                      with the model's and optimizer's state dicts asked of DCP at each save against built by the
                      run's StateDictCache, alternated, --blocking-saves of each
  loop off/async/     a training run of --loop-steps steps, a full save every --save-every steps (none for off;
  async_thread/sync   async: the writer process, async_thread: the writer thread, async_buffered: the writer
                      process with direct_io=false), each launched by torchrun as a user launches one (a fresh
                      process per run: run one after another in one process, a run's first save cost 0.1-0.3 s
                      more than its others, in every mode, which no launch of its own shows); the extra wall
                      time of the --after-steps steps after each save over the median of the other steps of the
                      same run (`save_extras`; for off, the noise of that measure), its stall (that extra minus
                      off's at the same positions), each with its standard error from the runs' means (a run's
                      saves share its baseline), and the window of each run (first to last step's metrics line)
                      against off; each run's directory is removed once measured
  plain / harness     one optimizer step: a minimal hand-written FSDP2 loop against the harness (bench_step.py)
  policy off/default  `loop.train` at the `default` checkpoint cadences against checkpointing off
Goals compare these ratios with the targets of the fast-checkpoints issue.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from curry_train import distributed, loop
from curry_train import step as step_module
from curry_train.checkpoint import resume as resuming
from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.policy import Role
from curry_train.checkpoint.state import Contents, Progress, TrainState
from curry_train.checkpoint.store import RunDir
from curry_train.compose import compose, resolve
from curry_train.config import Config, Launch
from curry_train.data import Slicing, build_train_loader, load_checked_corpus
from curry_train.journal import Journal, read_journal
from curry_train.metrics import read_metrics
from curry_train.optim import build_optimizer

SCRIPTS = Path(__file__).resolve().parent
SECTIONS = ["io", "blocking", "loop", "step", "policy"]
LOOPS = ["off", "async", "async_thread", "sync", "async_buffered"]
CHECKPOINT_OFF = ["checkpoint.rollback_every=0", "checkpoint.recovery_every=0", "checkpoint.best_k=0"]
GOALS = {  # name: (target, "max" or "min" or "band")
    "async_stall_vs_sync": (0.10, "max"),
    "journal_cost_vs_outside": (0.20, "band"),
    "sync_save_vs_disk_write": (0.80, "min"),
    "resume_load_vs_dcp_load": (1.10, "max"),
    "harness_vs_plain_step": (1.02, "max"),
    "default_policy_cost": (0.03, "max"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset (conf/model/*.yaml)")
    p.add_argument("--nproc", type=int, default=2, help="ranks; the script launches torchrun itself")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--dir", type=Path, default=Path("bench-checkpoint"), help="scratch directory (removed after)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the loop runs")
    p.add_argument("--io-reps", type=int, default=6, help="repetitions of the I/O rows (seconds each)")
    p.add_argument("--blocking-saves", type=int, default=15, help="asynchronous saves of each blocking row")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="global sequences per step")
    p.add_argument("--loop-steps", type=int, default=43, help="steps of each loop run")
    p.add_argument("--save-every", type=int, default=8, help="full-save cadence of the async and sync loop runs")
    p.add_argument("--after-steps", type=int, default=3, help="steps after each save that its stall is measured on")
    p.add_argument("--step-rounds", type=int, default=3, help="bench_step rounds (plain against harness)")
    p.add_argument("--step-steps", type=int, default=10, help="bench_step timed steps per round and variant")
    p.add_argument("--policy-steps", type=int, default=110, help="steps of each default-policy run (0: skip)")
    p.add_argument(
        "--loops", nargs="*", default=LOOPS, choices=LOOPS, help="loop variants to run (off is always run: the noise)"
    )
    p.add_argument("--only", nargs="*", default=SECTIONS, choices=SECTIONS, help="sections to run (a rerun)")
    p.add_argument("--partial", type=Path, default=None, help=argparse.SUPPRESS)  # where the torchrun part reports
    args = p.parse_args()
    if "loop" in args.only and not 1 <= args.after_steps < args.save_every:
        p.error(f"--after-steps must be at least 1 and below --save-every ({args.save_every}), got {args.after_steps}")
    if "loop" in args.only and not measured_saves(args.save_every, args.loop_steps, args.after_steps):
        p.error(
            f"--loop-steps {args.loop_steps} leaves no save with its {args.after_steps} steps after it inside the "
            f"run: at least {args.save_every + args.after_steps} needed"
        )
    return args


def relaunch(args: argparse.Namespace, sections: list[str], partial: Path) -> dict[str, Any]:
    """Not under torchrun: run `sections` of this script under it with --nproc ranks; their raw figures."""
    # torchrun's parser would take --nproc for its own --nproc-per-node (a prefix): leave it out, it is said above.
    forwarded, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            forwarded.append(arg)
    cmd = [*torchrun(args.nproc), __file__, *forwarded, "--only", *sections, "--partial", str(partial)]
    returncode = subprocess.run(cmd, env=one_thread()).returncode
    if returncode != 0:
        raise SystemExit(returncode)
    return json.loads(partial.read_text())


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def one_thread() -> dict[str, str]:
    """One intra-op thread a rank, as in training."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def overrides(args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        f"model={args.model}",
        f"data.seq_len={args.seq_len}",
        "data.max_bytes=2000000",
        f"train.batch_size={args.batch_size}",
        f"train.device={args.device}",
        "logger.wandb.mode=disabled",
        "logger.progress_bar=false",
        "logger.console_every=100000",
        *extra,
    ]


def config(args: argparse.Namespace, *extra: str) -> Config:
    cfg, _ = resolve(compose(overrides(args, *extra)))
    return cfg


def timed(fn: Callable[[], Any]) -> float:
    """Seconds for `fn` on every rank (barriers around it: the slowest rank's time)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def drop_cache(root: Path) -> None:
    """Drop the page-cache pages of every file under `root` (they are fsynced, so clean): the next read hits disk."""
    if dist.get_rank() == 0:
        for p in root.rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    dist.barrier()


def warm_cache(root: Path) -> None:
    """Read every file under `root` once (the page cache is the node's: one rank's read serves all)."""
    if dist.get_rank() == 0:
        for p in root.rglob("*"):
            if p.is_file():
                with open(p, "rb", buffering=0) as f:
                    while f.read(8 << 20):
                        pass
    dist.barrier()


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------- the I/O rows


class IoBench:
    """The harness's full state after two steps, and the rows that save or load it."""

    def __init__(self, args: argparse.Namespace, env: distributed.Dist, scratch: Path) -> None:
        self.env, self.scratch = env, scratch
        cfg = config(args, "train.steps=1000")
        self.model, _ = distributed.build_sharded_model(cfg, env)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        corpus = load_checked_corpus(cfg.data, cfg.model.vocab_size)
        slicing = Slicing(cfg.train.batch_size, env.world_size, env.rank, cfg.train.grad_accum)
        batches = iter(build_train_loader(corpus.train, cfg.data, slicing, cfg.train.seed))
        for step in range(2):  # Adam's moments exist from the first step on
            step_module.optimizer_step(step, self.model, self.optimizer, batches, cfg, env.device)
        self.progress = Progress(step=2, cursor=2 * cfg.train.batch_size, world_size=env.world_size)
        self.train_state = TrainState(
            self.model, self.optimizer, self.progress, env.rank, env.device, lambda c: slicing.indices_at(c, 0)
        )
        self.train_state.schedule.update(step=2)

        def state(contents: Contents, fidelity: bool = True) -> dict:
            full = self.train_state.state(contents)
            return full if fidelity else {k: v for k, v in full.items() if k != "fidelity"}

        self.state = state
        run = scratch / "io-run"
        if env.is_main:
            run.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        journal = Journal(run / "journal.jsonl", enabled=env.is_main)
        where = {"store": RunDir(run), "journal": journal, "group": env.checkpoint_group, "rank": env.rank}
        sync = dataclasses.replace(cfg.checkpoint, async_save=False)
        self.ckpt = Checkpointer(sync, **where)
        self.ckpt_buffered = Checkpointer(dataclasses.replace(sync, direct_io=False), **where)
        self.dcp_dir = scratch / "raw.dcp"
        self.disk_file = scratch / f"disk-{env.rank}.bin"
        self.saved_bytes = 0

    def dcp_save(self) -> float:
        if self.env.is_main:
            shutil.rmtree(self.dcp_dir, ignore_errors=True)
        writer = FileSystemWriter(self.dcp_dir, sync_files=True)
        seconds = timed(
            lambda: dcp.save(
                self.state(Contents.FULL, False), storage_writer=writer, process_group=self.env.checkpoint_group
            )
        )
        self.saved_bytes = tree_bytes(self.dcp_dir) if self.env.is_main else 0
        return seconds

    def dcp_load(self, warm: bool = False) -> float:
        """Raw `dcp.load` of the files the resume rows load (curry-train's newest save): on a VM whose disk is a
        host file, how recently bytes were written changes how fast they read back, so the rows share their bytes."""
        reader = FileSystemReader(self._latest_point(warm).path)
        return timed(
            lambda: dcp.load(
                self.state(Contents.FULL, False), storage_reader=reader, process_group=self.env.checkpoint_group
            )
        )

    def sync_save(self, buffered: bool = False) -> float:
        self.progress.step += 1  # a new step each time: a save at a committed step would replace it
        ckpt = self.ckpt_buffered if buffered else self.ckpt
        return timed(lambda: ckpt.save(self.progress.step, [Role.RECOVERY], Contents.FULL, self.state(Contents.FULL)))

    def resume_verified(self) -> float:
        point = self._latest_point(warm=False)

        def resume() -> None:
            resuming.choose_verified(point, self.env.checkpoint_group, self.ckpt.store, self.ckpt.journal, print)
            resuming.load(point, self.ckpt, self.train_state, self.env.world_size)

        return timed(resume)

    def resume_load(self, warm: bool = False) -> float:
        point = self._latest_point(warm)
        return timed(lambda: resuming.load(point, self.ckpt, self.train_state, self.env.world_size))

    def _latest_point(self, warm: bool) -> resuming.ResumePoint:
        """The newest save, its pages dropped from the cache (a resume after a restart reads from disk), or all in
        the cache (`warm`: what loading costs besides reading the disk, which on a shared VM varies by +-40%)."""
        store = self.ckpt.store
        path = store.path_of(store.latest()) if self.env.is_main else None
        box = [path]
        dist.broadcast_object_list(box, src=0, group=self.env.checkpoint_group)
        (warm_cache if warm else drop_cache)(Path(box[0]))
        return resuming.ResumePoint(box[0], self.progress.step, Contents.FULL, self.env.world_size)

    def disk_write(self) -> float:
        share = max(1, self.shared_bytes() // self.env.world_size)
        block = os.urandom(8 << 20)

        def write() -> None:
            with open(self.disk_file, "wb", buffering=0) as f:
                left = share
                while left > 0:
                    left -= f.write(memoryview(block)[: min(left, len(block))])
                os.fsync(f.fileno())

        return timed(write)

    def disk_write_direct(self) -> float:
        share = max(1, self.shared_bytes() // self.env.world_size)
        block = mmap.mmap(-1, 8 << 20)  # page-aligned, as O_DIRECT needs
        block.write(os.urandom(8 << 20))
        share = -(-share // 4096) * 4096

        def write() -> None:
            fd = os.open(self.disk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            try:
                left = share
                while left > 0:
                    left -= os.write(fd, memoryview(block)[: min(left, len(block))])
                os.fsync(fd)
            finally:
                os.close(fd)

        return timed(write)

    def disk_read(self) -> float:
        fd = os.open(self.disk_file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

        def read() -> None:
            with open(self.disk_file, "rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass

        return timed(read)

    def shared_bytes(self) -> int:
        box = [self.saved_bytes]
        dist.broadcast_object_list(box, src=0, group=self.env.checkpoint_group)
        return int(box[0])


def io_rows(args: argparse.Namespace, env: distributed.Dist, scratch: Path) -> tuple[dict[str, list[float]], int]:
    bench = IoBench(args, env, scratch)
    bench.dcp_save()  # untimed: sizes the disk rows, warms the code paths
    rows = {
        "disk_write": bench.disk_write,
        "disk_write_direct": bench.disk_write_direct,
        "dcp_save": bench.dcp_save,
        "sync_save": bench.sync_save,
        "sync_save_buffered": lambda: bench.sync_save(buffered=True),
        "disk_read": bench.disk_read,
        "dcp_load": bench.dcp_load,
        "resume_load": bench.resume_load,
        "resume_verified": bench.resume_verified,
        "dcp_load_warm": lambda: bench.dcp_load(warm=True),
        "resume_load_warm": lambda: bench.resume_load(warm=True),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    saves = ["disk_write", "disk_write_direct", "dcp_save", "sync_save", "sync_save_buffered"]
    loads = ["disk_read", "dcp_load", "resume_load", "resume_verified", "dcp_load_warm", "resume_load_warm"]
    for rep in range(args.io_reps):
        k = rep % len(saves)
        for name in saves[k:] + saves[:k]:
            times[name].append(bench.dcp_save() if name == "dcp_save" else rows[name]())
        for name in loads[k:] + loads[:k]:
            times[name].append(rows[name]())
    return times, bench.shared_bytes()


def blocking_rows(args: argparse.Namespace, env: distributed.Dist, scratch: Path) -> dict[str, list[float]]:
    """What an asynchronous save holds the training thread (`Checkpointer.save`, until it returns) with the model's
    and optimizer's state dicts asked of DCP at every save (`blocking_dcp_state_dicts`, as before session 31) and
    built by the run's `StateDictCache` (`blocking_cached_state_dicts`, what the loop does), alternated in one
    process; each save is written and committed before the next, outside the timed part."""
    bench = IoBench(args, env, scratch)
    run = scratch / "blocking-run"
    if env.is_main:
        run.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    journal = Journal(run / "journal.jsonl", enabled=env.is_main)
    cfg = config(args, "train.steps=1000")
    where = {"store": RunDir(run), "journal": journal, "group": env.checkpoint_group, "rank": env.rank}
    ckpt = Checkpointer(dataclasses.replace(cfg.checkpoint, async_save=True), **where)
    state, cache = bench.train_state, bench.train_state.state_dicts
    ckpt.prepare(state.state(Contents.FULL))
    times: dict[str, list[float]] = {"blocking_dcp_state_dicts": [], "blocking_cached_state_dicts": []}
    names = list(times)
    for rep in range(args.blocking_saves + 1):  # the first round warms both paths: not counted
        for name in names[rep % 2 :] + names[: rep % 2]:
            state.state_dicts = cache if name == "blocking_cached_state_dicts" else None  # None: DCP's, each save
            bench.progress.step += 1
            save = functools.partial(ckpt.save, bench.progress.step, [Role.ROLLBACK], Contents.FULL)
            seconds = timed(functools.partial(save, state.state(Contents.FULL)))
            ckpt.before_update()
            ckpt.wait()
            if rep > 0:
                times[name].append(seconds)
    state.state_dicts = cache
    ckpt.close()
    journal.close()
    return times


# ------------------------------------------------------------------------------------------------ loop runs


def run_loop(cfg: Config, env: distributed.Dist, run_dir: Path) -> Path:
    if env.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.barrier()
    loop.train(cfg, run_dir, env, Launch())
    dist.barrier()
    return run_dir


def window(run_dir: Path, first: int, last: int) -> float:
    """Seconds from the metrics line of step `first` to that of step `last` (rank 0 writes them as steps end)."""
    metrics = read_metrics(run_dir / "metrics.jsonl")
    return metrics[last]["time"] - metrics[first]["time"]


def measured_saves(save_every: int, steps: int, after: int) -> list[int]:
    """The steps of a run's saves whose `after` steps all lie inside the run (a later save's are cut short)."""
    return [s for s in range(save_every, steps, save_every) if s + after <= steps]


def save_extras(run_dir: Path, save_every: int, steps: int, after: int) -> list[float]:
    """What each save cost the steps after it, measured from outside (rank 0's metrics lines, one as each step
    ends), against steps of the same run: a save after step s shows in the intervals of steps s+1 .. s+after (the
    save, or its background write, and the commit); every other step after the first save is the baseline (their
    median). Comparing steps within one run cancels the drift between runs that a shared machine shows; the
    baseline is shared by the run's saves, so a cadence with more steps between saves than `after` (more
    baseline steps) is what makes the measure quiet. On a run without saves (`off`) the same positions give the
    noise of the measure."""
    metrics = read_metrics(run_dir / "metrics.jsonl")
    interval = {d: metrics[d]["time"] - metrics[d - 1]["time"] for d in range(2, steps + 1)}
    touched = {d for s in range(save_every, steps, save_every) for d in range(s + 1, s + after + 1)}
    clean = [t for d, t in interval.items() if d > save_every and d not in touched]
    base = statistics.median(clean)
    saves = measured_saves(save_every, steps, after)
    return [sum(interval[d] - base for d in range(s + 1, s + after + 1)) for s in saves]


def journal_saves(run_dir: Path, field: str) -> list[float]:
    """`field` of each save line of the run's journal (rank 0's figures), in order."""
    events = read_journal(run_dir / "journal.jsonl")
    return [e[field] for e in events if e["event"] == "save" and e.get(field) is not None]


def launch_loop(args: argparse.Namespace, extra: list[str], run_dir: Path) -> Path:
    """One training run of `curry_train.train`, launched by torchrun as a user launches one: a fresh process per
    run, so nothing of an earlier run (its memory, its writer, its collector's state) is left in the one measured."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [*torchrun(args.nproc), "-m", "curry_train.train", *overrides(args, *extra)]
    cmd += [f"run.root={run_dir.parent}", f"run.id={run_dir.name}"]
    done = subprocess.run(cmd, env=one_thread(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"loop run {run_dir.name} failed (status {done.returncode}):\n{done.stderr[-3000:]}")
    return run_dir


def loop_rows(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    saving = [f"checkpoint.rollback_every={args.save_every}", "checkpoint.recovery_every=0", "checkpoint.best_k=0"]
    common = [f"train.steps={args.loop_steps}", "train.eval_every=0", "checkpoint.check_storage=false"]
    variants = {
        "off": [*common, *CHECKPOINT_OFF],
        "async": [*common, *saving, "checkpoint.async_save=true", "checkpoint.writer=process"],
        "async_thread": [*common, *saving, "checkpoint.async_save=true", "checkpoint.writer=thread"],
        "sync": [*common, *saving, "checkpoint.async_save=false"],
        "async_buffered": [*common, *saving, "checkpoint.async_save=true", "checkpoint.direct_io=false"],
    }
    variants = {name: extra for name, extra in variants.items() if name == "off" or name in args.loops}
    # Saves whose steps after them lie inside the run: a save in the last steps would be waited for at exit.
    saves = len(measured_saves(args.save_every, args.loop_steps, args.after_steps))
    windows: dict[str, list[float]] = {name: [] for name in variants}
    extras: dict[str, list[list[float]]] = {name: [] for name in variants}  # one list a run
    blocking: dict[str, list[float]] = {name: [] for name in variants if name != "off"}
    costs: list[float] = []
    names = list(variants)
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            run_dir = launch_loop(args, variants[name], scratch / f"loop-{name}")
            windows[name].append(window(run_dir, 1, args.loop_steps))
            extras[name].append(save_extras(run_dir, args.save_every, args.loop_steps, args.after_steps))
            if name != "off":  # what the training thread itself spends in each save (the journal's figure)
                blocking[name] += journal_saves(run_dir, "blocking_seconds")[:saves]
            if name == "async":
                costs += journal_saves(run_dir, "cost_seconds")[:saves]
            shutil.rmtree(run_dir)  # measured: 685 MB a save of model=small fills a disk fast
            mean = statistics.fmean(extras[name][-1])  # progress: a loop section runs for many minutes
            print(f"loop {rep + 1}/{args.reps} {name}: {mean:+.3f} s a save over the other steps", flush=True)
    return {"windows": windows, "extras": extras, "saves": saves, "journal_costs": costs, "blocking": blocking}


def policy_rows(args: argparse.Namespace, env: distributed.Dist, scratch: Path) -> dict[str, list[float]]:
    """Windows of one run each (too short to resolve a cost of a few percent on a noisy machine), and the journaled
    cost of the default run's saves inside its window: what the loop rows check against the outside figure."""
    common = [f"train.steps={args.policy_steps}", "checkpoint=default", "checkpoint.check_storage=false"]
    variants = {"policy_off": config(args, *common, *CHECKPOINT_OFF), "policy_default": config(args, *common)}
    windows: dict[str, list[float]] = {name: [] for name in variants}
    windows["policy_default_journal"] = []
    for name, cfg in variants.items():
        run_dir = run_loop(cfg, env, scratch / name)
        if env.is_main:
            windows[name].append(window(run_dir, 1, args.policy_steps))
            if name == "policy_default":  # saves after the last step's metrics line are outside the window
                events = read_journal(run_dir / "journal.jsonl")
                inside = [e for e in events if e["event"] == "save" and e["step"] < args.policy_steps]
                windows["policy_default_journal"].append(sum(e.get("cost_seconds") or 0.0 for e in inside))
    return windows


def step_rows(args: argparse.Namespace, env: distributed.Dist) -> dict[str, Any]:
    sys.path.insert(0, str(SCRIPTS))  # scripts/ is not a package
    import bench_step

    ns = argparse.Namespace(
        model=args.model,
        steps=args.step_steps,
        warmup=2,
        rounds=args.step_rounds,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_bytes=2_000_000,
        overrides=[f"train.device={args.device}"],
    )
    result = bench_step.measure(ns, bench_step.compose_config(ns), env)
    return {"plain": result["variants"]["plain"]["median_s"], "harness": result["variants"]["harness"]["median_s"]}


# --------------------------------------------------------------------------------------------------- report


def run_stderr(runs: list[list[float]]) -> float:
    """The standard error of the mean extra a save, from the runs' own means: a run's saves share its baseline
    (the median of its other steps), so they are not independent of each other, and the spread of the run means
    is what says how far the mean could move. NaN with one run."""
    means = [statistics.fmean(run) for run in runs if run]
    return statistics.stdev(means) / len(means) ** 0.5 if len(means) > 1 else float("nan")


def summarize(io: dict[str, list[float]], nbytes: int, loops: dict, steps: dict, policy: dict) -> dict[str, Any]:
    """Rows and ratios of the sections that ran (all of them unless --only)."""
    rows: dict[str, dict[str, float]] = {}
    ratios: dict[str, float] = {}
    med = {name: statistics.median(t) for name, t in io.items()}
    for name, seconds in med.items():
        rows[name] = {"seconds": seconds}
        if not name.startswith("blocking_"):
            rows[name] |= {"bytes": nbytes, "mb_per_s": nbytes / seconds / 1e6}
    if "blocking_dcp_state_dicts" in med:
        ratios["save_blocking_cached_vs_dcp_state_dicts"] = (
            med["blocking_cached_state_dicts"] / med["blocking_dcp_state_dicts"]
        )
    if "sync_save" in med:
        ratios["sync_save_vs_disk_write"] = med["disk_write"] / med["sync_save"]  # a throughput ratio
        ratios["dcp_save_vs_disk_write"] = med["disk_write"] / med["dcp_save"]
        ratios["resume_load_vs_dcp_load"] = med["resume_load"] / med["dcp_load"]
        ratios["sync_save_vs_disk_write_direct"] = med["disk_write_direct"] / med["sync_save"]
        ratios["sync_save_buffered_vs_direct"] = med["sync_save_buffered"] / med["sync_save"]  # times: > 1 is slower
        ratios["resume_verified_vs_dcp_load"] = med["resume_verified"] / med["dcp_load"]
        ratios["resume_load_vs_dcp_load_warm"] = med["resume_load_warm"] / med["dcp_load_warm"]
    if loops:
        # The stall figures compare steps within each run (save_extras); the windows (whole runs against the run
        # without saves) are kept beside them, as `window_extra_per_save_s`.
        w = {name: statistics.median(t) for name, t in loops["windows"].items()}
        n = max(1, loops["saves"])
        for mode, runs in loops["extras"].items():
            rows[f"loop_{mode}"] = {
                "seconds": w[mode],
                "extra_per_save_s": statistics.fmean(x for run in runs for x in run),
                "extra_stderr_s": run_stderr(runs),
                "window_extra_per_save_s": (w[mode] - w["off"]) / n,
            }
            if loops.get("blocking", {}).get(mode):
                rows[f"loop_{mode}"]["blocking_s"] = statistics.fmean(loops["blocking"][mode])
        journal = statistics.fmean(loops["journal_costs"]) if loops["journal_costs"] else float("nan")
        rows["async_journal_cost"] = {"seconds": journal}
        # A save's stall: its extra over the same positions of the run without saves (the measure's own offset).
        noise, noise_err = rows["loop_off"]["extra_per_save_s"], rows["loop_off"]["extra_stderr_s"]
        for mode in loops["extras"]:
            row = rows[f"loop_{mode}"]
            row["stall_s"] = row["extra_per_save_s"] - noise
            row["stall_stderr_s"] = math.hypot(row["extra_stderr_s"], noise_err) if mode != "off" else 0.0
        stall = {mode: rows[f"loop_{mode}"]["stall_s"] for mode in loops["extras"]}

        def ratio(name: str, mode: str, against: str) -> None:  # only for the variants that ran
            if mode in stall and against in stall:
                ratios[name] = stall[mode] / stall[against] if stall[against] > 0 else float("nan")

        ratio("async_stall_vs_sync", "async", "sync")
        ratio("async_thread_stall_vs_sync", "async_thread", "sync")
        ratio("async_buffered_vs_direct_stall", "async_buffered", "async")
        if "async" in stall:
            ratios["journal_cost_vs_outside"] = journal / stall["async"] if stall["async"] > 0 else float("nan")
    if steps:
        rows["plain_step"] = {"seconds": steps["plain"]}
        rows["harness_step"] = {"seconds": steps["harness"]}
        ratios["harness_vs_plain_step"] = steps["harness"] / steps["plain"]
    if policy:
        rows["policy_off"] = {"seconds": statistics.median(policy["policy_off"])}
        rows["policy_default"] = {"seconds": statistics.median(policy["policy_default"])}
        ratios["default_policy_cost"] = rows["policy_default"]["seconds"] / rows["policy_off"]["seconds"] - 1
        rows["policy_default_journal_cost"] = {"seconds": statistics.median(policy["policy_default_journal"])}
        ratios["default_policy_cost_journal"] = (
            rows["policy_default_journal_cost"]["seconds"] / rows["policy_off"]["seconds"]
        )
    goals = {}
    for name, (target, kind) in GOALS.items():
        if name in ratios:
            value = ratios[name]
            met = {"max": value <= target, "min": value >= target, "band": abs(value - 1) <= target}[kind]
            goals[name] = {"value": value, "target": target, "kind": kind, "met": bool(met)}
    return {"rows": rows, "ratios": ratios, "goals": goals, "saves_per_loop_run": loops.get("saves", 0)}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['machine']}")
    head = f"{'row':<28}{'seconds':>10}{'MB/s':>10}{'extra/save s':>14}{'+-':>8}{'stall s':>9}{'+-':>8}"
    print(f"{head}{'blocking s':>12}")
    for name, row in result["rows"].items():
        mbs = f"{row['mb_per_s']:.0f}" if "mb_per_s" in row else ""
        extra = f"{row['extra_per_save_s']:.3f}" if "extra_per_save_s" in row else ""
        err = f"{row['extra_stderr_s']:.3f}" if "extra_stderr_s" in row else ""
        stall = f"{row['stall_s']:.3f}" if "stall_s" in row else ""
        stall_err = f"{row['stall_stderr_s']:.3f}" if "stall_stderr_s" in row else ""
        blocking = f"{row['blocking_s']:.4f}" if "blocking_s" in row else ""
        print(f"{name:<28}{row['seconds']:>10.3f}{mbs:>10}{extra:>14}{err:>8}{stall:>9}{stall_err:>8}{blocking:>12}")
    print("ratios:")
    for name, value in result["ratios"].items():
        goal = result["goals"].get(name)
        verdict = (
            "" if goal is None else f"  goal {goal['kind']} {goal['target']}: {'met' if goal['met'] else 'NOT met'}"
        )
        print(f"  {name:<32}{value:>8.3f}{verdict}")


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ:  # the sections that run under torchrun: figures to the parent
        inner(args)
        return
    scratch = args.dir.resolve()
    load_before = os.getloadavg()
    sections = [s for s in args.only if s != "loop"]
    partial = scratch.with_name(f"{scratch.name}-partial.json")
    raw = relaunch(args, sections, partial) if sections else {}
    partial.unlink(missing_ok=True)
    loops: dict[str, Any] = {}
    if "loop" in args.only:  # each run launched as a user launches one
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            loops = loop_rows(args, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    io, nbytes = raw.get("io", {}), raw.get("nbytes", 0)
    result = summarize(io, nbytes, loops, raw.get("steps", {}), raw.get("policy", {}))
    result["machine"] = (
        f"torch {torch.__version__}, {args.nproc} ranks on {args.device}, {os.cpu_count()} CPUs, model {args.model}, "
        f"{args.batch_size} x {args.seq_len} tokens a step, checkpoint {nbytes / 1e6:.0f} MB (I/O rows), "
        f"load average {load_before[0]:.2f} before and {os.getloadavg()[0]:.2f} after"
    )
    result["raw"] = {"io": io, "loops": loops, "steps": raw.get("steps", {}), "policy": raw.get("policy", {})}
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def inner(args: argparse.Namespace) -> None:
    """Under torchrun: the I/O, step and policy sections, their raw figures written to `--partial` by rank 0."""
    env = distributed.init_distributed(args.device)
    scratch = args.dir.resolve()
    try:
        if env.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
        dist.barrier()
        io, nbytes = io_rows(args, env, scratch) if "io" in args.only else ({}, 0)
        if "blocking" in args.only:
            io |= blocking_rows(args, env, scratch)
        steps = step_rows(args, env) if "step" in args.only else {}
        policy = policy_rows(args, env, scratch) if args.policy_steps > 0 and "policy" in args.only else {}
        if env.is_main:
            raw = {"io": io, "nbytes": nbytes, "steps": steps, "policy": policy}
            args.partial.write_text(json.dumps(raw) + "\n")
    finally:
        if env.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
        distributed.shutdown()


if __name__ == "__main__":
    main()
