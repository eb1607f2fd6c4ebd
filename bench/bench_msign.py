"""Time msign on the per-rank stacks of the medium track: torch eager, torch.compile, Triton.

    python bench/bench_msign.py                 # CUDA: medium-track stacks and a few others
    python bench/bench_msign.py --gpu-check     # also accuracy checks on the device, same JSON
    python bench/bench_msign.py --cpu           # small shapes, Triton in its CPU interpreter

Without CUDA the CPU mode is chosen automatically. Results go to --out (default
bench/results/msign_<device>.json) with the device name and the torch / triton versions.

FLOP counts per Polar Express iteration on an m x n matrix (m <= n), from the speedrun notes:
    full       4 m^2 n + 2 m^3   (X X^T, A A, B X as plain products)
    symmetric  3 m^2 n + m^3     (one triangle of X X^T and of A A: the work the Triton kernels do)
"TFLOP/s" uses the full count for every backend, so the columns compare time directly. The floor
is the symmetric count at the plain bf16 matmul rate measured in the same run (torch.mm of a
large square); "x floor" = time / floor. "x floor(full)" is the same for the full count.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback

import torch

# Per-rank stacks of the medium track (16 layers, d=1024, 8 ranks): 60 attention matrices
# 1024x1024 -> 8 per rank; 16 MLP c_fc 4096x1024 and 16 c_proj 1024x4096 -> 2 each per rank.
MEDIUM_SHAPES = [(8, 1024, 1024), (2, 4096, 1024), (2, 1024, 4096)]
EXTRA_GPU_SHAPES = [(1, 1024, 1024), (60, 1024, 1024), (4, 768, 3072), (2, 2048, 2048)]
CPU_SHAPES = [(2, 48, 80), (1, 80, 48)]
# triton: the default msign path (CUDA graph per shape); triton_eager: same kernels launched one by
# one; torch_compile_cudagraphs: torch.compile(mode="reduce-overhead"), opt-in (long compile).
BACKENDS = ("torch", "torch_compile", "triton", "triton_eager", "torch_compile_cudagraphs")
DEFAULT_BACKENDS = ("torch", "torch_compile", "triton", "triton_eager")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'8x1024x1024,2x4096x1024' -> [(8, 1024, 1024), (2, 4096, 1024)] (batch x rows x cols)."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {item!r} must look like BATCHxROWSxCOLS, e.g. 8x1024x1024")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def shape_name(shape) -> str:
    return "x".join(str(s) for s in shape)


def flop_counts(shape, steps: int) -> tuple[float, float]:
    """(full, symmetric) FLOPs of `steps` iterations on a (B, rows, cols) stack."""
    batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    full = batch * steps * (4 * m * m * n + 2 * m ** 3)
    sym = batch * steps * (3 * m * m * n + m ** 3)
    return float(full), float(sym)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2 ** 30, 1))
    else:
        info.update(device=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
                    triton_interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    return info


def time_call(fn, inputs: list, device: torch.device, warmup: int, reps: int, rounds: int = 5) -> dict:
    """Milliseconds per call of fn(x), x cycling through `inputs`.

    ms: back-to-back calls (steady-state throughput), median over `rounds` rounds of `reps` calls.
    ms_isolated: median of single calls started on an idle device (adds launch latency).
    host_ms: host time to issue one call (CPU-side overhead of the launches).
    """
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    _sync(device)
    per_round, host = [], []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for i in range(reps):
                fn(inputs[i % len(inputs)])
            host.append((time.perf_counter() - t0) * 1e3 / reps)
            end.record()
            torch.cuda.synchronize(device)
            per_round.append(start.elapsed_time(end) / reps)
        else:
            t0 = time.perf_counter()
            for i in range(reps):
                fn(inputs[i % len(inputs)])
            per_round.append((time.perf_counter() - t0) * 1e3 / reps)
            host.append(per_round[-1])
    isolated = []
    for i in range(reps):
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(inputs[i % len(inputs)])
            end.record()
            torch.cuda.synchronize(device)
            isolated.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            isolated.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(per_round), "ms_isolated": statistics.median(isolated),
            "host_ms": statistics.median(host)}


def measure_matmul_tflops(device: torch.device) -> dict:
    """Plain matmul rate of this device: torch.mm of a large square (bf16 on CUDA, fp32 on CPU)."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = 512, torch.float32, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_call(lambda x: torch.mm(a, x, out=out), [b], device, warmup=3, reps=reps, rounds=3)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "ms": t["ms"], "tflops": 2 * n ** 3 / (t["ms"] * 1e-3) / 1e12}


