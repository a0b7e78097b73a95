"""checkpoint.remote: checkpoints uploaded to an S3-protocol store (moto's standalone server on 127.0.0.1, started
here as s3fs's own tests do), the manifest as the remote commit, resume from the remote, and the store's faults."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from curry_train.checkpoint.manifest import MANIFEST, Manifest, checksum_tree
from curry_train.checkpoint.policy import Checkpoint, Role
from curry_train.checkpoint.remote import RemoteStore, describe_error
from curry_train.journal import read_journal
from curry_train.metrics import read_metrics
from tests.conftest import FAST, popen_train, run_train

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "ckpts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 server in a process of its own; stop() and start() again on the same port (an outage: moto keeps
    objects in memory, so the store comes back empty)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        self.fs().mkdir(BUCKET)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.url, skip_instance_cache=True)


# Credentials moto accepts.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_serving(patch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    """moto's server, running, with its credentials and endpoint in this process's environment (conftest's _env
    copies it for the launches)."""
    server = MotoServer()
    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": server.url}.items():
        patch.setenv(key, value)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch):
    with moto_serving(monkeypatch) as server:
        yield server


def journal_of(run_dir: Path) -> list[dict]:
    return read_journal(run_dir / "journal.jsonl") if (run_dir / "journal.jsonl").exists() else []


def steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max(read_metrics(path), default=0) if path.exists() else 0


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the job ended ({proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers (torchrun puts them in sessions of their own)."""
    from curry_train.launcher import kill_tree as kill

    kill(proc.pid)
    proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------- the store alone


def test_the_manifest_is_the_remote_commit(tmp_path: Path) -> None:
    """Files without their manifest are never listed; deletion removes the manifest first; `latest` falls back to
    the newest committed full checkpoint when the object it names is gone."""
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "__0_0.distcp").write_bytes(os.urandom(1000))
    (local / ".metadata").write_bytes(b"meta")
    files = checksum_tree(local)
    remote = RemoteStore(f"file://{tmp_path / 'store'}", "run")
    remote.probe("rank0")
    ckpts = [Checkpoint(Role.RECOVERY, 4), Checkpoint(Role.RECOVERY, 8)]
    for ckpt in ckpts:
        for name in files:
            remote.put_file(local / name, f"{ckpt.relpath}/{name}")
    assert remote.list() == [] and remote.uncommitted() == [c.relpath for c in ckpts]
    assert remote.latest() is None
    manifest = Manifest(Role.RECOVERY, 4, ckpts[0].name, "now", files, extra={"contents": "full"})
    assert remote.missing(ckpts[0].relpath, files) == []
    remote.put_manifest(manifest, ckpts[0].relpath)
    assert remote.list() == [ckpts[0]] and remote.uncommitted() == [ckpts[1].relpath]
    assert remote.latest() == ckpts[0]  # no `latest` object yet: the newest committed full one
    remote.set_latest(ckpts[0])
    assert remote.latest() == ckpts[0]
    fetched = tmp_path / "fetched"
    assert remote.fetch(ckpts[0], sorted(files), fetched, files) == []
    (tmp_path / "store" / "run" / ckpts[0].relpath / "__0_0.distcp").write_bytes(b"damaged")
    assert "__0_0.distcp: size 7 bytes" in remote.fetch(ckpts[0], sorted(files), tmp_path / "again", files)[0]
    remote.delete(ckpts[0].relpath)
    assert remote.list() == [] and not (tmp_path / "store" / "run" / ckpts[0].relpath / MANIFEST).exists()


def test_refused_credentials_name_the_variable_to_set() -> None:
    line = describe_error("s3://bucket/runs", PermissionError("The AWS Access Key Id you provided does not exist"))
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line
    assert "GOOGLE_APPLICATION_CREDENTIALS" in describe_error("gs://b/p", PermissionError("Forbidden"))
    assert "set " not in describe_error("s3://bucket/runs", ConnectionError("refused"))


# --------------------------------------------------------------------------------------------- end to end

REMOTE_RUN = [
    *FAST,
    "train.steps=12",
    "train.eval_every=0",
    "checkpoint.best_k=0",
    "checkpoint.rollback_every=0",
    "checkpoint.recovery_every=4",
    f"checkpoint.remote=s3://{BUCKET}/runs",
    "run.id=remote",
]


