"""Flat token files (nanoGPT's `train.bin`): their sidecar, the checks that they are read with the right dtype, and
their vocabulary size.

A token file is raw little-endian ids with no header, so nothing in it says whether it holds uint16 or uint32 ids;
read with the wrong one it still loads, and trains on noise. So the dtype comes from a sidecar when there is one
(`train.bin.meta.json`, written by `curry-train prepare`), and without one the ids are checked for the signs of a
wrong dtype before anything trains on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from curry_train.checkpoint.durable import write_json_durably
from curry_train.config import Config, DataError, Launch

DTYPES = ("uint16", "uint32")
SIDECAR_SUFFIX = ".meta.json"
SIDECAR_FORMAT = "curry-train token file"
VOCAB_CACHE_SUFFIX = ".vocab-cache.json"
# No tokenizer in use comes near 2^20 ids (the largest are ~2.6e5): larger ids read as uint32 are two uint16 ids.
MAX_PLAUSIBLE_VOCAB = 1 << 20
_SAMPLE_CHUNKS, _SAMPLE_CHUNK = 8, 1 << 16
_SCAN_CHUNK = 1 << 26  # ids per step of the full scan: bounded memory on files of any size
_TEXT_PROBE = 1 << 16  # bytes read from the start of a file without a sidecar to tell text from ids


@dataclass(frozen=True)
class TokenMeta:
    """What a sidecar says about its token file."""

    dtype: str
    vocab_size: int  # ids are < vocab_size: the model's vocabulary must be at least this
    n_tokens: int
    tokenizer: str | None = None
    eos_id: int | None = None


@dataclass(frozen=True)
class TokenFile:
    path: Path
    tokens: np.ndarray  # memory-mapped
    vocab_size: int
    source: str  # where vocab_size came from, for the start-up description


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def vocab_cache_path(path: Path) -> Path:
    return path.with_name(path.name + VOCAB_CACHE_SUFFIX)


def write_sidecar(path: Path, meta: TokenMeta) -> Path:
    side = sidecar_path(path)
    write_json_durably(side, {"format": SIDECAR_FORMAT, "version": 1, **asdict(meta)})
    return side


def read_sidecar(path: Path) -> TokenMeta | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        record = json.loads(side.read_text())
        meta = TokenMeta(
            dtype=str(record["dtype"]),
            vocab_size=int(record["vocab_size"]),
            n_tokens=int(record["n_tokens"]),
            tokenizer=record.get("tokenizer"),
            eos_id=record.get("eos_id"),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"token file sidecar {side} is unreadable ({type(err).__name__}: {err})") from None
    if meta.dtype not in DTYPES or meta.vocab_size <= 0 or meta.n_tokens < 0:
        raise DataError(
            f"token file sidecar {side}: dtype {meta.dtype!r} (allowed: {', '.join(DTYPES)}), "
            f"vocab_size {meta.vocab_size} and n_tokens {meta.n_tokens} are not a valid description"
        )
    return meta


class _DataOnlyUnpickler(pickle.Unpickler):
    # nanoGPT's meta.pkl is a dict of ints, strings and dicts: nothing in it needs a class, and refusing every class
    # is what keeps unpickling a file from running code.
    def find_class(self, module: str, name: str) -> type:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def nanogpt_vocab_size(path: Path) -> int | None:
    """`vocab_size` from nanoGPT's `meta.pkl` beside the token file, if there is one holding plain data."""
    meta = path.parent / "meta.pkl"
    if not meta.is_file():
        return None
    try:
        record = _DataOnlyUnpickler(io.BytesIO(meta.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError):
        return None  # not the plain dict nanoGPT writes: the ids are scanned instead
    vocab = record.get("vocab_size") if isinstance(record, dict) else None
    return vocab if isinstance(vocab, int) and vocab > 0 else None


def text_excerpt(path: Path) -> str | None:
    """The opening of `path` when it is text rather than ids, else None.

    Text: the first 64 KiB hold no NUL byte, decode as UTF-8 (a character cut at the end aside) and are printable
    characters or whitespace. Token ids cannot pass: small ids have a zero byte, and any real stream of ids
    soon has a byte pair that is not UTF-8 or a control character."""
    with open(path, "rb") as f:
        head = f.read(_TEXT_PROBE)
    if len(head) < 64 or b"\0" in head:
        return None
    for cut in range(4):  # the probe may end inside a multi-byte character
        with contextlib.suppress(UnicodeDecodeError):
            text = head[: len(head) - cut].decode("utf-8")
            break
    else:
        return None
    printable = sum(ch.isprintable() or ch in "\t\n\r\f" for ch in text)
    return " ".join(text[:60].split()) if printable >= 0.98 * len(text) else None


def _sample(tokens: np.ndarray) -> np.ndarray:
    """A few evenly spaced runs of ids (the whole file when it is small); each run starts at an even position, so
    odd positions of the sample are odd positions of the file."""
    n = len(tokens)
    if n <= _SAMPLE_CHUNKS * _SAMPLE_CHUNK:
        return np.asarray(tokens)
    starts = np.linspace(0, n - _SAMPLE_CHUNK, _SAMPLE_CHUNKS).astype(np.int64) // 2 * 2
    return np.concatenate([np.asarray(tokens[s : s + _SAMPLE_CHUNK]) for s in starts])


def _hint(dtype: str, why: str) -> str:
    return f"likely data.token_dtype={dtype} ({why})"


def _looks_like_uint32_read_as_uint16(sample: np.ndarray) -> bool:
    # uint32 ids read as uint16: the odd positions are the high halves, 0 for any vocabulary below 65,536 (and
    # tiny for any real one), while the even positions carry the ids. In a true uint16 file both positions are
    # draws from one distribution.
    if len(sample) < 64 or len(sample) % 2:
        return False
    even, odd = sample[0::2], sample[1::2]
    if int(odd.max()) >= 16:
        return False
    return len(np.unique(odd)) * 4 < len(np.unique(even))


def check_dtype(tokens: np.ndarray, path: Path, dtype: str, key: str) -> None:
    """Refuse ids that show the file was written with the other dtype, naming the file and the likely right one."""
    sample = _sample(tokens)
    if len(sample) == 0:
        return
    if dtype == "uint16" and _looks_like_uint32_read_as_uint16(sample):
        raise DataError(
            f"{key}: token file {path} read as uint16 has every odd position near 0 "
            f"(max {int(sample[1::2].max())}) over {len(sample):,} sampled ids: it looks like uint32 ids; "
            + _hint("uint32", "or write a sidecar " + sidecar_path(path).name + " naming its dtype")
        )
    if dtype == "uint32" and int(sample.max()) >= MAX_PLAUSIBLE_VOCAB:
        as16 = np.ascontiguousarray(sample).view(np.uint16)
        raise DataError(
            f"{key}: token file {path} read as uint32 holds id {int(sample.max()):,}, past any tokenizer's "
            f"vocabulary ({MAX_PLAUSIBLE_VOCAB:,}); read as uint16 the largest sampled id is {int(as16.max()):,}: "
            + _hint("uint16", "or write a sidecar " + sidecar_path(path).name + " if the vocabulary is that large")
        )


_SCANNED: dict[tuple[str, int, int, str], int] = {}


def scanned_vocab_size(path: Path, tokens: np.ndarray, dtype: str) -> tuple[int, str]:
    """max id + 1 over the whole file, and where it came from.

    The full read happens once per version of the file: the result is cached beside it, keyed by size, mtime and
    dtype, so a changed file is scanned again. A directory that cannot be written just means no cache.
    """
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": dtype}
    cache = vocab_cache_path(path)
    try:
        record = json.loads(cache.read_text())
        if all(record.get(k) == v for k, v in key.items()) and isinstance(record.get("vocab_size"), int):
            return record["vocab_size"], f"cache {cache.name}"
    except (OSError, ValueError, AttributeError):
        pass
    # Without a writable directory the entry point's early check and the loader would each scan: remember it here.
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, dtype)
    if memo not in _SCANNED:
        top = 0
        for start in range(0, len(tokens), _SCAN_CHUNK):
            top = max(top, int(np.asarray(tokens[start : start + _SCAN_CHUNK]).max(initial=0)))
        _SCANNED[memo] = top + 1
        with contextlib.suppress(OSError):
            write_json_durably(cache, {**key, "vocab_size": top + 1})
    return _SCANNED[memo], "scan"


