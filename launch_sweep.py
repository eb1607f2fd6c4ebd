"""Expand a sweep spec into train_gpt.py runs and run them through torchrun, packed onto the node's GPUs.

    python launch_sweep.py sweeps/ord_experiment.toml --dry-run     # print every command, run nothing
    python launch_sweep.py sweeps/ord_experiment.toml               # run; re-run later to finish/retry failures

Spec format (TOML, JSON, or a Python file defining a dict SPEC): see records/README.md and the docstring of
`expand_spec`. Each run gets a stable tag `<config>[-<grid values>]-s<seed>`, used as train_gpt's --run-id, so its
log is <log_dir>/<tag>.txt. Beside it the launcher writes <tag>.console.log (torchrun's stdout and stderr) and
<tag>.status.json (command, GPUs, exit code), so a run that dies before opening its log still shows as crashed.
Re-running a spec skips finished runs and restarts the others (the failed log is kept as <tag>.txt.attempt<N>).
One crashed run never stops the others; a summary table is printed at the end.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import runlog

SPEC_KEYS = {
    "name", "log_dir", "gpus_per_run", "max_parallel", "train_script", "env",
    "base", "configs", "grid", "seeds", "repeats", "seed_start",
}
CONFIG_SPECIAL_KEYS = {"tag", "gpus_per_run"}  # keys of a config entry that are not train_gpt flags
LAUNCHER_FLAGS = {"run_id", "log_dir", "seed"}  # set per run by the launcher
_UNSAFE_TAG_CHARS = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass
class RunSpec:
    tag: str
    seed: int
    flags: dict[str, object]  # train_gpt flag name (underscores) -> value; dicts render as "k=v,k=v"
    gpus: int  # processes (GPUs) for this run


@dataclass
class Sweep:
    name: str
    log_dir: str  # absolute
    train_script: str  # absolute
    max_parallel: int | None
    env: dict[str, str]
    runs: list[RunSpec]


# ----------------------------------------------------------------------------------------------- spec expansion


def load_spec(path: str) -> dict:
    """Read a .toml, .json or .py (module-level dict SPEC) spec file into a dict."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise ValueError(f"spec file {path!r} does not exist")
    if ext == ".toml":
        try:
            import tomllib
        except ImportError as exc:  # Python 3.10
            raise ValueError("TOML specs need Python 3.11+ (tomllib); use a .json or .py spec instead") from exc
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    elif ext == ".json":
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    elif ext == ".py":
        spec = runpy.run_path(path).get("SPEC")
        if spec is None:
            raise ValueError(f"{path} defines no module-level dict SPEC; add SPEC = {{...}} with the sweep's keys")
    else:
        raise ValueError(f"unknown spec extension {ext!r} for {path}: use .toml, .json or .py")
    if not isinstance(spec, dict):
        raise ValueError(f"spec {path} must be a table/dict at top level, got {type(spec).__name__}")
    return spec


def _flag_key(key: str) -> str:
    return key.replace("-", "_")


def _set_flag(flags: dict[str, object], key: str, value: object, where: str) -> None:
    """flags[key] = value; a dotted key `a.b` sets entry b of the dict-valued flag a."""
    key = _flag_key(key)
    head, dot, sub = key.partition(".")
    if head in LAUNCHER_FLAGS:
        raise ValueError(f"{where}: {head!r} is set by the launcher for every run; remove it from the spec")
    if not dot:
        flags[key] = dict(value) if isinstance(value, dict) else value
        return
    current = flags.get(head, {})
    if not isinstance(current, dict):
        raise ValueError(f"{where}: {key!r} sets an entry of {head!r}, but {head!r} is {current!r}, not a table")
    flags[head] = {**current, sub: value}


