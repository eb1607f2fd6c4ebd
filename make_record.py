"""Turn finished run logs into a record folder: records/<track>/<YYYY-MM-DD>_<name>/ with the logs and a README.

    python make_record.py logs/ord/*.txt --track medium --name polar-express-ord --command "torchrun ..."
    python make_record.py logs/track3/ord-s*.txt --track track3 --name ord --baseline logs/track3/muon-s*.txt

The README holds per-run final val loss and training time, their mean and standard deviation, and the one-sided
t-test of the record rule: scipy.stats.ttest_1samp(losses, target, alternative="less"), with p < 0.01 required.
`--track track3` (the optimizer benchmark, target 3.28) applies that benchmark's rules instead (track3.py): the
z-test (3.28 - mean) * sqrt(n) >= 0.004 at every validation step all runs share, the earliest step that meets it
(the set's steps to 3.28), and with `--baseline LOGS` the pairwise rule and a t-test (paired by seed when the seeds
match, else Welch) against a baseline set of logs, official track-3 logs included.
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
import track3

P_VALUE_BAR = 0.01  # the record rule
TRACK3 = "track3"
DEFAULT_TARGETS = {TRACK3: track3.TARGET}  # other tracks: DEFAULT_TARGET
DEFAULT_TARGET = 2.92
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


def _run_table(logs: list[runlog.RunLog], target: float, steps_to_target: bool) -> list[str]:
    """Markdown rows per run: seed, steps, final val loss, train time (and the first step at or below target)."""
    extra = f" steps to {target:g} |" if steps_to_target else ""
    lines = [f"| run | seed | steps | final val loss | train time (s) |{extra}",
             "|---|---|---|---|---|" + ("---|" if steps_to_target else "")]
    for log in logs:
        final = log.final_val
        row = (f"| {os.path.basename(log.path)} | {'-' if log.seed is None else log.seed} | {final.step} "
               f"| {_loss_text(final.loss)} | {final.train_time_ms / 1000:.1f} |")
        if steps_to_target:
            reached = log.summary(target)["steps_to_target"]
            row += f" {'-' if reached is None else reached} |"
        lines.append(row)
    return lines


def _track3_lines(result: track3.SetResult, target: float, baseline: tuple[list[runlog.RunLog], track3.SetResult,
                  track3.Comparison] | None) -> list[str]:
    """README lines: the benchmark rule at the late validation steps, the set's steps, the pairwise comparison."""
    shown = [r for r in result.rows if r.step >= 0.9 * result.total_steps or r.step == result.steps]
    lines = [
        f"- benchmark rule `({target:g} - mean) * sqrt(n) >= {track3.MARGIN:g}` (z-test, sigma {track3.SIGMA:g}, "
        f"one-sided p < 0.001): **{'met' if result.met else 'NOT met'}**"
        + (f", first at step **{result.steps}**: the set's steps to {target:g}" if result.met
           else f" at any of the {len(result.rows)} validation steps all runs share"),
        "",
        "| step | n | mean val loss | std | (target - mean) sqrt(n) | p (z-test) | rule |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in shown:
        std = "-" if math.isnan(r.std) else f"{r.std:.5f}"
        lines.append(f"| {r.step} | {r.n} | {r.mean:.5f} | {std} | {r.statistic:.5f} | {r.p_value:.3g} "
                     f"| {'met' if r.met else '-'} |")
    if baseline is not None:
        base_logs, base, cmp = baseline
        at_new, at_base = result.at_steps, base.at_steps
        p_text = "n/a (fewer than 2 runs)" if math.isnan(cmp.p_value) else f"{cmp.p_value:.3g}"
        t_text = "n/a" if math.isnan(cmp.t_statistic) else f"{cmp.t_statistic:.3f}"
        test = ("paired by seed (`scipy.stats.ttest_rel`)" if cmp.test == "paired"
                else "Welch (`scipy.stats.ttest_ind(equal_var=False)`)")
        lines += [
            "", "## Against the baseline", "",
            f"Baseline: {len(base_logs)} runs ({', '.join(os.path.basename(g.path) for g in base_logs)}): "
            f"mean {at_base.mean:.5f} at step {base.steps} (rule {'met' if base.met else 'NOT met'}). "
            f"This set: mean {at_new.mean:.5f} at step {result.steps}.", "",
            f"- loss gain (baseline mean - this mean): {cmp.loss_gain:+.5f}; steps saved: {cmp.step_gain:+d}, "
            f"worth {cmp.step_gain_loss:+.5f} at {track3.LOSS_PER_100_STEPS:g} per 100 steps",
            f"- pairwise rule `(loss gain + step worth) / sqrt(1/n1 + 1/n2) >= {track3.MARGIN:g}`: "
            f"{cmp.statistic:.5f}, **{'significant' if cmp.significant else 'NOT significant'}**",
            f"- the same difference by a one-sided t-test, {test}: t = {t_text}, p = {p_text}",
        ]
    return lines


def render_readme(name: str, track: str, date: str, logs: list[runlog.RunLog], stats: RecordStats,
                  commands: list[str], track3_result: track3.SetResult | None = None,
                  baseline: tuple | None = None) -> str:
    """README text. track3_result (with `--track track3`) replaces the t-test by the benchmark's rules;
    baseline: (baseline logs, their SetResult, the Comparison) or None."""
    nan = "n/a (one run)"
    passed = stats.n >= 2 and stats.p_value < P_VALUE_BAR
    lines = [
        f"# {name}", "",
        f"Track: {track}. Date: {date}. Target val loss: {stats.target:g}. Runs: {stats.n}.", "",
        *_run_table(logs, stats.target, steps_to_target=track3_result is not None),
    ]
    std = nan if math.isnan(stats.loss_std) else f"{stats.loss_std:.5f}"
    time_std = nan if math.isnan(stats.time_std_s) else f"{stats.time_std_s:.1f} s"
    p_text = nan if math.isnan(stats.p_value) else f"{stats.p_value:.3g}"
    lines += ["", "## Statistics", "", f"- final val loss: mean {stats.loss_mean:.5f}, std {std}"]
    if track3_result is None:
        lines += [
            f"- one-sided t-test against {stats.target:g} "
            f"(`scipy.stats.ttest_1samp(losses, {stats.target:g}, alternative=\"less\")`): "
            f"t = {'n/a' if math.isnan(stats.t_statistic) else f'{stats.t_statistic:.3f}'}, p = {p_text}",
            f"- record rule p < {P_VALUE_BAR:g}: {'met' if passed else 'NOT met'}",
        ]
    lines.append(f"- training time: mean {stats.time_mean_s:.1f} s ({stats.time_mean_s / 60:.2f} min), std {time_std}")
    if track3_result is not None:
        lines += _track3_lines(track3_result, stats.target, baseline)
    lines += ["", "## Command", ""]
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


def _finished_logs(log_paths: list[str], what: str) -> list[runlog.RunLog]:
    """Parsed logs of finished runs; ValueError for none, unfinished ones or repeated file names."""
    paths = runlog.find_logs(log_paths)
    if not paths:
        raise ValueError(f"no {what} given: pass the finished runs' log files")
    logs = [runlog.parse_log(p) for p in paths]
    unfinished = [log.path for log in logs if not log.finished]
    if unfinished:
        raise ValueError(f"{what}: not finished (no val_loss line at the last step): {unfinished}; "
                         "a record holds finished runs only")
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"two {what} share a file name {sorted(names)}; rename one before recording")
    return logs


