"""Per-step overhead of SpectralEcho over Muon on the hidden matrices of a preset (one process).

    python bench/bench_echo_overhead.py                     # CPU: the cpu-tiny matrices
    python bench/bench_echo_overhead.py --preset medium     # CUDA: all medium-track matrices on one GPU

Three timings of optimizer.step() on the same gradients:
    muon        Muon
    echo_apply  SpectralEcho on an ordinary step: soft sign via the augmented polar + power iteration
    echo_fit    SpectralEcho on a fit step with K micro-batch replicates: recording them
                (K add_replicate_gradients calls), group sums, SVD of every matrix, bin sums, fits
amortised overhead per step = echo_apply + (echo_fit - echo_apply) / fit_every - muon.
One GPU holds every matrix here; in an 8-rank run each rank updates about 1/8 of them.
Results go to --out (default bench/results/echo_overhead_<device>.json) with the device and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

PRESET_SHAPES = {
    # (count, shape): hidden matrices of train_gpt's presets
    "cpu-tiny": [(4, (4, 128, 128)), (4, (512, 128)), (4, (128, 512))],
    "medium": [(15, (4, 1024, 1024)), (16, (4096, 1024)), (16, (1024, 4096))],
}


def make_params(preset: str, device: torch.device) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(device) * 0.02)
            for count, shape in PRESET_SHAPES[preset] for _ in range(count)]


def set_grads(params, seed: int) -> None:
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=p.device) * 1e-3


def timed(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of fn() over reps calls (synchronised on CUDA)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> dict:
    from bench.bench_msign import device_info
    from optimizers.muon import Muon
    from optimizers.spectral_echo import SpectralEcho

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESET_SHAPES), default=None,
                        help="matrix set (default: medium on CUDA, cpu-tiny otherwise)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--replicates", type=int, default=8, help="micro-batch replicates on a fit step (K)")
    parser.add_argument("--fit-every", type=int, default=50, help="steps between fits, for the amortised figure")
    parser.add_argument("--c-rel", type=float, default=1e-2, help="soft-sign constant on the apply steps")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per figure (default 10 CUDA, 3 CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 gives steadier CPU timings on a shared machine)")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.replicates < 4:
        parser.error("--replicates must be >= 4 (atom group of 2 and two probe groups)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("medium" if device.type == "cuda" else "cpu-tiny")
    reps = args.reps or (10 if device.type == "cuda" else 3)

    hyper = dict(lr=0.02, momentum=0.95, weight_decay=0.0)
    params = make_params(preset, device)
    set_grads(params, 1)
    results = {}

    muon = Muon(params, **hyper)
    muon.step()  # warm-up: lazy state, kernel compilation
    results["muon_ms"] = timed(muon.step, device, reps)

    apply_opt = SpectralEcho(params, c_rel=args.c_rel, **hyper)
    apply_opt.step()
    results["echo_apply_ms"] = timed(apply_opt.step, device, reps)

    fit_opt = SpectralEcho(params, fit_every=1, **hyper)

    def fit_step():
        for _ in range(args.replicates):  # the gradient of each micro-step (values do not matter for timing)
            for p in params:
                p.grad.mul_(1.0001)
            fit_opt.add_replicate_gradients()
        fit_opt.step()

    fit_step()
    results["echo_fit_ms"] = timed(fit_step, device, reps)
    record_opt = SpectralEcho(params, fit_every=1, **hyper)

    def record_only():
        for _ in range(args.replicates):
            record_opt.add_replicate_gradients()
        record_opt._micro.clear()
        record_opt._micro_total.clear()

    results["record_replicates_ms"] = timed(record_only, device, reps)
    results["amortised_overhead_ms"] = (results["echo_apply_ms"] + (results["echo_fit_ms"] - results["echo_apply_ms"])
                                        / args.fit_every - results["muon_ms"])
    results["amortised_overhead_rel"] = results["amortised_overhead_ms"] / results["muon_ms"]
    report = {"preset": preset, "shapes": [[c, list(s)] for c, s in PRESET_SHAPES[preset]],
              "replicates": args.replicates, "fit_every": args.fit_every, "c_rel": args.c_rel, "reps": reps,
              **results, "env": device_info(device),
              "load_average_1min": os.getloadavg()[0]}  # CPU timings on a shared machine: note how busy it was
    for key, value in results.items():
        print(f"{key:>24}: {value:10.3f}")
    name = report["env"].get("device", device.type).replace(" ", "_").replace("/", "_") or device.type
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"echo_overhead_{name}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
    main()