def _format_value(value: object) -> str:
    """Render one flag value (or one entry of a key=value table) as train_gpt.py parses it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ",".join(f"{k}={_format_value(v)}" for k, v in value.items())
    return str(value)


def sanitize_tag(tag: str) -> str:
    return _UNSAFE_TAG_CHARS.sub("_", tag)


def _seeds(spec: dict) -> list[int]:
    if "seeds" in spec and "repeats" in spec:
        raise ValueError("spec sets both 'seeds' and 'repeats': use one (seeds = [..] or repeats = N, seed_start = S)")
    if "repeats" in spec:
        repeats, start = spec["repeats"], spec.get("seed_start", 0)
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"'repeats' must be a positive integer, got {repeats!r}")
        return list(range(start, start + repeats))
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"'seeds' has duplicates: {seeds}")
    return seeds


def expand_spec(spec: dict, spec_path: str = "sweep", *, gpus_per_run: int | None = None,
                log_dir: str | None = None, train_script: str | None = None) -> Sweep:
    """Spec dict -> Sweep with one RunSpec per (config, grid point, seed).

    Keys: name, log_dir (default logs/<name>), gpus_per_run (default 1), max_parallel, train_script, env,
    base (flags for every run), configs (list of {tag, flag overrides, optional gpus_per_run}),
    grid ({flag: [values]}, cartesian product applied on top of each config), seeds ([ints]) or
    repeats (+ seed_start). Flags use Hyperparameters field names (dashes or underscores). The keyword arguments
    override the spec (they come from the command line).
    """
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown spec keys {sorted(unknown)}; valid keys: {sorted(SPEC_KEYS)}")
    name = str(spec.get("name") or os.path.splitext(os.path.basename(spec_path))[0])
    default_gpus = gpus_per_run if gpus_per_run is not None else spec.get("gpus_per_run", 1)
    base = spec.get("base", {})
    grid = spec.get("grid", {})
    configs = spec.get("configs", [{"tag": name}])
    if not isinstance(base, dict) or not isinstance(grid, dict):
        raise ValueError("'base' and 'grid' must be tables (dicts)")
    if not isinstance(configs, list) or not configs:
        raise ValueError("'configs' must be a non-empty list of tables, each with a 'tag'")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid[{key!r}] must be a non-empty list of values, got {values!r}")
    seeds = _seeds(spec)

    base_flags: dict[str, object] = {}
    for key, value in base.items():
        _set_flag(base_flags, key, value, "base")
    runs: list[RunSpec] = []
    for index, config in enumerate(configs):
        if not isinstance(config, dict) or not config.get("tag"):
            raise ValueError(f"configs[{index}] needs a non-empty 'tag' (it names the runs of that config)")
        config_flags = dict(base_flags)
        for key, value in config.items():
            if key not in CONFIG_SPECIAL_KEYS:
                _set_flag(config_flags, key, value, f"configs[{index}]")
        gpus = gpus_per_run if gpus_per_run is not None else config.get("gpus_per_run", default_gpus)
        if not isinstance(gpus, int) or gpus < 1:
            raise ValueError(f"gpus_per_run must be a positive integer, got {gpus!r} (config {config['tag']!r})")
        for point in itertools.product(*grid.values()):
            flags = dict(config_flags)
            parts = [str(config["tag"])]
            for key, value in zip(grid, point):
                _set_flag(flags, key, value, "grid")
                parts.append(f"{_flag_key(key).rpartition('.')[2]}{_format_value(value)}")
            for seed in seeds:
                tag = sanitize_tag("-".join(parts + [f"s{seed}"]))
                runs.append(RunSpec(tag=tag, seed=seed, flags=flags, gpus=gpus))
    tags = [run.tag for run in runs]
    duplicates = sorted({t for t in tags if tags.count(t) > 1})
    if duplicates:
        raise ValueError(f"duplicate run tags {duplicates}: give each config a distinct 'tag'")

    here = os.path.dirname(os.path.abspath(__file__))
    script = train_script or spec.get("train_script") or os.path.join(here, "train_gpt.py")
    max_parallel = spec.get("max_parallel")
    if max_parallel is not None and (not isinstance(max_parallel, int) or max_parallel < 1):
        raise ValueError(f"max_parallel must be a positive integer, got {max_parallel!r}")
    env = {str(k): str(v) for k, v in spec.get("env", {}).items()}
    return Sweep(name=name, log_dir=os.path.abspath(log_dir or spec.get("log_dir") or os.path.join("logs", name)),
                 train_script=os.path.abspath(script), max_parallel=max_parallel, env=env, runs=runs)


# ----------------------------------------------------------------------------------------------- commands


def torchrun_prefix() -> list[str]:
    """torchrun of this Python's environment, else torchrun on PATH, else `python -m torch.distributed.run`."""
    beside = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return [beside]
    return ["torchrun"] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]


def build_command(run: RunSpec, sweep: Sweep, launcher: list[str]) -> list[str]:
    command = [*launcher, "--standalone", f"--nproc_per_node={run.gpus}", sweep.train_script]
    flags = {**run.flags, "run_id": run.tag, "log_dir": sweep.log_dir, "seed": run.seed}
    for key, value in flags.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):  # train_gpt.py booleans are --flag / --no-flag switches
            command.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            command += [f"--{flag}", _format_value(value)]
    return command


