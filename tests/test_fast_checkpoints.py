"""Fast checkpoints: reused staging buffers, best-K from the staged copy of a save in flight, the fidelity digest
off the load path, and the benchmark's smoke run. Real DCP files on a real (world-of-one) gloo process group."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from curry_train import distributed
from curry_train.checkpoint import io
from curry_train.checkpoint import state as state_module
from curry_train.checkpoint.checkpointer import Checkpointer
from curry_train.checkpoint.policy import Checkpoint, Role
from curry_train.checkpoint.staging import Segment, Stager
from curry_train.checkpoint.state import Contents, Progress, StateDictCache, app_state, param_digest
from curry_train.checkpoint.store import RunDir
from curry_train.journal import Journal, read_journal
from tests.conftest import _env, tiny_model_after_one_step
from tests.test_writer_process import assert_same_items

REPO = Path(__file__).resolve().parents[1]


def test_stager_reuses_its_buffers_and_holds_the_state_of_its_call() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    stager = Stager()
    first, snapshot = stager.stage({"model": model.state_dict(), "meta": {"lr": [0.1, 0.2]}})
    snapshot.take()
    snapshot.wait()
    ptrs = {k: v.data_ptr() for k, v in first["model"].items()}
    before = {k: v.clone() for k, v in first["model"].items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what optimizer.step() does after the save was staged
    assert all(torch.equal(first["model"][k], before[k]) for k in before), "the staged copy followed the model"
    assert stager.allocations == 4
    second, snapshot = stager.stage({"model": model.state_dict(), "meta": {"lr": [0.1, 0.2]}})
    snapshot.take()
    assert stager.allocations == 4, "a second save of the same state allocated new buffers"
    assert {k: v.data_ptr() for k, v in second["model"].items()} == ptrs
    assert all(torch.equal(second["model"][k], v) for k, v in model.state_dict().items())


def test_stager_allocates_only_what_a_changed_state_lacks_and_stages_it_all() -> None:
    """A save walks its state once while every buffer exists; a tensor that is new, or changed shape, gets a buffer
    (the first save after the optimizer made its state) and the others keep theirs."""
    stager = Stager()
    staged, snapshot = stager.stage({"w": torch.ones(4)})
    snapshot.take()
    kept = staged["w"].data_ptr()
    for state in ({"w": torch.full((4,), 2.0), "m": torch.full((3,), 3.0)}, {"w": torch.full((5,), 4.0)}):
        staged, snapshot = stager.stage(state)
        snapshot.take()
        assert all(torch.equal(staged[k], v) and staged[k] is not v for k, v in state.items())
        assert all(stager.locate(staged[k]) is not None for k in state), "a buffer outside the stager's segments"
    assert stager.allocations == 3, "a buffer was allocated that the state did not lack"
    assert stager.buffers["/m"].shape == (3,) and staged["w"].data_ptr() != kept


def test_snapshot_copies_are_made_by_take_and_waited_for_before_the_update() -> None:
    """Staging builds the structure at once and leaves the tensor copies to the snapshot, which the writer takes
    while the next forward and backward run; `wait` (before the update) returns only once it is taken."""
    weight = torch.zeros(1000)
    staged, snapshot = Stager().stage({"w": weight, "step": 7})
    assert staged["step"] == 7
    weight += 1.0  # the forward and backward do not change parameters; this shows when the copy is made
    waited = threading.Event()
    waiter = threading.Thread(target=lambda: (snapshot.wait(), waited.set()))
    waiter.start()
    assert not waited.wait(0.2), "the update went ahead before the save had its copy"
    snapshot.take()
    waiter.join(5)
    assert waited.is_set() and torch.equal(staged["w"], torch.ones(1000))


def _resident_bytes() -> int:
    """This process's resident memory, shared pages included (what a page fault adds to)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_a_segment_populated_ahead_is_resident_before_any_copy_touches_it(shared: bool) -> None:
    """What `Stager.reserve` relies on: once populated, the first snapshot copy into the buffers faults in nothing
    (a fault in a thread of the training process takes the memory map's lock that the training thread needs)."""
    nbytes = 64 << 20
    segment = Segment(nbytes, shared=shared, pin=False)
    before = _resident_bytes()
    segment.populate()
    assert _resident_bytes() - before >= 0.9 * nbytes, "populate left the segment's pages to the first copy"


