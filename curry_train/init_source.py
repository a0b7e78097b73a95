"""What `+init_from=SOURCE` names, read from its metadata alone, and whether it fits the configured model.

Three kinds of source:
    checkpoint   a curry-train checkpoint directory of any role (or a run directory: its `latest`), any world size
    safetensors  a `.safetensors` file as `curry-train export` writes it (curry-train's names)
    hf           a Hugging Face Llama directory as `save_pretrained` writes it: config.json with model.safetensors or
                 model.safetensors.index.json and its shards (names mapped through `hf_llama.HF_LLAMA_NAMES`)

`check_source` runs in every process before the process group: it reads config.json, the safetensors headers, DCP's
`.metadata` and the manifest, never a tensor, and refuses a source that does not fit in one line naming the first
difference. The architecture is always the config's; a warm start never changes it.
"""

from __future__ import annotations

import fnmatch
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curry_train.config import Config, ConfigError, InitConfig, Launch, ModelConfig
from curry_train.hf_llama import ARCH_KEYS, EMBEDDING, HEAD, model_of_hf_config, our_name
from curry_train.layout import JOURNAL, RunFiles
from curry_train.model_shapes import parameter_shapes

CONFIG_JSON = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header


class InitError(ConfigError):
    """`+init_from=SOURCE` cannot be used; the message names the source and what is wrong (exit status 2)."""


