"""Torture test: interrupt a training job at random moments, inside saves too, in every way a job ends, and resume.

    python scripts/torture.py --cycles 200 --root /scratch/torture
    python scripts/torture.py --cycles 10 -- model=small train.steps=40   # your overrides after --

Every launch goes through the launcher, `python -m curry_train.cli run --nproc-per-node=N ... +resume=auto`, so
its exit status is checked too. First two straight runs to compare with (one with an injected loss spike). Then
rounds; each round is one run, launched again and again until it finishes. A round draws:

- whether it injects a loss spike (`+debug.inject_spike_at` with the detector armed: `spike.enabled=true`, a short
  `spike.window` and `spike.warmup_steps`); the straight run it is compared with got the same injection;
- whether its world size changes at every relaunch (`--nproc` ranks, then 1, then `--nproc` again, ...).

Each launch of a round draws sync or async saves, and how it is interrupted (a cycle is one interrupted launch):

- SIGKILL of every process of the launch: the launcher must end by SIGKILL;
- SIGTERM or SIGINT to the launcher's process group (what Ctrl-C does): it must exit 0 after a preemption save;
- two SIGTERMs: 0 when the save was done before the second, else 1 with `preempt` `forced` in the journal;
- a stall: `+debug.stall_at`/`+debug.stall_rank` with a short explicit `train.hang_timeout_s`: the watchdog must end
  the launch with status 1 and `hang` in the journal.

A kill or signal lands either while a save is being written (a `.tmp-` staging directory exists) or after a random
number of steps. Any other exit status is a failed launch. When a round's run finishes (exit 0, `run_end`):

- every resume started from a checkpoint that was committed (journaled `save`) before it;
- every step's loss is bitwise that of the straight run when the world size never changed within the round, and
  within 1e-4 relative when it did (another world size reduces in another order);
- no `.tmp-` directory is left, the run directory's lock is free, and no process of any launch is left.

`--signal-every-process` sends the signals to every process of the launch instead of the launcher's group, as a
scheduler that signals a whole job step may do: each worker then gets the signal twice (directly and from the
launcher). It prints one line per cycle and per round, then the totals; it exits 1 on any failure. It is slow (a
launch takes seconds) and stays outside the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from curry_train.journal import read_journal
from curry_train.launcher import alive, kill_tree, process_tree
from curry_train.metrics import read_metrics

DEFAULTS = [
    "logger.wandb.mode=disabled",
    "logger.console_every=1000",
    "data.seq_len=64",
    "data.max_bytes=2000000",
    "data.num_workers=2",
    "train.batch_size=8",
    "train.steps=24",
    "train.eval_every=8",
    "checkpoint.rollback_every=2",
    "checkpoint.recovery_every=3",
    "checkpoint.best_k=1",
]
SPIKE = ["spike.enabled=true", "spike.window=4", "spike.warmup_steps=6"]  # armed early enough for --spike-at
INTERRUPTS = {"SIGKILL": 0.4, "SIGTERM": 0.2, "SIGINT": 0.15, "SIGTERM twice": 0.1, "stall": 0.15}
RTOL = 1e-4
MAX_LAUNCHES = 60  # a round not finished after this many launches is a failure


@dataclass
class Plan:
    """How one launch runs and is interrupted."""

    nproc: int
    async_save: bool
    interrupt: str  # a key of INTERRUPTS, or "none": the launch runs to the end
    aim_at_save: bool = False
    extra_lines: int = 1  # otherwise: interrupt after this many new metrics lines
    stall: tuple[int, int] | None = None  # (step, rank) for +debug.stall_at / +debug.stall_rank


@dataclass
class Outcome:
    how: str  # what happened, in words
    code: int | None
    in_save: bool = False
    failure: str | None = None


@dataclass
class Tally:
    cycles: int = 0
    rounds: int = 0
    interrupts: Counter = field(default_factory=Counter)
    in_saves: Counter = field(default_factory=Counter)
    world_size_changes: int = 0
    spikes: int = 0
    stalls: int = 0
    resumes: int = 0
    bitwise: int = 0
    within_rtol: int = 0
    worst_rel: float = 0.0
    failures: list[str] = field(default_factory=list)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}


def launcher_command(nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "curry_train.cli", "run", f"--nproc-per-node={nproc}", *overrides]


def setting(overrides: list[str], key: str, default: str) -> str:
    """The last value given to `key` in a list of Hydra overrides."""
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == key]
    return values[-1] if values else default


# ------------------------------------------------------------------------------------------ the run directory


def in_save(run_dir: Path) -> bool:
    return any(run_dir.glob("*/.tmp-*"))


def metrics_lines(run_dir: Path) -> int:
    """Lines in metrics.jsonl: grows with every step of this launch, also the ones a resume replays."""
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max(read_metrics(path), default=0) if path.exists() else 0


def journal(run_dir: Path) -> list[dict]:
    path = run_dir / "journal.jsonl"
    return read_journal(path) if path.exists() else []


def lock_held(run_dir: Path) -> bool:
    lock = run_dir / ".lock"
    if not lock.exists():
        return False
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


# ------------------------------------------------------------------------------------------------ a launch


def draw_plan(rng: random.Random, nproc: int, run_dir: Path, steps: int, stalled: set[int], kinds: list[str]) -> Plan:
    plan = Plan(nproc=nproc, async_save=rng.random() < 0.5, interrupt="SIGKILL")
    plan.interrupt = rng.choices(kinds, weights=[INTERRUPTS[k] for k in kinds])[0]
    if plan.interrupt == "stall":
        # A step this run has not reached (after a resume it replays from an earlier one, so it gets there) and
        # has not stalled at before: the journal makes a stall once in the run's life per step.
        free = [s for s in range(max(2, last_step(run_dir) + 2), steps) if s not in stalled]
        if not free:
            plan.interrupt = rng.choice([k for k in kinds if k != "stall"] or ["SIGKILL"])
        else:
            plan.stall = (rng.choice(free), rng.randrange(nproc))
    plan.aim_at_save = rng.random() < 0.5
    plan.extra_lines = rng.randint(1, 4)
    return plan


def launch_overrides(base: list[str], plan: Plan, hang_timeout: float) -> list[str]:
    overrides = [*base, f"checkpoint.async_save={str(plan.async_save).lower()}", "+resume=auto"]
    if plan.stall:
        step, rank = plan.stall
        overrides += [f"+debug.stall_at={step}", f"+debug.stall_rank={rank}", f"train.hang_timeout_s={hang_timeout}"]
    return overrides


def send(job: subprocess.Popen, sig: signal.Signals, every_process: bool) -> None:
    """A stop signal as a user or a scheduler sends it: to the launcher's process group (Ctrl-C, `kill -TERM`
    of the job), or to every process of the launch (a scheduler signalling a whole job step)."""
    with contextlib.suppress(ProcessLookupError):
        if every_process:
            for pid in process_tree(job.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        else:
            os.killpg(job.pid, sig)


def wait_for_moment(job: subprocess.Popen, run_dir: Path, plan: Plan, start: int, deadline: float, seen: set) -> bool:
    """Poll until the moment to interrupt (True) or the launch's end or deadline (False)."""
    next_scan = 0.0
    while job.poll() is None and time.monotonic() < deadline:
        if time.monotonic() > next_scan:  # the processes of the launch, for the orphan check
            seen.update(process_tree(job.pid))
            next_scan = time.monotonic() + 0.5
        progressed = metrics_lines(run_dir) > start
        if plan.aim_at_save and progressed and in_save(run_dir):
            return True
        if not plan.aim_at_save and metrics_lines(run_dir) >= start + plan.extra_lines:
            return True
        time.sleep(0.005)
    return False


