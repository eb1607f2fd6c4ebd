"""What the track3 preset costs on one device: step time and peak memory over timed steps after warm-up.

    python bench/track3_step_cost.py --out OUT                   # the full preset on one GPU (bench/gpu_track3.sh)
    python bench/track3_step_cost.py --out OUT --size tiny       # 2 layers, d 64, on a CPU: checks this script

Runs train_gpt.py (the code path of a benchmark run: --preset track3, compile, untimed warm-up steps) on synthetic
token shards, because only timing is measured and FineWeb need not be present; the files are the one change, so the
run is --off-benchmark. Validation runs at step 0 and at the end, on the preset's 10,485,760 val tokens.
Measured, from the log and the moments console lines appear:
  step_ms       (train_time at the last step - train_time at the first timed step) / timed steps; on one GPU a
                step is 8 accumulated micro-batches of 64 x 1024 tokens, the benchmark's 524,288-token batch;
  peak memory   torch.cuda.max_memory_allocated / reserved (the log's last lines);
  val_s         wall time of the final validation (from the last training line to the final val line).
Estimated from those: a full 3250-step run = 3250 step_ms + 38 validations (the preset's cadence) x val_s.
Prints a table and writes OUT/summary.json (with device, torch, CUDA and Triton versions) beside the run's log.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import runlog  # noqa: E402
from config import PRESETS, Hyperparameters, parse_config  # noqa: E402
from schedules import validation_due  # noqa: E402

# size -> (train_gpt flags besides the data files, untimed warm-up steps, steps before timing starts)
SIZES = {
    "full": ([], 5, 2),
    "tiny": (["--num-layers", "2", "--model-dim", "64", "--num-heads", "2", "--head-dim", "32", "--vocab-size", "512",
              "--bos-id", "0", "--seq-len", "64", "--micro-batch-tokens", "256", "--batch-tokens", "512",
              "--val-seq-len", "256", "--val-tokens", "2048", "--device", "cpu", "--no-compile"], 1, 1),
}


def write_synthetic_shards(directory: str, train_tokens: int, val_tokens: int, vocab: int) -> tuple[str, str]:
    """Uniform random token ids in the shard format (timing does not depend on the text)."""
    from data.shards import write_shard

    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    write_shard(os.path.join(directory, "syn_val_000000.bin"), rng.integers(0, vocab, val_tokens, dtype=np.uint16))
    write_shard(os.path.join(directory, "syn_train_000001.bin"), rng.integers(0, vocab, train_tokens, dtype=np.uint16))
    return os.path.join(directory, "syn_train_*.bin"), os.path.join(directory, "syn_val_*.bin")


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
            f"CPU {platform.machine()}, {os.cpu_count()} cores"}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def run(out: str, size: str, timed_steps: int) -> dict:
    flags, warmup, skip = SIZES[size]
    cfg = parse_config(["--preset", "track3", *flags])
    steps = skip + timed_steps
    data = os.path.join(out, "shards")
    train_files, val_files = write_synthetic_shards(data, (steps + warmup + 2) * cfg.batch_tokens + 1,
                                                    cfg.val_tokens + 1, min(cfg.vocab_size, 50257))
    run_id = f"track3_{size}"
    args = ["--preset", "track3", "--off-benchmark", *flags, "--train-files", train_files, "--val-files", val_files,
            "--num-iterations", str(steps), "--val-loss-every", "0", "--val-loss-every-late", "0",
            "--warmup-steps", str(warmup), "--print-every", "1", "--run-id", run_id, "--log-dir", out]
    command = [sys.executable, os.path.join(ROOT, "train_gpt.py"), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    seen = []  # (seconds since start, console line)
    start = time.perf_counter()
    with open(os.path.join(out, "console.txt"), "w") as console:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:
            seen.append((time.perf_counter() - start, line.rstrip("\n")))
            console.write(line)
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"train_gpt.py exited with {code}; see {os.path.join(out, 'console.txt')}")
    log = runlog.parse_log(runlog.log_path(out, run_id))
    times = {p.step: p.train_time_ms for p in log.train}
    step_ms = (times[steps] - times[skip]) / timed_steps
    last_train = max(t for t, line in seen if line.startswith(f"step:{steps}/{steps} train_loss"))
    final_val = max(t for t, line in seen if line.startswith(f"step:{steps}/{steps} val_loss"))
    val_s = final_val - last_train
    params = next(float(m.group(1)) for _, line in seen if (m := re.match(r"model: ([\d.]+)M parameters", line)))
    full = Hyperparameters(**PRESETS["track3"])
    validations = sum(validation_due(full, s) for s in range(full.num_iterations + 1))
    train_h, val_h = full.num_iterations * step_ms / 3.6e6, validations * val_s / 3600
    return {
        "size": size, **environment(), "world_size": 1, "command": " ".join(command[1:]),
        "model": {"layers": cfg.num_layers, "d": cfg.model_dim, "vocab": cfg.vocab_size, "parameters_m": params},
        "batch_tokens": cfg.batch_tokens, "micro_batch_tokens": cfg.micro_batch_tokens,
        "accumulation_steps": cfg.batch_tokens // cfg.micro_batch_tokens, "warmup_steps": warmup,
        "timed_steps": timed_steps, "timed_from_step": skip,
        "step_ms": step_ms, "tokens_per_s": cfg.batch_tokens / step_ms * 1000,
        "step_ms_each": [times[s] - times[s - 1] for s in range(skip + 1, steps + 1)],
        "peak_memory_allocated_mib": log.peak_memory_allocated_mib,
        "peak_memory_reserved_mib": log.peak_memory_reserved_mib,
        "val_tokens": cfg.val_tokens, "val_s": val_s,
        "estimate_full_run": {"steps": full.num_iterations, "validations": validations,
                              "training_h": train_h, "validation_h": val_h, "total_h": train_h + val_h,
                              "note": "estimate: measured step_ms and val_s times the preset's step and val counts"},
        "final_train_loss": log.train[-1].loss, "log": os.path.basename(log.path),
        "wall_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (log, console, summary.json)")
    parser.add_argument("--size", choices=sorted(SIZES), default=os.environ.get("TRACK3_SIZE", "full"),
                        help="full: the preset (one GPU); tiny: 2 layers, d 64 on a CPU (default: $TRACK3_SIZE, "
                             "else full)")
    parser.add_argument("--timed-steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.timed_steps < 1:
        parser.error("--timed-steps must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    summary = run(args.out, args.size, args.timed_steps)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    est = summary["estimate_full_run"]
    rows = [["device", summary["device"]], ["torch / triton", f"{summary['torch']} / {summary['triton']}"],
            ["step (ms), mean of timed steps", f"{summary['step_ms']:.1f}"],
            ["tokens/s", f"{summary['tokens_per_s']:,.0f}"],
            ["peak memory allocated / reserved (MiB)",
             f"{summary['peak_memory_allocated_mib']} / {summary['peak_memory_reserved_mib']}"],
            ["one validation (s)", f"{summary['val_s']:.1f}"],
            [f"estimate: {est['steps']} steps + {est['validations']} validations (h)",
             f"{est['training_h']:.2f} + {est['validation_h']:.2f} = {est['total_h']:.2f}"]]
    print(runlog.format_table(["track3 on one device", f"size {args.size}"], rows))
    print(f"wrote {os.path.join(args.out, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
