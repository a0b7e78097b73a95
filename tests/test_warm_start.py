"""`+init_from=SOURCE`: new runs started from a Hugging Face Llama directory (2 ranks, sharded), from another run's
checkpoint (saved on 2 ranks, loaded on 1, with its optimizer state) and from an exported safetensors file (with
init.exclude); the bad inputs, each refused in one line; tied embeddings and a dtype conversion in one process.

Every run trains one step at lr 1e-30, so its final checkpoint holds exactly the parameters it started from."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import yaml

from curry_train.cli import main as cli
from curry_train.compose import resolve
from curry_train.config import ConfigError, DataConfig, ModelConfig
from curry_train.data import Slicing, dev_batches, load_corpus
from curry_train.export import iter_parameters
from curry_train.hf_llama import hf_name
from curry_train.init_source import InitError, check_source
from curry_train.journal import read_journal
from curry_train.model import Transformer, init_value
from tests.conftest import FAST, compose_config, run_train

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# A tiny Llama with grouped-query attention, a rotary base and a norm epsilon other than curry-train's defaults.
HF_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=5e5,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
)
MODEL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=96",
    "model.rope_theta=500000.0",
    "model.norm_eps=1e-06",
]
RUN = [*FAST, *MODEL, "train.steps=1", "optimizer.lr=1e-30", "train.eval_every=1", "train.eval_batches=2"]


def hf_model(tie: bool = False, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG, tie_word_embeddings=tie))
    return model.eval()


def journal_events(run_dir: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in read_journal(run_dir / "journal.jsonl") if e["event"] == event]


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return dict(iter_parameters(run_dir / "recovery" / "step-00000001.dcp"))


def run_dir_of(root: Path, args: list[str]) -> Path:
    cfg, _ = resolve(compose_config(args))
    return root / str(cfg.run.id)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Hugging Face source and three warm-started runs, each launched once for the whole module."""
    root = tmp_path_factory.mktemp("warm")
    hf = hf_model()
    hf.save_pretrained(root / "hf", max_shard_size="100KB")  # sharded: model.safetensors.index.json
    assert (root / "hf" / "model.safetensors.index.json").is_file()
    runs_root = root / "runs"
    common = [*RUN, f"run.root={runs_root}"]
    from_hf = [*common, f"+init_from={root / 'hf'}"]
    run_train(from_hf, root, nproc=2)
    hf_run = run_dir_of(runs_root, from_hf)
    from_run = [*common, f"+init_from={hf_run}", "init.optimizer=true"]
    run_train(from_run, root, nproc=1)
    exported = root / "exported.safetensors"
    assert cli(["export", str(hf_run), "-o", str(exported)]) == 0
    from_file = [*common, f"+init_from={exported}", "init.exclude=[output.weight]"]
    run_train(from_file, root, nproc=1)
    return {
        "root": root,
        "hf": hf,
        "hf_run": hf_run,
        "run_run": run_dir_of(runs_root, from_run),
        "file_run": run_dir_of(runs_root, from_file),
        "from_file": from_file,
        "exported": exported,
    }


