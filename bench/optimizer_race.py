"""Optimizer race: one fixed protocol, every matrix optimizer, paired seeds, controls; a table, plots and JSON.

    python bench/optimizer_race.py --protocol cpu --out records/optimizer_race/<date>_cpu
    python bench/optimizer_race.py --protocol gpu-1 --out records/optimizer_race/<date>_gpu1   # one GPU
    python bench/optimizer_race.py --protocol cpu --out DIR --stage report                      # outputs only
    python bench/optimizer_race.py --protocol cpu --out DIR --dry-run                           # specs + run counts

A protocol (PROTOCOLS) fixes the train_gpt.py flags (preset, data, token budget, validation), a learning-rate grid
per optimizer family, the seeds and how the target loss is set. Seeds are paired: a seed fixes the model's
initialisation and the training rows (the CPU presets draw rows at random from the seed), so contender A and
contender B at seed s start from the same weights and see the same batches. Stages, each resumable (finished runs
are skipped; launch_sweep.py restarts unfinished ones):
  1. tune:    every tuned contender at every lr of its grid (>= 5 points), on the tune seed only, which is left out
              of every comparison. A grid whose best lr is at an edge is extended by one point beyond that edge
              (same ratio), up to `max_grid_extensions` times, until the best lr is interior. `<out>/grids.json`
              keeps the grids (so a resumed race continues them), `<out>/tune.json` is the last sweep spec.
  2. final:   `<out>/final.json`: every contender at its chosen lr on the final seeds; `<out>/aa.json`: Muon at its
              lr on a second seed set (the A/A control). Contenders with `lr_from` (controlled variants of Muon or
              of the fitted echo) take that contender's tuned lr; --tune-all tunes them too.
  3. timing:  optimizer.step time as a share of the whole step, in this process, same model config, after
              warm-up; on CPU the contenders are interleaved step by step (machine load drifts hit all alike).
  4. report:  `<out>/README.md`, `<out>/results.json`, `<out>/loss.png` (val loss vs step and time, mean and
              +-1 std over seeds), `<out>/paired_diff.png` (each contender minus Muon, mean and 95% CI).
Measures per run: the final val loss, and the steps to the target val loss (linear interpolation between the two
validations around the first one at or below the target). Statistics against Muon, seed by seed: the paired
difference, its 95% t interval and the paired t-test (scipy.stats.ttest_rel, two-sided); Holm's adjustment over
the contenders. Controls, evaluated before anything else is reported (a failed control withholds the verdicts):
  - positive control: AdamW against Muon at their tuned lrs, paired test p < alpha_control, Muon lower;
  - A/A check: Muon on the final seeds against Muon on the A/A seeds (paired in order), p >= alpha_aa;
  - tuning: every tuned contender's chosen lr is interior to its grid.
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
from dataclasses import asdict, dataclass, field, replace

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
    family: str = "baseline"  # verdict group: baseline, ord, brake, echo


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    flags: dict  # train_gpt.py flags shared by every run (Hyperparameters field names)
    lr_grids: dict  # grid name -> learning rates (ascending)
    tune_seed: int = 0  # lr tuning only; never in a comparison
    seeds: tuple = (1, 2, 3, 4, 5)  # the paired seeds of every comparison
    aa_seeds: tuple = (6, 7, 8, 9, 10)  # Muon's second seed set for the A/A check
    target: float | None = None  # val loss target; None: derived from the tuning runs (see resolve_target)
    target_frac: float = 0.5  # derived target: the tuned Muon tune-seed run's val loss at this fraction of the run
    max_grid_extensions: int = 3  # extra points per grid when its best lr is at an edge
    alpha_control: float = 0.01  # the positive control needs a paired p below this
    alpha_aa: float = 0.05  # the A/A check fails at a paired p below this
    cpu: bool = True  # launch with --cpu (gloo, CUDA hidden)
    max_parallel: int = 1
    env: dict = field(default_factory=dict)  # extra environment of every run
    diagnostics_every: int = 10  # spectral-ORD diagnostics cadence
    echo_fit_every: int = 10  # SpectralEcho fit cadence
    contenders: tuple = ("adamw", "muon", "normuon", "ord_gperp", "ord_par0.5", "ord_par1.0", "ord_matched0.5",
                         "ord_matched1.0", "brake", "echo", "echo_fixed", "echo_plateau", "echo_reverb")
    timing_steps: int = 10  # measured steps per contender (one diagnostic / fit step among them)
    timing_warmup: int = 2


# cpu: the cpu-bytes research setup (byte-level demo corpus, 4 layers, d=128: the hidden matrices carry 0.8M of the
# 0.88M parameters) at 160 steps x 1,024 bytes; 4 micro-batches of 2 random 128-byte rows per step, the same split
# for every optimizer (SpectralEcho fits its curve from >= 4 replicates). A run takes ~65 s of CPU time (measured
# under load: 57 s user with 16K val bytes; 32K adds ~12 s; echo modes add their overhead), so the ~100 runs (30
# tuning, 65 final, 5 A/A) fit 90 min with two 1-thread runs at a time on an idle 2-core machine.
PROTOCOLS: dict[str, Protocol] = {
    "cpu": Protocol(
        name="cpu",
        description="cpu-bytes model (byte-level demo corpus), 160 steps x 1,024 bytes (4 micro-batches of 2 random "
                    "128-byte rows), val on the first 32,768 val bytes every 20 steps",
        flags=dict(preset="cpu-bytes", num_iterations=160, micro_batch_tokens=256, batch_tokens=1024,
                   val_loss_every=20, val_tokens=32768, momentum_warmup_steps=32, report_baselines=False,
                   print_every=40),
        lr_grids={"adamw": [0.001, 0.0014, 0.002, 0.0028, 0.004], "muon": [0.014, 0.02, 0.028, 0.04, 0.057]},
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        max_parallel=2,
        # the echo modes that shrink every direction (plateau: rho x soft sign) need several times Muon's lr, so
        # their grids, which start at Muon's, may need more than 3 points beyond its high edge
        max_grid_extensions=5,
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
        lr_grids={"adamw": [3e-4, 6e-4, 1e-3, 2e-3, 3e-3], "muon": [0.01, 0.015, 0.025, 0.04, 0.06]},
        target=4.0, cpu=False, diagnostics_every=25, echo_fit_every=25, timing_steps=25,
    ),
    # toy: seconds per run, for the test that keeps this script working (not a measurement).
    "toy": Protocol(
        name="toy",
        description="2-layer d=32 model, 4 steps x 256 tokens: a smoke test of the machinery, not a measurement",
        flags=dict(preset="cpu-tiny", num_iterations=4, val_loss_every=2, report_baselines=False, num_layers=2,
                   model_dim=32, num_heads=2, head_dim=16, seq_len=64, micro_batch_tokens=64, batch_tokens=256,
                   val_seq_len=128, val_tokens=512, skip_connections="0:1", long_window_layers="0",
                   num_value_embeds=1, max_window_tokens=64, window_block=16, momentum_warmup_steps=2),
        lr_grids={"adamw": [3e-3, 6e-3], "muon": [0.02, 0.04]},
        seeds=(1, 2), aa_seeds=(3, 4), max_grid_extensions=1, env={"OMP_NUM_THREADS": "1"}, max_parallel=3,
        diagnostics_every=2, echo_fit_every=2, contenders=("adamw", "muon", "ord_par1.0"), timing_steps=2,
        timing_warmup=1,
    ),
}

# The fit mode's fixed curve: soft sign without floor, c / ||X||_F^2 = 0.01 (~ the mean s_i^2 / ||X||_F^2 of a
# 128-wide matrix; also plateau's default shape). plateau's rho and reverb_svd's zeta have no fixed form: they are
# estimates by construction, under fixed shape constants (plateau: c_rel 1e-2).
ECHO_FIXED_C_REL = 0.01


def make_contenders(protocol: Protocol) -> dict[str, Contender]:
    """All contenders the protocols may name, with that protocol's diagnostic / fit cadence."""
    diag = {"decompose": True, "diagnostics_every": protocol.diagnostics_every}
    fit = {"fit_every": protocol.echo_fit_every}
    every = [
        Contender("adamw", "AdamW (hidden matrices)", "adamw", grid="adamw"),
        Contender("muon", "Muon, Polar(G)", "muon"),
        Contender("normuon", "NorMuon", "normuon"),
        Contender("ord_gperp", "ORD Polar(G_perp)", "spectral_ord", {"spectral_lr_mul": 0.0, **diag},
                  lr_from="muon", family="ord"),
        Contender("ord_par0.5", "ORD Polar(G_perp) + 0.5 G_par (raw)", "spectral_ord",
                  {"spectral_lr_mul": 0.5, **diag}, lr_from="muon", family="ord"),
        Contender("ord_par1.0", "ORD Polar(G_perp) + 1.0 G_par (raw)", "spectral_ord",
                  {"spectral_lr_mul": 1.0, **diag}, lr_from="muon", family="ord"),
        Contender("ord_matched0.5", "ORD Polar(G_perp) + 0.5 G_par (matched)", "spectral_ord",
                  {"spectral_lr_mul": 0.5, **diag, "scale_mode": "matched"}, lr_from="muon", family="ord"),
        Contender("ord_matched1.0", "ORD Polar(G_perp) + 1.0 G_par (matched)", "spectral_ord",
                  {"spectral_lr_mul": 1.0, **diag, "scale_mode": "matched"}, lr_from="muon", family="ord"),
        Contender("brake", "Muon + radial brake (outward 0.5)", "spectral_ord", {"brake_outward": 0.5},
                  lr_from="muon", family="brake"),
        Contender("echo", f"SpectralEcho fit: soft sign with floor, fitted every {protocol.echo_fit_every}",
                  "spectral_echo", {"mode": "fit", **fit}, family="echo"),
        Contender("echo_fixed", f"SpectralEcho fit: fixed soft sign, c_rel {ECHO_FIXED_C_REL:g}", "spectral_echo",
                  {"mode": "fit", "c_rel": ECHO_FIXED_C_REL}, lr_from="echo", family="echo"),
        Contender("echo_plateau", f"SpectralEcho plateau: rho every {protocol.echo_fit_every} x fixed soft sign",
                  "spectral_echo", {"mode": "plateau", **fit}, family="echo"),
        Contender("echo_reverb", f"SpectralEcho reverb_svd: reverb zeta every {protocol.echo_fit_every}",
                  "spectral_echo", {"mode": "reverb_svd", **fit}, family="echo"),
    ]
    return {c.name: c for c in every}


