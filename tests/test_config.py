"""Every config file composes; typos and wrong types fail at start-up, naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from curry_train.compose import default_run_id, resolve
from curry_train.config import Config, ConfigError, config_dir, validate
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
CONF = config_dir()
GROUP_OPTIONS = sorted((group.name, f.stem) for group in CONF.iterdir() if group.is_dir() for f in group.glob("*.yaml"))


def test_the_config_tree_is_the_checkouts_top_level_conf() -> None:
    # DESIGN.md's layout: conf/ beside curry_train/, not inside it; tests compose from there.
    assert CONF == REPO / "conf"
    assert not (REPO / "curry_train" / "conf" / "config.yaml").exists()
    assert {"model", "optimizer", "scheduler", "data", "checkpoint", "logger"} <= {g for g, _ in GROUP_OPTIONS}


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
        ("checkpoint.writer=fork", "checkpoint.writer"),
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


@pytest.mark.parametrize(
    "modes", [["checkpoint.writer=thread"], ["checkpoint.writer=process", "checkpoint.async_save=false"]]
)
def test_killing_the_writer_process_is_refused_where_there_is_none(modes: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"debug\.kill_writer_at: .*checkpoint\.writer=process"):
        resolve(compose_config([*modes, "+debug.kill_writer_at=3"]))
    resolve(compose_config(["checkpoint.writer=process", "+debug.kill_writer_at=3"]))


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


def _files(root: Path, pattern: str) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob(pattern) if "__pycache__" not in p.parts}


def test_installed_wheel_finds_its_configs(tmp_path: Path) -> None:
    """The top-level conf/ ships inside the wheel as curry_train/conf: a wheel installed outside the checkout holds
    every module and config file of the checkout, and training's entry point and `curry-train plan` compose from it
    run in a folder that is not the checkout."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
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
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert _files(site / "curry_train", "*.py") == _files(REPO / "curry_train", "*.py")
    assert _files(site / "curry_train" / "conf", "*.yaml") == _files(REPO / "conf", "*.yaml")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    probe = (
        "import curry_train; from hydra import compose, initialize_config_dir\n"
        "from curry_train.compose import resolve\n"
        "from curry_train.config import config_dir\n"
        "print(curry_train.__file__, config_dir())\n"
        "with initialize_config_dir(str(config_dir()), version_base='1.3'):\n"
        "    cfg, _ = resolve(compose('config', overrides=['model=7b', 'checkpoint=7b_default']))\n"
        "print(cfg.model.dim, cfg.checkpoint.recovery_every)\n"
    )
    module, conf, dim, recovery_every = run("-c", probe).split()
    assert Path(module).is_relative_to(site) and Path(conf) == site / "curry_train" / "conf"
    assert (dim, recovery_every) == ("4096", "1000")
    # The training entry point composes from the installed tree; --cfg job prints it, runs nothing.
    job = run("-m", "curry_train.train", "--cfg", "job", "model=7b", "checkpoint=7b_default")
    assert "dim: 4096" in job and "recovery_every: 1000" in job
    plan = json.loads(run("-m", "curry_train.cli", "plan", "--json", "model=7b", f"run.root={tmp_path / 'runs'}"))
    assert plan["params"] == 6_738_415_616
    assert not (work / "runs").exists()


def test_launch_options_are_added_with_plus_and_stay_out_of_the_config_and_run_id() -> None:
    plain, _ = resolve(compose_config([]))
    options = ["+rollback_to=runs/x/rollback/step-00000010.dcp", "+debug.inject_spike_at=7"]
    cfg, launch = resolve(compose_config(options))
    assert launch.rollback_to == "runs/x/rollback/step-00000010.dcp" and launch.debug.inject_spike_at == 7
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


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["+debug.inject_spike_at=6"], "spike.enabled=false"),
        (
            ["spike.enabled=true", "+debug.inject_spike_at=6"],
            "the detector arms after spike.warmup_steps=100 with a full spike.window=50",
        ),
        (
            ["spike.enabled=true", "spike.warmup_steps=10", "spike.window=8", "+debug.inject_spike_at=9"],
            "the detector arms after spike.warmup_steps=10 with a full spike.window=8",
        ),
    ],
)
def test_a_spike_injected_where_nothing_detects_it_is_warned_about(overrides: list[str], why: str) -> None:
    at = int(overrides[-1].split("=")[1])
    _, launch = resolve(compose_config(overrides), overrides)
    (note,) = launch.notes
    assert note.startswith(f"WARNING: +debug.inject_spike_at={at} shows in the loss of step {at + 1}, but {why}: ")
    assert "spike.warmup_steps" in note


def test_a_spike_injected_where_the_detector_sees_it_is_not_warned_about() -> None:
    # The rollback tests' run: window 8, warm-up 10, injected at 25 (the loss of step 26 is judged); 10 is the
    # first step whose next loss the detector judges.
    for at in (25, 10):
        overrides = ["spike.enabled=true", "spike.warmup_steps=10", "spike.window=8", f"+debug.inject_spike_at={at}"]
        assert resolve(compose_config(overrides), overrides)[1].notes == ()


def test_the_launch_knows_which_keys_the_command_line_set() -> None:
    overrides = ["model=small", "model.vocab_size=300", "++train.steps=5", "+resume=auto"]
    launch = resolve(compose_config(overrides), overrides)[1]
    assert {"model", "model.vocab_size", "train.steps", "resume"} <= launch.given
    assert "model.dim" not in launch.given and resolve(compose_config([]))[1].given == frozenset()
