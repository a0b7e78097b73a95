"""Torture test: SIGKILL a training job at random moments, inside saves too, and resume it, over and over.

    python scripts/torture.py --cycles 50 --nproc 2
    python scripts/torture.py --cycles 10 --nproc 2 -- model=small train.steps=40   # your overrides after --

First a straight run to compare with. Then cycles of: launch the same run with `+resume=auto` (sync or async saves,
drawn at random: they must not change a single bit), SIGKILL the whole process tree at a random moment, either
while a save is being written (a `.tmp-` staging directory exists) or after a random number of steps. When a
launch gets to the end, its losses are compared with the straight run's and a new round starts. At the end:

- every resume started from a checkpoint that was committed (journaled `save`) before it;
- every step's loss is bitwise that of the straight run;
- no `.tmp-` directory is left, the run directory's lock is free, and no process of any launch is left.

It prints the cycles, how many kills landed inside saves, and every failure; it exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kill_and_resume import kill_tree, launch_command, process_tree  # noqa: E402

from curry_train.journal import read_journal  # noqa: E402
from curry_train.metrics import read_metrics  # noqa: E402

DEFAULTS = [
    "logger.wandb.mode=disabled",
    "logger.console_every=1000",
    "data.seq_len=64",
    "data.max_bytes=2000000",
    "data.num_workers=2",
    "train.batch_size=8",
    "train.steps=30",
    "train.eval_every=10",
    "checkpoint.rollback_every=2",
    "checkpoint.recovery_every=3",
    "checkpoint.best_k=1",
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}


def in_save(run_dir: Path) -> bool:
    return any(run_dir.glob("*/.tmp-*"))


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(read_metrics(path)) if path.exists() else 0


def one_launch(cmd: list[str], run_dir: Path, rng: random.Random, timeout: float) -> tuple[str, int | None]:
    """Launch, then SIGKILL the whole tree inside a save or after a few steps. Returns (how it ended, exit code)."""
    aim_at_save = rng.random() < 0.5
    extra_steps = rng.randint(1, 4)
    start = logged_steps(run_dir)
    job = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True
    )
    deadline = time.monotonic() + timeout
    how = "ran to the end"
    while job.poll() is None and time.monotonic() < deadline:
        if aim_at_save and in_save(run_dir) and logged_steps(run_dir) > start:
            time.sleep(rng.uniform(0, 0.05))
            how = "killed inside a save" if in_save(run_dir) else "killed just after a save"
            break
        if not aim_at_save and logged_steps(run_dir) >= start + extra_steps:
            how = "killed inside a save" if in_save(run_dir) else "killed between saves"
            break
        time.sleep(0.005)
    tree = process_tree(job.pid)
    if job.poll() is None:
        kill_tree(job.pid)
    _, err = job.communicate(timeout=120)
    if how == "ran to the end" and job.returncode != 0:
        how = f"FAILED with exit {job.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"
    # Every process of the launch must be gone (workers die with torchrun; loader workers with their rank).
    time.sleep(0.2)
    left = [pid for pid in tree if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    if left:
        how += f"; ORPHANS left: {left}"
        for pid in left:
            os.kill(pid, 9)
    return how, job.returncode


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def check_round(straight: Path, run_dir: Path) -> list[str]:
    problems = []
    want, got = read_metrics(straight / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    different = [s for s in want if s not in got or got[s]["loss"] != want[s]["loss"]]
    if different:
        problems.append(f"{run_dir.name}: losses differ from the straight run at steps {different[:10]}")
    committed: set[str] = set()
    for event in read_journal(run_dir / "journal.jsonl"):
        if event["event"] == "save":
            committed.add(str(event["path"]))
        if event["event"] == "resume" and str(event["path"]) not in committed:
            problems.append(f"{run_dir.name}: resumed from {event['path']}, which was never journaled as committed")
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.glob("*/.tmp-*")]
    if leftovers:
        problems.append(f"{run_dir.name}: staging directories left: {leftovers}")
    lock = run_dir / ".lock"
    if lock.exists():
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                problems.append(f"{run_dir.name}: the run directory's lock is still held")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=50, help="kills to make (default 50)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--root", default="torture-runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600, help="seconds a launch may take")
    parser.add_argument("overrides", nargs="*", help="training overrides (after --), added to the defaults")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.root)
    base = [*DEFAULTS, *args.overrides, f"run.root={root}"]

    straight = root / "straight"
    if not (straight / "journal.jsonl").exists():
        print(f"straight run -> {straight}", flush=True)
        subprocess.run(
            launch_command(None, args.nproc, [*base, "run.id=straight"]),
            check=True,
            env=_env(),
            stdout=subprocess.DEVNULL,
        )
    kills = inside = rounds = 0
    failures: list[str] = []
    started = time.monotonic()
    while kills < args.cycles:
        rounds += 1
        run_dir = root / f"killed-{rounds}"
        while True:
            async_save = rng.random() < 0.5
            cmd = launch_command(
                None,
                args.nproc,
                [*base, f"run.id={run_dir.name}", f"checkpoint.async_save={str(async_save).lower()}", "+resume=auto"],
            )
            how, code = one_launch(cmd, run_dir, rng, args.timeout)
            saves = "async" if async_save else "sync"
            if how.startswith("killed"):
                kills += 1
                inside += how == "killed inside a save"
            print(f"cycle {kills:>3} round {rounds} ({saves} saves, step {logged_steps(run_dir)}): {how}", flush=True)
            if "FAILED" in how or "ORPHANS" in how:
                failures.append(f"round {rounds}: {how}")
            if how == "ran to the end" or "FAILED" in how or kills >= args.cycles:
                break
        if how == "ran to the end":
            problems = check_round(straight, run_dir)
            failures += problems
            print(
                f"round {rounds}: "
                + ("bitwise identical to the straight run" if not problems else "; ".join(problems)),
                flush=True,
            )
    # The last round may have ended on a kill: finish it and check it too.
    if how != "ran to the end":
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        if done.returncode != 0:
            failures.append(f"round {rounds}: the final resume exited {done.returncode}")
        else:
            problems = check_round(straight, run_dir)
            failures += problems
            print(
                f"round {rounds}: " + ("bitwise identical to the straight run" if not problems else "; ".join(problems))
            )
    minutes = (time.monotonic() - started) / 60
    print(
        f"torture: {kills} cycles in {rounds} rounds ({minutes:.1f} min), {inside} kills inside saves, "
        f"{kills - inside} between or just after saves, {len(failures)} failure(s)"
    )
    for failure in failures:
        print(f"  FAILURE: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