def registered_optimizers() -> set[str]:
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from optimizers import OPTIMIZERS

    return set(OPTIMIZERS)


def select_contenders(protocol: Protocol, names: list[str] | None, tune_all: bool
                      ) -> tuple[list[Contender], dict[str, str]]:
    """(the contenders in protocol order, {left-out name: why}). Named contenders must exist; protocol contenders
    whose optimizer is not registered yet are left out with a reason. lr_from is dropped with tune_all or when
    its source is not racing (the contender is then tuned itself)."""
    known = make_contenders(protocol)
    chosen = list(names) if names else list(protocol.contenders)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; choose from {sorted(known)}")
    registered = registered_optimizers()
    left_out = {n: f"optimizer {known[n].optimizer!r} is not registered in optimizers.OPTIMIZERS"
                for n in chosen if known[n].optimizer not in registered}
    if names and left_out:
        raise ValueError(f"contenders {sorted(left_out)} need optimizers that are not registered: "
                         f"{sorted({known[n].optimizer for n in left_out})}")
    racing = [n for n in chosen if n not in left_out]
    out = []
    for name in racing:
        c = known[name]
        if tune_all or (c.lr_from is not None and c.lr_from not in racing):
            c = replace(c, lr_from=None)
        if c.grid not in protocol.lr_grids:
            raise ValueError(f"protocol {protocol.name!r} has no lr grid {c.grid!r} (needed by {c.name})")
        out.append(c)
    return out, left_out


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


