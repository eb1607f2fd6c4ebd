"""Spectral echo estimation from replicate gradients (plain functions, any tensors).

Notation. A layer's true gradient G is M x N. Replicates G_k = G + E_k, k = 1..K, carry independent
noise (one per rank, or one per micro-batch). The observed matrix (the mean of some replicates) has
atoms (u_i, s_i, v_i). The amplitude echo of atom i is a_i = u_i^T G v_i, its echo ratio r_i = a_i / s_i.

Cross-projection ("the reverb"): split the replicates into an atom half A and a probe half P, take the
atoms of mean(A) and project the probe mean on them, a_hat_i = u_i^T mean(P) v_i. The probe noise is
independent of the atoms, so a_hat_i is exactly unbiased for the echo of mean(A)'s atoms, for any K.
Probing with a replicate that helped build the atoms is refused: the in-sample ratio is identically 1.

Contents:
- cross_project / estimate_echo: per-atom echo estimates with standard errors (several random splits,
  or leave-one-out).
- noise_sigma / noise_scales: per-entry noise std and the D0 scales (||G||^2, tr(Sigma), B_simple).
- binned_echo / bootstrap_binned_ratio: ratio-of-sums echo per window of singular values, with standard errors
  and bootstrap bands from per-replicate bin sums (the splits share replicates; atoms' errors correlate).
- gavish_donoho_echo and the curve families of fit_curve ("O(1) constants" for r(s)), isotonic_fit.

Everything runs in float64 on the input's device; inputs of any float dtype are accepted.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "CrossProjection", "EchoEstimate", "BinnedEcho", "CurveFit", "CURVE_FAMILIES",
    "check_replicates", "random_splits", "project_atoms", "cross_project", "cross_project_split", "estimate_echo",
    "noise_sigma", "noise_scales", "noise_anisotropy",
    "bin_edges", "merge_sparse_bins", "binned_ratio", "bin_onehot", "replicate_se", "binned_echo",
    "bootstrap_binned_ratio",
    "gavish_donoho_eta", "gavish_donoho_echo", "fit_curve", "isotonic_fit",
]


BOOT_CHUNK_ELEMENTS = 2 ** 24  # float64 matrix entries per batched bootstrap SVD (~130 MB)

# ----------------------------------------------------------------------------------------------
# Replicates and splits


def check_replicates(replicates: torch.Tensor, min_count: int = 2) -> torch.Tensor:
    """Validate a stack of replicate matrices (K, M, N); returns it as float64."""
    if not isinstance(replicates, torch.Tensor):
        raise ValueError(f"replicates must be a torch.Tensor of shape (K, M, N), got {type(replicates).__name__}")
    if replicates.ndim != 3:
        raise ValueError(
            f"replicates must have shape (K, M, N) (K replicate matrices), got shape {tuple(replicates.shape)}; "
            "for a stack of B matrices call the function once per matrix"
        )
    if replicates.size(0) < min_count:
        raise ValueError(f"need at least {min_count} replicates, got K={replicates.size(0)}")
    if not torch.isfinite(replicates).all():
        raise ValueError("replicates contain NaN or Inf; check the gradients before estimating echoes")
    return replicates.to(torch.float64)


def random_splits(K: int, n_splits: int, n_probe: int | None = None,
                  seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """n_splits random disjoint (atom indices, probe indices) pairs over K replicates.

    n_probe defaults to K // 2; the atom half gets the remaining K - n_probe replicates.
    The first split is always the contiguous one (first half atoms, second half probes).
    """
    if n_probe is None:
        n_probe = K // 2
    if not 1 <= n_probe <= K - 1:
        raise ValueError(f"n_probe must be in [1, K-1] = [1, {K - 1}], got {n_probe}")
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    gen = torch.Generator().manual_seed(seed)
    splits = [(list(range(K - n_probe)), list(range(K - n_probe, K)))]
    for _ in range(n_splits - 1):
        perm = torch.randperm(K, generator=gen).tolist()
        splits.append((sorted(perm[: K - n_probe]), sorted(perm[K - n_probe:])))
    return splits


@dataclass
class CrossProjection:
    """Echo estimates for the atoms of one atom set, probed with an independent probe set.

    s: (r,) singular values of the atom matrix, descending. echo: (r,) a_hat_i = u_i^T mean(P) v_i.
    se: (r,) standard error of echo from the spread of the single probes (NaN when only one probe).
    probe_values: (p, r) u_i^T P_j v_i for each probe replicate j (their mean is echo).
    """
    s: torch.Tensor
    echo: torch.Tensor
    se: torch.Tensor
    probe_values: torch.Tensor
    n_atom: int
    n_probe: int

    @property
    def ratio(self) -> torch.Tensor:
        return self.echo / self.s.clamp_min(torch.finfo(self.s.dtype).tiny)


def _atom_matrix(atom_mean: torch.Tensor, momentum_buffer: torch.Tensor | None, momentum: float) -> torch.Tensor:
    # With momentum the atoms come from M_A = mu * M_prev + (1 - mu) * G_A (what the optimizer would orthogonalise).
    if momentum_buffer is None:
        return atom_mean
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if momentum_buffer.shape != atom_mean.shape:
        raise ValueError(f"momentum_buffer shape {tuple(momentum_buffer.shape)} != matrix shape "
                         f"{tuple(atom_mean.shape)}")
    return momentum * momentum_buffer.to(atom_mean) + (1.0 - momentum) * atom_mean


def project_atoms(U: torch.Tensor, V: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """u_i^T X v_i for atoms U (..., M, r), V (..., N, r) and matrices mats (..., M, N): returns (..., r).

    Leading dims broadcast: U (M, r) with mats (p, M, N) projects p probes onto one atom set.
    """
    return ((mats @ V) * U).sum(-2)  # (..., M, r) * (..., M, r) summed over M


def cross_project(
    atom_replicates: torch.Tensor,
    probe_replicates: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    momentum: float = 0.0,
) -> CrossProjection:
    """Atoms of mean(atom_replicates) (a, M, N), probed with probe_replicates (p, M, N).

    Raises ValueError when a probe replicate is also an atom replicate (same storage or equal values):
    probing with the replicates that built the atoms measures nothing (the in-sample ratio is 1).
    momentum_buffer / momentum: build the atoms from mu * buffer + (1 - mu) * mean(A) instead.
    """
    A = check_replicates(atom_replicates, min_count=1)
    P = check_replicates(probe_replicates, min_count=1)
    if A.shape[1:] != P.shape[1:]:
        raise ValueError(f"atom replicates are {tuple(A.shape[1:])} matrices but probes are {tuple(P.shape[1:])}")
    for j in range(P.size(0)):
        for i in range(A.size(0)):
            if torch.equal(P[j], A[i]):
                raise ValueError(
                    f"probe replicate {j} is identical to atom replicate {i}: probing with replicates that built "
                    "the atoms gives an in-sample echo ratio of 1 and measures nothing; use disjoint atom and "
                    "probe replicates (see random_splits)"
                )
    X = _atom_matrix(A.mean(0), momentum_buffer, momentum)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)  # U (M, r), S (r,), Vh (r, N)
    pv = project_atoms(U, Vh.mT, P)  # (p, r)
    p = P.size(0)
    se = pv.std(0, unbiased=True) / math.sqrt(p) if p >= 2 else torch.full_like(S, float("nan"))
    return CrossProjection(s=S, echo=pv.mean(0), se=se, probe_values=pv, n_atom=A.size(0), n_probe=p)


def cross_project_split(
    replicates: torch.Tensor,
    atom_idx: Sequence[int],
    probe_idx: Sequence[int],
    momentum_buffer: torch.Tensor | None = None,
    momentum: float = 0.0,
) -> CrossProjection:
    """cross_project with the atom and probe sets given as indices into replicates (K, M, N)."""
    R = check_replicates(replicates)
    K = R.size(0)
    atom_idx, probe_idx = list(atom_idx), list(probe_idx)
    shared = sorted(set(atom_idx) & set(probe_idx))
    if shared:
        raise ValueError(
            f"replicates {shared} are in both the atom set and the probe set: probing with replicates that built "
            "the atoms gives an in-sample echo ratio of 1; use disjoint index sets (see random_splits)"
        )
    for idx in atom_idx + probe_idx:
        if not 0 <= idx < K:
            raise ValueError(f"replicate index {idx} out of range for K={K}")
    if not atom_idx or not probe_idx:
        raise ValueError("both the atom set and the probe set need at least one replicate")
    return cross_project(R[atom_idx], R[probe_idx], momentum_buffer, momentum)


@dataclass
class EchoEstimate:
    """Echo estimates of one matrix over several splits of its K replicates.

    s, echo, se: (n_splits, r) per split (se NaN where a split has one probe, as in leave-one-out).
    probe_values: one (p, r) tensor per split. sigma: per-entry noise std of ONE replicate (noise_sigma).
    n_atom: replicates averaged into the atoms (the atoms' noise std is sigma / sqrt(n_atom)).
    boot_s, boot_echo: (n_boot, n_splits, r) the same per-split estimates under replicate-weight bootstrap draws
    (bootstrap_splits; None when n_boot = 0). Standard errors below come from them when present.
    """
    s: torch.Tensor
    echo: torch.Tensor
    se: torch.Tensor
    probe_values: list[torch.Tensor]
    splits: list[tuple[list[int], list[int]]]
    sigma: float
    K: int
    n_atom: int
    n_probe: int
    shape: tuple[int, int]
    leave_one_out: bool
    boot_s: torch.Tensor | None = None
    boot_echo: torch.Tensor | None = None

    def mean_curve(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, echo, se) averaged over splits, rank by rank.

        se: the spread of the rank-wise split average over the bootstrap draws when the estimate has them,
        else replicate_se (conditional on the atoms). The splits share replicates, so their errors are
        correlated: neither averaging nor root-summing the per-split se is right.
        """
        if self.boot_echo is not None:
            se = self.boot_echo.mean(1).std(0)
        else:
            n = self.s.size(0)
            weights = torch.eye(self.s.size(1), dtype=torch.float64).expand(n, -1, -1) / n  # (splits, r, r)
            se = torch.as_tensor(replicate_se(self, weights.numpy()))
        return self.s.mean(0), self.echo.mean(0), se

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, echo, se, split id) of all splits' atoms as flat (n_splits * r,) tensors."""
        n, r = self.s.shape
        split_id = torch.arange(n).repeat_interleave(r)
        return self.s.reshape(-1), self.echo.reshape(-1), self.se.reshape(-1), split_id


