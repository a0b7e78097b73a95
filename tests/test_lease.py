"""One writer per run across nodes: the lease on checkpoint.remote. Its decisions alone (no torch, no store), its
conditional writes against file:// and moto's S3 server, and launches refused, taking over and releasing it."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curry_train.checkpoint import lease_store
from curry_train.checkpoint.lease import Holder, Place, Verdict, judge, refusal, renew_every, stop_after
from curry_train.checkpoint.remote import RemoteStore, guard
from curry_train.failures import Refused
from curry_train.journal import read_journal
from tests.conftest import FAST, run_train

HERE = Place("node-a", "pid:[1]")


def holder(**changes: object) -> Holder:
    base = Holder("tok", "node-b", "pid:[2]", 4242, 3, taken=1000.0, renewed=1000.0, lease_s=60.0)
    return dataclasses.replace(base, **changes)


# ------------------------------------------------------------------------------------------ decisions alone


def test_a_lease_is_taken_over_only_once_the_holder_stopped_renewing() -> None:
    alive = lambda pid: True  # noqa: E731
    assert judge(None, 1000.0, HERE, alive) is Verdict.FREE
    assert judge(holder(), 1059.0, HERE, alive) is Verdict.LIVE
    assert judge(holder(), 1061.0, HERE, alive) is Verdict.EXPIRED
    # The holder's own lease time decides, not the newcomer's: it stops writing by its own clock.
    assert judge(holder(lease_s=600.0), 1061.0, HERE, alive) is Verdict.LIVE
    assert judge(holder(released=True), 1001.0, HERE, alive) is Verdict.RELEASED
    assert all(v.may_take for v in Verdict if v is not Verdict.LIVE) and not Verdict.LIVE.may_take


def test_a_dead_holder_on_this_host_is_taken_over_at_once() -> None:
    mine = holder(host=HERE.host, pidns=HERE.pidns)
    assert judge(mine, 1001.0, HERE, lambda pid: False) is Verdict.HOLDER_GONE
    assert judge(mine, 1001.0, HERE, lambda pid: True) is Verdict.LIVE
    # Same host name, another PID namespace (another container): its PIDs mean nothing here.
    other_ns = holder(host=HERE.host, pidns="pid:[9]")
    assert judge(other_ns, 1001.0, HERE, lambda pid: False) is Verdict.LIVE
    assert judge(holder(), 1001.0, HERE, lambda pid: False) is Verdict.LIVE  # another host


def test_the_holder_stops_writing_a_renewal_before_anyone_may_take_over() -> None:
    assert renew_every(300) == 60 and stop_after(300) == 240
    assert renew_every(300) < stop_after(300) < 300
    line = refusal("s3://b/runs/r", holder(), 1010.0)
    assert "host node-b, pid 4242, attempt 3, last renewed 1970-01-01T00:16:40+00:00 (10 s ago)" in line
    assert "expires 50 s" in line and "+resume=latest" in line
    assert Holder.from_bytes(holder().to_bytes()) == holder()
    assert Holder.from_bytes(b"not json") is None


def test_a_bad_lease_time_is_refused() -> None:
    from curry_train.config import CheckpointConfig, ConfigError

    for bad in (0, 2.5, -1, True):
        with pytest.raises(ConfigError, match=r"checkpoint.remote_lease_s: must be a number of seconds >= 3"):
            CheckpointConfig(remote_lease_s=bad)
    assert CheckpointConfig(remote_lease_s=3).remote_lease_s == 3


# ---------------------------------------------------------------------------------------- on the store


@pytest.fixture(scope="module")
def moto():
    from tests.test_remote import moto_serving

    with pytest.MonkeyPatch.context() as patch, moto_serving(patch) as server:
        yield server


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RemoteStore:
    if request.param == "s3":
        pytest.importorskip("s3fs")
        request.getfixturevalue("moto")
        return RemoteStore("s3://ckpts/lease-tests", tmp_path.name)
    return RemoteStore(f"file://{tmp_path / 'store'}", "run")


def test_a_held_lease_refuses_others_until_it_stops_renewing(store: RemoteStore) -> None:
    """Taken with a conditional write, renewed while held (a launch is refused, naming the holder), then, once not
    renewed for its lease time, taken over; the old holder's check refuses its writes by then."""
    lost: list[str] = []
    first, verdict, previous, guaranteed = lease_store.take(store, 2, 1.0, lost.append)
    assert verdict is Verdict.FREE and previous is None and guaranteed
    try:
        time.sleep(1.5)  # longer than the lease: renewed meanwhile
        with pytest.raises(
            Refused, match=rf"in use by another launch of this run \(host .*, pid {os.getpid()}, attempt 2"
        ):
            lease_store.take(store, 0, 1.0, lost.append)
        first.check()
        first.stop()  # a crash: no more renewals
        time.sleep(1.1)
        with pytest.raises(lease_store.LeaseLost, match="not renewed for"):
            first.check()
        second, verdict, previous, _ = lease_store.take(store, 0, 1.0, lost.append)
        assert verdict is Verdict.EXPIRED and previous is not None and previous.token == first.holder.token
        assert second.holder.attempt == 3  # the previous holder's attempt + 1
        second.release()
        lost.clear()  # the first holder's own verdict, above
        third, verdict, _, _ = lease_store.take(store, 0, 1.0, lost.append)
        assert verdict is Verdict.RELEASED
        # Another launch overwrites the object (as a takeover would): the holder's next renewal notices it.
        obj = lease_store.lease_object(store)
        _, version = obj.read()
        obj.replace(holder(renewed=time.time()).to_bytes(), version)
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost and lost[0].startswith("taken over by host node-b, pid 4242"), lost
        with pytest.raises(lease_store.LeaseLost, match="taken over by host node-b"):
            third.check()
    finally:
        first.stop()


