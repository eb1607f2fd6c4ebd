"""Plot validation loss against step and against training time, grouped by run tag (mean and band over seeds).

    python plot_loss.py logs/ord                          # every log under logs/ord -> loss.png
    python plot_loss.py 'logs/ord/*spectral*' --out ord.svg --target 2.92
    python plot_loss.py records/medium/*/ --linear --ylim 2.9 3.3

Runs are grouped by tag with the `-s<seed>` suffix removed (see runlog.group_of); a group with several seeds is
drawn as the mean with a min-max band (or +-1 std with --band std). When logs carry train losses (ours do) a third
panel shows them smoothed. The y axis is logarithmic and its top is set from the curves after the first
--skip-frac of training, so the end of training is readable; --ylim and --linear override that.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

import runlog

FORMATS = ("png", "svg", "pdf")


@dataclass
class Curve:
    """One group's aggregate over its runs at the union of their steps (a step counts the runs that have it)."""
    label: str
    steps: np.ndarray  # (K,) int
    mean: np.ndarray  # (K,) loss
    low: np.ndarray  # (K,) lower edge of the band (== mean where only one run has the step)
    high: np.ndarray  # (K,)
    train_time_ms: np.ndarray  # (K,) mean cumulative training time at each step, ms
    runs: int


def aggregate(series: list[list[tuple[int, float, float]]], band: str = "minmax") -> tuple[np.ndarray, ...]:
    """Per-run lists of (step, value, train_time_ms) -> (steps, mean, low, high, train_time_ms) over the runs.

    Non-finite values are left out of the statistics (a diverged run does not hide the others).
    """
    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    by_step: dict[int, list[tuple[float, float]]] = {}
    for points in series:
        for step, value, time_ms in points:
            if math.isfinite(value):
                by_step.setdefault(step, []).append((value, time_ms))
    steps = np.array(sorted(by_step), dtype=np.int64)
    mean, low, high, time_ms = (np.empty(len(steps)) for _ in range(4))
    for i, step in enumerate(steps):
        values = np.array([v for v, _ in by_step[step]])
        mean[i] = values.mean()
        if band == "std":
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            low[i], high[i] = mean[i] - spread, mean[i] + spread
        else:
            low[i], high[i] = values.min(), values.max()
        time_ms[i] = np.mean([t for _, t in by_step[step]])
    return steps, mean, low, high, time_ms


