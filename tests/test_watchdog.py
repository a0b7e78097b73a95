"""The hang watchdog and the stop signals, with real processes: a rank stalled by +debug.stall_at ends a 2-rank job
with status 1 within the hang timeout, its stack in failures.log and `hang` in the journal, and the relaunch
continues bitwise; a second SIGTERM during a save is journaled, so `status` says what stopped the attempt."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from curry_train import heartbeat
from curry_train.heartbeat import Heartbeat, name_ranks
from curry_train.journal import read_journal
from curry_train.watchdog import HANG_FLOOR_S, collective_timeout, hang_timeout
from tests.conftest import FAST, _env, assert_replays_bitwise, popen_train, run_train

HANG_S = 20  # well above a step or a save of the tiny model on a loaded 2-core machine
MARGIN_S = 25  # the watchdog's polling, the stack dump, torchrun noticing and stopping the other rank
BASE = [
    *FAST,
    "train.steps=8",
    "train.eval_every=0",
    "checkpoint.recovery_every=2",
    "checkpoint.rollback_every=0",
    "checkpoint.best_k=0",
    f"train.hang_timeout_s={HANG_S}",
]


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "curry_train.cli", *args], capture_output=True, text=True, env=_env())
    return proc.stdout + proc.stderr


def test_hang_timeout_explicit_floor_and_measured() -> None:
    assert hang_timeout(7.5, step_seconds=100.0) == (7.5, "train.hang_timeout_s")
    assert hang_timeout(None)[0] == HANG_FLOOR_S
    assert hang_timeout(None, step_seconds=0.5, save_seconds=20.0)[0] == HANG_FLOOR_S
    seconds, source = hang_timeout(None, step_seconds=1.0, save_seconds=400.0)
    assert seconds == 1200.0 and "save" in source
    assert hang_timeout(None, step_seconds=60.0, save_seconds=10.0)[0] == 600.0
    assert collective_timeout(20.0) > 20.0 and collective_timeout(1000.0) > 1000.0


def test_ranks_are_named_by_node() -> None:
    peers = [("a", "10.0.0.1")] * 4 + [("b", "10.0.0.2")] * 4
    assert name_ranks([5], peers) == "rank 5 on b (10.0.0.2)"
    assert name_ranks([1, 2, 4, 5, 6, 7], peers) == "ranks 1-2 on a (10.0.0.1), ranks 4-7 on b (10.0.0.2)"


def test_the_heartbeats_name_a_silent_rank_and_a_rank_doing_something_else(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real store, as torchrun's agent holds it; rank 0 beats from its thread, the test writes the others' records.
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(master.port))
    peers = [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")]
    beat = Heartbeat(0, peers, lambda: (7, "step 8"), lambda: 20.0)
    try:
        deadline = time.monotonic() + 30
        while not master.check([f"{beat.prefix}0"]):
            assert time.monotonic() < deadline, "rank 0 never wrote its heartbeat"
            time.sleep(0.05)
        assert json.loads(master.get(f"{beat.prefix}0"))["phase"] == "step 8"

        def write(rank: int, age: float, step: int, phase: str) -> None:
            record = {"time": time.time() - age, "step": step, "phase": phase}
            master.set(f"{beat.prefix}{rank}", json.dumps(record))

        write(1, 0.0, 7, "step 8")
        write(2, 0.0, 7, "the save of step 7")
        line, lost = beat.report()
        assert lost == [] and "no rank lost: rank 2 on c (10.0.0.3) is alive, 7 steps done, during the save" in line
        write(2, 0.0, 7, "step 8")
        assert "every rank's heartbeat is current" in beat.report()[0]
        write(1, heartbeat.stale_after(20.0) + 30, 7, "step 8")  # cut off 30 s after it would count as lost
        line, lost = beat.report()
        assert lost == [1] and "; lost rank 1 on b (10.0.0.2): no heartbeat for " in line, line
    finally:
        beat.stop()


def test_stalled_rank_ends_the_job_with_its_stack_and_the_relaunch_continues_bitwise(tmp_path: Path) -> None:
    args = [*BASE, "run.id=stall", "+debug.stall_at=5", "+debug.stall_rank=1"]
    proc = run_train(args, tmp_path, nproc=2, check=False, timeout=240)
    ended = time.time()
    run_dir = tmp_path / "runs" / "stall"
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    journal = read_journal(run_dir / "journal.jsonl")
    stalls = [e for e in journal if e["event"] == "stall_injected"]
    assert [(e["step"], e["rank"]) for e in stalls] == [(5, 1)]
    stalled_at = datetime.fromisoformat(str(stalls[0]["time"])).timestamp()
    assert ended - stalled_at < HANG_S + MARGIN_S, f"the job took {ended - stalled_at:.0f} s to end after the stall"
    hangs = {e["rank"]: e for e in journal if e["event"] == "hang"}
    assert 1 in hangs and hangs[1]["phase"].startswith("a stall by +debug.stall_at=5"), journal
    # The stalled rank's own stack, under a header naming it, its host and what it was doing.
    log = (run_dir / "failures.log").read_text()
    # The section rank 1 wrote (its header starts "TIME rank 1 pid"; rank 0's names rank 1 too, from the heartbeats).
    section = next(part for part in re.split(r"^--- ", log, flags=re.M) if re.match(r"\S+ rank 1 pid ", part))
    assert "a stall by +debug.stall_at=5" in section and "in stall_forever" in section, log[-3000:]
    assert "rank 1 on" in output and "hung: no progress for" in output, output[-3000:]
    # From the heartbeats: no rank was lost, and the other rank is waiting in the next step.
    stalled = next(line for line in output.splitlines() if line.startswith("curry-train: rank 1 on"))
    assert "; no rank lost: rank 0 on " in stalled and "is alive, 4 steps done, during step 5" in stalled, stalled
    assert "rank 1 on" in cli("status", str(run_dir)), "status does not show the hang"

    # The same command again, as a requeue runs it: no second stall, and the replayed steps match bitwise.
    run_train([*args, "+resume=auto"], tmp_path, nproc=2, timeout=240)
    journal = read_journal(run_dir / "journal.jsonl")
    assert len([e for e in journal if e["event"] == "stall_injected"]) == 1
    assert journal[-1]["event"] == "run_end" and journal[-1]["step"] == 8
    first = assert_replays_bitwise(run_dir)
    assert sorted(first) == list(range(1, 9))
    status = cli("status", str(run_dir))
    assert "attempt 0 stopped after step 4 (hung: rank" in status, status


def test_second_sigterm_during_the_save_is_journaled(tmp_path: Path) -> None:
    # One process, synchronous saves, no cadence save: the preemption's save is the only one, so the staging
    # directory that appears is its own, and the second signal lands inside it.
    args = [
        *FAST,
        "train.steps=400",
        "train.eval_every=0",
        "checkpoint.recovery_every=1000",
        "checkpoint.rollback_every=0",
        "checkpoint.best_k=0",
        "checkpoint.async_save=false",
        "run.id=forced",
    ]
    run_dir = tmp_path / "runs" / "forced"
    job = popen_train(args, tmp_path)
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert job.poll() is None and time.monotonic() < deadline, "the run did not reach step 2"
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        while not any(run_dir.glob("*/.tmp-*")):
            assert job.poll() is None and time.monotonic() < deadline, "the preemption save never started"
            time.sleep(0.005)
        job.send_signal(signal.SIGTERM)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1, output[-3000:]
    assert "SIGTERM received: finishing step" in output and "saving a full checkpoint" in output, output[-3000:]
    end = read_journal(run_dir / "journal.jsonl")[-1]
    assert end["event"] == "preempt" and end["forced"] is True and end["signal"] == "SIGTERM", end
    assert end["during"] == f"the save of step {end['step']}", end
    status = cli("status", str(run_dir))
    assert f"stopped by a second SIGTERM during the save of step {end['step']}" in status, status


@pytest.mark.parametrize("value", ["0", "-5"])
def test_hang_timeout_must_be_positive(tmp_path: Path, value: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "curry_train.train", f"train.hang_timeout_s={value}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert proc.returncode == 2 and "train.hang_timeout_s: must be a positive number" in proc.stderr
