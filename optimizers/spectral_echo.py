"""SpectralEcho: Muon whose orthogonalisation is shrunk by a measured echo curve (the "reverb").

Per matrix, on Muon's momentum-smoothed input X (M, N) with singular values s:
    Muon:          U diag(1) V^T                        = msign(X)
    SpectralEcho:  U diag(f(s) / f(s_max)) V^T,  f(s) = s / sqrt(s^2 + c)   (soft sign)
f is computed without an SVD as the left block of Polar([X, sqrt(c) I]) (kernels.soft_msign), and divided
by f(s_max) (s_max from a few warm-started power iterations) so the update's spectral norm is 1, as Muon's.
c = c_rel * ||X||_F^2: the constant c_rel is dimensionless and carries over between steps.

Where c_rel comes from. Every `fit_every` steps (a "fit step") the optimizer measures the echo ratio
r(s) = (u_i^T G v_i) / s_i of the atoms of X by cross-projection (optimizers/echo.py):
  - replicates: each rank's gradient before averaging and/or each micro-batch's gradient (see below);
    replicate j (global index j = micro_step * world_size + rank, the data loader's chunk order) goes to the
    atom group (first K - K//2), probe group 1 or probe group 2 (the remaining K//2 split in two);
  - each rank sends the three group sums of its replicates through one reduce-scatter (3x Muon's gradient
    traffic, on fit steps only; no per-rank gradient is moved on its own); the owner of a matrix gets
    the group sums, whose total / K is the ordinary averaged gradient;
  - atoms: the Muon input built from the atom group's mean (same momentum formula, from the buffer before
    this step), SVD on fit steps only; probe: the probe groups' mean; per-atom noise variance from the
    difference of the two probe groups;
  - binned ratio-of-sums on a fixed log grid of s / ||X_A||_F, pooled per 2-D matrix, per parameter
    ("layer") or per shape group across ranks ("shape": a small all-reduce of the bin sums);
  - weighted least-squares fit of r(s) = r_max s / sqrt(s^2 + c) on the bins (grid over c); c_rel = c / ||X_A||^2.
A fit at step t takes effect from step t + 1. Until a first fit exists (or when a fit step has fewer than 4
replicates) the update is plain Muon for that matrix: with one process and no micro-batch replicates the
optimizer IS Muon. With shrink=False it is Muon exactly (the same code path, bit-identical).
Operating point: the atoms are built from K - K//2 replicates, noisier than the full batch, so the fitted
c_rel errs on the side of more shrinkage than the full-batch optimum.

Micro-batch replicates (single process, or in addition to ranks): the training loop calls
`opt.add_replicate_gradients()` after every micro-step's backward. On a fit step it records the gradient
added since the previous call (p.grad accumulates) as one replicate; on other steps it returns at once.
It costs one copy of the hidden-matrix gradients per micro-step, on fit steps only, until step().
`opt.replicates_wanted()` says whether the next step() is a fit step.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.distributed as dist

import kernels
from optimizers.distributed import Bucket, PendingGrads, ShardedMatrixOptimizer, dist_info, grad_or_zeros
from optimizers.echo import CURVE_FAMILIES, project_atoms
from optimizers.muon import Muon, muon_update

FIT_SCOPES = ("matrix", "layer", "shape")
NORMALIZE_MODES = ("top", "none")
MIN_REPLICATES = 4  # atom group >= 2, two probe groups >= 1 each (the probe spread needs two)
STAT_FIELDS = 4  # per bin: sum of s, sum of echo, sum of echo variance, atom count (s in units of ||X_A||_F)
COLD_POWER_FACTOR = 5  # power iterations x this on a matrix's first soft step (no warm-start vector yet)
C_REL_GRID = np.logspace(-6, 0, 121)  # candidate c / ||X||_F^2 (kernels.soft_msign is accurate down to ~1e-6)


def replicate_group_sizes(K: int) -> tuple[int, int, int]:
    """(atom, probe1, probe2) replicate counts for K replicates: probes are K // 2, split in two."""
    n_probe = K // 2
    n1 = (n_probe + 1) // 2
    return K - n_probe, n1, n_probe - n1