def ema(values: list[float], alpha: float) -> list[float]:
    """Bias-corrected exponential moving average (alpha = weight of the newest value); skips non-finite values."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in (0, 1], got {alpha}")
    out, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = (1 - alpha) * average + alpha * value
            weight = (1 - alpha) * weight + alpha
        out.append(average / weight if weight > 0 else math.nan)
    return out


def build_curves(logs: list[runlog.RunLog], band: str, smooth: float) -> tuple[list[Curve], list[Curve]]:
    """(val curves, smoothed train-loss curves) per group, in order of first appearance."""
    groups: dict[str, list[runlog.RunLog]] = {}
    for log in logs:
        groups.setdefault(log.group, []).append(log)
    val_curves, train_curves = [], []
    for name, runs in groups.items():
        label = f"{name} (n={len(runs)})" if len(runs) > 1 else name
        val_series = [[tuple(p) for p in log.val] for log in runs if log.val]
        if val_series:
            val_curves.append(Curve(label, *aggregate(val_series, band), runs=len(val_series)))
        train_series = []
        for log in runs:
            points = [p for p in log.train if p.loss is not None and math.isfinite(p.loss)]
            if points:
                smoothed = ema([p.loss for p in points], smooth)
                train_series.append([(p.step, s, p.train_time_ms) for p, s in zip(points, smoothed)])
        if train_series:
            train_curves.append(Curve(label, *aggregate(train_series, band), runs=len(train_series)))
    return val_curves, train_curves


def default_ylim(curves: list[Curve], target: float | None, skip_frac: float) -> tuple[float, float]:
    """Top: the highest band edge after the first skip_frac of each curve's steps (drops the step-0 loss of ~10.8);
    bottom: just under the lowest band edge or the target."""
    tops, bottoms = [], []
    for curve in curves:
        last = curve.steps[-1] if len(curve.steps) else 0
        keep = curve.steps >= skip_frac * last
        if not keep.any():
            keep = np.ones(len(curve.steps), dtype=bool)
        tops.append(np.nanmax(curve.high[keep]))
        bottoms.append(np.nanmin(curve.low))
    if target is not None and min(bottoms) < 1.1 * target:  # far-off targets (small CPU runs) would squash the curves
        bottoms.append(target)
    low, high = min(bottoms), max(tops)
    if high <= low:
        high = low * 1.05
    span = high - low
    return low - 0.05 * span, high + 0.05 * span


def plot_runs(logs: list[runlog.RunLog], out: str, *, target: float | None = 2.92, band: str = "minmax",
              smooth: float = 0.05, log_y: bool = True, ylim: tuple[float, float] | None = None,
              skip_frac: float = 0.1, title: str | None = None) -> str:
    """Draw the figure to `out` (format from its extension: .png, .svg or .pdf). Returns the path."""
    ext = os.path.splitext(out)[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise ValueError(f"output {out!r}: use a .png, .svg or .pdf file name")
    if not 0.0 <= skip_frac < 1.0:
        raise ValueError(f"skip_frac must be in [0, 1), got {skip_frac}")
    val_curves, train_curves = build_curves(logs, band, smooth)
    if not val_curves:
        raise ValueError("none of the logs has a val_loss line yet; nothing to plot")

    import matplotlib

    matplotlib.use("Agg")  # file output only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    panels = 3 if train_curves else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), constrained_layout=True)
    colors = {c.label: f"C{i % 10}" for i, c in enumerate(val_curves)}
    val_ylim = ylim or default_ylim(val_curves, target, skip_frac)
    # Short (CPU) runs read better in seconds: rescale the time axis once for the whole figure.
    time_unit_ms, time_label = (1000.0, "training time (s)") if max(
        c.train_time_ms.max() for c in val_curves) < 120_000 else (60_000.0, "training time (min)")
    panel_specs = [(axes[0], val_curves, lambda c: c.steps, "step", "val loss", val_ylim),
                   (axes[1], val_curves, lambda c: c.train_time_ms / time_unit_ms, time_label, "val loss", val_ylim)]
    if train_curves:
        panel_specs.append((axes[2], train_curves, lambda c: c.steps, "step", f"train loss (EMA {smooth:g})",
                            ylim or default_ylim(train_curves, None, skip_frac)))
    for ax, curves, x_of, xlabel, ylabel, limits in panel_specs:
        for curve in curves:
            x = x_of(curve)
            color = colors.get(curve.label, f"C{len(colors) % 10}")
            ax.plot(x, curve.mean, color=color, lw=1.6, label=curve.label, marker="." if len(x) < 30 else None)
            if curve.runs > 1:
                ax.fill_between(x, curve.low, curve.high, color=color, alpha=0.2, lw=0)
        if target is not None and ylabel == "val loss":
            ax.axhline(target, color="black", ls="--", lw=1, label=f"target {target:g}")
        if log_y:
            ax.set_yscale("log")
            # Evenly spaced plain-number ticks: within one decade the default 10^k log ticks show nothing.
            ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=8))
            ax.yaxis.set_major_formatter(ticker.ScalarFormatter(useOffset=False))
            ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.set_ylim(*limits)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(out, format=ext, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="log files, directories (searched recursively) or glob patterns")
    parser.add_argument("--out", default="loss.png", help="output image: .png, .svg or .pdf (default loss.png)")
    parser.add_argument("--target", type=float, default=2.92, help="target line (default 2.92)")
    parser.add_argument("--no-target", action="store_true", help="draw no target line")
    parser.add_argument("--band", choices=("minmax", "std"), default="minmax", help="band over seeds")
    parser.add_argument("--smooth", type=float, default=0.05, help="EMA weight of the newest train loss")
    parser.add_argument("--linear", action="store_true", help="linear y axis instead of log")
    parser.add_argument("--ylim", type=float, nargs=2, metavar=("LOW", "HIGH"), help="y range of the loss panels")
    parser.add_argument("--skip-frac", type=float, default=0.1,
                        help="the automatic y top ignores this first fraction of training (default 0.1)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        logs = [runlog.parse_log(p) for p in runlog.find_logs(args.runs)]
        logs = [log for log in logs if log.val]
        out = plot_runs(logs, args.out, target=None if args.no_target else args.target, band=args.band,
                        smooth=args.smooth, log_y=not args.linear, ylim=tuple(args.ylim) if args.ylim else None,
                        skip_frac=args.skip_frac, title=args.title)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(logs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
