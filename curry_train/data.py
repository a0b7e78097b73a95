"""Corpora, world-size-invariant sampling, and the StatefulDataLoader.

The global order of samples is a function of (seed, global sample index) alone: optimizer step `s` consumes
global samples `[s * B, (s + 1) * B)` and rank `r` of `W` takes its contiguous slice of them. A run can therefore
resume on another number of ranks from a single number, the global sample cursor, and see the same batches.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from curry_train.config import ConfigError, DataConfig, DataError
from curry_train.token_files import TokenFile, check_model_vocab, open_token_file

# torchdata 0.11 calls a torch API that torch 2.13 deprecates, once per loader; the warning is not ours to fix and
# would greet every user at every start.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".toml", ".c", ".h", ".html", ".csv")


@dataclass(frozen=True)
class Corpus:
    """Token ids of the train and dev splits (numpy arrays, possibly memory-mapped)."""

    train: np.ndarray
    dev: np.ndarray
    vocab_size: int
    description: str


def _is_dev(relpath: str, dev_fraction: float) -> bool:
    # A hash of the file's name, not its position, so adding a file does not move the others between splits.
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "little")
    return h / 2**64 < dev_fraction


def _list_files(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(suffixes))
    return sorted(found)


# Said at start whenever the split by file name is replaced by the tail, so nobody mistakes it for a clean split.
TAIL_SPLIT_NOTE = (
    "too few files for a split by file name: the last {fraction:.0%} of the data held out as dev "
    "(the cut may fall inside a file)"
)


def too_small_to_split(train_len: int, dev_len: int, seq_len: int) -> bool:
    """Whether a split by file name leaves either side without two windows of `seq_len`."""
    return train_len <= 2 * seq_len or dev_len <= 2 * seq_len


def _bytes_corpus(files: list[tuple[str, Path]], cfg: DataConfig, description: str) -> Corpus:
    train, dev, total = [], [], 0
    for rel, path in files:
        data = path.read_bytes()
        if cfg.max_bytes and total + len(data) > cfg.max_bytes:
            data = data[: cfg.max_bytes - total]
        (dev if _is_dev(rel, cfg.dev_fraction) else train).append(data)
        total += len(data)
        if cfg.max_bytes and total >= cfg.max_bytes:
            break
    sep = b"\n\n"
    train_bytes, dev_bytes = sep.join(train), sep.join(dev)
    if too_small_to_split(len(train_bytes), len(dev_bytes), cfg.seq_len):
        # Too few files for a split by file (one book, or a small max_bytes): hold out the tail instead.
        everything = sep.join(part for part in (train_bytes, dev_bytes) if part)
        cut = int(len(everything) * (1 - cfg.dev_fraction))
        train_bytes, dev_bytes = everything[:cut], everything[cut:]
        description += f", {TAIL_SPLIT_NOTE.format(fraction=cfg.dev_fraction)}"
    arrays = [np.frombuffer(part, dtype=np.uint8) for part in (train_bytes, dev_bytes)]
    return Corpus(arrays[0], arrays[1], 256, description)


def stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _list_files(root, (".py",), frozenset({"site-packages", "dist-packages", "__pycache__"}))
    return [(p.relative_to(root).as_posix(), p) for p in files]


def text_files(spec: str) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        p = Path(part).expanduser()
        if p.is_dir():
            out.extend((f.relative_to(p).as_posix(), f) for f in _list_files(p, TEXT_SUFFIXES))
        elif p.is_file():
            out.append((p.name, p))
        else:
            raise DataError(f"data.path: {part!r} is neither a file nor a directory")
    if not out:
        raise DataError(f"data.path: no text files ({', '.join(TEXT_SUFFIXES)}) under {spec!r}")
    return out


def _token_files(cfg: DataConfig) -> tuple[list[TokenFile], np.ndarray, np.ndarray]:
    """The checked token files, and the train and dev ids (the tail of the train file when there is no dev file)."""
    train = open_token_file(cfg.path or "", cfg.token_dtype, "data.path")
    if cfg.dev_path:
        dev = open_token_file(cfg.dev_path, cfg.token_dtype, "data.dev_path")
        return [train, dev], train.tokens, dev.tokens
    cut = int(len(train.tokens) * (1 - cfg.dev_fraction))
    return [train], train.tokens[:cut], train.tokens[cut:]


def _check_fills_a_window(n_tokens: int, cfg: DataConfig, what: str) -> None:
    if (n_tokens - 1) // cfg.seq_len < 1:
        raise DataError(
            f"data.seq_len: {what} holds {n_tokens:,} tokens, too few for one window of seq_len={cfg.seq_len} + 1"
        )


def check_data(cfg: DataConfig, model_vocab_size: int) -> None:
    """The checks that need the data but no process group: the entry point runs them first, so a missing or
    misread file exits 2 with one line naming the key or the file before any rank starts work."""
    if cfg.name == "text":
        text_files(cfg.path or "")
    if cfg.name != "tokens":
        return
    files, train, dev = _token_files(cfg)
    _check_fills_a_window(len(train), cfg, f"the train split of {cfg.path}")
    _check_fills_a_window(len(dev), cfg, f"the dev split ({cfg.dev_path or f'the tail of {cfg.path}'})")
    check_model_vocab(files, cfg.token_dtype, model_vocab_size)


def load_corpus(cfg: DataConfig) -> Corpus:
    if cfg.name == "stdlib":
        files = stdlib_files()
        return _bytes_corpus(files, cfg, f"Python {sysconfig.get_python_version()} standard library, bytes")
    if cfg.name == "text":
        return _bytes_corpus(text_files(cfg.path or ""), cfg, f"text files under {cfg.path}, bytes")
    files, train, dev = _token_files(cfg)
    vocab = max(f.vocab_size for f in files)
    sources = ", ".join(sorted({f.source for f in files}))
    split = (
        ""
        if cfg.dev_path
        else f", the last {cfg.dev_fraction:.0%} of its tokens held out as dev (the cut may fall inside a document)"
    )
    description = f"token file {cfg.path} ({cfg.token_dtype}, vocabulary {vocab:,} from {sources}){split}"
    return Corpus(train, dev, vocab, description)


class WindowDataset(Dataset):
    """Global sample `i` -> the `i`-th window of a seeded per-epoch permutation of non-overlapping windows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.windows = (len(tokens) - 1) // seq_len
        if self.windows < 1:
            raise DataError(f"data.seq_len: {len(tokens)} tokens cannot fill one window of seq_len={seq_len} + 1")
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def window_of(self, index: int) -> int:
        epoch, pos = divmod(index, self.windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.window_of(index) * self.seq_len
        chunk = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return {"input": chunk[:-1], "target": chunk[1:], "index": torch.tensor(index)}

    def __len__(self) -> int:
        return self.windows


@dataclass(frozen=True)
class Slicing:
    """How one optimizer step's global batch is cut across ranks and micro-batches."""

    batch_size: int  # global, per optimizer step
    world_size: int
    rank: int
    grad_accum: int

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.world_size * self.grad_accum)

    def indices(self, step: int, micro: int) -> list[int]:
        """Global sample ids of micro-batch `micro` of rank `rank` in optimizer step `step` (0-based) of a run
        that skipped nothing."""
        return self.indices_at(step * self.batch_size, micro)

    def indices_at(self, cursor: int, micro: int) -> list[int]:
        """Global sample ids of micro-batch `micro` of rank `rank` in the step whose batch starts at sample `cursor`."""
        per_rank = self.batch_size // self.world_size
        start = cursor + self.rank * per_rank + micro * self.micro_batch
        return list(range(start, start + self.micro_batch))