def estimate_echo(
    replicates: torch.Tensor,
    n_splits: int = 8,
    n_probe: int | None = None,
    leave_one_out: bool = False,
    seed: int = 0,
    momentum_buffer: torch.Tensor | None = None,
    momentum: float = 0.0,
    n_boot: int = 0,
) -> EchoEstimate:
    """Echo of a matrix's atoms from K replicates (K, M, N) by cross-projection.

    Default: n_splits random half splits (n_probe = K // 2 probes, the rest build the atoms).
    leave_one_out=True: K splits, atoms from the mean of K - 1 replicates, probed with the left-out one
    (closer to the full-batch operating point; se only for the split average, see mean_curve).
    n_boot > 0: also bootstrap_splits draws (n_boot x n_splits SVDs) for calibrated standard errors.
    """
    R = check_replicates(replicates)
    K, M, N = R.shape
    if leave_one_out:
        splits = [([j for j in range(K) if j != k], [k]) for k in range(K)]
    else:
        splits = random_splits(K, n_splits, n_probe, seed)
    cps = [cross_project_split(R, a, p, momentum_buffer, momentum) for a, p in splits]
    est = EchoEstimate(
        s=torch.stack([c.s for c in cps]),
        echo=torch.stack([c.echo for c in cps]),
        se=torch.stack([c.se for c in cps]),
        probe_values=[c.probe_values for c in cps],
        splits=splits,
        sigma=noise_sigma(R),
        K=K,
        n_atom=len(splits[0][0]),
        n_probe=len(splits[0][1]),
        shape=(M, N),
        leave_one_out=leave_one_out,
    )
    if n_boot > 0:
        est.boot_s, est.boot_echo = bootstrap_splits(R, splits, n_boot, seed, momentum_buffer, momentum)
    return est


