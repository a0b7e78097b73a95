"""scripts/slurm_train.sbatch: it parses, and its own logic (trap, wait, requeue on the run's status, +resume=auto)
works.

SLURM is not available here, so the tests stand in small shell commands for `srun` (runs its command on this
machine), `scancel` (signals that command) and `scontrol` (one host name; records a requeue). Everything else is
real: the batch script under bash, `curry-train run` with the script's rendezvous options, torchrun, two gloo ranks,
the SIGUSR1 that `--signal=B:USR1@...` would send, and the checkpoint the run saves before it is requeued.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curry_train.journal import read_journal
from curry_train.metrics import read_metrics
from tests.conftest import FAST, _env

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_train.sbatch"


def test_slurm_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_slurm_script_passes_shellcheck() -> None:
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def _stand_ins(bin_dir: Path, pid_file: Path, requeue_log: Path) -> None:
    bin_dir.mkdir()
    commands = {
        # srun: drop srun's own options, run the step here; its pid is the step's (exec keeps it).
        "srun": f'while [[ $1 == --* ]]; do shift; done\necho $$ > "{pid_file}"\nexec "$@"\n',
        # scancel --signal=SIG JOBID: signal the step (not the batch shell), as scancel without --batch does.
        "scancel": f'sig=${{1#--signal=}}\nkill -s "$sig" "$(cat "{pid_file}")"\n',
        "scontrol": (
            "case $1 in\n  show) echo localhost ;;\n"
            f'  requeue) echo "requeue $2" >> "{requeue_log}" ;;\n  *) exit 1 ;;\nesac\n'
        ),
        "python": f'exec "{sys.executable}" "$@"\n',
    }
    for name, body in commands.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_env(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """The environment of a batch job on one node with two ranks, its run root and its requeue record."""
    bin_dir, runs = tmp_path / "bin", tmp_path / "runs"
    pid_file, requeue_log = tmp_path / "step.pid", tmp_path / "requeues.log"
    _stand_ins(bin_dir, pid_file, requeue_log)
    env = {
        **_env(),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "GPUS_PER_NODE": "2",
        "RUN_ROOT": str(runs),
        "RDZV_PORT": str(_free_port()),
    }
    return env, runs, requeue_log


def _job(args: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )


def test_a_refused_launch_is_not_requeued(tmp_path: Path) -> None:
    env, _, requeue_log = _job_env(tmp_path)
    proc = _job([*FAST, "checkpoint.rollbak_every=5"], tmp_path, env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checkpoint.rollbak_every: no such key" in proc.stderr
    assert "the run stopped with status 2 (see above); not requeued" in proc.stdout
    assert not requeue_log.exists()


def test_a_crash_is_requeued(tmp_path: Path) -> None:
    env, runs, requeue_log = _job_env(tmp_path)
    crash = ["train.steps=6", "checkpoint.rollback_every=2", "+debug.fail_save_at=2", "+debug.fail_save_rank=1"]
    proc = _job([*FAST, *crash, "run.id=crash"], tmp_path, env)
    assert "curry-train: rank 1 failed: OSError: [Errno 28]" in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the run failed with status 1" in proc.stdout and "requeueing job 4242" in proc.stdout
    assert requeue_log.read_text().split() == ["requeue", "4242"]
    assert (runs / "crash" / "failures.log").exists()


def test_time_limit_warning_saves_requeues_and_the_requeued_job_resumes(tmp_path: Path) -> None:
    env, runs, requeue_log = _job_env(tmp_path)
    overrides = [*FAST, "train.steps=150", "train.eval_every=75", "checkpoint.recovery_every=50", "run.id=slurm"]
    job = subprocess.Popen(
        ["bash", str(SCRIPT), *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics = runs / "slurm" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and len(read_metrics(metrics)) >= 3):
            assert job.poll() is None, job.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.2)
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@600 sends the batch shell
        output, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, output[-4000:]
    assert requeue_log.read_text().split() == ["requeue", "4242"]
    events = read_journal(runs / "slurm" / "journal.jsonl")
    preempt = [e for e in events if e["event"] == "preempt"]
    assert len(preempt) == 1 and preempt[0]["signal"] == "SIGTERM", output[-4000:]
    stopped_at = preempt[0]["step"]
    assert 3 <= stopped_at < 150
    assert not any(e["event"] == "run_end" for e in events)

    # The requeued job: the same script and overrides, a new attempt; +resume=auto continues from the save.
    requeue_log.unlink()
    proc = subprocess.run(
        ["bash", str(SCRIPT), *overrides],
        cwd=tmp_path,
        env={**env, "SLURM_RESTART_COUNT": "1", "RDZV_PORT": str(_free_port())},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not requeue_log.exists()
    events = read_journal(runs / "slurm" / "journal.jsonl")
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == stopped_at
    assert [e["step"] for e in events if e["event"] == "run_end"] == [150]
    assert sorted(read_metrics(metrics)) == list(range(1, 151))