def open_token_file(path_text: str, dtype: str, key: str) -> TokenFile:
    """The memory-mapped ids of a token file, checked: it exists, its size fits the dtype, its sidecar (if any)
    agrees with `data.token_dtype`, and without a sidecar its ids do not look like the other dtype."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise DataError(f"{key}: token file {str(path)!r} does not exist")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{key}: token file {path} is empty")
    # Text read as ids loads and trains on noise; a sidecar says the file is ids (`prepare` wrote it).
    if not sidecar_path(path).is_file() and (excerpt := text_excerpt(path)) is not None:
        raise DataError(
            f"{key}: {path} is text, not token ids (it reads {excerpt!r}): train on text with data=text "
            f"data.path={path}, or tokenize it with `curry-train prepare {path} --out DIR` and train on DIR/train.bin"
        )
    if size % itemsize:
        fits = [d for d in DTYPES if size % np.dtype(d).itemsize == 0]
        raise DataError(
            f"{key}: token file {path} has {size:,} bytes, not a multiple of {itemsize} ({dtype}): it is cut off or "
            "not a token file" + (f"; {_hint(fits[0], 'its size fits that')}" if fits else "")
        )
    meta = read_sidecar(path)
    if meta is not None:
        if meta.dtype != dtype:
            raise DataError(
                f"data.token_dtype={dtype}, but {sidecar_path(path)} says token file {path} holds {meta.dtype} ids; "
                f"set data.token_dtype={meta.dtype}"
            )
        if meta.n_tokens * itemsize != size:
            raise DataError(
                f"{key}: token file {path} holds {size // itemsize:,} ids but {sidecar_path(path).name} says "
                f"{meta.n_tokens:,}: the file changed after its sidecar was written"
            )
    tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    if meta is not None:
        top = int(_sample(tokens).max())
        if top >= meta.vocab_size:
            raise DataError(
                f"{key}: token file {path} holds id {top:,}, past the vocab_size {meta.vocab_size:,} of its "
                f"sidecar {sidecar_path(path).name}"
            )
        return TokenFile(path, tokens, meta.vocab_size, f"sidecar {sidecar_path(path).name}")
    check_dtype(tokens, path, dtype, key)
    nanogpt = nanogpt_vocab_size(path)
    if nanogpt is not None:
        top = int(_sample(tokens).max())
        if top >= nanogpt:
            raise DataError(
                f"{key}: token file {path} holds id {top:,}, past the vocab_size {nanogpt:,} of "
                f"{path.parent / 'meta.pkl'}: that meta.pkl describes other data"
            )
        return TokenFile(path, tokens, nanogpt, "meta.pkl")
    vocab, source = scanned_vocab_size(path, tokens, dtype)
    return TokenFile(path, tokens, vocab, source)


def check_model_vocab(files: list[TokenFile], dtype: str, model_vocab_size: int) -> None:
    """Every id must be a row of the model's embedding; an id past it read as uint32 is usually two uint16 ids."""
    for f in files:
        if f.vocab_size <= model_vocab_size:
            continue
        message = (
            f"model.vocab_size: {model_vocab_size:,} is smaller than the vocabulary of token file {f.path} "
            f"({f.vocab_size:,}, from {f.source}) read as {dtype}"
        )
        if dtype == "uint32":
            as16 = _sample(np.memmap(f.path, dtype=np.uint16, mode="r"))
            if int(as16.max()) < model_vocab_size:
                message += f"; read as uint16 its sampled ids fit: {_hint('uint16', 'two uint16 ids make one uint32')}"
        raise DataError(message)


