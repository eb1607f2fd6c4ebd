"""SpectralEcho: Muon whose orthogonalised update is weighted, direction by direction, by an estimated echo.

Per matrix, on Muon's momentum-smoothed input X (M, N) with atoms (u_i, s_i, v_i):
    Muon:               U diag(1) V^T = msign(X)
    mode="fit":         U diag(w(s)) V^T, w a curve fitted to the AMPLITUDE echo ratio r(s) = u_i^T G v_i / s_i
                        (cross-projection), w(s_max) = 1. Kernels only: soft sign s / sqrt(s^2 + c) through the
                        augmented polar factor, plus msign for the floor of the soft_sign_floor family.
    mode="plateau":     rho U diag(f(s) / f(s_max)) V^T, rho = the Frobenius plateau predictor of the user's
                        note 06 for the DIRECTION echo, f(s) = s / sqrt(s^2 + c) a fixed shape, c = c_rel ||X||^2.
                        Kernels only.
    mode="reverb_svd":  U diag(zeta) V^T from a full SVD of X, zeta the user's reverb estimate of the DIRECTION
                        echo (optimizers/reverb.py): the user's update (training/echo.py), the reference.
With shrink=False every mode is Muon exactly (the same code path, bit-identical).

Fit steps. Every `fit_every` steps (group step % fit_every == 0) the optimizer takes replicates: each rank's
gradient before averaging and/or each micro-batch's gradient (the training loop calls add_replicate_gradients()
after every micro-step's backward), global replicate j = micro_step * world_size + rank. What travels:
  - fit: the sums of three replicate groups (atom group: the first K - K//2, two probe groups: the rest) through
    one reduce-scatter, 3x Muon's gradient traffic on fit steps;
  - reverb_svd: every replicate to the matrix's owner through one reduce-scatter, K x the gradient traffic;
  - plateau: only the replicates' squared Frobenius norms (one number per matrix, one all-reduce) besides the
    ordinary gradient reduction.
A fit-mode curve applies from the step after its fit step; plateau's rho and reverb_svd's zeta apply in their own
fit step already (as in the user's optimizer) and are kept until the next one. A matrix without an estimate yet gets
Muon's update. A fit step
with fewer replicates than the mode needs (fit 4, reverb_svd 3, plateau 2) keeps the previous estimate, with a
warning: with one process and no micro-batch replicates the optimizer IS Muon.

Which echo, on which atoms (what tests/test_reverb.py, tests/test_echo.py and the truth study validate):
  - fit: the amplitude echo of the atoms of Muon's input built from the atom group's mean (same momentum
    formula, from the buffer before this step): cross-projection is exactly unbiased for those atoms. It is
    applied to the input built from all K replicates, a less noisy operating point.
  - plateau: rho = signal / total Frobenius energy of ONE replica; the note proposes it as the plateau of the
    direction echo of one replica's top atoms. Applied to the momentum input of the mean of K.
  - reverb_svd: the direction echo of ONE replica's atoms (index i = the i-th atom by rank), applied to the i-th
    atom of the momentum input: the user's operating-point mismatch, measured by spectral_probe.py --truth.

Fit-mode fixes of the review: the default family has a floor (r0 + (1 - r0) soft sign: bulk echo need not be
zero); constants per 2-D matrix (fit_scope="matrix"); bin sums pooled over the last `pool_fits` fit steps; bins
with fewer than `min_bin_atoms` atoms merged into a neighbour; bin variances from the bin sums of the probe-group
difference (correlated atoms kept); a fit whose constant sits at an edge of its grid is flagged and NOT applied
(the matrix keeps its previous curve, or Muon).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.distributed as dist

import kernels
from optimizers.distributed import Bucket, PendingGrads, ShardedMatrixOptimizer, dist_info, grad_or_zeros
from optimizers.echo import project_atoms
from optimizers.muon import Muon, muon_update
from optimizers.reverb import ALIGNMENTS, SOLVERS, reverb_echo

MODES = ("fit", "plateau", "reverb_svd")
FIT_FAMILIES = ("soft_sign", "soft_sign_floor")
FIT_SCOPES = ("matrix", "layer", "shape")
NORMALIZE_MODES = ("top", "none")
MIN_REPLICATES = {"fit": 4, "plateau": 2, "reverb_svd": 3}  # fit: atom group >= 2 and two probe groups
STAT_FIELDS = 4  # per bin: sum of s, sum of echo, variance of the echo sum, atom count (s in units of ||X_A||_F)
COLD_POWER_FACTOR = 5  # power iterations x this on a matrix's first soft step (no warm-start vector yet)
C_REL_GRID = np.logspace(-6, 0, 121)  # candidate c / ||X||_F^2 (kernels.soft_msign is accurate down to ~1e-6)
R0_GRID = np.linspace(0.0, 0.9, 19)  # candidate floors r0 of the soft_sign_floor family (r0 = 1 would be msign)
PLATEAU_C_REL = 1e-2  # mode plateau's fixed shape when c_rel is not given: s_star = 0.1 ||X||_F


def replicate_group_sizes(K: int) -> tuple[int, int, int]:
    """(atom, probe1, probe2) replicate counts for K replicates: probes are K // 2, split in two."""
    n_probe = K // 2
    n1 = (n_probe + 1) // 2
    return K - n_probe, n1, n_probe - n1


