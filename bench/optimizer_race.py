"""Optimizer race: one fixed protocol, every matrix optimizer, several seeds; a table, a plot and JSON.

    python bench/optimizer_race.py --protocol cpu --out records/optimizer_race/<date>_cpu
    python bench/optimizer_race.py --protocol gpu-1 --out records/optimizer_race/<date>_gpu1   # one GPU
    python bench/optimizer_race.py --protocol cpu --out DIR --stage report                      # outputs only
    python bench/optimizer_race.py --protocol cpu --out DIR --dry-run                           # specs + commands

A protocol (PROTOCOLS) fixes the train_gpt.py flags (preset, data, token budget, validation), a learning-rate
grid per optimizer family, the seeds and a target val loss. Stages, each resumable (finished runs are skipped):
  1. tune:   `<out>/tune.json`, a launch_sweep.py spec: every tuned contender at every lr of its grid, tune seed.
  2. final:  the lr with the lowest final val loss per contender; `<out>/final.json`: every contender at its
             lr, all seeds. The tag of a run is `<contender>-lr<lr>-s<seed>`, so the tune-seed run at the chosen
             lr is the tuning run itself (launch_sweep.py skips it). Contenders with `lr_from` (the spectral-ORD
             variants: a controlled comparison with Muon) use that contender's tuned lr; --tune-all tunes them.
  3. timing: optimizer.step time as a share of the whole step, in this process, same model config, after
             warm-up; on CPU the contenders are interleaved step by step (machine load drifts hit all alike).
  4. report: `<out>/README.md` (tables), `<out>/results.json` (every number), `<out>/loss.png` (val loss vs step
             and time, mean and +-1 std band over seeds, from plot_loss.py), the exact commands.
Statistics per contender: mean, std (ddof=1) and n of the final val loss, Welch's t-test against Muon
(scipy.stats.ttest_ind, equal_var=False, two-sided); steps and training time (validation excluded) to the first
validation at or below the target.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Contender:
    """One optimizer configuration in the race."""
    name: str  # tag stem of its runs
    label: str  # what it is, for tables
    optimizer: str  # optimizers.OPTIMIZERS key
    args: dict = field(default_factory=dict)  # --optimizer-args
    grid: str = "muon"  # which lr grid of the protocol it is tuned on
    lr_from: str | None = None  # take this contender's tuned lr instead of tuning (None: tuned itself)


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    flags: dict  # train_gpt.py flags shared by every run (Hyperparameters field names)
    lr_grids: dict  # grid name -> learning rates
    seeds: tuple = (0, 1, 2)
    tune_seed: int = 0
    target: float | None = None  # val loss target; None: the unigram model's loss on the same val tokens
    cpu: bool = True  # launch with --cpu (gloo, CUDA hidden)
    max_parallel: int = 1
    env: dict = field(default_factory=dict)  # extra environment of every run
    diagnostics_every: int = 10  # spectral-ORD diagnostics cadence
    echo_fit_every: int = 10  # SpectralEcho fit cadence
    contenders: tuple = ("adamw", "muon", "ord_gperp", "ord_par0.5", "ord_par1.0", "ord_matched1.0", "echo")
    timing_steps: int = 10  # measured steps per contender (one diagnostic / fit step among them)
    timing_warmup: int = 2


# cpu: the cpu-tiny architecture (4 layers, d=128, vocab 50304) on the demo corpus at a reduced token budget that
# fits a shared 2-core machine: 80 steps x 512 tokens, 4 micro-batches of one 128-token row per step (SpectralEcho
# needs >= 4 replicates to fit its curve; every optimizer sees the same split), windows up to 128 tokens.
PROTOCOLS: dict[str, Protocol] = {
    "cpu": Protocol(
        name="cpu",
        description="cpu-tiny model, demo corpus, 80 steps x 512 tokens (4 x 128-token micro-batches), "
                    "val on the first 8192 val tokens every 20 steps",
        flags=dict(preset="cpu-tiny", seq_len=128, micro_batch_tokens=128, batch_tokens=512, max_window_tokens=128,
                   num_iterations=80, val_loss_every=20, val_tokens=8192, momentum_warmup_steps=16,
                   report_unigram=False, print_every=20),
        lr_grids={"adamw": [1e-3, 3e-3, 1e-2], "muon": [0.01, 0.02, 0.04]},
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        max_parallel=2,
    ),
    # gpu-1: the medium model on FineWeb on any single GPU: 300 steps x 262,144 tokens (4 x 64K micro-batches).
    # The record-8 recipe with no weight decay (what `medium` meant when this protocol was written; the record-18
    # `medium` changes the batch size with the step).
    "gpu-1": Protocol(
        name="gpu-1",
        description="medium model, FineWeb, 300 steps x 262,144 tokens (4 x 64K micro-batches) on one GPU, "
                    "val on 1,048,576 tokens every 50 steps",
        flags=dict(preset="medium-r8", weight_decay=0.0, batch_tokens=262144, num_iterations=300, val_loss_every=50,
                   val_tokens=1048576, momentum_warmup_steps=15, print_every=25),
        lr_grids={"adamw": [3e-4, 1e-3, 3e-3], "muon": [0.015, 0.025, 0.04]},
        target=4.0, cpu=False, diagnostics_every=25, echo_fit_every=25, timing_steps=25,
    ),
    # toy: seconds per run, for the test that keeps this script working (not a measurement).
    "toy": Protocol(
        name="toy",
        description="2-layer d=32 model, 4 steps x 256 tokens: a smoke test of the machinery, not a measurement",
        flags=dict(preset="cpu-tiny", num_iterations=4, val_loss_every=2, report_unigram=False, num_layers=2,
                   model_dim=32, num_heads=2, head_dim=16, seq_len=64, micro_batch_tokens=64, batch_tokens=256,
                   val_seq_len=128, val_tokens=512, skip_connections="0:1", long_window_layers="0",
                   num_value_embeds=1, max_window_tokens=64, window_block=16, momentum_warmup_steps=2),
        lr_grids={"adamw": [3e-3], "muon": [0.02, 0.04]},
        seeds=(0, 1), target=10.5, env={"OMP_NUM_THREADS": "1"}, max_parallel=3, diagnostics_every=2,
        echo_fit_every=2, contenders=("muon", "ord_par1.0"), timing_steps=2, timing_warmup=1,
    ),
}


def make_contenders(protocol: Protocol) -> dict[str, Contender]:
    """All contenders the protocols may name, with that protocol's diagnostic / fit cadence."""
    diag = {"decompose": True, "diagnostics_every": protocol.diagnostics_every}
    every = [
        Contender("adamw", "AdamW (hidden matrices)", "adamw", grid="adamw"),
        Contender("muon", "Muon, Polar(G)", "muon"),
        Contender("ord_gperp", "ORD Polar(G_perp)", "spectral_ord", {"spectral_lr_mul": 0.0, **diag},
                  lr_from="muon"),
        Contender("ord_par0.5", "ORD Polar(G_perp) + 0.5 G_par (raw)", "spectral_ord",
                  {"spectral_lr_mul": 0.5, **diag}, lr_from="muon"),
        Contender("ord_par1.0", "ORD Polar(G_perp) + 1.0 G_par (raw)", "spectral_ord",
                  {"spectral_lr_mul": 1.0, **diag}, lr_from="muon"),
        Contender("ord_matched1.0", "ORD Polar(G_perp) + 1.0 G_par (matched)", "spectral_ord",
                  {"spectral_lr_mul": 1.0, **diag, "scale_mode": "matched"}, lr_from="muon"),
        Contender("echo", f"SpectralEcho (fit every {protocol.echo_fit_every})", "spectral_echo",
                  {"fit_every": protocol.echo_fit_every}),
    ]
    return {c.name: c for c in every}