def test_the_guard_stops_remote_writes_of_a_launch_that_lost_its_lease(store: RemoteStore, tmp_path: Path) -> None:
    lease, *_ = lease_store.take(store, 0, 60.0, lambda reason: None)
    follower = lease_store.follow(store, lease.holder.token)
    (tmp_path / "f").write_bytes(b"x")
    guard(store.url, lease.check)
    try:
        store.put_file(tmp_path / "f", "recovery/step-00000004.dcp/f")
        follower.check()
        lease.release()
        with pytest.raises(lease_store.LeaseLost, match="released"):
            store.put_file(tmp_path / "f", "recovery/step-00000004.dcp/g")
        with pytest.raises(lease_store.LeaseLost, match="no longer this launch's"):
            follower.check()
    finally:
        guard(store.url, None)
        lease.stop()


# ---------------------------------------------------------------------------------------------- launches

RUN = [
    *FAST,
    "train.steps=8",
    "train.eval_every=0",
    "checkpoint.best_k=0",
    "checkpoint.rollback_every=0",
    "checkpoint.recovery_every=4",
    "checkpoint.remote=s3://ckpts/runs",
]


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """`curry-train ARGS` in this process (the store's credentials are in its environment): status, output."""
    from curry_train.cli import main

    capsys.readouterr()
    status = main(list(args))
    out = capsys.readouterr()
    return status, out.out + out.err


def lease_on(moto, run_id: str) -> Holder | None:
    body = moto.fs().cat_file(f"ckpts/runs/{run_id}/lease")
    return Holder.from_bytes(body)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, moto) -> Path:
    """A run that finds the lease of a launch on another node that stopped renewing 100 s ago (its lease time:
    5 s), takes it over, trains 8 steps with uploads at 4 and 8, and ends: the lease released."""
    cwd = tmp_path_factory.mktemp("finished")
    gone = time.time() - 100
    stale = Holder("stale", "other-node", "pid:[7]", 999999, 5, taken=gone, renewed=gone, lease_s=5.0)
    moto.fs().pipe_file("ckpts/runs/leased/lease", stale.to_bytes())
    run_train([*RUN, "run.id=leased"], cwd)
    return cwd / "runs" / "leased"


def test_an_expired_lease_is_taken_over_and_released_at_the_end(finished: Path, moto) -> None:
    events = read_journal(finished / "journal.jsonl")
    taken = [e for e in events if e["event"] == "lease"]
    assert len(taken) == 1 and taken[0]["how"] == "expired", taken
    assert taken[0]["previous"] == {"host": "other-node", "pid": 999999, "attempt": 5}
    assert taken[0]["url"] == "s3://ckpts/runs/leased" and "testing" not in json.dumps(events)
    assert not any(e["event"] == "lease_lost" for e in events)
    after = lease_on(moto, "leased")
    assert after is not None and after.released and after.attempt == 6 and after.host == socket.gethostname()


