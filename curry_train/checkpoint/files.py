"""The file layer under DCP's writer: each file's bytes go to disk through one page-aligned buffer with O_DIRECT
(falling back to the page cache where the filesystem refuses it), fsynced, with an xxh3-64 checksum computed as
they pass; and torch.save without its per-record CRCs, which the whole-file checksum covers.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch.distributed.checkpoint.filesystem import FileSystem

from curry_train.checkpoint import checksum
from curry_train.checkpoint.manifest import FileEntry

# Direct I/O needs the memory, the file offset and the length of each write aligned to the device's logical block
# (512 bytes or 4 KiB); a page-aligned buffer whose size is a multiple of 4 KiB meets all three.
_ALIGN = 4096
CHUNK_BYTES = 32 << 20
_PIECE = 256 << 10  # copied and checksummed while it is in the core's cache (2 MiB of L2 here)


class WriteBuffer:
    """The page-aligned buffer through which the writer sends a file's bytes to disk, allocated once per run."""

    def __init__(self, nbytes: int = CHUNK_BYTES) -> None:
        assert nbytes % _ALIGN == 0
        self._map = mmap.mmap(-1, nbytes)  # anonymous mappings are page-aligned
        self.view = memoryview(self._map)
        self.array = np.frombuffer(self._map, dtype=np.uint8)  # what copies into it go through


class DirectFile:
    """A new file written through `buffer` with O_DIRECT: the bytes go from the buffer to the device, not through
    the page cache, and a checksum of them is computed as they pass.

    Buffered writes of a checkpoint cost the writer the kernel's copy into the page cache and its allocation of
    those pages, many times the CPU of a direct write (figures in docs/performance.md). That CPU is what an
    asynchronous save takes from training. The
    bytes of a checkpoint are not read again soon, so caching them only evicts pages training uses.

    Where the filesystem refuses O_DIRECT (EINVAL: tmpfs, some FUSE mounts), or `direct` is off, the same chunks
    are written through the page cache. `close()` writes the tail, truncates the block padding, fsyncs, closes."""

    def __init__(self, path: Path, buffer: WriteBuffer, direct: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as err:
            if not self.direct or err.errno != errno.EINVAL:
                raise
            self.direct = False
            self.fd = os.open(path, flags, 0o644)
        self.buffer = buffer.view
        self.array = buffer.array
        self.filled = 0  # bytes in the buffer not yet written
        self.nbytes = 0  # bytes written through this file
        self.digest = checksum.running()
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        # numpy copies without the interpreter lock (a memoryview's slice assignment holds it): the writer thread's
        # copy of a checkpoint's bytes into the buffer does not hold up the training thread, which needs the lock
        # between its operations. Each piece is checksummed just after its copy, from the cache: the source is read
        # from memory once, not twice (0.034 s against 0.049 s of CPU for 685 MB; docs/performance.md).
        source = np.frombuffer(view, dtype=np.uint8)
        size, done = len(self.buffer), 0
        while done < len(view):
            n = min(size - self.filled, len(view) - done, _PIECE)
            end = self.filled + n
            np.copyto(self.array[self.filled : end], source[done : done + n])
            self.digest.update(self.buffer[self.filled : end])
            self.filled = end
            done += n
            if self.filled == size:
                self._drain(size)
        self.nbytes += done
        return done

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        """Nothing: DCP flushes after every item, and the bytes leave in whole buffers (and at `close`)."""

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Write what is left, make the file durable and close it."""
        if self.closed:
            return
        try:
            if self.filled:
                # A direct write must be a whole number of blocks: write the padding too, then cut it off.
                padded = -(-self.filled // _ALIGN) * _ALIGN if self.direct else self.filled
                self._drain(padded)
                if padded != self.filled:
                    os.ftruncate(self.fd, self.nbytes)
            os.fsync(self.fd)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without making durable (a failed write: the staging directory is discarded)."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def _drain(self, nbytes: int) -> None:
        """Write the first `nbytes` of the buffer at the file's current end."""
        done = 0
        while done < nbytes:
            try:
                done += os.write(self.fd, self.buffer[done:nbytes])
            except OSError as err:
                if not self.direct or err.errno != errno.EINVAL:
                    raise
                # The filesystem opened the file for direct I/O but refuses the write: go through the page cache.
                self.direct = False
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.filled = 0


class ChecksummingFileSystem(FileSystem):
    """DCP's local filesystem; each data file this rank writes goes through the run's write buffer (`DirectFile`)
    and is recorded with its size and checksum."""

    def __init__(self, buffer: WriteBuffer, direct: bool = True, full_disk: bool = False) -> None:
        super().__init__()
        self.buffer = buffer
        self.direct = direct
        self.entries: dict[str, FileEntry] = {}
        self.wrote_direct = True  # every data file bypassed the page cache
        self._lock = threading.Lock()
        self.full_disk = full_disk  # +debug.fail_save_at: the disk fills up as this rank writes its shard

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        path = Path(path)
        if mode != "wb" or not path.name.endswith(".distcp"):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        if self.full_disk:
            path.write_bytes(b"\0" * 4096)  # what a write that runs out of space leaves: part of a file
            raise OSError(errno.ENOSPC, f"No space left on device (injected by +debug.fail_save_at): {path}")
        stream = DirectFile(path, self.buffer, self.direct)
        try:
            yield stream
            stream.close()  # DCP closes it inside the block (after its own fsync); closing twice is harmless
        finally:
            stream.abandon()
        entry = FileEntry(stream.nbytes, stream.digest.hexdigest())
        with self._lock:
            self.entries[path.name] = entry
            self.wrote_direct &= stream.direct


@contextmanager
def without_zip_crc() -> Iterator[None]:
    """torch.save computes a CRC-32 of every record of its zip container, about half its CPU time; the manifest's
    checksum of each whole file (computed as it is written) covers the same bytes, and torch.load does not need it.
    The switch is process-wide: a torch.save elsewhere in the process meanwhile writes a zip without record CRCs,
    which torch.load reads all the same."""
    try:
        from torch.utils.serialization import config  # torch >= 2.6
    except ImportError:
        yield
        return
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before
