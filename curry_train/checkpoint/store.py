"""The run directory on disk: the commit protocol, the latest link, listing, deletion, rollbacks' set-aside
checkpoints, and the one-writer lock.

Layout::

    <run>/latest -> recovery/step-00001000.dcp      relative symlink, swapped atomically
    <run>/{rollback,recovery,best-k}/<name>/       DCP files + manifest.json (written last)
    <run>/<roledir>/.tmp-<name>/                   a save in progress (never listed)
    <run>/<roledir>/.trash-<name>-<token>/         a checkpoint being replaced or deleted (never listed)

Nothing is lost: a checkpoint becomes visible only through the rename of its staging directory, and only after
every file, the manifest and the staging directory itself were fsynced. This module is plain filesystem code
(no torch); a DCP checkpoint is just a directory of files here.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from curry_train.checkpoint.durable import fsync_dir, fsync_file, link_or_copy, remove, write_json_durably
from curry_train.checkpoint.manifest import (
    MANIFEST,
    FileEntry,
    Manifest,
    check_file,
    checksum_tree,
    data_files,
)
from curry_train.checkpoint.policy import Checkpoint, Contents, Role, exact_resume_points, parse_checkpoint_name
from curry_train.layout import RunFiles

LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# A committed checkpoint moved aside while a re-save of the same name is renamed in. Unlike .trash- (a delete
# under way, possibly half removed), it is whole: if a crash strikes before the new one is in place, the next
# start puts it back.
REPLACED_PREFIX = ".replaced-"
# A committed checkpoint of a trajectory the run rolled back from: kept whole, out of listing, `latest` and the
# roles' retention; still loadable with +resume=PATH. Named .abandoned-<name>-<time set aside, ns>, so the oldest
# goes first under checkpoint.retention.abandoned_keep and `curry-train gc`.
ABANDONED_PREFIX = ".abandoned-"
# Written durably before a rollback sets anything aside and removed once `latest` names the target: a start that
# finds it finishes the rollback before choosing where to resume, so a crash mid-rollback never resumes the
# abandoned trajectory.


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Abandoned:
    """A checkpoint set aside by a rollback."""

    path: Path
    role: Role
    name: str
    step: int
    abandoned_ns: int  # when its rollback happened
    nbytes: int

    @property
    def relpath(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


def _fsync_tree(root: Path, durable: frozenset[str] = frozenset()) -> None:
    """fsync every file (but those in `durable`, relative paths), then every directory bottom-up (so each dir entry
    is durable too)."""
    for p in data_files(root):
        if p.relative_to(root).as_posix() not in durable:
            fsync_file(p)
    for dirpath, _dirnames, _filenames in os.walk(root, topdown=False):
        fsync_dir(dirpath)


# --------------------------------------------------------------------------------------------- one writer


class RunLock:
    """An advisory lock on the run directory, held by rank 0 for the life of a launch: one writer per run.

    `flock` locks belong to the open file: the kernel drops them when the holder dies, however it dies, so the
    lock of a killed launch never blocks its resume. The file records who holds it, for the message of a second
    launch.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = RunFiles(Path(run_dir)).lock
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns None, or a description of the launch that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            try:
                h = json.loads(holder)
                return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
            except (ValueError, KeyError, TypeError):
                return "another process (no holder recorded yet)"
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _now_iso()}).encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


# --------------------------------------------------------------------------------------------------- RunDir


