"""`curry-train rehearse [torchrun options] [--steps=N] [--kill-at=K] [--keep] OVERRIDES...`: test the resume of
the user's own run before the long run.

With the real run's overrides and ranks it runs N steps straight, then the same N steps killed outright (SIGKILL to
every process of the job) after step K and resumed with `+resume=latest`, both in a fresh directory under `run.root`
that it removes afterwards (unless --keep). The verdict compares the two runs' losses bitwise over steps 1-N; the
rest is what the real run will pay: a save's cost, a resume's time, and the plan's storage over its `train.steps`.

torchrun is started as `curry-train run` starts it (`launcher.start`), its output in a log file per launch. Progress
goes to stderr; the report to stdout, the verdict on its first line.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from curry_train import failures
from curry_train.checkpoint.cadence import exact_resume_cadence
from curry_train.checkpoint.plan import build_plan, storage_refusal
from curry_train.checkpoint.sizes import model_size
from curry_train.compose import from_command_line
from curry_train.config import Config, ConfigError, validate
from curry_train.history import measured_save_seconds, measured_step_seconds, save_costs
from curry_train.journal import read_journal
from curry_train.launcher import (
    LaunchError,
    kill_tree,
    parse_options,
    read_failed,
    read_records,
    refusal,
    run_status,
    single_node,
    start,
    torchrun_arguments,
    world_size,
)
from curry_train.layout import RunFiles
from curry_train.metrics import read_metrics
from curry_train.units import human_bytes

USAGE = """usage: curry-train rehearse [torchrun options] [--steps=N] [--kill-at=K] [--keep] [overrides ...]

  curry-train rehearse --nproc-per-node=8 checkpoint=7b_default model=7b data=tokens data.path=...

Give the torchrun options and overrides of the real run (not +resume): it runs N steps straight, then the same
N steps killed outright after step K and resumed with +resume=latest, in a new directory under run.root, and
compares the losses bitwise. Cadences are shortened only where no full checkpoint would come before step K.

  --steps=N   steps of each run (default: from the cadence, at most 25)
  --kill-at=K kill the second run once K steps are done and a checkpoint has committed (default: from the cadence)
  --keep      keep the rehearsal's runs (default: removed)

