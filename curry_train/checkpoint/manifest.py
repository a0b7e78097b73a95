"""A checkpoint's manifest: the size and checksum of every file, and what the checkpoint holds. Written last, so
its presence marks a complete checkpoint; read to verify one without loading it. Plain filesystem code (no torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curry_train.checkpoint import checksum
from curry_train.checkpoint.policy import Checkpoint, Contents, Role

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class FileEntry:
    """Size and checksum of one file of a checkpoint; the manifest keys the checksum by its algorithm's name."""

    nbytes: int
    digest: str
    algorithm: str = checksum.DEFAULT

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.nbytes, self.algorithm: self.digest}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileEntry:
        named = [a for a in checksum.ALGORITHMS if a in d]
        if not named:
            raise ValueError(f"file entry {d} has no checksum of a known algorithm ({', '.join(checksum.ALGORITHMS)})")
        return cls(nbytes=int(d["bytes"]), digest=str(d[named[0]]), algorithm=named[0])


@dataclass
class Manifest:
    """What a committed checkpoint holds; written last, so its presence marks a complete checkpoint."""

    role: Role
    step: int
    name: str
    created: str
    files: dict[str, FileEntry]
    metric: float | None = None
    metric_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    linked_from: str | None = None
    version: int = MANIFEST_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.files.values())

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.role, self.step, self.metric, self.metric_name)

    # Typed views of `extra`, what a save records for a resume and for tools that read no DCP. The JSON keeps its
    # keys ("contents", "world_size", "cursor", "skipped"), so every checkpoint written before reads the same.
    # A manifest written by a tool rather than a save may lack them: None (no skipped ranges) then.

    @property
    def contents(self) -> Contents | None:
        """What the checkpoint holds: full state (an exact-resume point) or parameters only."""
        value = self.extra.get("contents")
        return None if value is None else Contents(value)

    @property
    def world_size(self) -> int | None:
        """How many ranks wrote it."""
        value = self.extra.get("world_size")
        return None if value is None else int(value)

    @property
    def cursor(self) -> int | None:
        """The global sample cursor after its step: where the data stood."""
        value = self.extra.get("cursor")
        return None if value is None else int(value)

    @property
    def skipped(self) -> list[tuple[int, int]]:
        """The global sample ranges rollbacks skipped on the way to its step, as [start, end) pairs."""
        return [(int(lo), int(hi)) for lo, hi in self.extra.get("skipped") or []]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "role": self.role.value,
            "step": self.step,
            "metric": self.metric,
            "metric_name": self.metric_name,
            "name": self.name,
            "created": self.created,
            "files": {rel: e.to_dict() for rel, e in sorted(self.files.items())},
            "total_bytes": self.total_bytes,
            "linked_from": self.linked_from,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            role=Role(d["role"]),
            step=int(d["step"]),
            name=str(d["name"]),
            created=str(d["created"]),
            files={rel: FileEntry.from_dict(e) for rel, e in d["files"].items()},
            metric=None if d.get("metric") is None else float(d["metric"]),
            metric_name=d.get("metric_name"),
            extra=dict(d.get("extra") or {}),
            linked_from=d.get("linked_from"),
            version=int(d.get("version", MANIFEST_VERSION)),
        )

    @classmethod
    def read(cls, ckpt_dir: Path) -> Manifest:
        with open(ckpt_dir / MANIFEST, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def data_files(root: Path) -> Iterator[Path]:
    """Every regular file under a checkpoint directory except the manifest (and its tmp)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for fname in filenames:
            p = Path(dirpath, fname)
            # The manifest, and the temporary file it is written through (durable.write_json_durably).
            manifest_tmp = fname.startswith(f".{MANIFEST}.") and fname.endswith(".tmp")
            if p.parent == root and (fname == MANIFEST or manifest_tmp):
                continue
            if p.is_symlink() or not p.is_file():
                raise ValueError(f"checkpoint may hold only regular files: {p}")
            yield p


def file_entry(path: Path) -> FileEntry:
    return FileEntry(path.stat().st_size, checksum.of_file(path))


def checksum_tree(root: Path, known: dict[str, FileEntry] | None = None) -> dict[str, FileEntry]:
    """Size and checksum of every file; entries in `known` (computed by the rank that wrote the file) are trusted
    when the size still matches, so rank 0 need not re-read every rank's shards."""
    known = known or {}
    entries = {}
    for p in sorted(data_files(root)):
        rel = p.relative_to(root).as_posix()
        entry = known.get(rel)
        entries[rel] = entry if entry is not None and entry.nbytes == p.stat().st_size else file_entry(p)
    return entries


def check_file(ckpt_dir: Path, rel: str, entry: FileEntry) -> str | None:
    """One human-readable problem with a checkpoint file, or None if size and checksum match."""
    p = ckpt_dir / rel
    if not p.is_file():
        return f"{rel}: missing"
    size = p.stat().st_size
    if size != entry.nbytes:
        return f"{rel}: size {size} bytes, manifest says {entry.nbytes} (truncated or overwritten)"
    digest = checksum.of_file(p, entry.algorithm)
    if digest != entry.digest:
        return f"{rel}: {entry.algorithm} checksum {digest}, manifest says {entry.digest} (corrupted)"
    return None