def make_backend(name: str, steps: int):
    """Callable G -> msign(G) for one backend name (built lazily: compile only when asked)."""
    import kernels

    if name == "torch":
        return lambda G: kernels.msign_reference(G, steps)
    if name in ("torch_compile", "torch_compile_cudagraphs"):
        import torch._dynamo as dynamo

        for knob in ("recompile_limit", "cache_size_limit"):  # one compiled graph per shape
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, 64)
        mode = "reduce-overhead" if name == "torch_compile_cudagraphs" else None
        compiled = torch.compile(kernels.msign_reference, dynamic=False, mode=mode)
        return lambda G: compiled(G, steps)
    if name == "triton":
        return lambda G: kernels.msign(G, steps, backend="triton")
    if name == "triton_eager":
        from kernels import triton_polar

        coeffs = kernels.polar_express_coeffs(steps)
        return lambda G: triton_polar.polar_iterate(G, coeffs, cuda_graph=False)
    raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")


def run_timing(shapes, backends, device, steps, dtype, reps, mm_rate_tflops, on_progress=None) -> tuple[list, list]:
    results, errors = [], []
    fns = {}
    for name in backends:
        try:
            fns[name] = make_backend(name, steps)
        except Exception as exc:  # a broken backend must not stop the others
            errors.append({"backend": name, "stage": "build", "error": repr(exc), "traceback": traceback.format_exc()})
    for shape in shapes:
        gen = torch.Generator(device="cpu").manual_seed(hash(shape) % 2 ** 31)
        inputs = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
        full, sym = flop_counts(shape, steps)
        floor_sym_ms = sym / (mm_rate_tflops * 1e12) * 1e3
        floor_full_ms = full / (mm_rate_tflops * 1e12) * 1e3
        for name, fn in fns.items():
            rec = {"shape": shape_name(shape), "backend": name, "steps": steps, "dtype": str(dtype).replace("torch.", ""),
                   "flops_full": full, "flops_sym": sym, "floor_sym_ms": floor_sym_ms, "floor_full_ms": floor_full_ms}
            try:
                t = time_call(fn, inputs, device, warmup=3, reps=reps)
                rec.update(t)
                rec["tflops_full_count"] = full / (t["ms"] * 1e-3) / 1e12
                rec["tflops_sym_count"] = sym / (t["ms"] * 1e-3) / 1e12
                rec["x_floor_sym"] = t["ms"] / floor_sym_ms
                rec["x_floor_full"] = t["ms"] / floor_full_ms
                results.append(rec)
            except Exception as exc:
                errors.append({"backend": name, "shape": rec["shape"], "stage": "time", "error": repr(exc),
                               "traceback": traceback.format_exc()})
            print(f"  timed {rec['shape']:>14} {name:<14} {rec.get('ms', float('nan')):9.3f} ms", flush=True)
        if on_progress is not None:
            on_progress(results, errors)
    return results, errors


