"""Loss-spike rollback end to end: real torchrun jobs on 2 gloo ranks, a real injected spike, real SIGKILLs.

The runs are made once (module fixtures) and shared by the assertions. The spike is real: `+debug.inject_spike_at=25`
multiplies step 25's lr by 1000, so the loss of step 26 explodes. With `spike.window=8` the rollback goes to the
newest rollback checkpoint at or before step 26 - 8 = 18, which is step 15, and skips the samples of steps 16-26.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curry_train.journal import read_journal
from curry_train.metrics import read_metrics
from tests.conftest import FAST, _env, kill_and_resume, popen_train, run_train

REPO = Path(__file__).resolve().parents[1]
BATCH = 8  # FAST's train.batch_size
RUN = [
    *FAST,
    "train.steps=40",
    "train.eval_every=20",
    "checkpoint.rollback_every=5",
    "checkpoint.recovery_every=20",
    "checkpoint.best_k=1",
    "spike.enabled=true",
    "spike.window=8",
    "spike.warmup_steps=10",
]
INJECT = "+debug.inject_spike_at=25"
PARAMS = ["checkpoint.rollback_contents=params", "checkpoint.recovery_every=40"]


def _script():
    spec = importlib.util.spec_from_file_location("kill_and_resume", REPO / "scripts" / "kill_and_resume.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_journal(run_dir / "journal.jsonl") if e["event"] == kind]


def losses(run_dir: Path, steps: range) -> list[float]:
    current = read_metrics(run_dir / "metrics.jsonl")
    return [current[s]["loss"] for s in steps]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rollback")


@pytest.fixture(scope="module")
def clean(root: Path) -> Path:
    """The run without an injected spike (spike detection on)."""
    run_train([*RUN, "run.id=clean"], root, nproc=2)
    return root / "runs" / "clean"


@pytest.fixture(scope="module")
def full(root: Path) -> tuple[Path, Path]:
    """The injected run (full rollbacks) straight through, and the same run SIGKILLed after its rollback (at step
    33 of the new trajectory; the spiked one reached 26) and resumed with +resume=latest."""
    (root / "kr").mkdir()
    straight, killed, out = kill_and_resume(root / "kr", [*RUN, INJECT], kill_at=33)
    assert "result: bitwise identical" in out
    return straight, killed


@pytest.fixture(scope="module")
def params(root: Path) -> tuple[Path, Path]:
    """The injected run with parameters-only rollbacks straight through, and the same run SIGKILLed once its
    rollback is saved, then resumed with +resume=latest (no full checkpoint exists at or before the target)."""
    # wandb offline on this one: the replayed steps and the rollback must reach its charts.
    run_train([*RUN, *PARAMS, INJECT, "run.id=params", "logger.wandb.mode=offline"], root, nproc=2)
    killed = root / "runs" / "params-killed"
    job = popen_train([*RUN, *PARAMS, INJECT, "run.id=params-killed"], root, nproc=2)
    deadline = time.monotonic() + 300
    try:
        while job.poll() is None and time.monotonic() < deadline:
            journal = killed / "journal.jsonl"
            kinds = [e["event"] for e in read_journal(journal)] if journal.exists() else []
            if "rollback" in kinds and "save" in kinds[kinds.index("rollback") :]:  # the target saved again
                break
            time.sleep(0.02)
    finally:
        _script().kill_tree(job.pid)
        job.communicate(timeout=60)
    assert job.returncode == -9, "the job ended before it could be killed after its rollback"
    assert max(read_metrics(killed / "metrics.jsonl")) < 40
    run_train([*RUN, *PARAMS, INJECT, "run.id=params-killed", "+resume=latest"], root, nproc=2)
    return root / "runs" / "params", killed


def test_a_run_without_a_spike_never_rolls_back(clean: Path) -> None:
    assert events(clean, "rollback") == [] and events(clean, "spike_injected") == []


def test_an_injected_spike_rolls_back_once_to_the_expected_step_and_skips_its_data(full, clean: Path) -> None:
    straight, _ = full
    injected = events(straight, "spike_injected")
    assert [e["step"] for e in injected] == [25]
    (rollback,) = events(straight, "rollback")
    assert rollback["step"] == 15 and rollback["spike_step"] == 26 and rollback["path"] == "rollback/step-00000015.dcp"
    assert rollback["skipped"] == [[15 * BATCH, 26 * BATCH]] and rollback["skipped_steps"] == 11
    assert rollback["optimizer_restored"] is True and rollback["injected"] is True
    assert rollback["loss"] > rollback["threshold"] > rollback["baseline"]
    # What the spiked trajectory saved after step 15 is set aside, newest first; `latest` never names it.
    assert [p.split("/")[1].split("-dcp")[0][:27] for p in rollback["set_aside"]] == [
        ".abandoned-step-00000025.dc",
        ".abandoned-step-00000020.dc",
        ".abandoned-step-00000020.dc",
    ]
    assert os.readlink(straight / "latest") == "recovery/step-00000040.dcp"
    # The spiked step is in metrics.jsonl, marked; the current line of each step is the new trajectory's.
    lines = [line for line in (straight / "metrics.jsonl").read_text().splitlines() if '"spike": true' in line]
    assert len(lines) == 1 and '"step": 26' in lines[0]
    assert sorted(read_metrics(straight / "metrics.jsonl")) == list(range(1, 41))
    # The run recovers: its final dev loss is close to the run that never spiked (it trained 11 steps' data less).
    final, reference = read_metrics(straight / "metrics.jsonl")[40], read_metrics(clean / "metrics.jsonl")[40]
    print(f"final dev loss: injected+rolled back {final['dev_loss']:.4f}, clean {reference['dev_loss']:.4f}")
    assert abs(final["dev_loss"] - reference["dev_loss"]) / reference["dev_loss"] < 0.05


def test_a_crash_after_a_rollback_resumes_the_new_trajectory_bitwise(full) -> None:
    straight, killed = full
    # The script compared every loss after the resume point (bitwise, above); the resume was on the new trajectory.
    (resume,) = events(killed, "resume")
    assert resume["step"] >= 20 and resume["exact"] is True
    assert len(events(killed, "rollback")) == 1  # the resumed launch did not roll back again
    assert losses(killed, range(16, 41)) == losses(straight, range(16, 41))


@pytest.fixture(scope="module")
def one_rank(full, root: Path) -> Path:
    """The injected run's step-30 checkpoint (after its rollback) resumed on one rank as a run of its own."""
    straight, _ = full
    run_train([*RUN, "run.id=one-rank", f"+resume={straight / 'rollback' / 'step-00000030.dcp'}"], root, nproc=1)
    return root / "runs" / "one-rank"


