"""Tests for curry_train.checkpoint.store on real files (tmp_path), real hard links and a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from curry_train.checkpoint import checksum
from curry_train.checkpoint.durable import link_or_copy
from curry_train.checkpoint.manifest import MANIFEST, Manifest
from curry_train.checkpoint.policy import Checkpoint, Role
from curry_train.checkpoint.store import REPLACED_PREFIX, RunDir

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARDS = ("__0_0.distcp", "__1_0.distcp", ".metadata")


def rb(step: int) -> Checkpoint:
    return Checkpoint(Role.ROLLBACK, step)


def rc(step: int) -> Checkpoint:
    return Checkpoint(Role.RECOVERY, step)


def write_fake_dcp(staging: Path, nbytes: int = 4096, seed: int = 0) -> dict[str, bytes]:
    """A few files of random bytes standing in for DCP shards."""
    contents = {}
    for i, name in enumerate(SHARDS):
        data = os.urandom(nbytes + i + seed)
        (staging / name).write_bytes(data)
        contents[name] = data
    return contents


def save(run: RunDir, ckpt: Checkpoint, nbytes: int = 4096, extra: dict | None = None) -> Manifest:
    staging = run.staging_dir(ckpt)
    write_fake_dcp(staging, nbytes)
    return run.commit(ckpt, staging, extra=extra)


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    return RunDir(tmp_path / "run")


# ------------------------------------------------------------------------------------------------ commit


def test_commit_makes_checkpoint_listable_with_correct_manifest(run: RunDir) -> None:
    ckpt = rc(1000)
    staging = run.staging_dir(ckpt)
    assert staging == run.path / "recovery" / f".tmp-{ckpt.name}"
    contents = write_fake_dcp(staging)
    assert run.list() == []

    manifest = run.commit(ckpt, staging, extra={"world_size": 2})

    final = run.path / "recovery" / ckpt.name
    assert not staging.exists() and final.is_dir()
    assert run.list() == [ckpt] and run.list(Role.RECOVERY) == [ckpt] and run.list(Role.ROLLBACK) == []
    on_disk = json.loads((final / MANIFEST).read_text())
    assert on_disk["role"] == "recovery" and on_disk["step"] == 1000 and on_disk["name"] == ckpt.name
    assert on_disk["extra"] == {"world_size": 2}
    assert on_disk["created"].endswith("+00:00")
    assert set(on_disk["files"]) == set(contents)
    for name, data in contents.items():
        assert on_disk["files"][name] == {"bytes": len(data), "xxh3_64": checksum.of_file(final / name)}
    assert on_disk["total_bytes"] == sum(len(d) for d in contents.values()) == manifest.total_bytes
    assert run.manifest(ckpt) == manifest
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert run.verify(ckpt) == []


def test_best_k_checkpoint_round_trips_through_listing(run: RunDir) -> None:
    ckpt = Checkpoint(Role.BEST_K, 450, 2.341, "dev_loss")
    save(run, ckpt)
    assert (run.path / "best-k" / ckpt.name / MANIFEST).is_file()
    [listed] = run.list(Role.BEST_K)
    assert listed.relpath == ckpt.relpath and listed.step == 450
    assert run.manifest(ckpt).metric == 2.341 and run.manifest(ckpt).metric_name == "dev_loss"


def test_list_is_sorted_and_ignores_junk(run: RunDir) -> None:
    for step in (300, 100, 200):
        save(run, rb(step))
    save(run, rc(200))
    (run.path / "rollback" / "notes.txt").write_text("junk")
    (run.path / "rollback" / "not-a-checkpoint").mkdir()
    (run.path / "rollback" / ".trash-step-00000050.dcp-deadbeef").mkdir()
    assert run.list() == [rc(200), rb(100), rb(200), rb(300)]
    assert run.list(Role.ROLLBACK) == [rb(100), rb(200), rb(300)]


def test_interrupted_staging_is_not_listed_and_is_cleaned(run: RunDir) -> None:
    save(run, rb(100))
    staging = run.staging_dir(rb(200))
    (staging / "__0_0.distcp").write_bytes(os.urandom(1000))  # killed mid-write: no manifest, no rename
    assert run.list() == [rb(100)]

    removed = run.clean_leftovers()

    assert removed == [staging] and not staging.exists()
    assert run.list() == [rb(100)] and run.verify(rb(100)) == []


def test_staging_with_all_files_and_manifest_but_no_rename_is_not_listed(run: RunDir) -> None:
    save(run, rb(100))
    staging = run.staging_dir(rb(200))
    write_fake_dcp(staging)
    (staging / MANIFEST).write_text(json.dumps({"role": "rollback"}))  # killed between manifest and rename
    assert run.list() == [rb(100)]
    assert run.clean_leftovers() == [staging]
    assert run.list() == [rb(100)]


def test_final_name_without_manifest_is_not_listed(run: RunDir) -> None:
    d = run.path / "rollback" / rb(100).name
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"x")
    assert run.list() == []
    assert run.verify(rb(100)) == [f"{d}: {MANIFEST} missing (checkpoint was never committed)"]


def test_staging_dir_replaces_leftover_from_earlier_crash(run: RunDir) -> None:
    staging = run.staging_dir(rb(100))
    (staging / "stale.distcp").write_bytes(b"old")
    again = run.staging_dir(rb(100))
    assert again == staging and list(again.iterdir()) == []


def test_recommit_of_existing_name_replaces_it(run: RunDir) -> None:
    save(run, rc(500), nbytes=100)
    run.set_latest(rc(500))
    old = run.manifest(rc(500))

    new = save(run, rc(500), nbytes=5000)  # the same step saved again after a resume

    assert run.list() == [rc(500)] and run.latest() == rc(500)
    assert run.manifest(rc(500)) == new and new.total_bytes != old.total_bytes
    assert run.verify(rc(500)) == []
    assert sorted(p.name for p in (run.path / "recovery").iterdir()) == [rc(500).name]  # no trash left


def test_resave_interrupted_before_the_new_one_is_in_place_restores_the_old(run: RunDir) -> None:
    """The one window of a re-save: the old checkpoint moved aside, the new one not yet renamed in. A crash there
    must not lose the step: the next start puts the old one back and drops the unfinished new one."""
    old = save(run, rc(500), nbytes=100)
    run.set_latest(rc(500))
    staging = run.staging_dir(rc(500))
    write_fake_dcp(staging, 5000)
    run._move_aside(run.path_of(rc(500)), REPLACED_PREFIX)  # where a SIGKILL in _publish would leave things
    assert run.list() == [] and run.latest() is None

    run.clean_leftovers()

    assert run.list() == [rc(500)] and run.latest() == rc(500)
    assert run.manifest(rc(500)) == old and run.verify(rc(500)) == []
    assert sorted(p.name for p in (run.path / "recovery").iterdir()) == [rc(500).name]


def test_replaced_copy_left_after_the_new_one_is_in_place_is_removed(run: RunDir) -> None:
    save(run, rc(500), nbytes=100)
    aside = run._move_aside(run.path_of(rc(500)), REPLACED_PREFIX)
    new = save(run, rc(500), nbytes=5000)  # the new one made it; the crash came before the old one was removed
    assert aside.exists()
    run.clean_leftovers()
    assert run.manifest(rc(500)) == new
    assert sorted(p.name for p in (run.path / "recovery").iterdir()) == [rc(500).name]


# ------------------------------------------------------------------------------------------------ latest


def test_latest_link_is_relative_and_swapped_atomically(run: RunDir) -> None:
    assert run.latest() is None
    save(run, rc(1000))
    run.set_latest(rc(1000))
    link = run.path / "latest"
    assert link.is_symlink() and os.readlink(link) == "recovery/step-00001000.dcp"
    assert not os.path.isabs(os.readlink(link)) and run.latest() == rc(1000)

    save(run, rc(2000))
    # A save that is committed but not yet linked leaves the old target valid.
    assert run.latest() == rc(1000) and run.verify(rc(1000)) == []
    (run.path / "latest.tmp").symlink_to("junk")  # stale tmp link from an earlier crash
    run.set_latest(rc(2000))

    assert os.readlink(link) == rc(2000).relpath and run.latest() == rc(2000)
    assert not (run.path / "latest.tmp").is_symlink()
    assert (link.resolve() / MANIFEST).is_file()
    # Relative, so the run directory can be moved without breaking the link.
    moved = RunDir(run.path.rename(run.path.with_name("moved")))
    assert moved.latest() == rc(2000)


def test_set_latest_refuses_uncommitted(run: RunDir) -> None:
    run.staging_dir(rc(1000))
    with pytest.raises(ValueError):
        run.set_latest(rc(1000))
    assert not (run.path / "latest").is_symlink()


def test_latest_is_none_when_missing_or_dangling(run: RunDir) -> None:
    assert run.latest() is None
    save(run, rb(100))
    run.set_latest(rb(100))
    link = run.path / "latest"
    link.unlink()
    link.symlink_to("rollback/step-00000999.dcp")  # dangling
    assert run.latest() is None
    link.unlink()
    link.symlink_to("somewhere/else")
    assert run.latest() is None
    link.unlink()
    uncommitted = run.path / "rollback" / rb(200).name
    uncommitted.mkdir()
    link.symlink_to(rb(200).relpath)  # points at a dir without manifest
    assert run.latest() is None


def test_clean_leftovers_removes_stale_latest_tmp(run: RunDir) -> None:
    save(run, rb(100))
    run.set_latest(rb(100))
    tmp_link = run.path / "latest.tmp"
    tmp_link.symlink_to("rollback/gone")
    assert run.clean_leftovers() == [tmp_link]
    assert not tmp_link.is_symlink() and run.latest() == rb(100)
    assert run.clean_leftovers() == []


# ------------------------------------------------------------------------------------------------ delete


def test_delete_refuses_latest(run: RunDir) -> None:
    save(run, rb(100))
    run.set_latest(rb(100))
    with pytest.raises(ValueError):
        run.delete(rb(100))
    assert run.list() == [rb(100)] and run.verify(rb(100)) == []


def test_delete_removes_and_returns_bytes(run: RunDir) -> None:
    m = save(run, rb(100), nbytes=10_000)
    save(run, rb(200))
    run.set_latest(rb(200))

    freed = run.delete(rb(100))

    assert freed == m.total_bytes > 30_000
    assert run.list() == [rb(200)]
    assert sorted(p.name for p in (run.path / "rollback").iterdir()) == [rb(200).name]
    with pytest.raises(FileNotFoundError):
        run.delete(rb(100))


# --------------------------------------------------------------------------------------------------- link


def test_link_shares_inodes_and_disk_usage_counts_once(run: RunDir) -> None:
    src_m = save(run, rb(1000), nbytes=50_000)
    usage_one = run.disk_usage()

    dst_m = run.link(rb(1000), rc(1000))

    assert run.list() == [rc(1000), rb(1000)]
    assert dst_m.role == Role.RECOVERY and dst_m.name == rc(1000).name
    assert dst_m.linked_from == rb(1000).relpath
    assert dst_m.files == src_m.files and dst_m.total_bytes == src_m.total_bytes
    for rel in src_m.files:
        assert os.stat(run.path_of(rb(1000)) / rel).st_ino == os.stat(run.path_of(rc(1000)) / rel).st_ino
    assert run.verify(rc(1000)) == [] and run.verify(rb(1000)) == []
    # Only the second manifest adds bytes; the shared shards count once.
    manifest_bytes = (run.path_of(rc(1000)) / MANIFEST).stat().st_size
    assert run.disk_usage() == usage_one + manifest_bytes

    run.set_latest(rc(1000))
    run.delete(rb(1000))  # dropping the rollback copy keeps the recovery one intact
    assert run.verify(rc(1000)) == [] and run.list() == [rc(1000)]


def test_link_or_copy_falls_back_to_copy_across_devices(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second filesystem (/dev/shm) to provoke EXDEV")
    src = tmp_path / "shard.distcp"
    src.write_bytes(os.urandom(1000))
    dst = shm / f"curry-train-test-{os.getpid()}.distcp"
    try:
        assert link_or_copy(src, dst) is False  # EXDEV: copied, not linked
        assert dst.read_bytes() == src.read_bytes() and os.stat(dst).st_ino != os.stat(src).st_ino
    finally:
        dst.unlink(missing_ok=True)
    same_fs = tmp_path / "linked.distcp"
    assert link_or_copy(src, same_fs) is True and os.stat(same_fs).st_ino == os.stat(src).st_ino


def test_link_refuses_uncommitted_source(run: RunDir) -> None:
    run.staging_dir(rb(1000))
    with pytest.raises(FileNotFoundError):
        run.link(rb(1000), rc(1000))
    assert run.list() == []


# ------------------------------------------------------------------------------------------------- verify


def test_verify_catches_flipped_byte_and_truncation(run: RunDir) -> None:
    save(run, rb(100), nbytes=20_000)
    final = run.path_of(rb(100))
    shard = final / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[12_345] ^= 0x01
    shard.write_bytes(bytes(data))
    [problem] = run.verify(rb(100))
    assert "__0_0.distcp" in problem and "checksum" in problem and "corrupted" in problem

    other = final / "__1_0.distcp"
    other.write_bytes(other.read_bytes()[:-7])
    problems = run.verify(final)  # also accepts a path
    assert len(problems) == 2 and any("__1_0.distcp" in p and "size" in p for p in problems)

    (final / ".metadata").unlink()
    (final / "stray.bin").write_bytes(b"?")
    problems = run.verify(rb(100))
    assert any(".metadata: missing" in p for p in problems)
    assert any("stray.bin: file not in manifest" in p for p in problems)


def test_verify_missing_manifest_and_missing_dir(run: RunDir, tmp_path: Path) -> None:
    assert run.verify(rb(1)) and "does not exist" in run.verify(rb(1))[0]
    d = tmp_path / "bare"
    d.mkdir()
    assert run.verify(d) == [f"{d}: {MANIFEST} missing (checkpoint was never committed)"]


# ---------------------------------------------------------------------------------------------- real kill

_CHILD = textwrap.dedent(
    """
    import os, sys
    from curry_train.checkpoint.policy import Checkpoint, Role
    from curry_train.checkpoint.store import RunDir

    run, mode = RunDir(sys.argv[1]), sys.argv[2]
    ckpt = Checkpoint(Role.RECOVERY, 2000)
    staging = run.staging_dir(ckpt)
    block = os.urandom(1 << 20)
    for i in range(64):                          # 256 MiB in 4 MiB shards
        with open(staging / f"__{i}_0.distcp", "wb") as f:
            for _ in range(4):
                f.write(block)
                if mode == "write":
                    print("writing", flush=True)
                    mode = "written"
    if mode == "commit":
        print("committing", flush=True)
    run.commit(ckpt, staging)
    run.set_latest(ckpt)
    print("done", flush=True)
    """
)


def _spawn_and_kill(run_path: Path, mode: str) -> tuple[str, int]:
    """Run _CHILD, SIGKILL it as soon as it reports progress; returns (last line, return code)."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(run_path), mode], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    os.kill(proc.pid, signal.SIGKILL)
    rcode = proc.wait(timeout=60)
    proc.stdout.close()
    return line, rcode


