"""Show a table of training runs: status, progress, val loss, speed, ETA, and whether the target was reached.

    python monitor_runs.py                      # every log under logs/
    python monitor_runs.py logs/ord --watch     # refresh in place every 10 s
    python monitor_runs.py records/medium/*/ --target 2.92 --json
    python monitor_runs.py logs/track3_optimizers    # track3 runs: steps to 3.28, the target their config names

Status: finished (a val_loss line at step == total); crashed (a traceback or `error:` line in the log, or
launch_sweep.py recorded a non-zero exit code or a process that vanished); queued (waiting in launch_sweep.py;
cancelled if the launcher stopped first); running or stalled (stalled: the log, or the launcher's files while there
is no log yet, unchanged for --stall-minutes).
Steps-to-target: the step of the first validation at or below the target (`--target`; without it, the target a
run's config names, `val_loss_target`, else 2.92).
Reads our logs and the official record logs through runlog.parse_log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass

import runlog


@dataclass
class RunRow:
    tag: str
    directory: str
    status: str  # finished | crashed | running | stalled | queued | cancelled
    step: int | None
    total: int | None
    last_val: float | None
    best_val: float | None
    step_avg_ms: float | None
    eta_s: float | None  # remaining training time from step_avg (validation excluded)
    target: float  # val loss target of this run
    target_step: int | None  # first step whose val loss <= target, None if never
    note: str


def _mtime(*paths: str) -> float | None:
    times = [os.path.getmtime(p) for p in paths if os.path.exists(p)]
    return max(times) if times else None


def classify(log: runlog.RunLog | None, status: dict | None, age_s: float | None, stall_s: float) -> tuple[str, str]:
    """(status, note) for one run from its parsed log, the launcher's status JSON and the age of its files."""
    status = status or {}
    state, code = status.get("state"), status.get("exit_code")
    if log is not None and log.finished:
        return "finished", ""
    if state == "queued":
        launcher = status.get("launcher_pid")
        if status.get("host") == socket.gethostname() and isinstance(launcher, int) and not runlog.pid_alive(launcher):
            return "cancelled", "launcher gone before the run started"
        return "queued", ""
    if state == "cancelled" and log is None:
        return "cancelled", "sweep interrupted before the run started"
    if log is not None and log.crashed:
        reason = log.error_lines[0] if log.error_lines else (log.exception or "traceback in log")
        return "crashed", reason[:80]
    if code is not None:
        if code != 0:
            return "crashed", f"exit code {code}" + ("" if log is not None else ", no log (see console.log)")
        return "crashed", "exited 0 before the final validation"
    if (state == "running" and status.get("host") == socket.gethostname() and isinstance(status.get("pid"), int)
            and not runlog.pid_alive(status["pid"])):
        return "crashed", "process gone without an exit code (launcher killed?)"
    if age_s is not None and age_s > stall_s:
        return "stalled", f"no output for {age_s / 60:.0f} min"
    return "running", "empty log" if log is not None and log.empty else ""


DEFAULT_TARGET = 2.92  # the medium track's


def collect_runs(paths: list[str], target: float | None, stall_s: float, now: float | None = None) -> list[RunRow]:
    """One row per run found under the given directories / files / globs (logs and launcher status files).
    target None: each run's configured target (runlog.RunLog.target), else DEFAULT_TARGET."""
    now = time.time() if now is None else now
    logs = runlog.find_logs(paths)
    keyed: dict[tuple[str, str], str | None] = {}  # (directory, tag) -> log path or None
    for path in logs:
        keyed[(os.path.dirname(path), os.path.splitext(os.path.basename(path))[0])] = path
    for item in paths:  # runs the launcher knows of that have no log yet
        if os.path.isdir(item):
            for root, _dirs, files in os.walk(item):
                for name in files:
                    if name.endswith(".status.json"):
                        keyed.setdefault((os.path.normpath(root), name[: -len(".status.json")]), None)
    rows = []
    for (directory, tag), path in sorted(keyed.items()):
        log = runlog.parse_log(path) if path else None
        status_file = runlog.status_path(directory, tag)
        status = runlog.read_status(status_file)
        mtime = _mtime(path) if path else _mtime(status_file, runlog.console_path(directory, tag))
        state, note = classify(log, status, None if mtime is None else now - mtime, stall_s)
        if log is not None and log.truncated and not note:
            note = "last line incomplete"
        rows.append(_row(tag if log is None else log.tag, directory, state, note, log, target))
    return rows