def select_contenders(protocol: Protocol, names: list[str] | None, tune_all: bool) -> list[Contender]:
    """The protocol's contenders (or the named subset), in protocol order; lr_from dropped with tune_all.
    A contender whose lr_from is not in the race is tuned itself."""
    known = make_contenders(protocol)
    chosen = list(names) if names else list(protocol.contenders)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; choose from {sorted(known)}")
    out = []
    for name in chosen:
        c = known[name]
        if tune_all or (c.lr_from is not None and c.lr_from not in chosen):
            c = Contender(c.name, c.label, c.optimizer, c.args, c.grid, None)
        if c.grid not in protocol.lr_grids:
            raise ValueError(f"protocol {protocol.name!r} has no lr grid {c.grid!r} (needed by {c.name})")
        out.append(c)
    return out


def lr_text(lr: float) -> str:
    return f"{lr:g}"


def run_tag(contender: str, lr: float, seed: int) -> str:
    """The tag launch_sweep.py gives a run of config `<contender>-lr<lr>` (see its sanitize_tag)."""
    return f"{contender}-lr{lr_text(lr)}-s{seed}"


def config_entry(c: Contender, lr: float) -> dict:
    entry = {"tag": f"{c.name}-lr{lr_text(lr)}", "optimizer": c.optimizer, "lr": lr}
    if c.args:
        entry["optimizer_args"] = dict(c.args)
    return entry