class RunDir:
    """One run directory. Mutating methods are meant for rank 0 only, after a barrier."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.files = RunFiles(self.path)  # the run directory's own files around the checkpoints

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- paths

    def role_dir(self, role: Role) -> Path:
        return self.path / role.dirname

    def path_of(self, checkpoint: Checkpoint) -> Path:
        return self.path / checkpoint.relpath

    def _ensure_role_dir(self, role: Role) -> Path:
        d = self.role_dir(role)
        if not d.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            # The new role dir's entry must survive a power cut, or the checkpoint inside vanishes with it.
            fsync_dir(d.parent)
        return d

    def staging_dir(self, checkpoint: Checkpoint) -> Path:
        """Fresh ``<role>/.tmp-<name>`` for all ranks to write into; an old one from a crash is removed."""
        staging = self._ensure_role_dir(checkpoint.role) / f"{TMP_PREFIX}{checkpoint.name}"
        if staging.exists() or staging.is_symlink():
            remove(staging)
        staging.mkdir()
        return staging

    # -- commit

    def commit(
        self,
        checkpoint: Checkpoint,
        staging: Path,
        extra: dict[str, Any] | None = None,
        known: dict[str, FileEntry] | None = None,
        durable: frozenset[str] = frozenset(),
    ) -> Manifest:
        """Make a fully written staging dir durable and visible under its final name (`known`: checksums the
        writing ranks computed of their own files).

        `durable`: files (relative paths) whose writer already fsynced them and reported so before this call. They
        are not fsynced again: fsync makes a file's data durable whichever process or descriptor calls it, and the
        data cannot have changed since (nothing writes a staging file after its writer closed it), so a second call
        would only wait on the disk for nothing. Their directory entries are still fsynced below, with the rest."""
        staging = Path(staging)
        if not staging.is_dir():
            raise FileNotFoundError(f"staging dir does not exist: {staging}")
        _fsync_tree(staging, durable)
        manifest = Manifest(
            role=checkpoint.role,
            step=checkpoint.step,
            name=checkpoint.name,
            created=_now_iso(),
            files=checksum_tree(staging, known),
            metric=checkpoint.metric,
            metric_name=checkpoint.metric_name,
            extra=dict(extra or {}),
        )
        self._publish(checkpoint, staging, manifest)
        return manifest

    def link(self, src: Checkpoint, dst: Checkpoint) -> Manifest:
        """The committed ``src`` under a second role, sharing bytes via hard links (copies if impossible)."""
        src_manifest = self.manifest(src)
        src_dir = self.path_of(src)
        staging = self.staging_dir(dst)
        for rel in src_manifest.files:
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not link_or_copy(src_dir / rel, target):
                fsync_file(target)  # a copy holds new data; a hard link shares data already durable
        for dirpath, _dirnames, _filenames in os.walk(staging, topdown=False):
            fsync_dir(dirpath)
        manifest = Manifest(
            role=dst.role,
            step=dst.step,
            name=dst.name,
            created=_now_iso(),
            files=dict(src_manifest.files),
            metric=dst.metric,
            metric_name=dst.metric_name,
            extra=dict(src_manifest.extra),
            linked_from=src.relpath,
        )
        self._publish(dst, staging, manifest)
        return manifest

    def _publish(self, checkpoint: Checkpoint, staging: Path, manifest: Manifest) -> None:
        """Manifest last, then rename into place; the rename is the moment the checkpoint exists."""
        write_json_durably(staging / MANIFEST, manifest.to_dict())
        fsync_dir(staging)
        final = self.path_of(checkpoint)
        self._ensure_role_dir(checkpoint.role)
        replaced = self._move_aside(final, REPLACED_PREFIX) if final.exists() else None
        os.rename(staging, final)
        fsync_dir(final.parent)
        if staging.parent != final.parent:
            fsync_dir(staging.parent)
        if replaced is not None:
            trash = self._move_aside(replaced, TRASH_PREFIX, name=final.name)
            shutil.rmtree(trash)
            fsync_dir(trash.parent)

    def _move_to_trash(self, ckpt_dir: Path) -> Path:
        # rename() cannot replace a non-empty directory. Moving the old one aside first means a crash leaves
        # it under a .trash- name (cleaned on start) rather than a half-deleted dir that still lists.
        return self._move_aside(ckpt_dir, TRASH_PREFIX)

    @staticmethod
    def _move_aside(path: Path, prefix: str, name: str | None = None, token: str | None = None) -> Path:
        # A random token keeps an old leftover of the same name from blocking this rename.
        aside = path.with_name(f"{prefix}{name or path.name}-{token or uuid.uuid4().hex[:8]}")
        os.rename(path, aside)
        fsync_dir(path.parent)
        return aside

    # -- reading

    def list(self, role: Role | None = None) -> list[Checkpoint]:
        """Committed checkpoints (name parses and manifest present), sorted by (role, step)."""
        roles = [role] if role is not None else list(Role)
        committed = [c for r in roles for c in self._list_role(r)]
        return sorted(committed, key=lambda c: (c.role.value, c.step, c.name))

    def _list_role(self, role: Role) -> Iterator[Checkpoint]:
        d = self.role_dir(role)
        if not d.is_dir():
            return
        for entry in os.scandir(d):
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            checkpoint = parse_checkpoint_name(role, entry.name)
            if checkpoint is not None and os.path.isfile(os.path.join(entry.path, MANIFEST)):
                yield checkpoint

    def unreadable(self) -> list[Path]:
        """Directories named like checkpoints but without a manifest (never committed, or damaged since): never
        listed or resumed, but worth a word, since a reader might take them for checkpoints."""
        unreadable = []
        for role in Role:
            d = self.role_dir(role)
            if d.is_dir():
                unreadable += [
                    Path(e.path)
                    for e in os.scandir(d)
                    if not e.name.startswith(".")
                    and parse_checkpoint_name(role, e.name) is not None
                    and not os.path.isfile(os.path.join(e.path, MANIFEST))
                ]
        return sorted(unreadable)

    def dangling_latest(self) -> str | None:
        """What `latest` names when that is not a committed checkpoint (None when it is, or there is no link)."""
        link = self.path / LATEST
        if link.is_symlink() and self.latest() is None:
            return os.readlink(link)
        return None

    def is_committed(self, checkpoint: Checkpoint) -> bool:
        return (self.path_of(checkpoint) / MANIFEST).is_file()

    def manifest(self, checkpoint: Checkpoint) -> Manifest:
        """The manifest of a committed checkpoint (FileNotFoundError if it is not committed)."""
        return Manifest.read(self.path_of(checkpoint))

    # -- latest link

    def set_latest(self, checkpoint: Checkpoint) -> None:
        """Point ``latest`` at a committed checkpoint: relative symlink, swapped in with one os.replace."""
        if not self.is_committed(checkpoint):
            raise ValueError(f"refusing to point latest at an uncommitted checkpoint: {checkpoint.relpath}")
        tmp = self.path / (LATEST + ".tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(checkpoint.relpath, tmp)
        os.replace(tmp, self.path / LATEST)
        fsync_dir(self.path)

    def latest(self) -> Checkpoint | None:
        """The checkpoint ``latest`` points to, if the link exists and its target is committed."""
        link = self.path / LATEST
        if not link.is_symlink():
            return None
        checkpoint = self.parse_relpath(os.readlink(link))
        if checkpoint is None or not self.is_committed(checkpoint):
            return None
        return checkpoint

    @staticmethod
    def parse_relpath(relpath: str) -> Checkpoint | None:
        parts = PurePosixPath(relpath).parts
        if len(parts) != 2:
            return None
        role = next((r for r in Role if r.dirname == parts[0]), None)
        return None if role is None else parse_checkpoint_name(role, parts[1])

    # -- deletion and cleanup

    def delete(self, checkpoint: Checkpoint, remove: Callable[[Path], None] = shutil.rmtree) -> int:
        """Delete a committed checkpoint (never the one ``latest`` points to); returns its manifest bytes. It is gone
        once renamed to a `.trash-` directory (durably): `remove` then frees its bytes, at once by default."""
        current = self.latest()
        if current is not None and current.relpath == checkpoint.relpath:
            raise ValueError(f"refusing to delete the checkpoint latest points to: {checkpoint.relpath}")
        freed = self.manifest(checkpoint).total_bytes
        trash = self._move_to_trash(self.path_of(checkpoint))
        fsync_dir(trash.parent)
        remove(trash)
        return freed

    def roll_back(self, target: Checkpoint, abandoned: list[Checkpoint]) -> list[Path]:
        """Set `abandoned` aside, newest first, then point ``latest`` at `target` (whatever it holds); returns where
        they went. The intent is made durable first, so a crash part-way is finished by the next start."""
        if not self.is_committed(target):
            raise ValueError(f"refusing to roll back to an uncommitted checkpoint: {target.relpath}")
        intent = {"target": target.relpath, "abandoned": [c.relpath for c in abandoned]}
        write_json_durably(self.files.rollback_intent, intent)
        fsync_dir(self.path)
        return self._carry_out_rollback(target, abandoned)

    def _carry_out_rollback(self, target: Checkpoint, abandoned: list[Checkpoint]) -> list[Path]:
        moved = []
        token = f"{time.time_ns()}"  # one per rollback: retention orders by it, then by step
        for checkpoint in abandoned:
            if self.is_committed(checkpoint):
                moved.append(self._move_aside(self.path_of(checkpoint), ABANDONED_PREFIX, token=token))
        self.set_latest(target)
        self.files.rollback_intent.unlink()
        fsync_dir(self.path)
        return moved

    def finish_interrupted_rollback(self) -> tuple[Checkpoint, list[Path]] | None:
        """A rollback a crash cut short: finish it (call at start, before choosing where to resume)."""
        path = self.files.rollback_intent
        if not path.exists():
            return None
        intent = json.loads(path.read_text())
        target = self.parse_relpath(intent["target"])
        if target is None or not self.is_committed(target):
            raise ValueError(f"{path}: names {intent['target']!r}, which is not a committed checkpoint")
        abandoned = [c for rel in intent["abandoned"] if (c := self.parse_relpath(rel)) is not None]
        return target, self._carry_out_rollback(target, abandoned)

    def abandoned(self) -> list[Abandoned]:
        """Checkpoints set aside by rollbacks: the oldest rollback's first, and within one, the earliest step first
        (so retention keeps what lay closest to the newest spike)."""
        abandoned = []
        for role in (Role.ROLLBACK, Role.RECOVERY):
            d = self.role_dir(role)
            if not d.is_dir():
                continue
            for entry in os.scandir(d):
                if not entry.name.startswith(ABANDONED_PREFIX) or not entry.is_dir(follow_symlinks=False):
                    continue
                name, _, token = entry.name[len(ABANDONED_PREFIX) :].rpartition("-")
                checkpoint = parse_checkpoint_name(role, name)
                try:
                    nbytes = Manifest.read(Path(entry.path)).total_bytes
                except (OSError, ValueError, KeyError):
                    nbytes = _tree_bytes(Path(entry.path))
                order = int(token) if token.isdigit() else 0  # older releases used a random token
                abandoned.append(
                    Abandoned(Path(entry.path), role, name, checkpoint.step if checkpoint else 0, order, nbytes)
                )
        return sorted(abandoned, key=lambda a: (a.abandoned_ns, a.step, a.role is Role.RECOVERY))

    def remove_abandoned(self, item: Abandoned) -> int:
        """Delete a set-aside checkpoint for good; returns its bytes."""
        trash = self._move_aside(item.path, TRASH_PREFIX, name=item.path.name)
        shutil.rmtree(trash)
        fsync_dir(trash.parent)
        return item.nbytes

    def newest_full(self) -> Checkpoint | None:
        """The newest committed rollback or recovery checkpoint holding full state (recovery first on a tie)."""
        points = exact_resume_points(self.list(), lambda c: self.manifest(c).contents is Contents.FULL)
        return points[0] if points else None

    @staticmethod
    def _restore_replaced(role_dir: Path) -> None:
        """A re-save interrupted between moving the old checkpoint aside and renaming the new one in: put the old
        one back (the new one, never renamed, is an ordinary leftover)."""
        for entry in os.scandir(role_dir):
            if not entry.name.startswith(REPLACED_PREFIX):
                continue
            name = entry.name[len(REPLACED_PREFIX) :].rsplit("-", 1)[0]
            final = role_dir / name
            if final.exists():  # the new one made it; the old is garbage for the sweep that follows
                RunDir._move_aside(Path(entry.path), TRASH_PREFIX, name=name)
            else:
                os.rename(entry.path, final)
                fsync_dir(role_dir)

    def clean_leftovers(self) -> list[Path]:
        """Remove interrupted saves and deletes and a stale ``latest.tmp``; call on start, before any save."""
        removed: list[Path] = []
        for role in Role:
            d = self.role_dir(role)
            if not d.is_dir():
                continue
            self._restore_replaced(d)
            stale = [Path(e.path) for e in os.scandir(d) if e.name.startswith((TMP_PREFIX, TRASH_PREFIX))]
            for p in sorted(stale):
                remove(p)
                removed.append(p)
            if stale:
                fsync_dir(d)
        tmp_link = self.path / (LATEST + ".tmp")
        if tmp_link.is_symlink() or tmp_link.exists():
            remove(tmp_link)
            removed.append(tmp_link)
            fsync_dir(self.path)
        return removed

    # -- integrity and accounting

    def verify(self, ckpt_or_path: Checkpoint | str | os.PathLike[str]) -> list[str]:
        """Re-read every file and compare size and checksum with the manifest; returns problems (empty = OK)."""
        d = self.path_of(ckpt_or_path) if isinstance(ckpt_or_path, Checkpoint) else Path(ckpt_or_path)
        if not d.is_dir():
            return [f"{d}: checkpoint directory does not exist"]
        try:
            manifest = Manifest.read(d)
        except FileNotFoundError:
            return [f"{d}: {MANIFEST} missing (checkpoint was never committed)"]
        except (ValueError, KeyError, TypeError) as e:
            return [f"{d}: {MANIFEST} unreadable: {e!r}"]
        problems = [p for rel, e in sorted(manifest.files.items()) if (p := check_file(d, rel, e))]
        try:
            on_disk = {p.relative_to(d).as_posix() for p in data_files(d)}
        except ValueError as e:
            return [*problems, str(e)]
        problems += [f"{rel}: file not in manifest" for rel in sorted(on_disk - manifest.files.keys())]
        return problems

    def disk_usage(self) -> int:
        """Bytes of committed checkpoints on disk, counting each hard-linked file once (by inode)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for checkpoint in self.list():
            for dirpath, _dirnames, filenames in os.walk(self.path_of(checkpoint)):
                for fname in filenames:
                    st = os.lstat(os.path.join(dirpath, fname))
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_size
        return total


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
