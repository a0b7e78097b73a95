"""`curry-train run`: refusals before torchrun starts, and the run's own exit status (0, 1, 2, 3) through torchrun.

The launches are real (the launcher, torchrun, two gloo ranks); each run serves several assertions. A refusal that
starts no torchrun is seen from outside through `--log-dir`: torchrun creates its job folder there when it starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curry_train.journal import read_journal
from curry_train.launcher import (
    LaunchError,
    alive,
    parse_options,
    process_tree,
    run_status,
    torchrun_arguments,
    worker_pids,
)
from curry_train.metrics import read_metrics
from tests.conftest import FAST, _env

BASE = [*FAST, "train.eval_every=0"]


def launcher(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "curry_train.cli", "run", *args]


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(launcher(args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def said(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def quiet_about_torchrun(text: str) -> bool:
    return not any(noise in text for noise in ("Traceback", "ChildFailedError", "torch.distributed", "exitcode"))


# ------------------------------------------------------------------------------------------ the command line


def test_options_and_overrides_are_told_apart() -> None:
    options, overrides = parse_options(["--nproc-per-node=2", "--nnodes", "1", "--max_restarts=0", "a=1", "+b=2"])
    assert options == {"nproc-per-node": "2", "nnodes": "1", "max-restarts": "0"}
    assert overrides == ["a=1", "+b=2"]
    assert torchrun_arguments(options)[0] == "--standalone"
    assert "--standalone" not in torchrun_arguments({"rdzv-endpoint": "h:1", "rdzv-backend": "c10d"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nprocs=2"], "unknown option --nprocs; the torchrun options it knows: --nnodes, --nproc-per-node"),
        (["--nproc-per-node=two"], "--nproc-per-node=two: not a valid value"),
        (["--standalone=yes"], "--standalone takes no value"),
        (["--signals-to-handle=SIGFOO"], "not a list of signal names"),
    ],
)
def test_a_bad_option_is_refused(argv: list[str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        parse_options(argv)


def test_several_nodes_need_a_rendezvous() -> None:
    with pytest.raises(LaunchError, match="--nnodes=2 needs a rendezvous: --rdzv-backend=c10d --rdzv-endpoint="):
        torchrun_arguments({"nnodes": "2"})


# ------------------------------------------------------------------------------- the status from the records


def rec(rank: int, status: int, quiet: bool = False, world: int = 2) -> dict:
    return {"rank": rank, "status": status, "line": "", "quiet": quiet, "local_world_size": world, "restart": 0}


def failed(rank: int, exitcode: int, sig: str | None = None) -> dict:
    return {"rank": rank, "pid": 100 + rank, "exitcode": exitcode, "signal": sig}


def test_the_cause_outranks_the_ranks_that_only_saw_a_peer_go() -> None:
    # A refusal on rank 0 is 2 although rank 1 saw a broken connection; a spike is 3; a crash with its peer is 1.
    assert run_status([rec(0, 2), rec(1, 1, quiet=True)], [failed(0, 2), failed(1, 1)], 1) == (2, None)
    assert run_status([rec(0, 3), rec(1, 3, quiet=True)], [failed(0, 3), failed(1, 3)], 1) == (3, None)
    assert run_status([rec(0, 1, quiet=True), rec(1, 1)], [failed(0, 1), failed(1, 1)], 1) == (1, None)
    # Ranks on another node only echo rank 0's refusal: their node's launcher says 2 as well.
    assert run_status([rec(2, 2, quiet=True), rec(3, 2, quiet=True)], [failed(2, 2), failed(3, 2)], 1) == (2, None)
    assert run_status([rec(0, 0), rec(1, 0)], [], 0) == (0, None)


def test_a_worker_gone_without_a_record_is_a_failure_and_is_named() -> None:
    status, line = run_status([rec(0, 1, quiet=True)], [failed(0, 1), failed(1, -9, "SIGKILL")], 1)
    assert status == 1 and line is not None and "rank 1 (pid 101) ended by SIGKILL without a word" in line
    # The finished rank does not hide the one that vanished.
    assert run_status([rec(0, 0)], [failed(1, -9, "SIGKILL")], 1)[0] == 1
    # A refusal still wins over a peer killed while it waited.
    assert run_status([rec(0, 2)], [failed(1, -15, "SIGTERM")], 1)[0] == 2
    # Nothing recorded: torchrun's own failure (a rendezvous that never completed) is 1, its success 0.
    assert run_status([], [], 1)[0] == 1 and run_status([], [], 0)[0] == 0
    assert run_status([rec(0, 0), rec(1, 0)], [], 1)[0] == 1


def test_with_restarts_the_last_attempt_decides() -> None:
    earlier = {**rec(1, 1), "restart": 0}
    assert run_status([earlier, {**rec(0, 0), "restart": 1}, {**rec(1, 0), "restart": 1}], [], 0) == (0, None)


# -------------------------------------------------------------------------------------- refused before torchrun


def test_a_misspelt_key_is_one_line_and_status_2_and_starts_no_torchrun(tmp_path: Path) -> None:
    logs = tmp_path / "torchrun-logs"
    proc = run([f"--log-dir={logs}", "--nproc-per-node=2", "checkpoint.rollbak_every=5"], tmp_path)
    assert proc.returncode == 2, said(proc)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) <= 3 and quiet_about_torchrun(proc.stderr), said(proc)
    assert "checkpoint.rollbak_every: no such key; did you mean checkpoint.rollback_every?" in proc.stderr
    assert not logs.exists() and not (tmp_path / "runs").exists()


def test_an_unknown_option_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    proc = run(["--nprocs=2", "train.steps=1"], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, said(proc)
    assert "unknown option --nprocs; the torchrun options it knows: --nnodes, --nproc-per-node" in proc.stderr


# ------------------------------------------------------------------------------------------------ the runs


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("launcher")


@pytest.fixture(scope="module")
def finished(root: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    args = [*BASE, "train.steps=2", "run.id=done"]
    return run(["--nproc-per-node=1", *args], root), args


def test_a_finished_run_exits_0_without_torchruns_noise(finished) -> None:
    proc, _ = finished
    assert proc.returncode == 0, said(proc)
    assert "finished 2 steps" in proc.stdout and quiet_about_torchrun(proc.stderr), said(proc)


def test_a_fresh_launch_into_a_finished_run_names_the_two_ways_on(finished, root: Path) -> None:
    _, args = finished
    journal = (root / "runs" / "done" / "journal.jsonl").read_text()
    logs = root / "torchrun-logs"
    proc = run([f"--log-dir={logs}", "--nproc-per-node=2", *args], root)
    assert proc.returncode == 2, said(proc)
    line = proc.stderr.strip()
    assert line.startswith(f"curry-train: run directory {Path('runs') / 'done'} already holds a finished run (2 steps")
    assert "+resume=latest" in line and "run.id=NAME" in line and "cannot resume" not in line
    # An unreadable +resume=PATH is refused there too.
    missing = root / "nowhere.dcp"
    proc = run([f"--log-dir={logs}", "--nproc-per-node=2", *args, f"+resume={missing}"], root)
    assert proc.returncode == 2 and f"cannot resume: +resume={missing}: " in proc.stderr, said(proc)
    assert not logs.exists(), "no torchrun may start"
    assert (root / "runs" / "done" / "journal.jsonl").read_text() == journal


def test_a_crash_is_1_with_the_ranks_line_and_torchruns_report_kept_in_failures_log(root: Path) -> None:
    args = [*BASE, "train.steps=6", "checkpoint.rollback_every=2", "run.id=crash"]
    proc = run(["--nproc-per-node=2", *args, "+debug.fail_save_at=2", "+debug.fail_save_rank=1"], root)
    assert proc.returncode == 1, said(proc)
    assert "curry-train: rank 1 failed: OSError: [Errno 28]" in proc.stderr and quiet_about_torchrun(proc.stderr)
    log = (root / "runs" / "crash" / "failures.log").read_text()
    assert "torchrun on " in log and "curry_train.train FAILED" in log


def test_a_spike_that_cannot_roll_back_is_3(root: Path) -> None:
    spike = ["spike.enabled=true", "spike.window=8", "spike.warmup_steps=5", "spike.max_rollbacks=0"]
    args = [*BASE, "train.steps=10", "checkpoint.rollback_every=5", *spike, "+debug.inject_spike_at=8"]
    proc = run(["--nproc-per-node=2", *args, "run.id=spike"], root)
    assert proc.returncode == 3, said(proc)
    assert "stopped on a loss spike" in proc.stderr and quiet_about_torchrun(proc.stderr), said(proc)


def test_a_busy_run_directory_is_2_and_sigusr1_saves_and_exits_0_whatever_signal_comes_after(root: Path) -> None:
    args = ["--nproc-per-node=2", *BASE, "train.steps=400", "run.id=busy"]
    job = subprocess.Popen(
        launcher(args), cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = root / "runs" / "busy" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and len(read_metrics(metrics)) >= 3):
            assert job.poll() is None and time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.1)
        second = run([*args, "+resume=latest"], root)
        assert second.returncode == 2, said(second)
        assert f"curry-train: run directory {Path('runs') / 'busy'} is in use by another launch (host " in second.stderr
        assert "invalid config" not in second.stderr
        # SIGUSR1 (SLURM's warning) reaches the workers as a preemption: a save, then status 0.
        job.send_signal(signal.SIGUSR1)
        # A second stop signal after the workers ended (a scheduler's SIGTERM to the whole job, a second Ctrl-C)
        # changes nothing while torchrun and the launcher exit: Python would put the default action back there.
        workers = set(process_tree(job.pid)) - {job.pid, *worker_pids(job.pid)}
        while any(alive(pid) for pid in workers):
            assert job.poll() is None and time.monotonic() < deadline, "the workers did not end"
            time.sleep(0.005)
        late = 0
        while job.poll() is None:
            for pid in process_tree(job.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                    late += 1
            time.sleep(0.002)
        out, err = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    preempt = [e for e in read_journal(root / "runs" / "busy" / "journal.jsonl") if e["event"] == "preempt"]
    assert len(preempt) == 1 and preempt[0]["signal"] == "SIGUSR1"
    assert "SIGUSR1 received: saved step" in out and quiet_about_torchrun(err), err[-3000:]
    assert late > 0
