"""Turn finished run logs into a record folder: records/<track>/<YYYY-MM-DD>_<name>/ with the logs and a README.

    python make_record.py logs/ord/*.txt --track medium --name polar-express-ord --command "torchrun ..."

The README holds per-run final val loss and training time, their mean and standard deviation, and the one-sided
t-test of the record rule: scipy.stats.ttest_1samp(losses, target, alternative="less"), with p < 0.01 required.
The command that produced the runs is --command, else the commands launch_sweep.py recorded beside the logs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass

import numpy as np

import runlog

P_VALUE_BAR = 0.01  # the record rule
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class RecordStats:
    n: int
    target: float
    loss_mean: float
    loss_std: float  # sample std (ddof=1); nan for one run
    t_statistic: float  # nan for one run
    p_value: float  # one-sided, H1: mean < target; nan for one run
    time_mean_s: float
    time_std_s: float


def record_stats(losses: list[float], times_s: list[float], target: float) -> RecordStats:
    """Mean/std of final losses and times, and scipy's one-sided one-sample t-test against the target."""
    if not losses or len(losses) != len(times_s):
        raise ValueError("need one final loss and one training time per run, and at least one run")
    loss = np.asarray(losses, dtype=np.float64)
    time_s = np.asarray(times_s, dtype=np.float64)
    n = len(loss)
    t_stat = p_value = math.nan
    if n >= 2:
        from scipy import stats

        result = stats.ttest_1samp(loss, target, alternative="less")
        t_stat, p_value = float(result.statistic), float(result.pvalue)
    return RecordStats(
        n=n, target=target, loss_mean=float(loss.mean()), loss_std=float(loss.std(ddof=1)) if n > 1 else math.nan,
        t_statistic=t_stat, p_value=p_value, time_mean_s=float(time_s.mean()),
        time_std_s=float(time_s.std(ddof=1)) if n > 1 else math.nan,
    )


def _loss_text(loss: float) -> str:
    """As the log printed it: 4 or 6 decimals, without padding zeros beyond 4."""
    text = f"{loss:.6f}".rstrip("0")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{loss:.{max(decimals, 4)}f}"


def _recorded_commands(logs: list[runlog.RunLog]) -> list[str]:
    """Commands launch_sweep.py stored next to each log (missing ones are skipped)."""
    commands = []
    for log in logs:
        status = runlog.read_status(runlog.status_path(os.path.dirname(log.path), log.tag))
        if status and status.get("command"):
            commands.append(status["command"])
    return commands


def render_readme(name: str, track: str, date: str, logs: list[runlog.RunLog], stats: RecordStats,
                  commands: list[str]) -> str:
    nan = "n/a (one run)"
    passed = stats.n >= 2 and stats.p_value < P_VALUE_BAR
    lines = [
        f"# {name}", "",
        f"Track: {track}. Date: {date}. Target val loss: {stats.target:g}. Runs: {stats.n}.", "",
        "| run | seed | steps | final val loss | train time (s) |",
        "|---|---|---|---|---|",
    ]
    for log in logs:
        final = log.final_val
        lines.append(f"| {os.path.basename(log.path)} | {'-' if log.seed is None else log.seed} | {final.step} "
                     f"| {_loss_text(final.loss)} | {final.train_time_ms / 1000:.1f} |")
    std = nan if math.isnan(stats.loss_std) else f"{stats.loss_std:.5f}"
    time_std = nan if math.isnan(stats.time_std_s) else f"{stats.time_std_s:.1f} s"
    p_text = nan if math.isnan(stats.p_value) else f"{stats.p_value:.3g}"
    lines += [
        "",
        "## Statistics", "",
        f"- val loss: mean {stats.loss_mean:.5f}, std {std}",
        f"- one-sided t-test against {stats.target:g} "
        f"(`scipy.stats.ttest_1samp(losses, {stats.target:g}, alternative=\"less\")`): "
        f"t = {'n/a' if math.isnan(stats.t_statistic) else f'{stats.t_statistic:.3f}'}, p = {p_text}",
        f"- record rule p < {P_VALUE_BAR:g}: {'met' if passed else 'NOT met'}",
        f"- training time: mean {stats.time_mean_s:.1f} s ({stats.time_mean_s / 60:.2f} min), std {time_std}",
        "",
        "## Command", "",
    ]
    if commands:
        lines += ["```", *dict.fromkeys(commands), "```"]
    else:
        lines.append("Not recorded (pass --command to make_record.py).")
    header = [line for line in logs[0].header_lines if line.startswith("Running") or "NVIDIA" in line
              or line.startswith("CPU")]
    if header:
        lines += ["", "## Software and hardware (first log)", "", "```", *header, "```"]
    config = logs[0].config
    if config:
        lines += ["", "## Config (first log)", "", "```json", json.dumps(config, indent=1, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def make_record(log_paths: list[str], track: str, name: str, *, target: float = 2.92, command: str | None = None,
                date: str | None = None, records_dir: str = "records", force: bool = False) -> str:
    """Copy the logs into records/<track>/<date>_<name>/ and write README.md and stats.json. Returns the folder."""
    for label, value in (("track", track), ("name", name)):
        if not _NAME_OK.match(value):
            raise ValueError(f"--{label} {value!r} must be a plain folder name (letters, digits, . _ + -)")
    date = date or datetime.date.today().isoformat()
    try:
        datetime.date.fromisoformat(date)
    except ValueError as exc:
        raise ValueError(f"--date {date!r} must be YYYY-MM-DD") from exc
    paths = runlog.find_logs(log_paths)
    if not paths:
        raise ValueError("no logs given: pass the finished runs' log files")
    logs = [runlog.parse_log(p) for p in paths]
    unfinished = [log.path for log in logs if not log.finished]
    if unfinished:
        raise ValueError(f"not finished (no val_loss line at the last step): {unfinished}; "
                         "a record holds finished runs only")
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"two logs share a file name {sorted(names)}; rename one before recording")
    folder = os.path.join(records_dir, track, f"{date}_{name}")
    if os.path.exists(folder) and not force:
        raise ValueError(f"{folder} already exists; choose another --name or pass --force to overwrite")

    stats = record_stats([log.final_val.loss for log in logs],
                         [log.final_val.train_time_ms / 1000 for log in logs], target)
    commands = [command] if command else _recorded_commands(logs)
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        shutil.copy2(path, os.path.join(folder, os.path.basename(path)))
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(render_readme(name, track, date, logs, stats, commands))
    fields = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(stats).items()}
    summary = {**fields, "runs": [
        {"log": os.path.basename(log.path), "seed": log.seed, "final_val_loss": log.final_val.loss,
         "train_time_s": log.final_val.train_time_ms / 1000, "steps": log.final_val.step} for log in logs],
        "commands": commands}
    with open(os.path.join(folder, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)  # NaN statistics (one run) are null, so this is standard JSON
        f.write("\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="finished run logs (files, directories or globs)")
    parser.add_argument("--track", required=True, help="e.g. medium")
    parser.add_argument("--name", required=True, help="short name of the record, e.g. polar-express-ord")
    parser.add_argument("--target", type=float, default=2.92, help="val loss target (default 2.92)")
    parser.add_argument("--command", default=None, help="the command that produced the runs")
    parser.add_argument("--date", default=None, help="YYYY-MM-DD (default today)")
    parser.add_argument("--records-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "records"),
                        help="root of the records tree (default: records/ in the repository)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing record folder")
    args = parser.parse_args(argv)
    try:
        folder = make_record(args.logs, args.track, args.name, target=args.target, command=args.command,
                             date=args.date, records_dir=args.records_dir, force=args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