def test_prepare_plans_and_faults_in_the_first_saves_buffers_ahead_of_it(world_of_one: dict[str, Any]) -> None:
    ckpt, state, model = world_of_one["ckpt"], world_of_one["state"], world_of_one["model"]
    ckpt.prepare(state(Contents.FULL))
    ckpt.stager.wait_populated()
    allocated, ptrs = ckpt.stager.allocations, {k: b.data_ptr() for k, b in ckpt.stager.buffers.items()}
    # Each parameter, its two Adam moments and its Adam step counter (a tensor too).
    assert allocated == 4 * len(list(model.parameters())), "not every tensor of the state has its buffer"
    ckpt.save(1, [Role.RECOVERY], Contents.FULL, state(Contents.FULL))
    ckpt.wait()
    assert ckpt.stager.allocations == allocated, "the first save allocated staging buffers although prepared"
    assert {k: b.data_ptr() for k, b in ckpt.stager.buffers.items()} == ptrs
    assert ckpt.store.verify(Checkpoint(Role.RECOVERY, 1)) == []
    # Planned ahead too: the first save took that plan, and wrote what a save planned on the spot writes.
    assert (ckpt.plans.misses, ckpt.plans.hits) == (0, 1), "the first save planned although prepared"
    ckpt.plans.plans.clear()
    ckpt.save(2, [Role.RECOVERY], Contents.FULL, state(Contents.FULL))
    ckpt.wait()
    assert ckpt.plans.misses == 1
    paths = [ckpt.store.path_of(Checkpoint(Role.RECOVERY, step)) for step in (1, 2)]
    assert_same_items(*paths)