def track3_set(logs: list[runlog.RunLog], target: float, what: str = "logs") -> track3.SetResult:
    """The benchmark rule over a set of runs of one setup (they must share their step count)."""
    totals = sorted({log.total_steps for log in logs})
    if len(totals) != 1:
        raise ValueError(f"the {what} mix step counts {totals}: a track3 set is n runs of one setup "
                         "(record each step count separately)")
    curves = [{p.step: p.loss for p in log.val} for log in logs]
    return track3.evaluate_set(curves, totals[0], [log.seed for log in logs], target)


def _json_ready(value):
    """Dataclass/dict/list with NaN floats as None (standard JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value


def make_record(log_paths: list[str], track: str, name: str, *, target: float | None = None,
                baseline: list[str] | None = None, command: str | None = None, date: str | None = None,
                records_dir: str = "records", force: bool = False) -> str:
    """Copy the logs into records/<track>/<date>_<name>/ and write README.md and stats.json. Returns the folder.
    target None: the track's (3.28 for track3, else 2.92). baseline (track3 only): logs of the set to compare with."""
    for label, value in (("track", track), ("name", name)):
        if not _NAME_OK.match(value):
            raise ValueError(f"--{label} {value!r} must be a plain folder name (letters, digits, . _ + -)")
    date = date or datetime.date.today().isoformat()
    try:
        datetime.date.fromisoformat(date)
    except ValueError as exc:
        raise ValueError(f"--date {date!r} must be YYYY-MM-DD") from exc
    if baseline and track != TRACK3:
        raise ValueError(f"--baseline is the pairwise rule of the optimizer benchmark: use it with --track {TRACK3}")
    target = DEFAULT_TARGETS.get(track, DEFAULT_TARGET) if target is None else target
    logs = _finished_logs(log_paths, "logs")
    base_logs = _finished_logs(baseline, "baseline logs") if baseline else None
    folder = os.path.join(records_dir, track, f"{date}_{name}")
    if os.path.exists(folder) and not force:
        raise ValueError(f"{folder} already exists; choose another --name or pass --force to overwrite")

    stats = record_stats([log.final_val.loss for log in logs],
                         [log.final_val.train_time_ms / 1000 for log in logs], target)
    result = comparison = None
    if track == TRACK3:
        result = track3_set(logs, target)
        if base_logs:
            base = track3_set(base_logs, target, "baseline logs")
            comparison = (base_logs, base, track3.compare_sets(base, result))
    commands = [command] if command else _recorded_commands(logs)
    os.makedirs(folder, exist_ok=True)
    for log in logs:
        shutil.copy2(log.path, os.path.join(folder, os.path.basename(log.path)))
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(render_readme(name, track, date, logs, stats, commands, result, comparison))
    summary = {**_json_ready(asdict(stats)), "runs": [
        {"log": os.path.basename(log.path), "seed": log.seed, "final_val_loss": log.final_val.loss,
         "train_time_s": log.final_val.train_time_ms / 1000, "steps": log.final_val.step,
         "steps_to_target": log.summary(target)["steps_to_target"]} for log in logs],
        "commands": commands}
    if result is not None:
        summary[TRACK3] = _json_ready(asdict(result))
        if comparison is not None:
            summary[TRACK3]["baseline"] = {"logs": [os.path.basename(g.path) for g in comparison[0]],
                                           **_json_ready(asdict(comparison[1])),
                                           "comparison": _json_ready(asdict(comparison[2]))}
    with open(os.path.join(folder, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)  # NaN statistics (one run) are null, so this is standard JSON
        f.write("\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="finished run logs (files, directories or globs)")
    parser.add_argument("--track", required=True, help=f"e.g. medium, or {TRACK3} (the optimizer benchmark's rules)")
    parser.add_argument("--name", required=True, help="short name of the record, e.g. polar-express-ord")
    parser.add_argument("--target", type=float, default=None,
                        help=f"val loss target (default {DEFAULT_TARGET}; {track3.TARGET} with --track {TRACK3})")
    parser.add_argument("--baseline", nargs="+", default=None, metavar="LOG",
                        help=f"with --track {TRACK3}: finished logs of the baseline set for the pairwise comparison")
    parser.add_argument("--command", default=None, help="the command that produced the runs")
    parser.add_argument("--date", default=None, help="YYYY-MM-DD (default today)")
    parser.add_argument("--records-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "records"),
                        help="root of the records tree (default: records/ in the repository)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing record folder")
    args = parser.parse_args(argv)
    try:
        folder = make_record(args.logs, args.track, args.name, target=args.target, baseline=args.baseline,
                             command=args.command, date=args.date, records_dir=args.records_dir, force=args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
