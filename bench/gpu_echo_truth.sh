#!/usr/bin/env bash
# The echo estimators against ground truth at the user's operating point, and the cost of each SpectralEcho mode.
#   1. bench/bench_echo_overhead.py: fit-step and apply-step cost of modes fit / plateau / reverb_svd vs Muon
#   2. train the medium model ~150 steps on the local demo text (one 64K-token micro-batch per step), checkpoint
#   3. spectral_probe.py --truth at that checkpoint: 64 truth replicates of 64K tokens + K = 8 estimator
#      replicates, every hidden matrix type (blocks given by ECHO_TRUTH_LAYERS), all estimators, three atom kinds
# Usage (from the repository root; demo data from data/prepare_demo_data.py are built if missing):
#   bash bench/gpu_echo_truth.sh OUT                          # on one GPU, under 10 minutes
#   ECHO_TRUTH_SIZE=cpu bash bench/gpu_echo_truth.sh OUT      # the same pipeline, tiny, on a CPU (a dry run)
# Knobs (env): ECHO_TRUTH_PRESET (medium: whatever `medium` reproduces when run), ECHO_TRUTH_STEPS,
# ECHO_TRUTH_N (truth replicates), ECHO_TRUTH_K (estimator K list), ECHO_TRUTH_LAYERS, ECHO_TRUTH_TOKENS
# (tokens per replicate), ECHO_TRUTH_ROW (tokens per row of a replicate; dense attention masks).
# Outputs under OUT: echo_overhead.json, the training log, truth/{truth.jsonl,summary.md,meta.json,truth_step*.png},
# console.txt. Each phase has its own time limit and the script goes on after a failed phase.
set -uo pipefail
out=${1:?output dir}
size=${ECHO_TRUTH_SIZE:-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$out/console.txt") 2>&1
if [ "$size" = gpu ]; then
  preset=${ECHO_TRUTH_PRESET:-medium}; steps=${ECHO_TRUTH_STEPS:-150}; n=${ECHO_TRUTH_N:-64}; k=${ECHO_TRUTH_K:-8}
  layers=${ECHO_TRUTH_LAYERS:-0,8,15}; tokens=${ECHO_TRUTH_TOKENS:-65536}; row=${ECHO_TRUTH_ROW:-2048}
  device=cuda; bench=(--preset medium --reps 3); limits=(150 360 330)
  train=(--train-files 'data/demo/demo_train_*.bin' --val-files 'data/demo/demo_val_*.bin' --no-align-to-bos
         --batch-tokens 65536 --val-tokens 65536 --val-loss-every 50 --warmup-steps 3)
elif [ "$size" = cpu ]; then
  preset=${ECHO_TRUTH_PRESET:-cpu-tiny}; steps=${ECHO_TRUTH_STEPS:-10}; n=${ECHO_TRUTH_N:-8}; k=${ECHO_TRUTH_K:-4}
  layers=${ECHO_TRUTH_LAYERS:-0}; tokens=${ECHO_TRUTH_TOKENS:-1024}; row=${ECHO_TRUTH_ROW:-256}
  device=cpu; bench=(--preset toy --reps 1 --replicates 4 --threads 1); limits=(300 1500 1500)
  train=(--val-loss-every 0)
else
  echo "ECHO_TRUTH_SIZE must be gpu or cpu, got '$size'" >&2; exit 2
fi
echo "== $(date -u +%FT%TZ) size=$size preset=$preset steps=$steps truth=$n K=$k layers=$layers tokens=$tokens row=$row"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
[ -d data/demo ] || python3 data/prepare_demo_data.py

echo "== 1. cost of each mode"
timeout "${limits[0]}" python3 bench/bench_echo_overhead.py "${bench[@]}" --out "$out/echo_overhead.json"
echo "exit(bench)=$?"

echo "== 2. train $preset for $steps steps"
timeout "${limits[1]}" python3 train_gpt.py --preset "$preset" "${train[@]}" --num-iterations $((steps + 1)) \
  --checkpoint-every "$steps" --checkpoint-dir "$out/ckpt" --run-id echo_truth --log-dir "$out"
echo "exit(train)=$?"

echo "== 3. truth study"
ckpt=$(printf "%s/ckpt/echo_truth/step_%06d" "$out" "$steps")
timeout "${limits[2]}" python3 spectral_probe.py --truth --checkpoint "$ckpt" --out "$out/truth" \
  --truth-replicates "$n" --k-list "$k" --plot-k "${k%%,*}" --layers "$layers" --replicate-tokens "$tokens" \
  --row-tokens "$row" --device "$device" --title "truth at step $steps of $preset ($size run)"
echo "exit(truth)=$?"
rm -rf "$out/ckpt"  # checkpoints are large and not part of the record
echo "== $(date -u +%FT%TZ) done"
