"""A lost node, with real torchrun "nodes" (one process each) on this machine: one killed outright, or cut off by a
network partition (two network namespaces joined by a veth pair). The surviving node ends with status 1 within the
hang timeout (at once where the lost connection is seen), and a relaunch resumes bitwise."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from curry_train.journal import read_journal
from curry_train.launcher import kill_tree
from tests.conftest import FAST, _env, assert_replays_bitwise, run_train

HANG_S = 20
BASE = [
    *FAST,
    "train.steps=400",
    "train.eval_every=0",
    "checkpoint.recovery_every=2",
    "checkpoint.rollback_every=0",
    "checkpoint.best_k=0",
    f"train.hang_timeout_s={HANG_S}",
    "scheduler.name=constant",  # the lr does not depend on train.steps: the relaunch may run fewer steps
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(rank: int, addr: str, port: int, args: list[str], cwd: Path, netns: str | None = None, env=None):
    """One torchrun "node" of a 2-node job (one process), its output in cwd/node<rank>.log."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1",
        f"--master-addr={addr}", f"--master-port={port}", "-m", "curry_train.train", *args,
    ]  # fmt: skip
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = open(cwd / f"node{rank}.log", "w")  # noqa: SIM115 (closed by the kernel with the test's process)
    return subprocess.Popen(
        cmd, cwd=cwd, env=env or _env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def wait_for_steps(run_dir: Path, count: int, jobs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while steps_done(run_dir) < count:
        assert all(j.poll() is None for j in jobs), "a node ended before the job reached its steps"
        assert time.monotonic() < deadline, f"the job did not reach step {count}"
        time.sleep(0.1)


def kill_node(job: subprocess.Popen) -> None:
    """SIGKILL the node's launcher and every process under it, as a node that loses power."""
    kill_tree(job.pid)
    job.wait(timeout=30)


def test_killed_node_ends_the_survivor_at_once_and_the_relaunch_resumes_bitwise(tmp_path: Path) -> None:
    port = free_port()
    args = [*BASE, "run.id=killed"]
    run_dir = tmp_path / "runs" / "killed"
    survivor, lost = node(0, "127.0.0.1", port, args, tmp_path), node(1, "127.0.0.1", port, args, tmp_path)
    try:
        wait_for_steps(run_dir, 5, [survivor, lost])
        kill_node(lost)
        killed_at = time.monotonic()
        survivor.wait(timeout=HANG_S + 40)
        took = time.monotonic() - killed_at
    finally:
        for job in (survivor, lost):
            if job.poll() is None:
                kill_node(job)
    output = (tmp_path / "node0.log").read_text()
    assert survivor.returncode == 1, output[-3000:]
    assert took < HANG_S, f"the survivor took {took:.0f} s to end after its peer was killed"
    lines = [line for line in output.splitlines() if "curry-train: rank 0 stopped: lost rank 1 on" in line]
    assert lines, output[-3000:]

    # The relaunch (here on one machine, the same world size) resumes from the last committed checkpoint, bitwise.
    run_train([*args, "train.steps=9", "+resume=auto"], tmp_path, nproc=2, timeout=240)
    assert read_journal(run_dir / "journal.jsonl")[-1]["event"] == "run_end"
    assert_replays_bitwise(run_dir)


def netns_usable() -> str | None:
    """Why two network namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "no `ip` command"
    if os.geteuid() != 0:
        return "`ip netns` needs root"
    name = f"ct-probe-{uuid.uuid4().hex[:6]}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns add` failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@pytest.fixture
def two_hosts():
    """Two network namespaces a and b, 10.77.x.1 and 10.77.x.2, joined by a veth pair; removed afterwards."""
    reason = netns_usable()
    if reason is not None:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:5]
    a, b, subnet = f"ct-a-{tag}", f"ct-b-{tag}", 77 + int(tag, 16) % 100
    commands = [
        f"ip netns add {a}",
        f"ip netns add {b}",
        f"ip link add va{tag} netns {a} type veth peer name vb{tag} netns {b}",
        f"ip -n {a} addr add 10.{subnet}.0.1/24 dev va{tag}",
        f"ip -n {b} addr add 10.{subnet}.0.2/24 dev vb{tag}",
        f"ip -n {a} link set lo up",
        f"ip -n {b} link set lo up",
        f"ip -n {a} link set va{tag} up",
        f"ip -n {b} link set vb{tag} up",
    ]
    try:
        for command in commands:
            subprocess.run(command.split(), check=True, capture_output=True)
        yield {"a": a, "b": b, "addr_a": f"10.{subnet}.0.1", "if_a": f"va{tag}", "if_b": f"vb{tag}"}
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


def test_cut_off_node_ends_the_survivor_within_the_hang_timeout(tmp_path: Path, two_hosts: dict) -> None:
    h = two_hosts
    port = free_port()
    args = [*BASE, "run.id=cut"]
    run_dir = tmp_path / "runs" / "cut"
    env_a, env_b = {**_env(), "GLOO_SOCKET_IFNAME": h["if_a"]}, {**_env(), "GLOO_SOCKET_IFNAME": h["if_b"]}
    survivor = node(0, h["addr_a"], port, args, tmp_path, netns=h["a"], env=env_a)
    cut_off = node(1, h["addr_a"], port, args, tmp_path, netns=h["b"], env=env_b)
    try:
        wait_for_steps(run_dir, 4, [survivor, cut_off])
        # A partition: packets vanish, no connection reset reaches either side.
        subprocess.run(["ip", "-n", h["a"], "link", "set", h["if_a"], "down"], check=True)
        cut_at = time.monotonic()
        survivor.wait(timeout=HANG_S + 60)
        took = time.monotonic() - cut_at
        cut_off.wait(timeout=60)
    finally:
        for job in (survivor, cut_off):
            if job.poll() is None:
                kill_node(job)
    output = (tmp_path / "node0.log").read_text()
    assert survivor.returncode == 1 and cut_off.returncode == 1, output[-3000:]
    assert took < HANG_S + 30, f"the survivor took {took:.0f} s to end after the cut"
    hangs = {e["rank"]: e for e in read_journal(run_dir / "journal.jsonl") if e["event"] == "hang"}
    assert hangs[0]["lost"] == [1], hangs
    # Each side names the other: rank 0, beside the rendezvous store, sees rank 1's heartbeat stop; rank 1 sees the
    # store on rank 0's node stop answering.
    addr_b = h["addr_a"].rsplit(".", 1)[0] + ".2"
    said_0 = [line for line in output.splitlines() if line.startswith("curry-train: rank 0 on")]
    assert said_0 and "hung: no progress for" in said_0[0], output[-3000:]
    assert f"; lost rank 1 on {socket.gethostname()} ({addr_b}): no heartbeat for " in said_0[0], said_0
    output_1 = (tmp_path / "node1.log").read_text()
    said_1 = [line for line in output_1.splitlines() if line.startswith("curry-train: rank 1 on")]
    assert said_1, output_1[-3000:]
    assert f"; lost rank 0 on {socket.gethostname()} ({h['addr_a']}): the rendezvous store on its node" in said_1[0]