def test_a_dead_holder_on_this_host_is_taken_over_without_waiting(tmp_path: Path) -> None:
    store = RemoteStore(f"file://{tmp_path}", "run")
    here, now = Place.here(), time.time()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = Holder("crashed", here.host, here.pidns, dead.pid, 1, taken=now, renewed=now, lease_s=300.0)
    lease_store.LocalObject(store.key("lease")).create(crashed.to_bytes())
    lease, verdict, previous, _ = lease_store.take(store, 0, 300.0, lambda reason: None)
    lease.stop()
    assert verdict is Verdict.HOLDER_GONE and previous == crashed and lease.holder.attempt == 2


def test_a_live_lease_refuses_a_launch_naming_its_holder(tmp_path: Path, moto) -> None:
    """Another node's launch holds the lease and renewed it a second ago: a launch of the same run (its own run
    directory: nodes without a shared filesystem) is refused with status 2 and one line naming the holder; it
    leaves the lease and the store as they were."""
    now = time.time()
    other = Holder("other", "node-7", "pid:[3]", 4242, 2, taken=now - 60, renewed=now - 1, lease_s=300.0)
    moto.fs().pipe_file("ckpts/runs/busy/lease", other.to_bytes())
    proc = run_train([*RUN, "run.id=busy"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "in use by another launch" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "s3://ckpts/runs/busy is in use by another launch of this run (host node-7, pid 4242, attempt 2" in lines[0]
    assert "+resume=latest" in lines[0] and "testing" not in proc.stderr
    assert lease_on(moto, "busy") == other
    assert not (tmp_path / "runs").exists()  # a refusal leaves nothing behind


def test_ls_verify_status_and_export_of_a_remote_run(
    finished: Path, moto, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The tools given the run's URL on the remote: `ls` lists committed checkpoints and names a leftover, `status`
    what the store holds, `export` the same tensors as from the run directory, `verify` names a damaged file."""
    url = "s3://ckpts/runs/leased"
    fs = moto.fs()
    fs.pipe_file("ckpts/runs/leased/recovery/step-00000012.dcp/__0_0.distcp", b"cut short")
    status, out = cli(capsys, "ls", url)
    assert status == 0, out
    assert "recovery/step-00000004.dcp" in out and "recovery/step-00000008.dcp" in out
    assert "recovery/step-00000008.dcp" in [line.split()[0] for line in out.splitlines() if "<- latest" in line]
    assert "recovery/step-00000012.dcp: no manifest.json: an upload or deletion cut short" in out
    status, out = cli(capsys, "status", url)
    assert status == 0 and "remote: 2 committed checkpoint(s)" in out and "latest -> recovery/step-00000008.dcp" in out
    assert "lease: released by its last holder" in out, out

    from safetensors.torch import load_file

    status, out = cli(capsys, "export", url, "-o", str(tmp_path / "remote.safetensors"))
    assert status == 0 and f"exported {url}/recovery/step-00000008.dcp ->" in out, out
    status, out = cli(capsys, "export", str(finished), "-o", str(tmp_path / "local.safetensors"))
    remote, local = load_file(tmp_path / "remote.safetensors"), load_file(tmp_path / "local.safetensors")
    assert remote.keys() == local.keys() and all(remote[k].equal(local[k]) for k in local)

    fs.rm_file("ckpts/runs/leased/recovery/step-00000012.dcp/__0_0.distcp")
    status, out = cli(capsys, "verify", url)
    assert status == 0 and out.count(": ok") == 2, out
    damaged = "ckpts/runs/leased/recovery/step-00000004.dcp/__0_0.distcp"
    body = fs.cat_file(damaged)
    fs.pipe_file(damaged, bytes([body[0] ^ 1]) + body[1:])  # one bit flipped, the size unchanged
    status, out = cli(capsys, "verify", url)
    assert status == 1 and "recovery/step-00000008.dcp: ok" in out
    assert "recovery/step-00000004.dcp: __0_0.distcp: xxh3_64 checksum" in out and "(corrupted)" in out, out
    status, out = cli(capsys, "ls", "s3://ckpts/runs/nothing-here")
    assert status == 2 and "no run there" in out
