"""Rank 0's metrics: `metrics.jsonl` (every step), the console, and wandb.

A resumed run appends the steps it redoes; each line carries the launch's `attempt`, and for every step the
last line in the file is the current value (`by_step` applies that rule). Every reader of the file reads it here.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from curry_train.layout import RunFiles

if TYPE_CHECKING:  # the schema imports Hydra: readers of metrics.jsonl (status, diff, plot) need none of it
    from curry_train.config import LoggerConfig


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metric_lines(path: str | Path, tail_bytes: int | None = None) -> list[dict[str, Any]]:
    """Every line of a `metrics.jsonl` in order (a resumed run's redone steps appear twice); none for a missing
    file. A line cut off by a crash is skipped. ``tail_bytes``: only the whole lines among the file's last
    ``tail_bytes`` (a long run's recent steps without reading the whole file)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open("rb") as f:
        size = f.seek(0, 2)
        start = 0 if tail_bytes is None else max(0, size - tail_bytes)
        f.seek(start)
        raw = f.read().decode("utf-8", errors="replace").splitlines()
    if start > 0:
        raw = raw[1:]  # the first line read may be cut
    lines = []
    for text in raw:
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(text)
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                lines.append(record)
    return lines


def by_step(lines: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """step -> the current line of that step: a later line of a step (one a resume or rollback redid) replaces an
    earlier one."""
    return {line["step"]: line for line in lines}


def read_metrics(path: str | Path) -> dict[int, dict[str, Any]]:
    """step -> the current metrics line of that step (`by_step` over `read_metric_lines`)."""
    return by_step(read_metric_lines(path))


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        total_steps: int,
        enabled: bool,
        attempt: int = 0,
        wandb_config: dict | None = None,
        run_id: str = "",
    ) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.attempt = attempt
        self.total_steps = total_steps
        self.console = Console(stderr=False)
        self._file = None
        self._wandb = None
        self._progress: Progress | None = None
        if not enabled:
            return
        # Line-buffered: a crash loses no completed line. Closed in close().
        self._file = open(RunFiles(run_dir).metrics, "a", buffering=1)  # noqa: SIM115
        if cfg.wandb.mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                mode=cfg.wandb.mode,
                dir=str(run_dir),
                name=run_id,
                id=run_id,
                resume="allow",
                config=wandb_config,
            )
            # wandb drops a step lower than the last one it was given, so the steps a resume or a rollback redoes
            # would vanish from the charts: plot against the run's own `step` instead, with wandb's counting on.
            self._wandb.define_metric("step")
            self._wandb.define_metric("*", step_metric="step")
        if cfg.progress_bar and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, info="")
            self._progress.start()

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)
            if not self.console.is_terminal:
                sys.stdout.flush()

    def log(self, step: int, values: dict[str, Any]) -> None:
        """One line of metrics for optimizer step `step` (1-based: the step just completed)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _finite(v) for k, v in values.items()}, "attempt": self.attempt}
        record["time"] = round(time.time(), 3)
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({**{k: v for k, v in values.items() if v is not None}, "step": step})
        self._show(step, values)

    def event(self, name: str, step: int, **fields: float) -> None:
        """A resume or rollback, shown in wandb at its step (the journal has the whole record)."""
        if self._wandb is not None:
            self._wandb.log({"step": step, f"event/{name}": 1, **{f"event/{name}/{k}": v for k, v in fields.items()}})

    def _show(self, step: int, values: dict[str, Any]) -> None:
        info = f"loss {values['loss']:.4f}  lr {values['lr']:.2e}  {values.get('tokens_per_s', 0):,.0f} tok/s"
        if "dev_loss" in values:
            info += f"  dev_loss {values['dev_loss']:.4f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
            if "dev_loss" in values:
                self._progress.console.print(f"step {step}: dev_loss {values['dev_loss']:.4f}")
        elif step % self.cfg.console_every == 0 or step == self.total_steps or "dev_loss" in values:
            self.print(f"step {step:>6}/{self.total_steps}  {info}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
