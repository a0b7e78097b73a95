"""Exact resume: a SIGKILLed run resumed with +resume=latest continues bitwise; other world sizes within tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest

from curry_train.checkpoint.resume import ResumeError, check_fidelity
from curry_train.journal import read_journal
from curry_train.metrics import read_metrics
from tests.conftest import FAST, kill_and_resume, run_train

RESUMABLE = [
    *FAST,
    "train.steps=14",
    "train.eval_every=7",
    "checkpoint.recovery_every=5",
    "checkpoint.rollback_every=0",
    "data.num_workers=2",
]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_then_resume_latest_is_bitwise_identical(tmp_path: Path, async_save: bool) -> None:
    """The user-facing script: straight run, run SIGKILLed after step 7, that run resumed with +resume=latest."""
    overrides = [*RESUMABLE, f"checkpoint.async_save={str(async_save).lower()}"]
    _, killed, out = kill_and_resume(tmp_path, overrides, kill_at=7)
    assert "result: bitwise identical" in out
    events = read_journal(killed / "journal.jsonl")
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 5 and resume[0]["exact"] is True
    assert resume[0]["path"] == "recovery/step-00000005.dcp"
    # metrics.jsonl keeps the killed attempt's lines, marked; the resumed attempt's are the current ones.
    lines = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if line]
    assert len(lines) > 14
    current = read_metrics(killed / "metrics.jsonl")
    assert sorted(current) == list(range(1, 15))
    assert all(current[s]["attempt"] == 1 for s in range(6, 15))
    assert all(current[s]["attempt"] == 0 for s in range(1, 6))
    straight = read_metrics(tmp_path / "kill-and-resume-straight" / "metrics.jsonl")
    assert [straight[s]["loss"] for s in range(6, 15)] == [current[s]["loss"] for s in range(6, 15)]
    assert current[14]["dev_loss"] == straight[14]["dev_loss"]


@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size(tmp_path: Path, saved_on: int, resumed_on: int) -> None:
    straight_args = [*RESUMABLE, "run.id=straight"]
    run_train(straight_args, tmp_path, nproc=saved_on)
    straight = read_metrics(tmp_path / "runs" / "straight" / "metrics.jsonl")
    checkpoint = tmp_path / "runs" / "straight" / "recovery" / "step-00000005.dcp"
    proc = run_train([*RESUMABLE, "run.id=resumed", f"+resume={checkpoint}"], tmp_path, nproc=resumed_on)
    assert f"resumed from step 5 of {checkpoint}" in proc.stdout
    assert f"world size {saved_on} -> {resumed_on}" in proc.stdout
    resumed = read_metrics(tmp_path / "runs" / "resumed" / "metrics.jsonl")
    assert sorted(resumed) == list(range(6, 15))
    worst = max(abs(resumed[s]["loss"] - straight[s]["loss"]) / straight[s]["loss"] for s in resumed)
    print(f"world size {saved_on} -> {resumed_on}: largest relative loss difference {worst:.3e} over steps 6-14")
    assert worst < 1e-4
    events = read_journal(tmp_path / "runs" / "resumed" / "journal.jsonl")
    change = [e for e in events if e["event"] == "world_size_change"]
    assert change and change[0]["old"] == saved_on and change[0]["new"] == resumed_on
    assert [e for e in events if e["event"] == "resume"][0]["exact"] is False


def test_resume_latest_with_nothing_to_resume_names_the_run_directory(tmp_path: Path) -> None:
    proc = run_train([*FAST, "train.steps=2", "run.id=empty", "+resume=latest"], tmp_path, check=False)
    assert proc.returncode == 2
    assert str(Path("runs") / "empty") in proc.stderr and "+resume=auto" in proc.stderr
    # +resume=auto is the requeue-friendly form: nothing to resume, so it starts fresh...
    run_train(
        [*FAST, "train.steps=2", "train.eval_every=0", "checkpoint.recovery_every=2", "run.id=empty", "+resume=auto"],
        tmp_path,
    )
    # ...and the same command again finds the run it left, finished, and says so.
    proc = run_train(
        [*FAST, "train.steps=2", "train.eval_every=0", "checkpoint.recovery_every=2", "run.id=empty", "+resume=auto"],
        tmp_path,
    )
    assert "resuming from step 2 of" in proc.stdout and "already finished (2 of 2 steps)" in proc.stdout
    assert [e["event"] for e in read_journal(tmp_path / "runs" / "empty" / "journal.jsonl")].count("run_end") == 1


def test_fresh_launch_into_an_existing_run_is_refused(tmp_path: Path) -> None:
    args = [*FAST, "train.steps=1", "train.eval_every=0", "run.id=taken"]
    run_train(args, tmp_path)
    before = (tmp_path / "runs" / "taken" / "metrics.jsonl").read_text()
    proc = run_train([*args, "checkpoint.rollback_every=7"], tmp_path, check=False)  # another policy, same run id
    assert proc.returncode == 2
    assert "already holds a finished run (1 steps done, last launched " in proc.stderr
    assert "+resume=latest" in proc.stderr
    assert "config differs: checkpoint.rollback_every=100 there, 7 here" in proc.stderr
    assert "start another beside it with run.id=NAME" in proc.stderr
    assert (tmp_path / "runs" / "taken" / "metrics.jsonl").read_text() == before, "nothing may be touched"


def test_fidelity_check_fails_loudly_on_a_mismatch() -> None:
    saved = {"params": "aaaa", "rng": "bbbb", "next_indices": [8, 9]}
    check_fidelity(saved, dict(saved))
    with pytest.raises(ResumeError, match="params digest"):
        check_fidelity(saved, {**saved, "params": "cccc"})
    with pytest.raises(ResumeError, match="rng digest"):
        check_fidelity(saved, {**saved, "rng": "cccc"})
    with pytest.raises(ResumeError, match="next batch"):
        check_fidelity(saved, {**saved, "next_indices": [16, 17]})


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_and_stops_then_resume_is_exact(tmp_path: Path, nproc: int) -> None:
    """A scheduler's SIGTERM: the step finishes, a full checkpoint is saved, the job exits 0; the resumed run
    continues exactly as the uninterrupted one."""
    import os
    import signal
    import time

    from tests.conftest import popen_train

    args = [
        *FAST,
        "train.steps=40",
        "train.eval_every=0",
        "checkpoint.recovery_every=0",
        "checkpoint.rollback_every=0",
        "checkpoint.best_k=0",
    ]
    run_train([*args, "run.id=straight"], tmp_path, nproc=nproc)
    job = popen_train([*args, "run.id=preempted"], tmp_path, nproc=nproc)
    metrics = tmp_path / "runs" / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(read_metrics(metrics)) >= 3):
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
    out, _ = job.communicate(timeout=120)
    # One process exits 0; torchrun itself reports the signal it got (exit 1) after its workers saved and exited.
    assert job.returncode == (0 if nproc == 1 else 1), out[-3000:]
    assert "SIGTERM received: saved step" in out
    events = read_journal(tmp_path / "runs" / "preempted" / "journal.jsonl")
    preempt = [e for e in events if e["event"] == "preempt"]
    assert len(preempt) == 1 and preempt[0]["signal"] == "SIGTERM"
    stopped = preempt[0]["step"]
    assert 3 <= stopped < 40 and "run_end" not in [e["event"] for e in events]
    assert os.readlink(tmp_path / "runs" / "preempted" / "latest") == f"recovery/step-{stopped:08d}.dcp"
    run_train([*args, "run.id=preempted", "+resume=latest"], tmp_path, nproc=nproc)
    straight = read_metrics(tmp_path / "runs" / "straight" / "metrics.jsonl")
    resumed = read_metrics(metrics)
    assert [resumed[s]["loss"] for s in range(1, 41)] == [straight[s]["loss"] for s in range(1, 41)]


def test_resume_path_to_an_older_checkpoint_of_this_run_is_a_rollback(tmp_path: Path) -> None:
    """`+resume=PATH` naming an older checkpoint of this run abandons the steps after it, exactly as
    `+rollback_to=PATH` does: `latest` follows, the newer checkpoints are set aside, and their data is skipped."""
    import os

    args = [
        *FAST,
        "train.steps=8",
        "train.eval_every=0",
        "checkpoint.rollback_every=2",
        "checkpoint.recovery_every=4",
        "checkpoint.best_k=0",
        "run.id=spiky",
    ]
    run_train(args, tmp_path)
    run_dir = tmp_path / "runs" / "spiky"
    assert os.readlink(run_dir / "latest") == "recovery/step-00000008.dcp"
    proc = run_train([*args, f"+resume={run_dir / 'rollback' / 'step-00000004.dcp'}"], tmp_path)
    assert proc.stdout.splitlines()[0].startswith("curry-train: rolling back from step 4 of "), proc.stdout[:500]
    rollback = [e for e in read_journal(run_dir / "journal.jsonl") if e["event"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] == 4 and rollback[0]["spike_step"] == 8
    assert rollback[0]["skipped"] == [[4 * 8, 8 * 8]]
    # The abandoned path's checkpoints are set aside whole; abandoned_keep=1 keeps the newest.
    set_aside = rollback[0]["set_aside"]
    assert sorted(p.split("/")[0] for p in set_aside) == ["recovery", "rollback", "rollback"]
    kept = [p for p in set_aside if (run_dir / p).exists()]
    assert len(kept) == 1 and (run_dir / kept[0] / "manifest.json").exists()
    assert "step-00000008" in kept[0] or "step-00000006" in kept[0]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(metrics) == list(range(1, 9)) and all(metrics[s]["attempt"] == 1 for s in range(5, 9))
    assert os.readlink(run_dir / "latest") == "recovery/step-00000008.dcp"


def test_resume_from_a_parameters_only_checkpoint(tmp_path: Path) -> None:
    """A best-K checkpoint holds parameters only: the run continues from its step with a fresh optimizer, and the
    data position comes from the step (there is no loader state to restore)."""
    args = [
        *FAST,
        "train.steps=6",
        "train.eval_every=3",
        "checkpoint.rollback_every=0",
        "checkpoint.recovery_every=0",
        "checkpoint.best_k=1",
    ]
    run_train([*args, "run.id=source"], tmp_path)
    best = next((tmp_path / "runs" / "source" / "best-k").glob("dev-loss-*-step-00000006.dcp"), None) or next(
        (tmp_path / "runs" / "source" / "best-k").glob("dev-loss-*.dcp")
    )
    step = int(best.name.rsplit("-", 1)[1].split(".")[0])
    proc = run_train([*args, "train.steps=9", "run.id=warm", f"+resume={best}"], tmp_path)
    assert "(parameters only: optimizer state starts fresh)" in proc.stdout
    resumed = read_metrics(tmp_path / "runs" / "warm" / "metrics.jsonl")
    assert sorted(resumed) == list(range(step + 1, 10))
    resume = [e for e in read_journal(tmp_path / "runs" / "warm" / "journal.jsonl") if e["event"] == "resume"][0]
    assert resume["exact"] is False and resume["contents"] == "params"


def test_bad_resume_path_fails_on_every_rank_with_the_path(tmp_path: Path) -> None:
    """Rank 0 reads the disk; its error must reach every rank (no rank left waiting) and name the path."""
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    proc = run_train(
        [*FAST, "train.steps=2", f"+resume={not_a_checkpoint}"], tmp_path, nproc=2, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert f"{not_a_checkpoint} is not a committed curry-train checkpoint" in proc.stderr


def test_crash_between_commit_and_link_resumes_the_newest_checkpoint(tmp_path: Path) -> None:
    """A commit is durable before `latest` is swapped: if the process dies in between, +resume=latest still finds
    the newest full checkpoint and the start repairs the link."""
    import os

    args = [
        *FAST,
        "train.steps=4",
        "train.eval_every=0",
        "checkpoint.recovery_every=2",
        "checkpoint.rollback_every=0",
        "checkpoint.best_k=0",
        "run.id=unlinked",
    ]
    run_train(args, tmp_path)
    run_dir = tmp_path / "runs" / "unlinked"
    os.remove(run_dir / "latest")
    os.symlink("recovery/step-00000002.dcp", run_dir / "latest")  # where a crash before the swap leaves the link
    proc = run_train([*args, "+resume=latest"], tmp_path)
    assert "resuming from step 4 of" in proc.stdout
    assert os.readlink(run_dir / "latest") == "recovery/step-00000004.dcp"
    events = read_journal(run_dir / "journal.jsonl")
    assert any(e["event"] == "latest" and e["step"] == 4 for e in events)