def replicate_group(j: int, sizes: tuple[int, ...]) -> int:
    """Group of global replicate j for consecutive groups of the given sizes."""
    return int(np.searchsorted(np.cumsum(sizes), j, side="right"))


class ReplicateGroups:
    """What the owner gets on a fit step: group sums (n_own, n_groups, *shape) and the group sizes."""

    def __init__(self, sums: torch.Tensor, sizes: tuple[int, ...]):
        self.sums, self.sizes = sums, sizes

    @property
    def mean(self) -> torch.Tensor:
        """The averaged gradient (n_own, *shape) over all K replicates."""
        return self.sums.sum(1) / sum(self.sizes)

    def group_mean(self, g: int) -> torch.Tensor:
        return self.sums[:, g] / self.sizes[g]


class ReplicateNorms:
    """What the owner gets on a plateau fit step: the averaged gradient (n_own, *shape), the sum over the K
    replicates of their squared Frobenius norms (n_own, *batch), and K."""

    def __init__(self, mean: torch.Tensor, sq_norm_sum: torch.Tensor, K: int):
        self.mean, self.sq_norm_sum, self.K = mean, sq_norm_sum, K


class PendingNorms:
    """An in-flight plateau reduction: the ordinary gradient reduction plus an all-reduce of squared norms."""

    def __init__(self, grads: PendingGrads, sq: torch.Tensor, work, start: int, K: int):
        self.grads, self.sq, self.work, self.start, self.K = grads, sq, work, start, K

    @property
    def works(self) -> list:
        return self.grads.works + [self.work]

    def wait(self) -> ReplicateNorms:
        mean = self.grads.wait()
        if self.work is not None:
            self.work.wait()
        return ReplicateNorms(mean, self.sq[self.start:self.start + mean.size(0)], self.K)


def log_bin_edges(n_bins: int, bin_min: float) -> torch.Tensor:
    """Fixed edges of s / ||X||_F: geometric from bin_min to 1 (the largest possible value)."""
    return torch.logspace(math.log10(bin_min), 0.0, n_bins + 1, dtype=torch.float64)


def echo_bin_stats(X_atoms: torch.Tensor, probe1: torch.Tensor, probe2: torch.Tensor, n1: int, n2: int,
                   edges: torch.Tensor) -> torch.Tensor:
    """Cross-projection bin sums for matrices X_atoms (..., M, N) probed with group means probe1/2.

    Returns (..., n_bins, 4): sum s, sum echo, variance of the bin's echo sum, count, with s and echo in units of
    ||X_atoms||_F (variance in its square). The probe is the size-weighted mean of the two probe groups. The
    variance comes from the bin sum of d_i = u_i^T (probe1 - probe2) v_i, so correlations between a bin's atoms
    count: Var(sum echo) = (sum d)^2 (1 / (n1 + n2)) / (1 / n1 + 1 / n2), unbiased with one degree of freedom
    (pool fit steps for more).
    """
    X = X_atoms.double()
    norm = torch.linalg.matrix_norm(X).clamp_min(torch.finfo(torch.float64).tiny)  # (...)
    U, S, Vh = torch.linalg.svd(X / norm[..., None, None], full_matrices=False)  # S (..., r), relative units
    V = Vh.mT
    p1, p2 = probe1.double() / norm[..., None, None], probe2.double() / norm[..., None, None]
    probe = (n1 * p1 + n2 * p2) / (n1 + n2)
    a = project_atoms(U, V, probe)  # (..., r)
    d = project_atoms(U, V, p1 - p2)
    edges = edges.to(X.device)
    n_bins = edges.numel() - 1
    idx = torch.bucketize(S, edges, right=True) - 1  # bin of each atom; outside [edges[0], edges[-1]) -> dropped
    inside = (idx >= 0) & (idx < n_bins)
    idx = idx.clamp(0, n_bins - 1)
    onehot = torch.nn.functional.one_hot(idx, n_bins).double() * inside[..., None]  # (..., r, n_bins)
    sums = onehot.mT @ torch.stack([S, a, d, torch.ones_like(S)], dim=-1)  # (..., n_bins, 4)
    var = sums[..., 2] ** 2 * (1.0 / (n1 + n2)) / (1.0 / n1 + 1.0 / n2)
    return torch.stack([sums[..., 0], sums[..., 1], var, sums[..., 3]], dim=-1)