def replicate_group(j: int, sizes: tuple[int, int, int]) -> int:
    """Group (0 atom, 1 probe1, 2 probe2) of global replicate j."""
    if j < sizes[0]:
        return 0
    return 1 if j < sizes[0] + sizes[1] else 2


class ReplicateGroups:
    """What the owner gets on a fit step: group sums (n_own, 3, *shape) and group sizes (atom, probe1, probe2)."""

    def __init__(self, sums: torch.Tensor, sizes: tuple[int, int, int]):
        self.sums, self.sizes = sums, sizes

    @property
    def mean(self) -> torch.Tensor:
        """The averaged gradient (n_own, *shape) over all K replicates."""
        return self.sums.sum(1) / sum(self.sizes)

    def group_mean(self, g: int) -> torch.Tensor:
        return self.sums[:, g] / self.sizes[g]


def log_bin_edges(n_bins: int, bin_min: float) -> torch.Tensor:
    """Fixed edges of s / ||X||_F: geometric from bin_min to 1 (the largest possible value)."""
    return torch.logspace(math.log10(bin_min), 0.0, n_bins + 1, dtype=torch.float64)


def echo_bin_stats(X_atoms: torch.Tensor, probe1: torch.Tensor, probe2: torch.Tensor, n1: int, n2: int,
                   edges: torch.Tensor) -> torch.Tensor:
    """Cross-projection bin sums for matrices X_atoms (..., M, N) probed with group means probe1/2.

    Returns (..., n_bins, 4): sum s, sum echo, sum variance of echo, count, with s and echo in units of
    ||X_atoms||_F (variance in its square). The probe is the size-weighted mean of the two probe groups;
    Var(echo_i) = d_i^2 (1 / (n1 + n2)) / (1 / n1 + 1 / n2), d_i = u_i^T (probe1 - probe2) v_i.
    """
    X = X_atoms.double()
    norm = torch.linalg.matrix_norm(X).clamp_min(torch.finfo(torch.float64).tiny)  # (...)
    U, S, Vh = torch.linalg.svd(X / norm[..., None, None], full_matrices=False)  # S (..., r), relative units
    V = Vh.mT
    p1, p2 = probe1.double() / norm[..., None, None], probe2.double() / norm[..., None, None]
    probe = (n1 * p1 + n2 * p2) / (n1 + n2)
    a = project_atoms(U, V, probe)  # (..., r)
    d = project_atoms(U, V, p1 - p2)
    var = d * d * (1.0 / (n1 + n2)) / (1.0 / n1 + 1.0 / n2)
    edges = edges.to(X.device)
    n_bins = edges.numel() - 1
    idx = torch.bucketize(S, edges, right=True) - 1  # bin of each atom; outside [edges[0], edges[-1]) -> dropped
    inside = (idx >= 0) & (idx < n_bins)
    idx = idx.clamp(0, n_bins - 1)
    onehot = torch.nn.functional.one_hot(idx, n_bins).double() * inside[..., None]  # (..., r, n_bins)
    fields = torch.stack([S, a, var, torch.ones_like(S)], dim=-1)  # (..., r, 4)
    return (onehot.mT @ fields)  # (..., n_bins, 4)


