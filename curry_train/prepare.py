"""`curry-train prepare`: text files -> `train.bin`, `val.bin`, their sidecars and `tokenizer.json`, for data=tokens.

The split is the one data=text makes: a file goes to dev by a hash of its name (`dev_fraction` of the files), and
when that leaves either side without two windows of `seq_len` tokens, the last `dev_fraction` of the tokens is held
out instead. Documents are separated by the tokenizer's end-of-text token when it has one.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from curry_train.config import DataError
from curry_train.token_files import MAX_PLAUSIBLE_VOCAB, TokenMeta, write_sidecar

EOS = "<|endoftext|>"
_BLOCK = 1 << 20  # bytes of text per encode call
# A chunk ends after a newline that a non-space character follows: GPT-2's byte-level pre-tokenizer (the BPE this
# command trains) always splits there, so chunk by chunk gives the ids of the whole file. A tokenizer you name may
# differ at those boundaries (one per megabyte), for example by prepending a space to each chunk.
_CUT = re.compile(rb"\n(?=\S)")


@dataclass(frozen=True)
class Prepared:
    train: Path
    dev: Path
    tokenizer: Path
    meta: TokenMeta  # of the train file; the dev file's differs only in n_tokens
    tokenizer_source: str
    n_dev: int
    split: str  # how the dev split was made, in words


def text_chunks(path: Path, block: int = _BLOCK) -> Iterator[str]:
    """The file's text in pieces of about `block` bytes, cut only where the pre-tokenizer splits anyway."""
    buffer = b""
    with open(path, "rb") as f:
        while data := f.read(block):
            buffer += data
            cut = None
            for match in _CUT.finditer(buffer, max(0, len(buffer) - len(data) - 1)):
                cut = match.end()
            if cut is None and len(buffer) >= 16 * block:
                cut = max(buffer.rfind(b" "), buffer.rfind(b"\n")) + 1 or len(buffer)  # one huge line
            if cut:
                yield buffer[:cut].decode("utf-8", errors="replace")
                buffer = buffer[cut:]
    if buffer:
        yield buffer.decode("utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int, show_progress: bool) -> Any:
    """A byte-level BPE (GPT-2's scheme) trained offline on `files`, with an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, seen in training or not
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator((chunk for path in files for chunk in text_chunks(path)), trainer)
    return tokenizer


def load_tokenizer(spec: str) -> Any:
    from tokenizers import Tokenizer

    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(
            f"--tokenizer: {spec!r} is not a file; give a tokenizer.json (the tokenizers library's format, e.g. "
            "from a Hugging Face model's files), or leave it out to train a byte-level BPE on the input"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises its own exception types for a malformed file
        raise DataError(f"--tokenizer: {path} is not a tokenizer.json the tokenizers library reads ({err})") from None


class _TokenWriter:
    """Appends ids to a file, counting them."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype, self.count = path, dtype, 0
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close)

    def write(self, ids: np.ndarray) -> None:
        ids.astype(self.dtype, copy=False).tofile(self._file)
        self.count += len(ids)

    def close(self) -> None:
        self._file.close()


def _encode_files(
    tokenizer: Any, files: list[tuple[Path, bool]], writers: dict[bool, _TokenWriter], eos: int | None, show: bool
) -> None:
    total = sum(path.stat().st_size for path, _ in files)
    columns = (TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not show, transient=True) as progress:
        task = progress.add_task("tokenizing", total=total)
        for path, in_dev in files:
            chunks = list(text_chunks(path))
            for start in range(0, len(chunks), 16):
                batch = chunks[start : start + 16]
                for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                    writers[in_dev].write(np.asarray(encoding.ids, dtype=np.int64))
                progress.advance(task, sum(len(c.encode("utf-8", errors="replace")) for c in batch))
            if eos is not None:
                writers[in_dev].write(np.asarray([eos], dtype=np.int64))


def _hold_out_tail(sources: list[_TokenWriter], targets: list[_TokenWriter], dev_fraction: float) -> None:
    """Write the train and dev ids, concatenated, into `targets`: all but the last `dev_fraction`, then the rest.
    Copied in pieces through memory maps, since one side may be most of a large corpus."""
    parts = [np.memmap(s.path, dtype=s.dtype, mode="r") for s in sources if s.count]
    total = sum(len(p) for p in parts)
    cut = int(total * (1 - dev_fraction))
    position = 0
    for part in parts:
        for start in range(0, len(part), 1 << 24):
            piece = np.asarray(part[start : start + (1 << 24)])
            head = max(0, min(len(piece), cut - position))
            targets[0].write(piece[:head])
            targets[1].write(piece[head:])
            position += len(piece)


