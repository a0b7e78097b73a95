"""Kill-and-resume check: is `+resume=latest` an exact continuation on your config and machines?

Runs your config three times: straight to the end; again, killed with SIGKILL once it has completed
`--kill-at-step` steps; and that killed run resumed with `+resume=latest`. Then compares every loss after the
resume point with the straight run's and exits 0 only when they are bitwise identical (or within `--rtol`).

    python scripts/kill_and_resume.py --nproc 2 --kill-at-step 7 -- train.steps=14 checkpoint.recovery_every=5
    python scripts/kill_and_resume.py --launcher "srun torchrun --nproc_per_node=8" -- checkpoint=7b_default ...

Pass the overrides you train with after `--`; the script adds `run.id` (and `run.root` with `--root`).
`curry-train rehearse` is the installed check on one node (the same kill, from `curry_train.launcher`); this script
adds any launcher (`srun`, several nodes) and a tolerance.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from curry_train.journal import read_journal
from curry_train.launcher import kill_tree
from curry_train.metrics import read_metrics
from curry_train.rehearse import completed_steps


def launch_command(launcher: str | None, nproc: int, overrides: list[str]) -> list[str]:
    if launcher:
        prefix = shlex.split(launcher)
    elif nproc == 1:
        prefix = [sys.executable]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*prefix, "-m", "curry_train.train", *overrides]


def run_to_end(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(
            f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def run_and_kill(cmd: list[str], metrics_path: Path, kill_at: int, timeout: float) -> int:
    """Start the job in its own process group, SIGKILL all of it once `kill_at` steps are logged."""
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while job.poll() is None and time.monotonic() < deadline:
            if completed_steps(metrics_path) >= kill_at:
                kill_tree(job.pid)
                break
            time.sleep(0.01)
    finally:
        if job.poll() is None:
            kill_tree(job.pid)
        _, err = job.communicate()
    if job.returncode != -signal.SIGKILL:
        raise SystemExit(
            f"the job ended on its own ({job.returncode}) before step {kill_at}; raise train.steps\n{err[-3000:]}"
        )
    return completed_steps(metrics_path)


def resume_step(journal_path: Path) -> int:
    resumes = [e for e in read_journal(journal_path) if e["event"] == "resume"]
    if not resumes:
        raise SystemExit(f"{journal_path}: the resumed run journaled no resume event")
    return int(resumes[-1]["step"])


def compare(straight: dict[int, dict], resumed: dict[int, dict], first: int, rtol: float) -> tuple[bool, float]:
    worst = 0.0
    same = True
    for step in sorted(s for s in straight if s > first):
        a, b = straight[step]["loss"], resumed[step]["loss"]
        rel = abs(a - b) / max(abs(a), 1e-30)
        worst = max(worst, rel)
        same &= a == b if rtol == 0 else rel <= rtol
        print(f"step {step:>6}  straight {a:.10f}  resumed {b:.10f}  {'==' if a == b else f'rel diff {rel:.2e}'}")
    return same, worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="ranks per launch (torchrun --standalone)")
    parser.add_argument("--launcher", help="launch prefix instead of torchrun --standalone, e.g. 'srun torchrun ...'")
    parser.add_argument("--kill-at-step", type=int, required=True, help="SIGKILL once this many steps are logged")
    parser.add_argument("--root", default="runs", help="run.root for the two runs (default: runs)")
    parser.add_argument("--name", default="kill-and-resume", help="prefix of the two run ids")
    parser.add_argument("--rtol", type=float, default=0.0, help="allowed relative loss difference (0: bitwise)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    parser.add_argument("overrides", nargs="*", help="your training overrides (after --)")
    args = parser.parse_args()

    root = Path(args.root)
    straight_id, killed_id = f"{args.name}-straight", f"{args.name}-killed"
    for run_id in (straight_id, killed_id):
        if (root / run_id).exists():
            raise SystemExit(f"{root / run_id} exists; remove it or pass --name")
    base = [*args.overrides, f"run.root={root}"]

    print(f"1/3 straight run -> {root / straight_id}", flush=True)
    run_to_end(launch_command(args.launcher, args.nproc, [*base, f"run.id={straight_id}"]), args.timeout)
    killed_cmd = launch_command(args.launcher, args.nproc, [*base, f"run.id={killed_id}"])
    print(f"2/3 same run, SIGKILL after step {args.kill_at_step} -> {root / killed_id}", flush=True)
    killed_at = run_and_kill(killed_cmd, root / killed_id / "metrics.jsonl", args.kill_at_step, args.timeout)
    print(f"    killed with {killed_at} steps logged", flush=True)
    print("3/3 the killed run resumed with +resume=latest", flush=True)
    run_to_end([*killed_cmd, "+resume=latest"], args.timeout)

    first = resume_step(root / killed_id / "journal.jsonl")
    print(f"resumed from step {first}; comparing every later step")
    same, worst = compare(
        read_metrics(root / straight_id / "metrics.jsonl"),
        read_metrics(root / killed_id / "metrics.jsonl"),
        first,
        args.rtol,
    )
    verdict = "bitwise identical" if same and worst == 0 else ("within rtol" if same else "DIFFERENT")
    print(f"result: {verdict} (largest relative difference {worst:.3e}) after resuming from step {first}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