def test_resume_from_the_remote_after_a_kill_during_an_upload(tmp_path: Path, moto: MotoServer) -> None:
    """Training goes on while an upload hangs; a kill then leaves a remote checkpoint without its manifest, which the
    next start removes; with the run directory gone, +resume=latest fetches the newest committed remote checkpoint
    and continues bitwise as the run that was never interrupted."""
    job = popen_train([*REMOTE_RUN, "+debug.upload_stall_at=8"], tmp_path, nproc=2)
    run_dir = tmp_path / "runs" / "remote"
    try:
        # Step 8's upload hangs after a file on each rank; training reaches the end regardless.
        wait_for("the last step", lambda: steps_done(run_dir) >= 12, 240, job)
        saved = lambda: any(e["event"] == "save" and e["step"] == 12 for e in journal_of(run_dir))  # noqa: E731
        wait_for("step 12's save", saved, 60, job)
        time.sleep(1.0)  # the run now waits for its uploads, one of which never ends
        assert job.poll() is None
    finally:
        kill_tree(job)
    events = journal_of(run_dir)
    uploads = [e["step"] for e in events if e["event"] == "upload"]
    assert uploads == [4], events
    # The upload that hangs is step 8's, or step 12's when step 8's came while step 4's was still in flight (skipped).
    skipped = {e["step"] for e in events if e["event"] == "upload_skipped"}
    hung = f"step-{min({8, 12} - skipped):08d}.dcp"
    fs = moto.fs()
    prefix = f"{BUCKET}/runs/remote/recovery"
    assert fs.exists(f"{prefix}/step-00000004.dcp/{MANIFEST}")
    assert fs.find(f"{prefix}/{hung}") and not fs.exists(f"{prefix}/{hung}/{MANIFEST}")
    assert fs.cat_file(f"{BUCKET}/runs/remote/latest") == b"recovery/step-00000004.dcp"

    straight = tmp_path / "straight"
    run_dir.rename(straight)  # the local copy is gone; it was an uninterrupted run to step 12
    proc = run_train([*REMOTE_RUN, "+resume=latest"], tmp_path, nproc=2)
    assert "fetched from s3://" in proc.stderr + proc.stdout
    events = journal_of(run_dir)
    deleted = [e["path"] for e in events if e["event"] == "remote_delete"]
    assert f"recovery/{hung}" in deleted
    # The killed launch's lease: its rank 0 is gone from this host, so the relaunch takes it over without waiting,
    # and releases it when it finishes.
    assert [e["how"] for e in journal_of(straight) if e["event"] == "lease"] == ["free"]
    # The journal came back from the remote as uploaded with step 4's commit: the killed launch's lease is in it.
    assert "took journal.jsonl, metrics.jsonl, config.yaml of this run from s3://" in proc.stderr + proc.stdout
    assert [e["how"] for e in events if e["event"] == "lease"] == ["free", "holder gone"]
    assert json.loads(fs.cat_file(f"{BUCKET}/runs/remote/lease"))["released"] is True
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["step"] == 4 and resume["source"] == "remote", resume
    fetch = next(e for e in events if e["event"] == "remote_fetch")
    assert fetch["bytes"] > 0 and fetch["path"] == "recovery/step-00000004.dcp"
    before, after = read_metrics(straight / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    assert [after[s]["loss"] for s in range(5, 13)] == [before[s]["loss"] for s in range(5, 13)]
    fs.invalidate_cache()
    assert fs.cat_file(f"{BUCKET}/runs/remote/latest") == b"recovery/step-00000012.dcp"
    # Every checkpoint on the remote now is committed (the resumed run uploaded its own, with their manifests).
    assert all(fs.exists(f"{path}/{MANIFEST}") for path in fs.ls(prefix)), fs.ls(prefix)
    assert "testing" not in (run_dir / "journal.jsonl").read_text()  # no credentials in the journal
    status = subprocess.run(
        [sys.executable, "-m", "curry_train.cli", "status", str(run_dir)], capture_output=True, text=True, check=True
    ).stdout
    assert "remote: s3://ckpts/runs/remote: newest upload recovery/step-00000012.dcp" in status, status
    assert "up to date with latest" in status, status


def test_an_outage_mid_run_does_not_stop_training(tmp_path: Path, moto: MotoServer) -> None:
    """The store goes away after the first upload: training goes on to the end, uploads retry, and when the store
    comes back the run's newest checkpoint is uploaded and the run ends normally."""
    args = [*REMOTE_RUN, "checkpoint.recovery_every=2", "checkpoint.remote_retry_s=300"]
    job = popen_train(args, tmp_path, nproc=1)
    run_dir = tmp_path / "runs" / "remote"
    try:
        uploaded = lambda: any(e["event"] == "upload" for e in journal_of(run_dir))  # noqa: E731
        wait_for("the first upload", uploaded, 240, job)
        moto.stop()
        wait_for("the last step", lambda: steps_done(run_dir) >= 12, 120, job)
        time.sleep(2.0)
        assert job.poll() is None  # waiting for its uploads
        assert not any(e["event"] == "run_end" for e in journal_of(run_dir))
        moto.start()  # back, and empty
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out[-4000:]
    events = journal_of(run_dir)
    assert any(e["event"] == "run_end" for e in events)
    assert [e for e in events if e["event"] == "upload"][-1]["step"] == 12
    fs = moto.fs()
    assert fs.cat_file(f"{BUCKET}/runs/remote/latest") == b"recovery/step-00000012.dcp"
    manifest = json.loads(fs.cat_file(f"{BUCKET}/runs/remote/recovery/step-00000012.dcp/{MANIFEST}"))
    assert manifest["step"] == 12


def test_an_unreachable_store_at_start_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    proc = run_train([*REMOTE_RUN], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "checkpoint.remote" in line]
    assert lines and "cannot write s3://ckpts/runs/remote" in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # a refusal leaves nothing behind
