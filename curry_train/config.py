"""The config schema: one dataclass per config group, registered in Hydra's ConfigStore.

Hydra merges each group's YAML file into its typed node, so a misspelt key or a value of the wrong type fails
at composition, before any process group, data or model is touched. Checks that types cannot express live in
`__post_init__` and `validate`, with messages that name the key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from curry_train.checkpoint.cadence import AutoBounds
from curry_train.checkpoint.policy import Policy, Role
from curry_train.spike import SpikeRule

AUTO = "auto"  # checkpoint.rollback_every / recovery_every chosen by the run (see CheckpointConfig)


class ConfigError(ValueError):
    """A config value that composes but is not allowed; the message names the key."""


class DataError(ConfigError):
    """Input data that cannot be used as configured (missing, misread, too short); the message names the key or
    the file. A ConfigError, so the entry point exits 2 with one line instead of a traceback."""


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, key: str, allowed: tuple[str, ...]) -> None:
    require(value in allowed, key, f"got {value!r}, allowed: {', '.join(allowed)}")


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
            require(getattr(self, key) > 0, f"model.{key}", f"must be positive, got {getattr(self, key)}")
        require(
            self.dim % self.n_heads == 0,
            "model.dim",
            f"{self.dim} is not divisible by n_heads={self.n_heads}",
        )
        kv = self.n_kv_heads or self.n_heads
        require(self.n_heads % kv == 0, "model.n_kv_heads", f"{kv} does not divide n_heads={self.n_heads}")
        require(
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
        require(self.lr > 0, "optimizer.lr", f"must be positive, got {self.lr}")
        require(len(self.betas) == 2, "optimizer.betas", f"needs two values, got {list(self.betas)}")


@dataclass
class SchedulerConfig:
    """Linear warmup to the peak lr, then cosine decay to `min_lr_ratio * lr` at the last step."""

    name: str = "warmup_cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _one_of(self.name, "scheduler.name", ("warmup_cosine", "constant"))
        require(self.warmup_steps >= 0, "scheduler.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(
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
        require(self.seq_len > 0, "data.seq_len", f"must be positive, got {self.seq_len}")
        require(0.0 < self.dev_fraction < 1.0, "data.dev_fraction", f"must be in (0, 1), got {self.dev_fraction}")
        require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.max_bytes >= 0, "data.max_bytes", f"must be >= 0 (0: all), got {self.max_bytes}")
        if self.name in ("text", "tokens"):
            require(bool(self.path), "data.path", f"data={self.name} needs data.path=FILE_OR_DIR")


@dataclass
class RetentionConfig:
    rollback_keep: int = 5
    recovery_keep: int = 3
    abandoned_keep: int = 1  # checkpoints a rollback set aside (newest kept); `curry-train gc` removes them all


@dataclass
class CheckpointConfig:
    """The checkpoint policy: three roles, each with a cadence (0 disables it), contents and retention."""

    # Steps between saves (0 disables), or auto: see mtbf_hours and auto_* below. `Any` because Hydra cannot merge
    # a Union-typed node; __post_init__ allows an integer or "auto".
    rollback_every: Any = 100
    recovery_every: Any = 1000
    best_k: int = 3
    best_k_metric: str = "dev_loss"
    best_k_direction: str = "minimize"
    rollback_contents: str = "full"  # full: parameters + optimizer + RNG + data position; params: parameters only
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    async_save: bool = True  # written by a background writer from a staged copy; false waits for every save
    # Who writes an asynchronous save: a writer process of each rank, from shared-memory staging buffers (its
    # serialisation does not hold the training process's interpreter lock), or a thread of the training process.
    writer: str = "thread"
    direct_io: bool = True  # data files bypass the page cache (O_DIRECT) where the filesystem allows it
    check_storage: bool = True  # refuse to start when the committed storage does not fit the free space
    save_final: bool = True  # the last step is always saved with full state, so run_end names a checkpoint
    preempt_grace_s: float = 30.0  # seconds between the preemption signal and the kill (torchrun's default)
    # `*_every=auto`: Daly's optimum interval for this run's measured save cost, step time and mean time between
    # failures, within these bounds (checkpoint/cadence.py: auto_interval).
    mtbf_hours: float = 24.0  # prior MTBF at this job's scale; the run's own interruptions refine it
    auto_min_every: int = 10  # fewest steps between saves (and the first interval, before anything is measured)
    auto_max_every: int | None = None  # most steps between saves; None: train.steps
    max_overhead: float = 0.05  # saves may cost at most this fraction of training time
    # A second, durable home for the checkpoints: any fsspec URL (s3://bucket/prefix, gs://..., file:///...), under
    # <remote>/<run.id>/ in the run directory's layout, uploaded in the background after each local commit.
    remote: str | None = None
    remote_roles: list[str] = field(default_factory=lambda: ["recovery", "best_k"])  # the roles copied there
    remote_rollback_keep: int | None = None  # remote retention; None: the local keep
    remote_recovery_keep: int | None = None
    remote_retry_s: float = 600.0  # a failing upload retries with backoff this long, then is journaled as failed
    # One writer per run: a launch holds <remote>/<run.id>/lease, renewed every fifth of this; a lease not renewed
    # for this long is taken over by the next launch (checkpoint/lease.py).
    remote_lease_s: float = 300.0

    def __post_init__(self) -> None:
        _one_of(self.best_k_direction, "checkpoint.best_k_direction", ("minimize", "maximize"))
        # Only metrics every rank computes identically may rank best-K: the save it triggers is collective.
        _one_of(self.best_k_metric, "checkpoint.best_k_metric", ("dev_loss",))
        _one_of(self.rollback_contents, "checkpoint.rollback_contents", ("full", "params"))
        _one_of(self.writer, "checkpoint.writer", ("process", "thread"))
        for role in self.remote_roles:
            _one_of(role, "checkpoint.remote_roles", ("rollback", "recovery", "best_k"))
        for key in ("remote_rollback_keep", "remote_recovery_keep"):
            keep = getattr(self, key)
            require(keep is None or keep >= 1, f"checkpoint.{key}", f"must be >= 1 (null: the local keep), got {keep}")
        require(self.remote_retry_s > 0, "checkpoint.remote_retry_s", f"must be > 0, got {self.remote_retry_s}")
        lease = self.remote_lease_s
        require(
            not isinstance(lease, bool) and isinstance(lease, (int, float)) and lease >= 3,
            "checkpoint.remote_lease_s",
            f"must be a number of seconds >= 3 (renewed every fifth of it; default 300), got {lease!r}",
        )
        for key in ("rollback_every", "recovery_every", "best_k"):
            value = getattr(self, key)
            number = isinstance(value, int) and not isinstance(value, bool)
            require(
                (number and value >= 0) or (value == AUTO and key != "best_k"),
                f"checkpoint.{key}",
                f"must be an integer >= 0 (0 disables){' or auto' if key != 'best_k' else ''}, got {value!r}",
            )
        # The automatic interval is chosen for crash recovery; a parameters-only rollback cannot resume a crash.
        require(
            not (self.rollback_every == AUTO and self.rollback_contents == "params"),
            "checkpoint.rollback_every",
            "auto chooses the interval between exact-resume saves, and rollback_contents=params checkpoints cannot "
            "resume a crash; give a number of steps, or checkpoint.rollback_contents=full",
        )
        require(self.mtbf_hours > 0, "checkpoint.mtbf_hours", f"must be > 0, got {self.mtbf_hours}")
        require(self.auto_min_every >= 1, "checkpoint.auto_min_every", f"must be >= 1, got {self.auto_min_every}")
        require(
            self.auto_max_every is None or self.auto_max_every >= self.auto_min_every,
            "checkpoint.auto_max_every",
            f"must be >= auto_min_every={self.auto_min_every} (or null: train.steps), got {self.auto_max_every}",
        )
        require(
            0 < self.max_overhead <= 1,
            "checkpoint.max_overhead",
            f"must be a fraction of training time in (0, 1], got {self.max_overhead}",
        )

    def auto_roles(self) -> tuple[Role, ...]:
        """The roles whose cadence is `auto`, recovery first."""
        every = {Role.RECOVERY: self.recovery_every, Role.ROLLBACK: self.rollback_every}
        return tuple(role for role, value in every.items() if value == AUTO)

    def auto_bounds(self, steps: int) -> AutoBounds:
        top = steps if self.auto_max_every is None else self.auto_max_every
        return AutoBounds(self.auto_min_every, max(top, self.auto_min_every), self.max_overhead)

    def policy(self) -> Policy:
        """The policy this block describes; the policy's own checks (keeps against cadences) name the key. An
        `auto` cadence starts at auto_min_every, the most often it can save (so the storage plan is an upper bound);
        the run then replaces it with its decisions."""

        def every(value: int | str) -> int:
            return self.auto_min_every if value == AUTO else int(value)

        try:
            return Policy(
                rollback_every=every(self.rollback_every),
                recovery_every=every(self.recovery_every),
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
        require(self.console_every > 0, "logger.console_every", f"must be positive, got {self.console_every}")


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
        require(self.steps > 0, "train.steps", f"must be positive, got {self.steps}")
        # numpy's generators, which order the samples, take non-negative seeds only.
        require(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        require(self.batch_size > 0, "train.batch_size", f"must be positive, got {self.batch_size}")
        require(self.grad_accum > 0, "train.grad_accum", f"must be positive, got {self.grad_accum}")
        require(self.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 disables), got {self.eval_every}")
        require(self.eval_batches > 0, "train.eval_batches", f"must be positive, got {self.eval_batches}")
        _one_of(self.device, "train.device", ("auto", "cpu", "cuda"))
        _one_of(self.mixed_precision, "train.mixed_precision", ("auto", "bf16", "fp32"))
        require(
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
        require(self.window >= 3, "spike.window", f"must be >= 3 (a median and a deviation), got {self.window}")
        for key in ("warmup_steps", "rollback_margin", "skip_extra_steps", "rewarmup_steps", "max_rollbacks"):
            require(getattr(self, key) >= 0, f"spike.{key}", f"must be >= 0, got {getattr(self, key)}")
        require(self.sigmas > 0, "spike.sigmas", f"must be > 0, got {self.sigmas}")
        require(self.min_rise >= 0, "spike.min_rise", f"must be >= 0, got {self.min_rise}")
        require(
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
            require(
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
            require(not used or self.source is not None, f"init.{key}", "needs +init_from=SOURCE")


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
    require(
        t.batch_size % per_step == 0,
        "train.batch_size",
        f"{t.batch_size} is not divisible by world_size * grad_accum = {world_size} * {t.grad_accum}",
    )
    require(
        cfg.data.seq_len <= cfg.model.max_seq_len,
        "data.seq_len",
        f"{cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}",
    )
    if cfg.spike.enabled:
        policy = cfg.checkpoint.policy()
        require(
            policy.rollback_every > 0 or policy.recovery_every > 0,
            "spike.enabled",
            "a rollback needs a checkpoint to return to: set checkpoint.rollback_every (or recovery_every) > 0, "
            "or spike.enabled=false",
        )
    if cfg.data.name in ("stdlib", "text"):
        require(
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


# `+init_from=SOURCE` is added with `+` like the launch options, but it is part of what the run is (its initial
# parameters): it becomes `init.source`, in the run id and config.yaml.
INIT_FROM = "init_from"

# Per-launch options added with `+`: they say what this launch does with the run (continue it, roll it back, inject
# a test spike), not what the run is, so they are not in the schema, the run id or config.yaml.
LAUNCH_KEYS = ("resume", "rollback_to", "debug")


@dataclass(frozen=True)
class Faults:
    """`+debug.*`: faults injected on purpose, to see what the harness does about them (tests, `curry-train
    rehearse`). Each acts once in the run's life where a relaunch would otherwise repeat it."""

    inject_spike_at: int | None = None  # +debug.inject_spike_at=STEP: multiply that step's lr to cause a spike
    inject_lr_scale: float = 1000.0  # +debug.inject_lr_scale=X
    fail_save_at: int | None = None  # +debug.fail_save_at=STEP: the disk fills up while that step's save writes
    fail_save_rank: int = 0  # +debug.fail_save_rank=R: on this rank
    stall_at: int | None = None  # +debug.stall_at=STEP: stop making progress before that step, once in the run
    stall_rank: int = 0  # +debug.stall_rank=R: on this rank
    save_delay_s: float = 0.0  # +debug.save_delay_s=S: every save blocks training S seconds longer (a slow disk)
    kill_writer_at: int | None = None  # +debug.kill_writer_at=STEP: SIGKILL the writer process (on fail_save_rank)
    upload_stall_at: int | None = None  # +debug.upload_stall_at=STEP: uploads from that step on stall after a file
    perturb_resume: bool = False  # +debug.perturb_resume=true: a deliberately inexact resume (`curry-train rehearse`)

    @property
    def full_disk(self) -> tuple[int, int] | None:
        """(step, rank) of the save that runs out of space, if any."""
        return None if self.fail_save_at is None else (self.fail_save_at, self.fail_save_rank)

    @property
    def killed_writer(self) -> tuple[int, int] | None:
        """(step, rank) of the save whose writer process is killed while it writes, if any."""
        return None if self.kill_writer_at is None else (self.kill_writer_at, self.fail_save_rank)


@dataclass(frozen=True)
class Launch:
    """What this launch asks of the run (the `+` options): not part of the run, its id or its config.yaml."""

    resume: str | None = None  # +resume=latest|auto|PATH
    rollback_to: str | None = None  # +rollback_to=PATH: roll this run back to one of its checkpoints, once
    debug: Faults = Faults()
    given: frozenset[str] = frozenset()  # the keys the command line set (`model.vocab_size`, ...), not the presets
    notes: tuple[str, ...] = ()  # what this launch will do that the user may not expect, said at start by rank 0
