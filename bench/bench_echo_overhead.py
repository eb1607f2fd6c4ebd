"""Per-step cost of each SpectralEcho mode against Muon on the hidden matrices of a preset (one process).

    python bench/bench_echo_overhead.py                     # CPU: the cpu-tiny matrices
    python bench/bench_echo_overhead.py --preset medium     # CUDA: all medium-track matrices on one GPU

Timings of optimizer.step() on the same gradients (median ms):
    muon                    Muon
    <mode>_apply            an ordinary step of the mode with an estimate in place:
                              fit          soft sign (augmented polar) + msign for the floor + power iteration
                              plateau      soft sign (augmented polar) + power iteration, times rho
                              reverb_svd   a full SVD of every matrix (the user's update)
    <mode>_fit              a fit step with K micro-batch replicates: recording them (K add_replicate_gradients
                            calls) and the mode's estimate (fit: group sums, an SVD per matrix, bin sums, fits;
                            plateau: squared norms only; reverb_svd: K SVDs per matrix and the reverb), plus its
                            update
amortised overhead per step = apply + (fit - apply) / fit_every - muon; the user's optimizer estimates every step
(reverb_svd with fit_every = 1: its cost is the fit figure). One device holds every matrix here; in an 8-rank run
each rank updates about 1/8 of them.
Results go to --out (default bench/results/echo_overhead_<device>.json) with the device, versions and load.
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
    "toy": [(2, (2, 16, 16)), (2, (32, 16))],  # a smoke test of the script itself
}
MODE_ARGS = {  # the estimate in place on apply steps: a fixed curve (fit), rho from a first fit step (others)
    "fit": dict(c_rel=1e-2, r0=0.1),
    "plateau": dict(),
    "reverb_svd": dict(),
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


def fit_step_fn(opt, params, replicates: int):
    """A fit step: K micro-steps' gradients recorded as replicates, then step()."""
    def fit_step():
        for _ in range(replicates):  # the gradient of each micro-step (values do not matter for timing)
            for p in params:
                p.grad.mul_(1.0001)
            opt.add_replicate_gradients()
        opt.step()
    return fit_step


def time_mode(mode: str, params, hyper: dict, replicates: int, device, reps: int) -> dict:
    """{apply_ms, fit_ms} of one mode: apply steps after a first fit step, and fit steps every step."""
    from optimizers.spectral_echo import SpectralEcho

    apply_opt = SpectralEcho(params, mode=mode, fit_every=10 ** 9, **MODE_ARGS[mode], **hyper)
    fit_step_fn(apply_opt, params, replicates)()  # step 0 is the fit step: it leaves an estimate (or a fixed curve)
    apply_opt.step()  # warm-up of the apply path
    apply_ms = timed(apply_opt.step, device, reps)
    fit_opt = SpectralEcho(params, mode=mode, fit_every=1, **hyper)
    step = fit_step_fn(fit_opt, params, replicates)
    step()
    return {"apply_ms": apply_ms, "fit_ms": timed(step, device, reps)}


def main(argv=None) -> dict:
    from bench.bench_msign import device_info
    from optimizers.muon import Muon

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESET_SHAPES), default=None,
                        help="matrix set (default: medium on CUDA, cpu-tiny otherwise)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--modes", default="fit,plateau,reverb_svd", help="comma-separated SpectralEcho modes")
    parser.add_argument("--replicates", type=int, default=8, help="micro-batch replicates on a fit step (K)")
    parser.add_argument("--fit-every", type=int, default=50, help="steps between fits, for the amortised figure")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per figure (default 10 CUDA, 3 CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 gives steadier CPU timings on a shared machine)")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODE_ARGS]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {sorted(MODE_ARGS)}")
    if args.replicates < 4:
        parser.error("--replicates must be >= 4 (the fit mode's atom group of 2 and two probe groups)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("medium" if device.type == "cuda" else "cpu-tiny")
    reps = args.reps or (10 if device.type == "cuda" else 3)

    hyper = dict(lr=0.02, momentum=0.95, weight_decay=0.0)
    params = make_params(preset, device)
    set_grads(params, 1)
    muon = Muon(params, **hyper)
    muon.step()  # warm-up: lazy state, kernel compilation
    results = {"muon_ms": timed(muon.step, device, reps)}
    for mode in modes:
        t = time_mode(mode, params, hyper, args.replicates, device, reps)
        results[f"{mode}_apply_ms"], results[f"{mode}_fit_ms"] = t["apply_ms"], t["fit_ms"]
        amortised = t["apply_ms"] + (t["fit_ms"] - t["apply_ms"]) / args.fit_every - results["muon_ms"]
        results[f"{mode}_amortised_overhead_ms"] = amortised
        results[f"{mode}_amortised_overhead_rel"] = amortised / results["muon_ms"]
    report = {"preset": preset, "shapes": [[c, list(s)] for c, s in PRESET_SHAPES[preset]], "modes": modes,
              "mode_args": {m: MODE_ARGS[m] for m in modes}, "replicates": args.replicates,
              "fit_every": args.fit_every, "reps": reps, **results, "env": device_info(device),
              "torch_threads": torch.get_num_threads(),
              "load_average_1min": os.getloadavg()[0]}  # CPU timings on a shared machine: note how busy it was
    print(f"{'':>14} {'apply ms':>10} {'fit ms':>10} {'apply/muon':>11} {'fit/muon':>9}")
    print(f"{'muon':>14} {results['muon_ms']:10.2f}")
    for mode in modes:
        a, f = results[f"{mode}_apply_ms"], results[f"{mode}_fit_ms"]
        print(f"{mode:>14} {a:10.2f} {f:10.2f} {a / results['muon_ms']:11.2f} {f / results['muon_ms']:9.2f}")
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