def one_launch(cmd: list[str], run_dir: Path, plan: Plan, rng: random.Random, args: argparse.Namespace) -> Outcome:
    """Start the launch, interrupt it as planned, wait for its end, and judge its exit status."""
    start, events_before = metrics_lines(run_dir), len(journal(run_dir))
    job = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True
    )
    deadline = time.monotonic() + args.timeout
    seen: set[int] = set()
    landed = False
    if plan.interrupt not in ("stall", "none") and wait_for_moment(job, run_dir, plan, start, deadline, seen):
        if plan.aim_at_save:
            time.sleep(rng.uniform(0, 0.05))
        seen.update(process_tree(job.pid))
        landed = in_save(run_dir)
        if plan.interrupt == "SIGKILL":
            kill_tree(job.pid)
        else:
            send(job, signal.Signals[plan.interrupt.split()[0]], args.signal_every_process)
            if plan.interrupt == "SIGTERM twice":
                time.sleep(rng.uniform(0.05, 1.0))
                landed = landed or in_save(run_dir)
                if job.poll() is None:
                    send(job, signal.SIGTERM, args.signal_every_process)
    try:
        while job.poll() is None and time.monotonic() < deadline:
            seen.update(process_tree(job.pid))
            time.sleep(0.5)
        _, err = job.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill_tree(job.pid)
        _, err = job.communicate()
        return Outcome(f"FAILED: no end within {args.timeout:.0f} s", None, failure="timeout")
    outcome = judge(plan, job.returncode, journal(run_dir)[events_before:], err)
    outcome.in_save = landed
    orphans = leftover_processes(seen - {job.pid})
    if orphans:
        outcome.failure = (outcome.failure or "") + f" ORPHANS left: {orphans}"
        outcome.how += f"; ORPHANS left: {orphans}"
    return outcome