def tuned(contenders: list[Contender]) -> list[Contender]:
    return [c for c in contenders if c.lr_from is None]


def tune_spec(protocol: Protocol, contenders: list[Contender], grids: dict, flags: dict, log_dir: str) -> dict:
    configs = [config_entry(c, lr) for c in tuned(contenders) for lr in grids[c.name]]
    return sweep_spec(protocol, f"race_{protocol.name}_tune", configs, [protocol.tune_seed], flags, log_dir)


def final_spec(protocol: Protocol, contenders: list[Contender], chosen_lr: dict[str, float], flags: dict,
               log_dir: str) -> dict:
    configs = [config_entry(c, chosen_lr[c.name]) for c in contenders]
    return sweep_spec(protocol, f"race_{protocol.name}_final", configs, list(protocol.seeds), flags, log_dir)


def aa_spec(protocol: Protocol, contenders: list[Contender], chosen_lr: dict[str, float], flags: dict,
            log_dir: str) -> dict:
    muon = next(c for c in contenders if c.name == "muon")
    return sweep_spec(protocol, f"race_{protocol.name}_aa", [config_entry(muon, chosen_lr["muon"])],
                      list(protocol.aa_seeds), flags, log_dir)


# ----------------------------------------------------------------------------------------------- tuning


def final_loss(log_dir: str, tag: str) -> float | None:
    """Final val loss of a run; inf when it stopped with an error (e.g. a non-finite loss: that lr loses);
    None when its log is missing or the run has not finished."""
    import runlog

    path = runlog.log_path(log_dir, tag)
    if not os.path.exists(path):
        return None
    log = runlog.parse_log(path)
    if log.finished:
        return log.final_val.loss if math.isfinite(log.final_val.loss) else math.inf
    return math.inf if log.crashed else None


def extend_grid(grid: list[float], losses: list[float | None]) -> list[float] | None:
    """The grid with one more point beyond the edge holding the lowest loss (same ratio as the edge's neighbour,
    2 significant digits), or None when the lowest loss is interior. Losses must all be known (inf: diverged)."""
    best = min(range(len(grid)), key=lambda i: losses[i])
    if len(grid) < 2 or 0 < best < len(grid) - 1:
        return None
    if best == 0:
        return [float(f"{grid[0] ** 2 / grid[1]:.2g}")] + list(grid)
    return list(grid) + [float(f"{grid[-1] ** 2 / grid[-2]:.2g}")]


def tuning_table(protocol: Protocol, contenders: list[Contender], grids: dict, log_dir: str) -> dict:
    """{contender: {lr: final loss of the tune-seed run or None}} for every tuned contender."""
    return {c.name: {lr: final_loss(log_dir, run_tag(c.name, lr, protocol.tune_seed)) for lr in grids[c.name]}
            for c in tuned(contenders)}


