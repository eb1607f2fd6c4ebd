"""The user's direction-echo estimators (the "reverb", note 05; the plateau predictor, note 06), an
alignment-free variant, and the ground truth they are measured against. Plain functions on a replicate stack.

Notation. A layer's true gradient G is M x N; replicas G^(a) = G + E^(a), a = 1..K, are equal-size gradients
with independent noise (one per rank and/or per micro-batch). D = min(M, N). An observed matrix X (one replica,
the mean of K, or the optimizer's momentum input) has atoms (u_i, s_i, v_i), i = 0..D-1 by descending s.

Two echoes (../shared/design/spectral_echo.md, sections 0 and 2):
  direction echo  zeta_i = u_i^T msign(G) v_i  (~ <u_i, u_i^true><v_i, v_i^true>, in [-1, 1]): the weights that
                  bring U diag(zeta) V^T closest to msign(G) (note 04). The user's update targets this one.
  amplitude echo  a_i = u_i^T G v_i: the weights that bring U diag(a) V^T closest to G (cross-projection,
                  optimizers/echo.py, targets this one).

Contents:
- reverb_echo: the user's reverb. Per-replica SVDs, alignment of atoms across replicas ("greedy_mean",
  "hungarian_ref" or "none", each with the sign fix), the reverb matrix Z_i (K x K) per direction, a solver
  ("fieller", "ols_weighted", "ols_division_free"), sqrt of the positive part. Estimates the direction echo of
  ONE replica's atoms (the noise level of one replica), indexed by rank.
- plateau_rho: the Frobenius plateau predictor rho = signal / (signal + noise) energy of one replica (note 06),
  with a jackknife standard error, and the multiplicative-noise plateau from alignment angles to the mean.
- cross_polar_echo: an alignment-free reverb (design note section 0 (d)): z^(a->b)_i = u_i^(a)T msign(G^(b)) v_i^(a).
  A candidate, to be checked against the truth before it is trusted.
- true_echo: zeta_i and a_i of X's atoms for a known G (float64 SVDs): the ground truth.
Everything runs in float64 on the input's device unless `dtype` says otherwise.
"""
from __future__ import annotations

from typing import Sequence

import torch

from optimizers.echo import check_replicates

__all__ = ["ALIGNMENTS", "SOLVERS", "MIN_REVERB_REPLICAS", "replica_stack", "replica_svds", "mean_svd",
           "align_atoms", "reverb_matrices", "solve_reverb", "reverb_from_svds", "reverb_echo", "plateau_rho",
           "cross_polar_echo", "true_echo", "polar_factor", "subset_svds", "zeta_from_reverb",
           "cross_polar_matrix", "zeta_from_cross_polar"]

ALIGNMENTS = ("greedy_mean", "hungarian_ref", "none")
SOLVERS = ("fieller", "ols_weighted", "ols_division_free")
MIN_REVERB_REPLICAS = 3  # a triple (a, b, p) of distinct replicas per pivot
FEW_REPLICAS_HINT = ("a pivot needs a triple of distinct replicas. The user's code falls back for K < 3 to "
                     "sqrt(median |z|) over the one pair: the geometric mean of two replicas' echoes with no noise "
                     "correction. It is refused here: use more replicas (ranks x micro-batches), or plateau_rho / "
                     "cross_polar_echo, which need only K >= 2")


# ----------------------------------------------------------------------------------------------
# Input checks and SVDs


