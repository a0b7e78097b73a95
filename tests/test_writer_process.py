"""The asynchronous save's writer process (`checkpoint.writer=process`): its files are the writer thread's (every
tensor's bytes at the same place); it dies with the training process and leaves stop signals to it; a killed writer
process is a lost save,
said in one line and journaled, and training goes on with a new one, whose checkpoint resumes bitwise. Real DCP
files, a real process and real signals."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from curry_train import distributed
from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.policy import Checkpoint, Role
from curry_train.checkpoint.state import Contents, Progress, app_state
from curry_train.checkpoint.store import RunDir
from curry_train.checkpoint.writer_process import ProcessWriter
from curry_train.journal import Journal, read_journal
from curry_train.metrics import read_metrics
from tests.conftest import FAST, _env, run_train, tiny_model_after_one_step


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has ended


@pytest.fixture
def two_writers(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A tiny FSDP2 model after one step and two asynchronous checkpointers on a world-of-one gloo group: one with
    the writer process, one with the writer thread."""
    env = distributed.init_distributed("cpu")
    ckpts: dict[str, Checkpointer] = {}
    try:
        cfg, model, optimizer = tiny_model_after_one_step(env)
        progress = Progress(step=1, cursor=8)

        def state(contents: Contents) -> dict:
            fidelity = (lambda: [8, 9], lambda record: None)
            return app_state(contents, model, optimizer, progress, {"step": 1}, 0, env.device, fidelity=fidelity)

        for mode in ("process", "thread"):
            run = tmp_path / mode
            run.mkdir()
            config = dataclasses.replace(cfg.checkpoint, async_save=True, writer=mode)
            journal = Journal(run / "journal.jsonl")
            ckpts[mode] = Checkpointer(config, store=RunDir(run), journal=journal, group=env.checkpoint_group, rank=0)
        runs = {mode: tmp_path / mode for mode in ckpts}
        yield {"ckpts": ckpts, "state": state, "model": model, "optimizer": optimizer, "runs": runs}
    finally:
        for ckpt in ckpts.values():
            ckpt.close()
            ckpt.journal.close()
        distributed.shutdown()


def test_the_writer_process_writes_the_writer_threads_files_same_items_and_reuses_the_plan(
    two_writers: dict[str, Any],
) -> None:
    ckpts, state, model, optimizer = (two_writers[k] for k in ("ckpts", "state", "model", "optimizer"))
    process, thread = ckpts["process"], ckpts["thread"]
    assert isinstance(process.writer, ProcessWriter) and not isinstance(thread.writer, ProcessWriter)
    for step in (1, 2):
        for ckpt in (process, thread):
            ckpt.save(step, [Role.RECOVERY], Contents.FULL, state(Contents.FULL))
            ckpt.before_update()
            ckpt.wait()
        model(torch.randint(0, 256, (2, 32))).sum().backward()
        optimizer.step()
        paths = [c.store.path_of(Checkpoint(Role.RECOVERY, step)) for c in (process, thread)]
        data = [sorted(p.glob("*.distcp")) for p in paths]
        assert [f.name for f in data[0]] == [f.name for f in data[1]] == ["__0_0.distcp"]
        assert_same_items(paths[0], paths[1])
        assert process.store.verify(Checkpoint(Role.RECOVERY, step)) == []
    # The second save's structure was planned by the first: DCP's planning ran once, and the writer process got
    # the plan once; every tensor's bytes came from the shared buffers, none through the socket.
    assert (process.plans.misses, process.plans.hits) == (1, 1)
    assert process.writer.starts == 1 and process.writer._next_plan == 1
    assert process.writer.by_value == 0
    [save] = [e for e in read_journal(two_writers["runs"]["process"] / "journal.jsonl") if e["event"] == "save"][-1:]
    assert save["mode"] == "async" and save["writer"] == "process" and save["write_cpu_seconds"] > 0
    [save] = [e for e in read_journal(two_writers["runs"]["thread"] / "journal.jsonl") if e["event"] == "save"][-1:]
    assert save["mode"] == "async" and save["writer"] == "thread"