def merge_sparse_stats(stats: np.ndarray, min_count: int) -> np.ndarray:
    """Bin sums (n_bins, 4) with empty bins dropped and bins of fewer than min_count atoms merged into a
    neighbour (the highest sparse bin joins the one below; the lowest joins the one above). Sums add exactly."""
    rows = [r for r in np.asarray(stats, dtype=np.float64) if r[3] > 0]
    while len(rows) > 1:
        sparse = [i for i, r in enumerate(rows) if r[3] < min_count]
        if not sparse:
            break
        i = sparse[-1]
        j = i - 1 if i > 0 else 1
        rows[min(i, j)] = rows[i] + rows[j]
        del rows[max(i, j)]
    return np.array(rows).reshape(-1, STAT_FIELDS)


def fit_echo_curve(stats: torch.Tensor, family: str = "soft_sign_floor", min_bins: int = 3,
                   min_bin_atoms: int = 1) -> dict | None:
    """Weighted least-squares fit of the echo ratio to bin sums (n_bins, 4); x = s / ||X||_F.

    family "soft_sign": r(x) = r_max x / sqrt(x^2 + c); "soft_sign_floor": r(x) = r_max (r0 + (1 - r0)
    x / sqrt(x^2 + c)). Bins: sparse ones merged (merge_sparse_stats), ratio = sum echo / sum s,
    se = sqrt(var) / sum s, x = mean s. c from C_REL_GRID, r0 from R0_GRID, r_max in closed form.
    Returns {"family", "c_rel", "r0", "r_max", "chi2", "dof", "n_bins", "at_edge"}, at_edge naming the constants
    that sit at an edge of their grid (c_rel at either end: msign or a normalised gradient; r0 at the top; the
    optimizer does not apply such a fit); None when fewer than min_bins usable bins or no positive fit.
    """
    if family not in FIT_FAMILIES:
        raise ValueError(f"family must be one of {FIT_FAMILIES}, got {family!r}")
    st = merge_sparse_stats(stats.detach().double().cpu().numpy(), min_bin_atoms)
    sum_s, sum_a, var, count = st[:, 0], st[:, 1], st[:, 2], st[:, 3]
    ok = (count > 0) & (sum_s > 0) & (var > 0)
    n_params = 2 if family == "soft_sign" else 3
    if ok.sum() < max(min_bins, n_params + 1):
        return None
    x = sum_s[ok] / count[ok]
    r = sum_a[ok] / sum_s[ok]
    w = sum_s[ok] ** 2 / var[ok]  # 1 / se^2
    soft = x[None, :] / np.sqrt(x[None, :] ** 2 + C_REL_GRID[:, None])  # (n_c, bins)
    r0s = R0_GRID if family == "soft_sign_floor" else np.zeros(1)
    basis = r0s[:, None, None] + (1 - r0s[:, None, None]) * soft[None]  # (n_r0, n_c, bins)
    r_max = np.maximum((w * basis * r).sum(-1) / (w * basis * basis).sum(-1), 0.0)
    chi2 = (w * (r - r_max[..., None] * basis) ** 2).sum(-1)
    i_r0, i_c = np.unravel_index(int(np.argmin(chi2)), chi2.shape)
    if not r_max[i_r0, i_c] > 0:
        return None
    at_edge = (["c_rel"] if i_c in (0, len(C_REL_GRID) - 1) else []) + \
        (["r0"] if family == "soft_sign_floor" and i_r0 == len(R0_GRID) - 1 else [])
    return {"family": family, "c_rel": float(C_REL_GRID[i_c]), "r0": float(r0s[i_r0]), "r_max": float(r_max[i_r0, i_c]),
            "chi2": float(chi2[i_r0, i_c]), "dof": int(ok.sum()) - n_params, "n_bins": int(ok.sum()),
            "at_edge": at_edge}