def run_env(run: RunSpec, sweep: Sweep, gpu_ids: list[int] | None, threads: int | None) -> dict[str, str]:
    """Environment changes for one run: its GPUs (empty on CPU, so CUDA stays off) and CPU threads."""
    env = dict(sweep.env)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids)) if gpu_ids else ""
    if threads is not None and "OMP_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def detect_gpus() -> list[int]:
    """GPU ids visible to this process (CUDA_VISIBLE_DEVICES order is kept); [] without CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        count = 0
    if visible and count:
        ids = [int(x) for x in visible.split(",") if x.strip().isdigit()]
        return ids[:count]
    return list(range(count))


# ----------------------------------------------------------------------------------------------- scheduling


class GpuPool:
    """Free GPU ids; a run takes the lowest free ids it needs. With no GPUs (CPU) it hands out empty lists."""

    def __init__(self, gpu_ids: list[int]):
        self.free = sorted(gpu_ids)
        self.total = len(gpu_ids)

    def acquire(self, count: int) -> list[int] | None:
        if self.total == 0:
            return []
        if count > len(self.free):
            return None
        taken, self.free = self.free[:count], self.free[count:]
        return taken

    def release(self, ids: list[int]) -> None:
        self.free = sorted(self.free + ids)


@dataclass
class Outcome:
    tag: str
    result: str  # finished | crashed | skipped | running-elsewhere
    exit_code: int | None = None
    wall_s: float | None = None
    gpus: list[int] = field(default_factory=list)


def schedule(runs: list[RunSpec], pool: GpuPool, max_parallel: int | None,
             start: Callable[[RunSpec, list[int]], object], wait: Callable[[dict], list[tuple[object, int]]]
             ) -> list[tuple[RunSpec, list[int], int]]:
    """Run everything, packing runs onto free GPUs: start(run, gpu_ids) -> handle; wait(active) blocks until
    at least one handle ends and returns [(handle, exit_code)]. Returns (run, gpu_ids, exit_code) in finish order.
    A run that needs more GPUs than exist is an error before anything starts.
    """
    if pool.total:
        too_big = [r.tag for r in runs if r.gpus > pool.total]
        if too_big:
            raise ValueError(f"runs {too_big} need more GPUs than the {pool.total} available; lower gpus_per_run")
    queue = list(runs)
    active: dict[object, tuple[RunSpec, list[int]]] = {}
    done: list[tuple[RunSpec, list[int], int]] = []
    while queue or active:
        # Backfill: start every queued run that fits now, in spec order.
        for run in list(queue):
            if max_parallel is not None and len(active) >= max_parallel:
                break
            ids = pool.acquire(run.gpus)
            if ids is None:
                continue
            queue.remove(run)
            active[start(run, ids)] = (run, ids)
        if not active:
            break  # unreachable given the size check; guards against a spin
        for handle, code in wait(active):
            run, ids = active.pop(handle)
            pool.release(ids)
            done.append((run, ids, code))
    return done


def _keep_failed_log(path: str) -> None:
    """Move a failed attempt's log aside as <tag>.txt.attempt<N> so the rerun starts a fresh file."""
    n = 1
    while os.path.exists(f"{path}.attempt{n}"):
        n += 1
    os.replace(path, f"{path}.attempt{n}")