Exit status: 0 the resume is exact, 1 it is not (or a launch failed), 2 refused (bad option or config),
130 interrupted (the job is killed and the runs removed)."""

OWN_OPTIONS: dict[str, str | None] = {"steps": r"\d+", "kill-at": r"\d+", "keep": None}
MAX_KILL_AT = 15  # default kill step at most this: a few minutes even where a step takes seconds
MAX_AFTER_KILL = 10  # default steps after the kill at most this
POLL_SECONDS = 0.02
EXIT_INTERRUPTED = 130


class Refused(ValueError):
    """A rehearsal that cannot start: one line, exit status 2."""


class LaunchFailed(RuntimeError):
    """One of the rehearsal's launches failed; `status` is the launch's own exit status."""

    def __init__(self, message: str, status: int = failures.EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------ what to rehearse


@dataclass(frozen=True)
class Schedule:
    steps: int
    kill_at: int
    overrides: list[str]  # added after the user's: the rehearsal's own settings
    changes: list[str]  # what those change in the real run's config, said to the user


def schedule(cfg: Config, steps: int | None, kill_at: int | None) -> Schedule:
    """N and K (given, or from the exact-resume cadence), and the settings the rehearsal changes: `train.steps`,
    wandb off, and the cadence of a full-state role only where no full checkpoint would come before step K."""
    full_cadence = exact_resume_cadence(cfg.checkpoint.policy())  # (every, role) of a full-state role, or None
    every = full_cadence[0] if full_cadence else None
    auto_kill = min(every + max(1, every // 2), MAX_KILL_AT) if every else MAX_KILL_AT
    if steps is None:
        steps = min(auto_kill + min(every or MAX_AFTER_KILL, MAX_AFTER_KILL), cfg.train.steps)
    if steps < 3:
        raise Refused(f"--steps={steps}: too few; at least 3 (a checkpoint, the kill after it, a step after that)")
    if kill_at is None:
        kill_at = min(auto_kill, steps - max(1, steps // 3))
    if not 2 <= kill_at < steps:
        raise Refused(f"--kill-at={kill_at}: must be from 2 (a checkpoint comes before it) to --steps-1 ({steps - 1})")
    overrides = [f"train.steps={steps}", "logger.wandb.mode=disabled"]
    changes = [f"train.steps={cfg.train.steps} -> {steps}"]
    if cfg.logger.wandb.mode != "disabled":
        changes.append(f"logger.wandb.mode={cfg.logger.wandb.mode} -> disabled")
    if every is None or every >= kill_at:
        key = f"checkpoint.{full_cadence[1] if full_cadence else 'recovery'}_every"
        overrides.append(f"{key}={kill_at - 1}")
        why = "no role saves full state" if every is None else "no full checkpoint would come before the kill"
        changes.append(f"{key}={every or 0} -> {kill_at - 1} ({why})")
        if full_cadence is None and cfg.checkpoint.retention.recovery_keep == 0:
            overrides.append("checkpoint.retention.recovery_keep=1")
    return Schedule(steps, kill_at, overrides, changes)


@dataclass(frozen=True)
class Rehearsal:
    options: dict[str, str | None]  # torchrun's
    overrides: list[str]  # the real run's
    cfg: Config  # the real run's
    schedule: Schedule
    keep: bool


def prepare(argv: list[str]) -> Rehearsal:
    """The command line read and checked; raises Refused (or LaunchError) with the one line that refuses it."""
    options, overrides = parse_options(argv, own=OWN_OPTIONS)
    own = {name: options.pop(name) for name in OWN_OPTIONS if name in options}
    if not single_node(options):
        raise Refused(
            f"--nnodes={options['nnodes']}: the rehearsal runs on one node (it watches and kills the job from here); "
            "rehearse with one node's --nproc-per-node"
        )
    torchrun_arguments(options)
    try:
        cfg, launch = from_command_line(overrides)
        if (size := world_size(options)) is not None:
            validate(cfg, size)
    except ConfigError as err:
        raise Refused(f"invalid config: {err}") from None
    if launch.resume is not None or launch.rollback_to is not None:
        given = "+resume" if launch.resume is not None else "+rollback_to"
        raise Refused(f"{given}: the rehearsal makes and resumes runs of its own; give the overrides of a fresh run")
    steps = None if own.get("steps") is None else int(own["steps"])  # type: ignore[arg-type]
    kill_at = None if own.get("kill-at") is None else int(own["kill-at"])  # type: ignore[arg-type]
    return Rehearsal(options, overrides, cfg, schedule(cfg, steps, kill_at), keep="keep" in own)


# --------------------------------------------------------------------------------------------- the launches


def completed_steps(metrics_path: Path) -> int:
    """The newest step in a run's metrics.jsonl (0 before the first)."""
    return max(read_metrics(metrics_path), default=0)


def committed_full_saves(journal_path: Path) -> list[dict[str, Any]]:
    """The journal's save events of checkpoints with full state (a run can resume exactly from each)."""
    if not journal_path.exists():
        return []
    return [r for r in read_journal(journal_path) if r["event"] == "save" and r.get("contents") == "full"]