def choose_lrs(protocol: Protocol, contenders: list[Contender], grids: dict, log_dir: str
               ) -> tuple[dict, dict, dict]:
    """(chosen lr per contender, tuning table {contender: {lr text: loss}}, {contender: "interior" | "low edge" |
    "high edge"}). A tuned contender takes the lr with the lowest final val loss of its tune-seed runs; lr_from
    contenders copy the chosen lr of their source."""
    table, chosen, position = {}, {}, {}
    for name, losses in tuning_table(protocol, contenders, grids, log_dir).items():
        missing = [lr for lr, loss in losses.items() if loss is None]
        if missing:
            raise RuntimeError(f"tuning runs of {name} at lr {missing} have not finished (logs in {log_dir}); "
                               "run the tune stage first")
        finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
        if not finite:
            raise RuntimeError(f"every tuning run of {name} diverged (lrs {list(losses)}); lower its grid")
        chosen[name] = min(finite, key=finite.get)
        table[name] = {lr_text(lr): loss for lr, loss in losses.items()}
        grid = grids[name]
        position[name] = ("low edge" if chosen[name] == grid[0] else
                          "high edge" if chosen[name] == grid[-1] else "interior")
    for c in contenders:
        if c.lr_from is not None:
            chosen[c.name] = chosen[c.lr_from]
    return chosen, table, position


def run_tuning(protocol: Protocol, contenders: list[Contender], flags: dict, log_dir: str, out_dir: str,
               launch, dry_run: bool) -> dict:
    """The tune stage: launch the grids, extend those whose best lr is at an edge, repeat; returns the grids.
    The grids are kept in <out_dir>/grids.json after every round, so an interrupted race resumes them."""
    grids = current_grids(protocol, contenders, out_dir)
    first = {c.name: len(protocol.lr_grids[c.grid]) for c in tuned(contenders)}
    for _ in range(protocol.max_grid_extensions + 1):
        save_grids(out_dir, grids)
        launch(tune_spec(protocol, contenders, grids, flags, log_dir), "tune.json")
        if dry_run:
            break
        table = tuning_table(protocol, contenders, grids, log_dir)
        extended = {}
        for name, losses in table.items():
            values = list(losses.values())
            if None in values or not any(math.isfinite(v) for v in values):
                continue  # unfinished runs (choose_lrs reports them) or all diverged: nothing to extend from
            if len(grids[name]) - first[name] >= protocol.max_grid_extensions:
                continue  # extended as far as the protocol allows: the tuning control reports the edge
            if (wider := extend_grid(grids[name], values)) is not None:
                extended[name] = wider
        if not extended:
            break
        for name, wider in extended.items():
            print(f"tune: {name}'s best lr is at a grid edge; extending its grid to {[lr_text(x) for x in wider]}",
                  flush=True)
        grids.update(extended)
    save_grids(out_dir, grids)
    return grids


def current_grids(protocol: Protocol, contenders: list[Contender], out_dir: str) -> dict[str, list[float]]:
    """The tuned contenders' grids: as kept in <out_dir>/grids.json by an earlier call (extended grids
    included), the protocol's for a contender that has none there yet."""
    path = os.path.join(out_dir, "grids.json")
    saved = {}
    if os.path.exists(path):
        with open(path) as f:
            saved = {name: [float(x) for x in grid] for name, grid in json.load(f).items()}
    return {c.name: saved.get(c.name, list(protocol.lr_grids[c.grid])) for c in tuned(contenders)}


def save_grids(out_dir: str, grids: dict) -> None:
    with open(os.path.join(out_dir, "grids.json"), "w") as f:
        json.dump(grids, f, indent=1)
        f.write("\n")


