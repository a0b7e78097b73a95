"""How a launch ends when something goes wrong: one line for the user, the traceback in the run directory, the
failure journaled, and an exit status that says which kind of failure it was.

Exit statuses (also in README):
    0  finished, or stopped after a preemption save
    1  a failure while training (I/O, a crashed rank, a failed save): the traceback is in <run>/failures.log
    2  refused before anything changed: config, data, resume point, another launch holding the run directory
    3  a loss spike the run could not roll back from (see `spike.max_rollbacks`)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from curry_train.layout import RunFiles

EXIT_DONE = 0
EXIT_FAILURE = 1
EXIT_REFUSED = 2
EXIT_SPIKE = 3
# Set by `curry-train run` for its workers: a folder on the worker's own node where each rank leaves its exit status
# (torchrun exits 1 whatever the workers' statuses were, so the true one has to travel this way).
STATUS_DIR_ENV = "CURRY_TRAIN_STATUS_DIR"

# What gloo says on a rank whose peer went away: that rank did not fail, it was left alone.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket closed")


class Refused(RuntimeError):
    """A launch refused before anything changed, for a reason other than the config (the run directory is in use,
    or already holds a run this launch did not ask to continue); the message says what and how to go on: exit 2."""


def in_use(run_dir: Path, holder: str) -> Refused:
    """The refusal of a launch into a run directory that another launch holds (from rank 0's start, or from
    `curry-train run` before it starts any worker)."""
    return Refused(
        f"run directory {run_dir} is in use by another launch ({holder}); wait for it to end, stop it, or start "
        "another run with run.id=NAME"
    )


class PeerFailure(RuntimeError):
    """Another rank failed; this one stops because of it (the other rank reports what happened)."""


def is_peer_failure(err: BaseException) -> bool:
    return isinstance(err, PeerFailure) or any(text in str(err) for text in _PEER_GONE)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def record(err: BaseException, rank: int, run_dir: Path, line: str) -> Path | None:
    """Write the traceback to the run directory's failures.log; returns the log's path (None when the run
    directory does not exist: nothing was created, nothing is left behind)."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    text = "".join(traceback.format_exception(err))
    log = RunFiles(run_dir).failures
    written = None
    if run_dir.is_dir():
        try:
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"--- {stamp} rank {rank} pid {os.getpid()} on {socket.gethostname()}: {line}\n{text}\n")
            written = log
        except OSError:
            written = None  # the run directory is what failed (full, read-only): the line still reaches the user
    return written


def tell_torchrun(text: str) -> None:
    """torchrun's failure report shows this instead of "To enable traceback see ...": the user's one line."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        first = text.splitlines()[0]
        payload = {
            "message": {"message": first, "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time()))}}
        }
        with contextlib.suppress(OSError):
            Path(error_file).write_text(json.dumps(payload))


def write_status(status: int, line: str, quiet: bool = False) -> None:
    """Leave this rank's exit status for `curry-train run` (a no-op without it): `rank<r>` in its status folder,
    with the line and whether another rank tells the cause (`quiet`: this rank only stops because of it)."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    record = {
        "rank": int(rank),
        "status": status,
        "line": line,
        "quiet": quiet,
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }
    path = Path(folder) / f"rank{rank}"
    with contextlib.suppress(OSError):
        # Written whole, then renamed: the launcher never reads half a record.
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)


# Set once this process is ending because another rank failed: what it was about to announce (the save a stop
# signal asked for) will not happen, and the failed rank's line is the one the user needs.
ending = threading.Event()


def exit_with(line: str, status: int, quiet: bool = False) -> NoReturn:
    """End this process now with `status`, after one line for the user (unless `quiet`: another rank tells it)."""
    if quiet:
        ending.set()
    write_status(status, line, quiet)
    if quiet:
        # Later than the rank that tells the user by a whole second (torchrun's error timestamps are in seconds),
        # so that torchrun's report names that rank's line as the root cause.
        time.sleep(1.0)
    else:
        print(f"curry-train: {line}", file=sys.stderr, flush=True)
    tell_torchrun(f"curry-train: {line}")
    sys.stdout.flush()
    # os._exit, not sys.exit: after a failure, process-group and loader-worker teardown can wait on peers that are
    # gone; everything this launch must keep (journal, metrics, checkpoints) is already durable.
    os._exit(status)
