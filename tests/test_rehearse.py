"""`curry-train rehearse`: a real rehearsal to a bitwise verdict, a deliberately inexact resume caught, refusals,
Ctrl-C, and the choice of N, K and the cadence."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curry_train.cli import main as cli_main
from curry_train.compose import from_command_line
from curry_train.rehearse import Refused, compare_losses, schedule, verdict
from tests.conftest import FAST, _env


def rehearse(args: list[str], cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "curry_train.cli", "rehearse", *args, *FAST]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_a_two_rank_rehearsal_is_bitwise_exact_and_leaves_the_runs_there_alone(tmp_path: Path) -> None:
    existing = tmp_path / "runs" / "tiny-stdlib-00000000"
    existing.mkdir(parents=True)
    (existing / "journal.jsonl").write_text("")
    proc = rehearse(["--nproc-per-node=2", "--steps=6", "--kill-at=4"], tmp_path)
    out = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert out[0] == "resume is exact: losses bitwise identical over steps 1-6"
    # The default rollback_every=100 makes no checkpoint before step 4: shortened to 3, and said.
    assert "checkpoint.rollback_every=100 -> 3" in proc.stdout
    resumed = re.search(r"killed after step (\d+) and resumed from step (\d+)", proc.stdout)
    assert resumed and int(resumed[1]) >= 4 and int(resumed[2]) == 3
    assert re.search(r"a full save: [\d.]+ s of training time .* s until committed, [\d.]+ MB", proc.stdout)
    assert re.search(r"a resume: [\d.]+ s from the launch", proc.stdout)
    assert "storage over train.steps=200" in proc.stdout and "on 2 ranks" in proc.stdout
    assert "1/3 straight run" in proc.stderr and "3/3 resumed" in proc.stderr  # progress
    # Its own directory is gone; the run that was there is untouched.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [existing.name]
    assert [p.name for p in existing.iterdir()] == ["journal.jsonl"]


def test_a_deliberately_inexact_resume_is_caught_at_the_first_step_after_it(tmp_path: Path) -> None:
    proc = rehearse(
        ["--nproc-per-node=1", "--steps=6", "--kill-at=4", "--keep", "+debug.perturb_resume=true"], tmp_path
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    resumed_from = int(re.search(r"resumed from step (\d+)", proc.stdout)[1])  # type: ignore[index]
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"resume is NOT exact: losses first differ at step {resumed_from + 1} (straight ")
    assert "largest difference" in first
    # --keep: both runs stay, in the one directory the rehearsal made.
    (scratch,) = (tmp_path / "runs").iterdir()
    assert scratch.name.startswith("rehearsal-") and {"straight", "killed"} <= {p.name for p in scratch.iterdir()}


def _processes_in(folder: Path, but: int) -> list[int]:
    """The processes working in `folder` (the job's inherit its working directory), all but `but`."""
    pids = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if cwd.readlink() == folder and int(cwd.parent.name) != but:
                pids.append(int(cwd.parent.name))
        except OSError:
            continue  # ended while we looked, or not ours to read
    return pids


def _sigint_as_at_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_kills_the_job_and_removes_the_rehearsal(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "curry_train.cli", "rehearse", "--nproc-per-node=2", *FAST]
    # Ctrl-C as a terminal sends it: a suite started in the background by a shell without job control inherits
    # SIGINT ignored (POSIX), and the rehearsal, like any program, would keep it ignored.
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_at_a_terminal
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_processes_in(tmp_path, but=proc.pid)) < 3:
        time.sleep(0.2)  # until torchrun and its two workers run
    assert len(_processes_in(tmp_path, but=proc.pid)) >= 3, "the rehearsal's job never started"
    assert len(list((tmp_path / "runs").iterdir())) == 1
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: the job is killed" in err
    assert not (tmp_path / "runs").exists()  # run.root was made for the rehearsal: it goes too
    assert _processes_in(tmp_path, but=proc.pid) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nprocs=2"], "unknown option --nprocs; its own options: --steps, --kill-at, --keep; the torchrun options"),
        (["--steps=ten"], "--steps=ten: not a valid value (expected a whole number)"),
        (["--steps=5", "--kill-at=5"], "--kill-at=5: must be from 2 (a checkpoint comes before it) to --steps-1 (4)"),
        (["--steps=2"], "--steps=2: too few; at least 3"),
        (["--nnodes=2", "--rdzv-endpoint=h:1"], "--nnodes=2: the rehearsal runs on one node"),
        (["+resume=latest"], "+resume: the rehearsal makes and resumes runs of its own"),
        (["checkpoint.rollback_every=-1"], "invalid config: checkpoint.rollback_every: must be an integer >= 0"),
    ],
)
def test_a_bad_command_line_is_refused_in_one_line_before_anything_starts(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["rehearse", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curry-train rehearse: ") and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ N, K and the cadence


def _schedule(overrides: list[str], steps: int | None = None, kill_at: int | None = None):
    return schedule(from_command_line(overrides)[0], steps, kill_at)


def test_n_and_k_come_from_the_cadence_and_a_cadence_is_shortened_only_when_needed() -> None:
    long = _schedule(["checkpoint.rollback_every=100"])  # the default: capped to fit a few minutes
    assert (long.steps, long.kill_at) == (25, 15)
    assert "checkpoint.rollback_every=14" in long.overrides
    short = _schedule(["checkpoint.rollback_every=4"])  # a checkpoint at 4, the kill at 6, 4 steps after it
    assert (short.steps, short.kill_at) == (10, 6)
    assert not any(o.startswith("checkpoint.") for o in short.overrides)
    given = _schedule(["checkpoint.rollback_every=4"], steps=30)
    assert (given.steps, given.kill_at) == (30, 6)
    tiny_run = _schedule(["train.steps=5", "checkpoint.rollback_every=4"])  # never more steps than the real run
    assert (tiny_run.steps, tiny_run.kill_at) == (5, 4)
    assert "checkpoint.rollback_every=3" in tiny_run.overrides
    # No role saves full state: a recovery cadence is added (and its retention, which was 0).
    none = _schedule(
        ["checkpoint.rollback_contents=params", "checkpoint.recovery_every=0", "checkpoint.retention.recovery_keep=0"],
        kill_at=5,
    )
    assert {"checkpoint.recovery_every=4", "checkpoint.retention.recovery_keep=1"} <= set(none.overrides)
    assert any("no role saves full state" in c for c in none.changes)
    with pytest.raises(Refused, match="--kill-at=1: must be from 2"):
        _schedule([], steps=6, kill_at=1)


def test_the_verdict_names_the_first_differing_step_and_the_largest_difference() -> None:
    straight = {s: {"loss": 5.0 - s / 10} for s in range(1, 7)}
    assert verdict(compare_losses(straight, dict(straight), 6)) == (
        "resume is exact: losses bitwise identical over steps 1-6"
    )
    resumed = {**straight, 4: {"loss": straight[4]["loss"] + 1e-7}, 5: {"loss": straight[5]["loss"] - 0.5}}
    c = compare_losses(straight, resumed, 6)
    assert (c.first_difference, c.largest_at, c.largest) == (4, 5, pytest.approx(0.5))
    assert verdict(c).startswith("resume is NOT exact: losses first differ at step 4 (straight 4.6, resumed 4.6000")
    nan = {s: {"loss": math.nan} for s in range(1, 3)}
    assert compare_losses(nan, dict(nan), 2).first_difference is None  # a NaN in both runs is the same NaN
    missing = compare_losses(straight, {s: v for s, v in straight.items() if s != 6}, 6)
    assert (missing.first_difference, missing.largest) == (6, math.inf)
