"""The lease object on the store: taken and renewed with conditional writes, and the holder's renewal thread.

Conditional writes by protocol (what each can promise is in docs/checkpoints.md):
- s3: `If-None-Match: *` to create (s3fs's `mode="create"`) and `If-Match: <ETag>` to renew, take over or release;
  checked at start, since some S3-compatible stores ignore the headers (the lease is then best effort, said once).
- file: an exclusive `flock` on `lease.lock` around read, compare and rename: safe between the processes of one
  machine, and across nodes where the filesystem's locks are (NFSv4, Lustre with `flock`).
- anything else: read, compare, write: best effort (two launches that start within the same second can both
  believe they hold it).

Every rank checks before it writes to the remote (`RemoteStore` asks the guard remote.py keeps): rank 0 its own
renewal state, the other ranks the lease object, that it still names their launch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from curry_train.checkpoint.lease import Holder, Place, Verdict, judge, pid_alive, refusal, renew_every, stop_after
from curry_train.checkpoint.remote import LeaseLost, RemoteStore, describe_error, protocol_of
from curry_train.failures import Refused

LEASE = "lease"


class Conflict(Exception):
    """The object exists (create) or changed since it was read (replace)."""


def _precondition_failed(err: BaseException) -> bool:
    for e in (err, err.__cause__):
        code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return True
    return False


class S3Object:
    """The lease on S3: the ETag is the version a conditional write names."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.guaranteed = True

    def read(self) -> tuple[bytes | None, Any]:
        for attempt in range(5):
            try:
                # s3fs reads with If-Match on the ETag it reports: bytes and version agree, or FileExpired.
                with self.fs.open(self.path, "rb") as f:
                    return f.read(), f.details["ETag"]
            except FileNotFoundError:
                return None, None
            except OSError as err:  # s3fs.utils.FileExpired: rewritten between the two requests (a renewal)
                if type(err).__name__ != "FileExpired" or attempt == 4:
                    raise
                self.fs.invalidate_cache(self.path)
        raise AssertionError("unreachable")

    def create(self, body: bytes) -> Any:
        try:
            return self.fs.pipe_file(self.path, body, mode="create")["ETag"]
        except FileExistsError:
            raise Conflict(self.path) from None
        except OSError as err:
            if _precondition_failed(err):
                raise Conflict(self.path) from None
            raise

    def replace(self, body: bytes, version: Any) -> Any:
        try:
            return self.fs.pipe_file(self.path, body, IfMatch=version)["ETag"]
        except FileNotFoundError:
            raise Conflict(self.path) from None
        except OSError as err:
            if _precondition_failed(err):
                raise Conflict(self.path) from None
            raise

    def check_conditions(self) -> None:
        """A store that ignores If-None-Match or If-Match (older S3-compatible servers) cannot keep two launches
        apart: found out with a scratch object, and the lease is then best effort."""
        probe = f"{self.path}-check-{uuid.uuid4().hex[:8]}"
        first = S3Object(self.fs, probe)
        first.create(b"1")
        try:
            for attempt in (lambda: first.create(b"2"), lambda: first.replace(b"3", '"0"')):
                try:
                    attempt()
                    self.guaranteed = False
                except Conflict:
                    pass
        finally:
            self.fs.rm_file(probe)


class LocalObject:
    """The lease on a POSIX filesystem (`file://`): read, compare and rename under an exclusive flock; the bytes
    themselves are the version."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.guaranteed = True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> tuple[bytes | None, Any]:
        try:
            body = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        return body, body

    def _write(self, body: bytes) -> bytes:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return body

    def create(self, body: bytes) -> Any:
        with self._locked():
            if self.path.exists():
                raise Conflict(str(self.path))
            return self._write(body)

    def replace(self, body: bytes, version: Any) -> Any:
        with self._locked():
            if self.read()[0] != version:
                raise Conflict(str(self.path))
            return self._write(body)


class PlainObject(LocalObject):
    """Any other fsspec store: read, compare, write, without a lock (best effort)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path_text = fs, path
        self.guaranteed = False

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        yield

    def read(self) -> tuple[bytes | None, Any]:
        try:
            body = self.fs.cat_file(self.path_text)
        except FileNotFoundError:
            return None, None
        return body, body

    def create(self, body: bytes) -> Any:
        if self.fs.exists(self.path_text):
            raise Conflict(self.path_text)
        return self._write(body)

    def _write(self, body: bytes) -> bytes:
        self.fs.pipe_file(self.path_text, body)
        return body


def lease_object(remote: RemoteStore) -> S3Object | LocalObject:
    path = remote.key(LEASE)
    protocol = protocol_of(remote.url)
    if protocol in ("s3", "s3a"):
        return S3Object(remote.fs, path)
    if protocol in ("file", "local"):
        return LocalObject(path)
    return PlainObject(remote.fs, path)


def read_holder(obj: S3Object | LocalObject) -> tuple[Holder | None, bytes | None, Any]:
    body, version = obj.read()
    return (Holder.from_bytes(body) if body is not None else None), body, version