def replica_stack(replicas, min_count: int, what: str, hint: str = "",
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A validated (K, M, N) stack in `dtype` from a tensor (K, M, N) or a sequence of (M, N) tensors.

    ValueError, before any work, for: mismatched shapes (naming the replica), fewer than min_count replicas
    (with `hint`, e.g. what the user's code does instead), NaN / Inf (naming the replicas).
    """
    if isinstance(replicas, (list, tuple)):
        if not replicas:
            raise ValueError(f"{what} got an empty list of replicas; pass a (K, M, N) tensor or K (M, N) tensors")
        for j, r in enumerate(replicas):
            if not isinstance(r, torch.Tensor) or r.ndim != 2:
                raise ValueError(f"replica {j} must be a 2-D tensor (M, N), got "
                                 f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}")
            if r.shape != replicas[0].shape:
                raise ValueError(f"replica {j} has shape {tuple(r.shape)} but replica 0 has "
                                 f"{tuple(replicas[0].shape)}: all replicas must be gradients of the same matrix "
                                 "(stack one matrix at a time)")
        replicas = torch.stack([r.to(dtype) for r in replicas])
    if isinstance(replicas, torch.Tensor) and replicas.ndim == 3 and replicas.size(0) < min_count:
        raise ValueError(f"{what} needs at least {min_count} replicas, got K={replicas.size(0)}"
                         + (f"; {hint}" if hint else ""))
    if isinstance(replicas, torch.Tensor) and replicas.ndim == 3:
        bad = (~torch.isfinite(replicas)).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"replicas {bad} contain NaN or Inf; drop them or check the gradients (a diverged "
                             "micro-batch, an overflow in low precision) before estimating echoes")
    return check_replicates(replicas, min_count=min_count).to(dtype)


def replica_svds(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVDs of a stack R (K, M, N): U (K, M, D), S (K, D) descending, V (K, N, D)."""
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    return U, S, Vh.mT


def mean_svd(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the replicas' mean: U (M, D), S (D,), V (N, D)."""
    U, S, Vh = torch.linalg.svd(R.mean(0), full_matrices=False)
    return U, S, Vh.mT


def polar_factor(X: torch.Tensor) -> torch.Tensor:
    """msign(X) = U sign(S) V^T exactly (float64 SVD), for (..., M, N); directions with s ~ 0 get weight 0."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    tol = S.amax(-1, keepdim=True) * max(X.shape[-2:]) * torch.finfo(S.dtype).eps
    return (U * (S > tol).to(U.dtype).unsqueeze(-2)) @ Vh


# ----------------------------------------------------------------------------------------------
# Alignment of atoms across replicas


def _greedy_assignment(scores: torch.Tensor) -> torch.Tensor:
    """perm (K, D): for each replica k, reference atoms j = 0, 1, ... in order each take the best unused
    replica atom perm[k, j] = argmax_i scores[k, i, j] (the user's core_math._greedy_perm_from_scores)."""
    K, D, _ = scores.shape
    perm = torch.empty(K, D, dtype=torch.long, device=scores.device)
    used = torch.zeros(K, D, dtype=torch.bool, device=scores.device)
    rows = torch.arange(K, device=scores.device)
    for j in range(D):
        i = scores[:, :, j].masked_fill(used, float("-inf")).argmax(1)  # (K,)
        perm[:, j] = i
        used[rows, i] = True
    return perm


def _hungarian_assignment(scores: torch.Tensor) -> torch.Tensor:
    """perm (K, D) maximising the total score per replica (scipy.optimize.linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment

    K, D, _ = scores.shape
    perm = torch.empty(K, D, dtype=torch.long)
    for k in range(K):
        rows, cols = linear_sum_assignment(scores[k].cpu().numpy(), maximize=True)
        perm[k, torch.as_tensor(cols)] = torch.as_tensor(rows)
    return perm.to(scores.device)


def align_atoms(svds: tuple[torch.Tensor, torch.Tensor, torch.Tensor], align: str,
                mean: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                reference: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Permute and sign-fix each replica's atoms (U (K, M, D), S (K, D), V (K, N, D)) onto a reference.

    align="greedy_mean": reference = the atoms of the replicas' mean (`mean`, as from mean_svd); score
      |U_k^T U_ref| o |V_k^T V_ref|, greedy one-to-one in the reference's order (core_math.align_svds_greedy_to_mean).
    align="hungarian_ref": reference = replica `reference`; the same score, optimal assignment (note 05).
    align="none": each replica's raw SVD order (the user's optimizer today).
    Sign fix (all three): flip u_i and v_i together where <u_i, u_ref_i><v_i, v_ref_i> < 0. A joint flip leaves
    every reverb entry z = <u^a, u^b><v^a, v^b> unchanged, so it matters only to sign-sensitive statistics.
    """
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    U, S, V = svds
    if align == "greedy_mean":
        if mean is None:
            raise ValueError("align='greedy_mean' needs the SVD of the replicas' mean (mean_svd(R))")
        U_ref, V_ref = mean[0].unsqueeze(0), mean[2].unsqueeze(0)  # (1, M, D), (1, N, D)
    else:
        if not 0 <= reference < U.size(0):
            raise ValueError(f"reference replica {reference} out of range for K={U.size(0)}")
        U_ref, V_ref = U[reference:reference + 1], V[reference:reference + 1]
    if align != "none":
        scores = (U.mT @ U_ref).abs() * (V.mT @ V_ref).abs()  # (K, D replica atoms, D reference atoms)
        perm = _greedy_assignment(scores) if align == "greedy_mean" else _hungarian_assignment(scores)
        U = torch.gather(U, 2, perm.unsqueeze(1).expand_as(U))
        V = torch.gather(V, 2, perm.unsqueeze(1).expand_as(V))
        S = torch.gather(S, 1, perm)
    sign = torch.sign((U * U_ref).sum(1) * (V * V_ref).sum(1))  # (K, D)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign.unsqueeze(1), S, V * sign.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Reverb matrices and solvers


def reverb_matrices(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Z (D, K, K): Z[i, a, b] = <u_i^a, u_i^b><v_i^a, v_i^b> for aligned atoms U (K, M, D), V (K, N, D); diagonal 0."""
    Z = torch.einsum("amd,bmd->dab", U, U) * torch.einsum("and,bnd->dab", V, V)
    K = Z.size(-1)
    return Z * (1 - torch.eye(K, dtype=Z.dtype, device=Z.device))


def _safe_denominator(Z: torch.Tensor) -> torch.Tensor:
    # Machine-precision guard only (as the user's code): |z| below eps moves to +-eps (exact zeros to +eps).
    eps = torch.finfo(Z.dtype).eps
    sign = torch.where(Z < 0, -torch.ones_like(Z), torch.ones_like(Z))
    return torch.where(Z.abs() < eps, sign * eps, Z)


def solve_reverb(Z: torch.Tensor, solver: str) -> torch.Tensor:
    """zeta^2 per pivot: s (K, D) from reverb matrices Z (D, K, K) (zero diagonal, symmetric).

    "fieller" (the user's optimizer, core_math.solve_for_spectral_echo_using_reverb): per pivot p the
      unweighted mean over ordered pairs a != b (both != p) of Z[a,p] Z[p,b] / Z[a,b], divided by the Fieller
      factor 1 + var(Z_off) / mean(Z_off)^2 over all off-diagonal entries of that direction.
    "ols_weighted" (note 05, section 3): the analytic minimiser of sum_{a<b; a,b != p} w_ab (s - r_ab->p)^2 with
      w_ab = Z[a,b]^2, i.e. sum Z[a,p] Z[p,b] Z[a,b] / sum Z[a,b]^2 with both sums over pairs not involving p.
    "ols_division_free": note 05's vectorised form ((Z Z) o Z^T) 1 / ||Z||_F^2, also the user's analysis
      (core_math.compute_echo_fit_diagnostics_from_aligned_svds). Its denominator also counts the pairs that
      involve the pivot, so with exact rank-one Z it returns (K - 2) / K zeta^2: biased low (tested).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    D, K, _ = Z.shape
    if solver == "fieller":
        off = ~torch.eye(K, dtype=torch.bool, device=Z.device)
        Z_off = Z[:, off]  # (D, K (K - 1))
        mu = Z_off.mean(1)
        var = Z_off.var(1, unbiased=True).clamp_min(0.0)
        mu_safe = _safe_denominator(mu)
        fieller = 1.0 + var / (mu_safe * mu_safe)  # (D,)
        W = torch.where(off, 1.0 / _safe_denominator(Z), torch.zeros_like(Z))  # 1 / Z[a,b], a != b
        # sum_{a,b} Z[a,p] W[a,b] Z[b,p]: terms with a = p or b = p vanish (Z[p,p] = 0), a = b has W = 0
        ratio_sum = (Z * (W @ Z)).sum(1)  # (D, K)
        s = ratio_sum / ((K - 1) * (K - 2)) / fieller.unsqueeze(1)
    else:
        num = (Z * (Z @ Z)).sum(1)  # (D, K): sum_{a,b} Z[p,a] Z[a,b] Z[b,p]
        total = (Z * Z).sum((1, 2))  # (D,): ||Z||_F^2 over ordered pairs
        if solver == "ols_weighted":
            den = total.unsqueeze(1) - 2.0 * (Z * Z).sum(1)  # drop row p and column p
        else:
            den = total.unsqueeze(1).expand(D, K)
        s = torch.where(den > 0, num / den.clamp_min(torch.finfo(Z.dtype).tiny), torch.zeros_like(num))
    return s.T  # (K, D)


def zeta_from_reverb(Z: torch.Tensor, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(zeta (D,), zeta_per_pivot (K, D)) from reverb matrices Z (D, K, K): the solver's zeta^2 per pivot, the
    square root of its positive part, the median over pivots. Z of K replicas aligned independently of each other
    (align "hungarian_ref" or "none") restricted to its first K' rows and columns is the Z of those K' replicas."""
    zeta_pivot = solve_reverb(Z, solver).clamp_min(0.0).sqrt()
    return zeta_pivot.median(0).values, zeta_pivot


def reverb_from_svds(svds: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     mean: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     align: str = "greedy_mean", solver: str = "fieller") -> dict[str, torch.Tensor]:
    """reverb_echo from precomputed replica SVDs and the mean's SVD (reuse them across align/solver choices)."""
    K = svds[0].size(0)
    if K < MIN_REVERB_REPLICAS:
        raise ValueError(f"the reverb needs at least {MIN_REVERB_REPLICAS} replicas, got K={K}; {FEW_REPLICAS_HINT}")
    U, S, V = align_atoms(svds, align, mean)
    zeta, zeta_pivot = zeta_from_reverb(reverb_matrices(U, V), solver)
    return {"s": mean[1], "zeta": zeta, "zeta_per_pivot": zeta_pivot, "s_replicas": S}



def reverb_echo(replicas, align: str = "greedy_mean", solver: str = "fieller",
                dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The user's reverb: the DIRECTION echo zeta of ONE replica's atoms, from K >= 3 replicas (K, M, N).

    Method: per-replica SVDs; alignment of atoms across replicas (`align`, see align_atoms) with the sign fix;
    per direction i the reverb matrix Z_i[a, b] = <u_i^a, u_i^b><v_i^a, v_i^b> (~ zeta_i^a zeta_i^b for a != b);
    zeta_i^p squared from the triples (`solver`, see solve_reverb); zeta = sqrt(max(., 0)).
    Returns {"s": (D,) singular values of the replicas' mean (descending), "zeta": (D,) the median over pivots,
    "zeta_per_pivot": (K, D), "s_replicas": (K, D) replica singular values in the aligned order}.
    Atom order: index i is the i-th atom by rank, of the mean (greedy_mean), of replica 0 (hungarian_ref) or of
    each replica (none). The user's optimizer applies zeta[i] to the i-th atom of its momentum matrix: the echo
    of one replica's noise level applied to a far less noisy matrix (measure it with true_echo).
    """
    for name, value, choices in (("align", align, ALIGNMENTS), ("solver", solver, SOLVERS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    R = replica_stack(replicas, MIN_REVERB_REPLICAS, "reverb_echo", FEW_REPLICAS_HINT, dtype=dtype)
    return reverb_from_svds(replica_svds(R), mean_svd(R), align, solver)


# ----------------------------------------------------------------------------------------------
# Plateau predictor (note 06)


def _rho(T: torch.Tensor, U: torch.Tensor, K: int) -> torch.Tensor:
    """(K U - T) / ((K - 1) T): signal energy / total energy of one replica (unclipped)."""
    return (K * U - T) / ((K - 1) * T)


def plateau_rho(replicas, top_k: int = 8, svds=None, mean=None,
                dtype: torch.dtype = torch.float64) -> dict[str, float]:
    """Plateau predictors of the DIRECTION echo of ONE replica's top atoms (note 06), from K >= 2 replicas.

    Frobenius: T = mean_r ||G^(r)||^2 = S + N and U = ||mean_r G^(r)||^2 = S + N / K give the signal energy
      S = (K U - T) / (K - 1), the noise energy of one replica N = K (T - U) / (K - 1) and
      rho = S / (S + N) = (K U - T) / ((K - 1) T), clipped to [0, 1]. rho_se: jackknife over replicas (K >= 3).
    Multiplicative (core_math.compute_multiplicative_plateau_stats): replicas aligned greedily to the mean's
      atoms; per direction sqrt(mean_r cos^2(u_r, u_mean) x mean_r cos^2(v_r, v_mean)); the median over the
      top_k directions by the replicas' median singular value.
    Pass svds / mean (replica_svds, mean_svd) to reuse them. Returns floats: rho, rho_unclipped, rho_se,
    signal_energy, noise_energy (per replica), plateau_multiplicative.
    """
    R = replica_stack(replicas, 2, "plateau_rho", "a signal / noise split needs at least two replicas", dtype=dtype)
    K = R.size(0)
    flat = R.reshape(K, -1)
    norms = (flat * flat).sum(1)  # (K,)
    total = flat.sum(0)
    T, U = norms.mean(), (total @ total) / K ** 2
    rho = _rho(T, U, K)
    rho_se = float("nan")
    if K >= 3:  # jackknife: leave replica k out; sums update in closed form (no pass over the matrices)
        dots = flat @ total  # <G_k, sum>
        T_loo = (K * T - norms) / (K - 1)
        U_loo = (total @ total - 2 * dots + norms) / (K - 1) ** 2
        loo = _rho(T_loo, U_loo, K - 1)
        rho_se = float(((K - 1) / K * ((loo - loo.mean()) ** 2).sum()).sqrt())
    svds = replica_svds(R) if svds is None else svds
    mean = mean_svd(R) if mean is None else mean
    Ua, Sa, Va = align_atoms(svds, "greedy_mean", mean)
    cos2_left = ((Ua * mean[0].unsqueeze(0)).sum(1) ** 2).mean(0)  # (D,)
    cos2_right = ((Va * mean[2].unsqueeze(0)).sum(1) ** 2).mean(0)
    k = min(int(top_k), Sa.size(1))
    top = Sa.median(0).values.topk(k).indices
    per_dir = (cos2_left[top] * cos2_right[top]).clamp_min(0.0).sqrt()
    return {"rho": float(rho.clamp(0.0, 1.0)), "rho_unclipped": float(rho), "rho_se": rho_se,
            "signal_energy": float((K * U - T) / (K - 1)), "noise_energy": float(K * (T - U) / (K - 1)),
            "plateau_multiplicative": float(per_dir.median().clamp(0.0, 1.0)), "K": K}


# ----------------------------------------------------------------------------------------------
# Alignment-free variant


def cross_polar_echo(replicas, svds=None, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Alignment-free DIRECTION echo of ONE replica's atoms from K >= 2 replicas (a candidate, design note 0 (d)).

    z_i^(a->b) = u_i^(a)T msign(G^(b)) v_i^(a) has expectation ~ zeta_i^(a) zeta_i^(b) under isotropic noise,
    with no matching of atoms; equal-size replicas give zeta_i^(a) ~ sqrt(mean_{b != a} z_i^(a->b)).
    Returns {"s": (D,) singular values of the mean, "zeta": (D,) median over replicas, "zeta_per_replica":
    (K, D), each replica's own atoms by rank}. Cost: the K SVDs (reused for the polar factors) and K^2 D x D
    overlap products.
    """
    R = replica_stack(replicas, 2, "cross_polar_echo", "it pairs each replica with another", dtype=dtype)
    zeta, zeta_per_replica = zeta_from_cross_polar(cross_polar_matrix(replica_svds(R) if svds is None else svds,
                                                                      max(R.shape[1:])))
    return {"s": torch.linalg.svdvals(R.mean(0)), "zeta": zeta, "zeta_per_replica": zeta_per_replica}


def cross_polar_matrix(svds: tuple[torch.Tensor, torch.Tensor, torch.Tensor], max_dim: int) -> torch.Tensor:
    """z (K, K, D): z[a, b, i] = u_i^(a)T msign(G^(b)) v_i^(a) from replica SVDs (U (K, M, D), S, V); max_dim =
    max(M, N) for the rank tolerance. Entry [a, b] depends on replicas a and b only: the z of the first K' replicas
    is z[:K', :K']."""
    U, S, V = svds
    # z[a, b, i] = sum_j (U_a^T U_b)[i, j] (V_a^T V_b)[i, j] keep[b, j]: msign(G^b) = sum_j u_j^b v_j^b^T (s_j > 0)
    tol = S.amax(1, keepdim=True) * max_dim * torch.finfo(S.dtype).eps
    keep = (S > tol).to(U.dtype)  # (K, D)
    return torch.stack([((U[a].mT @ U) * (V[a].mT @ V) * keep.unsqueeze(1)).sum(-1) for a in range(U.size(0))])


def zeta_from_cross_polar(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(zeta (D,), zeta_per_replica (K, D)) from z (K, K, D): per replica the square root of the positive part of
    its mean cross term over the other K - 1 replicas; zeta is the median over replicas."""
    K = z.size(0)
    off = 1 - torch.eye(K, dtype=z.dtype, device=z.device)
    mean_cross = (z * off.unsqueeze(-1)).sum(1) / (K - 1)  # (K, D)
    zeta = mean_cross.clamp_min(0.0).sqrt()
    return zeta.median(0).values, zeta


# ----------------------------------------------------------------------------------------------
# Ground truth


def true_echo(X: torch.Tensor, G_true: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both echoes of X's atoms for a known true gradient G_true, exactly (float64 SVDs); X, G_true (..., M, N).

    zeta_i = u_i^T msign(G_true) v_i (direction echo), a_i = u_i^T G_true v_i (amplitude echo), with (u_i, s_i,
    v_i) the atoms of X by descending s and msign(G_true) = U sign(S) V^T (directions of G_true with zero
    singular value get weight 0). Returns {"s", "zeta", "a"}, each (..., D).
    """
    for name, t in (("X", X), ("G_true", G_true)):
        if not isinstance(t, torch.Tensor) or t.ndim < 2:
            raise ValueError(f"{name} must be a matrix (..., M, N) tensor")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    if X.shape != G_true.shape:
        raise ValueError(f"X has shape {tuple(X.shape)} but G_true has {tuple(G_true.shape)}: the truth must be the "
                         "true gradient of the same matrix")
    X, G = X.to(torch.float64), G_true.to(torch.float64)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    V = Vh.mT
    P = polar_factor(G)
    return {"s": S, "zeta": ((P @ V) * U).sum(-2), "a": ((G @ V) * U).sum(-2)}


def subset_svds(svds: tuple[torch.Tensor, torch.Tensor, torch.Tensor], idx: Sequence[int]):
    """The SVDs of a subset `idx` of replicas from a precomputed replica_svds result."""
    idx = torch.as_tensor(list(idx), dtype=torch.long)
    return tuple(t[idx.to(t.device)] for t in svds)
