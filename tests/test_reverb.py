"""The user's reverb estimators (optimizers/reverb.py) against ground truth on synthetic spiked replicas
(true_echo with the known G), against direct loop implementations of the formulas, and on bad input."""
import itertools
import math

import numpy as np
import pytest
import torch

from optimizers import reverb as rv
from tests.synthetic import spiked

pytestmark = pytest.mark.usefixtures("single_thread")  # small float64 SVDs


def draw(M, N, K, spikes, seed):
    """(G, K replicas G + unit isotropic noise, true per-replica zeta (K, D)); spikes in units of sqrt(N)."""
    gen = torch.Generator().manual_seed(seed)
    G = spiked(M, N, spikes, math.sqrt(N), gen)
    R = G + torch.randn(K, M, N, generator=gen, dtype=torch.float64)
    truth = torch.stack([rv.true_echo(R[a], G)["zeta"] for a in range(K)])
    return G, R, truth


SEPARATED = [8.0, 5.0, 3.5]  # well above the bulk edge (1 + sqrt(M/N)) and far apart
NEAR_DEGENERATE = [4.0, 3.9, 3.8]  # gaps far below the noise: the replicas' atoms mix inside the cluster


@pytest.mark.parametrize("solver", ["fieller", "ols_weighted"])
def test_reverb_matches_the_true_per_replica_zeta_of_separated_spikes(solver):
    for seed in range(3):
        _, R, truth = draw(20, 40, 8, SEPARATED, seed)
        out = rv.reverb_echo(R, align="greedy_mean", solver=solver)
        assert out["zeta_per_pivot"].shape == (8, 20) and out["zeta"].shape == (20,)
        err = (out["zeta_per_pivot"][:, :3] - truth[:, :3]).abs()
        assert err.max() < 0.1, err  # each replica's own echo, pivot by pivot (observed max 0.02)
        assert (out["zeta"][:3] - truth[:, :3].median(0).values).abs().max() < 0.1
        torch.testing.assert_close(out["s"], torch.linalg.svdvals(R.mean(0)))


def test_division_free_form_is_biased_by_k_minus_2_over_k_and_the_weighted_mean_is_not():
    # Exact rank-one reverb matrices Z = zeta zeta^T (off the diagonal): every triple ratio is exactly zeta_p^2.
    K, D = 8, 3
    zeta = torch.tensor([[0.9, 0.5, 0.2]], dtype=torch.float64).expand(K, D)  # equal echoes across replicas
    Z = torch.einsum("ad,bd->dab", zeta, zeta) * (1 - torch.eye(K, dtype=torch.float64))
    torch.testing.assert_close(rv.solve_reverb(Z, "ols_weighted"), zeta ** 2)
    torch.testing.assert_close(rv.solve_reverb(Z, "fieller"), zeta ** 2)  # var(Z_off) = 0: no correction
    torch.testing.assert_close(rv.solve_reverb(Z, "ols_division_free"), (K - 2) / K * zeta ** 2)
    # unequal echoes: the weighted mean stays exact; Fieller's factor 1 + var/mean^2 then shrinks a true signal
    zeta = torch.linspace(0.3, 0.95, K, dtype=torch.float64).unsqueeze(1).expand(K, D).contiguous()
    Z = torch.einsum("ad,bd->dab", zeta, zeta) * (1 - torch.eye(K, dtype=torch.float64))
    torch.testing.assert_close(rv.solve_reverb(Z, "ols_weighted"), zeta ** 2)
    assert (rv.solve_reverb(Z, "fieller") < 0.95 * zeta ** 2).all()


