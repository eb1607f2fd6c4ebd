"""Stress the test suite's 2-rank gloo launches (issue 15): each one N times in a row, idle and under CPU load.

    python bench/stress_dist.py                          # 30 runs of every command, idle
    python bench/stress_dist.py --load 2                 # 30 runs beside 2 CPU-bound processes (started here)
    python bench/stress_dist.py --load 0 2 --runs 30     # both, one table
    python bench/stress_dist.py --gil-delay-ms 30        # issue 15's exit race forced (gcc, Linux; see below)
    python bench/stress_dist.py --repo /tmp/old-checkout # the same launches against another checkout

The commands are the suite's own `python -m torch.distributed.run --standalone --nproc_per_node=2` launches:
    optimizers     tests/dist_optim_worker.py, test_optimizers.py's scenarios
    spectral_ord   tests/dist_optim_worker.py, test_spectral_ord.py's scenarios
    spectral_echo  tests/test_spectral_echo.py as the worker
    train_gpt      train_gpt.py, test_train_gpt.py's 2-process run (synthetic shards)
with the arguments taken from the test modules of this checkout. Runs go round-robin over the commands, so a
change in the machine's load falls on all of them alike. A run fails when torchrun exits non-zero; failures are
split into aborts (SIGABRT / "terminate called", the signature of issue 15), timeouts and other errors.
Not part of the test suite: it takes about N x (sum of the four launch times) per load level.

--gil-delay-ms N preloads bench/gil_delay.c (built with gcc into a temporary folder): a gloo thread asking for
the GIL waits up to N ms, or until the interpreter is finalizing. That is the worst-case scheduling that turns
issue 15 from a one-in-hundreds flake into a frequent failure, so a fix can be told apart from luck.

Prints a table (one row per command and load) and writes JSON with every run (--out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("optimizers", "spectral_ord", "spectral_echo", "train_gpt")


def launch_args(name: str, out_dir: str, data_dir: str) -> list[str]:
    """Script and arguments of the suite's 2-rank launch `name`, relative to the repository root.

    out_dir: a fresh folder for the run's outputs; data_dir: where the synthetic shards are (train_gpt).
    """
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    try:
        if name == "optimizers":
            from test_optimizers import SCENARIOS
            return ["tests/dist_optim_worker.py", out_dir, *SCENARIOS]
        if name == "spectral_ord":
            from test_spectral_ord import TWO_RANK_SCENARIOS
            return ["tests/dist_optim_worker.py", out_dir, *TWO_RANK_SCENARIOS]
        if name == "spectral_echo":
            return ["tests/test_spectral_echo.py", out_dir]
        if name == "train_gpt":
            from test_train_gpt import one_vs_two_process_args
            train_files = os.path.join(data_dir, "syn_train_*.bin")
            val_files = os.path.join(data_dir, "syn_val_*.bin")
            return ["train_gpt.py", *one_vs_two_process_args(train_files, val_files, out_dir), "--run-id", "two"]
    finally:
        del sys.path[:2]
    raise ValueError(f"unknown command {name!r}")


def write_shards(data_dir: str) -> None:
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    try:
        from test_train_gpt import write_synthetic_shards
        write_synthetic_shards(data_dir)
    finally:
        del sys.path[:2]


def build_gil_delay_shim(work_dir: str) -> str:
    """Compile bench/gil_delay.c; returns the .so path. SystemExit(2) when gcc is missing or fails."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("error: --gil-delay-ms needs gcc to build bench/gil_delay.c; install gcc or drop the option")
    out = os.path.join(work_dir, "gil_delay.so")
    proc = subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-o", out, os.path.join(ROOT, "bench", "gil_delay.c"),
                           "-ldl", "-lpthread"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: building bench/gil_delay.c failed:\n{proc.stderr}")
    return out


def classify(returncode: int | None, output: str) -> str:
    """'ok', 'abort' (SIGABRT or std::terminate anywhere in the launch), 'timeout' or 'error'."""
    if returncode is None:
        return "timeout"
    if returncode == 0:
        return "ok"
    if "terminate called" in output or "exitcode: -6" in output or "SIGABRT" in output:
        return "abort"
    return "error"


def gil_delay_counts(output: str) -> dict:
    """With --gil-delay-ms: how many GIL requests of gloo threads were delayed, and how many of them were
    served while the interpreter was finalizing (each of those ends the thread; see bench/gil_delay.c)."""
    lines = [line for line in output.splitlines() if line.startswith("[gil_delay]") and "takes the GIL" in line]
    return dict(gil_delayed=len(lines), gil_in_finalization=sum(line.endswith("finalizing: 1)") for line in lines))