def summarize(results, medium_names) -> dict:
    """Per-backend totals over the medium-track set (the per-GPU msign cost of one step)."""
    totals = {}
    for name in BACKENDS:
        recs = [r for r in results if r["backend"] == name and r["shape"] in medium_names]
        if len(recs) == len(medium_names) and recs:
            totals[name] = {"ms": sum(r["ms"] for r in recs), "floor_sym_ms": sum(r["floor_sym_ms"] for r in recs),
                            "floor_full_ms": sum(r["floor_full_ms"] for r in recs)}
    out = {"per_backend": totals}
    if "triton" in totals:
        tri = totals["triton"]["ms"]
        out["triton_x_floor_sym"] = tri / totals["triton"]["floor_sym_ms"]
        if "torch_compile" in totals:
            out["triton_speedup_vs_compile"] = totals["torch_compile"]["ms"] / tri
        if "torch" in totals:
            out["triton_speedup_vs_eager"] = totals["torch"]["ms"] / tri
    return out


def print_table(results, summary, mm) -> None:
    print(f"\nplain matmul: {mm['tflops']:.1f} TFLOP/s ({mm['dtype']} torch.mm {mm['n']}^2)")
    print("TFLOP/s = full count 4m^2n+2m^3 per iteration; floor = symmetric count 3m^2n+m^3 at that rate")
    head = f"{'shape':>14} {'backend':<14} {'ms':>9} {'ms_isol':>9} {'host_ms':>8} {'TFLOP/s':>8} {'x floor':>8} {'x fl(full)':>10}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['shape']:>14} {r['backend']:<14} {r['ms']:9.3f} {r['ms_isolated']:9.3f} {r['host_ms']:8.3f} "
              f"{r['tflops_full_count']:8.3g} {r['x_floor_sym']:8.2f} {r['x_floor_full']:10.2f}")
    for name, tot in summary["per_backend"].items():
        print(f"medium set total {name:<14} {tot['ms']:.3f} ms  (floor {tot['floor_sym_ms']:.3f} ms symmetric, "
              f"{tot['floor_full_ms']:.3f} ms full)")
    for key in ("triton_speedup_vs_compile", "triton_speedup_vs_eager", "triton_x_floor_sym"):
        if key in summary:
            print(f"{key}: {summary[key]:.2f}")


# --------------------------------------------------------------------------------------------
# Accuracy checks (the GPU part the CPU tests cannot reach: compiled kernels, autotuned tiles)
# --------------------------------------------------------------------------------------------

def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _guarded(records: list, name: str, fn) -> None:
    """Run one check; a failure (CUDA error included) becomes a record instead of ending the run."""
    try:
        for rec in fn():
            rec.setdefault("check", name)
            records.append(rec)
    except Exception as exc:
        records.append({"check": name, "ok": False, "error": repr(exc), "traceback": traceback.format_exc()})


def check_kernels(device: torch.device) -> list:
    """Each kernel against float64 torch on odd shapes, wide and tall (strided) operands, NaN-poisoned outputs."""
    from kernels import triton_polar as tp

    small = [(3, 200, 328), (17, 64, 96)] if device.type == "cuda" else [(3, 40, 72)]
    large = [(2, 1000, 1500)] if device.type == "cuda" else []
    recs = []
    gen = torch.Generator(device="cpu").manual_seed(1)
    for dtype, tol, shapes in ((torch.bfloat16, 1e-2, small + large), (torch.float32, 1e-5, small)):
        for B, m, k in shapes:
            for tall in (False, True):
                stored = torch.randn((B, k, m) if tall else (B, m, k), generator=gen).to(device, dtype)
                X = stored.mT if tall else stored  # (B, m, k) view
                X64 = X.double()
                A = torch.full((B, m, m), float("nan"), device=device, dtype=dtype)
                tp.sym_mm(A, X, X)
                ref_a = X64 @ X64.mT
                C = torch.full_like(A, float("nan"))
                tp.sym_mm(C, A, A, alpha=0.7, D=A, beta=-1.3)
                A64 = A.double()
                ref_c = 0.7 * A64 @ A64 + -1.3 * A64
                O = torch.full_like(stored, float("nan"))
                Ow = O.mT if tall else O
                tp.mm(Ow, C, X, alpha=1.0, E=X, beta=2.5)
                ref_o = C.double() @ X64 + 2.5 * X64
                for name, out, ref in (("X X^T", A, ref_a), ("cAA+bA", C, ref_c), ("BX+aX", Ow, ref_o)):
                    err = _rel(out, ref)
                    nan = bool(torch.isnan(out).any())
                    recs.append({"kernel": name, "shape": f"{B}x{m}x{k}", "tall": tall,
                                 "dtype": str(dtype).replace("torch.", ""), "rel_err": err, "tol": tol,
                                 "unwritten_nan": nan, "ok": (err <= tol) and not nan})
    return recs