def test_solvers_equal_direct_loops_over_triples():
    K, D = 5, 2
    gen = torch.Generator().manual_seed(3)
    A = torch.rand(D, K, K, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    Z = (A + A.mT) / 2 * (1 - torch.eye(K, dtype=torch.float64))
    fieller, weighted = torch.zeros(K, D, dtype=torch.float64), torch.zeros(K, D, dtype=torch.float64)
    for d in range(D):
        off = [Z[d, a, b] for a in range(K) for b in range(K) if a != b]
        mu, var = float(np.mean(off)), float(np.var(off, ddof=1))
        for p in range(K):
            pairs = [(a, b) for a, b in itertools.permutations(range(K), 2) if p not in (a, b)]
            ratios = [float(Z[d, a, p] * Z[d, p, b] / Z[d, a, b]) for a, b in pairs]
            fieller[p, d] = np.mean(ratios) / (1 + var / mu ** 2)
            w = [float(Z[d, a, b] ** 2) for a, b in pairs]
            weighted[p, d] = np.dot(w, ratios) / np.sum(w)
    torch.testing.assert_close(rv.solve_reverb(Z, "fieller"), fieller)
    torch.testing.assert_close(rv.solve_reverb(Z, "ols_weighted"), weighted)


def test_alignment_undoes_permutations_and_sign_flips_of_replica_atoms():
    _, R, _ = draw(12, 20, 6, SEPARATED, 4)
    svds, mean = rv.replica_svds(R), rv.mean_svd(R)
    gen = torch.Generator().manual_seed(5)
    U, S, V = svds
    perm = torch.stack([torch.randperm(12, generator=gen) for _ in range(6)])  # (K, D)
    flip = torch.where(torch.rand(6, 1, 12, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    shuffled = (torch.gather(U, 2, perm.unsqueeze(1).expand_as(U)) * flip, torch.gather(S, 1, perm),
                torch.gather(V, 2, perm.unsqueeze(1).expand_as(V)) * flip)
    for align in ("greedy_mean", "hungarian_ref"):
        ref = rv.reverb_from_svds(svds, mean, align, "ols_weighted")["zeta_per_pivot"]
        if align == "hungarian_ref":  # the reference replica's own order is the atom order: keep replica 0
            shuffled = tuple(torch.cat([t[:1], s[1:]]) for t, s in zip(svds, shuffled))
        got = rv.reverb_from_svds(shuffled, mean, align, "ols_weighted")["zeta_per_pivot"]
        torch.testing.assert_close(got, ref)
    # a joint sign flip alone changes nothing even without alignment; a permutation does
    flipped = (U * flip, S, V * flip)
    raw = rv.reverb_from_svds(svds, mean, "none", "ols_weighted")["zeta_per_pivot"]
    torch.testing.assert_close(rv.reverb_from_svds(flipped, mean, "none", "ols_weighted")["zeta_per_pivot"], raw)
    assert (rv.reverb_from_svds(shuffled, mean, "none", "ols_weighted")["zeta_per_pivot"][:, :3] - raw[:, :3]
            ).abs().max() > 0.5


def test_near_degenerate_spikes_degrade_the_reverb_and_by_how_much():
    # Spikes 4.0 / 3.9 / 3.8 (gaps ~0.03 of the noise): each replica's atoms rotate inside the cluster, so
    # same-rank atoms of two replicas are different directions and z_ab collapses, while the true per-replica
    # zeta (the projection on msign(G), blind to rotations inside the cluster) stays ~0.95. Observed over
    # seeds 0-5 (mean |error| over the 3 cluster atoms and 8 pivots): separated spikes 0.004-0.009 for every
    # alignment; near-degenerate, align="none" 0.44-0.56 (ols_weighted) and 0.46-1.23 (fieller), greedy
    # alignment to the mean 0.22-0.37 / 0.22-0.73: alignment by permutation cannot undo a rotation.
    for seed in range(3):
        _, R_sep, t_sep = draw(20, 40, 8, SEPARATED, seed)
        _, R_deg, t_deg = draw(20, 40, 8, NEAR_DEGENERATE, seed)
        assert t_deg[:, :3].min() > 0.85  # the truth stays high: nothing is wrong with the replicas
        for solver in ("fieller", "ols_weighted"):
            sep = (rv.reverb_echo(R_sep, "none", solver)["zeta_per_pivot"][:, :3] - t_sep[:, :3]).abs().mean()
            deg = (rv.reverb_echo(R_deg, "none", solver)["zeta_per_pivot"][:, :3] - t_deg[:, :3]).abs().mean()
            assert sep < 0.02 and deg > 0.3, (seed, solver, float(sep), float(deg))
            greedy = (rv.reverb_echo(R_deg, "greedy_mean", solver)["zeta_per_pivot"][:, :3] - t_deg[:, :3]
                      ).abs().mean()
            assert greedy > 0.15  # greedy alignment helps a little but does not rescue it
        # the alignment-free cross-polar variant is unaffected by rotations inside the cluster
        cp = rv.cross_polar_echo(R_deg)["zeta_per_replica"]
        assert (cp[:, :3] - t_deg[:, :3]).abs().max() < 0.05


def test_cross_polar_echo_tracks_the_truth_and_is_one_without_noise():
    _, R, truth = draw(20, 40, 8, SEPARATED, 6)
    out = rv.cross_polar_echo(R)
    assert (out["zeta_per_replica"][:, :3] - truth[:, :3]).abs().max() < 0.05
    same = R[:1].expand(4, -1, -1).clone()  # identical replicas: every atom is its own msign direction
    torch.testing.assert_close(rv.cross_polar_echo(same)["zeta"], torch.ones(20, dtype=torch.float64))


def test_true_echo_equals_its_definition_on_a_hand_built_example():
    # X = diag(3, 2, 1) (3 x 4): atoms e_i, e_i. G = R(theta) diag(g) R(phi)[:3] with plane rotations R in the
    # (0, 1) plane: msign(G) = R(theta) R(phi)[:3] = R(theta + phi) on the first two coordinates, so
    # zeta = (cos(theta + phi), cos(theta + phi), 1); a_i = (R(theta) diag(g) R(phi)[:3])_ii.
    theta, phi, g = 0.3, -0.5, (5.0, 1.0, 0.5)

    def rot(n, t):
        Q = torch.eye(n, dtype=torch.float64)
        Q[0, 0] = Q[1, 1] = math.cos(t)
        Q[0, 1], Q[1, 0] = -math.sin(t), math.sin(t)
        return Q

    X = torch.zeros(3, 4, dtype=torch.float64)
    X[0, 0], X[1, 1], X[2, 2] = 3.0, 2.0, 1.0
    G = rot(3, theta) @ torch.diag(torch.tensor(g, dtype=torch.float64)) @ rot(4, phi)[:3]
    c = math.cos(theta + phi)
    a = [g[0] * math.cos(theta) * math.cos(phi) - g[1] * math.sin(theta) * math.sin(phi),
         -g[0] * math.sin(theta) * math.sin(phi) + g[1] * math.cos(theta) * math.cos(phi), g[2]]
    out = rv.true_echo(X, G)
    torch.testing.assert_close(out["s"], torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out["zeta"], torch.tensor([c, c, 1.0], dtype=torch.float64))  # X's atoms: +e_i
    torch.testing.assert_close(out["a"], torch.tensor(a, dtype=torch.float64))
    # both echoes are invariant to rotating X and G together; a zero singular value of G contributes nothing
    gen = torch.Generator().manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    rotated = rv.true_echo(Q1 @ X @ Q2, Q1 @ G @ Q2)
    torch.testing.assert_close(rotated["zeta"].abs(), out["zeta"].abs())
    torch.testing.assert_close(rotated["a"].abs(), out["a"].abs())
    G0 = rot(3, theta) @ torch.diag(torch.tensor([5.0, 1.0, 0.0], dtype=torch.float64)) @ rot(4, phi)[:3]
    torch.testing.assert_close(rv.true_echo(X, G0)["zeta"].abs(), torch.tensor([c, c, 0.0], dtype=torch.float64))


def test_plateau_rho_equals_the_signal_fraction_within_its_sampling_error():
    M, N, K, sigma = 10, 20, 8, 0.4
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(M, N, generator=gen, dtype=torch.float64) * 0.3
    signal, noise = float((G ** 2).sum()), sigma ** 2 * M * N
    rho_true = signal / (signal + noise)
    outs = [rv.plateau_rho(G + sigma * torch.randn(K, M, N, generator=gen, dtype=torch.float64))
            for _ in range(200)]
    rho = np.array([o["rho_unclipped"] for o in outs])
    se = np.array([o["rho_se"] for o in outs])
    assert abs(rho.mean() - rho_true) < 3 * rho.std() / math.sqrt(len(rho))  # unbiased within sampling error
    assert se.mean() == pytest.approx(rho.std(), rel=0.2)  # the jackknife se is the draws' spread (observed 0.9x)
    z = (rho - rho_true) / se
    assert 0.8 < np.mean(np.abs(z) < 1.645) <= 1.0  # observed 0.855 at K = 8 (a 7-dof jackknife)
    o = outs[0]
    assert o["signal_energy"] + o["noise_energy"] == pytest.approx(float(o["signal_energy"]) / o["rho_unclipped"])


def test_multiplicative_plateau_is_near_the_top_atoms_true_echo():
    spikes = [10.0, 9.0, 8.0, 7.0, 6.0, 5.5, 5.0, 4.5]
    _, R, truth = draw(40, 80, 8, spikes, 3)
    out = rv.plateau_rho(R, top_k=8)
    assert abs(out["plateau_multiplicative"] - float(truth[:, :8].median())) < 0.1  # observed 0.93 vs 0.98


def test_bad_input_is_refused_with_a_message_that_says_what_to_do():
    R = torch.randn(4, 5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 3 replicas, got K=2.*falls back.*sqrt\\(median"):
        rv.reverb_echo(R[:2])
    bad = R.clone()
    bad[2, 0, 0] = float("nan")
    for fn in (rv.reverb_echo, rv.plateau_rho, rv.cross_polar_echo):
        with pytest.raises(ValueError, match="replicas \\[2\\] contain NaN or Inf"):
            fn(bad)
    with pytest.raises(ValueError, match="replica 1 has shape \\(5, 7\\) but replica 0 has \\(5, 6\\)"):
        rv.reverb_echo([R[0], torch.randn(5, 7), R[1]])
    with pytest.raises(ValueError, match="shape \\(K, M, N\\)"):
        rv.reverb_echo(R[0])
    with pytest.raises(ValueError, match="align must be one of"):
        rv.reverb_echo(R, align="hungarian")
    with pytest.raises(ValueError, match="solver must be one of"):
        rv.reverb_echo(R, solver="ols")
    with pytest.raises(ValueError, match="at least 2 replicas"):
        rv.plateau_rho(R[:1])
    with pytest.raises(ValueError, match="same matrix"):
        rv.true_echo(R[0], R[0, :, :5])
    # a list of (M, N) tensors works like the stacked tensor
    torch.testing.assert_close(rv.reverb_echo(list(R))["zeta"], rv.reverb_echo(R)["zeta"])
