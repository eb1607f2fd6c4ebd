"""Ground truth for the echo estimators: what `spectral_probe.py --truth` measures at a checkpoint.

Truth. G_true = the mean of n_truth (>= 64) replicate gradients drawn from random positions of the training data,
disjoint from the estimators' replicates (rows are drawn without replacement: no token is in two replicates).
Its own noise is ~1/n_truth of one replica's (the mean of K estimator replicates has K / n_truth of it); the
split-half difference bounds it: floor = RMS(zeta(half A) - zeta(half B)) / 2 per region, the error of the full
truth.

Atoms ("kinds"), for each estimator replicate count K in k_list:
  replica   the atoms of one replica (replica 0 of the estimator set): what the reverb estimates;
  mean      the atoms of the mean of the K replicas;
  momentum  the atoms of the momentum input the optimizer decomposes: Muon's Nesterov blend of the checkpoint's
            momentum buffer with the mean of the K replicas (only when the checkpoint holds the buffer).
True echoes of each kind's atoms by rank: zeta_i = u_i^T msign(G_true) v_i, a_i = u_i^T G_true v_i (reverb.true_echo).

Estimators, each applied by rank as the optimizer would apply it:
  direction echo zeta: reverb:<align>:<solver> (9 variants, the user's reverb), cross_polar, plateau_mode (the
    plateau mode's weights rho f(s) / f(s_max) on the kind's atoms), msign (1 everywhere: no shrinkage) and, as
    a bound rather than an estimator, oracle_replica_median (the median over the K replicas of their own true
    zeta by rank: on one replica's atoms the best a rank-indexed echo of one replica can do; on the mean's and
    the momentum input's atoms what a perfect one-replica echo, the reverb's target, gives there);
  amplitude echo a: cross_projection (replica kind: replica 0's atoms probed with the other K - 1; mean kind:
    leave-one-out, atoms of the mean of K - 1; momentum kind: the fit mode's operating point, atoms of the
    momentum input built from the atom half probed with the other half). Errors in units of the kind's largest
    singular value (a / s_max): per-atom ratios a / s are unstable at small s, which is why the probe and mode
    fit use ratio-of-sums over bins.
Errors: bias and RMSE of estimate - truth per region of the kind's true zeta averaged over 8 atoms adjacent by
rank: top (>= 0.5 of its max), bulk (< 0.1 of its max), knee (between). Regions by each atom's own true zeta would
select atoms on their noise (an atom whose echo came out high lands in "top"), biasing every estimator's
per-region error, even the oracle's. Atoms with s < NULL_REL s_max are numerically null (e.g. layer 0's
Q/K/V under byte inputs: the gradient's row space is the span of the bytes in the batch): counted, in no region.
Mechanism: per region, the median true zeta and the median largest share of it on ONE true atom
(single_atom_overlap): the part of the echo that a one-to-one matching of atoms (the reverb) can see.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from optimizers import echo, reverb
from spectral_probe import finite_median

REGIONS = ("top", "knee", "bulk")
TOP_LEVEL, BULK_LEVEL = 0.5, 0.1  # region edges as fractions of the kind's largest true zeta
NULL_REL = 1e-6  # atoms with s below this fraction of s_max are numerically null (float32 gradients): no region
REGION_ATOMS = 8  # regions are read off the true zeta averaged over this many atoms adjacent by rank
KINDS = ("replica", "mean", "momentum")
K_LIST = (4, 8, 16, 32)
REVERB_VARIANTS = tuple(f"reverb:{a}:{s}" for a in reverb.ALIGNMENTS for s in reverb.SOLVERS)
USERS_OPTIMIZER = "reverb:none:fieller"  # the user's optimizer today (training/echo.py)
USERS_ANALYSIS = "reverb:greedy_mean:ols_division_free"  # the user's analysis pipeline
PLOT_ESTIMATORS = (USERS_OPTIMIZER, USERS_ANALYSIS, "reverb:greedy_mean:ols_weighted", "cross_polar",
                   "plateau_mode", "msign", "oracle_replica_median")
PLATEAU_TOP = 8  # atoms whose median true zeta is "the plateau" a scalar predictor is compared with


def matrix_type(name: str) -> str:
    """q / k / v / o for the merged QKVO stack's matrices, mlp_in / mlp_out for the MLP, else the last name."""
    m = re.search(r"qkvo_w\[(\d)\]", name)
    if m:
        return "qkvo"[int(m.group(1))]
    if "fc_w" in name:
        return "mlp_in"
    if "proj_w" in name:
        return "mlp_out"
    return name.split(".")[-1]