def bootstrap_splits(replicates: torch.Tensor, splits: list[tuple[list[int], list[int]]], n_boot: int,
                     seed: int = 0, momentum_buffer: torch.Tensor | None = None,
                     momentum: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Replicate-weight bootstrap of every split at once: (s, echo), each (n_boot, n_splits, r).

    A draw gives each of the K replicates a weight w_k ~ K Dirichlet(1, ..., 1) (the Bayesian bootstrap) and
    uses the SAME weights in every split (the splits share replicates): atoms from the w-weighted mean of the
    atom set, probe = the w-weighted mean of the probe set. The atoms are recomputed (an SVD per split and
    draw) because their noise is part of the estimate's error; weights instead of resampled copies keep a
    replicate from landing in both halves of a split (an in-sample echo). In simulation (tests/test_echo.py)
    the spread of the draws covers the truth at close to the nominal rate; their percentiles do not (the
    reweighted atoms are noisier than the real ones), so intervals are point +- z * spread.
    """
    R = check_replicates(replicates)
    K = R.size(0)
    gen = np.random.default_rng(seed)
    w = torch.as_tensor(gen.dirichlet(np.ones(K), size=n_boot), dtype=torch.float64, device=R.device)  # (B, K)
    chunk = max(1, BOOT_CHUNK_ELEMENTS // (len(splits) * R[0].numel()))  # draws per batched SVD (memory)
    s_draws, e_draws = [], []
    for start in range(0, n_boot, chunk):
        wc = w[start:start + chunk]
        atoms, probes = [], []
        for atom_idx, probe_idx in splits:
            wa = wc[:, atom_idx] / wc[:, atom_idx].sum(1, keepdim=True)
            wp = wc[:, probe_idx] / wc[:, probe_idx].sum(1, keepdim=True)
            atoms.append(_atom_matrix(torch.einsum("bk,kmn->bmn", wa, R[atom_idx]), momentum_buffer, momentum))
            probes.append(torch.einsum("bk,kmn->bmn", wp, R[probe_idx]))
        X, P = torch.stack(atoms, 1), torch.stack(probes, 1)  # (chunk, n_splits, M, N)
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)  # (chunk, n_splits, M, r), (chunk, n_splits, r)
        s_draws.append(S)
        e_draws.append(project_atoms(U, Vh.mT, P))
    return torch.cat(s_draws), torch.cat(e_draws)


# ----------------------------------------------------------------------------------------------
# Noise scales (D0: no SVD needed)


def noise_sigma(replicates: torch.Tensor) -> float:
    """Per-entry noise std of one replicate: sigma^2 = sum_k ||G_k - mean||^2 / ((K - 1) M N)."""
    R = check_replicates(replicates)
    K, M, N = R.shape
    return math.sqrt(float(((R - R.mean(0)) ** 2).sum()) / ((K - 1) * M * N))


def noise_scales(replicates: torch.Tensor, batch_size: float | None = None) -> dict[str, float]:
    """D0 scales from K replicates (K, M, N).

    grad_sq: unbiased ||G||_F^2 = 2 / (K (K-1)) sum_{j<k} <G_j, G_k> (can be negative when noise dominates).
    noise_trace: tr(Sigma) = sum_k ||G_k - mean||^2 / (K - 1), the noise energy of ONE replicate.
    b_simple: gradient noise scale batch_size * tr(Sigma) / ||G||^2 (batch_size = examples or tokens per
    replicate; NaN when not given or when grad_sq <= 0). snr_mean: ||G||^2 / (tr(Sigma) / K), the
    signal-to-noise energy ratio of the mean of all K replicates.
    """
    R = check_replicates(replicates)
    K = R.size(0)
    flat = R.reshape(K, -1)
    total = flat.sum(0)
    # sum_{j<k} <G_j, G_k> = (||sum||^2 - sum ||G_k||^2) / 2
    cross = 0.5 * (float(total @ total) - float((flat * flat).sum()))
    grad_sq = 2.0 * cross / (K * (K - 1))
    noise_trace = float(((flat - flat.mean(0)) ** 2).sum()) / (K - 1)
    b_simple = float("nan")
    if batch_size is not None and grad_sq > 0:
        b_simple = batch_size * noise_trace / grad_sq
    snr_mean = grad_sq / (noise_trace / K) if noise_trace > 0 else float("inf")
    return {"grad_sq": grad_sq, "noise_trace": noise_trace, "b_simple": b_simple, "snr_mean": snr_mean,
            "mean_sq": float(total @ total) / K ** 2}


def noise_anisotropy(cp: CrossProjection, sigma: float, top: int = 10) -> float:
    """mean omega_i^2 / sigma^2 over the top atoms: 1 for isotropic noise.

    omega_i^2 = variance of u_i^T G_j v_i over single probe replicates j (noise variance along atom i).
    """
    if cp.n_probe < 2:
        raise ValueError("noise_anisotropy needs at least 2 probe replicates to measure a variance")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    omega_sq = cp.probe_values[:, :top].var(0, unbiased=True)
    return float(omega_sq.mean()) / sigma ** 2


# ----------------------------------------------------------------------------------------------
# Binned ratio-of-sums


@dataclass
class BinnedEcho:
    """Echo ratio per window of singular values: ratio = sum(echo) / sum(s) over the atoms in a bin.

    edges: (n_bins + 1,). s_mean, ratio, ratio_se, count: (n_bins,) (empty bins: count 0, NaN ratio).
    """
    edges: np.ndarray
    s_mean: np.ndarray
    ratio: np.ndarray
    ratio_se: np.ndarray
    count: np.ndarray

    def valid(self) -> np.ndarray:
        """Mask of bins with atoms and a finite standard error > 0."""
        return (self.count > 0) & np.isfinite(self.ratio) & np.isfinite(self.ratio_se) & (self.ratio_se > 0)


def bin_edges(s: torch.Tensor | np.ndarray, n_bins: int = 12, scale: str = "log") -> np.ndarray:
    """Bin edges spanning the singular values s: "log" (geometric), "linear", or "quantile" (equal counts)."""
    s = np.asarray(torch.as_tensor(s, dtype=torch.float64).cpu()).reshape(-1)
    s = s[s > 0]
    if s.size == 0:
        raise ValueError("no positive singular values to bin")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    lo, hi = float(s.min()), float(s.max()) * (1 + 1e-9)
    if scale == "log":
        return np.geomspace(lo, hi, n_bins + 1)
    if scale == "linear":
        return np.linspace(lo, hi, n_bins + 1)
    if scale == "quantile":
        edges = np.quantile(s, np.linspace(0, 1, n_bins + 1))
        edges[-1] = hi
        return np.unique(edges)
    raise ValueError(f"unknown bin scale {scale!r}; choose 'log', 'linear' or 'quantile'")


def merge_sparse_bins(s, edges: np.ndarray, min_count: int) -> np.ndarray:
    """Remove inner edges until every bin holds >= min_count of the values s (a sparse bin joins its lower
    neighbour; the lowest joins the one above). A bin of one or two atoms has an echo standard error
    from a handful of probes and ranks atoms of different splits at random: it is not worth a point."""
    s = np.asarray(torch.as_tensor(s, dtype=torch.float64).cpu()).reshape(-1)
    edges = list(np.asarray(edges, dtype=np.float64))
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    while len(edges) > 2:
        counts, _ = np.histogram(s, bins=np.asarray(edges))
        sparse = np.nonzero(counts < min_count)[0]
        if len(sparse) == 0:
            break
        b = int(sparse[-1])  # the highest sparse bin
        del edges[b if b > 0 else 1]  # merge with the bin below (the lowest bin: with the one above)
    return np.asarray(edges)


def binned_ratio(s: torch.Tensor, echo: torch.Tensor, edges: np.ndarray | None = None,
                 n_bins: int = 12) -> BinnedEcho:
    """Ratio-of-sums echo sum(echo) / sum(s) per bin of s (flat tensors of atoms), without standard errors.

    Invariant to rotations inside degenerate clusters and stable at small s (unlike means of per-atom
    ratios). Standard errors need the replicates: binned_echo.
    """
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1).cpu().numpy()
    echo = torch.as_tensor(echo, dtype=torch.float64).reshape(-1).cpu().numpy()
    if s.shape != echo.shape:
        raise ValueError(f"s and echo need the same number of atoms, got {s.shape} and {echo.shape}")
    edges = bin_edges(s, n_bins) if edges is None else np.asarray(edges, dtype=np.float64)
    onehot = bin_onehot(s[None], edges)[0]  # (atoms, bins)
    count = onehot.sum(0).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sum_s = s @ onehot
        return BinnedEcho(edges=edges, s_mean=sum_s / count, ratio=(echo @ onehot) / sum_s,
                          ratio_se=np.full(len(count), np.nan), count=count)


def bin_onehot(s: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin membership (..., atoms, bins) as 0/1 floats of singular values s (..., atoms); outside the edges: none."""
    edges = np.asarray(edges, dtype=np.float64)
    n_bins = len(edges) - 1
    member = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    inside = (s >= edges[0]) & (s <= edges[-1])
    return (member[..., None] == np.arange(n_bins)) & inside[..., None]


def _probe_sums(estimate: EchoEstimate, weights: np.ndarray) -> list[np.ndarray]:
    """Per split, each probe replicate's weighted atom sums: (p, n_out) = probe_values (p, r) @ weights[split]."""
    return [pv.double().cpu().numpy() @ w for pv, w in zip(estimate.probe_values, weights)]


def replicate_se(estimate: EchoEstimate, weights: np.ndarray) -> np.ndarray:
    """Standard error of sum_splits sum_atoms weights[split, atom, out] * echo[split, atom], per output.

    From per-replicate sums, with the atoms held fixed: replicate k's noise enters through its probe sums
    B_k = probe_values_k @ weights in every split where it is a probe, so its contribution is
    h_k = sum over those splits of (B_k - mean of the split's probes) / p, and var = p / (p - 1) sum_k h_k^2
    (exact for one split: the sample variance of the probe sums / p). Correlations between atoms (anisotropic
    noise) and between splits (shared replicates) are both kept. Leave-one-out estimates (one probe per split)
    use the spread of the split sums instead: var = K / (K - 1) sum_k (B_k - mean)^2 (approximate: the atoms
    differ slightly between splits).
    """
    sums = _probe_sums(estimate, weights)
    K = estimate.K
    if estimate.n_probe == 1:
        B = np.concatenate(sums)  # (K, n_out): split k's single probe
        return np.sqrt(K / (K - 1) * ((B - B.mean(0)) ** 2).sum(0))
    p = estimate.n_probe
    h = np.zeros((K, weights.shape[-1]))
    for (_, probe_idx), B in zip(estimate.splits, sums):
        h[probe_idx] += (B - B.mean(0)) / p
    return np.sqrt(p / (p - 1) * (h ** 2).sum(0))


def binned_echo(estimate: EchoEstimate, edges: np.ndarray) -> BinnedEcho:
    """Ratio-of-sums echo per bin of s, pooled over the estimate's splits, with replicate-level standard errors.

    ratio = sum over splits and atoms in the bin of echo / the same sum of s. Bin membership is fixed by the
    atoms' ranks in the full-data splits. ratio_se: the spread of the same ratio over the estimate's bootstrap
    draws (bootstrap_splits) when it has them; otherwise replicate_se of the numerator / the denominator
    (conditional on the atoms: in simulation ~1.2x too narrow, as it omits the atoms' own noise).
    """
    edges = np.asarray(edges, dtype=np.float64)
    s = estimate.s.double().cpu().numpy()  # (splits, r)
    onehot = bin_onehot(s, edges).astype(np.float64)  # (splits, r, bins)
    count = onehot.sum((0, 1)).astype(np.int64)
    sum_s = np.einsum("kr,krb->b", s, onehot)
    num = np.einsum("kr,krb->b", estimate.echo.double().cpu().numpy(), onehot)
    with np.errstate(invalid="ignore", divide="ignore"):
        if estimate.boot_echo is not None:
            draws = _boot_ratio_draws(estimate, onehot)
            with warnings.catch_warnings():  # bins without atoms are NaN in every draw: NaN se, no warning
                warnings.simplefilter("ignore", RuntimeWarning)
                se = np.nanstd(draws, axis=0, ddof=1) if draws.shape[0] > 1 else np.full(len(count), np.nan)
        else:
            se = replicate_se(estimate, onehot) / sum_s
        return BinnedEcho(edges=edges, s_mean=sum_s / count, ratio=num / sum_s, ratio_se=se, count=count)


def _boot_ratio_draws(estimate: EchoEstimate, onehot: np.ndarray) -> np.ndarray:
    """(n_boot, bins) pooled ratio-of-sums of every bootstrap draw, membership fixed by rank (onehot)."""
    bs = estimate.boot_s.double().cpu().numpy()  # (B, splits, r)
    be = estimate.boot_echo.double().cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("bkr,krn->bn", be, onehot) / np.einsum("bkr,krn->bn", bs, onehot)


def bootstrap_binned_ratio(estimate: EchoEstimate, edges: np.ndarray,
                           level: float = 0.9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ratio, lower, upper) per bin: ratio +- t * the spread of the estimate's bootstrap draws.

    Needs an estimate made with n_boot > 0 (estimate_echo): the draws reweight the replicates jointly in every
    split and recompute the atoms (bootstrap_splits). t: the Student quantile with K - 1 degrees of freedom
    (K replicates; with K = 8 normal quantiles covered 84-90% in simulation instead of 90%).
    """
    if estimate.boot_echo is None:
        raise ValueError("the estimate has no bootstrap draws: make it with estimate_echo(..., n_boot=200)")
    from scipy.stats import t as student_t

    binned = binned_echo(estimate, edges)
    half = student_t.ppf(0.5 + level / 2, estimate.K - 1) * binned.ratio_se
    return binned.ratio, binned.ratio - half, binned.ratio + half


# ----------------------------------------------------------------------------------------------
# Closed form for isotropic noise (Gavish & Donoho 2017; Benaych-Georges & Nadakuditi)


def gavish_donoho_eta(y: np.ndarray, beta: float) -> np.ndarray:
    """Frobenius-optimal shrinker for Y = X + Z / sqrt(N) (beta = M / N <= 1), in noise units.

    eta(y) = sqrt((y^2 - beta - 1)^2 - 4 beta) / y above the bulk edge 1 + sqrt(beta), else 0.
    It equals the asymptotic amplitude echo x <u, u_true><v, v_true> of an atom observed at y.
    """
    if not 0 < beta <= 1:
        raise ValueError(f"beta = M / N must be in (0, 1], got {beta}")
    y = np.asarray(y, dtype=np.float64)
    out = np.zeros_like(y)
    above = y > 1 + math.sqrt(beta)
    ya = y[above]
    out[above] = np.sqrt(np.maximum((ya ** 2 - beta - 1) ** 2 - 4 * beta, 0.0)) / ya
    return out


def gavish_donoho_echo(s, sigma: float, shape: tuple[int, int], n_avg: int = 1) -> np.ndarray:
    """Predicted amplitude echo of atoms with singular values s (raw units) under isotropic noise.

    sigma: per-entry noise std of ONE replicate; the atoms come from a mean of n_avg replicates, so their
    noise std is sigma / sqrt(n_avg). s -> scale * eta(s / scale), scale = sigma_eff * sqrt(max(M, N)).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    M, N = shape
    beta = min(M, N) / max(M, N)
    scale = sigma / math.sqrt(n_avg) * math.sqrt(max(M, N))
    s = s.double().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, dtype=np.float64)
    return scale * gavish_donoho_eta(s / scale, beta)