@pytest.fixture
def world_of_one(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A tiny FSDP2 model, its optimizer after one step, and a Checkpointer on a world-of-one gloo group."""
    env = distributed.init_distributed("cpu")
    try:
        cfg, model, optimizer = tiny_model_after_one_step(env)
        progress = Progress(step=1, cursor=8)
        saved: dict[str, Any] = {}
        state_dicts = StateDictCache(model, optimizer)  # as the loop's TrainState has it

        def state(contents: Contents) -> dict:
            fidelity = (lambda: [8, 9], saved.update)
            return app_state(
                contents, model, optimizer, progress, {"step": 1}, 0, env.device, fidelity=fidelity, cache=state_dicts
            )

        run = tmp_path / "run"
        run.mkdir()
        journal = Journal(run / "journal.jsonl")
        config = dataclasses.replace(cfg.checkpoint, async_save=True)
        ckpt = Checkpointer(config, store=RunDir(run), journal=journal, group=env.checkpoint_group, rank=env.rank)
        yield {"ckpt": ckpt, "state": state, "model": model, "optimizer": optimizer, "saved": saved, "run": run}
        journal.close()
    finally:
        distributed.shutdown()


def assert_same_state_dict(built: Any, dcp: Any, path: str = "") -> None:
    """`built` is what DCP gave: the same keys in the same order, views of the same bytes, equal values."""
    assert type(built) is type(dcp), path
    if isinstance(dcp, dict):
        assert list(built) == list(dcp), path
        for k in dcp:
            assert_same_state_dict(built[k], dcp[k], f"{path}/{k}")
    elif isinstance(dcp, list | tuple):
        assert len(built) == len(dcp), path
        for i, (a, b) in enumerate(zip(built, dcp, strict=True)):
            assert_same_state_dict(a, b, f"{path}/{i}")
    elif isinstance(dcp, torch.Tensor):
        a, b = (t._local_tensor if isinstance(t, DTensor) else t for t in (built, dcp))
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr(), f"{path}: not the same tensor"
        assert (a.shape, a.stride(), built.requires_grad) == (b.shape, b.stride(), dcp.requires_grad), path
    else:
        assert built == dcp, path


def test_state_dicts_built_without_dcp_are_dcps_and_read_the_live_state(world_of_one: dict[str, Any]) -> None:
    """The loop's saves take the model's and optimizer's state dicts from a `StateDictCache`: after DCP's first
    answer it builds them itself, and what it builds must be exactly what DCP would give at that moment, whatever
    the update, the schedule or a load changed since."""
    model, optimizer = world_of_one["model"], world_of_one["optimizer"]
    cache = StateDictCache(model, optimizer)

    def check(built_by_cache: int) -> None:
        """The cache's model and optimizer state dicts are DCP's; `built_by_cache` of the two were not asked of it."""
        hits = cache.hits
        built = (cache.model_state_dict(), cache.optimizer_state_dict())
        assert cache.hits == hits + built_by_cache
        assert_same_state_dict(built, (get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)))

    check(built_by_cache=0)  # DCP's, and its names kept
    for lr in (5e-4, 2e-4):  # an update, and the schedule's next lr: both read live
        for group in optimizer.param_groups:
            group["lr"] = lr
        model(torch.randint(0, 256, (2, 32))).sum().backward()
        optimizer.step()
        check(built_by_cache=2)
    assert cache.optimizer_state_dict()["param_groups"][0]["lr"] == 2e-4
    # A load makes new state tensors and new groups (their keys in the saved order): DCP answers once more.
    optimizer.load_state_dict(optimizer.state_dict())
    check(built_by_cache=1)
    check(built_by_cache=2)
    built = cache.optimizer_state_dict()
    name, param = built["param_groups"][0]["params"][0], optimizer.param_groups[0]["params"][0]
    assert built["state"][name]["exp_avg"] is optimizer.state[param]["exp_avg"], "an earlier state tensor was kept"
    optimizer.zero_grad()
    optimizer.state.clear()  # what a parameters-only resume does: DCP answers (and creates the state) again
    hits = cache.hits
    assert_same_state_dict(cache.optimizer_state_dict(), get_optimizer_state_dict(model, optimizer))
    assert cache.hits == hits, "the state of an optimizer without state was built, not asked of DCP"
    check(built_by_cache=2)
    # Unsharded (as between a forward and its backward without resharding) the modules hold plain tensors: DCP
    # answers, and its pre-save hook reshards them; the sharded model is built again after that.
    model.unshard()
    assert not isinstance(next(model.parameters()), DTensor)
    check(built_by_cache=1)
    assert isinstance(next(model.parameters()), DTensor), "DCP's hook did not reshard the model"
    check(built_by_cache=2)


def test_state_dicts_of_a_model_dcp_names_otherwise_are_always_dcps() -> None:
    """Tied weights: DCP names the shared parameter twice, `named_parameters()` once; such a model is never built."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    cache = StateDictCache(model, torch.optim.AdamW(model.parameters()))
    for _ in range(2):
        assert list(cache.model_state_dict()) == ["0.weight", "1.weight"]
    assert cache.hits == 0


def test_best_k_at_a_step_with_a_full_save_in_flight_writes_its_staged_parameters(
    world_of_one: dict[str, Any],
) -> None:
    ckpt, state, run, model, optimizer = (world_of_one[k] for k in ("ckpt", "state", "run", "model", "optimizer"))
    saved = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    ckpt.save(1, [Role.RECOVERY], Contents.FULL, state(Contents.FULL))
    assert ckpt.writing is not None, "an asynchronous save returned after its write"
    allocations = ckpt.stager.allocations
    factory_calls = []
    assert ckpt.consider_best_k(1, 3.25, lambda: factory_calls.append(1) or state(Contents.PARAMS))
    assert factory_calls == [], "best-K collected a state to write although the step's save has its copy"
    assert ckpt.stager.allocations == allocations, "best-K staged the model a second time"
    # The next step's update at once, while both may still be writing: the best-K holds the step's parameters.
    ckpt.before_update()
    model(torch.randint(0, 256, (2, 32))).sum().backward()
    optimizer.step()
    ckpt.wait()
    store = RunDir(run)
    best = store.list(Role.BEST_K)[0]
    path = store.path_of(best)
    manifest = store.manifest(best)
    assert manifest.contents is Contents.PARAMS and manifest.linked_from is None
    assert all((path / name).stat().st_nlink == 1 for name in manifest.files), "best-K shares the full save's files"
    assert store.verify(best) == []
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert {key.split(".")[0] for key in metadata} == {"model", "progress", "dataloader"}
    io.load({"model": state_module.ModelState(model)}, path, ckpt.group)
    assert all(torch.equal(v.full_tensor(), saved[k]) for k, v in model.state_dict().items())
    saves = [e for e in read_journal(run / "journal.jsonl") if e["event"] == "save"]
    assert [(e["role"], e.get("params_of")) for e in saves] == [
        ("recovery", None),
        ("best_k", "recovery/step-00000001.dcp"),
    ]
    assert saves[0]["mode"] == "async" and saves[0]["cost_seconds"] is not None


def test_best_k_at_a_step_with_a_parameters_only_save_in_flight_is_hard_links_of_it(
    world_of_one: dict[str, Any],
) -> None:
    ckpt, state, run = world_of_one["ckpt"], world_of_one["state"], world_of_one["run"]
    ckpt.save(1, [Role.ROLLBACK], Contents.PARAMS, state(Contents.PARAMS))
    assert ckpt.consider_best_k(1, 3.25, lambda: pytest.fail("best-K collected a state to write"))
    ckpt.wait()
    store = RunDir(run)
    rollback = store.path_of(Checkpoint(Role.ROLLBACK, 1))
    best = store.path_of(store.list(Role.BEST_K)[0])
    for name in ("__0_0.distcp", ".metadata"):
        assert (rollback / name).stat().st_ino == (best / name).stat().st_ino


def test_an_async_save_holds_the_state_of_its_step_although_the_update_follows_at_once(
    world_of_one: dict[str, Any],
) -> None:
    ckpt, state, model, optimizer = (
        world_of_one["ckpt"],
        world_of_one["state"],
        world_of_one["model"],
        world_of_one["optimizer"],
    )
    saved = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    ckpt.save(1, [Role.RECOVERY], Contents.FULL, state(Contents.FULL))
    ckpt.before_update()  # what train_step calls before optimizer.step()
    model(torch.randint(0, 256, (2, 32))).sum().backward()
    optimizer.step()  # the next step's update, while the save may still be writing
    ckpt.wait()
    after = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(after[k], saved[k]) for k in saved), "the update changed nothing: the test is void"
    io.load(state(Contents.FULL), ckpt.store.path_of(Checkpoint(Role.RECOVERY, 1)), ckpt.group)
    assert all(torch.equal(v.full_tensor(), saved[k]) for k, v in model.state_dict().items())
    [save] = [e for e in read_journal(world_of_one["run"] / "journal.jsonl") if e["event"] == "save"]
    assert save["snapshot_wait_seconds"] >= 0.0