def top_singular_value(X: torch.Tensor, v: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration on X (..., M, N) from v (..., N): returns (s_max (...), v (..., N)), fp32."""
    X = X.float()
    v = v.float()
    for _ in range(iters):
        w = (X @ v[..., None])[..., 0]  # (..., M)
        v = (X.mT @ w[..., None])[..., 0]  # (..., N)
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-30)
    s = torch.linalg.vector_norm((X @ v[..., None])[..., 0], dim=-1)
    return s, v


class SpectralEcho(Muon):
    """Muon with each direction of the orthogonalised update weighted by an estimated echo (module docstring).

    Args (Muon's, plus):
        shrink: False -> exactly Muon (no replicate work, same code path), in every mode.
        mode: "fit" (fitted amplitude-echo curve, kernels), "plateau" (note 06's rho x a fixed soft-sign shape,
            kernels) or "reverb_svd" (the user's reverb zeta on the atoms of an SVD of the momentum input).
        fit_every: steps between fit steps (group step % fit_every == 0); the user's optimizer estimates every step.
        fit_scope (fit): "matrix" (constants per 2-D matrix), "layer" (per parameter: a 3-D stack pools its
            matrices) or "shape" (per shape within a param group, pooled over all ranks).
        c_rel: fit: a fixed soft-sign constant c / ||X||_F^2 instead of fitted ones (no replicates needed);
            plateau: the fixed shape's constant (default PLATEAU_C_REL).
        r0 (fit, with a fixed c_rel): a fixed floor, update weights r0 + (1 - r0) s / sqrt(s^2 + c).
        family (fit): "soft_sign_floor" (default) or "soft_sign" (no floor); see fit_echo_curve.
        pool_fits (fit): bin sums of the last pool_fits fit steps are pooled for each fit.
        min_bin_atoms (fit): bins with fewer atoms (pooled) are merged into a neighbour.
        normalize (fit, plateau): "top" (the update's largest weight is 1, or rho) or "none".
        n_bins, bin_min (fit): the fixed log grid of s / ||X_A||_F for the binned echo ratio.
        power_iters: power iterations per step for s_max (warm-started from the previous step).
        soft_polish: Newton-Schulz polish steps of kernels.soft_msign.
        reverb_align, reverb_solver (reverb_svd): see optimizers.reverb.reverb_echo; the defaults "none" and
            "fieller" are the user's optimizer.
        param_names: optional names of the parameters (param-group order), used to label echo_report().
    """

    def __init__(self, params, lr: float = 0.025, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, msign_steps: int = 5, msign_backend: str | None = None,
                 shrink: bool = True, mode: str = "fit", fit_every: int = 50, fit_scope: str = "matrix",
                 c_rel: float | None = None, r0: float = 0.0, family: str = "soft_sign_floor", pool_fits: int = 4,
                 min_bin_atoms: int = 2, normalize: str = "top", n_bins: int = 24, bin_min: float = 1e-4,
                 power_iters: int = 6, soft_polish: int = 2, reverb_align: str = "none",
                 reverb_solver: str = "fieller", param_names: list[str] | None = None,
                 cautious_weight_decay: bool = False, shape_scale: str = "muon"):
        defaults = self.muon_defaults(lr, momentum, nesterov, weight_decay, msign_steps, msign_backend,
                                      cautious_weight_decay, shape_scale)
        defaults.update(shrink=shrink, mode=mode, fit_every=fit_every, fit_scope=fit_scope, c_rel=c_rel, r0=r0,
                        family=family, pool_fits=pool_fits, min_bin_atoms=min_bin_atoms, normalize=normalize,
                        n_bins=n_bins, bin_min=bin_min, power_iters=power_iters, soft_polish=soft_polish,
                        reverb_align=reverb_align, reverb_solver=reverb_solver)
        self._micro: dict[torch.Tensor, list[torch.Tensor]] = {}  # param -> per-micro-step gradients (fit steps)
        self._micro_total: dict[torch.Tensor, torch.Tensor] = {}  # param -> gradient recorded so far
        self._pending_stats: dict[tuple, list] = {}  # (group index, shape) -> [(param, bin stats)] of this step
        self._warned_few = False
        ShardedMatrixOptimizer.__init__(self, params, defaults)  # Muon's checks run through validate_group
        flat = [p for g in self.param_groups for p in g["params"]]
        if param_names is not None and len(param_names) != len(flat):
            raise ValueError(f"param_names has {len(param_names)} names for {len(flat)} parameters; give one name "
                             "per parameter in param-group order, or None")
        self._names = {id(p): n for p, n in zip(flat, param_names or [])}  # labels for echo_report only

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("echo_shape_fits", {})  # "MxN" -> fit dict (fit_scope="shape")
        self.param_groups[-1].setdefault("echo_shape_pool", {})  # "MxN" -> pooled bin sums of recent fit steps

    # ---- hyperparameters -------------------------------------------------------------------------------
    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        for key, choices in (("mode", MODES), ("fit_scope", FIT_SCOPES), ("normalize", NORMALIZE_MODES),
                             ("family", FIT_FAMILIES), ("reverb_align", ALIGNMENTS), ("reverb_solver", SOLVERS)):
            if group[key] not in choices:
                raise ValueError(f"{key} must be one of {choices}, got {group[key]!r}")
        for key, low, what in (("fit_every", 1, "steps between echo estimates"), ("pool_fits", 1, "fit steps pooled"),
                               ("min_bin_atoms", 1, "atoms per bin"), ("n_bins", 4, "bins of s"),
                               ("power_iters", 1, "power iterations"), ("soft_polish", 0, "polish steps")):
            v = group[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{key} must be an integer >= {low} ({what}), got {v!r}")
        c = group["c_rel"]
        if c is not None and not (isinstance(c, (int, float)) and 1e-6 <= c <= 1e3):
            raise ValueError(f"c_rel must be None (fit it) or a number in [1e-6, 1e3] (c / ||X||_F^2), got {c!r}")
        if not (isinstance(group["r0"], (int, float)) and 0 <= group["r0"] < 1):
            raise ValueError(f"r0 must be a number in [0, 1) (the floor of the update weights), got {group['r0']!r}")
        if not 0 < group["bin_min"] < 1:
            raise ValueError(f"bin_min must be in (0, 1) (smallest s / ||X||_F binned), got {group['bin_min']!r}")
        if not isinstance(group["shrink"], bool):
            raise ValueError(f"shrink must be True or False, got {group['shrink']!r}")

    # ---- replicates ------------------------------------------------------------------------------------
    @staticmethod
    def _estimates(group: dict) -> bool:
        """Whether this group measures anything from replicates (not with shrink off or a fixed fit curve)."""
        return group["shrink"] and not (group["mode"] == "fit" and group["c_rel"] is not None)

    def _fit_due(self, group: dict) -> bool:
        return self._estimates(group) and group["step"] % group["fit_every"] == 0

    def replicates_wanted(self) -> bool:
        """True when the next step() is a fit step (add_replicate_gradients records only then)."""
        return any(self._fit_due(g) for g in self.param_groups)

    @torch.no_grad()
    def add_replicate_gradients(self) -> None:
        """Record the gradient accumulated since the previous call as one micro-batch replicate.

        Call after every micro-step's backward (p.grad accumulating over micro-steps). A no-op unless
        the next step() is a fit step. All ranks must make the same number of calls per step. Mode plateau
        keeps only each replicate's squared norm per matrix.
        """
        for group in self.param_groups:
            if not self._fit_due(group):
                continue
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                g = grad_or_zeros(p)
                total = self._micro_total.get(p)
                delta = g.clone() if total is None else g - total
                if group["mode"] == "plateau":
                    delta = (delta.float() ** 2).sum((-2, -1))  # (*batch,)
                self._micro.setdefault(p, []).append(delta)
                self._micro_total[p] = g.clone()

    def _replicate_count(self, group: dict, world_size: int) -> int:
        lists = [self._micro.get(p) for p in group["params"] if p.requires_grad]
        n_micro = len(lists[0]) if lists and lists[0] is not None else 0
        return world_size * max(n_micro, 1)

    def reduce_gradients(self, bucket: Bucket) -> PendingGrads:
        group = bucket.group
        if not self._fit_due(group):
            return super().reduce_gradients(bucket)
        K = self._replicate_count(group, bucket.world_size)
        need = MIN_REPLICATES[group["mode"]]
        if K < need:
            if not self._warned_few:
                warnings.warn(f"SpectralEcho ({group['mode']}): {K} replicate(s) on a fit step, need >= {need} "
                              "(ranks x micro-batches via add_replicate_gradients()); keeping the previous estimate "
                              "(Muon until a first one)", stacklevel=3)
                self._warned_few = True
            return super().reduce_gradients(bucket)
        if group["mode"] == "plateau":
            return self._reduce_norms(bucket, K)
        sizes = replicate_group_sizes(K) if group["mode"] == "fit" else (1,) * K  # reverb_svd: every replicate
        first = bucket.params[0]
        local = torch.zeros((bucket.per_rank * bucket.world_size, len(sizes), *bucket.shape), dtype=torch.float32,
                            device=first.device)  # (stack entries, group, *shape): this rank's group sums
        for i, p in enumerate(bucket.params):
            micro = self._micro.get(p)
            if micro:  # replicate = n_micro * (gradient added by that micro-step); j = m * world_size + rank
                for m, delta in enumerate(micro):
                    g = replicate_group(m * bucket.world_size + bucket.rank, sizes)
                    local[i, g].add_(delta.float(), alpha=len(micro))
            else:  # the rank's accumulated gradient is its replicate
                local[i, replicate_group(bucket.rank, sizes)].add_(grad_or_zeros(p).float())
        n_own = len(bucket.owned)
        if bucket.world_size == 1:
            return PendingGrads(ReplicateGroups(local, sizes))
        owned = torch.empty((bucket.per_rank, len(sizes), *bucket.shape), dtype=local.dtype, device=local.device)
        work = dist.reduce_scatter_tensor(owned, local, op=dist.ReduceOp.SUM, async_op=True)
        return PendingGrads(owned, work, finish=lambda sums: ReplicateGroups(sums[:n_own], sizes), sent=local)

    def _reduce_norms(self, bucket: Bucket, K: int) -> PendingNorms:
        """Plateau: the ordinary gradient reduction plus the sum over all replicates of their squared norms."""
        first = bucket.params[0]
        sq = torch.zeros((bucket.per_rank * bucket.world_size, *bucket.shape[:-2]), dtype=torch.float32,
                         device=first.device)
        for i, p in enumerate(bucket.params):
            micro = self._micro.get(p)
            if micro:  # a replicate is n_micro x its micro-step's gradient: squared norm x n_micro^2
                sq[i] = torch.stack(micro).sum(0) * len(micro) ** 2
            else:
                sq[i] = (grad_or_zeros(p).float() ** 2).sum((-2, -1))
        work = dist.all_reduce(sq, op=dist.ReduceOp.SUM, async_op=True) if bucket.world_size > 1 else None
        return PendingNorms(super().reduce_gradients(bucket), sq, work, bucket.owned_start, K)

    # ---- update ----------------------------------------------------------------------------------------
    def compute_update(self, group, owned, W, grads, states):
        if isinstance(grads, ReplicateGroups) and group["mode"] == "fit":
            # atoms: Muon's input built from the atom group's mean, from the buffers before this step
            prev = torch.stack([s["momentum_buffer"] if "momentum_buffer" in s else torch.zeros_like(W[0])
                                for s in states]).float()
            X_atoms = muon_update(grads.group_mean(0), prev, group["momentum"], group["nesterov"])
            n1, n2 = grads.sizes[1], grads.sizes[2]
            edges = log_bin_edges(group["n_bins"], group["bin_min"])
            stats = echo_bin_stats(X_atoms, grads.group_mean(1), grads.group_mean(2), n1, n2, edges)
            key = (self._group_index(group), tuple(W.shape[1:]))
            self._pending_stats.setdefault(key, []).extend(zip(owned, stats.unbind(0)))
            grads = grads.mean.to(W.dtype)
        elif isinstance(grads, ReplicateGroups):  # reverb_svd: every replicate of every owned matrix
            dtype = torch.float64 if grads.sums.device.type == "cpu" else torch.float32
            for p, state, reps in zip(owned, states, grads.sums):  # reps (K, *shape)
                stacks = reps.unsqueeze(0) if reps.ndim == 3 else reps.transpose(0, 1)  # (B, K, M, N)
                zeta = torch.stack([reverb_echo(R, group["reverb_align"], group["reverb_solver"], dtype)["zeta"]
                                    for R in stacks])  # (B, D)
                state["reverb_zeta"] = zeta.reshape(*p.shape[:-2], -1).float()
                state["reverb_step"] = group["step"]
            grads = grads.mean.to(W.dtype)
        elif isinstance(grads, ReplicateNorms):  # plateau: rho per matrix from T and U (note 06)
            K = grads.K
            T = grads.sq_norm_sum.double() / K  # mean squared norm of a replicate, (n_own, *batch)
            U = (grads.mean.double() ** 2).sum((-2, -1))  # squared norm of the mean
            rho = ((K * U - T) / ((K - 1) * T.clamp_min(torch.finfo(torch.float64).tiny))).clamp(0.0, 1.0)
            for state, value in zip(states, rho):
                state["plateau_rho"] = value.float()
                state["plateau_step"] = group["step"]
            grads = grads.mean.to(W.dtype)
        return self.direction(group, owned, W, self.momentum_step(group, grads, states))

    def _curve(self, group: dict, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fit/plateau: (c_rel, weight of msign) per matrix of p, each of shape p.shape[:-2]; None: use msign."""
        batch = p.shape[:-2]
        full = lambda v: torch.full(batch, float(v), device=p.device)
        if group["mode"] == "plateau":
            return full(group["c_rel"] if group["c_rel"] is not None else PLATEAU_C_REL), full(0.0)
        if group["c_rel"] is not None:
            return full(group["c_rel"]), full(group["r0"])
        if group["fit_scope"] == "shape":
            fit = group["echo_shape_fits"].get("x".join(map(str, p.shape)))
            return None if fit is None else (full(fit["c_rel"]), full(fit["r0"]))
        state = self.state[p]
        if "echo_c_rel" not in state:
            return None
        return state["echo_c_rel"].to(p.device), state["echo_r0"].to(p.device)

    def direction(self, group, owned, W, g_eff):
        if not group["shrink"]:
            return super().direction(group, owned, W, g_eff)
        if group["mode"] == "reverb_svd":
            return self._reverb_direction(group, owned, W, g_eff)
        curves = [self._curve(group, p) for p in owned]
        if group["mode"] == "plateau":
            curves = [c if "plateau_rho" in self.state[p] else None for c, p in zip(curves, owned)]
        idx = [i for i, c in enumerate(curves) if c is not None]
        if not idx:
            return super().direction(group, owned, W, g_eff)
        X = g_eff[idx]  # (n_soft, *shape)
        c_rel = torch.stack([curves[i][0] for i in idx])
        r0 = torch.stack([curves[i][1] for i in idx])
        c_abs = (c_rel * torch.linalg.matrix_norm(X.float()) ** 2).clamp_min(1e-30)
        F = kernels.soft_msign(X, c_abs, steps=group["msign_steps"], polish=group["soft_polish"],
                               backend=group["msign_backend"]).float()
        if bool((r0 > 0).any()):  # the floor: r0 msign(X) + (1 - r0) soft sign
            floor = kernels.msign(X, steps=group["msign_steps"], backend=group["msign_backend"]).float()
            F = r0[..., None, None] * floor + (1 - r0)[..., None, None] * F
        if group["normalize"] == "top":
            states = [self.state[owned[i]] for i in idx]
            start = torch.ones(X.shape[1:-2] + X.shape[-1:], device=X.device)  # (*batch, N)
            v0 = torch.stack([s.get("echo_top_vec", start) for s in states])  # (n_soft, *batch, N)
            cold = any("echo_top_vec" not in s for s in states)  # no warm start yet: iterate longer
            s_max, v = top_singular_value(X, v0, group["power_iters"] * (COLD_POWER_FACTOR if cold else 1))
            for s, vi, si in zip(states, v, s_max):
                if bool((si > 0).all()):
                    s["echo_top_vec"] = vi
                else:  # a zero matrix (e.g. the first step's gradient under a zero head) gives no direction:
                    s.pop("echo_top_vec", None)  # a zero warm start would stay zero; start the next step cold
            f_top = r0 + (1 - r0) * s_max / torch.sqrt(s_max * s_max + c_abs)
            F = F / f_top.clamp_min(1e-30)[..., None, None]
        if group["mode"] == "plateau":
            F = F * torch.stack([self.state[owned[i]]["plateau_rho"] for i in idx]).to(F.device)[..., None, None]
        if len(idx) == len(owned):
            return F.to(W.dtype)
        out = super().direction(group, owned, W, g_eff)  # mixed: msign for matrices without an estimate yet
        out[idx] = F.to(W.dtype)
        return out

    def _reverb_direction(self, group, owned, W, g_eff):
        """U diag(zeta) V^T from a full SVD of each matrix of g_eff; Muon for matrices without zeta yet."""
        have = [i for i, p in enumerate(owned) if "reverb_zeta" in self.state[p]]
        if not have:
            return super().direction(group, owned, W, g_eff)
        X = g_eff[have].float()
        U, _, Vh = torch.linalg.svd(X, full_matrices=False)  # (n, *batch, M, D), (n, *batch, D, N)
        zeta = torch.stack([self.state[owned[i]]["reverb_zeta"] for i in have]).to(X.device)  # (n, *batch, D)
        F = (U * zeta[..., None, :]) @ Vh
        if len(have) == len(owned):
            return F.to(W.dtype)
        out = super().direction(group, owned, W, g_eff)
        out[have] = F.to(W.dtype)
        return out

    # ---- fitting ---------------------------------------------------------------------------------------
    def _group_index(self, group: dict) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    @torch.no_grad()
    def step(self, closure=None):
        due = {id(g) for g in self.param_groups if self._fit_due(g) and g["mode"] == "fit"}
        rank, world_size = dist_info()
        buckets = [b for b in self.make_buckets(rank, world_size) if id(b.group) in due] if due else []
        try:
            loss = super().step(closure)
            for bucket in buckets:  # same order on every rank (the shape scope all-reduces per bucket)
                self._finish_fit(bucket, world_size)
        finally:
            self._micro.clear()
            self._micro_total.clear()
            self._pending_stats.clear()
        return loss

    @staticmethod
    def _pooled(old: torch.Tensor | None, new: torch.Tensor, pool: int) -> torch.Tensor:
        """Ring of the last `pool` fit steps' bin sums: (n <= pool, ...) with `new` appended."""
        stacked = new.unsqueeze(0) if old is None else torch.cat([old.to(new), new.unsqueeze(0)])
        return stacked[-pool:]

    def _finish_fit(self, bucket: Bucket, world_size: int) -> None:
        """Fit the curves of one bucket from this step's bin sums pooled with the previous fit steps'; they
        apply from the next step. A fit flagged at a grid edge is recorded but not applied."""
        group = bucket.group
        step = group["step"] - 1  # step() has advanced the counter; the fit belongs to the step just taken
        entries = self._pending_stats.get((self._group_index(group), tuple(bucket.shape)), [])
        n_bins = group["n_bins"]
        fit = lambda st: fit_echo_curve(st, group["family"], min_bin_atoms=group["min_bin_atoms"])
        if group["fit_scope"] == "shape":
            total = torch.zeros((n_bins, STAT_FIELDS), dtype=torch.float64, device=bucket.params[0].device)
            for _, st in entries:
                total += st.reshape(-1, n_bins, STAT_FIELDS).sum(0)
            if world_size > 1:  # every rank joins, owning entries or not
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
            key = "x".join(map(str, bucket.shape))
            pool = self._pooled(group["echo_shape_pool"].get(key), total, group["pool_fits"])
            group["echo_shape_pool"][key] = pool
            result = fit(pool.sum(0))
            if result is not None and not result["at_edge"]:
                group["echo_shape_fits"][key] = {**result, "step": step}
            elif result is not None:
                group.setdefault("echo_shape_flagged", {})[key] = {**result, "step": step}
            return
        for p, st in entries:  # st: (*batch, n_bins, 4)
            state = self.state[p]
            pool = self._pooled(state.get("echo_stat_pool"), st.reshape(-1, n_bins, STAT_FIELDS), group["pool_fits"])
            state["echo_stat_pool"] = pool  # (n_pool, B, n_bins, 4)
            pooled = pool.sum(0)  # (B, n_bins, 4): one row per 2-D matrix of p
            if group["fit_scope"] == "layer":
                fits = [fit(pooled.sum(0))] * pooled.size(0)
            else:
                fits = [fit(s) for s in pooled]
            old_c = state["echo_c_rel"].reshape(-1).tolist() if "echo_c_rel" in state else [None] * len(fits)
            old_r0 = state["echo_r0"].reshape(-1).tolist() if "echo_r0" in state else [None] * len(fits)
            usable = [f is not None and not f["at_edge"] for f in fits]
            c_values = [f["c_rel"] if u else o for f, u, o in zip(fits, usable, old_c)]  # keep old where none
            r0_values = [f["r0"] if u else o for f, u, o in zip(fits, usable, old_r0)]
            state["echo_fit"] = {"step": step, "fits": fits[:1] if group["fit_scope"] == "layer" else fits,
                                 "applied": usable}
            if any(v is None for v in c_values):
                continue  # a matrix without any usable curve yet: Muon for this parameter until one exists
            state["echo_c_rel"] = torch.tensor(c_values, device=p.device).reshape(p.shape[:-2])
            state["echo_r0"] = torch.tensor(r0_values, device=p.device).reshape(p.shape[:-2])

    def echo_report(self) -> list[dict]:
        """The current estimates, for logging: one dict per owned parameter with one, plus shape-group fits."""
        out = []
        for gi, group in enumerate(self.param_groups):
            for key, fit in group.get("echo_shape_fits", {}).items():
                out.append({"group": gi, "shape": key, **fit})
            for pi, p in enumerate(group["params"]):
                state = self.state.get(p, {})
                label = {"group": gi, "param": self._names.get(id(p), pi), "shape": "x".join(map(str, p.shape))}
                if "echo_c_rel" in state:
                    out.append({**label, "c_rel": state["echo_c_rel"].reshape(-1).tolist(),
                                "r0": state["echo_r0"].reshape(-1).tolist(), **state.get("echo_fit", {})})
                elif "echo_fit" in state:  # fitted, but every fit so far flagged or failed: still Muon
                    out.append({**label, **state["echo_fit"]})
                if "plateau_rho" in state:
                    out.append({**label, "plateau_rho": state["plateau_rho"].reshape(-1).tolist(),
                                "step": state["plateau_step"]})
                if "reverb_zeta" in state:
                    zeta = state["reverb_zeta"].reshape(-1, state["reverb_zeta"].size(-1))
                    out.append({**label, "reverb_zeta_top": zeta[:, :4].tolist(),
                                "reverb_zeta_median": zeta.median(-1).values.tolist(), "step": state["reverb_step"]})
        return out
