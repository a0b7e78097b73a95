"""The config schema: one dataclass per config group, registered in Hydra's ConfigStore.

Hydra merges each group's YAML file into its typed node, so a misspelt key or a value of the wrong type fails
at composition, before any process group, data or model is touched. Checks that types cannot express live in
`__post_init__` and `validate`, with messages that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from curry_train.checkpoint.policy import Policy
from curry_train.spike import SpikeRule


class ConfigError(ValueError):
    """A config value that composes but is not allowed; the message names the key."""


class DataError(ConfigError):
    """Input data that cannot be used as configured (missing, misread, too short); the message names the key or
    the file. A ConfigError, so the entry point exits 2 with one line instead of a traceback."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, f"got {value!r}, allowed: {', '.join(allowed)}")


@dataclass
class ModelConfig:
    """A Llama-architecture decoder (RMSNorm, rotary embeddings, SwiGLU, no biases)."""

    name: str = "tiny"
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    ffn_dim: int = 384  # hidden size of the SwiGLU feed-forward
    vocab_size: int = 256
    max_seq_len: int = 2048  # rotary table length; the data's seq_len must not exceed it
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for key in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            _require(getattr(self, key) > 0, f"model.{key}", f"must be positive, got {getattr(self, key)}")
        _require(
            self.dim % self.n_heads == 0,
            "model.dim",
            f"{self.dim} is not divisible by n_heads={self.n_heads}",
        )
        kv = self.n_kv_heads or self.n_heads
        _require(self.n_heads % kv == 0, "model.n_kv_heads", f"{kv} does not divide n_heads={self.n_heads}")
        _require(
            (self.dim // self.n_heads) % 2 == 0,
            "model.dim",
            "head dimension must be even for rotary embeddings",
        )


@dataclass
class OptimizerConfig:
    """AdamW; `lr` is the peak learning rate of the schedule."""

    name: str = "adamw"
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        _one_of(self.name, "optimizer.name", ("adamw",))
        _require(self.lr > 0, "optimizer.lr", f"must be positive, got {self.lr}")
        _require(len(self.betas) == 2, "optimizer.betas", f"needs two values, got {list(self.betas)}")


@dataclass
class SchedulerConfig:
    """Linear warmup to the peak lr, then cosine decay to `min_lr_ratio * lr` at the last step."""

    name: str = "warmup_cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _one_of(self.name, "scheduler.name", ("warmup_cosine", "constant"))
        _require(self.warmup_steps >= 0, "scheduler.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(
            0.0 <= self.min_lr_ratio <= 1.0,
            "scheduler.min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )


@dataclass
class DataConfig:
    """Where samples come from.

    `stdlib`: the running interpreter's standard-library sources as bytes (vocab 256), present on every machine.
    `text`: user files or folders (`path`, comma-separated), as bytes. `tokens`: flat uint16/uint32 token files as
    nanoGPT writes them (`path` for train, `dev_path` for dev), memory-mapped.
    """

    name: str = "stdlib"
    path: str | None = None
    dev_path: str | None = None
    token_dtype: str = "uint16"
    seq_len: int = 128
    dev_fraction: float = 0.05  # share of files (stdlib, text) held out as dev, chosen by a hash of the file name
    num_workers: int = 0
    max_bytes: int = 0  # 0: all of the corpus; else the first max_bytes of it (sorted file order)

    def __post_init__(self) -> None:
        _one_of(self.name, "data.name", ("stdlib", "text", "tokens"))
        _one_of(self.token_dtype, "data.token_dtype", ("uint16", "uint32"))
        _require(self.seq_len > 0, "data.seq_len", f"must be positive, got {self.seq_len}")
        _require(0.0 < self.dev_fraction < 1.0, "data.dev_fraction", f"must be in (0, 1), got {self.dev_fraction}")
        _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.max_bytes >= 0, "data.max_bytes", f"must be >= 0 (0: all), got {self.max_bytes}")
        if self.name in ("text", "tokens"):
            _require(bool(self.path), "data.path", f"data={self.name} needs data.path=FILE_OR_DIR")


@dataclass
class RetentionConfig:
    rollback_keep: int = 5
    recovery_keep: int = 3
    abandoned_keep: int = 1  # checkpoints a rollback set aside (newest kept); `curry-train gc` removes them all


@dataclass
class CheckpointConfig:
    """The checkpoint policy: three roles, each with a cadence (0 disables it), contents and retention."""

    rollback_every: int = 100
    recovery_every: int = 1000
    best_k: int = 3
    best_k_metric: str = "dev_loss"
    best_k_direction: str = "minimize"
    rollback_contents: str = "full"  # full: parameters + optimizer + RNG + data position; params: parameters only
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    async_save: bool = True  # written by a background writer from a staged copy; false waits for every save
    direct_io: bool = True  # data files bypass the page cache (O_DIRECT) where the filesystem allows it
    check_storage: bool = True  # refuse to start when the committed storage does not fit the free space
    save_final: bool = True  # the last step is always saved with full state, so run_end names a checkpoint
    preempt_grace_s: float = 30.0  # seconds between the preemption signal and the kill (torchrun's default)
    # A second, durable home for the checkpoints: any fsspec URL (s3://bucket/prefix, gs://..., file:///...), under
    # <remote>/<run.id>/ in the run directory's layout, uploaded in the background after each local commit.
    remote: str | None = None
    remote_roles: list[str] = field(default_factory=lambda: ["recovery", "best_k"])  # the roles copied there
    remote_rollback_keep: int | None = None  # remote retention; None: the local keep
    remote_recovery_keep: int | None = None
    remote_retry_s: float = 600.0  # a failing upload retries with backoff this long, then is journaled as failed

    def __post_init__(self) -> None:
        _one_of(self.best_k_direction, "checkpoint.best_k_direction", ("minimize", "maximize"))
        # Only metrics every rank computes identically may rank best-K: the save it triggers is collective.
        _one_of(self.best_k_metric, "checkpoint.best_k_metric", ("dev_loss",))
        _one_of(self.rollback_contents, "checkpoint.rollback_contents", ("full", "params"))
        for role in self.remote_roles:
            _one_of(role, "checkpoint.remote_roles", ("rollback", "recovery", "best_k"))
        for key in ("remote_rollback_keep", "remote_recovery_keep"):
            keep = getattr(self, key)
            _require(keep is None or keep >= 1, f"checkpoint.{key}", f"must be >= 1 (null: the local keep), got {keep}")
        _require(self.remote_retry_s > 0, "checkpoint.remote_retry_s", f"must be > 0, got {self.remote_retry_s}")
        for key in ("rollback_every", "recovery_every", "best_k"):
            _require(
                getattr(self, key) >= 0,
                f"checkpoint.{key}",
                f"must be >= 0 (0 disables), got {getattr(self, key)}",
            )

    def policy(self) -> Policy:
        """The policy this block describes; the policy's own checks (keeps against cadences) name the key."""
        try:
            return Policy(
                rollback_every=self.rollback_every,
                recovery_every=self.recovery_every,
                best_k=self.best_k,
                best_k_metric=self.best_k_metric,
                best_k_direction=self.best_k_direction,
                rollback_keep=self.retention.rollback_keep,
                recovery_keep=self.retention.recovery_keep,
                rollback_contents=self.rollback_contents,
                abandoned_keep=self.retention.abandoned_keep,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass
class WandbConfig:
    mode: str = "offline"  # disabled, offline (files under the run directory) or online
    project: str = "curry-train"
    entity: str | None = None

    def __post_init__(self) -> None:
        _one_of(self.mode, "logger.wandb.mode", ("disabled", "offline", "online"))


@dataclass
class LoggerConfig:
    console_every: int = 10  # progress bar refresh cadence, in steps; metrics.jsonl gets every step regardless
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        _require(self.console_every > 0, "logger.console_every", f"must be positive, got {self.console_every}")


@dataclass
class TrainConfig:
    steps: int = 200
    seed: int = 1337
    batch_size: int = 16  # sequences per optimizer step, across all ranks
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 100  # 0 disables evaluation
    eval_batches: int = 4
    device: str = "auto"  # auto (cuda when available), cpu, cuda
    mixed_precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu), bf16, fp32
    # No step, save, evaluation or load making progress for this long ends the job (status 1) with every thread's
    # stack in failures.log; also the longest any collective may wait. None: a multiple of the measured step and
    # save times, at least 5 minutes (`curry-train plan` prints it).
    hang_timeout_s: float | None = None

    def __post_init__(self) -> None:
        _require(self.steps > 0, "train.steps", f"must be positive, got {self.steps}")
        # numpy's generators, which order the samples, take non-negative seeds only.
        _require(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        _require(self.batch_size > 0, "train.batch_size", f"must be positive, got {self.batch_size}")
        _require(self.grad_accum > 0, "train.grad_accum", f"must be positive, got {self.grad_accum}")
        _require(self.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 disables), got {self.eval_every}")
        _require(self.eval_batches > 0, "train.eval_batches", f"must be positive, got {self.eval_batches}")
        _one_of(self.device, "train.device", ("auto", "cpu", "cuda"))
        _one_of(self.mixed_precision, "train.mixed_precision", ("auto", "bf16", "fp32"))
        _require(
            self.hang_timeout_s is None or self.hang_timeout_s > 0,
            "train.hang_timeout_s",
            f"must be a positive number of seconds (or null: automatic), got {self.hang_timeout_s}",
        )


@dataclass
class SpikeConfig:
    """Loss-spike detection and automatic rollback (the rule is in `curry_train/spike.py`).

    A step's all-reduced loss is a spike when it is not finite, or exceeds the median of the last `window` losses
    by more than `sigmas` robust deviations and by more than `min_rise` of the median. The run then rolls back in
    process to the newest rollback or recovery checkpoint at or before `spike step - window - rollback_margin`,
    skips the samples of the abandoned steps (and `skip_extra_steps` more batches) and goes on.
    """

    enabled: bool = False
    window: int = 50  # steps in the baseline
    warmup_steps: int = 100  # not armed before this step (early training falls fast and noisily)
    sigmas: float = 6.0
    min_rise: float = 0.1  # fraction of the baseline a spike must also exceed it by
    rollback_margin: int = 0  # further steps before the window's start the rollback target must lie
    skip_extra_steps: int = 0  # batches skipped beyond those of the abandoned steps
    rewarmup_steps: int = 20  # lr ramp after a rollback (or resume) whose optimizer state starts fresh
    max_rollbacks: int = 3  # more rollbacks than this within max_rollbacks_within steps stop the run (exit 3)
    max_rollbacks_within: int = 1000

    def __post_init__(self) -> None:
        _require(self.window >= 3, "spike.window", f"must be >= 3 (a median and a deviation), got {self.window}")
        for key in ("warmup_steps", "rollback_margin", "skip_extra_steps", "rewarmup_steps", "max_rollbacks"):
            _require(getattr(self, key) >= 0, f"spike.{key}", f"must be >= 0, got {getattr(self, key)}")
        _require(self.sigmas > 0, "spike.sigmas", f"must be > 0, got {self.sigmas}")
        _require(self.min_rise >= 0, "spike.min_rise", f"must be >= 0, got {self.min_rise}")
        _require(
            self.max_rollbacks_within > 0,
            "spike.max_rollbacks_within",
            f"must be positive, got {self.max_rollbacks_within}",
        )

    def rule(self) -> SpikeRule:
        """The detection rule of this block (`spike.judge` applies it)."""
        return SpikeRule(self.window, self.warmup_steps, self.sigmas, self.min_rise)


@dataclass
class RunConfig:
    root: str = "runs"
    # None: derived from the config (a hash of everything but `run` and `resume`), so the same command names the
    # same run directory after a crash without the user naming it.
    id: str | None = None

    def __post_init__(self) -> None:
        if self.id is not None:
            _require(
                bool(self.id)
                and "/" not in self.id
                and "\\" not in self.id
                and self.id not in (".", "..")
                and not self.id.startswith("."),
                "run.id",
                f"{self.id!r} must be one directory name under run.root: no path separator, not '.', '..' or a "
                "name starting with '.'",
            )


@dataclass
class InitConfig:
    """A warm start: the new run's initial parameters come from `source` (given as `+init_from=SOURCE`: a
    curry-train checkpoint or run directory, an exported safetensors file, a Hugging Face Llama directory) instead
    of the initialiser. Step, schedule and data position start from zero; see `warm_start.py`."""

    source: str | None = None
    optimizer: bool = False  # also take the source's optimizer state (a curry-train checkpoint with full state)
    exclude: list[str] = field(default_factory=list)  # parameter name patterns left to the initialiser

    def __post_init__(self) -> None:
        for key, used in (("optimizer", self.optimizer), ("exclude", bool(self.exclude))):
            _require(not used or self.source is not None, f"init.{key}", "needs +init_from=SOURCE")


@dataclass
class Config:
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    data: DataConfig = MISSING
    checkpoint: CheckpointConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    run: RunConfig = field(default_factory=RunConfig)
    init: InitConfig = field(default_factory=InitConfig)


def validate(cfg: Config, world_size: int) -> None:
    """Checks across groups, and those that need the world size."""
    t = cfg.train
    per_step = world_size * t.grad_accum
    _require(
        t.batch_size % per_step == 0,
        "train.batch_size",
        f"{t.batch_size} is not divisible by world_size * grad_accum = {world_size} * {t.grad_accum}",
    )
    _require(
        cfg.data.seq_len <= cfg.model.max_seq_len,
        "data.seq_len",
        f"{cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}",
    )
    if cfg.spike.enabled:
        _require(
            cfg.checkpoint.rollback_every > 0 or cfg.checkpoint.recovery_every > 0,
            "spike.enabled",
            "a rollback needs a checkpoint to return to: set checkpoint.rollback_every (or recovery_every) > 0, "
            "or spike.enabled=false",
        )
    if cfg.data.name in ("stdlib", "text"):
        _require(
            cfg.model.vocab_size >= 256,
            "model.vocab_size",
            f"byte data needs >= 256, got {cfg.model.vocab_size}",
        )


def config_dir() -> Path:
    """The config tree (config.yaml and one folder per group): `curry_train/conf` in an installed wheel, where
    pyproject.toml puts it, else `conf/` at the top of the checkout this package was imported from (a checkout on
    PYTHONPATH, or an editable install). A directory path rather than the module `curry_train.conf`: on a path
    beside an editable install, that module name can resolve to the other checkout's configs."""
    package = Path(__file__).resolve().parent
    installed, checkout = package / "conf", package.parent / "conf"
    if (installed / "config.yaml").is_file():
        return installed
    if (checkout / "config.yaml").is_file() and (package.parent / "pyproject.toml").is_file():
        return checkout
    raise FileNotFoundError(
        f"curry-train: no config tree: neither {installed} (an installed curry-train) nor {checkout} (a checkout) "
        "holds config.yaml; reinstall curry-train, or run from a complete checkout"
    )


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: config keys as they are typed on the command line."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


register_configs()


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


# `+init_from=SOURCE` is added with `+` like the launch options, but it is part of what the run is (its initial
# parameters): it becomes `init.source`, in the run id and config.yaml.
INIT_FROM = "init_from"

# Per-launch options added with `+`: they say what this launch does with the run (continue it, roll it back, inject
# a test spike), not what the run is, so they are not in the schema, the run id or config.yaml.
LAUNCH_KEYS = ("resume", "rollback_to", "debug")


@dataclass(frozen=True)
class Launch:
    resume: str | None = None  # +resume=latest|auto|PATH
    rollback_to: str | None = None  # +rollback_to=PATH: roll this run back to one of its checkpoints, once
    inject_spike_at: int | None = None  # +debug.inject_spike_at=STEP: multiply that step's lr to cause a spike
    inject_lr_scale: float = 1000.0  # +debug.inject_lr_scale=X
    fail_save_at: int | None = None  # +debug.fail_save_at=STEP: the disk fills up while that step's save writes
    fail_save_rank: int = 0  # +debug.fail_save_rank=R: on this rank
    stall_at: int | None = None  # +debug.stall_at=STEP: stop making progress before that step, once in the run
    stall_rank: int = 0  # +debug.stall_rank=R: on this rank
    upload_stall_at: int | None = None  # +debug.upload_stall_at=STEP: uploads from that step on stall after a file
    perturb_resume: bool = False  # +debug.perturb_resume=true: a deliberately inexact resume (`curry-train rehearse`)
    given: frozenset[str] = frozenset()  # the keys the command line set (`model.vocab_size`, ...), not the presets
    notes: tuple[str, ...] = ()  # what this launch will do that the user may not expect, said at start by rank 0


def schema_keys(node: type = None, prefix: str = "") -> set[str]:  # type: ignore[assignment]
    """Every dotted key the schema has, groups included (`checkpoint`, `checkpoint.retention.rollback_keep`, ...)."""
    keys: set[str] = set()
    for f in dataclasses.fields(node or Config):
        key = f"{prefix}{f.name}"
        keys.add(key)
        kind = f.type if isinstance(f.type, type) else globals().get(str(f.type))
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
        "upload_stall_at",
        "perturb_resume",
    )
    unknown = sorted(set(debug) - set(allowed))
    _require(
        not unknown,
        f"debug.{unknown[0] if unknown else ''}",
        "allowed: +debug.inject_spike_at=STEP, +debug.inject_lr_scale=X, +debug.fail_save_at=STEP, "
        "+debug.fail_save_rank=R, +debug.stall_at=STEP, +debug.stall_rank=R, +debug.upload_stall_at=STEP, "
        "+debug.perturb_resume=true",
    )
    perturb = debug.get("perturb_resume", False)
    _require(isinstance(perturb, bool), "debug.perturb_resume", f"must be true or false, got {perturb!r}")
    launch = Launch(
        resume=None if options.get("resume") is None else str(options["resume"]),
        rollback_to=None if options.get("rollback_to") is None else str(options["rollback_to"]),
        inject_spike_at=None if debug.get("inject_spike_at") is None else int(debug["inject_spike_at"]),
        inject_lr_scale=float(debug.get("inject_lr_scale", Launch.inject_lr_scale)),
        fail_save_at=None if debug.get("fail_save_at") is None else int(debug["fail_save_at"]),
        fail_save_rank=int(debug.get("fail_save_rank", 0)),
        stall_at=None if debug.get("stall_at") is None else int(debug["stall_at"]),
        stall_rank=int(debug.get("stall_rank", 0)),
        upload_stall_at=None if debug.get("upload_stall_at") is None else int(debug["upload_stall_at"]),
        perturb_resume=perturb,
    )
    _require(
        launch.resume is None or launch.rollback_to is None,
        "rollback_to",
        "give +rollback_to=PATH or +resume=..., not both (a rollback continues the run from PATH)",
    )
    _require(
        launch.inject_spike_at is None or launch.inject_spike_at > 0,
        "debug.inject_spike_at",
        f"must be a step >= 1, got {launch.inject_spike_at}",
    )
    # The watchdog is armed by the first completed step: a stall before it would be start-up, which it ignores.
    _require(
        launch.stall_at is None or launch.stall_at >= 2,
        "debug.stall_at",
        f"must be a step >= 2 (the watchdog arms after the first step), got {launch.stall_at}",
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
    at = launch.inject_spike_at
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
    note = injection_note(cfg, launch)
    return cfg, dataclasses.replace(launch, given=given_keys(overrides), notes=(note,) if note else ())