class _FailedStart:
    """Stands in for a process that could not be started; it has already ended with exit code 127."""

    pid = None

    def poll(self) -> int:
        return 127

    def terminate(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 127


class ProcessRunner:
    """Starts runs as subprocesses writing console output and status files; wait() polls them."""

    def __init__(self, sweep: Sweep, launcher: list[str], threads: int | None, poll_s: float = 0.5):
        self.sweep, self.launcher, self.threads, self.poll_s = sweep, launcher, threads, poll_s
        self.meta: dict[subprocess.Popen, dict] = {}

    def start(self, run: RunSpec, gpu_ids: list[int]) -> subprocess.Popen:
        log_dir = self.sweep.log_dir
        status_file = runlog.status_path(log_dir, run.tag)
        previous = runlog.read_status(status_file) or {}
        log = runlog.log_path(log_dir, run.tag)
        if os.path.exists(log):
            _keep_failed_log(log)
        command = build_command(run, self.sweep, self.launcher)
        env_changes = run_env(run, self.sweep, gpu_ids, self.threads)
        console = open(runlog.console_path(log_dir, run.tag), "w", encoding="utf-8")
        console.write(f"$ {format_command(command, env_changes)}\n")
        console.flush()
        try:
            proc = subprocess.Popen(command, cwd=os.path.dirname(self.sweep.train_script), stdout=console,
                                    stderr=subprocess.STDOUT, env={**os.environ, **env_changes})
        except OSError as exc:  # e.g. torchrun not executable: this run fails, the sweep goes on
            console.write(f"error: could not start the run: {exc}\n")
            proc = _FailedStart()
        status = {
            "tag": run.tag, "seed": run.seed, "gpus": gpu_ids, "nproc": run.gpus, "state": "running",
            "command": format_command(command, env_changes), "log": log, "host": socket.gethostname(),
            "pid": proc.pid, "start_time": time.time(), "end_time": None, "exit_code": None,
            "attempt": int(previous.get("attempt", 0)) + 1,
        }
        runlog.write_status(status_file, status)
        self.meta[proc] = {"status": status, "status_file": status_file, "console": console}
        print(f"[start] {run.tag} gpus={gpu_ids or 'cpu'} pid={proc.pid}", flush=True)
        return proc

    def wait(self, active: dict) -> list[tuple[subprocess.Popen, int]]:
        while True:
            ended = [(proc, proc.poll()) for proc in active]
            ended = [(proc, code) for proc, code in ended if code is not None]
            if ended:
                for proc, code in ended:
                    self._finish(proc, code)
                return ended
            time.sleep(self.poll_s)

    def _finish(self, proc: subprocess.Popen, code: int) -> None:
        meta = self.meta.pop(proc)
        meta["console"].close()
        status = meta["status"]
        log = _parse_if_exists(status["log"])
        status["end_time"] = time.time()
        status["exit_code"] = code
        status["state"] = "finished" if code == 0 and log is not None and log.finished else "crashed"
        runlog.write_status(meta["status_file"], status)
        print(f"[{status['state']}] {status['tag']} exit={code} "
              f"wall={status['end_time'] - status['start_time']:.1f}s", flush=True)

    def terminate_all(self) -> None:
        for proc in list(self.meta):
            proc.terminate()
        for proc in list(self.meta):
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            self._finish(proc, code if code != 0 else -15)


def _parse_if_exists(path: str) -> runlog.RunLog | None:
    return runlog.parse_log(path) if os.path.exists(path) else None


def format_command(command: list[str], env_changes: dict[str, str]) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_changes.items())
    return (env + " " if env else "") + shlex.join(command)


# ----------------------------------------------------------------------------------------------- main