def _dev_loss_of(model: Any, run_dir: Path, world_size: int) -> float:
    """The dev loss as a run on `world_size` ranks computes it: each rank's mean over its batches, then the mean."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data, t = DataConfig(**config["data"]), config["train"]
    corpus = load_corpus(data)
    per_rank = []
    with torch.no_grad():
        for rank in range(world_size):
            slicing = Slicing(t["batch_size"], world_size, rank, t["grad_accum"])
            batches = dev_batches(corpus.dev, data, slicing, t["seed"], t["eval_batches"])
            losses = [F.cross_entropy(model(b["input"]).logits.flatten(0, 1), b["target"].flatten()) for b in batches]
            per_rank.append(sum(x.item() for x in losses) / len(losses))
    return sum(per_rank) / world_size


def test_a_hugging_face_llama_loaded_on_two_ranks_gives_transformers_logits(runs: dict[str, Any]) -> None:
    hf, run_dir = runs["hf"], runs["hf_run"]
    (init,) = journal_events(run_dir, "init")
    assert init["kind"] == "hf" and init["loaded"] == 21 and init["excluded"] == [] and not init["tied_head"]
    assert init["dtype"] == {"float32": 21} and init["digest"].startswith("xxh3_64-rows:")
    # After a step at lr 1e-30 the parameters are bitwise the source's, under the names the export table gives.
    theirs = hf.state_dict()
    params = final_params(run_dir)
    assert len(params) == 21
    for name, tensor in params.items():
        assert torch.equal(tensor, theirs[hf_name(name)]), name
    # curry-train's model with the run's config and these parameters computes transformers' logits.
    ours = Transformer(ModelConfig(**yaml.safe_load((run_dir / "config.yaml").read_text())["model"]))
    ours.load_state_dict(params, strict=True)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=0, atol=1e-4)
    # And so did the run itself: its dev loss at step 1 (parameters unchanged) is transformers' on the same batches.
    dev_loss = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["dev_loss"]
    assert dev_loss == pytest.approx(_dev_loss_of(hf, run_dir, world_size=2), rel=1e-5)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_another_runs_checkpoint_reshards_and_brings_its_optimizer_state(runs: dict[str, Any]) -> None:
    source, run_dir = runs["hf_run"], runs["run_run"]
    (init,) = journal_events(run_dir, "init")
    assert init["kind"] == "checkpoint" and init["source_step"] == 1 and init["optimizer"] is True
    assert init["path"].endswith("recovery/step-00000001.dcp")  # the run directory's `latest`
    # The same parameters as the hf run loaded (saved by 2 ranks, loaded by 1): the digest does not depend on the
    # world size or the source's format.
    assert init["digest"] == journal_events(source, "init")[0]["digest"]
    expected = final_params(source)
    for name, tensor in final_params(run_dir).items():
        assert torch.equal(tensor, expected[name]), name
    # Adam's moments came along: its step count goes on from the source's 1 step.
    step = torch.zeros(())
    ckpt = run_dir / "recovery" / "step-00000001.dcp"
    key = {"optim": {"state": {"norm.weight": {"step": step}}}}
    dcp.load(key, storage_reader=dcp.FileSystemReader(ckpt), no_dist=True)
    assert step.item() == 2.0
    # A new run: step, schedule and data start at zero, in a directory of its own.
    assert run_dir != source and journal_events(run_dir, "run_start")[0]["step"] == 0


def test_an_exported_file_with_an_excluded_head(runs: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    run_dir = runs["file_run"]
    (init,) = journal_events(run_dir, "init")
    assert init["kind"] == "safetensors" and init["excluded"] == ["output.weight"] and init["loaded"] == 20
    expected = final_params(runs["hf_run"])
    params = final_params(run_dir)
    cfg, _ = resolve(compose_config(runs["from_file"]))
    head = init_value("output.weight", params["output.weight"].shape, cfg.model, cfg.train.seed)
    assert torch.equal(params["output.weight"], head), "an excluded parameter comes from the initialiser"
    for name, tensor in params.items():
        assert name == "output.weight" or torch.equal(tensor, expected[name]), name
    assert cli(["status", str(run_dir)]) == 0
    assert (
        capsys.readouterr().out.splitlines()[0].endswith(f"initialised from {runs['exported']}, ran straight through")
    )


def test_a_relaunch_resumes_its_own_run_and_never_reads_the_source_again(runs: dict[str, Any]) -> None:
    root, run_dir = runs["root"], runs["file_run"]
    moved = root / "moved.safetensors"
    shutil.move(runs["exported"], moved)
    try:
        proc = run_train([*runs["from_file"], "+resume=auto"], root)  # as the SLURM script relaunches
    finally:
        shutil.move(moved, runs["exported"])
    assert "already finished" in proc.stdout + proc.stderr
    assert len(journal_events(run_dir, "run_start")) == 2 and len(journal_events(run_dir, "init")) == 1


# --------------------------------------------------------------------------------------------- refusals


def test_init_from_is_part_of_the_run_identity() -> None:
    plain, _ = resolve(compose_config([]))
    a, _ = resolve(compose_config(["+init_from=a"]))
    b, _ = resolve(compose_config(["+init_from=b"]))
    relaunched, launch = resolve(compose_config(["+init_from=a", "+resume=latest"]))
    assert len({plain.run.id, a.run.id, b.run.id}) == 3, "two warm starts from different sources share a directory"
    assert relaunched.run.id == a.run.id and launch.resume == "latest"
    assert a.init.source == "a" and plain.init.source is None
    with pytest.raises(ConfigError, match=r"init.optimizer: needs \+init_from=SOURCE"):
        resolve(compose_config(["init.optimizer=true"]))


def _refusal(args: list[str]) -> str:
    cfg, launch = resolve(compose_config(args))
    with pytest.raises(InitError) as err:
        check_source(cfg, launch)
    assert "\n" not in str(err.value)
    return str(err.value)


def _write_hf(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    return path


def test_each_bad_source_is_refused_in_one_line(runs: dict[str, Any], tmp_path: Path) -> None:
    exported = runs["exported"]
    tensors = safetensors_torch.load_file(exported)
    assert "no such file or directory" in _refusal([*MODEL, f"+init_from={tmp_path / 'nope'}"])
    (tmp_path / "empty").mkdir()
    assert "is neither a curry-train checkpoint" in _refusal([*MODEL, f"+init_from={tmp_path / 'empty'}"])
    missing = tmp_path / "missing.safetensors"
    safetensors_torch.save_file({k: v for k, v in tensors.items() if k != "norm.weight"}, str(missing))
    assert "no tensor for norm.weight (missing" in _refusal([*MODEL, f"+init_from={missing}"])
    extra = tmp_path / "extra.safetensors"
    safetensors_torch.save_file({**tensors, "layers.0.attention.bias": torch.zeros(4)}, str(extra))
    assert "holds layers.0.attention.bias" in _refusal([*MODEL, f"+init_from={extra}"])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(exported.read_bytes()[:-100])
    assert "truncated or corrupt" in _refusal([*MODEL, f"+init_from={truncated}"])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert "not a readable safetensors file" in _refusal([*MODEL, f"+init_from={garbage}"])
    hf_names = tmp_path / "hf-names.safetensors"
    shutil.copy(next((runs["root"] / "hf").glob("model-00001-*.safetensors")), hf_names)
    assert "holds Hugging Face names" in _refusal([*MODEL, f"+init_from={hf_names}"])
    # The exported file records its model config: what shapes cannot show is checked too, with the fix.
    line = _refusal([*MODEL, "model.rope_theta=10000", f"+init_from={exported}"])
    assert "the source has rope_theta=500000.0, this run model.rope_theta=10000.0" in line
    assert line.endswith("to match the source give model.rope_theta=500000.0")
    line = _refusal([*MODEL, "model.vocab_size=300", f"+init_from={exported}"])
    assert "tok_embeddings.weight is [256, 64] in the source and [300, 64] in this model" in line
    assert "model.vocab_size=256, or leave it to the initialiser with init.exclude=[tok_embeddings.weight]" in line
    line = _refusal([*MODEL, f"+init_from={runs['root'] / 'hf'}", "init.optimizer=true"])
    assert line.startswith("init.optimizer=true:") and "a hf source" in line
    assert "'attention.*' matches no parameter" in _refusal(
        [*MODEL, f"+init_from={exported}", "init.exclude=[attention.*]"]
    )
    # A new vocabulary: embedding and head excluded, the rest loads.
    cfg, launch = resolve(
        compose_config(
            [
                *MODEL,
                "model.vocab_size=300",
                f"+init_from={exported}",
                "init.exclude=[tok_embeddings.weight,output.weight]",
            ]
        )
    )
    plan = check_source(cfg, launch)
    assert plan is not None and plan.excluded == ["tok_embeddings.weight", "output.weight"] and len(plan.loaded) == 19


def test_rope_theta_is_read_from_either_place_transformers_writes_it(tmp_path: Path) -> None:
    """transformers 5 writes rope_parameters.rope_theta, older versions rope_theta at the top level."""
    hf = hf_model()
    config = hf.config.to_dict()
    assert config["rope_parameters"]["rope_theta"] == 5e5
    old_style = {k: v for k, v in config.items() if k != "rope_parameters"} | {"rope_theta": 5e5}
    for name, cfg_json in (("new", config), ("old", old_style)):
        path = _write_hf(tmp_path / name, cfg_json, {k: v.contiguous() for k, v in hf.state_dict().items()})
        cfg, launch = resolve(compose_config([*MODEL, f"+init_from={path}"]))
        assert check_source(cfg, launch) is not None
        line = _refusal([*MODEL, "model.rope_theta=10000", "model.norm_eps=1e-5", f"+init_from={path}"])
        assert line.endswith("give model.rope_theta=500000.0 model.norm_eps=1e-06"), line
    scaled = config | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    path = _write_hf(tmp_path / "scaled", scaled, {k: v.contiguous() for k, v in hf.state_dict().items()})
    assert "rope type 'llama3'" in _refusal([*MODEL, f"+init_from={path}"])


def test_a_mismatched_source_exits_2_before_anything_is_created(runs: dict[str, Any], tmp_path: Path) -> None:
    args = [*RUN, "model.norm_eps=1e-5", f"+init_from={runs['root'] / 'hf'}", f"run.root={tmp_path / 'runs'}"]
    proc = run_train(args, tmp_path, check=False)
    assert proc.returncode == 2
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("curry-train:")]
    assert "norm_eps=1e-06, this run model.norm_eps=1e-05" in line and line.endswith("give model.norm_eps=1e-06")
    # A checkpoint whose shard was overwritten: its checksum is checked against the manifest before the run starts.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs["hf_run"] / "recovery" / "step-00000001.dcp", corrupt / "recovery" / "step-00000001.dcp")
    shard = next((corrupt / "recovery" / "step-00000001.dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    args = [*RUN, f"+init_from={corrupt / 'recovery' / 'step-00000001.dcp'}", f"run.root={tmp_path / 'runs'}"]
    proc = run_train(args, tmp_path, check=False)
    assert proc.returncode == 2
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("curry-train:")]
    assert "checksum" in line and "(corrupted)" in line
    assert not (tmp_path / "runs").exists()


def test_tied_embeddings_fill_the_head_and_bf16_is_converted(tmp_path: Path) -> None:
    """A world of one in this process: the head of a tied source comes from its embedding, bf16 becomes fp32."""
    from curry_train import distributed, warm_start
    from curry_train.journal import Journal
    from curry_train.optim import build_optimizer

    hf = hf_model(tie=True).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in safetensors_torch.load_file(tmp_path / "tied" / "model.safetensors")
    cfg, launch = resolve(compose_config([*MODEL, f"+init_from={tmp_path / 'tied'}", "train.device=cpu"]))
    env = distributed.init_distributed("cpu")
    try:
        model, _ = distributed.build_sharded_model(cfg, env, initialize=False)
        plan = warm_start.prepare(cfg, launch, env)
        with Journal(tmp_path / "journal.jsonl") as journal:
            warm_start.load_initial(plan, cfg, model, build_optimizer(model, cfg.optimizer), env, journal, print)
        params = {name: p.full_tensor() for name, p in model.named_parameters()}
    finally:
        distributed.shutdown()
    (init,) = [e for e in read_journal(tmp_path / "journal.jsonl") if e["event"] == "init"]
    assert init["tied_head"] is True and init["dtype"] == {"bfloat16 -> float32": 21}
    embedding = hf.model.embed_tokens.weight.detach().float()
    assert params["output.weight"].dtype == torch.float32
    assert torch.equal(params["output.weight"], embedding) and torch.equal(params["tok_embeddings.weight"], embedding)