class Progress:
    """One line per launch on stderr: rewritten in place on a terminal, else a line every 10 s."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.tty = sys.stderr.isatty()
        self.shown, self.at = 0, time.monotonic()

    def update(self, step: int) -> None:
        if step <= self.shown or (not self.tty and time.monotonic() - self.at < 10):
            return
        self.shown, self.at = step, time.monotonic()
        if self.tty:
            print(f"\r{self.label}: step {step}/{self.total}", end="", file=sys.stderr, flush=True)
        else:
            print_stderr(f"  {self.label}: step {step}/{self.total}")

    def done(self, text: str) -> None:
        print_stderr(f"\r{self.label}: {text}" + " " * 10 if self.tty else f"{self.label}: {text}")


class Launches:
    """The rehearsal's launches, one at a time, each with its output in `<name>.log` under the scratch directory."""

    def __init__(self, options: dict[str, str | None], scratch: Path) -> None:
        self.options, self.scratch = options, scratch
        self.job: subprocess.Popen | None = None

    def run(
        self, name: str, run_id: str, overrides: list[str], progress: Progress, stop: Callable[[], bool] | None = None
    ) -> bool:
        """Run one launch of run `run_id` to its end (False), or until `stop()` says to kill it (True, once it is
        dead)."""
        folder = self.scratch / f"{name}.status"
        folder.mkdir()
        metrics = RunFiles(self.scratch / run_id).metrics
        overrides = [*overrides, f"run.root={self.scratch}", f"run.id={run_id}"]
        with open(self.scratch / f"{name}.log", "wb") as log:
            self.job = start(self.options, overrides, folder, stdout=log, stderr=subprocess.STDOUT)
        while self.job.poll() is None:
            progress.update(completed_steps(metrics))
            if stop is not None and stop():
                self.kill()
                return True
            time.sleep(POLL_SECONDS)
        progress.update(completed_steps(metrics))
        status, line = run_status(read_records(folder), read_failed(folder), self.job.returncode)
        if status != failures.EXIT_DONE:
            raise LaunchFailed(f"the {name} launch ended with status {status}: {line or self.last_words(name)}", status)
        return False

    def kill(self) -> None:
        if self.job is not None and self.job.poll() is None:
            kill_tree(self.job.pid)
            self.job.wait()

    def last_words(self, name: str) -> str:
        """The last line a launch printed that says what went wrong."""
        lines = (self.scratch / f"{name}.log").read_text(errors="replace").splitlines()
        said = [line for line in lines if line.startswith("curry-train:")] or lines or ["(no output)"]
        return said[-1].removeprefix("curry-train: ")


# --------------------------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Comparison:
    steps: int
    first_difference: int | None  # the first step whose losses differ (or that one run lacks)
    straight: float | None  # the losses at that step
    resumed: float | None
    largest: float  # the largest absolute difference over steps 1-N
    largest_at: int | None


def same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


def compare_losses(straight: dict[int, dict], resumed: dict[int, dict], steps: int) -> Comparison:
    """The two runs' losses over steps 1-N (metrics.jsonl records by step), bitwise."""
    first, largest, largest_at = None, 0.0, None
    for step in range(1, steps + 1):
        a, b = straight.get(step, {}).get("loss"), resumed.get(step, {}).get("loss")
        if same(a, b):
            continue
        first = step if first is None else first
        gap = math.inf if a is None or b is None else abs(a - b)
        if not gap <= largest:  # a NaN against a number counts as the largest
            largest, largest_at = gap, step
    if first is None:
        return Comparison(steps, None, None, None, 0.0, None)
    at_first = straight.get(first, {}).get("loss"), resumed.get(first, {}).get("loss")
    return Comparison(steps, first, *at_first, largest, largest_at)


def verdict(c: Comparison) -> str:
    if c.first_difference is None:
        return f"resume is exact: losses bitwise identical over steps 1-{c.steps}"
    return (
        f"resume is NOT exact: losses first differ at step {c.first_difference} (straight {c.straight!r}, "
        f"resumed {c.resumed!r}); largest difference {c.largest:.3g} at step {c.largest_at}, over steps 1-{c.steps}"
    )


# ------------------------------------------------------------------------------------- what the real run pays


def _time(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["time"])).timestamp()


def resumed_point(journal: list[dict[str, Any]]) -> dict[str, Any]:
    """The resumed launch's `resume` event (and its time from the launch's `run_start`, as `load_seconds`)."""
    starts = [r for r in journal if r["event"] == "run_start"]
    resumes = [r for r in journal if r["event"] == "resume"]
    if not resumes:
        raise LaunchFailed("the resumed launch did not resume: it journaled no resume event")
    return {**resumes[-1], "load_seconds": _time(resumes[-1]) - _time(starts[-1])}