def _row(tag: str, directory: str, state: str, note: str, log: runlog.RunLog | None,
         target: float | None) -> RunRow:
    if log is None:
        return RunRow(tag, directory, state, None, None, None, None, None, None,
                      DEFAULT_TARGET if target is None else target, None, note)
    target = log.target(DEFAULT_TARGET) if target is None else target
    last_step, step_avg = log.last_step, log.step_avg_ms
    eta = None
    if state in ("running", "stalled") and None not in (last_step, step_avg, log.total_steps):
        eta = max(0, log.total_steps - last_step) * step_avg / 1000
    summary = log.summary(target)
    last_val = log.last_val
    return RunRow(tag, directory, state, last_step, log.total_steps, last_val.loss if last_val else None,
                  log.best_val_loss, step_avg, eta, target, summary["steps_to_target"], note)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def render(rows: list[RunRow]) -> str:
    if not rows:
        return "no runs found"
    many_dirs = len({r.directory for r in rows}) > 1
    targets = {r.target for r in rows}
    # one target: its value in the header; several (runs of different tracks): each cell names its own
    target_header = f"<={targets.pop():g}" if len(targets) == 1 else "<=target"
    header = ["tag", "status", "step", "last val", "best val", "step_avg", "ETA", target_header, "note"]
    table = []
    for r in rows:
        name = os.path.join(os.path.basename(r.directory) or r.directory, r.tag) if many_dirs else r.tag
        table.append([
            name, r.status,
            "-" if r.step is None else f"{r.step}/{r.total}",
            "-" if r.last_val is None else f"{r.last_val:.4f}",
            "-" if r.best_val is None else f"{r.best_val:.4f}",
            "-" if r.step_avg_ms is None else f"{r.step_avg_ms:.1f}ms",
            _duration(r.eta_s),
            ("-" if r.target_step is None else f"yes@{r.target_step}")
            + ("" if target_header != "<=target" else f" ({r.target:g})"),
            r.note,
        ])
    counts = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    footer = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return runlog.format_table(header, table) + f"\n{len(rows)} runs: {footer}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=["logs"], metavar="LOGDIR",
                        help="log directories (searched recursively), log files or globs (default: logs)")
    parser.add_argument("--target", type=float, default=None,
                        help=f"val loss target (default: each run's configured target, else {DEFAULT_TARGET})")
    parser.add_argument("--stall-minutes", type=float, default=10.0,
                        help="a run whose files have not changed for this long is stalled (default 10)")
    parser.add_argument("--watch", action="store_true", help="refresh the table in place until Ctrl-C")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between --watch refreshes")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.stall_minutes <= 0 or args.interval <= 0:
        parser.error("--stall-minutes and --interval must be positive")
    missing = [p for p in args.paths if not os.path.exists(p) and not any(ch in p for ch in "*?[")]
    if missing:
        parser.error(f"no such log file or directory: {', '.join(missing)}")

    def snapshot() -> str:
        rows = collect_runs(args.paths, args.target, args.stall_minutes * 60)
        if args.json:
            return json.dumps([asdict(r) for r in rows], indent=1)
        return render(rows)

    try:
        text = snapshot()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.watch:
        print(text)
        return 0
    try:
        while True:
            # Cursor home + clear screen, then the new table: refreshes in place.
            sys.stdout.write("\x1b[H\x1b[2J" + text + f"\nupdated {time.strftime('%H:%M:%S')} (Ctrl-C to stop)\n")
            sys.stdout.flush()
            time.sleep(args.interval)
            text = snapshot()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