@dataclass(frozen=True)
class TensorRef:
    """Where one of our parameters is in the source: a safetensors file and its key, or a checkpoint's key."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    file: Path | None = None  # None: the DCP checkpoint's `model.<key>`


@dataclass
class Source:
    given: str  # as typed after +init_from=
    kind: str  # checkpoint, safetensors or hf
    path: Path  # the checkpoint directory (a run directory's `latest`), the file, or the Hugging Face directory
    tensors: dict[str, TensorRef]  # our parameter name -> where it is
    arch: dict[str, Any] = field(default_factory=dict)  # model.* values the source records (config.json, config.yaml)
    tied: bool = False  # the head comes from the embedding (no lm_head.weight in the source)
    step: int | None = None  # a checkpoint's step
    optimizer: bool = False  # holds optimizer state (a checkpoint with full state)


@dataclass
class InitPlan:
    """A checked source and what this run takes from it."""

    source: Source
    loaded: list[str]  # our parameter names, in the model's order
    excluded: list[str]  # left to the initialiser by init.exclude
    optimizer: bool  # init.optimizer: the checkpoint's optimizer state for the loaded parameters
    verified: bool = False  # a checkpoint's checksums were checked against its manifest


def _refuse(given: str, why: str) -> InitError:
    return InitError(f"+init_from={given}: {why}")


# ------------------------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path, given: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensor name -> {dtype, shape, data_offsets}, metadata) from a safetensors file's header, after checking that
    the file holds every byte the header promises (a truncated or overwritten file is refused here)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise _refuse(given, f"{path} is not a readable safetensors file ({err})") from None
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, entry in header.items():
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise _refuse(given, f"{path}: tensor {name} has dtype {entry.get('dtype')}; parameters must be floats")
        start, stop = entry["data_offsets"]
        numel = 1
        for n in entry["shape"]:
            numel *= n
        if stop - start != numel * _ITEMSIZE[dtype]:
            raise _refuse(given, f"{path}: tensor {name}'s header is inconsistent (corrupt file)")
        end = max(end, stop)
    if size != 8 + length + end:
        raise _refuse(given, f"{path} is {size} bytes, its header describes {8 + length + end} (truncated or corrupt)")
    return header, metadata


def _refs_of(header: dict[str, dict[str, Any]], file: Path) -> dict[str, TensorRef]:
    return {
        name: TensorRef(name, tuple(e["shape"]), SAFETENSORS_DTYPES[e["dtype"]], file) for name, e in header.items()
    }


def _safetensors_file(path: Path, given: str) -> Source:
    header, metadata = read_safetensors_header(path, given)
    if any(name.startswith(("model.layers.", "lm_head.")) or name == "model.embed_tokens.weight" for name in header):
        raise _refuse(
            given,
            f"{path} holds Hugging Face names; give the directory that holds it with its {CONFIG_JSON} (as "
            "save_pretrained writes it), so that rope_theta and rms_norm_eps can be checked",
        )
    arch = {}
    if "curry_train_model" in metadata:  # export.MODEL_METADATA: the exporting run's model config
        model = json.loads(metadata["curry_train_model"])
        arch = {k: model[k] for k in ARCH_KEYS if k in model}
    return Source(given, "safetensors", path, _refs_of(header, path), arch)


def _hf_dir(path: Path, given: str) -> Source:
    try:
        config = json.loads((path / CONFIG_JSON).read_text(encoding="utf-8"))
        arch = model_of_hf_config(config)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _refuse(given, f"{path / CONFIG_JSON}: not a Llama config curry-train can use ({err})") from None
    if (path / HF_INDEX).is_file():
        try:
            weight_map = json.loads((path / HF_INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _refuse(given, f"{path / HF_INDEX} is unreadable ({err})") from None
        files = {name: path / file for name, file in weight_map.items()}
    elif (path / HF_WEIGHTS).is_file():
        files = {}
    else:
        others = sorted(p.name for p in path.glob("*.bin"))
        hint = f" ({others[0]} is pickled code: re-save with safe_serialization=True)" if others else ""
        raise _refuse(given, f"{path} has {CONFIG_JSON} but neither {HF_WEIGHTS} nor {HF_INDEX}{hint}")
    theirs: dict[str, TensorRef] = {}
    for file in sorted(set(files.values())) or [path / HF_WEIGHTS]:
        header, _ = read_safetensors_header(file, given)
        theirs.update(_refs_of(header, file))
    listed_elsewhere = [name for name, file in files.items() if name not in theirs or theirs[name].file != file]
    if listed_elsewhere:
        raise _refuse(given, f"{HF_INDEX} lists {listed_elsewhere[0]} in a shard that does not hold it (corrupt)")
    tensors: dict[str, TensorRef] = {}
    for name, ref in theirs.items():
        ours = our_name(name)
        if ours is not None:
            tensors[ours] = ref
        elif not name.endswith("rotary_emb.inv_freq"):  # older transformers saved the rotary table, recomputed here
            raise _refuse(given, f"{ref.file} holds {name}, which is no parameter of a Llama model")
    tied = HEAD not in tensors and EMBEDDING in tensors and bool(config.get("tie_word_embeddings", False))
    if tied:
        tensors[HEAD] = tensors[EMBEDDING]
    return Source(given, "hf", path, tensors, arch, tied=tied)


# ------------------------------------------------------------------------------------------------ checkpoint


def _checkpoint(path: Path, given: str) -> Source:
    import yaml

    from curry_train.checkpoint.manifest import Manifest
    from curry_train.checkpoint.policy import Contents
    from curry_train.export import ExportError, parameter_shapes, run_config_of

    try:
        manifest = Manifest.read(path)
        shapes = parameter_shapes(path)
    except (OSError, ValueError, KeyError, TypeError, ExportError) as err:
        raise _refuse(given, f"{path} is not a committed curry-train checkpoint ({err})") from None
    for rel, entry in sorted(manifest.files.items()):  # sizes here; checksums once the ranks can share the reading
        file = path / rel
        if not file.is_file() or file.stat().st_size != entry.nbytes:
            raise _refuse(given, f"{file} is missing or not the size its manifest records (truncated or corrupt)")
    tensors = {
        name: TensorRef(name, tuple(meta.size), str(meta.properties.dtype).removeprefix("torch."))
        for name, meta in shapes.items()
    }
    run_config = run_config_of(path)
    model = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("model") if run_config.is_file() else {}
    arch = {k: model[k] for k in ARCH_KEYS if isinstance(model, dict) and k in model}
    full = manifest.contents is Contents.FULL
    return Source(given, "checkpoint", path, tensors, arch, step=manifest.step, optimizer=full)


def _run_latest(path: Path, given: str) -> Path:
    from curry_train.checkpoint.store import RunDir

    store = RunDir(path)
    latest = store.latest() or store.newest_full()
    if latest is None:
        raise _refuse(given, f"run directory {path} has no committed checkpoint with full state (no `latest`)")
    return store.path_of(latest)


def find_source(given: str) -> Source:
    """The source `given` names, from its metadata; InitError when it is none of the three kinds."""
    path = Path(given).expanduser()
    if not path.exists():
        raise _refuse(given, "no such file or directory")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise _refuse(given, "a file must be a .safetensors file (as `curry-train export` writes)")
        return _safetensors_file(path, given)
    if (path / "manifest.json").is_file():
        return _checkpoint(path, given)
    if RunFiles(path).journal.is_file():
        return _checkpoint(_run_latest(path, given), given)
    if (path / CONFIG_JSON).is_file():
        return _hf_dir(path, given)
    raise _refuse(
        given,
        f"{path} is neither a curry-train checkpoint (manifest.json), a run directory ({JOURNAL}) nor a Hugging "
        f"Face directory ({CONFIG_JSON} with {HF_WEIGHTS})",
    )


# ------------------------------------------------------------------------------------------------- checking


def _arch_of_config(model: ModelConfig) -> dict[str, Any]:
    values = {k: getattr(model, k) for k in ARCH_KEYS}
    values["n_kv_heads"] = model.n_kv_heads or model.n_heads
    return values


def _arch_of_shapes(tensors: dict[str, TensorRef]) -> dict[str, Any]:
    """What the tensors' shapes alone say about the model (for sources that record no config)."""
    arch: dict[str, Any] = {}
    if EMBEDDING in tensors:
        arch["vocab_size"], arch["dim"] = tensors[EMBEDDING].shape
    arch["n_layers"] = len({name.split(".")[1] for name in tensors if name.startswith("layers.")})
    if "layers.0.feed_forward.w1.weight" in tensors:
        arch["ffn_dim"] = tensors["layers.0.feed_forward.w1.weight"].shape[0]
    return arch


