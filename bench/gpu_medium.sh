#!/usr/bin/env bash
# GPU checks of the `medium` preset (record 18) on one GPU, on local text: the demo corpus in data/demo/
# (python data/prepare_demo_data.py; the GPU machine has no FineWeb and no network).
#
#   bash bench/gpu_medium.sh smoke [OUT_DIR]
#   bash bench/gpu_medium.sh timing [OUT_DIR]
#
# smoke: `medium` compiled and trained for 30 steps through every CUDA path: FlexAttention block masks (document
#   and window masks), the matrix optimizer through the Triton msign kernels, bf16 autocast, and the schedule
#   compressed to 30 steps (28 scheduled + 2 extension) so that it crosses every batch, window, MTP and untie
#   transition (head split after step 5). Two forwards per step of the record's per-GPU sizes (16,384 -> 65,536
#   tokens, i.e. 32,768 -> 131,072 tokens/step); the first 10 steps run first as untimed warm-up on random tokens,
#   which compiles the graph of every transition (each takes tens of seconds); validation on 65,536 demo tokens at
#   steps 0 and 30. The demo corpus is 46 books in 2 train shards, so documents are cut at 65,536 tokens here
#   instead of 4,096 (that cap would leave 183K tokens of it: two forwards' worth). Writes OUT_DIR/summary.json (train and val losses, step times, peak memory, warm-up time,
#   device, torch / triton versions), the run's log and console output. OUT_DIR defaults to
#   records/gpu_checks/<date>_medium_smoke_<gpu>.
#
# timing: bench/gpu_timing.py: the training step of `medium` at each of its four batch stages (131,072 / 262,144 /
#   393,216 / 524,288 tokens per step, the record's 8 forwards per step on one GPU, each stage at its middle step),
#   2 untimed steps (compile) then 20 timed steps each: ms per step, tokens/s, peak memory, graphs compiled while
#   timed; `medium-r8` at 524,288; the matrix-optimizer step alone for muon and normuon; beside each stage the
#   record's 8-GPU step time and our 1-GPU time / 8 (an estimate without communication), and an estimated 8-GPU
#   wall-clock of medium. Writes OUT_DIR/timing.json and profile.txt (torch.profiler, 2 steps at 524K); OUT_DIR
#   defaults to records/gpu_checks/<date>_medium_timing_<gpu>. GPU_TIMING_ARGS="..." adds bench/gpu_timing.py
#   flags (e.g. "--steps 10" to fit a shorter limit).
#
# Environment:
#   GPU_MEDIUM_CPU=1       rehearse the same script on the CPU before the GPU call: a d=64 model with the medium-tiny
#                          batch sizes and windows, no compile, 2 warm-up steps (default OUT_DIR: a temp dir)
#   GPU_MEDIUM_TIMEOUT=S   time limit of the training run in seconds (default 270, timing 480; 900 for the
#                          rehearsal); the smoke summary is written anyway
#   GPU_MEDIUM_ARGS="..."  extra train_gpt.py flags, appended last (e.g. "--optimizer muon")
set -uo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
if [ "$mode" != "smoke" ] && [ "$mode" != "timing" ]; then
  echo "usage: bash bench/gpu_medium.sh smoke|timing [OUT_DIR]" >&2
  exit 2
fi
if ! ls data/demo/demo_train_*.bin data/demo/demo_val_*.bin > /dev/null 2>&1; then
  echo "error: no demo data in data/demo/; run python data/prepare_demo_data.py first (or copy data/demo/ here)" >&2
  exit 2
fi

cpu=${GPU_MEDIUM_CPU:-0}
limit=${GPU_MEDIUM_TIMEOUT:-270}
[ "$mode" = "timing" ] && limit=${GPU_MEDIUM_TIMEOUT:-480}  # 5 compiled graphs, then about 2.5 min of timed steps
[ "$cpu" = "1" ] && limit=${GPU_MEDIUM_TIMEOUT:-900}  # the rehearsal is slower on a shared CPU; the limit is for GPU time
if [ "$cpu" = "1" ]; then
  device=cpu-rehearsal
  out=${2:-${TMPDIR:-/tmp}/gpu_medium_${mode}_cpu}
else
  device=$(python3 -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', re.sub(r'^nvidia ', '', torch.cuda.get_device_name(0).lower())).strip('-') if torch.cuda.is_available() else 'nogpu')")
  if [ "$device" = "nogpu" ]; then
    echo "error: torch sees no CUDA device; for a CPU rehearsal set GPU_MEDIUM_CPU=1" >&2
    exit 2
  fi
  out=${2:-records/gpu_checks/$(date +%Y-%m-%d)_medium_${mode}_${device}}
fi
mkdir -p "$out"

if [ "$mode" = "timing" ]; then
  size=full
  [ "$cpu" = "1" ] && size=cpu
  # shellcheck disable=SC2206
  timing=(--out "$out" --size "$size" --profile ${GPU_TIMING_ARGS:-})
  [ "$cpu" = "1" ] && timing=(--out "$out" --size cpu --steps 2 --warmup 1 --profile ${GPU_TIMING_ARGS:-})
  echo "python bench/gpu_timing.py ${timing[*]}"
  export PYTHONUNBUFFERED=1
  timeout "$limit" python3 bench/gpu_timing.py "${timing[@]}" 2>&1 | tee "$out/console.txt"
  code=${PIPESTATUS[0]}
  echo "gpu_timing.py exit code: $code (124: stopped by the ${limit}s limit)"
  exit "$code"
fi

args=(--preset medium --train-files 'data/demo/demo_train_*.bin' --val-files 'data/demo/demo_val_*.bin'
      --num-iterations 30 --extension-steps 2 --momentum-warmup-steps 10 --momentum-cooldown-steps 3
      --batch-tokens 131072 --micro-batch-tokens 65536 --batch-schedule "32768,65536,98304$(printf ',131072%.0s' {1..9})"
      --val-tokens 65536 --val-seq-len 65536 --val-loss-every 30 --warmup-steps 10 --print-every 1
      --max-doc-tokens 65536 --run-id smoke --log-dir "$out")
if [ "$cpu" = "1" ]; then
  args+=(--device cpu --no-compile --model-dim 64 --num-heads 2 --head-dim 32 --window-block 16 --warmup-steps 2
         --batch-tokens 1024 --micro-batch-tokens 512 --batch-schedule "256,512,768$(printf ',1024%.0s' {1..9})"
         --val-tokens 4096 --val-seq-len 1024)
fi
# shellcheck disable=SC2206
args+=(${GPU_MEDIUM_ARGS:-})

rm -f "$out/smoke.txt"
command="python train_gpt.py ${args[*]}"
echo "$command"
export PYTHONUNBUFFERED=1
timeout "$limit" python3 train_gpt.py "${args[@]}" 2>&1 | tee "$out/console.txt"
code=${PIPESTATUS[0]}
echo "train_gpt.py exit code: $code (124: stopped by the ${limit}s limit)"
python3 bench/gpu_medium_report.py --log "$out/smoke.txt" --exit-code "$code" --out "$out/summary.json" \
  --command "$command"