def _summary(sweep: Sweep, outcomes: dict[str, Outcome]) -> str:
    header = ["tag", "result", "exit", "final val", "train time", "wall", "log"]
    rows = []
    for run in sweep.runs:
        outcome = outcomes[run.tag]
        log = _parse_if_exists(runlog.log_path(sweep.log_dir, run.tag))
        final = log.final_val if log else None
        last = log.last_val if log else None
        rows.append([
            run.tag, outcome.result, "" if outcome.exit_code is None else str(outcome.exit_code),
            f"{final.loss:.4f}" if final else (f"({last.loss:.4f} @ {last.step})" if last else "-"),
            f"{final.train_time_ms / 1000:.1f}s" if final else "-",
            "-" if outcome.wall_s is None else f"{outcome.wall_s:.1f}s",
            os.path.relpath(runlog.log_path(sweep.log_dir, run.tag)),
        ])
    return runlog.format_table(header, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="sweep spec: .toml, .json or .py (defining SPEC)")
    parser.add_argument("--dry-run", action="store_true", help="print every run's command; start nothing")
    parser.add_argument("--gpus-per-run", type=int, default=None, help="override the spec's gpus_per_run")
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="runs at once (default: as many as the GPUs pack; 1 on CPU)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="use GPUs 0..N-1 (default: all visible CUDA devices)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (gloo) even if CUDA is present")
    parser.add_argument("--log-dir", default=None, help="override the spec's log_dir")
    parser.add_argument("--only", default=None, metavar="GLOB", help="run only tags matching this pattern")
    parser.add_argument("--train-script", default=None, help="script to launch (default: train_gpt.py here)")
    parser.add_argument("--poll-seconds", type=float, default=0.5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("gpus_per_run", "max_parallel", "gpus"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "gpus" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweep = expand_spec(load_spec(args.spec), args.spec, gpus_per_run=args.gpus_per_run,
                            log_dir=args.log_dir, train_script=args.train_script)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.only:
        sweep.runs = [r for r in sweep.runs if fnmatch.fnmatch(r.tag, args.only)]
        if not sweep.runs:
            print(f"error: no run tag matches --only {args.only!r}", file=sys.stderr)
            return 2
    if not os.path.isfile(sweep.train_script):
        print(f"error: train script {sweep.train_script} not found; pass --train-script", file=sys.stderr)
        return 2

    gpu_ids = [] if args.cpu else (list(range(args.gpus)) if args.gpus is not None else detect_gpus())
    too_big = sorted({r.gpus for r in sweep.runs if gpu_ids and r.gpus > len(gpu_ids)})
    if too_big:
        print(f"error: runs need {too_big[-1]} GPUs but {len(gpu_ids)} are available ({gpu_ids}); "
              "lower gpus_per_run (--gpus-per-run) or run on a bigger node", file=sys.stderr)
        return 2
    max_parallel = args.max_parallel or sweep.max_parallel or (None if gpu_ids else 1)
    threads = None
    if not gpu_ids:  # share the CPU cores between the concurrent processes
        threads = max(1, (os.cpu_count() or 1) // (max_parallel * max(r.gpus for r in sweep.runs)))
    launcher = torchrun_prefix()

    outcomes: dict[str, Outcome] = {}
    pending: list[RunSpec] = []
    for run in sweep.runs:
        log = _parse_if_exists(runlog.log_path(sweep.log_dir, run.tag))
        status = runlog.read_status(runlog.status_path(sweep.log_dir, run.tag)) or {}
        if log is not None and log.finished:
            outcomes[run.tag] = Outcome(run.tag, "skipped")
        elif (status.get("state") == "running" and status.get("host") == socket.gethostname()
              and isinstance(status.get("pid"), int) and runlog.pid_alive(status["pid"])):
            outcomes[run.tag] = Outcome(run.tag, "running-elsewhere")
        else:
            pending.append(run)

    device = f"GPUs {gpu_ids}" if gpu_ids else f"CPU (gloo), {threads} thread(s) per process"
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs, {len(pending)} to run, logs in {sweep.log_dir}; {device}")
    if args.dry_run:
        pool = GpuPool(gpu_ids)  # show the packing as waves: a run that does not fit starts a new wave
        for run in sweep.runs:
            note = outcomes[run.tag].result if run.tag in outcomes else "run"
            ids = pool.acquire(run.gpus) if run.tag not in outcomes else []
            if ids is None:
                pool = GpuPool(gpu_ids)
                ids = pool.acquire(run.gpus) or list(range(run.gpus))
            print(f"# {run.tag} [{note}] log: {runlog.log_path(sweep.log_dir, run.tag)}")
            print(format_command(build_command(run, sweep, launcher), run_env(run, sweep, ids, threads)))
        return 0

    os.makedirs(sweep.log_dir, exist_ok=True)
    for run in pending:  # queued runs show up in monitor_runs.py right away
        status_file = runlog.status_path(sweep.log_dir, run.tag)
        previous = runlog.read_status(status_file) or {}
        runlog.write_status(status_file, {**previous, "tag": run.tag, "seed": run.seed, "state": "queued",
                                          "log": runlog.log_path(sweep.log_dir, run.tag), "exit_code": None,
                                          "host": socket.gethostname(), "launcher_pid": os.getpid()})
    runner = ProcessRunner(sweep, launcher, threads, args.poll_seconds)
    try:
        for run, ids, code in schedule(pending, GpuPool(gpu_ids), max_parallel, runner.start, runner.wait):
            status = runlog.read_status(runlog.status_path(sweep.log_dir, run.tag)) or {}
            wall = (status.get("end_time") or 0) - (status.get("start_time") or 0)
            outcomes[run.tag] = Outcome(run.tag, status.get("state", "crashed"), code, wall, ids)
    except KeyboardInterrupt:
        print("interrupted: stopping the running runs", file=sys.stderr)
        runner.terminate_all()
        for run in pending:  # never started: say so, so they do not look queued forever
            status_file = runlog.status_path(sweep.log_dir, run.tag)
            status = runlog.read_status(status_file) or {}
            if status.get("state") == "queued":
                runlog.write_status(status_file, {**status, "state": "cancelled"})
        raise
    print()
    print(_summary(sweep, outcomes))
    return 0 if all(o.result in ("finished", "skipped") for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
