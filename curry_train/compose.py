"""From a command line to a config: Hydra composition of `conf/` onto the schema in `config.py`, the checks of
what the user typed (unknown keys with the nearest known one, Hydra's errors in one line), the `+` launch options,
and the default run id.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re

from omegaconf import DictConfig, OmegaConf, open_dict

from curry_train import config
from curry_train.config import INIT_FROM, LAUNCH_KEYS, Config, ConfigError, Faults, Launch, config_dir, require

# Settings that do not change what is trained: changing them (a cadence, the storage check, wandb, the number of
# loader workers, how often to evaluate) must not move a run to a new directory, or `+resume=latest` after such a
# change would silently start from step 0.
NOT_IN_RUN_ID = {
    "checkpoint": None,  # the whole group
    "spike": None,  # how spikes are handled, not what is trained
    "logger": None,
    "data": ("num_workers",),
    "train": ("eval_every", "eval_batches", "device", "hang_timeout_s"),
}


def default_run_id(raw: DictConfig) -> str:
    """`<model>-<data>-<hash>`: the hash covers the settings that decide the trajectory (model, data, optimizer,
    schedule, seed, batch, steps), so the same command, with or without `+resume=...` or a changed cadence,
    names the same run directory on every rank with no coordination."""
    settings = OmegaConf.to_container(raw, resolve=True)
    assert isinstance(settings, dict)
    settings = {k: v for k, v in settings.items() if k not in ("run", "hydra", *LAUNCH_KEYS)}
    for group, keys in NOT_IN_RUN_ID.items():
        if keys is None:
            settings.pop(group, None)
        elif isinstance(settings.get(group), dict):
            settings[group] = {k: v for k, v in settings[group].items() if k not in keys}
    if (settings.get("init") or {}).get("source") is None:
        settings.pop("init", None)  # no warm start: the ids of runs from before `init` existed stay what they were
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{raw.model.name}-{raw.data.name}-{digest}"


def schema_keys(node: type = None, prefix: str = "") -> set[str]:  # type: ignore[assignment]
    """Every dotted key the schema has, groups included (`checkpoint`, `checkpoint.retention.rollback_keep`, ...)."""
    keys: set[str] = set()
    for f in dataclasses.fields(node or Config):
        key = f"{prefix}{f.name}"
        keys.add(key)
        kind = f.type if isinstance(f.type, type) else getattr(config, str(f.type), None)
        if dataclasses.is_dataclass(kind):
            keys |= schema_keys(kind, f"{key}.")
    return keys


def _nearest(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(schema_keys()), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown_key(key: str) -> str:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = (
        sorted(
            k.rsplit(".", 1)[-1] for k in schema_keys() if k.startswith(f"{parent}.") and k.count(".") == key.count(".")
        )
        if parent
        else []
    )
    listing = f" (keys of {parent}: {', '.join(siblings)})" if siblings else ""
    return f"{key}: no such key{_nearest(key)}{listing}"


def check_known_keys(raw: DictConfig) -> None:
    """Refuse keys the schema lacks, `+` additions included: Hydra lets `+group.key=...` add any key, and a typo
    added that way would otherwise be ignored without a word."""
    known = schema_keys()

    def walk(node: object, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for name, value in node.items():
            key = f"{prefix}{name}"
            if not prefix and name in (*LAUNCH_KEYS, INIT_FROM, "hydra"):
                continue
            if key not in known:
                raise ConfigError(
                    _unknown_key(key)
                    + "; the only keys added with '+' are +resume, +rollback_to, +init_from and +debug.*"
                )
            walk(value, f"{key}.")

    walk(OmegaConf.to_container(raw, resolve=False), "")


def compose(overrides: list[str]) -> DictConfig:
    """The config training composes from command-line `overrides`; Hydra's errors become one-line ConfigErrors
    that name the key, the nearest valid key and the allowed values."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    except HydraException as err:
        raise ConfigError(explain_hydra_error(err)) from None


def explain_hydra_error(err: Exception) -> str:
    cause = str(err.__cause__ or "")
    full_key = re.search(r"full_key: (\S+)", cause)
    missing_option = re.search(r"Could not find '([^/']+)/([^']+)'", str(err))
    if missing_option:
        options = re.findall(r"^\t(\S+)$", str(err).split("Config search path")[0], flags=re.M)
        return f"{missing_option[1]}={missing_option[2]}: no such option; available: {', '.join(options)}"
    if full_key and ("not in" in cause):
        return _unknown_key(full_key[1])
    if full_key:
        return f"{full_key[1]}: {cause.splitlines()[0]}"
    return str(err).splitlines()[0]