def leftover_processes(pids: set[int]) -> list[int]:
    """Processes of a launch still alive after it ended (given 10 s to go), killed here."""
    give_up = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < give_up:
        time.sleep(0.2)
    left = sorted(p for p in pids if alive(p))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def judge(plan: Plan, code: int, events: list[dict], err: str) -> Outcome:
    """Whether the exit status is the one this interruption allows, from the journal lines of this launch."""
    kinds = Counter(e["event"] for e in events)
    finished = kinds["run_end"] > 0
    forced = any(e["event"] == "preempt" and e.get("forced") for e in events)
    saved = any(e["event"] == "preempt" and not e.get("forced") for e in events)
    last_err = err.strip().splitlines()[-1] if err.strip() else "(nothing on stderr)"
    if code == 0 and finished:
        return Outcome("ran to the end (0)", code)
    if plan.interrupt == "SIGKILL" and code == -signal.SIGKILL:
        return Outcome("killed (-9)", code)
    if plan.interrupt in ("SIGTERM", "SIGINT", "SIGTERM twice") and code == 0 and saved:
        return Outcome("saved and stopped (0)", code)
    if plan.interrupt == "SIGTERM twice" and code == 1 and forced:
        return Outcome("stopped at once by the second signal (1, forced preempt journaled)", code)
    if plan.interrupt == "stall" and code == 1 and kinds["hang"] and kinds["stall_injected"]:
        return Outcome(f"stalled at step {plan.stall[0]} on rank {plan.stall[1]}, hang (1)", code)
    why = f"FAILED: exit {code} after {plan.interrupt} (journal: {dict(kinds)}): {last_err}"
    return Outcome(why, code, failure=why)


# ------------------------------------------------------------------------------------------------- a round


def check_round(straight: Path, run_dir: Path, changed_world: bool, tally: Tally) -> list[str]:
    problems = []
    want, got = read_metrics(straight / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    missing = [s for s in want if s not in got]
    rel = {s: abs(got[s]["loss"] - want[s]["loss"]) / max(abs(want[s]["loss"]), 1e-30) for s in want if s in got}
    worst = max(rel.values(), default=0.0)
    tolerance = RTOL if changed_world else 0.0
    different = sorted(s for s, r in rel.items() if r > tolerance)
    if missing or different:
        problems.append(
            f"{run_dir.name}: losses differ from {straight.name} at steps {(missing + different)[:10]} "
            f"(largest relative difference {worst:.2e}, allowed {tolerance:g}){rollback_targets(straight, run_dir)}"
        )
    elif changed_world:
        tally.within_rtol += 1
        tally.worst_rel = max(tally.worst_rel, worst)
    else:
        tally.bitwise += 1
    committed: set[str] = set()
    for event in journal(run_dir):
        if event["event"] == "save":
            committed.add(str(event["path"]))
        if event["event"] == "resume":
            tally.resumes += 1
            if str(event["path"]) not in committed:
                problems.append(f"{run_dir.name}: resumed from {event['path']}, never journaled as committed")
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.glob("*/.tmp-*")]
    if leftovers:
        problems.append(f"{run_dir.name}: staging directories left: {leftovers}")
    if lock_held(run_dir):
        problems.append(f"{run_dir.name}: the run directory's lock is still held")
    return problems