def assert_same_items(a: Path, b: Path) -> None:
    """Every item of two DCP checkpoints at the same place in the same file: a tensor's bytes identical, another
    value's equal once loaded (torch.save names a tensor inside such a value by its memory address, so two saves
    of the same state by the same writer differ there)."""
    meta = [FileSystemReader(str(p)).read_metadata() for p in (a, b)]
    assert meta[0].state_dict_metadata.keys() == meta[1].state_dict_metadata.keys()
    assert meta[0].storage_data.keys() == meta[1].storage_data.keys()
    files = {p: {f.name: f.read_bytes() for f in p.glob("*.distcp")} for p in (a, b)}
    tensors = 0
    for index, info in meta[0].storage_data.items():
        other = meta[1].storage_data[index]
        assert (info.relative_path, info.offset, info.length) == (other.relative_path, other.offset, other.length)
        data = [files[p][info.relative_path][info.offset : info.offset + info.length] for p in (a, b)]
        if isinstance(meta[0].state_dict_metadata[index.fqn], TensorStorageMetadata):
            assert data[0] == data[1], f"{index.fqn}: the tensor's bytes differ"
            tensors += 1
        else:
            loaded = [torch.load(io.BytesIO(d), weights_only=False) for d in data]
            assert _same(*loaded), f"{index.fqn}: the values differ"
    assert tensors > 10


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, bytes) and isinstance(y, bytes) and x != y:  # a record pickled by the harness (RNG states)
        return _same(pickle.loads(x), pickle.loads(y))
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, np.ndarray):
        return isinstance(y, np.ndarray) and np.array_equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return type(x) is type(y) and len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y, strict=True))
    return x == y


def test_the_writer_process_ignores_stop_signals_and_dies_with_the_training_process(tmp_path: Path) -> None:
    script = (
        "import time, sys\n"
        "from curry_train.checkpoint.staging import Stager\n"
        "from curry_train.checkpoint.writer_process import ProcessWriter\n"
        "w = ProcessWriter(Stager(shared=True))\n"
        "print(w._proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        writer = int(trainer.stdout.readline())
        time.sleep(0.5)  # its first statement ignores them
        for sig in (signal.SIGTERM, signal.SIGINT):
            os.kill(writer, sig)
        time.sleep(0.5)
        assert _alive(writer), "a stop signal ended the writer process; the training process decides"
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 10
        while _alive(writer) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(writer), "the writer process outlived the training process"
    finally:
        trainer.kill()
        trainer.wait()


KILLED = [
    *FAST,
    "model=tiny",
    "train.steps=8",
    "train.eval_every=0",
    "checkpoint.recovery_every=2",
    "checkpoint.rollback_every=0",
    "checkpoint.best_k=0",
    "checkpoint.writer=process",
]


@pytest.fixture(scope="module")
def killed_writer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run whose writer process is SIGKILLed while it writes step 4's save, and a second run resumed from the
    step-6 checkpoint the next writer process wrote."""
    root = tmp_path_factory.mktemp("killed-writer")
    first = run_train([*KILLED, "run.id=killed", "+debug.kill_writer_at=4"], root)
    run = root / "runs" / "killed"
    resumed = run_train(
        [*KILLED, "run.id=resumed", f"+resume={run / 'recovery' / 'step-00000006.dcp'}"], root, check=True
    )
    return {"root": root, "run": run, "first": first, "resumed": root / "runs" / "resumed", "second": resumed}


def test_a_killed_writer_process_loses_that_save_in_one_line_and_training_goes_on(killed_writer: dict) -> None:
    run, first = killed_writer["run"], killed_writer["first"]
    lines = [line for line in first.stderr.splitlines() if "writer process" in line]
    assert len(lines) == 1, first.stderr[-3000:]
    assert "killed by SIGKILL" in lines[0] and "recovery/step-00000004.dcp is not saved" in lines[0]
    events = read_journal(run / "journal.jsonl")
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["step"] == 4 and "SIGKILL" in errors[0]["reason"]
    saved = [e["step"] for e in events if e["event"] == "save"]
    assert saved == [2, 6, 8], "the saves after the killed one were not written by a new writer process"
    assert sorted(p.name for p in (run / "recovery").iterdir()) == [f"step-0000000{s}.dcp" for s in (2, 6, 8)]
    assert json.loads((run / "recovery" / "step-00000006.dcp" / "manifest.json").read_text())


def test_a_save_of_the_restarted_writer_process_resumes_bitwise(killed_writer: dict) -> None:
    straight = read_metrics(killed_writer["run"] / "metrics.jsonl")
    resumed = read_metrics(killed_writer["resumed"] / "metrics.jsonl")
    assert sorted(resumed) == [7, 8], sorted(resumed)
    assert all(resumed[s]["loss"] == straight[s]["loss"] for s in (7, 8))