def _svals(t: torch.Tensor) -> dict:
    s = torch.linalg.svdvals(t.float())
    q = torch.quantile(s.flatten().cpu(), torch.tensor([0.0, 0.01, 0.5, 1.0], dtype=s.dtype))
    return {"min": q[0].item(), "p01": q[1].item(), "median": q[2].item(), "max": q[3].item()}


def check_msign(device: torch.device, shapes, steps: int) -> list:
    """Triton msign (bf16 iterates) against a float64 run of the same recurrence, and against torch bf16."""
    import kernels

    recs = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for shape in shapes:
        gen = torch.Generator(device="cpu").manual_seed(7)
        G = torch.randn(shape, generator=gen).to(device, dtype)
        ref = kernels.msign_reference(G.double(), steps, compute_dtype=torch.float64)
        tri = kernels.msign(G, steps, backend="triton")
        tor = kernels.msign_reference(G, steps)
        err_tri, err_tor = _rel(tri, ref), _rel(tor, ref)
        recs.append({
            "shape": shape_name(shape), "dtype": str(dtype).replace("torch.", ""),
            "triton_vs_f64_max_abs": (tri.double() - ref).abs().max().item(), "triton_vs_f64_rel": err_tri,
            "torch_vs_f64_max_abs": (tor.double() - ref).abs().max().item(), "torch_vs_f64_rel": err_tor,
            "triton_vs_torch_max_abs": (tri.double() - tor.double()).abs().max().item(),
            "triton_vs_torch_rel": _rel(tri, tor),
            "svals_triton": _svals(tri), "svals_f64_reference": _svals(ref),
            "nan": bool(torch.isnan(tri).any()),
            "ok": (not bool(torch.isnan(tri).any())) and err_tri <= max(2 * err_tor, 2e-2),
        })
    return recs


def check_spectral(device: torch.device) -> list:
    """soft_msign and gram_poly (Triton) against SVD-based float64 references, wide and tall."""
    import kernels

    shape = (2, 512, 1536) if device.type == "cuda" else (2, 24, 56)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-3
    recs = []
    gen = torch.Generator(device="cpu").manual_seed(3)
    for tall in (False, True):
        G = torch.randn(shape, generator=gen).to(device, dtype)
        if tall:
            G = G.mT.contiguous()
        U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        mean_s2 = (S ** 2).mean().item()
        for rel_c in (0.01, 0.1, 1.0):
            c = rel_c * mean_s2
            out = kernels.soft_msign(G, c, backend="triton")
            ref = U @ torch.diag_embed(S / torch.sqrt(S ** 2 + c)) @ Vh
            err = _rel(out, ref)
            recs.append({"function": "soft_msign", "c_over_mean_s2": rel_c, "shape": shape_name(G.shape),
                         "rel_err": err, "tol": tol, "ok": err <= tol})
        scale = S.max().item()
        Gn = G / scale  # singular values in (0, 1]
        coeffs = (1.0, -0.8, 0.3)
        out = kernels.gram_poly(Gn, coeffs, backend="triton")
        s = S / scale
        ref = U @ torch.diag_embed(s * (coeffs[0] + coeffs[1] * s ** 2 + coeffs[2] * s ** 4)) @ Vh
        err = _rel(out, ref)
        recs.append({"function": "gram_poly", "coeffs": coeffs, "shape": shape_name(G.shape), "rel_err": err,
                     "tol": tol, "ok": err <= tol})
    return recs