def test_a_rollback_resumed_on_one_rank_skips_the_same_samples(full, one_rank: Path) -> None:
    straight, _ = full
    pairs = zip(losses(one_rank, range(31, 41)), losses(straight, range(31, 41)), strict=True)
    worst = max(abs(a - b) / b for a, b in pairs)
    print(f"2 -> 1 ranks after a rollback: largest relative loss difference {worst:.2e} over steps 31-40")
    assert worst < 1e-4


def test_a_parameters_only_rollback_then_resume_latest_continues_the_new_trajectory(params, clean: Path) -> None:
    straight, killed = params
    (rollback,) = events(straight, "rollback")
    assert rollback["step"] == 15 and rollback["optimizer_restored"] is False and rollback["rewarmup_steps"] == 20
    (resume,) = events(killed, "resume")
    # No full checkpoint at or before step 15 remained: latest named the parameters-only target, saved again with
    # the skipped range, so the resume continued the new trajectory (never the spiked steps 16-26).
    assert resume["step"] == 15 and resume["path"] == "rollback/step-00000015.dcp" and resume["contents"] == "params"
    assert losses(killed, range(16, 41)) == losses(straight, range(16, 41))
    final, reference = read_metrics(straight / "metrics.jsonl")[40], read_metrics(clean / "metrics.jsonl")[40]
    print(f"final dev loss: params rollback {final['dev_loss']:.4f}, clean {reference['dev_loss']:.4f}")
    assert abs(final["dev_loss"] - reference["dev_loss"]) / reference["dev_loss"] < 0.05


def test_a_manual_rollback_is_done_once_and_a_requeue_continues_from_latest(one_rank: Path, root: Path) -> None:
    run_dir = one_rank
    target = run_dir / "rollback" / "step-00000035.dcp"
    command = [*RUN, "run.id=one-rank", f"+rollback_to={target}"]
    first = run_train(command, root, nproc=1)
    assert "rolling back from step 35" in first.stdout
    (rollback,) = events(run_dir, "rollback")
    assert rollback["step"] == 35 and rollback["spike_step"] == 40
    assert rollback["request"] == "rollback/step-00000035.dcp"
    assert rollback["skipped"][-1][1] - rollback["skipped"][-1][0] == 5 * BATCH  # steps 36-40's samples
    assert sorted(read_metrics(run_dir / "metrics.jsonl")) == list(range(31, 41))
    again = run_train(command, root, nproc=1)  # the same command, requeued
    assert "already rolled back to rollback/step-00000035.dcp" in again.stdout
    assert len(events(run_dir, "rollback")) == 1


def wandb_history(path: Path) -> list[dict]:
    """The rows logged to an offline wandb run: its .wandb file is a LevelDB-style log of protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, rows, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6] if left >= 7 else 0
        if left < 7 or kind == 0:  # block trailer or padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST start a record; MIDDLE, LAST continue
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_shows_the_replayed_steps_and_the_rollback(params) -> None:
    straight, _ = params
    (run_file,) = (straight / "wandb").glob("offline-run-*/*.wandb")
    rows = wandb_history(run_file)
    steps = [row["step"] for row in rows if "loss" in row]
    # Steps 1-26 (26 is the spike), then 16-40 again on the run's own x-axis: wandb would drop them on its own.
    assert steps == [*range(1, 27), *range(16, 41)]
    (event,) = [row for row in rows if "event/rollback" in row]
    assert event["step"] == 15 and event["event/rollback/spike_step"] == 26


def test_ls_shows_and_gc_removes_what_rollbacks_set_aside(full) -> None:
    straight, _ = full
    cli = [sys.executable, "-m", "curry_train.cli"]
    listing = subprocess.run([*cli, "ls", str(straight)], capture_output=True, text=True, env=_env(), check=True)
    assert "set aside by rollbacks" in listing.stdout and ".abandoned-step-00000025.dcp-" in listing.stdout
    dry = subprocess.run([*cli, "gc", str(straight)], capture_output=True, text=True, env=_env(), check=True)
    assert "dry run, nothing removed" in dry.stdout and list(straight.glob("*/.abandoned-*"))
    gone = subprocess.run([*cli, "gc", str(straight), "--yes"], capture_output=True, text=True, env=_env(), check=True)
    assert "removed 1 set-aside checkpoint(s)" in gone.stdout and not list(straight.glob("*/.abandoned-*"))
    deletes = [e for e in events(straight, "delete") if "curry-train gc" in e["reason"]]
    assert len(deletes) == 1 and ".abandoned-step-00000025" in deletes[0]["path"]
