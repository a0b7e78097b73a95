"""What the remote copy (`checkpoint.remote`) costs, measured side by side in one run, against moto's S3 server on
127.0.0.1 (started here, in a process of its own; it shares this machine's cores with training, which a real store
does not).

    python scripts/bench_remote.py --model small --nproc 2 --json remote.json        # launches torchrun itself
    python scripts/bench_remote.py --model tiny --nproc 2 --reps 1 --steps 12 --save-every 4 --put-reps 1  # smoke

It has its own script, beside bench_checkpoint.py (whose helpers it uses), because it needs an S3 server and its
rows compare runs with and without one.

Rows:
  loop local / remote  `loop.train` for --steps steps with a full save every --save-every steps, without and with
                       checkpoint.remote; each save's extra wall time from outside (bench_checkpoint.save_extras: the
                       --save-every minus 2 steps after a save, while its upload runs, against the other steps of the
                       same run). The upload's cost per save is
                       remote minus local; it is also given as a share of the interval between two saves at the
                       `default` cadence (checkpoint.recovery_every steps of the median step).
  upload / put         one committed checkpoint uploaded as the uploader does (each rank its own files, rank 0 the
                       manifest last, once every file is there) against a plain fsspec `put_file` of the same files
                       by the same ranks; throughput ratio.
  resume local/remote  a relaunch that resumes and trains one more step, from the run directory, and the same
                       after the run directory's checkpoints were deleted (fetched from the remote first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))  # scripts/ is not a package
import bench_checkpoint as bc  # noqa: E402

from curry_train import distributed, loop  # noqa: E402
from curry_train.checkpoint.policy import Role  # noqa: E402
from curry_train.checkpoint.remote import RemoteStore  # noqa: E402
from curry_train.checkpoint.store import RunDir  # noqa: E402
from curry_train.checkpoint.upload import Uploader  # noqa: E402
from curry_train.compose import compose, resolve  # noqa: E402
from curry_train.config import Launch  # noqa: E402
from curry_train.journal import Journal, read_journal  # noqa: E402
from curry_train.metrics import read_metrics  # noqa: E402

BUCKET = "bench"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset (conf/model/*.yaml)")
    p.add_argument("--nproc", type=int, default=2, help="ranks; the script launches torchrun itself")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--dir", type=Path, default=Path("bench-remote"), help="scratch directory (removed after)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each loop run and each resume")
    p.add_argument("--steps", type=int, default=40, help="steps of each loop run")
    p.add_argument("--save-every", type=int, default=10, help="full-save cadence of the loop runs")
    p.add_argument("--put-reps", type=int, default=3, help="repetitions of the upload / put rows")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="global sequences per step")
    return p.parse_args()


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port of 127.0.0.1, with the bucket made; the credentials it accepts go to the
    environment the ranks inherit."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("moto's server did not start (pip install 'moto[server]')") from None
            time.sleep(0.1)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=url,
    )
    import s3fs

    s3fs.S3FileSystem(endpoint_url=url, skip_instance_cache=True).mkdir(BUCKET)
    return proc, url


def relaunch(args: argparse.Namespace) -> None:
    """Not under torchrun yet: start the S3 server, then run this script under torchrun with --nproc ranks."""
    server, _ = start_moto()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    forwarded, skip = [], False  # --nproc is said above (torchrun would take it for --nproc-per-node)
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            forwarded.append(arg)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        code = subprocess.run([*cmd, __file__, *forwarded], env=env).returncode
    finally:
        server.terminate()
        server.wait(timeout=30)
    raise SystemExit(code)


def config(args: argparse.Namespace, *overrides: str) -> Any:
    ns = argparse.Namespace(model=args.model, seq_len=args.seq_len, batch_size=args.batch_size, device="cpu")
    return bc.config(ns, "checkpoint.check_storage=false", *overrides)


# ------------------------------------------------------------------------------------------------ loop rows


def loop_rows(args: argparse.Namespace, env: distributed.Dist, scratch: Path) -> dict[str, Any]:
    saving = [
        f"train.steps={args.steps}",
        "train.eval_every=0",
        f"checkpoint.recovery_every={args.save_every}",
        "checkpoint.rollback_every=0",
        "checkpoint.best_k=0",
        "checkpoint.retention.recovery_keep=1",
    ]
    extras: dict[str, list[float]] = {"local": [], "remote": []}
    steps: list[float] = []
    uploads: list[dict] = []
    for rep in range(args.reps):
        names = ["local", "remote"] if rep % 2 == 0 else ["remote", "local"]
        for name in names:
            remote = [f"checkpoint.remote=s3://{BUCKET}/loop-{rep}", "checkpoint.remote_recovery_keep=1"]
            cfg = config(args, *saving, *(remote if name == "remote" else []))
            run_dir = bc.run_loop(cfg, env, scratch / f"loop-{name}")
            if env.is_main:
                after = max(1, args.save_every - 2)  # the upload runs through most of the interval
                extras[name] += bc.save_extras(run_dir, args.save_every, args.steps, after)
                metrics = read_metrics(run_dir / "metrics.jsonl")
                steps += [metrics[s]["time"] - metrics[s - 1]["time"] for s in range(2, args.steps + 1)]
                if name == "remote":
                    uploads += [e for e in read_journal(run_dir / "journal.jsonl") if e["event"] == "upload"]
            dist.barrier()
    return {"extras": extras, "median_step_s": statistics.median(steps) if steps else 0.0, "uploads": uploads}


# ------------------------------------------------------------------------------------------ upload against put


def upload_rows(args: argparse.Namespace, env: distributed.Dist, scratch: Path) -> dict[str, Any]:
    """A committed full checkpoint (one save), uploaded as the uploader does and with plain put_file calls."""
    cfg = config(
        args,
        "train.steps=2",
        "train.eval_every=0",
        "checkpoint.recovery_every=2",
        "checkpoint.rollback_every=0",
        "checkpoint.best_k=0",
    )
    run_dir = bc.run_loop(cfg, env, scratch / "upload-source")
    store = RunDir(run_dir)
    checkpoint = [store.latest() if env.is_main else None]
    dist.broadcast_object_list(checkpoint, src=0)
    source = store.path_of(checkpoint[0])
    names = sorted(p.name for p in source.iterdir() if p.name.startswith(f"__{env.rank}_"))
    if env.is_main:
        names.append(".metadata")
    nbytes = torch.tensor([sum((source / n).stat().st_size for n in names)], dtype=torch.int64)
    dist.all_reduce(nbytes)
    manifests = [store.manifest(checkpoint[0])] if env.is_main else []
    journal = Journal(scratch / f"upload-journal-{env.rank}.jsonl", enabled=env.is_main)
    policy = cfg.checkpoint.policy()

    def upload(remote: RemoteStore) -> None:  # the uploader's way: own files, then rank 0's manifest once all are there
        uploader = Uploader(remote, run_dir, env.rank, journal, policy, frozenset(Role), 600)
        uploader.submit(checkpoint, source, names, manifests, [0] * len(Role))
        uploader.join()

    def put(remote: RemoteStore) -> None:  # plain fsspec, the same files from the same ranks
        for name in names:
            remote.fs.put_file(str(source / name), remote.key(f"{checkpoint[0].relpath}/{name}"))

    ways = {"upload": upload, "put": put}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for rep in range(args.put_reps):
        for name in list(ways) if rep % 2 == 0 else list(ways)[::-1]:
            remote = RemoteStore(f"s3://{BUCKET}", f"{name}-{rep}")
            seconds[name].append(bc.timed(lambda way=ways[name], remote=remote: way(remote)))
            if env.is_main:
                remote.fs.rm(remote.root, recursive=True)
            dist.barrier()
    return {"seconds": seconds, "bytes": int(nbytes.item())}


# ------------------------------------------------------------------------------------------------ resume rows


def resume_rows(args: argparse.Namespace, env: distributed.Dist, scratch: Path) -> dict[str, list[float]]:
    """Relaunches that resume and train one more step: from the run directory, and with its checkpoints gone."""
    base = [
        "train.eval_every=0",
        "checkpoint.recovery_every=2",
        "checkpoint.rollback_every=0",
        "checkpoint.best_k=0",
        f"checkpoint.remote=s3://{BUCKET}/resume",
        "scheduler.name=constant",
    ]
    run_dir = bc.run_loop(config(args, *base, "train.steps=2"), env, scratch / "resume")
    seconds: dict[str, list[float]] = {"local": [], "remote": []}
    steps = 2
    for rep in range(args.reps):
        for name in ["local", "remote"] if rep % 2 == 0 else ["remote", "local"]:
            steps += 1
            cfg = config(args, *base, f"train.steps={steps}")
            if name == "remote" and env.is_main:
                for role in Role:
                    shutil.rmtree(run_dir / role.dirname, ignore_errors=True)
                (run_dir / "latest").unlink(missing_ok=True)
            dist.barrier()
            seconds[name].append(bc.timed(lambda cfg=cfg: loop.train(cfg, run_dir, env, Launch(resume="latest"))))
    if env.is_main:
        fetched = [e for e in read_journal(run_dir / "journal.jsonl") if e["event"] == "remote_fetch"]
        assert len(fetched) == args.reps, f"expected {args.reps} fetches from the remote, journal has {len(fetched)}"
    return seconds


# ---------------------------------------------------------------------------------------------------- report


def summarize(loops: dict, uploads: dict, resumes: dict, default_every: int) -> dict[str, Any]:
    def mean_err(xs: list[float]) -> tuple[float, float]:
        return statistics.fmean(xs), statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")

    rows: dict[str, Any] = {}
    local, local_err = mean_err(loops["extras"]["local"])
    remote, remote_err = mean_err(loops["extras"]["remote"])
    cost = remote - local
    step = loops["median_step_s"]
    rows["loop_extra_per_save_local_s"] = [local, local_err]
    rows["loop_extra_per_save_remote_s"] = [remote, remote_err]
    rows["upload_cost_per_save_s"] = [cost, (local_err**2 + remote_err**2) ** 0.5]
    rows["median_step_s"] = step
    ups = loops["uploads"]
    if ups:
        rows["upload_in_loop_mb_per_s"] = statistics.median(e["bytes"] / e["seconds"] / 1e6 for e in ups)
    ratios = {
        "upload_cost_at_measured_cadence": cost / (step * loops["save_every"]),
        "upload_cost_at_default_cadence": cost / (step * default_every),
    }
    up, put = statistics.median(uploads["seconds"]["upload"]), statistics.median(uploads["seconds"]["put"])
    rows["upload_s"], rows["put_s"] = up, put
    rows["upload_mb_per_s"], rows["put_mb_per_s"] = uploads["bytes"] / up / 1e6, uploads["bytes"] / put / 1e6
    ratios["upload_vs_put_throughput"] = put / up
    rl, rr = statistics.median(resumes["local"]), statistics.median(resumes["remote"])
    rows["resume_local_s"], rows["resume_remote_s"] = rl, rr
    ratios["resume_remote_vs_local"] = rr / rl
    return {
        "rows": rows,
        "ratios": ratios,
        "checkpoint_bytes": uploads["bytes"],
        "default_recovery_every": default_every,
    }


def main() -> None:
    args = parse_args()
    if "RANK" not in os.environ:
        relaunch(args)
    env = distributed.init_distributed("cpu")
    scratch = args.dir.resolve()
    try:
        if env.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
        dist.barrier()
        load_before = os.getloadavg()
        loops = loop_rows(args, env, scratch)
        loops["save_every"] = args.save_every
        uploads = upload_rows(args, env, scratch)
        resumes = resume_rows(args, env, scratch)
        if env.is_main:
            default_every = resolve(compose(["checkpoint=default"]))[0].checkpoint.recovery_every
            result = summarize(loops, uploads, resumes, int(default_every))
            result["machine"] = (
                f"torch {torch.__version__}, {env.world_size} ranks on cpu, {os.cpu_count()} CPUs, model {args.model}, "
                f"checkpoint {uploads['bytes'] / 1e6:.0f} MB, moto on the same machine, load average "
                f"{load_before[0]:.2f} before and {os.getloadavg()[0]:.2f} after"
            )
            result["raw"] = {"loops": loops, "uploads": uploads, "resumes": resumes}
            print(json.dumps({k: result[k] for k in ("machine", "rows", "ratios")}, indent=2))
            if args.json:
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if env.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
        distributed.shutdown()


if __name__ == "__main__":
    main()