# ----------------------------------------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; nan for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def paired_stats(values: list[float | None], reference: list[float | None], confidence: float = 0.95) -> dict:
    """Paired comparison of values[i] with reference[i] over the pairs where both are known: n, the mean
    difference (values - reference), its two-sided t interval at `confidence`, and the paired t-test
    (scipy.stats.ttest_rel, two-sided): t, p. nan where undefined (fewer than 2 pairs, or zero spread)."""
    from scipy import stats

    pairs = [(v, r) for v, r in zip(values, reference) if v is not None and r is not None
             and math.isfinite(v) and math.isfinite(r)]
    out = {"n": len(pairs), "mean_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "t": math.nan,
           "p": math.nan}
    if not pairs:
        return out
    diffs = [v - r for v, r in pairs]
    out["mean_diff"] = sum(diffs) / len(diffs)
    if len(pairs) < 2:
        return out
    sd = statistics.stdev(diffs)
    half = stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    out["ci_low"], out["ci_high"] = out["mean_diff"] - half, out["mean_diff"] + half
    if sd > 0:
        result = stats.ttest_rel([v for v, _ in pairs], [r for _, r in pairs])
        out["t"], out["p"] = float(result.statistic), float(result.pvalue)
    return out


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (nan entries are left out and stay nan)."""
    known = sorted((p, name) for name, p in pvalues.items() if math.isfinite(p))
    adjusted, running = {name: math.nan for name in pvalues}, 0.0
    for i, (p, name) in enumerate(known):
        running = max(running, min(1.0, (len(known) - i) * p))
        adjusted[name] = running
    return adjusted


def steps_to_target(val_points, target: float) -> float | None:
    """Steps until the val loss first reaches the target, linearly interpolated between the validation before
    and the first at or below it; None if never reached."""
    previous = None
    for point in val_points:
        if math.isfinite(point.loss) and point.loss <= target:
            if previous is None or previous.loss == point.loss:
                return float(point.step)
            fraction = (previous.loss - target) / (previous.loss - point.loss)
            return previous.step + fraction * (point.step - previous.step)
        previous = point if math.isfinite(point.loss) else None
    return None


def resolve_target(protocol: Protocol, chosen: dict, flags: dict, log_dir: str) -> tuple[float, str]:
    """The protocol's fixed target, or the val loss of the tuned Muon's tune-seed run at the first validation at or
    after target_frac of the run (fixed before any final run exists, from a seed that no comparison uses)."""
    import runlog

    if protocol.target is not None:
        return protocol.target, "fixed by the protocol"
    tag = run_tag("muon", chosen["muon"], protocol.tune_seed)
    points = runlog.parse_log(runlog.log_path(log_dir, tag)).val
    step = protocol.target_frac * flags["num_iterations"]
    point = next(p for p in points if p.step >= step)
    return round(point.loss, 4), (f"the val loss of the tuned Muon's tuning run ({tag}) at step {point.step} "
                                  f"({protocol.target_frac:g} of the run)")


# ----------------------------------------------------------------------------------------------- results


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _p_text(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "-"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _interval(stats: dict | None, digits: int = 4) -> str:
    if not stats or not math.isfinite(stats["mean_diff"]):
        return "-"
    if not math.isfinite(stats["ci_low"]):
        return f"{stats['mean_diff']:+.{digits}f}"
    return f"{stats['mean_diff']:+.{digits}f} [{stats['ci_low']:+.{digits}f}, {stats['ci_high']:+.{digits}f}]"


def run_record(log_dir: str, tag: str, seed: int, target: float) -> dict:
    """One run's numbers from its log: final val loss, steps to target, train seconds, the val curve."""
    import runlog

    path = runlog.log_path(log_dir, tag)
    log = runlog.parse_log(path) if os.path.exists(path) else None
    if log is None or not log.finished:
        crashed = bool(log and log.crashed)
        return {"tag": tag, "seed": seed, "finished": False, "diverged": crashed,
                "final_val_loss": math.inf if crashed else None, "steps_to_target": None}
    return {"tag": tag, "seed": seed, "finished": True, "diverged": False, "final_val_loss": log.final_val.loss,
            "steps_to_target": steps_to_target(log.val, target), "train_time_s": log.final_val.train_time_ms / 1000,
            "val": [[p.step, p.loss, p.train_time_ms] for p in log.val]}


def collect_results(protocol: Protocol, contenders: list[Contender], chosen_lr: dict, log_dir: str,
                    target: float) -> dict:
    """Per contender: its runs on the paired seeds, the lists the record keeps (final_val_loss and steps_to_target
    in seed order; None for a run that has not finished, inf for a diverged one) and the paired statistics
    against Muon (final loss and steps to target; Holm-adjusted p over the contenders)."""
    results = {}
    for c in contenders:
        runs = [run_record(log_dir, run_tag(c.name, chosen_lr[c.name], s), s, target) for s in protocol.seeds]
        finals = [r["final_val_loss"] for r in runs]
        mean, std = mean_std([x for x in finals if x is not None and math.isfinite(x)])
        results[c.name] = {
            "label": c.label, "family": c.family, "optimizer": c.optimizer, "optimizer_args": dict(c.args),
            "lr": chosen_lr[c.name], "lr_source": f"tuned on {c.lr_from}" if c.lr_from else "tuned",
            "seeds": list(protocol.seeds), "final_val_loss": finals,
            "steps_to_target": [r["steps_to_target"] for r in runs],
            "final_val_mean": mean, "final_val_std": std, "runs": runs,
            "n_finished": sum(r["finished"] for r in runs),
            "reached_target": sum(r["steps_to_target"] is not None for r in runs),
        }
    muon = results.get("muon")
    for name, res in results.items():
        if muon is None or name == "muon":
            res["vs_muon"], res["steps_vs_muon"], res["p_vs_muon"] = None, None, None
            continue
        res["vs_muon"] = paired_stats(res["final_val_loss"], muon["final_val_loss"])
        res["steps_vs_muon"] = paired_stats(res["steps_to_target"], muon["steps_to_target"])
        res["p_vs_muon"] = res["vs_muon"]["p"]
    adjusted = holm({n: r["p_vs_muon"] for n, r in results.items() if r["p_vs_muon"] is not None})
    for name, p in adjusted.items():
        results[name]["p_vs_muon_holm"] = p
    return results


