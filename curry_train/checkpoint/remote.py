"""The run's checkpoints on object storage: `<checkpoint.remote>/<run-id>/`, in the run directory's layout, through
fsspec (`s3://` with s3fs, `gs://` with gcsfs, `file://` for tests). Plain storage code (no torch).

Layout::

    <remote>/<run-id>/latest                           an object holding the relpath of the newest committed one
    <remote>/<run-id>/{rollback,recovery,best-k}/<name>/   DCP files + manifest.json (uploaded last)

Object stores have no rename, so the manifest is the commit: it is uploaded only once every file of the checkpoint
is there with its size, a checkpoint without it is never listed or resumed, and the next start removes it.
Deletion removes the manifest first, so a deletion cut short leaves an uncommitted leftover, never a checkpoint
with missing files. Credentials and endpoints come from the environment the filesystem reads (AWS_ENDPOINT_URL,
AWS_PROFILE, ...); nothing here writes them anywhere.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from curry_train.checkpoint import checksum
from curry_train.checkpoint.manifest import MANIFEST, FileEntry, Manifest, check_file
from curry_train.checkpoint.policy import Checkpoint, Contents, Role, exact_resume_points, parse_checkpoint_name
from curry_train.layout import RunFiles

LATEST = "latest"
_BLOCK = 8 << 20  # the read size when verifying a remote file

# What to set when the store says who you are is wrong or missing, by protocol.
_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for a store not AWS",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS",
}
_CREDENTIAL_WORDS = ("credential", "accessdenied", "access denied", "invalidaccesskeyid", "signature", "forbidden")


# The launch's check before each remote write, by run URL (`<remote>/<run-id>`): the run's lease (lease_store.py).
# Kept here, not on a store object, because each part of the launch (start, uploads) opens its own RemoteStore.
_GUARDS: dict[str, Callable[[], None]] = {}


def guard(url: str, check: Callable[[], None] | None) -> None:
    """Make every RemoteStore of the run at `url` call `check` before it writes (None: no more checks)."""
    if check is None:
        _GUARDS.pop(url, None)
    else:
        _GUARDS[url] = check


class RemoteError(RuntimeError):
    """The remote store cannot be used; the message names the URL and, for credentials, the variable to set."""


class LeaseLost(RuntimeError):
    """This launch no longer holds the run's lease (a guard's refusal): it must not write to the remote, and retrying
    will not change that."""


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def describe_error(url: str, err: BaseException) -> str:
    """One line for a failed remote operation, naming the variable to set when the store refused who we are."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    hint = _CREDENTIALS.get(protocol_of(url))
    if hint and (isinstance(err, PermissionError) or any(w in text.lower() for w in _CREDENTIAL_WORDS)):
        return f"{text} (credentials refused or missing: set {hint})"
    return text