def test_sigkill_mid_write_leaves_previous_checkpoints_and_latest(run: RunDir) -> None:
    save(run, rb(900))
    save(run, rc(1000))
    run.set_latest(rc(1000))
    before, usage = run.list(), run.disk_usage()

    line, rcode = _spawn_and_kill(run.path, "write")

    assert line == "writing" and rcode == -signal.SIGKILL
    staging = run.path / "recovery" / f".tmp-{rc(2000).name}"
    written = sum(p.stat().st_size for p in staging.iterdir())
    assert 0 < written < 256 << 20  # really cut off partway
    assert run.list() == before and run.latest() == rc(1000)
    assert run.disk_usage() == usage  # the partial save is not counted

    assert run.clean_leftovers() == [staging]
    assert run.list() == before and run.latest() == rc(1000)
    assert all(run.verify(c) == [] for c in before)


def test_sigkill_during_commit_never_exposes_a_partial_checkpoint(run: RunDir) -> None:
    save(run, rc(1000))
    run.set_latest(rc(1000))

    line, rcode = _spawn_and_kill(run.path, "commit")

    assert line == "committing" and rcode == -signal.SIGKILL
    listed = run.list()
    # Depending on where the kill landed the new save is absent or complete; never half there.
    assert listed in ([rc(1000)], [rc(1000), rc(2000)])
    assert all(run.verify(c) == [] for c in listed)
    assert run.latest() in (rc(1000), rc(2000))
    run.clean_leftovers()
    assert run.list() == listed
    assert not any(p.name.startswith((".tmp-", ".trash-")) for p in (run.path / "recovery").iterdir())