def momentum_input(mean: torch.Tensor, buffer: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Muon's input for gradient `mean` and the buffer before the step (optimizers.muon.muon_update)."""
    new_buffer = buffer + (1 - momentum) * (mean - buffer)
    return mean + momentum * (new_buffer - mean) if nesterov else new_buffer


def regions(zeta_true: torch.Tensor, s: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Masks of the top / knee / bulk atoms by the true direction echo smoothed over REGION_ATOMS atoms adjacent by
    rank (each atom takes its rank bin's mean, so that an atom's own noise does not choose its region), and of the
    numerically null atoms (s < NULL_REL s_max, when s is given), which belong to no other region."""
    null = torch.zeros_like(zeta_true, dtype=torch.bool) if s is None else s < NULL_REL * s.max()
    keep = (~null).nonzero().flatten()
    smooth = torch.zeros_like(zeta_true, dtype=torch.float64)
    if keep.numel():
        ids = torch.arange(keep.numel(), device=zeta_true.device) // REGION_ATOMS
        if ids[-1] > 0 and int((ids == ids[-1]).sum()) < REGION_ATOMS / 2:  # a short last bin joins the one before
            ids[ids == ids[-1]] -= 1
        sums = torch.zeros(int(ids[-1]) + 1, dtype=torch.float64, device=zeta_true.device)
        sums.index_add_(0, ids, zeta_true[keep].double())
        smooth[keep] = (sums / torch.bincount(ids).double())[ids]
    top = float(smooth[keep].max()) if keep.numel() else 0.0
    masks = {"top": (smooth >= TOP_LEVEL * top) & ~null, "bulk": (smooth < BULK_LEVEL * top) & ~null}
    masks["knee"] = ~(masks["top"] | masks["bulk"] | null)
    return {**{k: masks[k] for k in REGIONS}, "null": null}


def errors(estimate: torch.Tensor, truth: torch.Tensor, masks: dict) -> dict:
    """{region: {"bias", "rmse", "n"}} of estimate - truth over REGIONS (NaN estimates count as missing)."""
    out = {}
    for name in REGIONS:
        d = (estimate.double() - truth.double())[masks[name]]
        d = d[torch.isfinite(d)]
        out[name] = {"bias": float(d.mean()) if d.numel() else float("nan"),
                     "rmse": float(d.pow(2).mean().sqrt()) if d.numel() else float("nan"), "n": int(d.numel())}
    return out


def _echoes(X: torch.Tensor, G: torch.Tensor, P: torch.Tensor) -> dict:
    """s, zeta = diag(U^T P V), a = diag(U^T G V) and the atoms U, V for X's atoms (P = msign(G), precomputed)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    V = Vh.mT
    return {"s": S, "zeta": ((P @ V) * U).sum(-2), "a": ((G @ V) * U).sum(-2), "U": U, "V": V}


def plateau_weights(s: torch.Tensor, rho: float, c_rel: float) -> torch.Tensor:
    """Mode plateau's weights on atoms s (descending): rho f(s) / f(s_max), f = s / sqrt(s^2 + c_rel ||X||^2)."""
    c = c_rel * float((s ** 2).sum())
    f = s / torch.sqrt(s * s + c)
    return rho * f / f[0]


def amplitude_estimate(R: torch.Tensor, kind: str, buffer, momentum: float, nesterov: bool) -> torch.Tensor:
    """Cross-projection amplitude echo a by rank at the kind's operating point (module docstring), in R's dtype
    (optimizers/echo.py computes the same in float64: cross_project, estimate_echo(leave_one_out=True))."""
    K = R.size(0)
    if kind == "replica":  # replica 0's atoms, probed with the other K - 1
        U, _, Vh = torch.linalg.svd(R[0], full_matrices=False)
        return echo.project_atoms(U, Vh.mT, R[1:].mean(0))
    if kind == "mean":  # leave-one-out: atoms of the mean of the other K - 1, probed with the one left out
        others = (R.sum(0, keepdim=True) - R) / (K - 1)  # (K, M, N)
        U, _, Vh = torch.linalg.svd(others, full_matrices=False)
        return echo.project_atoms(U, Vh.mT, R).mean(0)
    n_atom = K - K // 2  # momentum: the fit mode's atom group, probed with the other half
    X = momentum_input(R[:n_atom].mean(0), buffer, momentum, nesterov)
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return echo.project_atoms(U, Vh.mT, R[n_atom:].mean(0))


def reverb_estimates(svds_all, R_est: torch.Tensor, k_list) -> dict[int, dict[str, torch.Tensor]]:
    """{K: {estimator: zeta (D,)}} for the REVERB_VARIANTS and cross_polar on the first K replicas, K in k_list.

    Equal to reverb.reverb_from_svds / cross_polar_echo on R_est[:K] (tested), computed once where the answer of
    K replicas is a sub-block of K_max's: the Hungarian and raw alignments align each replica to replica 0 alone,
    and the cross-polar term of a pair depends on that pair only. Greedy alignment to the mean is redone per K."""
    k_max = max(k_list)
    aligned = {a: reverb.reverb_matrices(*reverb.align_atoms(svds_all, a)[::2]) for a in ("hungarian_ref", "none")}
    z_cross = reverb.cross_polar_matrix(svds_all, max(R_est.shape[1:]))
    out = {}
    for K in k_list:
        svds = reverb.subset_svds(svds_all, range(K)) if K < k_max else svds_all
        Z = {"greedy_mean": reverb.reverb_matrices(*reverb.align_atoms(svds, "greedy_mean",
                                                                       reverb.mean_svd(R_est[:K]))[::2]),
             **{a: z[:, :K, :K] for a, z in aligned.items()}}
        out[K] = {name: reverb.zeta_from_reverb(Z[name.split(":")[1]], name.split(":")[2])[0]
                  for name in REVERB_VARIANTS}
        out[K]["cross_polar"] = reverb.zeta_from_cross_polar(z_cross[:K, :K])[0]
    return out


def single_atom_overlap(U: torch.Tensor, V: torch.Tensor, U_true: torch.Tensor, V_true: torch.Tensor) -> torch.Tensor:
    """Per atom i of X: max_j |<u_i, u_j^true><v_i, v_j^true>|, the largest share of its direction echo
    zeta_i = sum_j <u_i, u_j^true><v_i, v_j^true> (sign(s_j) = 1) carried by one true atom: what an estimator
    that matches atoms one to one (the reverb) can see of it."""
    return ((U.mT @ U_true) * (V.mT @ V_true)).abs().amax(-1)


def truth_for_matrix(R_est: torch.Tensor, truth_a: torch.Tensor, truth_b: torch.Tensor, buffer: torch.Tensor | None,
                     momentum: float, nesterov: bool, k_list=K_LIST, plot_k: int = 8, plateau_c_rel: float = 1e-2,
                     dtype: torch.dtype = torch.float64) -> list[dict]:
    """Every estimator against the truth for one matrix.

    R_est: (K_max, M, N) estimator replicates; truth_a / truth_b: the means of the two halves of the truth set;
    buffer: the optimizer's momentum buffer before the step (None: no momentum kind); dtype of every SVD
    (float32 on a GPU for large matrices). Returns one record per (K, kind): {"K", "atoms", "regions" (atom
    counts, "null" included), "floor", "zeta", "amplitude", "plateau", "mechanism", "curves" (at K = plot_k)}.
    Reference rows besides the estimators: "oracle_replica_median" (the median over the K replicas of their own
    true zeta by rank: the best any one-replica echo indexed by rank can do) and "msign" (1 everywhere).
    """
    R_est = reverb.replica_stack(R_est, max(4, min(k_list)), "the truth study", dtype=dtype)
    k_list = [k for k in k_list if k <= R_est.size(0)]
    G_a, G_b = truth_a.to(dtype), truth_b.to(dtype)
    G = (G_a + G_b) / 2
    buffer = None if buffer is None else buffer.to(dtype)
    P, P_a, P_b = reverb.polar_factor(G), reverb.polar_factor(G_a), reverb.polar_factor(G_b)
    U_G, _, Vh_G = torch.linalg.svd(G, full_matrices=False)
    svds_all = reverb.replica_svds(R_est)
    zeta_own = ((P @ svds_all[2]) * svds_all[0]).sum(-2)  # (K_max, D): each replica's own true zeta by rank
    estimates = reverb_estimates(svds_all, R_est, k_list)
    out = []
    for K in k_list:
        R = R_est[:K]
        zeta_est = estimates[K]
        plateau = reverb.plateau_rho(R, svds=reverb.subset_svds(svds_all, range(K)), mean=reverb.mean_svd(R),
                                     dtype=dtype)
        kinds = {"replica": R[0], "mean": R.mean(0)}
        if buffer is not None:
            kinds["momentum"] = momentum_input(R.mean(0), buffer, momentum, nesterov)
        for kind, X in kinds.items():
            true, half_a, half_b = _echoes(X, G, P), _echoes(X, G_a, P_a), _echoes(X, G_b, P_b)
            masks = regions(true["zeta"], true["s"])
            ests = {**zeta_est, "plateau_mode": plateau_weights(true["s"], plateau["rho"], plateau_c_rel),
                    "msign": torch.ones_like(true["s"]), "oracle_replica_median": zeta_own[:K].median(0).values}
            s_max = float(true["s"][0])
            a_hat = amplitude_estimate(R, kind, buffer, momentum, nesterov)
            floor_zeta = {k: v["rmse"] / 2 for k, v in errors(half_a["zeta"], half_b["zeta"], masks).items()}
            floor_amp = {k: v["rmse"] / 2 for k, v in errors(half_a["a"] / s_max, half_b["a"] / s_max, masks).items()}
            single = single_atom_overlap(true["U"], true["V"], U_G, Vh_G.mT)
            top_plateau = float(true["zeta"][:PLATEAU_TOP].median())
            rec = {"K": K, "atoms": kind, "regions": {k: int(m.sum()) for k, m in masks.items()},
                   "floor": {"zeta": floor_zeta, "amplitude": floor_amp},
                   "zeta": {name: errors(est, true["zeta"], masks) for name, est in ests.items()},
                   "amplitude": {"cross_projection": errors(a_hat / s_max, true["a"] / s_max, masks)},
                   "plateau": {"true_top": top_plateau, "rho": plateau["rho"], "rho_se": plateau["rho_se"],
                               "multiplicative": plateau["plateau_multiplicative"]},
                   "mechanism": {g: {"zeta": float(true["zeta"][masks[g]].median()) if masks[g].any() else None,
                                     "single_atom": float(single[masks[g]].median()) if masks[g].any() else None}
                                 for g in REGIONS}}
            if K == plot_k:
                rec["curves"] = {"s": true["s"], "zeta_true": true["zeta"], "a_true": true["a"],
                                 "a_cross_projection": a_hat, "single_atom": single,
                                 **{f"zeta_{name}": ests[name] for name in PLOT_ESTIMATORS}}
            out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------
# Collecting replicates at a checkpoint


def momentum_buffers(model, cfg, path: str) -> tuple[dict[str, torch.Tensor], float, bool]:
    """The matrix optimizer's momentum buffers from a checkpoint ({hidden-matrix name: buffer}, mu, nesterov);
    empty when the checkpoint's optimizer keeps none (or its state is sharded over ranks)."""
    import os

    import train_gpt

    shard = torch.load(os.path.join(path, "rank0.pt"), map_location="cpu", weights_only=False)
    matrix_opt = train_gpt.build_optimizers(model, cfg)[1]
    try:
        matrix_opt.load_state_dict(shard["optimizers"][1])
    except (KeyError, ValueError, IndexError):
        return {}, 0.0, False
    names = {id(p): n for n, p in model.named_parameters()}
    group = matrix_opt.param_groups[0]
    buffers = {names[id(p)]: st["momentum_buffer"].detach().double().cpu() for p, st in matrix_opt.state.items()
               if "momentum_buffer" in st}
    return buffers, float(group.get("momentum", 0.0)), bool(group.get("nesterov", False))


class TruthAccumulator:
    """Streaming sums of replicate gradients per matrix: the truth set in two halves (no replicate is kept)."""

    def __init__(self):
        self.sums: list[dict[str, torch.Tensor]] = [{}, {}]
        self.counts = [0, 0]

    def add(self, grads: dict[str, torch.Tensor]) -> None:
        half = 0 if self.counts[0] <= self.counts[1] else 1
        for name, g in grads.items():
            acc = self.sums[half].get(name)
            self.sums[half][name] = g.double().clone() if acc is None else acc + g.double()
        self.counts[half] += 1

    def half_means(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sums[0][name] / self.counts[0], self.sums[1][name] / self.counts[1]


def truth_checkpoint(path: str, n_truth: int = 64, k_list=K_LIST, seed: int = 0, train_files: str | None = None,
                     replicate_tokens: int | None = None, seq_len: int | None = None, layers: list[int] | None = None,
                     plot_k: int = 8, device: str = "cpu", log=print) -> tuple[list[dict], dict]:
    """The truth study at one train_gpt.py checkpoint: n_truth truth replicates and max(k_list) estimator
    replicates of replicate_tokens tokens each (default: the run's micro-batch), rows of seq_len tokens
    (default the run's) from random positions of the training data, dense attention masks. layers: only these
    blocks' matrices (default all). Returns (records, info)."""
    import time

    import spectral_probe
    import train_gpt

    if n_truth < 2 or n_truth % 2:
        raise ValueError(f"n_truth must be an even number >= 2 (two halves), got {n_truth}")
    model, cfg, meta, _ = spectral_probe.load_checkpoint(path, device)
    step = int(meta["step"])
    seq_len = seq_len or cfg.seq_len
    replicate_tokens = replicate_tokens or cfg.micro_batch_tokens
    if replicate_tokens % seq_len:
        raise ValueError(f"replicate tokens ({replicate_tokens}) must be a multiple of the row length ({seq_len})")
    rows = replicate_tokens // seq_len
    params = spectral_probe.gpt_hidden_matrices(model)
    if layers is not None:
        params = {n: p for n, p in params.items() if int(n.split(".")[1]) in layers}
    buffers, mu, nesterov = momentum_buffers(model, cfg, path)
    window = train_gpt.window_tokens_at(cfg, step)
    dev = torch.device(device)
    dtype = torch.float64 if dev.type == "cpu" else torch.float32  # float64 SVDs of large matrices are slow on GPUs

    def loss_fn(m, batch):
        inputs, targets = (t.to(dev) for t in batch)
        with train_gpt.autocast(dev):
            return m(inputs, targets, train_gpt.model_masks(m, inputs, window, False))

    # one stream without replacement: no token is in two replicates, so truth and estimators are disjoint
    batches = spectral_probe.random_row_batches(train_files or cfg.train_files, rows, seq_len, seed + 7919 * step,
                                                disjoint=True)
    k_max = max(k_list)
    t0 = time.time()
    truth = TruthAccumulator()
    for _ in range(n_truth):  # the truth set first, then the estimators' replicates: independent draws
        grads, _ = spectral_probe.collect_replicates(model, [next(batches)], params, loss_fn)
        truth.add({n: g[0] for n, g in grads.items()})
    est, _ = spectral_probe.collect_replicates(model, [next(batches) for _ in range(k_max)], params, loss_fn)
    t_grad = time.time() - t0
    log(f"step {step}: {n_truth} truth + {k_max} estimator replicates of {replicate_tokens} tokens in {t_grad:.0f}s")
    records = []
    for name in params:
        a, b = truth.half_means(name)
        buf = buffers.get(name)
        mats = list(spectral_probe.split_matrices(name, est[name]))
        halves = [(ha, hb) for ha, hb in zip(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))]
        bufs = buf.reshape(-1, *buf.shape[-2:]) if buf is not None else [None] * len(mats)
        for (mname, R), (ha, hb), bm in zip(mats, halves, bufs):
            t1 = time.time()
            for rec in truth_for_matrix(R.to(dev), ha.to(dev), hb.to(dev), None if bm is None else bm.to(dev), mu,
                                        nesterov, k_list, plot_k, dtype=dtype):
                records.append({"kind": "truth", "step": step, "name": mname, "type": matrix_type(mname),
                                "shape": list(R.shape[1:]), **rec})
            log(f"  {mname}: {time.time() - t1:.1f}s")
    info = {"run_id": cfg.run_id, "preset": cfg.preset, "optimizer": cfg.optimizer, "n_truth": n_truth,
            "k_list": list(k_list), "tokens_per_replicate": replicate_tokens, "rows_per_replicate": rows,
            "row_tokens": seq_len, "tokens_per_step": cfg.batch_tokens, "momentum": mu, "nesterov": nesterov,
            "momentum_kind": bool(buffers), "gradient_seconds": round(t_grad, 1), "analysis_dtype": str(dtype)}
    return [spectral_probe._round(r, 4) for r in records], info


# ----------------------------------------------------------------------------------------------
# Summary: verdicts with their uncertainty, tables, plots
#
# Uncertainty. A headline number is a median over matrix-steps with a 90% interval from a cluster bootstrap over
# matrices (one matrix's records at different steps are resampled together: they are not independent). A verdict
# against a limit "holds" when the whole interval is on the good side, "fails" when it is wholly on the bad side,
# and is "undecided" otherwise.

ENOUGH_RMSE = 0.1  # a direction-echo estimate within 0.1 of the truth (RMSE over a region) is good enough
EXCESS_LIMIT = 0.05  # ... and an estimator within 0.05 (RMSE) of the oracle's is as good as one zeta per rank gets
FREE_CURVE_LIMIT = 1.1  # a family describes the curve if its held-out error is within 10% of a free curve's
TRANSFER_LIMIT = 1.1  # constants are stable if the previous step's curve does within 10% of a refit (held out)
FIT_FAMILIES = ("hill", "hill_floor", "hill3")  # 1, 2 and 3 constants for the true zeta(s) curve
BIN_ATOMS = 8  # atoms (adjacent by rank) per bin of the free curve and of the monotonicity test
CI_LEVEL, N_BOOT = 0.9, 2000
REVERSAL_ALPHA = 0.05  # family-wise false-alarm rate of the monotonicity test (Bonferroni over its bin pairs)


def _select(records, **keys) -> list[dict]:
    return [r for r in records if r.get("kind") == "truth" and all(r.get(k) == v for k, v in keys.items())]


def by_matrix(recs: list[dict], value) -> dict[str, list[float]]:
    """{matrix name: the finite values of value(record)}: the clusters of cluster_bootstrap."""
    out: dict[str, list[float]] = {}
    for r in recs:
        v = value(r)
        if v is not None and math.isfinite(v):
            out.setdefault(r["name"], []).append(float(v))
    return out


def cluster_bootstrap(clusters: dict, n_boot: int = N_BOOT, level: float = CI_LEVEL,
                      seed: int = 0) -> tuple[float, float, float]:
    """(median of all values, lo, hi): percentile interval of the median from resampling whole clusters with
    replacement (vectorised: each draw weights the sorted values by how often their cluster was drawn). NaN
    bounds with fewer than two clusters."""
    groups = [np.asarray(v, dtype=np.float64) for v in clusters.values() if len(v)]
    if not groups:
        return float("nan"), float("nan"), float("nan")
    values = np.concatenate(groups)
    point = float(np.median(values))
    if len(groups) < 2:
        return point, float("nan"), float("nan")
    labels = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    order = np.argsort(values, kind="stable")
    values, labels = values[order], labels[order]
    gen = np.random.default_rng(seed)
    counts = np.stack([np.bincount(p, minlength=len(groups)) for p in gen.integers(0, len(groups),
                                                                                    (n_boot, len(groups)))])
    cum = np.cumsum(counts[:, labels], axis=1)  # (n_boot, n): copies of the sorted values up to each one
    total = cum[:, -1]
    pick = lambda pos: values[(cum > pos[:, None]).argmax(1)]  # the value at 0-based position pos of a draw
    draws = (pick((total - 1) // 2) + pick(total // 2)) / 2  # the median of each draw, as np.median
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


def limit_verdict(ci: tuple[float, float, float], limit: float) -> str:
    """'holds' when the interval (point, lo, hi) lies at or below limit, 'fails' when above, else 'undecided'."""
    _, lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "undecided (too few matrices for an interval)"
    return "holds" if hi <= limit else ("fails" if lo > limit else "undecided")


def _ci(ci: tuple[float, float, float], digits: int = 3) -> str:
    return f"{ci[0]:.{digits}f} [{ci[1]:.{digits}f}, {ci[2]:.{digits}f}]"


def _get(rec: dict, what: str, estimator: str, region: str, stat: str = "rmse"):
    return rec[what].get(estimator, {}).get(region, {}).get(stat)


def _err(recs: list[dict], estimator: str, region: str, stat: str = "rmse", what: str = "zeta"):
    return cluster_bootstrap(by_matrix(recs, lambda r: _get(r, what, estimator, region, stat)))


def _rms_all(rec: dict, estimator: str) -> float | None:
    """RMS error over all non-null atoms: sqrt(sum_i (w_i - zeta_i)^2 / D') = the excess Frobenius distance of
    U diag(w) V^T from msign(G_true) per atom (note 04: the weights w = zeta minimise that distance)."""
    num = den = 0.0
    for g in REGIONS:
        e, n = _get(rec, "zeta", estimator, g), _get(rec, "zeta", estimator, g, "n")
        if n and e is not None:
            num, den = num + n * e * e, den + n
    return math.sqrt(num / den) if den else None


def _paired(recs: list[dict], a: str, b: str, region: str | None):
    """Median paired difference RMSE(a) - RMSE(b) per matrix-step (region None: over all atoms), with interval."""
    def diff(r):
        x, y = ((_rms_all(r, a), _rms_all(r, b)) if region is None else
                (_get(r, "zeta", a, region), _get(r, "zeta", b, region)))
        return None if x is None or y is None else x - y
    return cluster_bootstrap(by_matrix(recs, diff))


# ---- the true curve: bins, free curve, families held out, reversals ----------------------------------------


def true_curve(rec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(x = s / s_max, true zeta) of a record's non-null atoms in rank order (s descending)."""
    c = rec["curves"]
    s, z = np.asarray(c["s"], dtype=np.float64), np.asarray(c["zeta_true"], dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(z) & (s >= NULL_REL * np.nanmax(s)) & (s > 0)
    return s[ok] / s[ok].max(), z[ok]


def rank_bins(x: np.ndarray, z: np.ndarray, n: int = BIN_ATOMS) -> tuple[np.ndarray, ...]:
    """Bins of n atoms adjacent by rank (a last bin of fewer than n / 2 joins the one before): (geometric-mean
    x, mean z, standard error of the mean z, atoms) per bin, in rank order."""
    edges = list(range(0, len(z), n)) + [len(z)]
    if len(edges) > 2 and edges[-1] - edges[-2] < n / 2:
        edges.pop(-2)
    xs, ms, ses, ns = [], [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        zz = z[a:b]
        xs.append(float(np.exp(np.log(x[a:b]).mean())))
        ms.append(float(zz.mean()))
        ses.append(float(zz.std(ddof=1) / math.sqrt(len(zz))) if len(zz) > 1 else float("nan"))
        ns.append(b - a)
    return np.array(xs), np.array(ms), np.array(ses), np.array(ns)


def reversal_tests(x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair of adjacent rank bins: the rise of the mean true zeta from the higher-s bin to the lower-s bin
    (positive: the echo rising as s falls, a reversal), Welch's t statistic of that rise and the one-sided
    p-value from Student's t with Welch-Satterthwaite degrees of freedom (bins of 8 atoms estimate their own
    spread: a normal quantile would flag heavy-tailed noise as reversals)."""
    from scipy.stats import t as student_t

    _, m, se, n = rank_bins(x, z)
    v1, v2 = se[:-1] ** 2, se[1:] ** 2
    rise = m[1:] - m[:-1]
    stat = rise / np.sqrt(v1 + v2)
    dof = (v1 + v2) ** 2 / (v1 ** 2 / (n[:-1] - 1) + v2 ** 2 / (n[1:] - 1))
    return rise, stat, student_t.sf(stat, dof)


def free_curve(x_fit: np.ndarray, z_fit: np.ndarray):
    """A curve with one constant per BIN_ATOMS atoms: bin means joined linearly in log s, flat beyond the ends."""
    xb, mb, _, _ = rank_bins(x_fit, z_fit)
    order = np.argsort(xb)
    lx, mb = np.log(xb[order]), mb[order]
    return lambda x: np.interp(np.log(np.asarray(x, dtype=np.float64)), lx, mb)


def fit_family(family: str, x: np.ndarray, z: np.ndarray):
    """Least-squares fit (unit weights) of a FIT_FAMILIES curve to (x, z); None when it fails."""
    try:
        return echo.fit_curve(family, x, z, np.ones_like(z))
    except (ValueError, np.linalg.LinAlgError):
        return None


def heldout_fits(rec: dict) -> dict:
    """The true curve's families fitted to its even-rank atoms and scored (RMSE) on its odd-rank atoms, against a
    free curve (free_curve) fitted the same way: {"free": rmse, "fits": {family: CurveFit}, family: rmse}."""
    x, z = true_curve(rec)
    tr, te = np.arange(len(z)) % 2 == 0, np.arange(len(z)) % 2 == 1
    if te.sum() < 2 * BIN_ATOMS:
        return {}
    rmse = lambda pred: float(np.sqrt(np.mean((z[te] - pred) ** 2)))
    out = {"free": rmse(free_curve(x[tr], z[tr])(x[te])), "fits": {}}
    for fam in FIT_FAMILIES:
        fit = fit_family(fam, x[tr], z[tr])
        if fit is not None:
            out["fits"][fam] = fit
            out[fam] = rmse(fit.predict(x[te]))
    return out


class CurveAnalysis:
    """heldout_fits of every record with curves, computed once ({(name, step, atoms): result})."""

    def __init__(self, records: list[dict]):
        self.recs = [r for r in _select(records) if "curves" in r]
        self.fits = {(r["name"], r["step"], r["atoms"]): heldout_fits(r) for r in self.recs}

    def of(self, kind: str) -> list[tuple[dict, dict]]:
        return [(r, self.fits[r["name"], r["step"], r["atoms"]]) for r in self.recs if r["atoms"] == kind]


def shared_curve_ratios(analysis: CurveAnalysis, kind: str, family: str) -> dict[str, list[float]]:
    """One curve per matrix type and step (family fitted to the pooled even-rank atoms of the type's matrices):
    its held-out RMSE on each matrix's odd-rank atoms / that matrix's own fit's. {name: ratios}."""
    groups: dict[tuple, list[dict]] = {}
    for r, _ in analysis.of(kind):
        groups.setdefault((r["type"], r["step"]), []).append(r)
    out: dict[str, list[float]] = {}
    for recs in groups.values():
        if len(recs) < 2:
            continue
        curves = [true_curve(r) for r in recs]
        x = np.concatenate([c[0][::2] for c in curves])
        z = np.concatenate([c[1][::2] for c in curves])
        fit = fit_family(family, x, z)
        for r, (xr, zr) in zip(recs, curves):
            own = analysis.fits[r["name"], r["step"], r["atoms"]].get(family)
            if fit is None or not own:
                continue
            shared = float(np.sqrt(np.mean((zr[1::2] - fit.predict(xr[1::2])) ** 2)))
            out.setdefault(r["name"], []).append(shared / own)
    return out


def transfer_ratios(analysis: CurveAnalysis, kind: str, family: str) -> dict[str, list[float]]:
    """Per matrix and pair of consecutive probed steps: held-out RMSE on the later step's odd-rank atoms of the
    curve fitted at the earlier step / of the curve refitted at the later step (both on even-rank atoms)."""
    by_name: dict[str, list[dict]] = {}
    for r, _ in analysis.of(kind):
        by_name.setdefault(r["name"], []).append(r)
    out: dict[str, list[float]] = {}
    for name, recs in by_name.items():
        recs = sorted(recs, key=lambda r: r["step"])
        for old, new in zip(recs[:-1], recs[1:]):
            fo = analysis.fits[name, old["step"], kind].get("fits", {}).get(family)
            rn = analysis.fits[name, new["step"], kind].get(family)
            if fo is None or not rn:
                continue
            x, z = true_curve(new)
            carried = float(np.sqrt(np.mean((z[1::2] - fo.predict(x[1::2])) ** 2)))
            out.setdefault(name, []).append(carried / rn)
    return out


def weight_cosine(rec: dict, estimator: str) -> float | None:
    """Cosine over the non-null atoms between an estimator's weights w and the true zeta: the cosine between
    U diag(w) V^T and U diag(zeta) V^T, the projection of msign(G_true) on these atoms (1: the best update, any
    step size). Needs the record's curves."""
    c = rec.get("curves", {})
    if f"zeta_{estimator}" not in c:
        return None
    s = np.asarray(c["s"], dtype=np.float64)
    w, z = np.asarray(c[f"zeta_{estimator}"], dtype=np.float64), np.asarray(c["zeta_true"], dtype=np.float64)
    ok = (s >= NULL_REL * s.max()) & np.isfinite(w) & np.isfinite(z)
    den = np.linalg.norm(w[ok]) * np.linalg.norm(z[ok])
    return float(w[ok] @ z[ok] / den) if den > 0 else None


# ---- the verdict table -------------------------------------------------------------------------------------


def _row(assumption: str, numbers: str, verdict: str, uncertainty: str) -> dict:
    return {"assumption": assumption, "numbers": numbers, "verdict": verdict, "uncertainty": uncertainty}


def _best(recs: list[dict], names, region: str) -> str:
    return min(names, key=lambda e: finite_median([_get(r, "zeta", e, region) for r in recs]))


def truth_verdicts(records: list[dict], plot_k: int = 8, analysis: CurveAnalysis | None = None) -> list[dict]:
    """The seed's assumptions about the reverb and the echo, answered with the truth: one row each with its
    numbers, its verdict and the verdict's uncertainty (see the section comment)."""
    recs = _select(records)
    if not recs:
        return []
    ks = sorted({r["K"] for r in recs})
    k0, k_top = (plot_k if plot_k in ks else ks[0]), ks[-1]
    rep = lambda K: _select(records, K=K, atoms="replica")
    best = _best(rep(k0), REVERB_VARIANTS, "top")
    analysis = analysis or CurveAnalysis(records)
    kind = "momentum" if _select(records, atoms="momentum") else "mean"
    rows = []

    # 1. enough replicates: the reverb's error on its own target (one replica's atoms) as K grows, against the
    # oracle (the replicas' own true zeta by rank), the floor of any estimator that gives one zeta per rank
    oracle = "oracle_replica_median"
    excess = lambda K, e, g="top": _paired(rep(K), e, oracle, g)
    cands = {"the user's reverb": USERS_OPTIMIZER, f"best reverb ({best})": best, "cross-polar": "cross_polar"}
    ex = {c: {K: excess(K, e) for K in ks} for c, e in cands.items()}
    bias_share = finite_median([(_get(r, "zeta", best, "top", "bias") or 0) ** 2 / max(_get(r, "zeta", best, "top") or 1e-12,
                                                                             1e-12) ** 2 for r in rep(k_top)])
    first_ok = lambda d: next((K for K in ks if limit_verdict(d[K], EXCESS_LIMIT) == "holds"), None)
    k_ok = {c: first_ok(d) for c, d in ex.items()}
    k_user = k_ok["the user's reverb"]
    flat = ex["the user's reverb"][k_top][0] > 0.8 * ex["the user's reverb"][ks[0]][0]
    verdict = (f"holds from K = {k_user}" if k_user else
               "fails at every K" + (" (more replicates do not help: a bias)" if flat else ""))
    rows.append(_row(
        "Enough replicates (seed: 64 may not be enough)",
        "top-atom zeta RMSE on one replica's atoms (the reverb's target): oracle (floor) "
        + "; ".join(f"K={K} {_ci(_err(rep(K), oracle, 'top'))}" for K in ks) + ". Excess over the oracle, paired: "
        + ". ".join(f"{c} " + "; ".join(f"K={K} {_ci(d[K])}" for K in ks) for c, d in ex.items())
        + f". Bias^2 / MSE of the best reverb at K={k_top}: {bias_share:.2f}. Smallest K within {EXCESS_LIMIT} of "
        "the oracle: " + ", ".join(f"{c} {k or 'none'}" for c, k in k_ok.items()),
        verdict, f"per-K paired intervals: cluster bootstrap over {len({r['name'] for r in recs})} matrices; "
        f"limit {EXCESS_LIMIT} above the oracle"))

    # 2. least squares across the spectrum: each solver's error per region
    def solver_text(K):
        return "; ".join(f"{sv} " + "/".join(_ci(excess(K, f"reverb:greedy_mean:{sv}", g), 2) for g in REGIONS)
                         for sv in reverb.SOLVERS)
    verdicts = {g: limit_verdict(excess(k0, best, g), EXCESS_LIMIT) for g in REGIONS}
    over1 = np.mean(np.concatenate([np.asarray(r["curves"][f"zeta_{USERS_OPTIMIZER}"], float) > 1.0
                                    for r in rep(k0) if "curves" in r]))
    v = ("holds" if all(x == "holds" for x in verdicts.values()) else
         "fails in " + ", ".join(g for g, x in verdicts.items() if x == "fails")
         if any(x == "fails" for x in verdicts.values()) else "undecided")
    rows.append(_row(
        "Least squares fits the triples across the spectrum (seed: noise in one part may dominate another)",
        f"zeta RMSE excess over the oracle top/knee/bulk on one replica's atoms, greedy alignment, per solver, "
        f"K={k0}: {solver_text(k0)}; K={k_top}: {solver_text(k_top)}. Best variant ({best}) at K={k0}: "
        + ", ".join(f"{g} {verdicts[g]}" for g in REGIONS) + " (oracle RMSE " + "/".join(
            f"{_err(rep(k0), oracle, g)[0]:.2f}" for g in REGIONS)
        + f"). The user's Fieller estimate without alignment exceeds 1 (impossible) on {100 * over1:.1f}% of atoms",
        v, f"region verdicts from the best variant's paired 90% intervals against {EXCESS_LIMIT} above the oracle"))

    # 3. alignment: aligned variants against the alignment-free one and the oracle; the mechanism
    def align_text(K):
        parts = [f"{a} {_ci(_err(rep(K), _best(rep(K), [f'reverb:{a}:{s}' for s in reverb.SOLVERS], 'top'), 'top'))}"
                 for a in reverb.ALIGNMENTS]
        return "; ".join(parts + [f"cross-polar (no alignment) {_ci(_err(rep(K), 'cross_polar', 'top'))}",
                                  f"oracle {_ci(_err(rep(K), oracle, 'top'))}"])
    diff = _paired(rep(k0), best, "cross_polar", "top")
    mech = {g: (finite_median([r["mechanism"][g]["zeta"] for r in rep(k0)]),
                finite_median([r["mechanism"][g]["single_atom"] for r in rep(k0)])) for g in ("top", "knee")}
    perm_gain = _paired(rep(k0), _best(rep(k0), [f"reverb:none:{s}" for s in reverb.SOLVERS], "top"), best, "top")
    v = limit_verdict(diff, EXCESS_LIMIT)
    if v == "fails":
        v += (": the atoms are not one-to-one (a continuum of near-degenerate directions), not a wrong permutation"
              if mech["top"][1] < 0.6 * mech["top"][0] else "")
    rows.append(_row(
        "Alignment of atoms across replicas is good enough (seed: bad permutation or degenerate subspaces)",
        f"top-atom zeta RMSE, best solver per alignment, K={k0}: {align_text(k0)}; K={k_top}: {align_text(k_top)}. "
        f"Best aligned minus alignment-free cross-polar, paired: {_ci(diff)}; raw order minus best aligned: "
        f"{_ci(perm_gain)}. Mechanism (K={k0}, one replica's atoms): median true zeta {mech['top'][0]:.2f} (top) / "
        f"{mech['knee'][0]:.2f} (knee), of which the largest share on ONE true atom {mech['top'][1]:.2f} / "
        f"{mech['knee'][1]:.2f}",
        v, f"paired cluster bootstrap; limit: aligned within {EXCESS_LIMIT} of the alignment-free estimate; the "
        "mechanism numbers are medians over matrix-steps"))

    # 4. monotone: significant reversals of the true curve between adjacent rank bins
    tests = {k: [reversal_tests(*true_curve(r)) for r, _ in analysis.of(k)] for k in KINDS if analysis.of(k)}
    n_tests = sum(len(p) for v in tests.values() for _, _, p in v)
    p_crit = REVERSAL_ALPHA / max(n_tests, 1)
    sig = {k: [float(rise[i]) for rise, _, p in v for i in np.flatnonzero(p < p_crit)] for k, v in tests.items()}
    tmax = {k: max((float(np.nanmax(t)) for _, t, _ in v if len(t)), default=float("nan")) for k, v in tests.items()}
    rises = {k: np.concatenate([rise for rise, _, _ in v]) for k, v in tests.items()}
    total = sum(len(v) for v in sig.values())
    rows.append(_row(
        "The echo is monotone in the singular value",
        f"true zeta in bins of {BIN_ATOMS} atoms by rank, K={k0}: significant rises as s falls (Welch t, one-sided, "
        f"family-wise {REVERSAL_ALPHA:.0%} over {n_tests} adjacent-bin tests, p < {p_crit:.1e}): "
        + ", ".join(f"{k} {len(sig[k])}" + (f" (rises {', '.join(f'{x:.2f}' for x in sig[k])})" if sig[k] else "")
                    + f", largest t {tmax[k]:.1f}, 99th percentile of all rises {np.nanpercentile(rises[k], 99):.3f}"
                    for k in tests),
        "holds" if total == 0 else f"fails ({total} significant reversals)",
        f"family-wise {REVERSAL_ALPHA:.0%} false-alarm rate; a reversal smaller than the bins' noise (the 99th "
        "percentile of rises) would not show"))

    # 5. few constants: families held out against a free curve
    def fam_ratio(k, fam):
        return cluster_bootstrap(by_matrix([r for r, _ in analysis.of(k)],
                                           lambda r: (lambda f: f[fam] / f["free"] if fam in f and f.get("free")
                                                      else None)(analysis.fits[r["name"], r["step"], r["atoms"]])))
    ratios = {k: {fam: fam_ratio(k, fam) for fam in FIT_FAMILIES} for k in tests}
    best_fam = {k: min(FIT_FAMILIES, key=lambda f: ratios[k][f][0]) for k in tests}
    shared = cluster_bootstrap(shared_curve_ratios(analysis, kind, best_fam[kind]))
    d_typ = finite_median([len(true_curve(r)[1]) for r, _ in analysis.of(kind)])
    v = limit_verdict(ratios[kind][best_fam[kind]], FREE_CURVE_LIMIT)
    rows.append(_row(
        "O(1) constants describe the curve",
        f"held-out RMSE (odd-rank atoms; fitted on even) of each family / of a free curve with one constant per "
        f"{BIN_ATOMS} atoms (~{d_typ / BIN_ATOMS / 2:.0f} constants), K={k0}: "
        + "; ".join(f"{k}: " + ", ".join(f"{fam} ({echo.CURVE_FAMILIES[fam].doc}) {_ci(ratios[k][fam])}"
                                         for fam in FIT_FAMILIES) for k in tests)
        + f". One {best_fam[kind]} curve per matrix type and step instead of per matrix ({kind} atoms): held-out "
        f"RMSE x {_ci(shared)}",
        f"{v} ({kind} atoms, best family {best_fam[kind]}; limit {FREE_CURVE_LIMIT}x the free curve)",
        "ratios: medians with cluster-bootstrap intervals; a verdict uses the momentum (or mean) atoms"))

    # 6. stable constants across probed steps
    tr = {fam: cluster_bootstrap(transfer_ratios(analysis, kind, fam)) for fam in FIT_FAMILIES}
    steps = sorted({r["step"] for r in recs})
    fam = best_fam[kind]
    rows.append(_row(
        "The curve's constants are stable over training",
        f"held-out RMSE of the curve fitted at the previous probed step / of a refit ({kind} atoms, K={k0}, steps "
        f"{steps}): " + ", ".join(f"{f} {_ci(tr[f])}" for f in FIT_FAMILIES),
        "undecided (fewer than two probed steps)" if len(steps) < 2 else
        f"{limit_verdict(tr[fam], TRANSFER_LIMIT)} (best family {fam}; limit {TRANSFER_LIMIT})",
        f"cluster bootstrap over matrices of the per-pair ratios; steps {steps[1] - steps[0] if len(steps) > 1 else '-'} "
        "apart"))

    # 7. the plateau predictor (note 06) against the top atoms' true plateau
    plat = {k: {p: cluster_bootstrap(by_matrix(_select(records, K=k0, atoms=k),
                                               lambda r: r["plateau"][p] - r["plateau"]["true_top"]
                                               if r["plateau"][p] is not None and r["plateau"]["true_top"] is not None
                                               else None)) for p in ("rho", "multiplicative")}
            for k in KINDS if _select(records, atoms=k)}
    abs_rho = cluster_bootstrap(by_matrix(rep(k0), lambda r: abs(r["plateau"]["rho"] - r["plateau"]["true_top"])))
    rows.append(_row(
        "The plateau predictor rho (note 06) gives the top atoms' echo",
        f"rho - true plateau (median true zeta of the top {PLATEAU_TOP} atoms), K={k0}: " + "; ".join(
            f"{k} atoms: Frobenius rho {_ci(v['rho'])}, multiplicative {_ci(v['multiplicative'])}"
            for k, v in plat.items()) + f"; |rho - plateau| on one replica's atoms {_ci(abs_rho)}",
        limit_verdict(abs_rho, ENOUGH_RMSE) + " on one replica's atoms (its target)",
        "cluster bootstrap over matrices"))

    # 8. the user's update at its operating point, and the amplitude echo
    op = _select(records, K=k0, atoms=kind)
    all_err = {e: cluster_bootstrap(by_matrix(op, lambda r, e=e: _rms_all(r, e)))
               for e in (USERS_OPTIMIZER, best, "cross_polar", "plateau_mode", "oracle_replica_median", "msign")}
    vs_msign = _paired(op, USERS_OPTIMIZER, "msign", None)
    cos = {e: cluster_bootstrap(by_matrix([r for r in op if "curves" in r], lambda r, e=e: weight_cosine(r, e)))
           for e in (USERS_OPTIMIZER, "cross_polar", "plateau_mode", "oracle_replica_median", "msign")}
    cos_diff = cluster_bootstrap(by_matrix([r for r in op if "curves" in r], lambda r: (
        lambda a, b: None if a is None or b is None else a - b)(weight_cosine(r, USERS_OPTIMIZER),
                                                                 weight_cosine(r, "msign"))))
    rows.append(_row(
        f"The user's update: one replica's zeta applied to the {kind} input's atoms",
        f"K={k0}, RMS error over all atoms (= excess Frobenius distance from msign(G_true) per atom): "
        + ", ".join(f"{e} {_ci(ci)}" for e, ci in all_err.items())
        + f"; the user's minus msign's, paired: {_ci(vs_msign)}. Scale-free (the step size retuned): cosine of the "
        "weights with the true zeta over the atoms (1: the best update on these atoms): "
        + ", ".join(f"{e} {_ci(ci)}" for e, ci in cos.items()),
        ("better" if cos_diff[1] > 0 else "worse" if cos_diff[2] < 0 else "undecided") + " than msign at a retuned "
        f"step size (cosine, the user's minus msign's, paired: {_ci(cos_diff)}); "
        + ("closer" if vs_msign[2] < 0 else "farther" if vs_msign[1] > 0 else "undecided")
        + " to msign(G_true) in Frobenius distance at Muon's scale",
        "paired cluster bootstrap over matrices"))
    amp = {k: {g: _err(_select(records, K=k0, atoms=k), "cross_projection", g, what="amplitude") for g in REGIONS}
           for k in KINDS if _select(records, atoms=k)}
    floor = {k: {g: finite_median([r["floor"]["amplitude"][g] for r in _select(records, K=k0, atoms=k)]) for g in REGIONS}
             for k in amp}
    rows.append(_row(
        "Amplitude echo by cross-projection (what mode fit uses)",
        f"K={k0}, RMSE of a / s_max top/knee/bulk per kind (truth floor): " + "; ".join(
            f"{k} " + "/".join(f"{amp[k][g][0]:.3f}" for g in REGIONS) + " ("
            + "/".join(f"{floor[k][g]:.3f}" for g in REGIONS) + ")" for k in amp),
        "measured (not a seed assumption)", "medians over matrix-steps"))
    return rows


# ---- tables, plots, the summary file -----------------------------------------------------------------------

TABLE_ESTIMATORS = (*REVERB_VARIANTS, "cross_polar", "plateau_mode", "msign", "oracle_replica_median")


def summary_tables(records: list[dict], plot_k: int = 8) -> list[str]:
    """Per matrix type: rows = estimators, columns = the kinds' top/knee/bulk RMSE at K = plot_k and the
    replica kind's top RMSE at every K; medians over matrices and steps. Then the truth floors."""
    recs = _select(records)
    ks = sorted({r["K"] for r in recs})
    kinds = [k for k in KINDS if _select(records, atoms=k)]
    med = lambda rs, e, g, what="zeta": finite_median([_get(r, what, e, g) for r in rs])
    lines = []
    for typ in sorted({r["type"] for r in recs}):
        sub = [r for r in recs if r["type"] == typ]
        head = [f"{k} {g}" for k in kinds for g in REGIONS] + [f"replica top K={K}" for K in ks]
        nulls = finite_median([r["regions"].get("null", 0) for r in sub])
        lines += [f"### {typ} ({len({r['name'] for r in sub})} matrices, steps {sorted({r['step'] for r in sub})}; "
                  f"median {nulls:.0f} numerically null atoms excluded)", "",
                  "| zeta estimator | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        at = {k: [r for r in sub if r["K"] == plot_k and r["atoms"] == k] for k in kinds}
        for est in TABLE_ESTIMATORS:
            cells = [med(at[k], est, g) for k in kinds for g in REGIONS]
            cells += [med([r for r in sub if r["K"] == K and r["atoms"] == "replica"], est, "top") for K in ks]
            lines.append(f"| {est} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        floor = [finite_median([r["floor"]["zeta"][g] for r in at[k]]) for k in kinds for g in REGIONS]
        lines.append("| truth floor | " + " | ".join(f"{c:.3f}" for c in floor) + " |" + " - |" * len(ks))
        amp = [med(at[k], "cross_projection", g, "amplitude") for k in kinds for g in REGIONS]
        lines.append("| amplitude a/s_max: cross_projection | " + " | ".join(f"{c:.3f}" for c in amp) + " |"
                     + " - |" * len(ks))
        amp_floor = [finite_median([r["floor"]["amplitude"][g] for r in at[k]]) for k in kinds for g in REGIONS]
        lines.append("| amplitude truth floor | " + " | ".join(f"{c:.3f}" for c in amp_floor) + " |" + " - |" * len(ks))
        lines.append("")
    return lines


def bias_table(records: list[dict], ests=PLOT_ESTIMATORS) -> list[str]:
    """Bias (estimate - truth) per region on one replica's atoms at every K, all matrix types pooled."""
    ks = sorted({r["K"] for r in _select(records)})
    head = [f"K={K} {g}" for K in ks for g in REGIONS]
    lines = ["| estimator | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for e in ests:
        cells = [finite_median([_get(r, "zeta", e, g, "bias") for r in _select(records, K=K, atoms="replica")])
                 for K in ks for g in REGIONS]
        lines.append(f"| {e} | " + " | ".join(f"{c:+.3f}" for c in cells) + " |")
    return lines


def write_truth_summary(out_dir: str, records: list[dict], meta: dict, plot_k: int = 8) -> str:
    """summary.md (verdicts from the truth with their uncertainty, tables per matrix type) and the plots;
    returns the text."""
    import os

    analysis = CurveAnalysis(records)
    recs = _select(records)
    n_truth = meta.get("n_truth")
    lines = [f"# Echo estimators against ground truth: {meta.get('title', os.path.basename(out_dir.rstrip('/')))}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "title"]
    floors = {k: "/".join(f"{finite_median([r['floor']['zeta'][g] for r in _select(records, K=plot_k, atoms=k)]):.3f}"
                          for g in REGIONS) for k in KINDS if _select(records, atoms=k)}
    lines += ["", f"Truth: the mean of {n_truth} replicates, disjoint from the estimators'. Its own error in zeta "
              "(split-half), median top/knee/bulk: " + "; ".join(f"{k} atoms {v}" for k, v in floors.items())
              + (f". The mean of K estimator replicates has K / {n_truth} of the truth's noise variance: "
                 + ", ".join(f"K={K}: {K / n_truth:.2f}" for K in sorted({r['K'] for r in recs}))
                 if n_truth else ""),
              "", "## The seed's assumptions, answered with the truth", "",
              "Numbers: median over matrix-steps [90% interval, cluster bootstrap over matrices]. A verdict holds or "
              "fails only when the whole interval is on one side of its limit.", "",
              "| assumption | numbers | verdict | uncertainty |", "|---|---|---|---|"]
    lines += [f"| {r['assumption']} | {r['numbers']} | **{r['verdict']}** | {r['uncertainty']} |"
              for r in truth_verdicts(records, plot_k, analysis)]
    lines += ["", "## Bias on one replica's atoms (estimate - truth, median over matrix-steps)", ""]
    lines += bias_table(records)
    lines += ["", f"## RMSE against the truth per matrix type (K = {plot_k} unless a column says otherwise)", "",
              "Regions by the kind's true zeta: top >= 0.5 of its max, bulk < 0.1, knee between; numerically null "
              f"atoms (s < {NULL_REL:g} s_max) excluded. Direction echo zeta (rows) and the amplitude echo in units "
              "of the largest singular value (last rows). Truth floor: the error of the truth itself (split-half). "
              "oracle_replica_median (the replicas' own true zeta, median by rank) is a bound for one replica's atoms, not "
              "an estimator; on the mean and momentum atoms it shows what a perfect one-replica echo gives there.", ""]
    lines += summary_tables(records, plot_k)
    steps = sorted({r["step"] for r in recs})
    lines += ["Plots: " + ", ".join(f"`truth_step{s}.png`" for s in steps) + " (true and estimated zeta, and a/s, "
              "against s, one panel per matrix type; rows: replica, mean, momentum atoms); `rmse_vs_k.png` (top-atom "
              "RMSE on one replica's atoms against K). Raw numbers: `truth.jsonl`.", ""]
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    for s in steps:
        plot_truth(out_dir, records, s, plot_k)
    plot_rmse_vs_k(out_dir, records)
    return text


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_truth(out_dir: str, records: list[dict], step: int, plot_k: int = 8) -> str:
    """One figure per step: rows = atom kinds, columns = matrix types (the type's matrix in the second block, or
    its only one). Solid: true zeta and the estimators of PLOT_ESTIMATORS against s; dotted: the largest share of
    the true zeta on one true atom; dashed: the amplitude ratio a / s, true and cross-projection."""
    import os

    from matplotlib.ticker import NullLocator

    plt = _pyplot()
    recs = [r for r in _select(records, step=step, K=plot_k) if "curves" in r]
    if not recs:
        return ""
    types = sorted({r["type"] for r in recs})
    kinds = [k for k in KINDS if any(r["atoms"] == k for r in recs)]
    fig, axes = plt.subplots(len(kinds), len(types), figsize=(2.8 * len(types), 2.3 * len(kinds)), squeeze=False)
    for j, typ in enumerate(types):
        names = sorted({r["name"] for r in recs if r["type"] == typ})
        shown = names[min(1, len(names) - 1)]  # block 0's Q/K/V are rank-deficient under byte inputs
        for i, kind in enumerate(kinds):
            ax = axes[i, j]
            rec = next((r for r in recs if r["name"] == shown and r["atoms"] == kind), None)
            if rec is None:
                ax.axis("off")
                continue
            c = rec["curves"]
            s = np.asarray(c["s"], float)
            ok = s >= NULL_REL * s.max()
            ax.plot(s[ok], np.asarray(c["zeta_true"], float)[ok], "k-", lw=2, label="true zeta")
            if "single_atom" in c:
                ax.plot(s[ok], np.asarray(c["single_atom"], float)[ok], "k:", lw=1, label="share on one true atom")
            for k, est in enumerate(PLOT_ESTIMATORS):
                if f"zeta_{est}" in c:
                    ax.plot(s[ok], np.asarray(c[f"zeta_{est}"], float)[ok], lw=0.9, color=f"C{k}", label=est)
            for key, style, label in (("a_true", dict(color="k", lw=1), "true a/s (8-atom bins)"),
                                      ("a_cross_projection", dict(color="0.5", lw=0.8), "a/s cross-projection")):
                xb, mb, _, _ = rank_bins(s[ok], (np.asarray(c[key], float) / s)[ok])  # a/s per atom is noisy
                ax.plot(xb, mb, "--", label=label, **style)
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(NullLocator())  # minor log ticks cost more than the rest of the figure
            ax.set_ylim(-0.2, 1.2)
            ax.tick_params(labelsize=6)
            ax.set_title(f"{shown} ({kind} atoms)", fontsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=6, frameon=False)
    fig.suptitle(f"echo against s: truth vs estimators, step {step}, K = {plot_k}", fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.13, top=0.92, wspace=0.25, hspace=0.35)
    path = os.path.join(out_dir, f"truth_step{step}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_rmse_vs_k(out_dir: str, records: list[dict]) -> str:
    """Top-atom zeta RMSE on one replica's atoms against K, per matrix type (medians over matrices and steps),
    with the truth floor."""
    import os

    plt = _pyplot()
    recs = _select(records, atoms="replica")
    if not recs:
        return ""
    types = sorted({r["type"] for r in recs})
    ks = sorted({r["K"] for r in recs})
    ests = (*PLOT_ESTIMATORS[:4], "reverb:hungarian_ref:ols_weighted", "plateau_mode", "oracle_replica_median")
    fig, axes = plt.subplots(1, len(types), figsize=(2.6 * len(types), 2.6), squeeze=False, sharey=True)
    for j, typ in enumerate(types):
        ax = axes[0, j]
        for k, e in enumerate(ests):
            y = [finite_median([_get(r, "zeta", e, "top") for r in recs if r["type"] == typ and r["K"] == K]) for K in ks]
            ax.plot(range(len(ks)), y, "o-", ms=3, lw=1, color=f"C{k}", label=e)
        floor = [finite_median([r["floor"]["zeta"]["top"] for r in recs if r["type"] == typ and r["K"] == K]) for K in ks]
        ax.plot(range(len(ks)), floor, "k--", lw=1, label="truth floor")
        ax.axhline(ENOUGH_RMSE, color="0.6", lw=0.6)
        ax.set_xticks(range(len(ks)), [str(K) for K in ks])  # K doubles from tick to tick in the usual list
        ax.tick_params(labelsize=6)
        ax.set_title(typ, fontsize=8)
        ax.set_xlabel("K replicates", fontsize=7)
    axes[0, 0].set_ylabel("top-atom zeta RMSE", fontsize=7)
    axes[0, 0].legend(fontsize=4.5, loc="upper right")
    fig.tight_layout()
    path = os.path.join(out_dir, "rmse_vs_k.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