class RemoteStore:
    """One run's checkpoints under `<url>/<run_id>/`. `quick`: give up on an unreachable store within seconds (the
    probe at start); uploads retry on their own schedule (see upload.py)."""

    def __init__(self, url: str, run_id: str, quick: bool = False) -> None:
        import fsspec

        self.url = f"{url.rstrip('/')}/{run_id}"
        options: dict[str, Any] = {"skip_instance_cache": True}
        protocol = protocol_of(url)
        if protocol in ("file", "local"):
            options["auto_mkdir"] = True
        elif protocol in ("s3", "s3a"):
            # botocore's default (5 attempts, exponential backoff) takes ~12 s to say a store is unreachable.
            options["config_kwargs"] = {"retries": {"max_attempts": 2 if quick else 3, "mode": "standard"}}
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as err:  # fsspec names the package: s3fs, gcsfs, adlfs
            raise RemoteError(
                f"checkpoint.remote={url}: {err} (pip install 'curry-train[s3]' or '[gcs]' installs it)"
            ) from None
        self.root = self.root.rstrip("/")

    @classmethod
    def of_run(cls, run_url: str) -> RemoteStore:
        """The store of the run at `<checkpoint.remote>/<run-id>` (what `curry-train ls` and friends are given)."""
        base, _, run_id = run_url.rstrip("/").rpartition("/")
        if not run_id or base.endswith(":/") or base.endswith(":"):
            raise RemoteError(f"{run_url}: name a run on the remote, <checkpoint.remote>/<run-id>")
        return cls(base, run_id, quick=True)

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    def _writing(self) -> None:
        check = _GUARDS.get(self.url)
        if check is not None:
            check()

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # -- start

    def probe(self, who: str) -> None:
        """Write, read back and delete a small object: a store that is unreachable or refuses writes fails here,
        in one line, before training starts."""
        name = self.key(f".probe-{who}-{uuid.uuid4().hex[:8]}")
        token = uuid.uuid4().hex.encode()
        try:
            self.fs.pipe_file(name, token)
            back = self.fs.cat_file(name)
            self.fs.rm_file(name)
        except Exception as err:
            raise RemoteError(f"checkpoint.remote: cannot write {self.url} ({describe_error(self.url, err)})") from None
        if back != token:
            raise RemoteError(f"checkpoint.remote: {self.url} returned other bytes than were written to it")

    # -- writing

    def put_file(self, local: Path, rel: str) -> None:
        self._writing()
        self.fs.put_file(str(local), self.key(rel))

    def sizes(self, relpath: str) -> dict[str, int]:
        """Every object under a checkpoint's prefix and its size (fresh from the store, not a cached listing)."""
        prefix = self.key(relpath)
        self.fs.invalidate_cache(prefix)
        try:
            objects = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {PurePosixPath(p).relative_to(prefix).as_posix(): int(info["size"]) for p, info in objects.items()}

    def missing(self, relpath: str, files: dict[str, FileEntry]) -> list[str]:
        """The files of a checkpoint not (yet) on the store with their size."""
        there = self.sizes(relpath)
        return [rel for rel, entry in sorted(files.items()) if there.get(rel) != entry.nbytes]

    def put_manifest(self, manifest: Manifest, relpath: str) -> None:
        """The commit: only once `missing` is empty."""
        body = json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode() + b"\n"
        self._writing()
        self.fs.pipe_file(self.key(f"{relpath}/{MANIFEST}"), body)

    def set_latest(self, checkpoint: Checkpoint) -> None:
        self._writing()
        self.fs.pipe_file(self.key(LATEST), checkpoint.relpath.encode())

    def put_run_files(self, run_dir: Path) -> None:
        """The run's journal, metrics and config (rank 0's), beside its checkpoints: `status` of the remote reads
        them, and a start whose run directory is gone takes them back (`get_run_files`)."""
        for path in RunFiles(run_dir).history:
            if path.is_file():
                self._writing()
                self.fs.put_file(str(path), self.key(path.name))

    def get_run_files(self, run_dir: Path) -> list[str]:
        """The run files the remote holds, downloaded into `run_dir`; the names fetched. A line the upload caught
        half-written is cut off, so that the next line appended starts a line of its own."""
        fetched = []
        for path in RunFiles(run_dir).history:
            if not self.fs.exists(self.key(path.name)):
                continue
            data = self.fs.cat_file(self.key(path.name))
            if path.suffix == ".jsonl":
                data = data[: data.rfind(b"\n") + 1]
            path.write_bytes(data)
            fetched.append(path.name)
        return fetched

    def delete(self, relpath: str) -> None:
        """Manifest first (the checkpoint stops existing), then its files."""
        self._writing()
        manifest = self.key(f"{relpath}/{MANIFEST}")
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)
        for rel in self.sizes(relpath):
            self.fs.rm_file(self.key(f"{relpath}/{rel}"))

    # -- reading

    def _names(self, role: Role) -> dict[str, set[str]]:
        """Each checkpoint-named prefix of a role and the names of the objects directly in it."""
        prefix = self.key(role.dirname)
        self.fs.invalidate_cache(prefix)
        try:
            paths = self.fs.find(prefix)
        except FileNotFoundError:
            return {}
        names: dict[str, set[str]] = {}
        for path in paths:
            parts = PurePosixPath(path).relative_to(prefix).parts
            if len(parts) >= 2 and parse_checkpoint_name(role, parts[0]) is not None:
                names.setdefault(parts[0], set()).add(parts[-1] if len(parts) == 2 else "")
        return names

    def list(self, role: Role | None = None) -> list[Checkpoint]:
        """Committed checkpoints (manifest present), sorted by (role, step)."""
        roles = [role] if role is not None else list(Role)
        committed = [
            checkpoint
            for r in roles
            for name, objects in self._names(r).items()
            if MANIFEST in objects and (checkpoint := parse_checkpoint_name(r, name)) is not None
        ]
        return sorted(committed, key=lambda c: (c.role.value, c.step, c.name))

    def uncommitted(self) -> list[str]:
        """Relpaths of checkpoint-named prefixes without a manifest: an upload or a deletion cut short."""
        return sorted(
            f"{r.dirname}/{name}" for r in Role for name, objects in self._names(r).items() if MANIFEST not in objects
        )

    def manifest(self, checkpoint: Checkpoint) -> Manifest:
        return Manifest.from_dict(json.loads(self.fs.cat_file(self.key(f"{checkpoint.relpath}/{MANIFEST}"))))

    def latest(self) -> Checkpoint | None:
        """The checkpoint the `latest` object names, if it is committed; else the newest committed one with full
        state (an upload cut short between its manifest and `latest`)."""
        from curry_train.checkpoint.store import RunDir

        committed = self.list()
        try:
            named = RunDir.parse_relpath(self.fs.cat_file(self.key(LATEST)).decode())
        except FileNotFoundError:
            named = None
        if named is not None and named in committed:
            newest = self._newest_full([c for c in committed if c.step > named.step])
            return newest or named
        return self._newest_full(committed)

    def _newest_full(self, committed: list[Checkpoint]) -> Checkpoint | None:
        points = exact_resume_points(committed, lambda c: self.manifest(c).contents is Contents.FULL)
        return points[0] if points else None

    def fetch(
        self, checkpoint: Checkpoint, names: list[str], local_dir: Path, files: dict[str, FileEntry]
    ) -> list[str]:
        """Download `names` of a committed checkpoint into `local_dir` and check each against the manifest's size
        and checksum; returns the problems (empty: all good)."""
        problems = []
        for rel in names:
            target = local_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(self.key(f"{checkpoint.relpath}/{rel}"), str(target))
            except Exception as err:
                problems.append(f"{rel}: cannot download ({describe_error(self.url, err)})")
                continue
            if (problem := check_file(local_dir, rel, files[rel])) is not None:
                problems.append(problem)
        return problems

    def check(self, checkpoint: Checkpoint, manifest: Manifest) -> list[str]:
        """Each file of a committed checkpoint against its manifest's size and checksum, read as a stream (never a
        whole file in memory); returns the problems (empty: all good)."""
        there = self.sizes(checkpoint.relpath)
        problems = []
        for rel, entry in sorted(manifest.files.items()):
            if rel not in there:
                problems.append(f"{rel}: missing")
                continue
            if there[rel] != entry.nbytes:
                size = there[rel]
                problems.append(f"{rel}: size {size} bytes, manifest says {entry.nbytes} (truncated or overwritten)")
                continue
            running = checksum.running(entry.algorithm)
            with self.fs.open(self.key(f"{checkpoint.relpath}/{rel}"), "rb", block_size=_BLOCK) as f:
                while block := f.read(_BLOCK):
                    running.update(block)
            if (digest := running.hexdigest()) != entry.digest:
                problems.append(f"{rel}: {entry.algorithm} checksum {digest}, manifest says {entry.digest} (corrupted)")
        return problems

    def read_bytes(self, rel: str) -> bytes | None:
        """A small object of the run (the journal, the lease), or None when there is none."""
        try:
            return self.fs.cat_file(self.key(rel))
        except FileNotFoundError:
            return None
