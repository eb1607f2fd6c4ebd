"""The JSON summary of a bench/gpu_medium.sh run, read from its train_gpt.py log (runlog.parse_log).

    python bench/gpu_medium_report.py --log OUT/smoke.txt --exit-code 0 --out OUT/summary.json --command "..."

Writes losses (train loss per step, val losses), step times (per step, their median and mean after the first
`--skip` timed steps), peak memory, the compile warm-up time, device, torch / triton / Python versions and the
schedule transitions the run crossed; prints a short table. Works on a partial log (a run stopped by its time
limit): `completed` says whether the final validation was reached.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from runlog import parse_log  # noqa: E402

_WARMUP = re.compile(r"^warm-up: (\d+) untimed steps in ([0-9.]+)s")


def device_and_versions() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def summarize(log_path: str, exit_code: int, command: str, skip: int = 2) -> dict:
    log = parse_log(log_path)
    train = sorted((p.step, p.loss, p.train_time_ms) for p in log.train)
    step_ms = [round(b[2] - a[2], 2) for a, b in zip([(0, None, 0.0)] + train, train)]
    steady = step_ms[skip:]
    warmup = None
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            match = _WARMUP.match(line)
            if match:
                warmup = {"steps": int(match.group(1)), "seconds": float(match.group(2))}
    config = log.config or {}
    summary = {
        "check": "medium smoke",
        "command": command,
        "exit_code": exit_code,
        "completed": log.finished and exit_code == 0,
        "steps_done": train[-1][0] if train else 0,
        "total_steps": log.total_steps,
        "train_loss": {str(s): loss for s, loss, _ in train},
        "val_loss": {str(p.step): p.loss for p in log.val},
        "step_ms": step_ms,
        "step_ms_median": round(statistics.median(steady), 2) if steady else None,
        "step_ms_mean": round(statistics.fmean(steady), 2) if steady else None,
        "step_ms_skipped_first": skip,
        "warmup": warmup,
        "peak_memory_allocated_mib": log.peak_memory_allocated_mib,
        "peak_memory_reserved_mib": log.peak_memory_reserved_mib,
        "error": log.exception or (log.error_lines[-1] if log.error_lines else None),
        **device_and_versions(),
        "config": {k: config.get(k) for k in ("preset", "optimizer", "num_iterations", "extension_steps",
                                               "batch_schedule", "batch_tokens", "micro_batch_tokens", "compile",
                                               "device", "model_dim", "num_layers")},
    }
    if config:
        from config import Hyperparameters
        from schedules import transition_steps, untie_step

        cfg = Hyperparameters(**config)
        summary["transition_steps"] = transition_steps(cfg)
        summary["untie_step"] = untie_step(cfg)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", required=True, help="the train_gpt.py log of the run")
    parser.add_argument("--exit-code", type=int, required=True, help="exit code of the run (124: time limit)")
    parser.add_argument("--out", required=True, help="path of the JSON summary to write")
    parser.add_argument("--command", default="", help="the command that ran, for the record")
    parser.add_argument("--skip", type=int, default=2, help="timed steps left out of the step-time statistics")
    args = parser.parse_args(argv)
    if not os.path.exists(args.log):
        print(f"error: no log at {args.log}: the run did not start (see its console output)", file=sys.stderr)
        summary = {"check": "medium smoke", "command": args.command, "exit_code": args.exit_code, "completed": False,
                   "error": "no log written", **device_and_versions()}
    else:
        summary = summarize(args.log, args.exit_code, args.command, args.skip)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{'device':<28}{summary.get('device')}")
    print(f"{'torch / triton':<28}{summary.get('torch')} / {summary.get('triton')}")
    for key in ("completed", "exit_code", "steps_done", "step_ms_median", "peak_memory_allocated_mib", "warmup",
                "val_loss", "error"):
        print(f"{key:<28}{summary.get(key)}")
    print(f"summary written to {args.out}")
    return 0 if summary.get("completed") else 1


if __name__ == "__main__":
    sys.exit(main())