class HeldLease:
    """Rank 0's lease: renewed in a thread of its own every fifth of the lease time. It is lost when another
    launch took it over, or when no renewal has succeeded for four fifths of the lease time (the store did not
    answer, or answered slowly): from then on `check` refuses every remote write of this launch; losing is final."""

    def __init__(
        self, obj: S3Object | LocalObject, holder: Holder, version: Any, url: str, on_lost: Callable[[str], None]
    ) -> None:
        self.obj, self.holder, self.version, self.url = obj, holder, version, url
        self.on_lost = on_lost
        self.last_ok = holder.renewed  # when the last successful renewal started (what the object says)
        self.lost: str | None = None
        self.released = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="curry-train-lease", daemon=True)

    def start(self) -> HeldLease:
        self._thread.start()
        return self

    def check(self) -> None:
        """Before every remote write of rank 0: raises LeaseLost once this launch must not write."""
        silent = time.time() - self.last_ok
        if self.lost is None and not self.released and silent > stop_after(self.holder.lease_s):
            self._lose(f"not renewed for {silent:.0f} s (the store did not answer in time)")
        if self.lost is not None:
            raise LeaseLost(f"checkpoint.remote: this launch lost the lease of {self.url}: {self.lost}")
        if self.released:
            raise LeaseLost(f"checkpoint.remote: this launch released the lease of {self.url}")

    def _renew_loop(self) -> None:
        every = renew_every(self.holder.lease_s)
        error = ""
        while not self._stop.wait(every):
            started = time.time()
            try:
                self._renew(started)
            except LeaseLost:
                return
            except Exception as err:
                error = describe_error(self.url, err)
            else:
                self.last_ok = started
                continue
            if started - self.last_ok > stop_after(self.holder.lease_s):
                self._lose(f"not renewed for {started - self.last_ok:.0f} s ({error})")
                return

    def _renew(self, now: float) -> None:
        body = self.holder.renewed_at(now).to_bytes()
        with contextlib.suppress(Conflict):
            self.version = self.obj.replace(body, self.version)
            return
        if self._stop.is_set():  # released meanwhile: never take it back
            raise LeaseLost("released")
        holder, current, version = read_holder(self.obj)
        if current is None:  # the store lost it (an emptied bucket): nobody else holds it
            with contextlib.suppress(Conflict):
                self.version = self.obj.create(body)
                return
            holder, current, version = read_holder(self.obj)
        if holder is not None and holder.token == self.holder.token and not holder.released:
            self.version = self.obj.replace(body, version)  # our own earlier write landed after all
            return
        self._lose(f"taken over by {holder.describe(now)}" if holder else "the lease object was overwritten")
        raise LeaseLost(self.lost)

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self.lost is not None:
                return
            self.lost = reason
        self.on_lost(reason)

    def stop(self) -> None:
        """Stop renewing (a failed launch: the lease then expires, or is taken over once this process is gone)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=min(5.0, renew_every(self.holder.lease_s)))  # a renewal stuck on the store

    def release(self) -> None:
        """A clean end: the next launch may take the lease at once. A release that fails leaves it to expire."""
        self.stop()
        if self.lost is not None or self.released:
            return
        self.released = True
        body = dataclasses.replace(self.holder, renewed=time.time(), released=True).to_bytes()
        with contextlib.suppress(Exception):
            self.obj.replace(body, self.version)


class FollowedLease:
    """Another rank's view: before each remote write, the lease object must still name rank 0's launch."""

    def __init__(self, obj: S3Object | LocalObject, token: str, url: str) -> None:
        self.obj, self.token, self.url = obj, token, url

    def check(self) -> None:
        holder, _, _ = read_holder(self.obj)
        if holder is None or holder.token != self.token or holder.released:
            now = time.time()
            who = f"held by {holder.describe(now)}" if holder is not None and not holder.released else "not held"
            raise LeaseLost(f"checkpoint.remote: the lease of {self.url} is no longer this launch's ({who})")

    def stop(self) -> None:
        pass

    release = stop


def take(
    remote: RemoteStore, attempt: int, lease_s: float, on_lost: Callable[[str], None]
) -> tuple[HeldLease, Verdict, Holder | None, bool]:
    """Rank 0: take the run's lease or refuse the launch (Refused: who holds it and how to go on). Returns the
    renewing lease, what was found, the previous holder and whether the store's conditional writes are honoured."""
    obj = lease_object(remote)
    if isinstance(obj, S3Object):
        obj.check_conditions()
    here = Place.here()
    for _ in range(3):  # another launch wrote between our read and our conditional write: judge again
        previous, body, version = read_holder(obj)
        now = time.time()
        verdict = judge(previous, now, here, pid_alive)
        if not verdict.may_take:
            assert previous is not None
            raise Refused(refusal(remote.url, previous, now))
        if previous is not None and not previous.released:
            attempt = max(attempt, previous.attempt + 1)
        me = Holder(uuid.uuid4().hex, here.host, here.pidns, os.getpid(), attempt, now, now, lease_s)
        try:
            version = obj.create(me.to_bytes()) if body is None else obj.replace(me.to_bytes(), version)
        except Conflict:
            continue
        return HeldLease(obj, me, version, remote.url, on_lost).start(), verdict, previous, obj.guaranteed
    raise Refused(f"checkpoint.remote: {remote.url}: other launches are taking its lease at the same time; relaunch")


def follow(remote: RemoteStore, token: str) -> FollowedLease:
    return FollowedLease(lease_object(remote), token, remote.url)