# ----------------------------------------------------------------------------------------------
# Curve families for the echo ratio r(s) and their fits


def isotonic_fit(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool adjacent violators); y ordered by s."""
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64)
    if y.shape != w.shape or y.ndim != 1:
        raise ValueError(f"isotonic_fit needs 1-D y and w of one shape, got {y.shape} and {w.shape}")
    if (w <= 0).any():
        raise ValueError("isotonic_fit weights must be > 0")
    means, weights, sizes = [], [], []
    for yi, wi in zip(y, w):
        means.append(yi); weights.append(wi); sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:  # pool the violating pair into one block
            m2, w2, n2 = means.pop(), weights.pop(), sizes.pop()
            m1, w1, n1 = means.pop(), weights.pop(), sizes.pop()
            means.append((m1 * w1 + m2 * w2) / (w1 + w2)); weights.append(w1 + w2); sizes.append(n1 + n2)
    return np.repeat(means, sizes)


def _hill(x, tau, p=2.0):
    x = np.abs(x)
    return x ** p / (x ** p + tau ** p)


@dataclass(frozen=True)
class CurveFamily:
    """A parametric echo-ratio curve r(s; theta); s enters in units of the fit's scale s_ref."""
    names: tuple[str, ...]
    fn: Callable[..., np.ndarray]
    init: tuple[float, ...]  # in units of s_ref for scale-like parameters
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    scale_params: tuple[str, ...]  # parameters in units of s (tau) or s^2 (c)
    doc: str


