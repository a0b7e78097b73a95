"""DCP save and load, synchronous or asynchronous, into a staging directory that the store then commits."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.stateful import Stateful


def save(state: dict[str, Stateful], staging: Path, group: dist.ProcessGroup) -> None:
    """Write `state` as a DCP checkpoint; every rank's files are fsynced when this returns on any rank."""
    dcp.save(state, storage_writer=FileSystemWriter(staging, sync_files=True), process_group=group)


def async_save(state: dict[str, Stateful], staging: Path, group: dist.ProcessGroup) -> Future:
    """Copy `state` to host memory now and write it in a background thread.

    The returned future completes on a rank when that rank's part is written and, on the coordinator (rank 0),
    when the metadata file is written, which DCP does only after every rank's files are. `group` must not be the
    group FSDP trains on: two threads issuing collectives on one gloo group deadlock.
    """
    result = dcp.async_save(state, storage_writer=FileSystemWriter(staging, sync_files=True), process_group=group)
    return result if isinstance(result, Future) else result.upload_completion


def load(state: dict[str, Stateful], path: Path, group: dist.ProcessGroup) -> None:
    """Load `state` in place from the DCP checkpoint at `path` (any world size: DCP reshards)."""
    dcp.load(state, storage_reader=FileSystemReader(path), process_group=group)