def _launch_of(options: dict) -> Launch:
    debug = options.get("debug") or {}
    allowed = (
        "inject_spike_at",
        "inject_lr_scale",
        "fail_save_at",
        "fail_save_rank",
        "stall_at",
        "stall_rank",
        "save_delay_s",
        "perturb_resume",
        "upload_stall_at",
        "kill_writer_at",
    )
    unknown = sorted(set(debug) - set(allowed))
    require(
        not unknown,
        f"debug.{unknown[0] if unknown else ''}",
        "allowed: +debug.inject_spike_at=STEP, +debug.inject_lr_scale=X, +debug.fail_save_at=STEP, "
        "+debug.fail_save_rank=R, +debug.stall_at=STEP, +debug.stall_rank=R, +debug.save_delay_s=S, "
        "+debug.perturb_resume=true, +debug.upload_stall_at=STEP, +debug.kill_writer_at=STEP",
    )
    perturb = debug.get("perturb_resume", False)
    require(isinstance(perturb, bool), "debug.perturb_resume", f"must be true or false, got {perturb!r}")
    faults = Faults(
        inject_spike_at=None if debug.get("inject_spike_at") is None else int(debug["inject_spike_at"]),
        inject_lr_scale=float(debug.get("inject_lr_scale", Faults.inject_lr_scale)),
        fail_save_at=None if debug.get("fail_save_at") is None else int(debug["fail_save_at"]),
        fail_save_rank=int(debug.get("fail_save_rank", 0)),
        stall_at=None if debug.get("stall_at") is None else int(debug["stall_at"]),
        stall_rank=int(debug.get("stall_rank", 0)),
        save_delay_s=float(debug.get("save_delay_s", 0.0)),
        perturb_resume=perturb,
        upload_stall_at=None if debug.get("upload_stall_at") is None else int(debug["upload_stall_at"]),
        kill_writer_at=None if debug.get("kill_writer_at") is None else int(debug["kill_writer_at"]),
    )
    launch = Launch(
        resume=None if options.get("resume") is None else str(options["resume"]),
        rollback_to=None if options.get("rollback_to") is None else str(options["rollback_to"]),
        debug=faults,
    )
    require(
        faults.save_delay_s >= 0, "debug.save_delay_s", f"must be a number of seconds >= 0, got {faults.save_delay_s}"
    )
    require(
        launch.resume is None or launch.rollback_to is None,
        "rollback_to",
        "give +rollback_to=PATH or +resume=..., not both (a rollback continues the run from PATH)",
    )
    require(
        faults.inject_spike_at is None or faults.inject_spike_at > 0,
        "debug.inject_spike_at",
        f"must be a step >= 1, got {faults.inject_spike_at}",
    )
    # The watchdog is armed by the first completed step: a stall before it would be start-up, which it ignores.
    require(
        faults.stall_at is None or faults.stall_at >= 2,
        "debug.stall_at",
        f"must be a step >= 2 (the watchdog arms after the first step), got {faults.stall_at}",
    )
    return launch


def given_keys(overrides: list[str] | tuple[str, ...]) -> frozenset[str]:
    """The dotted keys (and groups) command-line `overrides` set, as Hydra parses them: `model.vocab_size=300` and
    `++model.vocab_size=300` both give `model.vocab_size`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return frozenset(o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides)))


def injection_note(cfg: Config, launch: Launch) -> str | None:
    """A warning when `+debug.inject_spike_at` causes a spike nothing will detect: the loss of the step after the
    injected one shows it, and the detector judges a step only past `spike.warmup_steps` with a full window."""
    at = launch.debug.inject_spike_at
    if at is None:
        return None
    s = cfg.spike
    seen_from = max(s.warmup_steps, s.window)  # the first injection step whose next step the detector judges
    if s.enabled and at >= seen_from:
        return None
    why = (
        "spike.enabled=false"
        if not s.enabled
        else f"the detector arms after spike.warmup_steps={s.warmup_steps} with a full spike.window={s.window}"
    )
    return (
        f"WARNING: +debug.inject_spike_at={at} shows in the loss of step {at + 1}, but {why}: the spike will not be "
        f"detected or rolled back (inject at step {seen_from} or later with spike.enabled=true, or lower "
        "spike.warmup_steps)"
    )


def from_command_line(overrides: list[str]) -> tuple[Config, Launch]:
    """What training makes of its command line: the composed, checked config with the vocabulary a token file
    declares (`token_files.adopt_data_vocab`), and the launch's own requests. Training, `curry-train run` and the
    run tools all start here, so they agree on the run."""
    cfg, launch = resolve(compose(overrides), overrides)
    if cfg.data.name == "tokens":  # numpy comes with token files: the plan of other data imports none
        from curry_train.token_files import adopt_data_vocab  # it imports this module

        cfg, launch = adopt_data_vocab(cfg, launch)
    return cfg, launch


def resolve(raw: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, Launch]:
    """The typed, validated config and the launch's `+` options; `overrides` are the command line's, so the launch
    knows which keys it set itself (a token file's sidecar yields to `model.vocab_size` given there, not to a
    preset's).

    `OmegaConf.to_object` instantiates the dataclasses, which runs their `__post_init__` checks on the final values.
    """
    raw = raw.copy()
    with open_dict(raw):
        options = {key: raw.pop(key, None) for key in LAUNCH_KEYS}
        init_from = raw.pop(INIT_FROM, None)
        if init_from is not None:
            raw.init.source = str(init_from)
    options = {k: OmegaConf.to_container(v) if isinstance(v, DictConfig) else v for k, v in options.items()}
    launch = _launch_of(options)
    check_known_keys(raw)
    if raw.run.id is None:
        raw.run.id = default_run_id(raw)
    cfg = OmegaConf.to_object(raw)
    assert isinstance(cfg, Config)
    ckpt = cfg.checkpoint
    require(
        launch.debug.kill_writer_at is None or (ckpt.async_save and ckpt.writer == "process"),
        "debug.kill_writer_at",
        "kills the writer process, which only asynchronous saves with checkpoint.writer=process have "
        f"(got checkpoint.writer={ckpt.writer}, checkpoint.async_save={str(ckpt.async_save).lower()})",
    )
    note = injection_note(cfg, launch)
    return cfg, dataclasses.replace(launch, given=given_keys(overrides), notes=(note,) if note else ())
