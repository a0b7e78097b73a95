"""Append-only JSONL event journal: one JSON object a line, each line fsynced before ``append`` returns."""

from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Self

from curry_train.layout import RunFiles
from curry_train.units import human_bytes

EVENTS: frozenset[str] = frozenset(
    {
        "run_start",
        "policy",
        "save",
        "delete",
        "best_k",
        "resume",
        "rollback",
        "spike_injected",
        "resume_fallback",
        "latest",
        "preempt",
        "world_size_change",
        "error",
        "run_end",
        "init",  # a warm start: the source of the initial parameters (+init_from)
        "attempt_end",  # a launch that ended without run_end or preempt: its last completed step
        "hang",  # a rank's watchdog saw no progress for train.hang_timeout_s and ended the job
        "stall_injected",  # +debug.stall_at: a rank stopped making progress on purpose, once in the run's life
        "cadence",  # checkpoint.*_every=auto: an interval decided, with its inputs and their sources
        "upload",  # a checkpoint committed on checkpoint.remote (bytes, seconds from the local commit)
        "upload_error",  # an upload that failed after its retries (the local checkpoint is intact)
        "upload_skipped",  # a commit not uploaded: its role's previous upload was still in flight
        "remote_delete",  # a remote checkpoint removed: remote retention, or an upload a kill cut short
        "remote_fetch",  # a checkpoint downloaded from checkpoint.remote to resume from
        "lease",  # this launch took the run's lease on checkpoint.remote (how: free, released, expired, holder gone)
        "lease_lost",  # the lease was taken over or not renewed in time: this launch stopped writing the remote
        "node_local",  # no shared filesystem: each node its own run directory, checkpoints committed on the remote
        "upload_wait",  # node-local mode: a save waited for its role's previous upload (backpressure)
    }
)
_REQUIRED = ("event", "time", "step")


def _jsonable(value: object) -> object:
    """Turn paths, enums and non-finite floats into what json.dumps(allow_nan=False) accepts."""
    if isinstance(value, enum.Enum):  # before str: StrEnum members are str too
        return _jsonable(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/inf are not JSON; other readers (jq, pandas) choke on them
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return value


def append_from_any_rank(run_dir: Path, event: str, step: int | None = None, **fields: object) -> None:
    """Append to a run's journal from whichever rank has something to say (a failure, a hang): it is rank 0's
    file, but rank 0 may be the rank that is gone or stuck. `step` None: the step of the journal's last line.
    Best effort: a journal that cannot be read or written must not hide the failure being reported."""
    path = RunFiles(run_dir).journal
    if not path.exists():
        return
    with contextlib.suppress(OSError, ValueError):
        if step is None:
            records = read_journal(path)
            step = int(records[-1]["step"]) if records else 0
        with Journal(path) as journal:
            journal.append(event, step, **fields)


class Journal:
    """Writer for ``journal.jsonl``. With ``enabled=False`` (non-zero ranks) ``append`` writes nothing."""

    def __init__(self, path: str | os.PathLike[str], enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._lock = threading.Lock()  # async saves may journal from their own thread

    def append(self, event: str, step: int, **fields: object) -> dict[str, object]:
        """Write one event line, flush and fsync it; return the record as written."""
        if event not in EVENTS:
            raise ValueError(f"unknown journal event {event!r}; allowed: {', '.join(sorted(EVENTS))}")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"journal step must be an int, got {step!r}")
        if "time" in fields:
            raise ValueError("journal field 'time' is reserved: append sets it")
        record = {"event": event, "time": datetime.now(UTC).isoformat(timespec="milliseconds"), "step": step}
        record.update({key: _jsonable(value) for key, value in fields.items()})
        try:
            line = json.dumps(record, allow_nan=False) + "\n"
        except TypeError as err:
            raise TypeError(f"journal event {event!r}: a field is not JSON-serialisable: {err}") from None
        if not self.enabled:
            return record
        with self._lock:
            handle = self._open()
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        return record

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            _repair_torn_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held until close())
            if created:
                # The new directory entry must be durable too, or a power cut can lose the whole journal.
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        return self._file

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Deferred:
    """Journal lines held back and written later in order: what a launch finds and tidies before its `run_start`
    line is journaled after it, so each launch's lines follow its own `run_start`."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int, dict[str, object]]] = []

    def append(self, event: str, step: int, **fields: object) -> None:
        self.records.append((event, step, fields))

    def replay(self, journal: Journal) -> None:
        for event, step, fields in self.records:
            journal.append(event, step, **fields)
        self.records.clear()


def _repair_torn_tail(path: Path) -> None:
    """Before appending, end a final line that a crash left without its newline.

    Otherwise the next record would be glued onto it, leaving a corrupt line in the middle, which
    ``read_journal`` rightly refuses. A fragment that is a complete record only lacks its newline and gets
    one; anything else was never acknowledged (append had not returned) and is cut off.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with open(path, "r+b") as handle:
        if _parse_line(data[cut:]) is not None:
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n")
        else:
            handle.truncate(cut)
        handle.flush()
        os.fsync(handle.fileno())