CURVE_FAMILIES: dict[str, CurveFamily] = {
    "hill": CurveFamily(("tau",), lambda x, tau: _hill(x, tau), (1.0,), (1e-6,), (1e6,), ("tau",),
                        "s^2 / (s^2 + tau^2)"),
    "hill_floor": CurveFamily(("r0", "tau"), lambda x, r0, tau: r0 + (1 - r0) * _hill(x, tau), (0.02, 1.0),
                              (-1.0, 1e-6), (1.0, 1e6), ("tau",), "r0 + (1 - r0) s^2 / (s^2 + tau^2)"),
    "hill_ceiling": CurveFamily(("r_max", "tau"), lambda x, rm, tau: rm * _hill(x, tau), (0.8, 1.0),
                                (0.0, 1e-6), (2.0, 1e6), ("tau",), "r_max s^2 / (s^2 + tau^2)"),
    "hill_power": CurveFamily(("tau", "power"), lambda x, tau, p: _hill(x, tau, p), (1.0, 2.0),
                              (1e-6, 0.1), (1e6, 20.0), ("tau",), "s^p / (s^p + tau^p)"),
    "hill3": CurveFamily(("r0", "r_max", "tau"), lambda x, r0, rm, tau: r0 + (rm - r0) * _hill(x, tau),
                         (0.02, 0.8, 1.0), (-1.0, 0.0, 1e-6), (1.0, 2.0, 1e6), ("tau",),
                         "r0 + (r_max - r0) s^2 / (s^2 + tau^2)"),
    # The kernel family of the optimizer: soft sign s / sqrt(s^2 + c) = left block of Polar([G, sqrt(c) I]).
    "soft_sign": CurveFamily(("r_max", "c"), lambda x, rm, c: rm * np.abs(x) / np.sqrt(x * x + c), (0.8, 1.0),
                             (0.0, 1e-12), (2.0, 1e12), ("c",), "r_max s / sqrt(s^2 + c)"),
}
ALL_FAMILIES = ("gavish_donoho", *CURVE_FAMILIES, "isotonic")