def rollback_targets(straight: Path, run_dir: Path) -> str:
    """Where the spike rollbacks of both runs went, when they differ: a rollback goes to the newest checkpoint
    early enough, so a save only one of the runs made (a preemption's) can change it."""
    targets = [[e["path"] for e in journal(d) if e["event"] == "rollback"] for d in (straight, run_dir)]
    return "" if targets[0] == targets[1] else f"; rolled back to {targets[1]}, the straight run to {targets[0]}"


def play_round(
    number: int, base: list[str], straight: dict[bool, Path], rng: random.Random, args: argparse.Namespace, tally: Tally
) -> None:
    """Launch one run again and again, each launch interrupted, until it finishes (or the cycles run out, then
    one launch without interruption finishes it), and check it."""
    spike, changing = rng.random() < args.spike_rounds, rng.random() < args.world_size_rounds
    run_dir = Path(args.root) / f"round-{number}"
    injection = [*SPIKE, f"+debug.inject_spike_at={args.spike_at}"] if spike else []
    overrides = [*base, f"run.id={run_dir.name}", *injection]
    steps = int(setting(overrides, "train.steps", "0"))
    other = 1 if args.nproc > 1 else 2
    stalled: set[int] = set()
    launches, changed_world = 0, False
    tally.spikes += spike
    while not any(e["event"] == "run_end" for e in journal(run_dir)):
        nproc = other if changing and launches % 2 else args.nproc
        changed_world |= launches > 0 and changing
        tally.world_size_changes += launches > 0 and changing
        if launches >= MAX_LAUNCHES:
            tally.failures.append(f"round {number}: not finished after {launches} launches")
            return
        plan = draw_plan(rng, nproc, run_dir, steps, stalled, args.interrupts)
        if tally.cycles >= args.cycles:  # enough cycles: this launch finishes the round
            plan = Plan(nproc=nproc, async_save=plan.async_save, interrupt="none")
        if plan.stall:
            stalled.add(plan.stall[0])
        cmd = launcher_command(nproc, launch_overrides(overrides, plan, args.hang_timeout))
        outcome = one_launch(cmd, run_dir, plan, rng, args)
        launches += 1
        interrupted = not outcome.how.startswith("ran to the end")
        if interrupted:
            tally.cycles += 1
            tally.interrupts[plan.interrupt] += 1
            tally.in_saves[plan.interrupt] += outcome.in_save
            tally.stalls += plan.interrupt == "stall" and outcome.failure is None
        where = " inside a save" if outcome.in_save and interrupted else ""
        print(
            f"cycle {tally.cycles:>3} round {number} ({nproc} rank(s), {'async' if plan.async_save else 'sync'} saves"
            f"{', spike' if spike else ''}, step {last_step(run_dir)}): {plan.interrupt}{where}: {outcome.how}",
            flush=True,
        )
        if outcome.failure:
            tally.failures.append(f"round {number}: {outcome.how}")
            if outcome.code is None:
                return  # a launch that never ended: its run directory may be in any state
    problems = check_round(straight[spike], run_dir, changed_world, tally)
    tally.failures += problems
    verdict = ("within 1e-4 of" if changed_world else "bitwise identical to") + f" {straight[spike].name}"
    print(f"round {number} ({launches} launches): " + ("; ".join(problems) or verdict), flush=True)


