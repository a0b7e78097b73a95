"""Nodes without a shared filesystem: two torchrun "nodes" (one process each, on this machine) in separate working
directories, so each has its own `run.root`, with `checkpoint.remote` on moto's S3 server. Checkpoints are
committed on the remote only; a killed run resumes from it bitwise, and so does a relaunch after both local run
directories were deleted. One launch sequence, shared by the assertions."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from curry_train.checkpoint.manifest import MANIFEST
from curry_train.checkpoint.store import RunDir
from curry_train.journal import read_journal
from curry_train.launcher import kill_tree
from curry_train.metrics import read_metrics
from tests.conftest import FAST, _env, assert_replays_bitwise
from tests.test_node_loss import node

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from tests.test_remote import BUCKET, free_port, moto_serving  # noqa: E402 (after the skips: it needs moto)

BASE = [
    *FAST,
    "train.eval_every=0",
    "checkpoint.best_k=0",
    "checkpoint.rollback_every=0",
    "checkpoint.recovery_every=4",
    f"checkpoint.remote=s3://{BUCKET}/runs",
    "scheduler.name=constant",  # the lr does not depend on train.steps: the relaunch runs more steps
]


def test_what_node_local_mode_cannot_do_is_refused_naming_the_key() -> None:
    from omegaconf import OmegaConf

    from curry_train.checkpoint.node_local import refusal
    from curry_train.config import Config, Launch
    from tests.conftest import compose_config

    def why(overrides: list[str], launch: Launch | None = None) -> str | None:
        cfg = OmegaConf.to_object(compose_config([*BASE, *overrides]))
        assert isinstance(cfg, Config)
        return refusal(cfg, launch or Launch(resume="latest"))

    assert why([]) is None
    assert "checkpoint.best_k must be 0" in (why(["checkpoint.best_k=3"]) or "")
    assert "checkpoint.rollback_every" in (why(["checkpoint.rollback_every=2"]) or "")
    assert why(["checkpoint.rollback_every=2", "checkpoint.remote_roles=[rollback,recovery]"]) is None
    assert "spike.enabled" in (why(["spike.enabled=true"]) or "")
    assert "+resume=PATH" in (why([], Launch(resume="runs/x/recovery/step-00000004.dcp")) or "")
    assert "+rollback_to" in (why([], Launch(rollback_to="recovery/step-00000004.dcp")) or "")


def launch(cwds: list[Path], args: list[str], env: dict[str, str]) -> list[subprocess.Popen]:
    port = free_port()
    return [node(rank, "127.0.0.1", port, args, cwds[rank], env=env) for rank in (0, 1)]


def wait_all(jobs: list[subprocess.Popen], cwds: list[Path], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    try:
        for job in jobs:
            job.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for job in jobs:
            if job.poll() is None:
                kill_tree(job.pid)
                job.wait(timeout=30)
    logs = [(cwd / f"node{rank}.log").read_text() for rank, cwd in enumerate(cwds)]
    assert [job.returncode for job in jobs] == [0, 0], "\n".join(log[-3000:] for log in logs)


def journal(run_dir: Path) -> list[dict]:
    path = run_dir / "journal.jsonl"
    return read_journal(path) if path.exists() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """A straight 16-step run; a run killed after its step-8 save and relaunched to step 12; then, with both nodes'
    run directories deleted, relaunched to step 16."""
    root = tmp_path_factory.mktemp("node-local")
    cwds = [root / "n0", root / "n1"]
    for cwd in cwds:
        cwd.mkdir()
    with pytest.MonkeyPatch.context() as patch, moto_serving(patch) as server:
        env = _env()
        wait_all(launch(cwds, [*BASE, "train.steps=16", "run.id=straight"], env), cwds)
        straight = [cwd / "runs" / "straight" for cwd in cwds]
        kept = {"straight": [journal(straight[0]), read_metrics(straight[0] / "metrics.jsonl")]}

        args = [*BASE, "run.id=cut"]
        cut = [cwd / "runs" / "cut" for cwd in cwds]
        jobs = launch(cwds, [*args, "train.steps=12"], env)
        committed = lambda: any(e["event"] == "save" and e["step"] == 8 for e in journal(cut[0]))  # noqa: E731
        deadline = time.monotonic() + 240
        while not committed():
            assert all(j.poll() is None for j in jobs) and time.monotonic() < deadline, "no step-8 save"
            time.sleep(0.1)
        for job in jobs:
            kill_tree(job.pid)
            job.wait(timeout=30)
        wait_all(launch(cwds, [*args, "train.steps=12", "+resume=latest"], env), cwds)
        kept["cut"] = [journal(cut[0]), read_metrics(cut[0] / "metrics.jsonl")]
        replayed = assert_replays_bitwise(cut[0])
        # Once more, finished already: each node fetches step 12 and drops its copy of step 8 fetched before.
        held = [[c.relpath for c in RunDir(path).list()] for path in cut]
        wait_all(launch(cwds, [*args, "train.steps=12", "+resume=latest"], env), cwds)
        kept["copies"] = [held, [[c.relpath for c in RunDir(path).list()] for path in cut], journal(cut[0])]
        for path in cut:
            shutil.rmtree(path)
        wait_all(launch(cwds, [*args, "train.steps=16", "+resume=latest"], env), cwds)
        yield {"root": root, "cwds": cwds, "kept": kept, "replayed": replayed, "cut": cut, "fs": server.fs()}


def test_checkpoints_are_committed_on_the_remote_only(runs) -> None:
    events, _ = runs["kept"]["straight"]
    modes = [e for e in events if e["event"] == "node_local"]
    assert modes and modes[0]["nodes"] == 2, events
    saves = [e for e in events if e["event"] == "save"]
    assert [e["step"] for e in saves] == [4, 8, 12, 16] and all(e["committed"] == "remote" for e in saves), saves
    fs = runs["fs"]
    prefix = f"{BUCKET}/runs/straight"
    assert fs.cat_file(f"{prefix}/latest") == b"recovery/step-00000016.dcp"
    manifest = json.loads(fs.cat_file(f"{prefix}/recovery/step-00000016.dcp/{MANIFEST}"))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest["files"]), manifest["files"]
    assert manifest["extra"]["world_size"] == 2
    assert not fs.exists(f"{prefix}/recovery/step-00000004.dcp")  # the remote retention: recovery_keep=3
    for cwd in runs["cwds"]:
        run_dir = cwd / "runs" / "straight"
        assert RunDir(run_dir).list() == [], run_dir  # no node commits locally
        assert not (run_dir / ".uploads").exists() or not any((run_dir / ".uploads").rglob("*.distcp"))
    assert not (runs["cwds"][1] / "runs" / "straight" / "journal.jsonl").exists()  # rank 0's node keeps the journal


def test_a_killed_run_resumes_from_the_remote_bitwise(runs) -> None:
    _, straight = runs["kept"]["straight"]
    events, metrics = runs["kept"]["cut"]
    resume = [e for e in events if e["event"] == "resume"]
    assert resume and resume[0]["source"] == "remote" and resume[0]["step"] in (4, 8), resume
    fetch = [e for e in events if e["event"] == "remote_fetch"]
    assert fetch and fetch[0]["nodes"] == 2, fetch
    assert [metrics[s]["loss"] for s in range(1, 13)] == [straight[s]["loss"] for s in range(1, 13)]


def test_copies_fetched_before_are_dropped(runs) -> None:
    before, after, events = runs["kept"]["copies"]
    assert before == [["recovery/step-00000008.dcp"]] * 2, before
    assert after == [["recovery/step-00000012.dcp"]] * 2, after
    dropped = [e["path"] for e in events if e["event"] == "delete" and "node-local" in e["reason"]]
    assert dropped == ["recovery/step-00000008.dcp"], events


def test_deleted_run_directories_resume_from_the_remote_bitwise(runs) -> None:
    _, straight = runs["kept"]["straight"]
    run_dir = runs["cut"][0]
    events = journal(run_dir)
    resume = [e for e in events if e["event"] == "resume"]
    assert resume[-1]["step"] == 12 and resume[-1]["source"] == "remote", events
    assert events[-1]["event"] == "run_end" and events[-1]["checkpoint"] == "recovery/step-00000016.dcp"
    # The journal and metrics came back from the remote: the run's history goes on (4 launches: the killed one, its
    # relaunch, the one that found it finished, this one), and every step's loss is the straight run's.
    assert [e["attempt"] for e in events if e["event"] == "run_start"] == [0, 1, 2, 3], events
    after = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(after) == list(range(1, 17))
    assert [after[s]["loss"] for s in range(1, 17)] == [straight[s]["loss"] for s in range(1, 17)]
    fs = runs["fs"]
    assert fs.cat_file(f"{BUCKET}/runs/cut/latest") == b"recovery/step-00000016.dcp"
    # The finished run's own journal is on the remote too, with its end.
    remote_journal = fs.cat_file(f"{BUCKET}/runs/straight/journal.jsonl").decode().strip().splitlines()
    assert json.loads(remote_journal[-1])["event"] == "run_end"