def fit_soft_sign(stats: torch.Tensor, min_bins: int = 3) -> dict | None:
    """Weighted least-squares fit of r(x) = r_max x / sqrt(x^2 + c) to bin sums (n_bins, 4); x = s / ||X||_F.

    Bin ratio = sum echo / sum s, se = sqrt(sum var) / sum s, x = mean s of the bin. c from a log grid
    (C_REL_GRID), r_max in closed form for each c. Returns {"c_rel", "r_max", "chi2", "dof", "n_bins"},
    or None when fewer than min_bins bins carry atoms, a variance and a positive ratio fit.
    """
    st = stats.detach().double().cpu().numpy()
    sum_s, sum_a, sum_var, count = st[:, 0], st[:, 1], st[:, 2], st[:, 3]
    ok = (count > 0) & (sum_s > 0) & (sum_var > 0)
    if ok.sum() < min_bins:
        return None
    x = sum_s[ok] / count[ok]
    r = sum_a[ok] / sum_s[ok]
    w = sum_s[ok] ** 2 / sum_var[ok]  # 1 / se^2
    basis = CURVE_FAMILIES["soft_sign"].fn(x[None, :], 1.0, C_REL_GRID[:, None])  # (n_c, bins)
    r_max = np.maximum((w * basis * r).sum(1) / (w * basis * basis).sum(1), 0.0)
    chi2 = (w * (r - r_max[:, None] * basis) ** 2).sum(1)
    best = int(np.argmin(chi2))
    if not r_max[best] > 0:
        return None
    return {"c_rel": float(C_REL_GRID[best]), "r_max": float(r_max[best]), "chi2": float(chi2[best]),
            "dof": int(ok.sum()) - 2, "n_bins": int(ok.sum())}


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
    """Muon with the orthogonalisation shrunk by a fitted echo curve (see the module docstring).

    Args (Muon's, plus):
        shrink: False -> exactly Muon (no replicate work, same code path).
        fit_every: steps between fits of the echo curve (fit steps: group step % fit_every == 0).
        fit_scope: "matrix" (one constant per 2-D matrix), "layer" (per parameter; a 3-D stack pools its
            matrices) or "shape" (per shape within a param group, pooled over all ranks).
        c_rel: a fixed soft-sign constant c / ||X||_F^2 instead of fitted ones (no replicates needed).
        normalize: "top" (divide by f(s_max): spectral norm 1 as Muon) or "none" (f -> 1 for strong atoms).
        n_bins, bin_min: the fixed log grid of s / ||X_A||_F for the binned echo ratio.
        power_iters: power iterations per step for s_max (warm-started from the previous step).
        soft_polish: Newton-Schulz polish steps of kernels.soft_msign.
        param_names: optional names of the parameters (param-group order), used to label echo_report().
    """

    def __init__(self, params, lr: float = 0.025, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, msign_steps: int = 5, msign_backend: str | None = None,
                 shrink: bool = True, fit_every: int = 50, fit_scope: str = "layer", c_rel: float | None = None,
                 normalize: str = "top", n_bins: int = 24, bin_min: float = 1e-4, power_iters: int = 6,
                 soft_polish: int = 2, param_names: list[str] | None = None, cautious_weight_decay: bool = False,
                 shape_scale: str = "muon"):
        defaults = self.muon_defaults(lr, momentum, nesterov, weight_decay, msign_steps, msign_backend,
                                      cautious_weight_decay, shape_scale)
        defaults.update(shrink=shrink, fit_every=fit_every, fit_scope=fit_scope, c_rel=c_rel, normalize=normalize,
                        n_bins=n_bins, bin_min=bin_min, power_iters=power_iters, soft_polish=soft_polish)
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

    # ---- hyperparameters -------------------------------------------------------------------------------
    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        fe = group["fit_every"]
        if isinstance(fe, bool) or not isinstance(fe, int) or fe < 1:
            raise ValueError(f"fit_every must be an integer >= 1 (steps between echo fits), got {fe!r}")
        if group["fit_scope"] not in FIT_SCOPES:
            raise ValueError(f"fit_scope must be one of {FIT_SCOPES}, got {group['fit_scope']!r}")
        if group["normalize"] not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {group['normalize']!r}")
        c = group["c_rel"]
        if c is not None and not (isinstance(c, (int, float)) and 1e-6 <= c <= 1e3):
            raise ValueError(f"c_rel must be None (fit it) or a number in [1e-6, 1e3] (c / ||X||_F^2), got {c!r}")
        if isinstance(group["n_bins"], bool) or not isinstance(group["n_bins"], int) or group["n_bins"] < 4:
            raise ValueError(f"n_bins must be an integer >= 4, got {group['n_bins']!r}")
        if not 0 < group["bin_min"] < 1:
            raise ValueError(f"bin_min must be in (0, 1) (smallest s / ||X||_F binned), got {group['bin_min']!r}")
        for key in ("power_iters", "soft_polish"):
            v = group[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "power_iters" else 0):
                raise ValueError(f"{key} must be a non-negative integer (power_iters >= 1), got {v!r}")
        if not isinstance(group["shrink"], bool):
            raise ValueError(f"shrink must be True or False, got {group['shrink']!r}")

    # ---- replicates ------------------------------------------------------------------------------------
    @staticmethod
    def _fits(group: dict) -> bool:
        return group["shrink"] and group["c_rel"] is None

    def _fit_due(self, group: dict) -> bool:
        return self._fits(group) and group["step"] % group["fit_every"] == 0

    def replicates_wanted(self) -> bool:
        """True when the next step() fits echo curves (add_replicate_gradients records only then)."""
        return any(self._fit_due(g) for g in self.param_groups)

    @torch.no_grad()
    def add_replicate_gradients(self) -> None:
        """Record the gradient accumulated since the previous call as one micro-batch replicate.

        Call after every micro-step's backward (p.grad accumulating over micro-steps). A no-op unless
        the next step() is a fit step. All ranks must make the same number of calls per step.
        """
        for group in self.param_groups:
            if not self._fit_due(group):
                continue
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                g = grad_or_zeros(p)
                total = self._micro_total.get(p)
                self._micro.setdefault(p, []).append(g.clone() if total is None else g - total)
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
        if K < MIN_REPLICATES:
            if not self._warned_few:
                warnings.warn(f"SpectralEcho: {K} replicate(s) on a fit step, need >= {MIN_REPLICATES} "
                              "(ranks x micro-batches via add_replicate_gradients()); keeping the previous curve "
                              "(Muon until a first fit)", stacklevel=3)
                self._warned_few = True
            return super().reduce_gradients(bucket)
        sizes = replicate_group_sizes(K)
        first = bucket.params[0]
        local = torch.zeros((bucket.per_rank * bucket.world_size, 3, *bucket.shape), dtype=torch.float32,
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
        owned = torch.empty((bucket.per_rank, 3, *bucket.shape), dtype=local.dtype, device=local.device)
        work = dist.reduce_scatter_tensor(owned, local, op=dist.ReduceOp.SUM, async_op=True)
        return PendingGrads(owned, work, finish=lambda sums: ReplicateGroups(sums[:n_own], sizes))

    # ---- update ----------------------------------------------------------------------------------------
    def compute_update(self, group, owned, W, grads, states):
        if isinstance(grads, ReplicateGroups):
            # atoms: Muon's input built from the atom group's mean, from the buffers before this step
            prev = torch.stack([s["momentum_buffer"] if "momentum_buffer" in s else torch.zeros_like(W[0])
                                for s in states]).float()
            atom_mean = grads.group_mean(0)
            X_atoms = muon_update(atom_mean, prev, group["momentum"], group["nesterov"])
            n1, n2 = grads.sizes[1], grads.sizes[2]
            edges = log_bin_edges(group["n_bins"], group["bin_min"])
            stats = echo_bin_stats(X_atoms, grads.group_mean(1), grads.group_mean(2), n1, n2, edges)
            key = (self._group_index(group), tuple(W.shape[1:]))
            self._pending_stats.setdefault(key, []).extend(zip(owned, stats.unbind(0)))
            grads = grads.mean.to(W.dtype)
        return self.direction(group, owned, W, self.momentum_step(group, grads, states))

    def _c_rel(self, group: dict, p: torch.Tensor) -> torch.Tensor | None:
        """Soft-sign constant(s) for p: a tensor of shape p.shape[:-2] (one per matrix), or None (use msign)."""
        batch = p.shape[:-2]
        if group["c_rel"] is not None:
            return torch.full(batch, float(group["c_rel"]), device=p.device)
        if group["fit_scope"] == "shape":
            fit = group["echo_shape_fits"].get("x".join(map(str, p.shape)))
            return None if fit is None else torch.full(batch, fit["c_rel"], device=p.device)
        c = self.state[p].get("echo_c_rel")
        return None if c is None else c.to(p.device)

    def direction(self, group, owned, W, g_eff):
        if not group["shrink"]:
            return super().direction(group, owned, W, g_eff)
        c_rel = [self._c_rel(group, p) for p in owned]
        use_soft = [c is not None for c in c_rel]
        if not any(use_soft):
            return super().direction(group, owned, W, g_eff)
        idx = [i for i, u in enumerate(use_soft) if u]
        X = g_eff[idx]  # (n_soft, *shape)
        norm_sq = torch.linalg.matrix_norm(X.float()) ** 2  # (n_soft, *batch)
        c_abs = (torch.stack([c_rel[i] for i in idx]) * norm_sq).clamp_min(1e-30)
        F = kernels.soft_msign(X, c_abs, steps=group["msign_steps"], polish=group["soft_polish"],
                               backend=group["msign_backend"]).float()
        if group["normalize"] == "top":
            states = [self.state[owned[i]] for i in idx]
            start = torch.ones(X.shape[1:-2] + X.shape[-1:], device=X.device)  # (*batch, N)
            v0 = torch.stack([s.get("echo_top_vec", start) for s in states])  # (n_soft, *batch, N)
            cold = any("echo_top_vec" not in s for s in states)  # no warm start yet: iterate longer
            s_max, v = top_singular_value(X, v0, group["power_iters"] * (COLD_POWER_FACTOR if cold else 1))
            for s, vi in zip(states, v):
                s["echo_top_vec"] = vi
            f_top = s_max / torch.sqrt(s_max * s_max + c_abs)
            F = F / f_top.clamp_min(1e-30)[..., None, None]
        if all(use_soft):
            return F.to(W.dtype)
        out = super().direction(group, owned, W, g_eff)  # mixed: msign for matrices without a curve yet
        out[idx] = F.to(W.dtype)
        return out

    # ---- fitting ---------------------------------------------------------------------------------------
    def _group_index(self, group: dict) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    @torch.no_grad()
    def step(self, closure=None):
        due = {id(g) for g in self.param_groups if self._fit_due(g)}
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

    def _finish_fit(self, bucket: Bucket, world_size: int) -> None:
        """Fit the curves of one bucket from this step's bin statistics; they apply from the next step."""
        group = bucket.group
        step = group["step"] - 1  # step() has advanced the counter; the fit belongs to the step just taken
        entries = self._pending_stats.get((self._group_index(group), tuple(bucket.shape)), [])
        n_bins = group["n_bins"]
        if group["fit_scope"] == "shape":
            total = torch.zeros((n_bins, STAT_FIELDS), dtype=torch.float64, device=bucket.params[0].device)
            for _, st in entries:
                total += st.reshape(-1, n_bins, STAT_FIELDS).sum(0)
            if world_size > 1:  # every rank joins, owning entries or not
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
            fit = fit_soft_sign(total)
            if fit is not None:
                group["echo_shape_fits"]["x".join(map(str, bucket.shape))] = {**fit, "step": step}
            return
        for p, st in entries:  # st: (*batch, n_bins, 4)
            flat = st.reshape(-1, n_bins, STAT_FIELDS)  # one row per 2-D matrix of p
            if group["fit_scope"] == "layer":
                fits = [fit_soft_sign(flat.sum(0))] * flat.size(0)
            else:
                fits = [fit_soft_sign(s) for s in flat]
            state = self.state[p]
            old = state.get("echo_c_rel")
            old = old.reshape(-1).tolist() if old is not None else [None] * flat.size(0)
            values = [f["c_rel"] if f is not None else o for f, o in zip(fits, old)]  # keep old where no fit
            if any(v is None for v in values):
                continue  # a matrix without any curve yet: Muon for this parameter until a fit succeeds
            state["echo_c_rel"] = torch.tensor(values, device=p.device).reshape(p.shape[:-2])
            state["echo_fit"] = {"step": step, "fits": [f for f in fits if f is not None][:1]
                                 if group["fit_scope"] == "layer" else fits}

    def echo_report(self) -> list[dict]:
        """The current curves, for logging: one dict per owned parameter with a fit, plus shape-group fits."""
        out = []
        for gi, group in enumerate(self.param_groups):
            for key, fit in group.get("echo_shape_fits", {}).items():
                out.append({"group": gi, "shape": key, **fit})
            for pi, p in enumerate(group["params"]):
                state = self.state.get(p, {})
                if "echo_c_rel" in state:
                    out.append({"group": gi, "param": self._names.get(id(p), pi),
                                "shape": "x".join(map(str, p.shape)),
                                "c_rel": state["echo_c_rel"].reshape(-1).tolist(), **state.get("echo_fit", {})})
        return out