def _listed(seconds: list[float], most: int = 6) -> str:
    if len(seconds) > most:
        return f"{len(seconds)} saves, {min(seconds):.3g}-{max(seconds):.3g} s"
    return ", ".join(f"{s:.3g}" for s in seconds) + " s"


def measurements(r: Rehearsal, straight: Path, resume: dict[str, Any], resume_seconds: float) -> list[str]:
    """What the rehearsal measured that the real run will pay, and the plan of the real run with those figures."""
    cfg = r.cfg
    async_save = cfg.checkpoint.async_save
    journal = read_journal(RunFiles(straight).journal)
    ranks = next(int(e["world_size"]) for e in journal if e["event"] == "run_start")
    saves = [s for s in committed_full_saves(RunFiles(straight).journal) if not s.get("linked_from")]
    cost = measured_save_seconds(straight, async_save, recent=None)  # every save of the rehearsal, all listed
    step = measured_step_seconds(straight, recent=None)
    lines = [f"what the real run will pay, as measured here on {ranks} rank{'s' if ranks > 1 else ''}:"]
    if cost is not None:
        what = "cost_seconds" if async_save else "seconds"
        why = "; saves are asynchronous" if async_save else ""
        whole = statistics.median(float(s["seconds"]) for s in saves)
        lines.append(
            f"  a full save: {cost[0]:.3g} s of training time (median of the journaled {what} "
            f"{_listed(save_costs(straight, async_save))}{why}), {whole:.3g} s until committed, "
            f"{human_bytes(statistics.median(int(s['bytes']) for s in saves))}"
        )
    lines.append(
        f"  a resume: {resume_seconds:.3g} s from the launch to the end of the first step after it "
        f"({resume['load_seconds']:.3g} s of it from the run's start to the checkpoint loaded and checked)"
    )
    if step is not None:
        lines.append(f"  a step: {step[0]:.3g} s (median of {step[1]})")
    run_dir = Path(cfg.run.root) / str(cfg.run.id)
    plan = build_plan(
        cfg,
        model_size(cfg.model),
        ranks,
        run_dir,
        save_seconds=cost[0] if cost else None,
        step_seconds=step[0] if step else None,
    )
    lines.append(
        f"  storage over train.steps={cfg.train.steps} (the plan of {run_dir}): {human_bytes(plan.committed)} "
        f"committed, {human_bytes(plan.storage.available)} available at {plan.storage.path}"
    )
    if (refused := storage_refusal(plan)) is not None:
        lines.append(f"  WARNING: {refused}")
    if plan.cadence is not None:
        configured = (
            f"configured: checkpoint.{plan.cadence.configured_role}_every={plan.cadence.configured_steps}"
            if plan.cadence.configured_steps
            else "no role saves full state"
        )
        lines.append(
            f"  cadence with these figures: Young/Daly's optimum is a full save every {plan.cadence.optimum_steps} "
            f"steps ({configured}; MTBF {plan.timing.mtbf_seconds / 3600:g} h, {plan.timing.mtbf_source})"
        )
    return lines


# ------------------------------------------------------------------------------------------------ the command


@dataclass(frozen=True)
class Scratch:
    path: Path  # the rehearsal's directory under run.root
    made_root: bool  # run.root did not exist: it goes too, if nothing else came there


def make_scratch(root: Path) -> Scratch:
    """A new directory under run.root for the rehearsal's runs; nothing there already is touched."""
    try:
        made = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"rehearsal-{time.strftime('%Y%m%d-%H%M%S')}-", dir=root))
    except OSError as err:
        why = failures.one_line(err)
        raise Refused(f"run.root: cannot make the rehearsal's directory under {root} ({why})") from None
    return Scratch(path, made)


def remove_scratch(scratch: Scratch) -> None:
    shutil.rmtree(scratch.path, ignore_errors=True)
    if scratch.made_root:
        with contextlib.suppress(OSError):  # not empty: something else came there meanwhile
            scratch.path.parent.rmdir()