class StepBatchSampler:
    """Yields this rank's micro-batches, step after step, from global sample `start_sample` on (endless).

    The global sample cursor is the whole data position: a resume on any world size or worker count, and a rollback
    that skips samples, build a sampler at the cursor. Deliberately not `Stateful` for the same reason.
    """

    def __init__(self, slicing: Slicing, start_sample: int = 0) -> None:
        self.slicing = slicing
        self.start_sample = start_sample

    def __iter__(self) -> Iterator[list[int]]:
        cursor = self.start_sample
        while True:
            for micro in range(self.slicing.grad_accum):
                yield self.slicing.indices_at(cursor, micro)
            cursor += self.slicing.batch_size


def build_train_loader(
    tokens: np.ndarray, cfg: DataConfig, slicing: Slicing, seed: int, start_sample: int = 0
) -> StatefulDataLoader:
    dataset = WindowDataset(tokens, cfg.seq_len, seed)
    # The loader's own generator: without it, creating an iterator draws from torch's global RNG, and a
    # resumed run that restores that RNG before creating its iterator would drift from the uninterrupted one.
    generator = torch.Generator().manual_seed(seed)
    return StatefulDataLoader(
        dataset,
        batch_sampler=StepBatchSampler(slicing, start_sample),
        num_workers=cfg.num_workers,
        generator=generator,
        persistent_workers=False,
        multiprocessing_context="fork" if cfg.num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
    )


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker leaves the stop signals to its rank, which finishes its step, saves and stops. They reach
    the worker too when Ctrl-C signals the terminal's foreground process group or a scheduler signals every process
    of a job step; a worker that died of one would fail the rank (status 1, no save). The worker still ends with
    its rank: the loader shuts it down, or it sees its parent gone."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def dev_batches(tokens: np.ndarray, cfg: DataConfig, slicing: Slicing, seed: int, n_batches: int) -> list[dict]:
    """The same dev micro-batches at every evaluation (a fixed sample of dev): this rank's slice of `n_batches`
    global batches, each cut into `grad_accum` micro-batches of the training micro-batch size.

    So an evaluation never needs more memory than a training step, and since every micro-batch holds the same
    number of tokens, the mean of their losses over all ranks is the mean over the same global samples on any
    world size and any `grad_accum`.
    """
    dataset = WindowDataset(tokens, cfg.seq_len, seed + 1)
    batches = []
    for b in range(n_batches):
        for micro in range(slicing.grad_accum):
            items = [dataset[i] for i in slicing.indices(b, micro)]
            batches.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
    return batches


def load_checked_corpus(cfg: DataConfig, vocab_size: int) -> Corpus:
    """The corpus, refused when its token ids do not fit the model's vocabulary."""
    corpus = load_corpus(cfg)
    if corpus.vocab_size > vocab_size:
        raise ConfigError(
            f"model.vocab_size: {vocab_size} is smaller than the data's vocabulary "
            f"({corpus.vocab_size} token ids in {cfg.name} data)"
        )
    return corpus