def run_straight(root: Path, name: str, nproc: int, overrides: list[str], timeout: float) -> Path:
    run_dir = root / name
    if not any(e["event"] == "run_end" for e in journal(run_dir)):
        print(f"straight run -> {run_dir}", flush=True)
        cmd = launcher_command(nproc, [*overrides, f"run.id={name}", "+resume=auto"])
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SystemExit(f"the straight run {name} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return run_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=50, help="interrupted launches to make (default 50)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per launch (a changing world alternates with 1)")
    parser.add_argument("--root", default="torture-runs", help="run.root of every run (default: torture-runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300, help="seconds a launch may take (default 300)")
    parser.add_argument("--spike-at", type=int, default=14, help="+debug.inject_spike_at in spike rounds")
    parser.add_argument("--spike-rounds", type=float, default=0.5, help="fraction of rounds with a spike")
    parser.add_argument("--world-size-rounds", type=float, default=0.3, help="fraction with a changing world size")
    parser.add_argument("--hang-timeout", type=float, default=10, help="train.hang_timeout_s of a stalled launch")
    parser.add_argument("--signal-every-process", action="store_true", help="signal every process of a launch")
    parser.add_argument(
        "--interrupts",
        default=",".join(INTERRUPTS),
        help=f"comma-separated interruptions to draw from (default: all, {','.join(INTERRUPTS)})",
    )
    parser.add_argument("overrides", nargs="*", help="training overrides (after --), added to the defaults")
    args = parser.parse_args(argv)
    for name in ("cycles", "nproc", "spike_at", "timeout", "hang_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    args.interrupts = args.interrupts.split(",")
    unknown = sorted(set(args.interrupts) - set(INTERRUPTS))
    if unknown:
        parser.error(f"--interrupts: unknown {', '.join(unknown)}; allowed: {', '.join(INTERRUPTS)}")
    for name in ("spike_rounds", "world_size_rounds"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be a fraction in [0, 1], got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(args.root)
    base = [*DEFAULTS, *args.overrides, f"run.root={root}"]
    started = time.monotonic()
    straight = {
        False: run_straight(root, "straight", args.nproc, base, args.timeout),
        True: run_straight(
            root, "straight-spike", args.nproc, [*base, *SPIKE, f"+debug.inject_spike_at={args.spike_at}"], args.timeout
        ),
    }
    if not any(e["event"] == "rollback" for e in journal(straight[True])):
        raise SystemExit(f"{straight[True]}: the injected spike at step {args.spike_at} was not rolled back")
    tally = Tally()
    while tally.cycles < args.cycles:
        tally.rounds += 1
        play_round(tally.rounds, base, straight, rng, args, tally)
    report(tally, (time.monotonic() - started) / 60)
    return 1 if tally.failures else 0


def report(tally: Tally, minutes: float) -> None:
    signals = sum(tally.interrupts[k] for k in ("SIGTERM", "SIGINT", "SIGTERM twice"))
    in_saves = ", ".join(f"{k} {tally.in_saves[k]}/{n}" for k, n in sorted(tally.interrupts.items()) if k != "stall")
    print(
        f"torture: {tally.cycles} cycles in {tally.rounds} rounds ({minutes:.1f} min): "
        f"{tally.interrupts['SIGKILL']} SIGKILLs, {signals} signalled launches "
        f"({tally.interrupts['SIGTERM twice']} with a second SIGTERM), {tally.stalls} stalls ended by the watchdog; "
        f"inside saves: {in_saves}; {tally.world_size_changes} world-size changes, {tally.spikes} spike rounds, "
        f"{tally.resumes} resumes (all checked against committed saves); rounds bitwise {tally.bitwise}, "
        f"within 1e-4 {tally.within_rtol} (largest relative difference {tally.worst_rel:.2e}); "
        f"{len(tally.failures)} failure(s)",
        flush=True,
    )
    for failure in tally.failures:
        print(f"  FAILURE: {failure}")


if __name__ == "__main__":
    sys.exit(main())
