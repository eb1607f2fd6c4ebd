#!/usr/bin/env bash
# One-GPU smoke test of the medium preset: compiles the real model (FlexAttention, bf16 autocast) and trains a
# few dozen steps of one 64K-token micro-batch each on the demo data, once per matrix optimizer.
# Usage: bash bench/gpu_medium_smoke.sh OUTDIR [STEPS]
set -uo pipefail
out=${1:?output dir}; steps=${2:-40}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
common=(--preset medium --train-files 'data/demo/demo_train_*.bin' --val-files 'data/demo/demo_val_*.bin'
        --no-align-to-bos --batch-tokens 65536 --val-tokens 65536 --num-iterations "$steps" --val-loss-every 20
        --warmup-steps 3 --log-dir "$out")
for spec in "muon|" "ord_matched|spectral_lr_mul=1.0,decompose=true,scale_mode=matched"; do
  tag=${spec%%|*}; args=${spec#*|}
  opt=muon; [ -n "$args" ] && opt=spectral_ord
  timeout 240 python3 train_gpt.py "${common[@]}" --optimizer "$opt" --optimizer-args "$args" --run-id "medium1gpu_$tag" \
    2>&1 | tail -n 25
  echo "exit($tag)=$?"
done