def print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def rehearse(r: Rehearsal, made: Scratch) -> int:
    """Run the three launches in a scratch directory (`make_scratch`) and print the report; returns the exit
    status."""
    scratch = made.path
    launches = Launches(r.options, scratch)
    keep = r.keep
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = _rehearse(r, scratch, launches)
    except KeyboardInterrupt:
        launches.kill()
        print_stderr(
            f"\ncurry-train rehearse: interrupted: the job is killed; {scratch} " + ("kept" if keep else "removed")
        )
        return EXIT_INTERRUPTED
    except Refused as err:
        print_stderr(f"curry-train rehearse: {err}")
        return failures.EXIT_REFUSED
    except LaunchFailed as err:
        launches.kill()
        keep = True  # its logs and failures.log say why
        print_stderr(f"\ncurry-train rehearse: {err}; the launches' output and runs are kept in {scratch}")
        return err.status
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not keep:
            remove_scratch(made)
    exact, lines = report
    print("\n".join(lines))
    print(
        f"the rehearsal's runs: kept in {scratch}"
        if keep
        else f"the rehearsal's runs: removed {scratch} (--keep keeps them)"
    )
    return failures.EXIT_DONE if exact else failures.EXIT_FAILURE


def _rehearse(r: Rehearsal, scratch: Path, launches: Launches) -> tuple[bool, list[str]]:
    s = r.schedule
    line, _ = refusal(r.options, [*r.overrides, *s.overrides, f"run.root={scratch}", "run.id=straight"])
    if line is not None:
        raise Refused(line)  # the config, the data or run.root: before any launch
    base = [*r.overrides, *s.overrides]
    straight, killed = scratch / "straight", scratch / "killed"
    print_stderr(
        f"curry-train rehearse: {s.steps} steps straight, then the same killed after step {s.kill_at} and resumed, "
        f"in {scratch}\n  rehearsal settings: {'; '.join(s.changes)}"
    )
    started = time.monotonic()
    progress = Progress("1/3 straight run", s.steps)
    launches.run("straight", "straight", base, progress)
    progress.done(f"{s.steps} steps in {time.monotonic() - started:.0f} s")

    def due() -> bool:
        return completed_steps(RunFiles(killed).metrics) >= s.kill_at and bool(
            committed_full_saves(RunFiles(killed).journal)
        )

    progress = Progress("2/3 killed run", s.steps)
    if not launches.run("killed", "killed", base, progress, stop=due):
        raise LaunchFailed(f"the killed launch ended on its own before step {s.kill_at} with a checkpoint committed")
    killed_after = completed_steps(RunFiles(killed).metrics)
    progress.done(f"killed outright (SIGKILL to every process of the job) after step {killed_after}")

    launched = time.time()
    progress = Progress("3/3 resumed", s.steps)
    launches.run("resumed", "killed", [*base, "+resume=latest"], progress)
    resume = resumed_point(read_journal(RunFiles(killed).journal))
    progress.done(f"with +resume=latest from step {resume['step']} ({resume['path']}) to step {s.steps}")

    resumed_metrics = read_metrics(RunFiles(killed).metrics)
    comparison = compare_losses(read_metrics(RunFiles(straight).metrics), resumed_metrics, s.steps)
    first_after = resumed_metrics.get(int(resume["step"]) + 1, {})
    resume_seconds = float(first_after.get("time", math.nan)) - launched
    lines = [
        verdict(comparison),
        f"  a straight run of {s.steps} steps; the same run killed after step {killed_after} and resumed from step "
        f"{resume['step']} ({resume['path']})",
        f"  rehearsal settings: {'; '.join(s.changes)}",
        *measurements(r, straight, resume, resume_seconds),
    ]
    return comparison.first_difference is None, lines


def main(argv: list[str]) -> int:
    """`curry-train rehearse ...`: returns the exit status."""
    if {"-h", "--help"} & set(argv):
        print(USAGE)
        return 0
    try:
        rehearsal = prepare(argv)
        scratch = make_scratch(Path(rehearsal.cfg.run.root))
    except (LaunchError, Refused) as err:
        print(f"curry-train rehearse: {err}", file=sys.stderr)
        return failures.EXIT_REFUSED
    return rehearse(rehearsal, scratch)