def _parse_line(raw: bytes) -> dict[str, object] | None:
    """The record on a line, or None if it is not one."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or any(key not in record for key in _REQUIRED):
        return None
    return record


def read_journal(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    """All records in order. A final line without its newline that does not parse (a crash mid-write) is
    skipped; any other bad line raises ValueError naming its line number."""
    lines = Path(path).read_bytes().split(b"\n")
    # After split, the last element is what followed the last newline: empty, or a line whose write was cut.
    torn = lines.pop()
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        record = _parse_line(raw)
        if record is None:
            raise ValueError(
                f"{path}: line {number} is not a journal record (JSON object with {', '.join(_REQUIRED)}): {raw[:80]!r}"
            )
        records.append(record)
    if torn.strip() and (record := _parse_line(torn)) is not None:
        records.append(record)
    return records


def _format_value(value: object) -> str:
    if isinstance(value, str) and value and not any(ch.isspace() for ch in value):
        return value
    return json.dumps(value)


def format_event(record: dict[str, object]) -> str:
    """One readable line for ``curry-train journal``; fields without a column follow as key=value."""
    time = str(record.get("time", "?"))
    with contextlib.suppress(ValueError):  # show whatever was written rather than hide the event
        time = datetime.fromisoformat(time).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    parts = [time, f"step {record.get('step', '?'):>7}", f"{record.get('event', '?'):<8}"]
    shown = {"time", "step", "event"}
    for key in ("role", "path"):
        if isinstance(record.get(key), str):
            parts.append(str(record[key]))
            shown.add(key)
    timing = []
    size, seconds = record.get("bytes"), record.get("seconds")
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        timing.append(human_bytes(size))
        shown.add("bytes")
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
        timing.append(f"{seconds:.2f} s")
        shown.add("seconds")
    if timing:
        parts.append(" in ".join(timing))
    # A launch's whole config is in the record (and in config.yaml); one line can't show it readably.
    shown |= {"config", "roles"}
    parts += [f"{key}={_format_value(value)}" for key, value in record.items() if key not in shown]
    return "  ".join(parts)


def _policy_line(record: dict[str, object]) -> dict[str, object]:
    """The `policy` record (the whole plan, too long to scan on one line) cut to what a reader scans for."""
    roles = record.get("roles")
    short: dict[str, object] = {key: record[key] for key in ("event", "time", "step") if key in record}
    if isinstance(record.get("model"), str):
        short["model"] = record["model"]
    if isinstance(roles, dict):
        for name, role in roles.items():
            if isinstance(role, dict) and role.get("every"):
                every = role["every"] if name != "best_k" else f"top{role['every']}"
                short[str(name)] = f"{every}/keep{role.get('keep', '?')}/{role.get('contents', '?')}"
    for key, label in (("committed_bytes", "commits"), ("free_bytes", "free")):
        if isinstance(record.get(key), (int, float)):
            short[label] = human_bytes(float(record[key]))  # type: ignore[arg-type]
    if "fits" in record:
        short["fits"] = record["fits"]
    return short


def format_events(records: list[dict[str, object]]) -> list[str]:
    """`format_event` for a whole journal, in order.

    A retention `delete` carries the step of the checkpoint it deleted, so its step column would run backwards;
    it is shown at the step of the save that triggered it, with the deleted checkpoint's step as `ckpt_step`.
    """
    lines = []
    current = None  # step of the newest save: retention runs right after a commit
    for record in records:
        shown = record
        if record.get("event") == "save" and isinstance(record.get("step"), int):
            current = record["step"]
        elif record.get("event") == "delete" and isinstance(current, int) and current != record.get("step"):
            shown = {"event": "delete", "time": record.get("time"), "step": current, "ckpt_step": record.get("step")}
            shown |= {k: v for k, v in record.items() if k not in shown}
        elif record.get("event") == "run_start":
            current = None
        elif record.get("event") == "policy":
            shown = _policy_line(record)
        lines.append(format_event(shown))
    return lines