def prepare(
    inputs: list[str],
    out: Path,
    tokenizer_spec: str | None = None,
    vocab_size: int = 8192,
    dev_fraction: float = 0.05,
    seq_len: int = 1024,
    show_progress: bool = True,
) -> Prepared:
    """Tokenize the text files under `inputs` into `out`: train.bin, val.bin, their sidecars, tokenizer.json."""
    # Imported here: curry_train.data imports torch, which every other `curry-train` command would then pay for.
    from curry_train.data import TAIL_SPLIT_NOTE, _is_dev, text_files, too_small_to_split

    if not 0.0 < dev_fraction < 1.0:
        raise DataError(f"--dev-fraction: must be in (0, 1), got {dev_fraction}")
    if tokenizer_spec is None and not 257 <= vocab_size <= MAX_PLAUSIBLE_VOCAB:
        raise DataError(
            f"--vocab-size: must be in [257, {MAX_PLAUSIBLE_VOCAB}] (256 bytes + end of text), got {vocab_size}"
        )
    name_of: dict[Path, str] = {}  # each text file -> its name relative to its input, deduplicated by path
    for spec in inputs:
        try:
            name_of.update((path, rel) for rel, path in text_files(spec))
        except DataError as err:  # text_files speaks of data.path; here the input is an argument
            raise DataError(f"input {str(err).removeprefix('data.path: ')}") from None
    files = sorted(name_of.items(), key=lambda kv: kv[1])
    in_dev = [(path, _is_dev(rel, dev_fraction)) for path, rel in files]
    if tokenizer_spec is not None:
        tokenizer = load_tokenizer(tokenizer_spec)
        source = f"from {tokenizer_spec}"
    else:
        # Trained on the train files only, so dev text is unseen by the tokenizer as by the model.
        train_side = [path for path, dev in in_dev if not dev] or [path for path, _ in in_dev]
        tokenizer = train_tokenizer(train_side, vocab_size, show_progress)
        source = "byte-level BPE trained on the train split"
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if tokenizer_spec is None and vocab < vocab_size:
        source += f" (asked for {vocab_size:,}: the text allows only {vocab:,} tokens)"
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    eos = tokenizer.token_to_id(EOS)

    out.mkdir(parents=True, exist_ok=True)
    final = {False: out / "train.bin", True: out / "val.bin"}
    # Everything is written under temporary names and renamed at the end: a killed prepare leaves no half file.
    staged = {side: _TokenWriter(path.with_name(f".{path.name}.tmp"), dtype) for side, path in final.items()}
    tail = {side: path.with_name(f".{path.name}.tail.tmp") for side, path in final.items()}
    try:
        _encode_files(tokenizer, in_dev, staged, eos, show_progress)
        for writer in staged.values():
            writer.close()
        counts = {side: writer.count for side, writer in staged.items()}
        split = f"by file name: {sum(d for _, d in in_dev)} of {len(in_dev)} files held out as dev"
        if too_small_to_split(counts[False], counts[True], seq_len):
            targets = [_TokenWriter(tail[False], dtype), _TokenWriter(tail[True], dtype)]
            _hold_out_tail([staged[False], staged[True]], targets, dev_fraction)
            for side, writer in zip((False, True), targets, strict=True):
                writer.close()
                counts[side] = writer.count
                os.replace(writer.path, final[side])
            split = TAIL_SPLIT_NOTE.format(fraction=dev_fraction)
        else:
            for side, writer in staged.items():
                os.replace(writer.path, final[side])
    finally:
        for side in final:
            staged[side].close()
            staged[side].path.unlink(missing_ok=True)
            tail[side].unlink(missing_ok=True)
    tokenizer_path = out / "tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    meta = {side: TokenMeta(dtype.name, vocab, counts[side], tokenizer_path.name, eos) for side in final}
    for side, path in final.items():
        write_sidecar(path, meta[side])
    return Prepared(final[False], final[True], tokenizer_path, meta[False], source, counts[True], split)


def describe(p: Prepared) -> str:
    m = p.meta
    train_flag = f"data.path={p.train} data.dev_path={p.dev} data.token_dtype={m.dtype}"
    return "\n".join(
        [
            f"curry-train prepare: wrote {p.train} ({m.n_tokens:,} tokens, {m.dtype}) and {p.dev} ({p.n_dev:,} tokens)",
            f"  dev split: {p.split}",
            f"  tokenizer: {p.tokenizer_source}, vocabulary {m.vocab_size:,}"
            + ("" if m.eos_id is None else f", documents end with {EOS} (id {m.eos_id})")
            + f"; saved as {p.tokenizer}",
            f"  sidecars: {p.train.name}.meta.json, {p.dev.name}.meta.json (dtype, vocab_size, n_tokens)",
            # No model.vocab_size: the sidecars give it, and training says so at start.
            f"  train on it: python -m curry_train.train data=tokens {train_flag}",
        ]
    )


def main(args: argparse.Namespace) -> int:
    """Tokenize text files into train.bin, val.bin and their sidecars, for data=tokens."""
    existing = [args.out / name for name in ("train.bin", "val.bin") if (args.out / name).exists()]
    if existing and not args.force:
        print(f"curry-train prepare: {existing[0]} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        prepared = prepare(
            args.inputs,
            args.out,
            args.tokenizer,
            args.vocab_size,
            args.dev_fraction,
            args.seq_len,
            show_progress=not args.no_progress and sys.stderr.isatty(),
        )
    except DataError as err:
        print(f"curry-train prepare: {err}", file=sys.stderr)
        return 2
    print(describe(prepared))
    return 0
