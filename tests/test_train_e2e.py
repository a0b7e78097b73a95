"""The entry point as users launch it: torchrun with 2 ranks on CPU, wandb offline, and a single process."""

from __future__ import annotations

from pathlib import Path

from curry_train.journal import read_journal
from curry_train.metrics import read_metrics
from tests.conftest import only_run_dir, run_train


def test_torchrun_two_ranks_fifty_steps_with_wandb_offline(tmp_path: Path) -> None:
    """The issue's command, `torchrun --standalone --nproc_per_node=2 -m curry_train.train train.steps=50`, with a
    smaller corpus and batch so it fits the test budget; wandb stays in its default offline mode."""
    proc = run_train(
        [
            "train.steps=50",
            "data.max_bytes=2000000",
            "data.seq_len=64",
            "train.batch_size=8",
            "data.num_workers=2",
            "train.eval_every=25",
        ],
        tmp_path,
        nproc=2,
        timeout=400,
    )
    run_dir = only_run_dir(tmp_path / "runs")
    assert "918,656 parameters" in proc.stdout and "world size 2" in proc.stdout
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(metrics) == list(range(1, 51))
    assert metrics[50]["loss"] < metrics[1]["loss"] - 1.5, (metrics[1]["loss"], metrics[50]["loss"])
    assert metrics[50]["dev_loss"] < metrics[25]["dev_loss"]
    assert all(m["tokens_per_s"] > 0 for m in metrics.values())
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].glob("*.wandb"))
    events = [e["event"] for e in read_journal(run_dir / "journal.jsonl")]
    assert events[0] == "run_start" and events[-1] == "run_end"


def test_single_process_with_grad_accumulation(tmp_path: Path) -> None:
    """`python -m curry_train.train` needs no torchrun; accumulating 2 micro-batches of 4 equals a batch of 8."""
    common = [
        "logger.wandb.mode=disabled",
        "data.max_bytes=2000000",
        "data.seq_len=64",
        "train.batch_size=8",
        "train.steps=3",
        "train.eval_every=0",
        "checkpoint.rollback_every=0",
        "checkpoint.recovery_every=0",
    ]
    run_train([*common, "train.grad_accum=2", "run.id=accum"], tmp_path)
    run_train([*common, "run.id=whole"], tmp_path)
    accum = read_metrics(tmp_path / "runs" / "accum" / "metrics.jsonl")
    whole = read_metrics(tmp_path / "runs" / "whole" / "metrics.jsonl")
    for step in (1, 2, 3):
        assert abs(accum[step]["loss"] - whole[step]["loss"]) < 1e-4 * whole[step]["loss"]


def test_training_refuses_to_start_when_the_policy_does_not_fit(tmp_path: Path) -> None:
    too_much = [
        "logger.wandb.mode=disabled",
        "checkpoint.rollback_every=1",
        "checkpoint.retention.rollback_keep=100000000",
    ]
    # ~1.1 PB of tiny checkpoints: the plan keeps no more than a run makes, so the run must be long enough to make them.
    proc = run_train([*too_much, "train.steps=100000000"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "checkpoint.check_storage" in proc.stderr and "does not fit" in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists(), "a refused run leaves nothing behind"
    # The user can override the check knowingly.
    proc = run_train(
        [
            *too_much,
            "checkpoint.check_storage=false",
            "train.steps=1",
            "train.eval_every=0",
            "data.max_bytes=2000000",
            "data.seq_len=64",
            "train.batch_size=8",
        ],
        tmp_path,
    )
    assert "WARNING" in proc.stdout