@dataclass
class CurveFit:
    """A fitted echo-ratio curve and its fit statistics (on the points it was fitted to).

    params: fitted constants in raw units (tau in units of s, c in units of s^2); param_se: their
    standard errors (parametric families; from the fit's Jacobian, inflated by reduced chi^2 when > 1).
    n_params: fitted constants (isotonic: number of pooled blocks). chi2 uses the points' se.
    resid_autocorr: lag-1 autocorrelation of standardised residuals ordered by s (> 0.3: wrong shape).
    """
    family: str
    params: dict[str, float]
    n_params: int
    chi2: float
    dof: int
    reduced_chi2: float
    r2: float
    resid_autocorr: float
    predict: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    success: bool = True
    param_se: dict[str, float] = field(default_factory=dict)


def _fit_stats(family, params, n_params, predict, s, r, se, success=True) -> CurveFit:
    resid = (r - predict(s)) / se
    chi2 = float((resid ** 2).sum())
    dof = max(len(r) - n_params, 0)
    w = 1 / se ** 2
    r_bar = float((w * r).sum() / w.sum())
    ss_tot = float((w * (r - r_bar) ** 2).sum())
    r2 = 1 - chi2 / ss_tot if ss_tot > 0 else float("nan")
    order = np.argsort(s)
    z = resid[order]
    if len(z) >= 3 and z.std() > 0:
        zc = z - z.mean()
        autocorr = float((zc[:-1] * zc[1:]).sum() / (zc * zc).sum())
    else:
        autocorr = float("nan")
    return CurveFit(family, params, n_params, chi2, dof, chi2 / dof if dof > 0 else float("nan"), r2, autocorr,
                    predict, success)


