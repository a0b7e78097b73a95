"""Rank 0's metrics: `metrics.jsonl` (every step), the console, and wandb.

A resumed run appends the steps it redoes; each line carries the launch's `attempt`, and for every step the
last line in the file is the current value (`read_metrics` applies that rule).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from curry_train.config import LoggerConfig


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(path: str | Path) -> dict[int, dict[str, Any]]:
    """step -> the current metrics line of that step (later lines replace earlier ones of the same step)."""
    current: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by a crash
                current[record["step"]] = record
    return current


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
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
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
