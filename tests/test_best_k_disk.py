"""End to end: best-K checkpoints hold parameters only on disk, the size the plan promises, even at steps with a full
save whose checkpoints later rotate away; the data position lives under `dataloader`, and checkpoints written
before that key existed (the cursor in `progress`) still resume."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from curry_train.checkpoint.policy import Checkpoint, Contents, Role
from curry_train.checkpoint.store import RunDir
from curry_train.cli import main
from curry_train.export import export
from curry_train.journal import read_journal
from tests.conftest import FAST, only_run_dir, run_train

# Evaluations on the cadence steps 2, 4, 6, 8, each a full save (rollback, and recovery at 4 and 8); one of each
# role kept, so the full saves a best-K shares a step with rotate away while the best-K stays.
SETTINGS = [
    "model=tiny",
    "train.steps=8",
    "train.eval_every=2",
    "checkpoint.rollback_every=2",
    "checkpoint.recovery_every=4",
    "checkpoint.retention.rollback_keep=1",
    "checkpoint.retention.recovery_keep=1",
    "checkpoint.best_k=3",
]
BATCH = 8  # FAST's train.batch_size


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("best-k-disk")
    run_train([*FAST, *SETTINGS], cwd, nproc=2)
    return only_run_dir(cwd / "runs")


def top_keys(path: Path) -> set[str]:
    """The top-level keys of a DCP checkpoint, from its `.metadata` (PyTorch's own reader)."""
    return {fqn.split(".", 1)[0] for fqn in FileSystemReader(str(path)).read_metadata().state_dict_metadata}


def disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _dirs, files in os.walk(path) for f in files)


