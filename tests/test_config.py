"""Every config file composes; typos and wrong types fail at start-up, naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import curry_train
from curry_train.config import Config, ConfigError, default_run_id, resolve, validate
from tests.conftest import compose_config

CONF = Path(curry_train.__file__).parent / "conf"
GROUP_OPTIONS = sorted((group.name, f.stem) for group in CONF.iterdir() if group.is_dir() for f in group.glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_config_file_composes(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option in ("text", "tokens"):
        overrides.append("data.path=somewhere")
    cfg, launch = resolve(compose_config(overrides))
    assert isinstance(cfg, Config)
    assert getattr(cfg, group).name == option if hasattr(getattr(cfg, group), "name") else True
    assert launch.resume is None


def test_checkpoint_7b_default_holds_the_documented_policy() -> None:
    cfg, _ = resolve(compose_config(["checkpoint=7b_default"]))
    c = cfg.checkpoint
    assert (c.rollback_every, c.recovery_every, c.best_k) == (100, 1000, 3)
    assert (c.retention.rollback_keep, c.retention.recovery_keep) == (5, 3)
    assert (c.best_k_metric, c.best_k_direction) == ("dev_loss", "minimize")


def test_resume_is_added_with_plus_and_returned_separately() -> None:
    cfg, launch = resolve(compose_config(["+resume=latest"]))
    assert launch.resume == "latest"
    assert not hasattr(cfg, "resume")


def test_misspelt_key_fails_composition() -> None:
    with pytest.raises(ConfigCompositionException, match="rollbak_every"):
        compose_config(["checkpoint.rollbak_every=5"])


def test_wrong_type_fails_composition() -> None:
    with pytest.raises(ConfigCompositionException, match="train.steps"):
        compose_config(["train.steps=abc"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("checkpoint.best_k_direction=upwards", "checkpoint.best_k_direction"),
        ("checkpoint.rollback_contents=everything", "checkpoint.rollback_contents"),
        ("checkpoint.rollback_every=-1", "checkpoint.rollback_every"),
        ("logger.wandb.mode=cloud", "logger.wandb.mode"),
        ("model.n_heads=5", "model.dim"),
        ("train.steps=0", "train.steps"),
        ("train.eval_batches=0", "train.eval_batches"),
        ("logger.console_every=0", "logger.console_every"),
        ("data.max_bytes=-1", "data.max_bytes"),
        ("checkpoint.best_k_metric=devloss", "checkpoint.best_k_metric"),
    ],
)
def test_disallowed_values_name_the_key_and_the_allowed_values(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve(compose_config([override]))


def test_validate_checks_batch_divisibility_against_world_size() -> None:
    cfg, _ = resolve(compose_config(["train.batch_size=6", "train.grad_accum=2"]))
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="train.batch_size"):
        validate(cfg, world_size=2)


def test_run_id_follows_the_trajectory_not_the_operational_knobs() -> None:
    base = default_run_id(compose_config([]))
    # The same run: resuming, moving the root, changing a cadence, the storage check, wandb or loader workers.
    for same in (
        ["+resume=latest"],
        ["run.root=elsewhere"],
        ["checkpoint.rollback_every=50"],
        ["checkpoint.check_storage=false"],
        ["logger.wandb.mode=disabled"],
        ["data.num_workers=2"],
        ["train.eval_every=7"],
    ):
        assert default_run_id(compose_config(same)) == base, same
    # Another run: anything that changes what is trained.
    for other in (
        ["model=small"],
        ["optimizer.lr=1e-3"],
        ["train.seed=1"],
        ["train.batch_size=32"],
        ["train.steps=10"],
        ["scheduler.warmup_steps=5"],
        ["data.seq_len=64"],
    ):
        assert default_run_id(compose_config(other)) != base, other
    assert base.startswith("tiny-stdlib-")


@pytest.mark.parametrize(
    ("override", "expected"),
    [("checkpoint.rollbak_every=5", "rollbak_every"), ("train.steps=abc", "train.steps")],
)
def test_cli_rejects_bad_config_at_once(tmp_path: Path, override: str, expected: str) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "curry_train.train", override],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be created for a config that does not compose"
    assert time.monotonic() - started < 60


def test_cli_config_error_names_key_and_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "curry_train.train", "checkpoint.best_k_direction=up"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "checkpoint.best_k_direction" in proc.stderr and "minimize, maximize" in proc.stderr


def test_config_yaml_roundtrips_through_omegaconf() -> None:
    cfg, _ = resolve(compose_config([]))
    again = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.structured(cfg)))
    assert again == cfg


def test_installed_wheel_finds_its_configs(tmp_path: Path) -> None:
    """The configs ship inside the package: a wheel installed outside the checkout composes every group."""
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(repo),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("curry_train-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        "import curry_train, pathlib; from hydra import compose, initialize_config_module;\n"
        "from curry_train.config import resolve\n"
        "assert 'site' in curry_train.__file__, curry_train.__file__\n"
        "with initialize_config_module('curry_train.conf', version_base='1.3'):\n"
        "    cfg, _ = resolve(compose('config', overrides=['model=7b', 'checkpoint=7b_default']))\n"
        "print(cfg.model.dim, cfg.checkpoint.recovery_every)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4096", "1000"]


def test_launch_options_are_added_with_plus_and_stay_out_of_the_config_and_run_id() -> None:
    plain, _ = resolve(compose_config([]))
    options = ["+rollback_to=runs/x/rollback/step-00000010.dcp", "+debug.inject_spike_at=7"]
    cfg, launch = resolve(compose_config(options))
    assert launch.rollback_to == "runs/x/rollback/step-00000010.dcp" and launch.inject_spike_at == 7
    assert cfg.run.id == plain.run.id and not hasattr(cfg, "debug")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["+debug.inject_spike_at=0"], "debug.inject_spike_at"),
        (["+debug.inject_spik_at=3"], "debug.inject_spik_at"),
        (["+resume=latest", "+rollback_to=x"], "rollback_to"),
        (["spike.window=1"], "spike.window"),
        (["spike.enabled=true", "checkpoint.rollback_every=0", "checkpoint.recovery_every=0"], "spike.enabled"),
    ],
)
def test_bad_spike_and_launch_options_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        cfg, _ = resolve(compose_config(overrides))
        validate(cfg, 1)


def test_spike_detection_is_off_by_default_and_on_with_7b_default() -> None:
    assert resolve(compose_config([]))[0].spike.enabled is False
    assert resolve(compose_config(["checkpoint=7b_default"]))[0].spike.enabled is True
    assert resolve(compose_config(["checkpoint=7b_default", "spike.enabled=false"]))[0].spike.enabled is False