def test_best_k_at_a_committed_full_step_writes_its_staged_parameters_and_buffers_are_reused(
    world_of_one: dict[str, Any],
) -> None:
    ckpt, state, run = world_of_one["ckpt"], world_of_one["state"], world_of_one["run"]
    ckpt.save(1, [Role.ROLLBACK], Contents.FULL, state(Contents.FULL))
    ckpt.wait()
    allocated, ptrs = ckpt.stager.allocations, {k: b.data_ptr() for k, b in ckpt.stager.buffers.items()}
    assert ckpt.consider_best_k(1, 3.0, lambda: pytest.fail("best-K staged the step's state a second time"))
    ckpt.save(2, [Role.ROLLBACK], Contents.FULL, state(Contents.FULL))
    ckpt.wait()
    assert ckpt.stager.allocations == allocated, "the second save allocated staging buffers again"
    assert {k: b.data_ptr() for k, b in ckpt.stager.buffers.items()} == ptrs
    store = RunDir(run)
    best = store.list(Role.BEST_K)
    assert [c.step for c in best] == [1] and store.manifest(best[0]).linked_from is None
    assert store.manifest(best[0]).contents is Contents.PARAMS and store.verify(best[0]) == []
    assert [c.step for c in store.list(Role.ROLLBACK)] == [1, 2]


