"""Export a checkpoint's parameters as one consolidated file, or as a Hugging Face Llama directory.

A checkpoint is a DCP directory whose shards may come from any number of ranks; DCP reads it into one process
without a process group (`no_dist=True`), one tensor at a time, so progress shows and no rank layout matters.
Only the `model` key is read: the optimizer state of a full checkpoint is never loaded.

Formats:
    safetensors   one `.safetensors` file, curry-train's parameter names (loads with `load_state_dict(strict=True)`);
                  its metadata holds the run's `model` config, so `+init_from=FILE` can check what shapes cannot
    hf            a directory `transformers.LlamaForCausalLM.from_pretrained` loads: `config.json` mapped from the
                  run's `model` config, `model.safetensors` under Hugging Face's names (`HF_LLAMA_NAMES`)
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from curry_train.checkpoint.manifest import MANIFEST, Manifest
from curry_train.checkpoint.policy import Role
from curry_train.checkpoint.store import RunDir
from curry_train.hf_llama import hf_llama_config, hf_name
from curry_train.layout import RunFiles

FORMATS = ("safetensors", "hf")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
MODEL_METADATA = "curry_train_model"  # the run's model config, as JSON, in an exported file's metadata
MODEL_PREFIX = "model."  # the checkpoint's top-level key for parameters (checkpoint/state.py)


class ExportError(ValueError):
    """The checkpoint or the options cannot be exported; the message says what was wrong and what is allowed."""


@dataclass(frozen=True)
class ExportResult:
    checkpoint: Path
    output: Path
    tensors: int
    params: int
    bytes: int


# ----------------------------------------------------------------------------------------- which checkpoint


def _is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST).is_file() or (path / ".metadata").is_file()


def _best_k_direction(run_dir: Path) -> str:
    config = _read_config(RunFiles(run_dir).config)
    return str((config.get("checkpoint") or {}).get("best_k_direction", "minimize"))


def choose_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given; for a run directory, its best best-K checkpoint (else `latest`)."""
    path = Path(path)
    if _is_checkpoint(path):
        return path
    if not RunFiles(path).journal.is_file():
        raise ExportError(f"{path} is neither a checkpoint (no {MANIFEST} or .metadata) nor a run directory")
    store = RunDir(path)
    best = [c for c in store.list(Role.BEST_K) if c.metric is not None]
    if best:
        sign = -1.0 if _best_k_direction(path) == "maximize" else 1.0
        return store.path_of(min(best, key=lambda c: (sign * c.metric, c.step)))
    latest = store.latest()
    if latest is None:
        raise ExportError(f"run directory {path} has no committed checkpoint to export")
    return store.path_of(latest)


# -------------------------------------------------------------------------------------------------- reading


def parameter_shapes(ckpt: Path) -> dict[str, TensorStorageMetadata]:
    """The checkpoint's parameters (names without the `model.` prefix) and their global shapes and dtypes."""
    metadata = FileSystemReader(ckpt).read_metadata()
    shapes = {
        key.removeprefix(MODEL_PREFIX): meta
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }
    if not shapes:
        raise ExportError(f"{ckpt} holds no model parameters (no tensors under the key 'model')")
    return shapes


def iter_parameters(ckpt: Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, consolidated tensor) for every parameter, read one at a time in one process (any saved world size)."""
    for name, meta in parameter_shapes(ckpt).items():
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        with warnings.catch_warnings():
            # DCP warns that it assumes a single process: that is what no_dist asks for.
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": {name: tensor}}, storage_reader=FileSystemReader(ckpt), no_dist=True)
        yield name, tensor if dtype is None else tensor.to(dtype)


# -------------------------------------------------------------------------------------------- hugging face


def _read_config(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def run_config_of(ckpt: Path) -> Path:
    """The config.yaml of the run a checkpoint belongs to (`<run>/<role>/<checkpoint>`)."""
    return RunFiles(ckpt.resolve().parent.parent).config


# -------------------------------------------------------------------------------------------------- export


def _progress(label: str) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[name]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def read_all(ckpt: Path, dtype: torch.dtype | None, rename: Any = None) -> dict[str, torch.Tensor]:
    """Every parameter in memory, renamed by `rename`, with a progress bar on a terminal."""
    names = list(parameter_shapes(ckpt))
    tensors: dict[str, torch.Tensor] = {}
    with _progress(f"reading {ckpt.name}") as progress:
        task = progress.add_task("read", total=len(names), name="")
        for name, tensor in iter_parameters(ckpt, dtype):
            tensors[rename(name) if rename else name] = tensor.contiguous()
            progress.update(task, advance=1, name=name)
    return tensors


def _umask() -> int:
    mask = os.umask(0)  # the only portable read of it is to set it: put it straight back
    os.umask(mask)
    return mask


def export(
    checkpoint: str | Path,
    output: str | Path,
    fmt: str = "safetensors",
    dtype: str | None = None,
    config: str | Path | None = None,
) -> ExportResult:
    """Write `checkpoint` (a checkpoint, or a run directory: its best best-K) to `output` in `fmt`."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ExportError("export needs the safetensors package: pip install 'curry-train[export]'") from None
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: allowed: {', '.join(DTYPES)}")
    cast = DTYPES[dtype] if dtype else None
    ckpt = choose_checkpoint(checkpoint)
    output = Path(output)
    manifest = Manifest.read(ckpt) if (ckpt / MANIFEST).is_file() else None
    metadata = {"source": str(ckpt.name), "step": str(manifest.step if manifest else "?"), "format": "pt"}
    config_path = Path(config) if config else run_config_of(ckpt)
    model_cfg = _read_config(config_path).get("model")
    if isinstance(model_cfg, dict):
        # What the shapes cannot tell (rotary base, norm epsilon, head count): `+init_from=FILE` checks it.
        metadata[MODEL_METADATA] = json.dumps(model_cfg, sort_keys=True)
    if fmt == "safetensors":
        tensors = read_all(ckpt, cast)
        output.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(output), metadata=metadata)
        written = output
    else:
        if not isinstance(model_cfg, dict):
            raise ExportError(f"--format hf needs the run's model config: {config_path} has none; give --config PATH")
        try:
            names = {name: hf_name(name) for name in parameter_shapes(ckpt)}
            tensors = read_all(ckpt, cast, rename=names.__getitem__)
            first = next(iter(tensors.values()))
            hf_config = hf_llama_config(model_cfg, str(first.dtype).removeprefix("torch."))
        except ValueError as err:
            raise ExportError(str(err)) from None
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(tensors, str(output / "model.safetensors"), metadata=metadata)
        written = output / "model.safetensors"
    # safetensors' save_file creates its file 0600 whatever the umask: readable as any file the user writes, so
    # others on a shared cluster can read the export as they can its config.json.
    written.chmod(0o666 & ~_umask())
    return ExportResult(
        checkpoint=ckpt,
        output=output,
        tensors=len(tensors),
        params=sum(t.numel() for t in tensors.values()),
        bytes=written.stat().st_size,
    )