def load_all(path: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{path.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def test_best_k_holds_parameters_only_and_the_planned_size_after_its_step_rotates_away(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = RunDir(run_dir)
    best = store.list(Role.BEST_K)
    assert len(best) == 3
    events = read_journal(run_dir / "journal.jsonl")
    sources = {
        e["step"]: e.get("params_of") or e.get("linked_from")
        for e in events
        if e["event"] == "save" and e["role"] == "best_k"
    }
    # Every best-K shares its step with a full save; those of steps 2, 4 and 6 are gone (keep 1 of each role).
    rotated = [c for c in best if sources[c.step] and not (run_dir / sources[c.step]).exists()]
    assert rotated, f"no best-K outlived the full save of its step: {sources}"

    assert main(["plan", "--json", "--world-size", "2", *FAST, *SETTINGS, f"run.root={run_dir.parent}"]) == 0
    planned = json.loads(capsys.readouterr().out)["bytes_per_checkpoint"]
    full = disk_bytes(store.path_of(Checkpoint(Role.RECOVERY, 8)))
    for ckpt in best:
        path = store.path_of(ckpt)
        assert top_keys(path) == {"model", "progress", "dataloader"}, f"{ckpt.relpath} holds more than parameters"
        assert store.manifest(ckpt).contents is Contents.PARAMS and store.manifest(ckpt).linked_from is None
        assert all((path / name).stat().st_nlink == 1 for name in store.manifest(ckpt).files)
        size = disk_bytes(path)
        assert math.isclose(size, planned["best_k"], rel_tol=0.01), (ckpt.relpath, size, planned)
        assert size < full / 2, (size, full)
        assert store.verify(ckpt) == []
    assert math.isclose(full, planned["recovery"], rel_tol=0.01), (full, planned)

    # The parameters are the step's, bitwise: those of the full save whose staged copy they were written from.
    newest = max(best, key=lambda c: c.step)
    assert newest.step == 8
    params = load_all(store.path_of(newest), tmp_path)
    recovery = load_all(store.path_of(Checkpoint(Role.RECOVERY, 8)), tmp_path)
    assert params["model"].keys() == recovery["model"].keys()
    assert all(torch.equal(params["model"][k], recovery["model"][k]) for k in params["model"])
    assert params["dataloader"] == recovery["dataloader"] == {"cursor": 8 * BATCH, "skipped": "[]"}
    assert params["progress"]["step"] == 8


def test_every_checkpoint_holds_the_data_position_under_dataloader(run_dir: Path) -> None:
    store = RunDir(run_dir)
    for ckpt in store.list():
        path = store.path_of(ckpt)
        assert "dataloader" in top_keys(path), ckpt.relpath
        # The manifest repeats it for tools that do not read DCP.
        assert store.manifest(ckpt).cursor == ckpt.step * BATCH
        assert store.manifest(ckpt).skipped == []


def rewrite_as_before_dataloader(store: RunDir, ckpt: Checkpoint, skipped: list[list[int]], tmp_path: Path) -> None:
    """`ckpt` rewritten in the layout of checkpoints saved before `dataloader` existed (the cursor in `progress`,
    the skipped ranges in its history), and committed again under its name."""
    path = store.path_of(ckpt)
    state = load_all(path, tmp_path)
    data = state.pop("dataloader")
    progress = state["progress"]
    history = {"skipped": skipped, **json.loads(progress["history"])}
    state["progress"] = {
        "step": progress["step"],
        "cursor": data["cursor"],
        "world_size": progress["world_size"],
        "history": json.dumps(history),
    }
    extra = {**store.manifest(ckpt).extra, "skipped": skipped}
    staging = store.staging_dir(ckpt)
    dcp.save(state, storage_writer=FileSystemWriter(staging), no_dist=True)
    store.commit(ckpt, staging, extra=extra)
    assert "dataloader" not in top_keys(path) and "cursor" in load_all(path, tmp_path)["progress"]


def make_full_best_k(store: RunDir, ckpt: Checkpoint) -> None:
    """What earlier versions left at a step with a full save: a best-K made of hard links of that save."""
    source = Checkpoint(Role.RECOVERY, ckpt.step)
    store.delete(ckpt)
    store.link(source, ckpt)
    assert "optim" in top_keys(store.path_of(ckpt))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the rewrite is one process's dcp.save
def test_a_checkpoint_from_before_dataloader_resumes_and_old_full_best_k_keep_working(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, old, symlinks=True)
    store = RunDir(old)
    # A skipped range the old layout kept in progress's history (as a rollback would have left it).
    skipped = [[40, 48]]
    rewrite_as_before_dataloader(store, Checkpoint(Role.RECOVERY, 8), skipped, tmp_path)
    # The best of the three (dev loss falls): the run's evaluation at step 10 evicts another one.
    full_best = min(store.list(Role.BEST_K), key=lambda c: c.metric or 0.0)
    assert full_best.step == 8
    make_full_best_k(store, full_best)

    run_train([*FAST, *SETTINGS, "train.steps=10", f"run.id={old.name}", "+resume=latest"], tmp_path, nproc=2)
    events = read_journal(old / "journal.jsonl")
    resume = next(e for e in events if e["event"] == "resume")
    # Exact: the fidelity check compared the next batch the checkpoint recorded with the one its cursor names.
    assert resume["step"] == 8 and resume["path"] == "recovery/step-00000008.dcp" and resume["exact"] is True
    latest = store.latest()
    assert latest is not None and latest.step == 10
    after = load_all(store.path_of(latest), tmp_path)
    assert after["dataloader"] == {"cursor": 10 * BATCH, "skipped": json.dumps(skipped)}
    assert "cursor" not in after["progress"]

    # The full best-K of an earlier version: ranked with the new ones by retention, listed, verified, reported and
    # exported.
    assert [c.step for c in store.list(Role.BEST_K)] == [6, 8, 10]
    assert any(e["event"] == "delete" and e["path"].startswith("best-k/") and e["step"] == 4 for e in events)
    capsys.readouterr()
    assert main(["ls", str(old)]) == 0 and main(["verify", str(old)]) == 0 and main(["status", str(old)]) == 0
    assert full_best.relpath in capsys.readouterr().out
    out = export(store.path_of(full_best), tmp_path / "best.safetensors")
    assert out.tensors == len(load_all(store.path_of(full_best), tmp_path)["model"])
