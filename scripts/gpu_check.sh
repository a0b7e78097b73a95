#!/usr/bin/env bash
# What CPU CI cannot show, in one short run on a GPU machine (the library's device tool), about 5 minutes:
#   1. versions, and that curry-train imports there;
#   2. a 1-GPU run killed with SIGKILL after step 7 and resumed with +resume=latest: every later loss bitwise the
#      straight run's (asynchronous saves: pinned staging buffers, the snapshot copied on a side stream and waited
#      for on the device before optimizer.step, O_DIRECT files, bf16 autocast);
#   3. scripts/bench_checkpoint.py --device cuda, a short run: the figures to report beside the CPU ones.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # OUT_DIR defaults to $OUT (the device tool's), else gpu-check
#   DEVICE=cpu bash scripts/gpu_check.sh /tmp/x  # the same steps on CPU, to check the script itself
#
# The GPU image lacks hydra-core, omegaconf, antlr4-python3-runtime and torchdata: download their wheels into .whl/
# (the device README's pip download line, for Python 3.12) and carry .whl; they are installed here first.
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
device=${DEVICE:-cuda}
model=${MODEL:-small}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
failed=0
python3 -c "import torch, curry_train; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee "$out/versions.txt" || failed=1

common=("train.device=$device" "model=$model" data.seq_len=64 data.max_bytes=2000000 train.batch_size=8
  logger.wandb.mode=disabled train.eval_every=0 checkpoint.recovery_every=5 checkpoint.check_storage=false)
python3 scripts/kill_and_resume.py --nproc 1 --kill-at-step 7 --root "$out/runs" --timeout 300 \
  -- train.steps=14 "${common[@]}" >"$out/kill_and_resume.txt" 2>&1 || failed=1
tail -5 "$out/kill_and_resume.txt"
grep -h '"event": "save"' "$out"/runs/*/journal.jsonl 2>/dev/null | head -3 >"$out/saves.jsonl"

python3 scripts/bench_checkpoint.py --device "$device" --nproc 1 --model "$model" --reps 1 --io-reps 3 \
  --loop-steps 16 --save-every 4 --step-rounds 2 --policy-steps 0 --json "$out/bench.json" --dir /tmp/gpu-bench \
  >"$out/bench.txt" 2>&1 || failed=1
sed -n '/^torch /,$p' "$out/bench.txt"
rm -rf "$out/runs"
echo "gpu_check: $([[ $failed == 0 ]] && echo passed || echo FAILED) (outputs in $out)"
exit $failed
