"""Shared test helpers: compose configs without Hydra's command line, and launch real torchrun jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from curry_train.config import config_dir

# Every end-to-end test runs the real entry point with these settings: wandb off (one test turns it on), short
# sequences, and a console line per step so failures show the loss history.
FAST = [
    "logger.wandb.mode=disabled",
    "logger.console_every=1",
    "data.seq_len=64",
    "data.max_bytes=2000000",
    "train.batch_size=8",
]


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides or [])


def tiny_model_after_one_step(env):
    """`model=tiny` sharded on `env` (a world-of-one gloo group does) and its AdamW optimizer after one step, with the
    resolved config they come from: a state with optimizer moments to checkpoint."""
    import torch

    from curry_train import distributed
    from curry_train.compose import resolve

    cfg, _ = resolve(compose_config(["model=tiny", "train.device=cpu", "data.seq_len=32", "data.max_bytes=200000"]))
    model, _ = distributed.build_sharded_model(cfg, env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (2, 32))).sum().backward()
    optimizer.step()
    return cfg, model, optimizer


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def train_command(args: list[str], nproc: int = 1) -> list[str]:
    """The real entry point: `python -m curry_train.train` for one process, `torchrun` for more."""
    if nproc == 1:
        return [sys.executable, "-m", "curry_train.train", *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*torchrun, "-m", "curry_train.train", *args]


def run_train(
    args: list[str], cwd: Path, nproc: int = 1, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = train_command(args, nproc)
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return proc


def popen_train(args: list[str], cwd: Path, nproc: int = 1) -> subprocess.Popen:
    """Like run_train, but returns the running job, its output merged into stdout."""
    return subprocess.Popen(
        train_command(args, nproc),
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def only_run_dir(root: Path) -> Path:
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, f"expected one run directory under {root}, found {dirs}"
    return dirs[0]


def kill_and_resume(
    root: Path, overrides: list[str], kill_at: int, nproc: int = 2, name: str = "kill-and-resume", timeout: float = 600
) -> tuple[Path, Path, str]:
    """`scripts/kill_and_resume.py` as users run it: a straight run, the same run SIGKILLed after `kill_at` steps,
    that run resumed. Returns the straight and the killed run directories and the script's output."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "kill_and_resume.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--nproc",
            str(nproc),
            "--kill-at-step",
            str(kill_at),
            "--root",
            str(root),
            "--name",
            name,
            "--",
            *overrides,
        ],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / f"{name}-straight", root / f"{name}-killed", proc.stdout


def assert_replays_bitwise(run_dir: Path) -> dict[int, float]:
    """A relaunch replays the steps after the checkpoint it resumed from: every step logged more than once in
    metrics.jsonl has bitwise the same loss each time, and at least one was replayed. Returns each step's loss."""
    from curry_train.metrics import read_metric_lines

    first: dict[int, float] = {}
    replayed = 0
    for line in read_metric_lines(run_dir / "metrics.jsonl"):
        if "loss" not in line:
            continue
        step, loss = line["step"], line["loss"]
        if step in first:
            assert loss == first[step], f"step {step}: {loss} after the relaunch, {first[step]} before"
            replayed += 1
        first.setdefault(step, loss)
    assert replayed >= 1, "the relaunch replayed no step"
    return first