def run_checks(device: torch.device, shapes, steps: int) -> dict:
    checks: list = []
    _guarded(checks, "kernels", lambda: check_kernels(device))
    _guarded(checks, "msign", lambda: check_msign(device, shapes, steps))
    _guarded(checks, "spectral", lambda: check_spectral(device))
    failed = [c for c in checks if not c.get("ok", False)]
    return {"all_ok": not failed, "n_checks": len(checks), "n_failed": len(failed), "records": checks}


def default_out_path(info: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", str(info.get("device", "cpu")).lower()).strip("_") or "cpu"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"msign_{slug}.json")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on CPU with small shapes (default without CUDA)")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="BATCHxROWSxCOLS list, comma separated (default: medium-track stacks and a few others)")
    parser.add_argument("--steps", type=int, default=5, help="Polar Express iterations")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="input dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--reps", type=int, default=None, help="calls per timing round (default 20 CUDA, 2 CPU)")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help=f"comma-separated subset of {BACKENDS}")
    parser.add_argument("--no-timing", action="store_true", help="skip timing (with --gpu-check: checks only)")
    parser.add_argument("--gpu-check", action="store_true",
                        help="also check accuracy on this device: each kernel vs float64, Triton msign vs a float64 "
                             "and a torch run, soft_msign / gram_poly vs SVD (works on CPU too, small shapes)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/msign_<device>.json)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            parser.error(f"unknown backend {b!r}; choose from {BACKENDS}")

    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    if not use_cuda:
        # Triton kernels run in the CPU interpreter; the flag is read when the kernels are first built.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if use_cuda else torch.float32)
    shapes = args.shapes or (MEDIUM_SHAPES + EXTRA_GPU_SHAPES if use_cuda else CPU_SHAPES)
    reps = args.reps or (20 if use_cuda else 2)

    info = device_info(device)
    print(f"device: {info['device']}  torch {info['torch']}  triton {info['triton']}", flush=True)
    report = {"info": info, "steps": args.steps, "shapes": [shape_name(s) for s in shapes],
              "flop_count_note": "tflops_full_count uses 4m^2n+2m^3 per iteration (m<=n); the floor uses the "
                                 "symmetric count 3m^2n+m^3 at the measured plain matmul rate (floor_sym_ms); "
                                 "floor_full_ms uses the full count",
              "errors": []}
    try:
        mm = measure_matmul_tflops(device)
    except Exception as exc:
        mm = {"tflops": float("nan"), "error": repr(exc)}
    report["matmul"] = mm
    out = args.out or default_out_path(info)
    if not args.no_timing:
        def progress(results_so_far, errors_so_far):
            save_report({**report, "partial_results": results_so_far, "partial_errors": errors_so_far}, out)

        results, errors = run_timing(shapes, backends, device, args.steps, dtype, reps, mm["tflops"], progress)
        medium = [shape_name(s) for s in (MEDIUM_SHAPES if use_cuda else CPU_SHAPES)]
        summary = summarize(results, medium)
        report.update(results=results, summary=summary)
        report["errors"] += errors
        print_table(results, summary, mm)
        save_report(report, out)  # keep the timings even if a later part dies
    if args.gpu_check:
        check_shapes = MEDIUM_SHAPES if use_cuda else CPU_SHAPES
        report["checks"] = run_checks(device, check_shapes, args.steps)
        c = report["checks"]
        print(f"\nchecks: {c['n_checks'] - c['n_failed']}/{c['n_checks']} ok")
        for rec in c["records"]:
            if not rec.get("ok", False):
                print("FAILED:", json.dumps({k: v for k, v in rec.items() if k != "traceback"}))
    for err in report["errors"]:
        print(f"ERROR {err.get('backend')} {err.get('shape', '')}: {err['error']}")

    save_report(report, out)
    print(f"wrote {out}")
    return report


def save_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
    main()