def test_fidelity_digest_comes_from_the_save_and_is_not_computed_on_load(
    world_of_one: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, state, model, saved = (
        world_of_one["ckpt"],
        world_of_one["state"],
        world_of_one["model"],
        world_of_one["saved"],
    )
    ckpt.save(1, [Role.RECOVERY], Contents.FULL, state(Contents.FULL))
    ckpt.wait()
    digests = []
    real_digest = state_module._digest
    monkeypatch.setattr(state_module, "_digest", lambda *args: digests.append(1) or real_digest(*args))
    io.load(state(Contents.FULL), ckpt.store.path_of(Checkpoint(Role.RECOVERY, 1)), ckpt.group)
    assert digests == [], "loading computed the parameter digest"
    # The writer's digest, taken from the staged copy, is the live parameters' digest: a resume's check passes.
    assert saved["params"] == param_digest(model) and saved["next_indices"] == [8, 9]


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_checkpoint", REPO / "scripts" / "bench_checkpoint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_measures_each_save_on_the_steps_after_it_against_the_runs_other_steps(tmp_path: Path) -> None:
    bench = _bench()
    # 20 steps of 2 s, a save every 6 steps, each slowing the 3 steps after it by 0.5, 0.25 and 0.1 s; step 16 is
    # slow for another reason and moves the baseline (a median) not at all.
    extra = {7: 0.5, 8: 0.25, 9: 0.1, 13: 0.5, 14: 0.25, 15: 0.1, 19: 0.5, 20: 0.25, 16: 1.0}
    times, now = [], 0.0
    for step in range(1, 21):
        now += 2.0 + extra.get(step, 0.0)
        times.append({"step": step, "time": now})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in times))
    # The save after step 18 has only 2 steps after it in the run: not measured, and its steps are no baseline.
    assert bench.measured_saves(6, 20, 3) == [6, 12]
    assert bench.save_extras(tmp_path, 6, 20, 3) == pytest.approx([0.85, 0.85])
    # The standard error comes from the runs' means (a run's saves share its baseline).
    assert bench.run_stderr([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]) == 0.0
    assert bench.run_stderr([[0.0, 0.0], [2.0, 2.0]]) == pytest.approx(1.0)


def test_benchmark_smoke_run_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--model", "tiny", "--nproc", "2", "--reps", "1", "--io-reps", "1", "--loop-steps", "6"]
    args += ["--save-every", "2", "--after-steps", "1", "--step-rounds", "2", "--step-steps", "2"]
    args += ["--policy-steps", "4", "--blocking-saves", "2", "--json", str(out)]
    args += ["--dir", str(tmp_path / "scratch")]
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_checkpoint.py"), *args],
        cwd=tmp_path,
        env={**_env(), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {"disk_write", "disk_read", "dcp_save", "dcp_load", "sync_save", "resume_load", "loop_off", "loop_async"}
    rows |= {"loop_sync", "async_journal_cost", "plain_step", "harness_step", "policy_off", "policy_default"}
    rows |= {"disk_write_direct", "sync_save_buffered", "resume_verified", "loop_async_buffered", "loop_async_thread"}
    rows |= {"policy_default_journal_cost", "dcp_load_warm", "resume_load_warm"}
    rows |= {"blocking_dcp_state_dicts", "blocking_cached_state_dicts"}
    assert set(result["rows"]) == rows
    journal_rows = {"async_journal_cost", "policy_default_journal_cost"}  # zero when no save fell in the window
    assert all(row["seconds"] > 0 for name, row in result["rows"].items() if name not in journal_rows)
    saving = {name for name in rows if name.startswith("loop_") and name != "loop_off"}
    assert all(result["rows"][name]["blocking_s"] > 0 for name in saving), "a loop row lacks what saves blocked"
    assert "blocking_s" not in result["rows"]["loop_off"]
    assert all("stall_stderr_s" in result["rows"][name] for name in saving)
    assert [len(run) for run in result["raw"]["loops"]["extras"]["async"]] == [2]  # saves after steps 2 and 4
    assert result["ratios"]["save_blocking_cached_vs_dcp_state_dicts"] > 0
    assert len(result["raw"]["io"]["blocking_cached_state_dicts"]) == 2
    assert set(result["goals"]) == {
        "async_stall_vs_sync",
        "journal_cost_vs_outside",
        "sync_save_vs_disk_write",
        "resume_load_vs_dcp_load",
        "harness_vs_plain_step",
        "default_policy_cost",
    }
    assert "load average" in result["machine"] and "harness_vs_plain_step" in proc.stdout
    assert not (tmp_path / "scratch").exists(), "the benchmark left its scratch directory behind"
