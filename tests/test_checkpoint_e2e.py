"""End to end: real torchrun jobs on CPU write the checkpoints the policy promises, and nothing else."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from curry_train.checkpoint.policy import Checkpoint, Role
from curry_train.checkpoint.store import RunDir
from curry_train.journal import read_journal
from curry_train.metrics import read_metrics
from tests.conftest import FAST, only_run_dir, popen_train, run_train

CADENCES = [
    "train.steps=12",
    "train.eval_every=3",
    "checkpoint.rollback_every=2",
    "checkpoint.recovery_every=4",
    "checkpoint.best_k=2",
    "checkpoint.retention.rollback_keep=2",
    "checkpoint.retention.recovery_keep=2",
    "data.num_workers=2",
]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("cadences")
    run_train([*FAST, *CADENCES], cwd, nproc=2)
    return only_run_dir(cwd / "runs")


def dcp_keys(path: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{path.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def test_directories_hold_exactly_the_expected_checkpoints(two_rank_run: Path) -> None:
    store = RunDir(two_rank_run)
    steps = {role: sorted(c.step for c in store.list(role)) for role in Role}
    assert steps[Role.ROLLBACK] == [10, 12]
    assert steps[Role.RECOVERY] == [8, 12]
    # best-K: the two lowest dev losses among the evaluations at steps 3, 6, 9, 12.
    dev = {s: m["dev_loss"] for s, m in read_metrics(two_rank_run / "metrics.jsonl").items() if "dev_loss" in m}
    assert sorted(dev) == [3, 6, 9, 12]
    best_two = sorted(sorted(dev, key=lambda s: (round(dev[s], 4), s))[:2])
    assert steps[Role.BEST_K] == best_two
    assert os.readlink(two_rank_run / "latest") == "recovery/step-00000012.dcp"
    leftovers = [p for p in two_rank_run.rglob("*") if p.name.startswith((".tmp-", ".trash-"))]
    assert leftovers == []
    for ckpt in store.list():
        assert store.verify(ckpt) == [], ckpt


def test_step_due_in_two_roles_is_written_once_and_hard_linked(two_rank_run: Path) -> None:
    store = RunDir(two_rank_run)
    a = store.path_of(Checkpoint(Role.RECOVERY, 12))
    b = store.path_of(Checkpoint(Role.ROLLBACK, 12))
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        assert (a / name).stat().st_ino == (b / name).stat().st_ino


def test_journal_lists_every_save_and_delete(two_rank_run: Path) -> None:
    events = read_journal(two_rank_run / "journal.jsonl")
    saves = {(e["role"], e["step"]) for e in events if e["event"] == "save"}
    expected_cadence = {("rollback", s) for s in range(2, 13, 2)} | {("recovery", s) for s in (4, 8, 12)}
    assert expected_cadence <= saves
    deletes = {(e["role"], e["step"]) for e in events if e["event"] == "delete"}
    assert {("rollback", s) for s in (2, 4, 6, 8)} <= deletes
    assert ("recovery", 4) in deletes
    # What is on disk is exactly what was saved and not deleted.
    on_disk = {(c.role.value, c.step) for c in RunDir(two_rank_run).list()}
    assert on_disk == saves - deletes
    for e in events:
        if e["event"] == "save":
            assert e["bytes"] > 0 and e["seconds"] >= 0 and e["path"].endswith(".dcp")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and "policy" in kinds and kinds[-1] == "run_end"


def test_checkpoints_load_with_pytorchs_own_tools(two_rank_run: Path, tmp_path: Path) -> None:
    store = RunDir(two_rank_run)
    recovery = dcp_keys(store.path_of(store.list(Role.RECOVERY)[-1]), tmp_path)
    assert {"model", "optim", "progress", "dataloader", "scheduler", "rng"} <= set(recovery)
    assert set(recovery["rng"]) == {"rank0", "rank1"}  # each rank's RNG states, kept apart
    # The data position is the global sample cursor (the same on every rank and world size) and the skipped
    # ranges, under `dataloader` alone; the manifest repeats it for tools.
    assert recovery["dataloader"]["cursor"] == recovery["progress"]["step"] * 8
    assert json.loads(recovery["dataloader"]["skipped"]) == []
    assert "cursor" not in recovery["progress"] and "skipped" not in json.loads(recovery["progress"]["history"])
    assert recovery["progress"]["step"] == 12
    assert store.manifest(store.list(Role.RECOVERY)[-1]).cursor == 12 * 8
    assert "layers.0.attention.wq.weight" in recovery["model"]
    rollback = dcp_keys(store.path_of(store.list(Role.ROLLBACK)[0]), tmp_path)
    assert {"model", "optim", "rng"} <= set(rollback)
    best = dcp_keys(store.path_of(store.list(Role.BEST_K)[0]), tmp_path)
    assert set(best) == {"model", "progress", "dataloader"}, "a best-K checkpoint holds parameters only"


def test_metrics_have_a_line_per_step_and_loss_falls(two_rank_run: Path) -> None:
    metrics = read_metrics(two_rank_run / "metrics.jsonl")
    assert sorted(metrics) == list(range(1, 13))
    for m in metrics.values():
        assert isinstance(m["loss"], float) and isinstance(m["lr"], float)
    assert metrics[12]["loss"] < metrics[1]["loss"] - 0.5


def test_parameters_only_rollback(tmp_path: Path) -> None:
    run_train(
        [
            *FAST,
            "train.steps=4",
            "train.eval_every=0",
            "checkpoint.rollback_every=1",
            "checkpoint.recovery_every=0",
            "checkpoint.rollback_contents=params",
        ],
        tmp_path,
    )
    run_dir = only_run_dir(tmp_path / "runs")
    store = RunDir(run_dir)
    assert [c.step for c in store.list(Role.ROLLBACK)] == [1, 2, 3, 4]
    keys = dcp_keys(store.path_of(store.list(Role.ROLLBACK)[-1]), tmp_path)
    assert set(keys) == {"model", "progress", "dataloader"}
    # `latest` never points at a parameters-only checkpoint: only at the full one checkpoint.save_final adds at
    # the last step (a recovery checkpoint: retention leaves the disabled role alone).
    assert os.readlink(run_dir / "latest") == "recovery/step-00000004.dcp"
    assert set(dcp_keys(store.path_of(store.list(Role.RECOVERY)[-1]), tmp_path)) >= {"model", "optim", "rng"}


def test_kill_during_save_keeps_previous_checkpoints_and_latest(tmp_path: Path) -> None:
    # A 3-layer model=small makes a full checkpoint of ~0.26 GB: the save lasts long enough to be killed midway.
    args = [
        "model=small",
        "model.n_layers=3",
        *FAST,
        "train.steps=3",
        "train.eval_every=0",
        "checkpoint.rollback_every=1",
        "checkpoint.recovery_every=0",
        "checkpoint.best_k=0",
    ]
    job = popen_train(args, tmp_path)
    staging = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and job.poll() is None:
            runs = tmp_path / "runs"
            found = list(runs.glob("*/rollback/.tmp-step-00000002.dcp/*")) if runs.exists() else []
            if any(p.stat().st_size > 0 for p in found if p.is_file()):
                staging = found[0].parent
                break
            time.sleep(0.005)
        assert staging is not None, "the second save never started"
        os.killpg(job.pid, signal.SIGKILL)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    run_dir = only_run_dir(tmp_path / "runs")
    store = RunDir(run_dir)
    assert [c.step for c in store.list()] == [1], "the interrupted save must not be listed"
    assert store.latest() == Checkpoint(Role.ROLLBACK, 1)
    assert store.verify(Checkpoint(Role.ROLLBACK, 1)) == []
    events = read_journal(run_dir / "journal.jsonl")
    assert [e["step"] for e in events if e["event"] == "save"] == [1]
    # The next start (a resume) removes the leftover and continues from the committed checkpoint.
    run_train([*args, "+resume=latest"], tmp_path)
    assert not staging.exists()
    assert [c.step for c in store.list()] == [1, 2, 3]
    events = read_journal(run_dir / "journal.jsonl")
    assert any(e["event"] == "delete" and ".tmp-step-00000002.dcp" in e.get("path", "") for e in events)
    assert [e["step"] for e in events if e["event"] == "resume"] == [1]


def test_journal_command_prints_events(two_rank_run: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "curry_train.cli", "journal", str(two_rank_run)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any("save" in line and "recovery/step-00000012.dcp" in line for line in lines)
    assert any("delete" in line and "rollback/step-00000002.dcp" in line for line in lines)
    assert len(lines) >= len(read_journal(two_rank_run / "journal.jsonl"))


def test_policy_block_printed_and_journaled(two_rank_run: Path) -> None:
    policy = [e for e in read_journal(two_rank_run / "journal.jsonl") if e["event"] == "policy"][0]
    assert policy["roles"]["rollback"]["every"] == 2 and policy["roles"]["recovery"]["keep"] == 2
    assert policy["committed_bytes"] > 0
    json.dumps(policy)


def test_best_k_at_a_full_save_step_is_written_from_that_save_not_linked(two_rank_run: Path) -> None:
    # Evaluations at 3, 6, 9, 12 and full rollback saves at every even step: best-K at 6 and 12 write the parameters
    # of the step's save (its staged copy), never hard links of its full state.
    events = read_journal(two_rank_run / "journal.jsonl")
    admitted = [e["step"] for e in events if e["event"] == "best_k"]
    best_saves = {e["step"]: e for e in events if e["event"] == "save" and e["role"] == "best_k"}
    at_cadence = [s for s in admitted if s % 2 == 0]
    assert at_cadence, f"no best-K admission at a cadence step: {admitted}"
    for step in admitted:
        assert "linked_from" not in best_saves[step] and best_saves[step]["contents"] == "params", best_saves[step]
        if step % 2 == 0:
            assert best_saves[step]["params_of"].endswith(f"step-{step:08d}.dcp"), best_saves[step]
    store = RunDir(two_rank_run)
    for ckpt in store.list(Role.BEST_K):
        assert store.manifest(ckpt).linked_from is None
        for name in store.manifest(ckpt).files:
            assert (store.path_of(ckpt) / name).stat().st_nlink == 1, f"{ckpt.relpath}/{name} is shared"


def test_default_saves_are_asynchronous_and_journal_their_cost(two_rank_run: Path) -> None:
    # A best-K written from a full save's staged copy (`params_of`) is part of that save and of its cost.
    saves = [
        e
        for e in read_journal(two_rank_run / "journal.jsonl")
        if e["event"] == "save" and "linked_from" not in e and "params_of" not in e
    ]
    assert saves and all(e["mode"] == "async" for e in saves)
    assert all(0 <= e["blocking_seconds"] <= e["seconds"] for e in saves)
    # The first save has no step without a save before it to compare with; later ones report what they cost (an
    # estimate from the steps around them, which those steps' own noise can put a little below the blocked time).
    assert all(isinstance(e["cost_seconds"], float) for e in saves[1:])


def test_sync_saves_commit_the_same_checkpoints(tmp_path: Path, two_rank_run: Path) -> None:
    run_train([*FAST, *CADENCES, "checkpoint.async_save=false"], tmp_path, nproc=2)
    run_dir = only_run_dir(tmp_path / "runs")
    async_store, sync_store = RunDir(two_rank_run), RunDir(run_dir)
    assert [(c.role, c.step) for c in sync_store.list()] == [(c.role, c.step) for c in async_store.list()]
    assert os.readlink(run_dir / "latest") == "recovery/step-00000012.dcp"
    for ckpt in sync_store.list():
        assert sync_store.verify(ckpt) == []
    saves = [
        e
        for e in read_journal(run_dir / "journal.jsonl")
        if e["event"] == "save" and "linked_from" not in e and "params_of" not in e
    ]
    assert saves and all(e["mode"] == "sync" and e["writer"] == "thread" for e in saves)
    assert all(0 <= e["blocking_seconds"] <= e["seconds"] for e in saves)
    # A synchronous save costs training exactly the time it blocks.
    assert all(e["cost_seconds"] == e["blocking_seconds"] for e in saves)
    assert not [p for p in run_dir.rglob(".tmp-*")]