# ------------------------------------------------------------------------------------------------ real DCP


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_commit_real_dcp_checkpoint_readable_by_torch_tools(run: RunDir, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = rc(1000)
    staging = run.staging_dir(ckpt)
    dcp.save({"w": torch.arange(10.0)}, storage_writer=FileSystemWriter(staging))
    manifest = run.commit(ckpt, staging, extra={"torch": torch.__version__})
    final = run.path_of(ckpt)
    assert ".metadata" in manifest.files and run.verify(ckpt) == []

    loaded = {"w": torch.zeros(10)}
    dcp.load(loaded, storage_reader=FileSystemReader(final))
    assert torch.equal(loaded["w"], torch.arange(10.0))

    out = tmp_path / "out.pt"
    dcp_to_torch_save(final, out)
    assert (final / MANIFEST).is_file()
    assert torch.equal(torch.load(out)["w"], torch.arange(10.0))


def test_commit_uses_checksums_the_writing_ranks_computed(run: RunDir) -> None:
    """Rank 0 trusts each rank's checksum of its own shard (no re-read) but recomputes one whose size changed."""
    from curry_train.checkpoint.manifest import FileEntry, file_entry

    staging = run.staging_dir(rc(7))
    contents = write_fake_dcp(staging, 1000)
    names = sorted(contents)
    known = {names[0]: file_entry(staging / names[0]), names[1]: FileEntry(1, "deadbeef")}  # stale size
    manifest = run.commit(rc(7), staging, known=known)
    assert manifest.files[names[0]] == known[names[0]]
    assert manifest.files[names[1]] == file_entry(run.path_of(rc(7)) / names[1])
    assert run.verify(rc(7)) == []


def test_a_manifest_of_crc32_checksums_still_verifies(run: RunDir) -> None:
    """Checkpoints committed before xxh3 name crc32 in their manifests: they verify, and damage is still found."""
    save(run, rb(100), nbytes=20_000)
    final = run.path_of(rb(100))
    manifest = json.loads((final / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        manifest["files"][name] = {"bytes": entry["bytes"], "crc32": checksum.of_file(final / name, "crc32")}
    (final / MANIFEST).write_text(json.dumps(manifest))
    assert run.verify(rb(100)) == []
    assert run.manifest(rb(100)).files["__0_0.distcp"].algorithm == "crc32"
    shard = final / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0x80
    shard.write_bytes(bytes(data))
    [problem] = run.verify(rb(100))
    assert "__0_0.distcp: crc32 checksum" in problem


def test_a_manifest_entry_without_a_known_checksum_is_unreadable(run: RunDir) -> None:
    save(run, rb(100), nbytes=2_000)
    final = run.path_of(rb(100))
    manifest = json.loads((final / MANIFEST).read_text())
    manifest["files"]["__0_0.distcp"] = {"bytes": 2_000, "md4": "00"}
    (final / MANIFEST).write_text(json.dumps(manifest))
    [problem] = run.verify(rb(100))
    assert "unreadable" in problem and "xxh3_64" in problem


# ------------------------------------------------------------------------------------------------ rollback


def test_roll_back_sets_aside_newest_first_then_moves_latest(run: RunDir) -> None:
    for step in (5, 10, 15):
        save(run, rb(step))
    run.set_latest(rb(15))
    moved = run.roll_back(rb(5), [rb(15), rb(10)])
    assert [p.name.split("-")[1:3] for p in moved] == [["step", "00000015.dcp"], ["step", "00000010.dcp"]]
    assert run.list() == [rb(5)] and run.latest() == rb(5)
    assert not (run.path / "rollback-intent.json").exists()
    # Set aside whole: a manifest and every file, loadable by path.
    assert all(run.verify(p) == [] for p in moved)
    assert [a.step for a in run.abandoned()] == [10, 15]  # earliest step of the rollback first


def test_a_rollback_cut_short_by_a_crash_is_finished_at_the_next_start(run: RunDir) -> None:
    for step in (5, 10, 15):
        save(run, rb(step))
    run.set_latest(rb(15))
    # Where a crash right after the intent was made durable leaves the run directory: nothing set aside yet,
    # `latest` on the abandoned trajectory. Without the intent, the next start would resume step 15.
    (run.path / "rollback-intent.json").write_text(
        json.dumps({"target": rb(5).relpath, "abandoned": [rb(15).relpath, rb(10).relpath]})
    )
    target, moved = run.finish_interrupted_rollback()
    assert target == rb(5) and len(moved) == 2
    assert run.list() == [rb(5)] and run.latest() == rb(5)
    assert run.finish_interrupted_rollback() is None


def test_roll_back_to_a_parameters_only_checkpoint_moves_latest_there(run: RunDir) -> None:
    save(run, rb(5), extra={"contents": "params"})
    save(run, rc(10), extra={"contents": "full"})
    run.set_latest(rc(10))
    run.roll_back(rb(5), [rc(10)])
    # No full checkpoint remains at or before step 5: `latest` names the parameters-only one, never step 10.
    assert run.latest() == rb(5) and run.newest_full() is None


def test_abandoned_checkpoints_are_removed_oldest_rollback_first(run: RunDir) -> None:
    for step in (5, 10, 15):
        save(run, rb(step))
    run.set_latest(rb(15))
    run.roll_back(rb(5), [rb(15), rb(10)])
    save(run, rb(10), nbytes=100)
    run.set_latest(rb(10))
    run.roll_back(rb(5), [rb(10)])
    order = [(a.step, a.abandoned_ns) for a in run.abandoned()]
    assert [s for s, _ in order] == [10, 15, 10] and order[0][1] == order[1][1] < order[2][1]
    freed = run.remove_abandoned(run.abandoned()[0])
    assert freed > 4096 and [a.step for a in run.abandoned()] == [15, 10]