def sweep_spec(protocol: Protocol, name: str, configs: list[dict], seeds: list[int], flags: dict,
               log_dir: str) -> dict:
    return {"name": name, "log_dir": log_dir, "max_parallel": protocol.max_parallel, "env": dict(protocol.env),
            "base": dict(flags), "configs": configs, "seeds": list(seeds)}


def tune_spec(protocol: Protocol, contenders: list[Contender], flags: dict, log_dir: str) -> dict:
    configs = [config_entry(c, lr) for c in contenders if c.lr_from is None for lr in protocol.lr_grids[c.grid]]
    return sweep_spec(protocol, f"race_{protocol.name}_tune", configs, [protocol.tune_seed], flags, log_dir)


def final_spec(protocol: Protocol, contenders: list[Contender], chosen_lr: dict[str, float], flags: dict,
               log_dir: str) -> dict:
    configs = [config_entry(c, chosen_lr[c.name]) for c in contenders]
    return sweep_spec(protocol, f"race_{protocol.name}_final", configs, list(protocol.seeds), flags, log_dir)


# ----------------------------------------------------------------------------------------------- results


def final_loss(log_dir: str, tag: str) -> float | None:
    """Final val loss of a finished run's log; None when the log is missing or the run did not finish."""
    import runlog

    path = runlog.log_path(log_dir, tag)
    if not os.path.exists(path):
        return None
    log = runlog.parse_log(path)
    return log.final_val.loss if log.finished else None


def tuning_curves(protocol: Protocol, contenders: list[Contender], log_dir: str) -> dict:
    """{tag: [[step, val loss, train ms], ...]} of every tuning run that has a log."""
    import runlog

    curves = {}
    for c in contenders:
        if c.lr_from is not None:
            continue
        for lr in protocol.lr_grids[c.grid]:
            path = runlog.log_path(log_dir, run_tag(c.name, lr, protocol.tune_seed))
            if os.path.exists(path):
                curves[os.path.basename(path)[:-4]] = [list(p) for p in runlog.parse_log(path).val]
    return curves


