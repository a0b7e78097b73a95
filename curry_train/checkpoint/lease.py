"""One writer per run across nodes: the lease object `<checkpoint.remote>/<run-id>/lease`, as data and decisions.
Pure (no torch, no store): what the object holds, whether a launch may take it, and the holder's timing.

The holder (rank 0) renews the lease every fifth of `checkpoint.remote_lease_s` and stops writing to the remote
once it has gone four fifths of it without a successful renewal; a launch takes the lease over once the holder
has not renewed it for the whole of the holder's `remote_lease_s`. The fifth between the two is the margin for a
write already under way and for clocks that disagree (each side reads its own wall clock against the time the
holder wrote into the object). The conditional writes that make taking and renewing safe are lease_store.py's.
"""

from __future__ import annotations

import enum
import json
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

RENEWALS_PER_LEASE = 5  # renew every lease_s / 5; stop writing after lease_s * 4 / 5 without a renewal
MIN_LEASE_S = 3.0


def renew_every(lease_s: float) -> float:
    return lease_s / RENEWALS_PER_LEASE


def stop_after(lease_s: float) -> float:
    """How long the holder goes without a successful renewal before it stops writing: one renewal interval short
    of the time after which another launch may take the lease over."""
    return lease_s - renew_every(lease_s)


@dataclass(frozen=True)
class Place:
    """Where a process runs: its host and its PID namespace (two containers may share a host name)."""

    host: str
    pidns: str

    @classmethod
    def here(cls) -> Place:
        try:
            pidns = os.readlink("/proc/self/ns/pid")
        except OSError:
            pidns = ""
        return cls(socket.gethostname(), pidns)


@dataclass(frozen=True)
class Holder:
    """The lease object's body: who holds it (rank 0's process) and when it was last renewed (unix seconds, the
    holder's clock). No credentials, no environment: what a refused launch may print."""

    token: str  # this launch's, unique: a renewal or release checks it is still the holder's
    host: str
    pidns: str
    pid: int
    attempt: int  # the launch's number in the run (run_start events before it)
    taken: float
    renewed: float
    lease_s: float  # the holder's checkpoint.remote_lease_s: expiry is judged by the holder's own
    released: bool = False  # a clean end (done, preempted, refused): free to take at once

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, body: bytes) -> Holder | None:
        """None for an object that is not a lease body (judged free: nothing in it names a holder)."""
        try:
            d = json.loads(body)
            return cls(
                token=str(d["token"]),
                host=str(d["host"]),
                pidns=str(d.get("pidns", "")),
                pid=int(d["pid"]),
                attempt=int(d.get("attempt", 0)),
                taken=float(d["taken"]),
                renewed=float(d["renewed"]),
                lease_s=float(d["lease_s"]),
                released=bool(d.get("released", False)),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def renewed_at(self, now: float) -> Holder:
        return replace(self, renewed=now)

    def describe(self, now: float) -> str:
        when = datetime.fromtimestamp(self.renewed, UTC).isoformat(timespec="seconds")
        ago = now - self.renewed
        return f"host {self.host}, pid {self.pid}, attempt {self.attempt}, last renewed {when} ({ago:.0f} s ago)"


class Verdict(enum.StrEnum):
    """What a launch finds in the lease object."""

    FREE = "free"  # no lease object (or not a lease body)
    RELEASED = "released"  # the previous holder ended cleanly
    EXPIRED = "expired"  # not renewed for the holder's remote_lease_s
    HOLDER_GONE = "holder gone"  # held from this host and PID namespace by a process that no longer exists
    LIVE = "live"  # held: refuse

    @property
    def may_take(self) -> bool:
        return self is not Verdict.LIVE


def judge(holder: Holder | None, now: float, here: Place, alive: Callable[[int], bool]) -> Verdict:
    """May a launch at `here` take the lease `holder` describes at time `now`? A holder whose process is gone from
    this very host is taken over at once (a crash, a kill: its rank 0 cannot be writing any more); any other is
    taken over only once it has not been renewed for its whole lease time."""
    if holder is None:
        return Verdict.FREE
    if holder.released:
        return Verdict.RELEASED
    if now - holder.renewed > holder.lease_s:
        return Verdict.EXPIRED
    if Place(holder.host, holder.pidns) == here and not alive(holder.pid):
        return Verdict.HOLDER_GONE
    return Verdict.LIVE


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists here (a reused id counts as alive: the lease then waits to expire)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def refusal(url: str, holder: Holder, now: float) -> str:
    """The one line of a launch refused by a live lease: who holds it and how to go on."""
    left = max(0.0, holder.lease_s - (now - holder.renewed))
    return (
        f"checkpoint.remote: {url} is in use by another launch of this run ({holder.describe(now)}); only one "
        f"launch may write it. Stop that launch, or wait: its lease expires {left:.0f} s after now unless it is "
        f"renewed (checkpoint.remote_lease_s={holder.lease_s:g} of the holder); then relaunch with +resume=latest"
    )
