"""The names of a run directory's own files, in one place: every module that reads or writes one asks here.

Checkpoint directories (`rollback/`, `recovery/`, `best-k/`, `latest` and the `.tmp-`, `.trash-`, `.replaced-` and
`.abandoned-` entries) are the store's (`checkpoint/store.py`); these are the files around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

JOURNAL = "journal.jsonl"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
FAILURES = "failures.log"
LOCK = ".lock"
ROLLBACK_INTENT = "rollback-intent.json"
UPLOADS = ".uploads"


@dataclass(frozen=True)
class RunFiles:
    """The files of the run directory `root` (nothing here touches the disk)."""

    root: Path

    @property
    def journal(self) -> Path:
        """Every checkpoint event, one JSON object a line (rank 0 writes it; `journal.append_from_any_rank`)."""
        return self.root / JOURNAL

    @property
    def metrics(self) -> Path:
        """Rank 0's metrics, one JSON object a step."""
        return self.root / METRICS

    @property
    def config(self) -> Path:
        """The resolved config of the latest launch."""
        return self.root / CONFIG

    @property
    def history(self) -> tuple[Path, Path, Path]:
        """Journal, metrics and config: what a remote copy of the run keeps beside its checkpoints."""
        return self.journal, self.metrics, self.config

    @property
    def failures(self) -> Path:
        """Tracebacks and hang stacks, under a header per event."""
        return self.root / FAILURES

    @property
    def lock(self) -> Path:
        """rank 0's one-writer lock (`flock`), with who holds it."""
        return self.root / LOCK

    @property
    def rollback_intent(self) -> Path:
        """A rollback under way: a start that finds it finishes the rollback first."""
        return self.root / ROLLBACK_INTENT

    @property
    def uploads(self) -> Path:
        """Hard links of committed files waiting for their upload to `checkpoint.remote`."""
        return self.root / UPLOADS