def _source_arch(source: Source) -> dict[str, Any]:
    arch = _arch_of_shapes(source.tensors) | source.arch
    if "n_kv_heads" in arch or "n_heads" in arch:
        arch["n_kv_heads"] = arch.get("n_kv_heads") or arch.get("n_heads")
    return arch


def _same(a: Any, b: Any) -> bool:
    return float(a) == float(b) if isinstance(a, float) or isinstance(b, float) else a == b


def _overrides(source: Source, model: ModelConfig) -> str:
    ours, theirs = _arch_of_config(model), _source_arch(source)
    changes = [f"model.{k}={theirs[k]}" for k in ARCH_KEYS if k in theirs and not _same(theirs[k], ours[k])]
    return " ".join(changes)


def _excluded(names: list[str], init: InitConfig, given: str) -> list[str]:
    for pattern in init.exclude:
        if not fnmatch.filter(names, pattern):
            raise InitError(
                f"init.exclude: {pattern!r} matches no parameter of this model (names look like {names[1]}, "
                f"{EMBEDDING}, {HEAD}; shell-style patterns such as 'layers.*.attention.*')"
            )
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in init.exclude)]


def plan_init(source: Source, model: ModelConfig, init: InitConfig) -> InitPlan:
    """What this run takes from `source`, or InitError naming the first way the source differs from the model
    (recorded config first, then names and shapes) and the model.* overrides that would match it."""
    given = source.given
    ours, theirs = _arch_of_config(model), _source_arch(source)
    expected = parameter_shapes(model)
    excluded = _excluded(list(expected), init, given)
    for key in ARCH_KEYS:
        # The vocabulary is judged by the embedding's and head's shapes: a run that excludes both may change it.
        if key != "vocab_size" and key in theirs and not _same(theirs[key], ours[key]):
            raise _refuse(
                given,
                f"the source has {key}={theirs[key]}, this run model.{key}={ours[key]}; the architecture is the "
                f"config's: to match the source give {_overrides(source, model)}",
            )
    loaded = [name for name in expected if name not in excluded]
    for name in loaded:
        ref = source.tensors.get(name)
        if ref is None:
            raise _refuse(given, f"the source has no tensor for {name} (missing; leave it out with init.exclude)")
        if ref.shape != expected[name]:
            fix = _overrides(source, model)
            raise _refuse(
                given,
                f"{name} is {list(ref.shape)} in the source and {list(expected[name])} in this model; "
                + (f"to match the source give {fix}, or " if fix else "")
                + f"leave it to the initialiser with init.exclude=[{name}]",
            )
    unexpected = sorted(set(source.tensors) - set(expected))
    if unexpected:
        raise _refuse(
            given,
            f"the source holds {unexpected[0]} (and {len(unexpected) - 1} more), which this model lacks; "
            f"to match the source give {_overrides(source, model) or 'its model config'}",
        )
    if init.optimizer and not source.optimizer:
        what = "a checkpoint without optimizer state" if source.kind == "checkpoint" else f"a {source.kind} source"
        raise InitError(f"init.optimizer=true: {given} is {what}; only a full curry-train checkpoint has one")
    return InitPlan(source, loaded, excluded, init.optimizer)


def check_source(cfg: Config, launch: Launch) -> InitPlan | None:
    """The pre-flight check (every process, before the process group): the checked plan of `+init_from`, or None
    when this launch will not read a source: no warm start, or a relaunch that continues from the run's own
    checkpoints (which never reads the source again, so a source changed or gone since is no reason to refuse)."""
    if cfg.init.source is None or _continues_own_run(cfg, launch):
        return None
    return plan_init(find_source(cfg.init.source), cfg.model, cfg.init)


def _continues_own_run(cfg: Config, launch: Launch) -> bool:
    """`+resume=latest|PATH` and `+rollback_to` always continue from a checkpoint; `+resume=auto` when the run
    directory has one (else it starts fresh, from the source)."""
    if launch.resume is None and launch.rollback_to is None:
        return False
    if launch.resume != "auto":
        return True
    from curry_train.checkpoint.store import RunDir

    store = RunDir(Path(cfg.run.root) / str(cfg.run.id))
    return store.path.is_dir() and (store.latest() or store.newest_full()) is not None