def run_once(argv: list[str], cwd: str, env: dict, timeout: float) -> tuple[int | None, float, str]:
    """(return code or None on timeout, seconds, stdout + stderr) of one launch; a timed-out launch is killed
    with its whole process group (torchrun and both ranks)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        returncode = None
    return returncode, time.perf_counter() - start, output


def start_load(count: int) -> list[subprocess.Popen]:
    """`count` CPU-bound Python processes (busy loops), stopped by stop_load()."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_load(burners: list[subprocess.Popen]) -> None:
    for proc in burners:
        proc.terminate()
    for proc in burners:
        proc.wait()


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["command"], r["load"]) for r in results}, key=lambda k: (k[1], COMMANDS.index(k[0])))
    for command, load in keys:
        runs = [r for r in results if r["command"] == command and r["load"] == load]
        kinds = [r["kind"] for r in runs]
        seconds = [r["seconds"] for r in runs]
        rows.append(dict(command=command, load=load, runs=len(runs), failed=sum(k != "ok" for k in kinds),
                         abort=kinds.count("abort"), timeout=kinds.count("timeout"), error=kinds.count("error"),
                         median_s=round(statistics.median(seconds), 1), max_s=round(max(seconds), 1),
                         gil_delayed=sum(r["gil_delayed"] for r in runs),
                         gil_in_finalization=sum(r["gil_in_finalization"] for r in runs)))
    return rows


def format_table(rows: list[dict], gil_delay: bool) -> str:
    """Markdown table; with gil_delay, two more columns: delayed GIL requests of gloo threads, and how many of
    them were served during interpreter finalization."""
    extra = " delayed GIL requests | ... during finalization |" if gil_delay else ""
    lines = ["| command | load | runs | failed | abort | timeout | error | median s | max s |" + extra,
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gil_delay else "")]
    for r in rows:
        cells = [r["command"], r["load"], r["runs"], r["failed"], r["abort"], r["timeout"], r["error"],
                 r["median_s"], r["max_s"]] + ([r["gil_delayed"], r["gil_in_finalization"]] if gil_delay else [])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="launches of each command per load level (default 30)")
    parser.add_argument("--load", type=int, nargs="+", default=[0],
                        help="CPU-bound processes started beside the launches; several values run one after the "
                             "other (default 0: idle)")
    parser.add_argument("--only", nargs="+", default=list(COMMANDS), metavar="COMMAND",
                        help=f"commands to run (default all: {' '.join(COMMANDS)})")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a launch counts as hung")
    parser.add_argument("--gil-delay-ms", type=int, default=0,
                        help="preload bench/gil_delay.c with this delay (0: off); forces issue 15's race")
    parser.add_argument("--repo", default=ROOT, help="checkout whose scripts are launched (default: this one)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/stress_dist_<time>.json)")
    args = parser.parse_args(argv)
    problems = []
    if args.runs < 1:
        problems.append(f"--runs must be >= 1, got {args.runs}")
    if any(n < 0 for n in args.load):
        problems.append(f"--load takes counts >= 0, got {args.load}")
    unknown = [c for c in args.only if c not in COMMANDS]
    if unknown:
        problems.append(f"--only: unknown command(s) {unknown}; choose from {list(COMMANDS)}")
    if args.timeout <= 0:
        problems.append(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.gil_delay_ms < 0:
        problems.append(f"--gil-delay-ms must be >= 0, got {args.gil_delay_ms}")
    if not os.path.isfile(os.path.join(args.repo, "tests", "dist_optim_worker.py")):
        problems.append(f"--repo {args.repo} is not a checkout of this project (no tests/dist_optim_worker.py)")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    commands = [c for c in COMMANDS if c in args.only]
    work_dir = tempfile.mkdtemp(prefix="stress_dist_")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if args.gil_delay_ms:
        env.update(LD_PRELOAD=build_gil_delay_shim(work_dir), GIL_DELAY_MAX_MS=str(args.gil_delay_ms))
    data_dir = os.path.join(work_dir, "shards")
    os.makedirs(data_dir)
    write_shards(data_dir)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    results: list[dict] = []
    started = datetime.datetime.now()
    try:
        for load in args.load:
            burners = start_load(load)
            try:
                for i in range(args.runs):
                    for name in commands:
                        out_dir = tempfile.mkdtemp(prefix=f"{name}_", dir=work_dir)
                        argv_run = [*launcher, *launch_args(name, out_dir, data_dir)]
                        returncode, seconds, output = run_once(argv_run, args.repo, env, args.timeout)
                        kind = classify(returncode, output)
                        results.append(dict(command=name, load=load, run=i, returncode=returncode,
                                            seconds=round(seconds, 2), kind=kind, **gil_delay_counts(output),
                                            tail=output[-3000:] if kind != "ok" else ""))
                        shutil.rmtree(out_dir, ignore_errors=True)
                        print(f"load {load} run {i + 1}/{args.runs} {name}: {kind} ({seconds:.1f} s)", flush=True)
            finally:
                stop_load(burners)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    rows = summarize(results)
    table = format_table(rows, gil_delay=args.gil_delay_ms > 0)
    print(table)
    import torch
    report = dict(
        started=started.isoformat(timespec="seconds"),
        finished=datetime.datetime.now().isoformat(timespec="seconds"),
        argv=sys.argv if argv is None else ["bench/stress_dist.py", *argv],
        repo=os.path.abspath(args.repo), runs=args.runs, loads=args.load, gil_delay_ms=args.gil_delay_ms,
        commands={name: " ".join([*launcher[1:], *launch_args(name, "OUT_DIR", "SHARDS")]) for name in commands},
        versions=dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform()),
        cpu_count=os.cpu_count(), summary=rows, table=table, results=results,
    )
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   f"stress_dist_{started.strftime('%Y%m%d_%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
