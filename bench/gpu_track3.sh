#!/usr/bin/env bash
# The GPU check of the track3 preset: what a benchmark run costs on ONE GPU. Trains the full preset (GPT-2 small,
# 524,288 tokens/step as 8 accumulated micro-batches, compile, Triton msign) on synthetic shards: 5 untimed warm-up
# steps, then step time over 20 timed steps, peak memory, and the time of one full validation (10,485,760 tokens);
# prints a table and writes OUT/summary.json (device, torch, CUDA, Triton) beside the log.
#   bash bench/gpu_track3.sh OUT                      # one GPU, the full preset (about 3-4 minutes, most of it compile)
#   TRACK3_SIZE=tiny bash bench/gpu_track3.sh OUT     # 2 layers, d 64 on a CPU: checks the script in seconds
set -euo pipefail
out=${1:?usage: bash bench/gpu_track3.sh OUTDIR}
cd "$(dirname "$0")/.."
timeout 560 python3 bench/track3_step_cost.py --out "$out" --size "${TRACK3_SIZE:-full}" --timed-steps "${TIMED_STEPS:-20}"