def declared_vocab(path_text: str | None) -> tuple[int, str] | None:
    """The vocabulary size a token file's sidecar or nanoGPT's meta.pkl beside it declares, and which file said it;
    None without either (a scanned largest id is a floor, not a vocabulary)."""
    if not path_text:
        return None
    path = Path(path_text).expanduser()
    if not path.is_file():
        return None
    meta = read_sidecar(path)
    if meta is not None:
        return meta.vocab_size, sidecar_path(path).name
    nanogpt = nanogpt_vocab_size(path)
    return (nanogpt, "meta.pkl") if nanogpt is not None else None


def adopt_data_vocab(cfg: Config, launch: Launch) -> tuple[Config, Launch]:
    """With `data=tokens`, the model takes the vocabulary the token files declare, unless the command line set
    `model.vocab_size` (then `check_data` refuses a value too small for the ids). A preset's value yields: it was
    written for another tokenizer. The launch gets a note saying so, for the start."""
    if cfg.data.name != "tokens" or "model.vocab_size" in launch.given:
        return cfg, launch
    declared = [d for d in (declared_vocab(cfg.data.path), declared_vocab(cfg.data.dev_path)) if d is not None]
    if not declared:
        return cfg, launch
    vocab, source = max(declared, key=lambda d: d[0])  # the train file's when they agree
    if vocab == cfg.model.vocab_size:
        return cfg, launch
    note = (
        f"model.vocab_size={vocab} from {source}, the token files' own (model={cfg.model.name} says "
        f"{cfg.model.vocab_size:,}; model.vocab_size=N on the command line sets another)"
    )
    model = dataclasses.replace(cfg.model, vocab_size=vocab)
    return dataclasses.replace(cfg, model=model), dataclasses.replace(launch, notes=(*launch.notes, note))
