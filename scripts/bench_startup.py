"""Time curry-train's start-up: a one-step training launch (to its first step line, and to exit) and `plan`.

    python scripts/bench_startup.py --rounds 5
    python scripts/bench_startup.py --tree before=../old-checkout --tree after=. --rounds 7   # side by side

Each `--tree LABEL=DIR` runs the commands with `PYTHONPATH=DIR`, so two checkouts (for example this one and a
`git archive` of an older commit) compare on the same machine; without `--tree` the importable curry_train runs.
Every run starts in a fresh empty folder (no run directory to resume, no cache). Rounds interleave the trees and
alternate their order, so drift in the machine's load falls on both; the table gives the median of each. The load
average is printed before and after: on a shared machine, compare figures from the same invocation only.

Commands (extra arguments after `--` are added to the training launch as Hydra overrides):
    train   python -m curry_train.train train.steps=1 logger.wandb.mode=offline
    plan    python -m curry_train.cli plan
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_STEP = re.compile(r"^step\s+1/")


def timed_run(cmd: list[str], pythonpath: str | None) -> tuple[float | None, float]:
    """(seconds to the first step line or None, seconds to exit) of `cmd` run in a fresh folder."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory(prefix="curry-startup-") as work:
        started = time.monotonic()
        first_step = None
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            if first_step is None and FIRST_STEP.match(line):
                first_step = time.monotonic() - started
            tail = [*tail[-30:], line]
        code = proc.wait()
        total = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} (PYTHONPATH={pythonpath}) exited {code}:\n{''.join(tail)}")
    return first_step, total


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=[], help="LABEL=DIR: run with PYTHONPATH=DIR (repeatable)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--what", default="train,plan", help="comma-separated: train, plan")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the training launch")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    trees: list[tuple[str, str | None]] = [("installed", None)]
    if args.tree:
        trees = []
        for spec in args.tree:
            label, sep, path = spec.partition("=")
            if not sep:
                label, path = Path(spec).name, spec
            trees.append((label, str(Path(path).resolve())))
    commands = {
        "train": [sys.executable, "-m", "curry_train.train", "train.steps=1", "logger.wandb.mode=offline"],
        "plan": [sys.executable, "-m", "curry_train.cli", "plan"],
    }
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = [w for w in what if w not in commands]
    if unknown:
        raise SystemExit(f"--what: unknown {unknown}; allowed: {', '.join(commands)}")
    commands["train"] += args.overrides
    samples: dict[tuple[str, str, str], list[float]] = {}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs", flush=True)
    for round_ in range(args.rounds):
        order = trees if round_ % 2 == 0 else trees[::-1]
        for name in what:
            for label, path in order:
                first_step, total = timed_run(commands[name], path)
                samples.setdefault((name, label, "exit"), []).append(total)
                if first_step is not None:
                    samples.setdefault((name, label, "first step"), []).append(first_step)
                shown = "" if first_step is None else f"first step {first_step:5.2f} s, "
                print(f"round {round_ + 1}: {name:<5} {label:<12} {shown}exit {total:5.2f} s", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'command':<7} {'tree':<12} {'to':<10} {'median':>8} {'min':>7} {'max':>7}  n")
    for (name, label, to), values in sorted(samples.items()):
        print(
            f"{name:<7} {label:<12} {to:<10} {statistics.median(values):7.2f}s {min(values):6.2f}s "
            f"{max(values):6.2f}s  {len(values)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
