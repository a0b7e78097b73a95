"""A save between its start and its commit, as `Checkpointer` tracks it: what is written, what became durable, and
what it cost training (`StepClock`)."""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from curry_train.checkpoint import io
from curry_train.checkpoint.policy import Checkpoint, Contents


@dataclass
class ParamsCopy:
    """A best-K checkpoint at the step of a full save in flight: the parameters (and the step's progress and data
    position) of that save's staged copy, written after it by the same writer. No second staging, and the best-K
    holds no optimizer state: hard links of the full save would keep its full size once that save rotates away."""

    checkpoint: Checkpoint
    job: io.SaveJob
    written: list[io.Written] = field(default_factory=list)  # every rank's report, once all are durable


@dataclass
class PendingSave:
    """A save from its start to its commit: one set of bytes, written for the first checkpoint, linked for the rest
    (and, for a best-K at the step of a full save, its parameters written once more: `params_copy`)."""

    checkpoints: list[Checkpoint]  # the first is written; the others become hard links of it
    contents: Contents
    started: float
    extra: dict[str, Any] = field(default_factory=dict)  # for the manifest: where the data stood at this step
    job: io.SaveJob | None = None
    params_copy: ParamsCopy | None = None
    stage_seconds: float = 0.0
    blocking_seconds: float = 0.0  # the training thread's time inside save() and wait() for this save
    snapshot_wait_seconds: float = 0.0  # the training thread's wait, before the next update, for the staged copy
    overlapped: list[float] = field(default_factory=list)  # the step intervals it was in flight during
    mark: float = 0.0  # when the current overlapped interval began
    waiting_since: float | None = None  # when wait() began blocking on it (a synchronous save: right after start)
    baseline: float | None = None  # the step time without a save, when its bytes were durable
    written: list[io.Written] = field(default_factory=list)  # every rank's report, once all are durable
    commit_thread: threading.Thread | None = None  # rank 0's commit while training goes on
    commit_error: Exception | None = None

    @property
    def step(self) -> int:
        return self.checkpoints[0].step

    def parts(self) -> list[tuple[Checkpoint, io.SaveJob]]:
        """What the writer writes for this save, in order: each checkpoint written and its job."""
        assert self.job is not None
        parts = [(self.checkpoints[0], self.job)]
        if self.params_copy is not None:
            parts.append((self.params_copy.checkpoint, self.params_copy.job))
        return parts

    def costs(self, now: float) -> tuple[float, float | None]:
        """The training thread's blocked time, and what the save cost training: that blocked time plus the extra
        time, over the baseline step, of the steps it overlapped (each measured from the end of the start, or of
        the previous step, to the end of the step, so the blocked time is not counted twice). None without a
        baseline yet.

        The extra is an estimate that the steps' own noise moves either way, so it is not clamped: one save's cost
        can come out below its blocked time, and a mean over saves is unbiased (clamping each at zero added about 0.4
        of the steps' standard deviation to every mean on a noisy machine). Readers that need a floor apply it."""
        waited = 0.0 if self.waiting_since is None else now - self.waiting_since
        blocking = self.blocking_seconds + waited
        if not self.overlapped:  # started and finished within one step: all of it blocked training
            return blocking, blocking
        if self.baseline is None:
            return blocking, None
        return blocking, blocking + sum(t - self.baseline for t in self.overlapped)


@dataclass(frozen=True)
class Durable:
    """The last save whose bytes every rank made durable, with the parameters-only part of the state it wrote: its
    staged copy (nothing stages again before the next save), or for a synchronous save the live state, unchanged
    until the next update. A best-K at its step is written from that."""

    step: int
    checkpoint: Checkpoint  # the one written (the others are links of it)
    contents: Contents
    params: dict[str, Any]  # the PARAMS_ONLY_KEYS of its state dict
    extra: dict[str, Any]  # its data position, for the manifest


class StepClock:
    """Wall time between `poll()` calls (one a step, on the loop's path), to tell what a save cost training.

    A save in flight slows the steps it overlaps (its writer shares the cores, the memory bandwidth and the GIL);
    that extra time, not the time the training thread spent inside `save()`, is what it cost. The baseline is the
    median of recent intervals with no save started, waited for or in flight, so an occasional evaluation step
    does not move it.
    """

    def __init__(self, window: int = 25) -> None:
        self.clean: deque[float] = deque(maxlen=window)
        self.last: float | None = None
        self.dirty = False  # the current interval had a save in it

    def tick(self, now: float, busy: bool) -> None:
        if self.last is not None and not self.dirty:
            self.clean.append(now - self.last)
        self.last, self.dirty = now, busy

    def baseline(self) -> float | None:
        return statistics.median(self.clean) if self.clean else None
