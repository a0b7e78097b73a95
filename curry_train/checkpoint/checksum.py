"""Checksums of checkpoint files and digests of parameter shards, named by their algorithm.

New checkpoints use xxh3-64, several times faster than zlib's CRC-32 and SHA-256 (figures in docs/performance.md),
so checksumming a rank's shard as it is written, verifying a checkpoint before a resume and the fidelity check
after it cost a fraction of the I/O they accompany. These detect accidents (a
truncated, overwritten or bit-flipped file; a parameter loaded into the wrong place), not tampering.

The algorithm's name travels with each value (the manifest's key, the fidelity record's prefix), so checkpoints
written with CRC-32 and SHA-256 by earlier versions still verify and resume.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from typing import Any, Protocol

import xxhash

DEFAULT = "xxh3_64"
_BLOCK = 8 << 20


class Running(Protocol):
    """A checksum computed over bytes as they pass: `update` with each piece, then `hexdigest`."""

    def update(self, data: Any) -> None: ...
    def hexdigest(self) -> str: ...


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


class _Sha256Prefix:
    """SHA-256 cut to 16 hex digits: the parameter digest of checkpoints written before xxh3."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def update(self, data: Any) -> None:
        self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:16]


_ALGORITHMS: dict[str, Any] = {"xxh3_64": xxhash.xxh3_64, "crc32": _Crc32, "sha256_16": _Sha256Prefix}
ALGORITHMS = tuple(_ALGORITHMS)


def running(algorithm: str = DEFAULT) -> Running:
    """A new running checksum of `algorithm` (one of ALGORITHMS)."""
    try:
        return _ALGORITHMS[algorithm]()
    except KeyError:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}") from None


def of_file(path: str | os.PathLike[str], algorithm: str = DEFAULT) -> str:
    """The checksum of a file's bytes, read in 8 MiB blocks."""
    h = running(algorithm)
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()