def evaluate_controls(protocol: Protocol, results: dict, aa_runs: list[dict], positions: dict) -> dict:
    """The three controls (module docstring); each {"passed": bool, "why": text, ...numbers}."""
    controls = {}
    if "adamw" in results and "muon" in results:
        stats = results["adamw"]["vs_muon"]
        passed = (stats["n"] == len(protocol.seeds) and math.isfinite(stats["p"])
                  and stats["p"] < protocol.alpha_control and stats["mean_diff"] > 0)
        controls["positive"] = {
            **stats, "passed": passed,
            "why": (f"AdamW minus Muon final val loss {_interval(stats)}, paired p {_p_text(stats['p'])} over "
                    f"{stats['n']} pairs (needs all pairs, p < {protocol.alpha_control:g} and Muon lower)")}
    else:
        controls["positive"] = {"passed": False, "why": "AdamW and Muon must both race"}
    if "muon" in results:
        aa_finals = [r["final_val_loss"] for r in aa_runs]
        stats = paired_stats(results["muon"]["final_val_loss"], aa_finals)
        complete = stats["n"] == len(protocol.seeds) == len(aa_runs)
        passed = complete and math.isfinite(stats["p"]) and stats["p"] >= protocol.alpha_aa
        controls["aa"] = {
            **stats, "passed": passed, "aa_seeds": list(protocol.aa_seeds), "aa_final_val_loss": aa_finals,
            "why": (f"Muon seeds {list(protocol.seeds)} minus Muon seeds {list(protocol.aa_seeds)}: "
                    f"{_interval(stats)}, paired p {_p_text(stats['p'])} over {stats['n']} pairs (needs all pairs "
                    f"and p >= {protocol.alpha_aa:g})")}
    else:
        controls["aa"] = {"passed": False, "why": "Muon must race"}
    edges = {name: where for name, where in positions.items() if where != "interior"}
    controls["tuning"] = {"passed": not edges, "positions": positions,
                          "why": ("every tuned contender's best lr is interior to its grid" if not edges else
                                  f"best lr at a grid edge after {protocol.max_grid_extensions} extensions: {edges}")}
    controls["passed"] = all(controls[k]["passed"] for k in ("positive", "aa", "tuning"))
    return controls


def verdict_text(res: dict) -> str:
    """One contender against Muon, from the 95% interval of the paired final-loss difference."""
    stats = res["vs_muon"]
    if stats is None or stats["n"] < 2 or not math.isfinite(stats["ci_low"]):
        return "not enough finished pairs"
    interval = _interval(stats)
    if stats["ci_high"] < 0:
        return f"better than Muon: {interval}"
    if stats["ci_low"] > 0:
        return f"worse than Muon: {interval}"
    return f"no difference detected: {interval}"


def family_verdicts(results: dict) -> dict:
    """{family: {contender: verdict}} for the families under study (spectral-ORD, radial brake, echo)."""
    out: dict[str, dict] = {}
    for name, res in results.items():
        if res["family"] in ("ord", "brake", "echo"):
            out.setdefault(res["family"], {})[name] = verdict_text(res)
    return out


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

    cfg = train_gpt.parse_config(flag_argv({**flags, "optimizer": c.optimizer, "lr": lr, "optimizer_args": c.args}))
    accum = train_gpt.validate_config(cfg, world_size=1)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.manual_seed(cfg.seed)
    model = train_gpt.GPT(cfg).to(device)
    opts = train_gpt.build_optimizers(model, cfg)
    loader = train_gpt.make_train_loader(cfg, rank=0, world_size=1, device=device)
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


def results_table(results: dict, timing: dict | None, target: float) -> str:
    header = ("| contender | lr | final val loss (mean ± std) | n | minus Muon [95% CI] | paired p | Holm p | "
              f"reached {target:g} | steps to target (mean) | minus Muon [95% CI] | paired p | "
              "matrix opt. step share |")
    lines = [header, "|" + "---|" * 12]
    for name, r in results.items():
        share = timing.get(name, {}).get("matrix_share") if timing else None
        steps = [s for s in r["steps_to_target"] if s is not None]
        steps_stats = r["steps_vs_muon"]
        lines.append(
            f"| {r['label']} (`{name}`) | {lr_text(r['lr'])}{'' if r['lr_source'] == 'tuned' else ' *'} | "
            f"{_fmt(r['final_val_mean'])} ± {_fmt(r['final_val_std'])} | {r['n_finished']} | "
            f"{_interval(r['vs_muon'])} | {_p_text(r['p_vs_muon'])} | {_p_text(r.get('p_vs_muon_holm'))} | "
            f"{r['reached_target']}/{len(r['runs'])} | {_fmt(mean_std(steps)[0], 1)} | "
            f"{_interval(steps_stats, 1) if steps_stats else '-'} | {_p_text(steps_stats['p']) if steps_stats else '-'}"
            f" | {'-' if share is None else f'{100 * share:.1f}%'} |")
    return "\n".join(lines)


def tuning_markdown(table: dict, chosen: dict, positions: dict) -> str:
    lines = ["| contender | lr: final val loss (tune seed) | chosen |", "|---|---|---|"]
    for name, losses in table.items():
        cells = ", ".join(f"{lr}: {_fmt(loss) if loss != math.inf else 'diverged'}" for lr, loss in losses.items())
        note = "" if positions[name] == "interior" else f" ({positions[name]})"
        lines.append(f"| `{name}` | {cells} | {lr_text(chosen[name])}{note} |")
    return "\n".join(lines)