def fit_curve(
    family: str,
    s,
    ratio,
    se,
    sigma: float | None = None,
    shape: tuple[int, int] | None = None,
    n_avg: int = 1,
) -> CurveFit:
    """Weighted least-squares fit of an echo-ratio curve r(s) to points (s, ratio, se) (e.g. bins).

    family: "gavish_donoho" (0 constants; needs sigma = per-replicate noise std, shape = (M, N) and
    n_avg = replicates averaged into the atoms), a key of CURVE_FAMILIES, or "isotonic".
    """
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    r = np.asarray(ratio, dtype=np.float64).reshape(-1)
    se = np.asarray(se, dtype=np.float64).reshape(-1)
    if not (s.shape == r.shape == se.shape):
        raise ValueError(f"s, ratio and se need one shape, got {s.shape}, {r.shape}, {se.shape}")
    ok = np.isfinite(s) & np.isfinite(r) & np.isfinite(se) & (se > 0) & (s > 0)
    if ok.sum() == 0:
        raise ValueError("no points with finite s > 0, ratio and se > 0 to fit")
    s, r, se = s[ok], r[ok], se[ok]
    if family == "gavish_donoho":
        if sigma is None or shape is None:
            raise ValueError("the gavish_donoho family needs sigma (per-replicate noise std) and shape=(M, N)")
        def predict(x):
            x = np.asarray(x, dtype=np.float64)
            return gavish_donoho_echo(x, sigma, shape, n_avg) / x
        return _fit_stats(family, {"sigma": float(sigma)}, 0, predict, s, r, se)
    if family == "isotonic":
        order = np.argsort(s)
        s_sorted, fitted = s[order], isotonic_fit(r[order], 1 / se[order] ** 2)
        n_blocks = int(len(np.unique(fitted)))
        predict = lambda x: np.interp(np.asarray(x, dtype=np.float64), s_sorted, fitted)
        return _fit_stats(family, {"n_blocks": float(n_blocks)}, n_blocks, predict, s, r, se)
    if family not in CURVE_FAMILIES:
        raise ValueError(f"unknown curve family {family!r}; choose one of {list(ALL_FAMILIES)}")
    from scipy.optimize import least_squares  # local import: scipy only needed for fits

    fam = CURVE_FAMILIES[family]
    s_ref = float(np.median(s))
    x = s / s_ref  # dimensionless singular values for a well-scaled problem

    def unit(name):  # tau scales like s, c like s^2
        return 2 if name == "c" else (1 if name in fam.scale_params else 0)

    def residual(theta):
        return (fam.fn(x, *theta) - r) / se

    best = None
    for start in (1.0, 0.3, 3.0):  # a few starts: the scale parameter's basin is wide but not global
        theta0 = [v * start if n in fam.scale_params else v for n, v in zip(fam.names, fam.init)]
        theta0 = np.clip(theta0, np.array(fam.lower) * 1.0001 + 1e-12, np.array(fam.upper) * 0.9999)
        sol = least_squares(residual, theta0, bounds=(fam.lower, fam.upper), x_scale="jac")
        if best is None or sol.cost < best.cost:
            best = sol
    theta = best.x
    params = {n: float(v * s_ref ** unit(n)) for n, v in zip(fam.names, theta)}
    predict = lambda xs: fam.fn(np.asarray(xs, dtype=np.float64) / s_ref, *theta)
    fit = _fit_stats(family, params, len(theta), predict, s, r, se, success=bool(best.success))
    # parameter standard errors from the Jacobian of the standardised residuals, inflated by the
    # reduced chi^2 when the model does not fit within the points' errors
    J = best.jac
    cov = np.linalg.pinv(J.T @ J) * max(1.0, fit.reduced_chi2 if np.isfinite(fit.reduced_chi2) else 1.0)
    fit.param_se = {n: float(math.sqrt(max(cov[i, i], 0.0)) * s_ref ** unit(n)) for i, n in enumerate(fam.names)}
    return fit