def choose_lrs(protocol: Protocol, contenders: list[Contender], log_dir: str) -> tuple[dict, dict]:
    """(chosen lr per contender, tuning table {contender: {lr text: final loss or None}}).

    A tuned contender takes the lr with the lowest finite final val loss of its tune-seed runs (crashed,
    unfinished or non-finite runs lose); lr_from contenders copy the chosen lr of their source."""
    table, chosen = {}, {}
    for c in contenders:
        if c.lr_from is not None:
            continue
        losses = {lr: final_loss(log_dir, run_tag(c.name, lr, protocol.tune_seed)) for lr in protocol.lr_grids[c.grid]}
        table[c.name] = {lr_text(lr): loss for lr, loss in losses.items()}
        finite = {lr: loss for lr, loss in losses.items() if loss is not None and math.isfinite(loss)}
        if not finite:
            raise RuntimeError(f"no tuning run of {c.name} finished (logs in {log_dir}); run the tune stage first")
        chosen[c.name] = min(finite, key=finite.get)
    for c in contenders:
        if c.lr_from is not None:
            chosen[c.name] = chosen[c.lr_from]
    return chosen, table


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; nan for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def welch_vs(values: list[float], reference: list[float]) -> tuple[float, float]:
    """Welch's two-sided t-test of values against reference: (t, p); nan when it is undefined."""
    if len(values) < 2 or len(reference) < 2:
        return math.nan, math.nan
    from scipy import stats

    result = stats.ttest_ind(values, reference, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def to_target(val_points, target: float) -> tuple[int | None, float | None]:
    """(step, training seconds) of the first validation at or below target; (None, None) if never reached."""
    for point in val_points:
        if math.isfinite(point.loss) and point.loss <= target:
            return point.step, point.train_time_ms / 1000
    return None, None


def resolve_target(protocol: Protocol, flags: dict) -> tuple[float, str]:
    """The protocol's target and where it comes from (a fixed value or the unigram model of the same data)."""
    if protocol.target is not None:
        return protocol.target, "fixed by the protocol"
    from data.shards import unigram_cross_entropy

    import train_gpt

    cfg = train_gpt.parse_config(flag_argv(flags))
    cwd = os.getcwd()
    os.chdir(REPO)  # data paths of the presets are relative to the repository
    try:
        value = unigram_cross_entropy(cfg.train_files, cfg.val_files, vocab_size=50257, val_tokens=cfg.val_tokens)
    finally:
        os.chdir(cwd)
    return round(value, 4), (f"the unigram model of the train tokens (add-one smoothing) scored on the same "
                             f"{cfg.val_tokens} val tokens")


def collect_results(protocol: Protocol, contenders: list[Contender], chosen_lr: dict, log_dir: str,
                    target: float) -> dict:
    """Per contender: its runs (final loss, steps / seconds to target, val curve) and the statistics."""
    import runlog

    results = {}
    for c in contenders:
        runs = []
        for seed in protocol.seeds:
            tag = run_tag(c.name, chosen_lr[c.name], seed)
            path = runlog.log_path(log_dir, tag)
            log = runlog.parse_log(path) if os.path.exists(path) else None
            if log is None or not log.finished:
                runs.append({"tag": tag, "seed": seed, "finished": False})
                continue
            step, seconds = to_target(log.val, target)
            runs.append({"tag": tag, "seed": seed, "finished": True, "final_val_loss": log.final_val.loss,
                         "train_time_s": log.final_val.train_time_ms / 1000, "steps_to_target": step,
                         "train_s_to_target": seconds,
                         "val": [[p.step, p.loss, p.train_time_ms] for p in log.val]})
        losses = [r["final_val_loss"] for r in runs if r["finished"]]
        mean, std = mean_std(losses)
        reached = [r for r in runs if r.get("steps_to_target") is not None]
        results[c.name] = {
            "label": c.label, "optimizer": c.optimizer, "optimizer_args": dict(c.args),
            "lr": chosen_lr[c.name], "lr_source": f"tuned on {c.lr_from}" if c.lr_from else "tuned",
            "runs": runs, "n": len(losses), "final_val_mean": mean, "final_val_std": std,
            "reached_target": len(reached),
            "steps_to_target_mean": mean_std([r["steps_to_target"] for r in reached])[0],
            "train_s_to_target_mean": mean_std([r["train_s_to_target"] for r in reached])[0],
            "train_s_mean": mean_std([r["train_time_s"] for r in runs if r["finished"]])[0],
        }
    reference = [r["final_val_loss"] for r in results.get("muon", {}).get("runs", []) if r["finished"]]
    for name, res in results.items():
        losses = [r["final_val_loss"] for r in res["runs"] if r["finished"]]
        t, p = welch_vs(losses, reference) if name != "muon" else (math.nan, math.nan)
        res["vs_muon"] = {"diff": res["final_val_mean"] - mean_std(reference)[0] if reference else math.nan,
                          "welch_t": t, "p_value": p}
    return results


DIAGNOSTIC_KEYS = ("rho", "spectral_frac", "term_ratio", "cos_polar_w", "w_norm")
LOG_KEYS = ("spectral_frac", "term_ratio", "w_norm")  # positive quantities spanning decades: log axes


def matrix_kind(record: dict) -> str:
    """attn_q/k/v/o (slices of the merged (4, d, d) weight, or separate weights), mlp_fc, mlp_proj, or the name."""
    name = record.get("name", "")
    if "qkvo" in name and "slice" in record:
        return "attn_" + "qkvo"[record["slice"]]
    for part, kind in (("q_w", "attn_q"), ("k_w", "attn_k"), ("v_w", "attn_v"), ("o_w", "attn_o"),
                       ("fc_w", "mlp_fc"), ("proj_w", "mlp_proj")):
        if name.endswith(part):
            return kind
    return name


def _quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    if not ordered:
        return {}

    def q(frac: float) -> float:
        return ordered[min(len(ordered) - 1, int(frac * (len(ordered) - 1) + 0.5))]

    return {"median": q(0.5), "p10": q(0.1), "p90": q(0.9), "min": ordered[0], "max": ordered[-1],
            "n": len(ordered)}


def diagnostics_summary(log_dir: str, tags: list[str], optimizer: str = "spectral_ord") -> dict:
    """Pool the per-matrix diagnostics of runs (`<log_dir>/<tag>.<optimizer>.jsonl`, written by train_gpt.py).

    Returns {"by_step": {step: {key: quantiles over matrices and runs}}, "by_kind": {kind: {key: quantiles over
    steps >= the first diagnostic after step 0}}, "files": n}. Keys: DIAGNOSTIC_KEYS. Records with W = 0 or
    G = 0 are left out (their ratios are 0 by convention, not measured): zero-initialised projections at step 0,
    and every matrix at step 0 when the head starts at zero (no gradient reaches the hidden weights).
    """
    by_step: dict[int, dict[str, list]] = {}
    by_kind: dict[str, dict[str, list]] = {}
    files = 0
    for tag in tags:
        path = os.path.join(log_dir, f"{tag}.{optimizer}.jsonl")
        if not os.path.exists(path):
            continue
        files += 1
        with open(path) as f:
            for line in f:
                entry = json.loads(line)
                for record in entry["matrices"]:
                    if not record.get("w_norm") or not record.get("g_norm"):
                        continue
                    for key in DIAGNOSTIC_KEYS:
                        value = record.get(key)
                        if value is None:
                            continue
                        by_step.setdefault(entry["step"], {}).setdefault(key, []).append(value)
                        if entry["step"] > 0:
                            by_kind.setdefault(matrix_kind(record), {}).setdefault(key, []).append(value)
    return {"files": files,
            "by_step": {step: {k: _quantiles(v) for k, v in keys.items()} for step, keys in sorted(by_step.items())},
            "by_kind": {kind: {k: _quantiles(v) for k, v in keys.items()} for kind, keys in sorted(by_kind.items())}}


def diagnostics_table(summary: dict, by: str = "by_step") -> str:
    """Markdown: median [p10, p90] of each diagnostic per step (or per matrix kind)."""
    head = "step" if by == "by_step" else "matrix"
    lines = [f"| {head} | " + " | ".join(f"{k} median [p10, p90]" for k in DIAGNOSTIC_KEYS) + " |",
             "|" + "---|" * (len(DIAGNOSTIC_KEYS) + 1)]
    for row, keys in summary[by].items():
        cells = []
        for key in DIAGNOSTIC_KEYS:
            q = keys.get(key)
            cells.append(f"{q['median']:.3g} [{q['p10']:.3g}, {q['p90']:.3g}]" if q else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_diagnostics(diagnostics: dict, out: str) -> str:
    """One panel per diagnostic: median over matrices and runs vs step, p10-p90 band, one line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DIAGNOSTIC_KEYS), figsize=(4.5 * len(DIAGNOSTIC_KEYS), 3.8),
                             constrained_layout=True)
    for i, (name, summary) in enumerate(diagnostics.items()):
        steps = [int(s) for s in summary["by_step"]]
        for ax, key in zip(axes, DIAGNOSTIC_KEYS):
            rows = [summary["by_step"][s].get(key) for s in summary["by_step"]]
            keep = [(x, q) for x, q in zip(steps, rows) if q and (key not in LOG_KEYS or q["p10"] > 0)]
            if not keep:
                continue
            x = [k for k, _ in keep]
            ax.plot(x, [q["median"] for _, q in keep], color=f"C{i % 10}", marker=".", label=name)
            ax.fill_between(x, [q["p10"] for _, q in keep], [q["p90"] for _, q in keep], color=f"C{i % 10}",
                            alpha=0.15, lw=0)
    for ax, key in zip(axes, DIAGNOSTIC_KEYS):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if key in LOG_KEYS:
            ax.set_yscale("log")
        elif key == "rho":  # signed, spanning decades
            ax.set_yscale("symlog", linthresh=1e-4)
    axes[0].legend(fontsize=8)
    fig.suptitle("spectral-ORD diagnostics: median over matrices and seeds, p10-p90 band")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------- timing


def flag_argv(flags: dict) -> list[str]:
    """train_gpt.py argv for a flag dict (booleans as --x / --no-x), as launch_sweep.py renders them."""
    import launch_sweep

    argv = []
    for key, value in flags.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", launch_sweep._format_value(value)]
    return argv


def time_optimizer_steps(protocol: Protocol, contenders: list[Contender], chosen_lr: dict, flags: dict,
                         steps: int | None = None, warmup: int | None = None) -> dict:
    """Median and total time of the matrix optimizer's step(), DistAdam's step() and the whole step, per contender.

    Each contender gets its own model (same seed) and loader. On CPU all models are built first and the steps
    are interleaved (one step of each contender in turn) so that load changes of a shared machine hit all of
    them alike; on CUDA (a dedicated device, and models too large to keep several) the contenders run one after
    the other, each freed before the next. The loop is train_gpt.py's: every micro-batch's forward and backward
    (and SpectralEcho's replicate recording), lr / momentum schedule, the optimizers' step().
    Returns {contender: {...ms..., "matrix_share": matrix step / whole step, "adam_share", "steps"}}.
    """
    import torch

    steps = protocol.timing_steps if steps is None else steps
    warmup = protocol.timing_warmup if warmup is None else warmup
    cwd, threads = os.getcwd(), torch.get_num_threads()
    if protocol.env.get("OMP_NUM_THREADS"):  # the runs' thread count (1 thread is far faster on a shared 2-core box)
        torch.set_num_threads(int(protocol.env["OMP_NUM_THREADS"]))
    os.chdir(REPO)
    times: dict[str, list[dict]] = {c.name: [] for c in contenders}
    try:
        if protocol.cpu:
            states = {c.name: _timing_state(c, chosen_lr[c.name], flags) for c in contenders}
            for step in range(warmup + steps):
                for name, state in states.items():
                    timings = _timed_step(state, step)
                    if step >= warmup:
                        times[name].append(timings)
        else:
            for c in contenders:
                state = _timing_state(c, chosen_lr[c.name], flags)
                for step in range(warmup + steps):
                    timings = _timed_step(state, step)
                    if step >= warmup:
                        times[c.name].append(timings)
                del state
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    out = {}
    for name, rows in times.items():
        cols = {key: [t[key] for t in rows] for key in ("forward_backward", "adam", "matrix", "total")}
        out[name] = {f"{key}_ms_median": 1000 * statistics.median(v) for key, v in cols.items()}
        out[name].update({f"{key}_ms_mean": 1000 * sum(v) / len(v) for key, v in cols.items()})
        out[name]["matrix_share"] = sum(cols["matrix"]) / sum(cols["total"])
        out[name]["adam_share"] = sum(cols["adam"]) / sum(cols["total"])
        out[name]["steps"] = len(rows)
    return out


def _timing_state(c: Contender, lr: float, flags: dict) -> dict:
    """Model, optimizers and loader of one contender, built as train_gpt.py builds them (world size 1)."""
    import torch

    import train_gpt
    from data.shards import DistributedTokenLoader

    cfg = train_gpt.parse_config(flag_argv({**flags, "optimizer": c.optimizer, "lr": lr, "optimizer_args": c.args}))
    accum = train_gpt.validate_config(cfg, world_size=1)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.manual_seed(cfg.seed)
    model = train_gpt.GPT(cfg).to(device)
    opts = train_gpt.build_optimizers(model, cfg)
    rows = cfg.micro_batch_tokens // cfg.seq_len
    loader = DistributedTokenLoader(cfg.train_files, rows, cfg.seq_len, align_to_bos=cfg.align_to_bos,
                                    bos_id=cfg.bos_id, device=device)
    step_model = torch.compile(model, dynamic=False) if cfg.compile else model
    return dict(cfg=cfg, accum=accum, device=device, model=model, step_model=step_model, opts=opts, loader=loader)


def _timed_step(s: dict, step: int) -> dict:
    """One training step of a timing state at schedule position `step`; seconds per phase."""
    import torch

    import train_gpt

    cfg, device, model, opts = s["cfg"], s["device"], s["model"], s["opts"]
    record_replicate = getattr(opts[1], "add_replicate_gradients", None)
    use_flex = device.type == "cuda"

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    window = train_gpt.window_tokens_at(cfg, step)
    sync()
    t0 = time.perf_counter()
    for _ in range(s["accum"]):
        inputs, targets = s["loader"].next_batch()
        with train_gpt.autocast(device):
            loss = s["step_model"](inputs, targets, train_gpt.model_masks(s["step_model"], inputs, window, use_flex))
        (loss / s["accum"]).backward()
        if record_replicate is not None:
            record_replicate()
    mult, mom = train_gpt.lr_multiplier(cfg, step), train_gpt.momentum_at(cfg, step)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
    for group in opts[1].param_groups:
        group["momentum"] = mom
    sync()
    t1 = time.perf_counter()
    opts[0].step()
    sync()
    t2 = time.perf_counter()
    opts[1].step()
    sync()
    t3 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return {"forward_backward": t1 - t0, "adam": t2 - t1, "matrix": t3 - t2, "total": t3 - t0}


# ----------------------------------------------------------------------------------------------- report


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _p_text(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "-"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def results_table(results: dict, timing: dict | None, target: float) -> str:
    header = ("| contender | lr | final val loss (mean ± std) | n | diff vs Muon | Welch p vs Muon | "
              f"reached {target:g} | steps to target | train s to target | matrix opt. step share |")
    lines = [header, "|" + "---|" * 10]
    for name, r in results.items():
        share = timing.get(name, {}).get("matrix_share") if timing else None
        lines.append(
            f"| {r['label']} (`{name}`) | {lr_text(r['lr'])}{'' if r['lr_source'] == 'tuned' else ' *'} | "
            f"{_fmt(r['final_val_mean'])} ± {_fmt(r['final_val_std'])} | {r['n']} | "
            f"{'-' if name == 'muon' else _fmt(r['vs_muon']['diff'], 4)} | "
            f"{'-' if name == 'muon' else _p_text(r['vs_muon']['p_value'])} | "
            f"{r['reached_target']}/{len(r['runs'])} | {_fmt(r['steps_to_target_mean'], 1)} | "
            f"{_fmt(r['train_s_to_target_mean'], 1)} | {'-' if share is None else f'{100 * share:.1f}%'} |")
    return "\n".join(lines)


def tuning_table(table: dict, chosen: dict) -> str:
    lines = ["| contender | lr: final val loss (tune seed) | chosen |", "|---|---|---|"]
    for name, losses in table.items():
        cells = ", ".join(f"{lr}: {_fmt(loss)}" for lr, loss in losses.items())
        edge = list(losses)
        note = " (grid edge)" if lr_text(chosen[name]) in (edge[0], edge[-1]) and len(edge) > 1 else ""
        lines.append(f"| `{name}` | {cells} | {lr_text(chosen[name])}{note} |")
    return "\n".join(lines)


def timing_table(timing: dict) -> str:
    lines = ["| contender | whole step ms (median) | fwd+bwd ms | DistAdam step ms | matrix opt. step ms | "
             "matrix share (mean) |", "|---|---|---|---|---|---|"]
    for name, t in timing.items():
        lines.append(f"| `{name}` | {t['total_ms_median']:.1f} | {t['forward_backward_ms_median']:.1f} | "
                     f"{t['adam_ms_median']:.1f} | {t['matrix_ms_median']:.1f} | {100 * t['matrix_share']:.1f}% |")
    return "\n".join(lines)


def write_report(out_dir: str, protocol: Protocol, flags: dict, target: float, target_source: str,
                 results: dict, tuning: dict, chosen: dict, timing: dict | None, commands: list[str],
                 log_dir: str, diagnostics: dict | None = None, curves: dict | None = None) -> dict:
    """results.json, README.md and loss.png in out_dir (plus ord_diagnostics.png with diagnostics).
    A hand-written `notes.md` in out_dir, if present, is included in README.md (it survives regeneration).
    Returns the JSON document."""
    import plot_loss
    import runlog

    doc = {
        "protocol": {**asdict(protocol), "flags": flags}, "target": target, "target_source": target_source,
        "chosen_lr": chosen, "tuning": tuning, "results": results, "timing": timing,
        "diagnostics": diagnostics or {}, "tuning_curves": curves or {}, "commands": commands, "log_dir": log_dir,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=lambda x: None)
        f.write("\n")
    logs = [runlog.parse_log(runlog.log_path(log_dir, r["tag"]))
            for res in results.values() for r in res["runs"] if r["finished"]]
    plot_path = os.path.join(out_dir, "loss.png")
    if logs:
        plot_loss.plot_runs(logs, plot_path, target=target, band="std",
                            title=f"optimizer race, protocol {protocol.name}: mean ± 1 std over seeds")
    text = [f"# Optimizer race, protocol `{protocol.name}`", "",
            f"{protocol.description}. Seeds {list(protocol.seeds)}; lr tuned on seed {protocol.tune_seed}.",
            f"Target val loss {target:g}: {target_source}.", ""]
    notes = os.path.join(out_dir, "notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            text += [f.read().rstrip("\n"), ""]
    text += ["## Results (final val loss at the chosen lr)", "", results_table(results, timing, target), "",
            "`*`: lr taken from Muon's tuning (controlled comparison), not tuned for this contender. "
            "Welch p: two-sided, scipy.stats.ttest_ind(equal_var=False) of the final val losses against Muon's. "
            "Steps / train s to target: mean over the seeds that reached it, at the first validation at or "
            "below the target (validation every "
            f"{flags.get('val_loss_every')} steps; train s excludes validation).", "",
            "## Learning-rate tuning", "", tuning_table(tuning, chosen), ""]
    if timing:
        text += ["## Optimizer step time", "", timing_table(timing), ""]
    if diagnostics and any(summary["by_step"] for summary in diagnostics.values()):
        plot_diagnostics(diagnostics, os.path.join(out_dir, "ord_diagnostics.png"))
        text += ["![spectral-ORD diagnostics](ord_diagnostics.png)", ""]
    for name, summary in (diagnostics or {}).items():
        text += [f"## Spectral-ORD diagnostics: `{name}` ({summary['files']} runs pooled, all matrices)", "",
                 diagnostics_table(summary, "by_step"), "", diagnostics_table(summary, "by_kind"), ""]
    text += ["## Commands", "", "```", *commands, "```", "", "![loss](loss.png)", ""]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(text))
    return doc


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    parser.add_argument("--out", required=True, help="directory for specs, README.md, results.json, loss.png")
    parser.add_argument("--log-dir", default=None,
                        help="run logs (default: logs/optimizer_race_<protocol> in the repository)")
    parser.add_argument("--stage", choices=("all", "tune", "final", "timing", "report"), default="all",
                        help="all: tune, final, timing, report (finished runs are never rerun)")
    parser.add_argument("--contenders", default=None,
                        help="comma-separated subset, e.g. muon,ord_gperp (default: the protocol's list)")
    parser.add_argument("--tune-all", action="store_true", help="tune every contender (ignore lr_from)")
    parser.add_argument("--max-parallel", type=int, default=None, help="runs at once (default: the protocol's)")
    parser.add_argument("--flag", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train_gpt flag of the protocol (recorded in the outputs)")
    parser.add_argument("--no-timing", action="store_true", help="skip the optimizer step timing")
    parser.add_argument("--dry-run", action="store_true", help="write the specs and print commands; run nothing")
    return parser.parse_args(argv)


def parse_flag_overrides(items: list[str]) -> dict:
    import train_gpt

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--flag {item!r} is not KEY=VALUE (example: --flag num_iterations=40)")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = train_gpt.parse_optimizer_args(f"value={value}")["value"]
    return out


def main(argv: list[str] | None = None) -> int:
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import launch_sweep

    args = parse_args(argv)
    protocol = PROTOCOLS[args.protocol]
    if args.max_parallel is not None:
        if args.max_parallel < 1:
            print("error: --max-parallel must be >= 1", file=sys.stderr)
            return 2
        protocol = Protocol(**{**asdict(protocol), "max_parallel": args.max_parallel})
    try:
        contenders = select_contenders(protocol, args.contenders.split(",") if args.contenders else None,
                                       args.tune_all)
        overrides = parse_flag_overrides(args.flag)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    flags = {**protocol.flags, **overrides}
    log_dir = os.path.abspath(args.log_dir or os.path.join(REPO, "logs", f"optimizer_race_{protocol.name}"))
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    sweep_flags = ["--cpu"] if protocol.cpu else []
    sweep_flags += ["--max-parallel", str(protocol.max_parallel), "--log-dir", log_dir]
    shown_log_dir = os.path.relpath(log_dir, REPO) if log_dir.startswith(REPO + os.sep) else log_dir
    repro = ["python", "bench/optimizer_race.py", "--protocol", protocol.name, "--out", os.path.relpath(out_dir, REPO)]
    for name, value in (("--contenders", args.contenders), ("--max-parallel", args.max_parallel),
                        ("--log-dir", args.log_dir and shown_log_dir)):
        if value:
            repro += [name, str(value)]
    repro += ["--tune-all"] * args.tune_all + [f"--flag={item}" for item in args.flag]

    def launch(spec: dict, file_name: str) -> int:
        path = os.path.join(out_dir, file_name)
        with open(path, "w") as f:
            json.dump(spec, f, indent=1)
            f.write("\n")
        command = ["python", "launch_sweep.py", os.path.relpath(path, REPO), *sweep_flags]
        print("$ " + shlex.join(command), flush=True)
        return launch_sweep.main([path, *sweep_flags, *(["--dry-run"] if args.dry_run else [])])

    stages = ("tune", "final", "timing", "report") if args.stage == "all" else (args.stage,)
    if "tune" in stages:
        if launch(tune_spec(protocol, contenders, flags, shown_log_dir), "tune.json") not in (0, 1):
            return 2
        if args.dry_run:
            return 0
    chosen, tuning = choose_lrs(protocol, contenders, log_dir)
    if "final" in stages:
        launch(final_spec(protocol, contenders, chosen, flags, shown_log_dir), "final.json")
        if args.dry_run:
            return 0
    timing_path = os.path.join(out_dir, "timing.json")
    timing = None
    if "timing" in stages and not args.no_timing:
        print(f"timing optimizer steps ({protocol.timing_warmup} warm-up + {protocol.timing_steps} steps each, "
              "interleaved)...", flush=True)
        timing = time_optimizer_steps(protocol, contenders, chosen, flags)
        with open(timing_path, "w") as f:
            json.dump(timing, f, indent=1)
            f.write("\n")
    elif os.path.exists(timing_path):
        with open(timing_path) as f:
            timing = json.load(f)
    if "report" in stages:
        target, source = resolve_target(protocol, flags)
        results = collect_results(protocol, contenders, chosen, log_dir, target)
        shown_sweep_flags = [shown_log_dir if f == log_dir else f for f in sweep_flags]
        commands = ["# the whole race (each stage skips finished runs):", shlex.join(repro),
                    "# which runs these sweeps (from the repository root) and then times and reports:"]
        commands += [shlex.join(["python", "launch_sweep.py", os.path.relpath(os.path.join(out_dir, n), REPO),
                                 *shown_sweep_flags]) for n in ("tune.json", "final.json")]
        diagnostics = {c.name: diagnostics_summary(log_dir, [r["tag"] for r in results[c.name]["runs"]], c.optimizer)
                       for c in contenders if c.args.get("diagnostics_every")}
        write_report(out_dir, protocol, flags, target, source, results, tuning, chosen, timing, commands, log_dir,
                     diagnostics, tuning_curves(protocol, contenders, log_dir))
        print(open(os.path.join(out_dir, "README.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
