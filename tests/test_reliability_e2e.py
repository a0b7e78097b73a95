"""The bad days, with real processes: typos, a second writer, damaged checkpoints, the wrong model, a read-only
directory, Ctrl-C, a run directory that only one node sees. One base run is made once and copied for each damage."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curry_train.journal import read_journal
from curry_train.metrics import read_metrics
from tests.conftest import FAST, _env, popen_train, run_train

REPO = Path(__file__).resolve().parents[1]
BASE = [
    *FAST,
    "train.steps=9",
    "train.eval_every=0",
    "checkpoint.recovery_every=2",
    "checkpoint.rollback_every=0",
    "checkpoint.best_k=0",
]


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_journal(run_dir / "journal.jsonl") if e["event"] == kind]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curry_train.cli", *args], capture_output=True, text=True, env=_env())


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("curry-train:")]
    assert len(lines) == 1, stderr[-3000:]
    # No traceback of curry-train's own code (torchrun prints one of its own when a worker fails).
    assert "curry_train/" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    run_train([*BASE, "run.id=base"], root)
    return root / "runs" / "base"


def copy_run(base: Path, name: str) -> Path:
    target = base.parent / name
    shutil.copytree(base, target, symlinks=True)
    return target


# --------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+checkpoint.rollbak_every=5", "did you mean checkpoint.rollback_every?"),
        ("checkpoint.rollbak_every=5", "did you mean checkpoint.rollback_every?"),
        ("run.id=../escape", "run.id: '../escape' must be one directory name"),
        ("model=huge", "model=huge: no such option; available: 1b, 7b, small, tiny"),
    ],
)
def test_config_errors_exit_2_with_one_line_and_create_nothing(tmp_path: Path, override: str, expected: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "curry_train.train", override], cwd=tmp_path, capture_output=True, text=True, env=_env()
    )
    assert proc.returncode == 2
    assert expected in one_line(proc.stderr)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ the final step


def test_the_final_step_is_saved_and_run_end_names_it(base: Path) -> None:
    # recovery_every=2 and train.steps=9: the cadence stops at step 8; save_final adds step 9.
    assert os.readlink(base / "latest") == "recovery/step-00000009.dcp"
    (end,) = events(base, "run_end")
    assert end["step"] == 9 and end["checkpoint"] == "recovery/step-00000009.dcp"


# ------------------------------------------------------------------------------------ verified resume


def _truncate_a_shard(run_dir: Path) -> str:
    shard = max((run_dir / "recovery" / "step-00000009.dcp").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return shard.name


def _remove_metadata(run_dir: Path) -> str:
    (run_dir / "recovery" / "step-00000009.dcp" / ".metadata").unlink()
    return ".metadata"


def _remove_manifest(run_dir: Path) -> str:
    (run_dir / "recovery" / "step-00000009.dcp" / "manifest.json").unlink()
    return "manifest.json"


@pytest.mark.parametrize("damage", [_truncate_a_shard, _remove_metadata, _remove_manifest])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(base: Path, damage) -> None:
    name = damage.__name__.strip("_")
    run_dir = copy_run(base, name)
    bad_file = damage(run_dir)
    verify = cli("verify", str(run_dir))
    assert verify.returncode == 1, verify.stdout
    assert "step-00000009.dcp" in verify.stdout
    # Resumed with a changed number of loader workers too: the data position is the sample cursor.
    proc = run_train([*BASE, f"run.id={name}", "+resume=latest", "data.num_workers=2"], base.parent.parent)
    assert "WARNING" in proc.stderr and "step-00000009.dcp" in proc.stderr
    if bad_file != "manifest.json":
        assert bad_file in proc.stderr
        (fallback,) = events(run_dir, "resume_fallback")
        assert fallback["path"] == "recovery/step-00000009.dcp" and fallback["fallback"] == "recovery/step-00000008.dcp"
        assert any(bad_file in problem for problem in fallback["problems"])
    else:
        assert "no manifest.json" in proc.stderr
        latest = [e for e in events(run_dir, "latest") if "not a committed checkpoint" in e["reason"]]
        assert len(latest) == 1 and latest[0]["path"] == "recovery/step-00000008.dcp"
    (resume,) = events(run_dir, "resume")
    assert resume["step"] == 8 and resume["exact"] is True
    assert read_metrics(run_dir / "metrics.jsonl")[9]["loss"] == read_metrics(base / "metrics.jsonl")[9]["loss"]


def test_a_checkpoint_of_another_model_fails_in_one_line_and_leaves_nothing(base: Path) -> None:
    root = base.parent.parent
    checkpoint = base / "recovery" / "step-00000008.dcp"
    proc = run_train([*BASE, "model=small", "run.id=wrong-model", f"+resume={checkpoint}"], root, check=False)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "does not fit this model: tok_embeddings.weight is [256, 128] in the checkpoint and [256, 768] here" in line
    assert not (root / "runs" / "wrong-model").exists()


def test_an_unwritable_run_root_is_one_line(tmp_path: Path) -> None:
    locked = tmp_path / "readonly"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        if os.geteuid() == 0:
            pytest.skip("this filesystem has no immutable attribute and root ignores permission bits")
        locked.chmod(0o555)
    try:
        proc = run_train([*BASE, f"run.root={locked}", "run.id=x"], tmp_path, check=False)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o755)
    assert proc.returncode == 2
    assert f"cannot write the run directory {locked / 'x'}" in one_line(proc.stderr)


# ----------------------------------------------------------------------------------------- one writer


def _wait_for_steps(metrics: Path, n: int, job: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        if metrics.exists() and len(read_metrics(metrics)) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the job logged fewer than {n} steps (exit {job.poll()})")


def test_a_second_launch_is_refused_and_a_dead_holder_does_not_block(tmp_path: Path) -> None:
    args = [*FAST, "train.steps=400", "train.eval_every=0", "checkpoint.recovery_every=2", "run.id=busy"]
    job = popen_train(args, tmp_path)
    try:
        _wait_for_steps(tmp_path / "runs" / "busy" / "metrics.jsonl", 3, job)
        second = run_train([*args, "+resume=latest"], tmp_path, check=False)
        assert second.returncode == 2
        assert f"is in use by another launch (host {os.uname().nodename}, pid {job.pid}" in one_line(second.stderr)
    finally:
        job.kill()  # SIGKILL: the holder dies without releasing anything itself
        job.communicate(timeout=60)
    # The kernel dropped the dead holder's lock: the resume goes ahead (and stops at once: 4 steps are done).
    resumed = run_train([*args[:-2], "train.steps=4", "run.id=busy", "+resume=latest"], tmp_path)
    assert "in use" not in resumed.stderr and "already finished" in resumed.stdout


# ------------------------------------------------------------------------------------------ a full disk


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_during_a_save_stops_every_rank_and_loses_nothing(tmp_path: Path, async_save: bool) -> None:
    """Rank 1 runs out of space while it writes step 8's shard (`+debug.fail_save_at`: an OSError(ENOSPC) where
    the bytes are written): both ranks stop, one line says so, step 4 and `latest` are intact, the journal has it,
    and the next start clears the half-written save and continues."""
    args = [
        *FAST,
        "train.steps=12",
        "train.eval_every=0",
        "checkpoint.recovery_every=4",
        "checkpoint.rollback_every=0",
        "checkpoint.best_k=0",
        f"checkpoint.async_save={str(async_save).lower()}",
        "run.id=full",
    ]
    proc = run_train([*args, "+debug.fail_save_at=8", "+debug.fail_save_rank=1"], tmp_path, nproc=2, check=False)
    assert proc.returncode != 0
    line = one_line(proc.stderr)
    assert line.startswith("curry-train: rank 1 failed: OSError: [Errno 28] could not write recovery/step-00000008.dcp")
    assert "the checkpoints committed before it and `latest` are intact" in line
    assert "traceback in" in line and (tmp_path / "runs" / "full" / "failures.log").exists()
    run_dir = tmp_path / "runs" / "full"
    listing = cli("ls", str(run_dir)).stdout
    assert "recovery/step-00000004.dcp" in listing and "step-00000008" not in listing
    assert os.readlink(run_dir / "latest") == "recovery/step-00000004.dcp"
    errors = events(run_dir, "error")
    assert any(e.get("path") == "recovery/step-00000008.dcp" and "No space left" in e["reason"] for e in errors)
    assert any(e.get("rank") == 1 for e in errors)
    run_train([*args, "+resume=latest"], tmp_path, nproc=2)
    assert any(
        e["event"] == "delete" and ".tmp-step-00000008" in e["path"] for e in read_journal(run_dir / "journal.jsonl")
    )
    assert os.readlink(run_dir / "latest") == "recovery/step-00000012.dcp"


# -------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_saves_and_stops(tmp_path: Path) -> None:
    """Ctrl-C signals the terminal's whole foreground process group: the data loader's workers get SIGINT too."""
    args = [*FAST, "train.steps=400", "train.eval_every=0", "checkpoint.recovery_every=0", "checkpoint.best_k=0"]
    job = popen_train([*args, "data.num_workers=2", "run.id=interrupted"], tmp_path)
    run_dir = tmp_path / "runs" / "interrupted"
    _wait_for_steps(run_dir / "metrics.jsonl", 3, job)
    os.killpg(job.pid, signal.SIGINT)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 0, out[-3000:]
    assert "SIGINT received: saved step" in out and "KeyboardInterrupt" not in out
    (preempt,) = events(run_dir, "preempt")
    assert preempt["signal"] == "SIGINT"
    assert os.readlink(run_dir / "latest").endswith(f"/step-{preempt['step']:08d}.dcp")


# ----------------------------------------------------------------------------------- a dead launcher


def test_workers_die_with_their_launcher(tmp_path: Path) -> None:
    """torchrun starts its workers in sessions of their own: a SIGKILL of torchrun alone must not leave them
    training (they ask the kernel for SIGKILL when their parent dies)."""
    from curry_train.launcher import alive, process_tree

    args = [*FAST, "train.steps=400", "train.eval_every=0", "checkpoint.recovery_every=0", "run.id=orphans"]
    job = popen_train(args, tmp_path, nproc=2)
    try:
        _wait_for_steps(tmp_path / "runs" / "orphans" / "metrics.jsonl", 2, job)
        workers = [pid for pid in process_tree(job.pid) if pid != job.pid]
        assert len(workers) >= 2
        job.kill()  # torchrun alone, not its process tree
        job.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and [pid for pid in workers if alive(pid)]:
            time.sleep(0.05)
        assert not [pid for pid in workers if alive(pid)], "workers outlived their launcher"
    finally:
        for pid in process_tree(job.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ a run root not shared


PROBE = """
import os, sys
from pathlib import Path
from types import SimpleNamespace
import torch.distributed as dist
from curry_train.config import ConfigError
from curry_train.run import check_shared

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
# Each rank's own "runs" folder, as on two nodes whose run.root is a local path.
run_dir = Path(sys.argv[3]) / f"node{rank}" / "runs" / "r"
run_dir.mkdir(parents=True)
env = SimpleNamespace(world_size=2, is_main=rank == 0, checkpoint_group=dist.group.WORLD)
try:
    check_shared(run_dir, env)
    print("shared")
except ConfigError as err:
    print(err)
"""


def test_a_run_root_that_is_not_shared_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE, str(rank), str(store), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for out in outs:
        assert "run.root: rank 1 on" in out and "does not see the run directory" in out, outs
    assert not list((tmp_path / "node0" / "runs" / "r").glob(".probe-*"))


def test_a_commit_refuses_files_rank_0_cannot_see_or_no_rank_reported(tmp_path: Path) -> None:
    """What rank 0 commits is what the ranks reported writing, checked against what it sees and what DCP's
    .metadata references (a run.root that is not shared would commit a checkpoint without other nodes' shards)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from curry_train.checkpoint.io import check_reported

    staging = tmp_path / ".tmp-step-00000001.dcp"
    dcp.save({"w": torch.arange(8.0)}, checkpoint_id=str(staging), no_dist=True)
    shards = {p.name: None for p in staging.glob("*.distcp")}
    assert shards
    check_reported(staging, shards)  # consistent: nothing raised
    with pytest.raises(RuntimeError, match="rank 0 does not see __1_0.distcp"):
        check_reported(staging, {**shards, "__1_0.distcp": None})
    with pytest.raises(RuntimeError, match="which no rank reported writing"):
        check_reported(staging, {})