def timing_table(timing: dict) -> str:
    lines = ["| contender | whole step ms (median) | fwd+bwd ms | DistAdam step ms | matrix opt. step ms | "
             "matrix share (mean) |", "|---|---|---|---|---|---|"]
    for name, t in timing.items():
        lines.append(f"| `{name}` | {t['total_ms_median']:.1f} | {t['forward_backward_ms_median']:.1f} | "
                     f"{t['adam_ms_median']:.1f} | {t['matrix_ms_median']:.1f} | {100 * t['matrix_share']:.1f}% |")
    return "\n".join(lines)


def controls_markdown(controls: dict) -> str:
    lines = ["| control | passed | measured |", "|---|---|---|"]
    for key, title in (("positive", "positive: AdamW vs Muon"), ("aa", "A/A: Muon vs Muon, other seeds"),
                       ("tuning", "tuning: interior optimum")):
        lines.append(f"| {title} | {'yes' if controls[key]['passed'] else '**no**'} | {controls[key]['why']} |")
    return "\n".join(lines)


def plot_paired_differences(results: dict, out: str) -> str:
    """Each contender's final val loss minus Muon's (mean and 95% CI over the paired seeds), one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, r["vs_muon"]) for name, r in results.items()
            if r["vs_muon"] and math.isfinite(r["vs_muon"]["mean_diff"])]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.5), constrained_layout=True)
    for i, (name, stats) in enumerate(rows):
        low = stats["ci_low"] if math.isfinite(stats["ci_low"]) else stats["mean_diff"]
        high = stats["ci_high"] if math.isfinite(stats["ci_high"]) else stats["mean_diff"]
        color = "C2" if high < 0 else "C3" if low > 0 else "C7"
        ax.errorbar(stats["mean_diff"], i, xerr=[[stats["mean_diff"] - low], [high - stats["mean_diff"]]], fmt="o",
                    color=color, capsize=3)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("final val loss minus Muon's, same seeds (mean, 95% CI)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(out_dir: str, protocol: Protocol, flags: dict, target: float, target_source: str, results: dict,
                 controls: dict, tuning: dict, grids: dict, chosen: dict, positions: dict, timing: dict | None,
                 commands: list[str], log_dir: str, left_out: dict, diagnostics: dict | None = None,
                 curves: dict | None = None) -> dict:
    """results.json, README.md, loss.png and paired_diff.png in out_dir (plus ord_diagnostics.png with
    diagnostics). A hand-written `notes.md` in out_dir, if present, is included in README.md (it survives
    regeneration). With a failed control README.md shows the controls and withholds the comparisons and verdicts
    (results.json keeps every number). Returns the JSON document."""
    import plot_loss
    import runlog

    verdicts = family_verdicts(results) if controls["passed"] else {}
    doc = {
        "protocol": {**asdict(protocol), "flags": flags}, "target": target, "target_source": target_source,
        "controls": controls, "verdicts": verdicts, "chosen_lr": chosen, "grids": grids, "tuning": tuning,
        "contenders": results, "left_out": left_out, "timing": timing, "diagnostics": diagnostics or {},
        "tuning_curves": curves or {}, "commands": commands, "log_dir": log_dir,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(json_safe(doc), f, indent=1, allow_nan=False)
        f.write("\n")
    logs = [runlog.parse_log(runlog.log_path(log_dir, r["tag"]))
            for res in results.values() for r in res["runs"] if r["finished"]]
    if logs:
        plot_loss.plot_runs(logs, os.path.join(out_dir, "loss.png"), target=target, band="std",
                            title=f"optimizer race, protocol {protocol.name}: mean ± 1 std over seeds")
    text = [f"# Optimizer race, protocol `{protocol.name}`", "",
            f"{protocol.description}. Paired seeds {list(protocol.seeds)} (a seed fixes the initial weights and the "
            f"training rows); lr tuned on seed {protocol.tune_seed} only; A/A seeds {list(protocol.aa_seeds)}.",
            f"Target val loss {target:g}: {target_source}.", ""]
    if left_out:
        text += ["Left out: " + "; ".join(f"`{n}` ({why})" for n, why in left_out.items()) + ".", ""]
    notes = os.path.join(out_dir, "notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            text += [f.read().rstrip("\n"), ""]
    text += ["## Controls", "", controls_markdown(controls), ""]
    if controls["passed"]:
        plot_paired_differences(results, os.path.join(out_dir, "paired_diff.png"))
        text += ["## Verdicts (final val loss minus Muon's, same seeds: mean [95% CI])", ""]
        for family, title in (("ord", "spectral-ORD"), ("brake", "radial brake"), ("echo", "spectral echo")):
            for name, verdict in verdicts.get(family, {}).items():
                text.append(f"- {title}, `{name}`: {verdict}")
        text += ["", "![paired differences](paired_diff.png)", "",
                 "## Results", "", results_table(results, timing, target), "",
                 "`*`: lr taken from another contender's tuning (lr_source in results.json), not tuned for this "
                 "one. Differences are paired over the seeds (same initial weights and data); paired p: "
                 "scipy.stats.ttest_rel, two-sided; Holm p: adjusted over all contenders against Muon. Steps to "
                 "target: linear interpolation between the validations around the first one at or below the "
                 f"target (validation every {flags.get('val_loss_every')} steps); the steps comparison uses the "
                 "seeds where both runs reached the target.", ""]
    else:
        text += ["**A control failed: no comparison or verdict is reported.** results.json keeps every number "
                 "for diagnosis.", ""]
    text += ["## Learning-rate tuning", "", tuning_markdown(tuning, chosen, positions), ""]
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


def json_safe(value):
    """value with every non-finite float (nan: undefined; inf: a diverged run, flagged in its run record) as None,
    so results.json is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def tuning_curves(protocol: Protocol, contenders: list[Contender], grids: dict, log_dir: str) -> dict:
    """{tag: [[step, val loss, train ms], ...]} of every tuning run that has a log."""
    import runlog

    curves = {}
    for c in tuned(contenders):
        for lr in grids[c.name]:
            path = runlog.log_path(log_dir, run_tag(c.name, lr, protocol.tune_seed))
            if os.path.exists(path):
                curves[os.path.basename(path)[:-4]] = [list(p) for p in runlog.parse_log(path).val]
    return curves


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    parser.add_argument("--out", required=True, help="directory for specs, README.md, results.json, plots")
    parser.add_argument("--log-dir", default=None,
                        help="run logs (default: logs/optimizer_race_<protocol> in the repository)")
    parser.add_argument("--stage", choices=("all", "tune", "final", "timing", "report"), default="all",
                        help="all: tune, final, timing, report (finished runs are never rerun)")
    parser.add_argument("--contenders", default=None,
                        help="comma-separated subset, e.g. adamw,muon,ord_gperp (default: the protocol's list)")
    parser.add_argument("--tune-all", action="store_true", help="tune every contender (ignore lr_from)")
    parser.add_argument("--max-parallel", type=int, default=None, help="runs at once (default: the protocol's)")
    parser.add_argument("--flag", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train_gpt flag of the protocol (recorded in the outputs)")
    parser.add_argument("--no-timing", action="store_true", help="skip the optimizer step timing")
    parser.add_argument("--dry-run", action="store_true", help="write the specs, print commands and run counts")
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
        protocol = replace(protocol, max_parallel=args.max_parallel)
    try:
        contenders, left_out = select_contenders(protocol, args.contenders.split(",") if args.contenders else None,
                                                 args.tune_all)
        overrides = parse_flag_overrides(args.flag)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not any(c.name == "muon" for c in contenders):
        print("error: Muon must race: every comparison and the A/A control are against it", file=sys.stderr)
        return 2
    for name, why in left_out.items():
        print(f"note: {name} left out: {why}", flush=True)
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
        runs = len(spec["configs"]) * len(spec["seeds"])
        print(f"$ {shlex.join(command)}   # {runs} runs", flush=True)
        return launch_sweep.main([path, *sweep_flags, *(["--dry-run"] if args.dry_run else [])])

    stages = ("tune", "final", "timing", "report") if args.stage == "all" else (args.stage,)
    grids = current_grids(protocol, contenders, out_dir)
    if "tune" in stages:
        grids = run_tuning(protocol, contenders, flags, shown_log_dir, out_dir, launch, args.dry_run)
        if args.dry_run:
            finals = len(contenders) * len(protocol.seeds) + len(protocol.aa_seeds)
            print(f"then: {finals} final and A/A runs (more tuning runs if a grid needs extending)", flush=True)
            return 0
    chosen, tuning, positions = choose_lrs(protocol, contenders, grids, log_dir)
    if "final" in stages:
        launch(final_spec(protocol, contenders, chosen, flags, shown_log_dir), "final.json")
        launch(aa_spec(protocol, contenders, chosen, flags, shown_log_dir), "aa.json")
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
        target, source = resolve_target(protocol, chosen, flags, log_dir)
        results = collect_results(protocol, contenders, chosen, log_dir, target)
        aa_runs = [run_record(log_dir, run_tag("muon", chosen["muon"], s), s, target) for s in protocol.aa_seeds]
        controls = evaluate_controls(protocol, results, aa_runs, positions)
        shown_sweep_flags = [shown_log_dir if f == log_dir else f for f in sweep_flags]
        commands = ["# the whole race (each stage skips finished runs):", shlex.join(repro),
                    "# which runs these sweeps (from the repository root) and then times and reports:"]
        commands += [shlex.join(["python", "launch_sweep.py", os.path.relpath(os.path.join(out_dir, n), REPO),
                                 *shown_sweep_flags]) for n in ("tune.json", "final.json", "aa.json")]
        diagnostics = {c.name: diagnostics_summary(log_dir, [r["tag"] for r in results[c.name]["runs"]], c.optimizer)
                       for c in contenders if c.args.get("diagnostics_every")}
        write_report(out_dir, protocol, flags, target, source, results, controls, tuning, grids, chosen, positions,
                     timing, commands, log_dir, left_out, diagnostics, tuning_curves(protocol, contenders, grids,
                                                                                      log_dir))
        print(open(os.path.join(out_dir, "README.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
