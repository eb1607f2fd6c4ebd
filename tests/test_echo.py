"""Echo estimation (optimizers/echo.py) against closed forms and a known true gradient (float64)."""
import math

import numpy as np
import pytest
import torch

from optimizers import echo
from tests.synthetic import spiked

pytestmark = pytest.mark.usefixtures("single_thread")  # small float64 SVDs


def test_gavish_donoho_eta_matches_spike_closed_form():
    # A spike x (noise units) is observed at y = sqrt((x^2+1)(x^2+beta))/x with cosines
    # c_u^2 = (1 - beta/x^4)/(1 + beta/x^2), c_v^2 = (1 - beta/x^4)/(1 + 1/x^2) (M <= N, beta = M/N);
    # the amplitude echo x c_u c_v must equal eta(y).
    for beta in (0.25, 0.5, 1.0):
        x = np.array([1.2, 1.5, 2.0, 4.0, 10.0]) * beta ** 0.25
        y = np.sqrt((x ** 2 + 1) * (x ** 2 + beta)) / x
        cu = np.sqrt((1 - beta / x ** 4) / (1 + beta / x ** 2))
        cv = np.sqrt((1 - beta / x ** 4) / (1 + 1 / x ** 2))
        np.testing.assert_allclose(echo.gavish_donoho_eta(y, beta), x * cu * cv, rtol=1e-10)
        assert echo.gavish_donoho_eta(np.array([0.5, 1 + math.sqrt(beta) - 1e-9]), beta).tolist() == [0.0, 0.0]


def test_estimated_echo_agrees_with_gavish_donoho_within_standard_errors():
    M, N, K, sigma = 60, 120, 16, 0.1
    spikes = [6.0, 4.0, 3.0]  # in noise units of the atom matrix (mean of K/2 replicates)
    scale = sigma / math.sqrt(K // 2) * math.sqrt(N)
    gen = torch.Generator().manual_seed(1)
    G = spiked(M, N, spikes, scale, gen)
    z, rel = [], []
    for _ in range(20):
        R = G + sigma * torch.randn(K, M, N, generator=gen, dtype=torch.float64)
        est = echo.estimate_echo(R, n_splits=4, seed=int(torch.randint(0, 10**6, (1,), generator=gen)))
        assert abs(est.sigma / sigma - 1) < 0.01  # sigma from replicate spread
        _, e, se = est.mean_curve()
        gd = np.mean([echo.gavish_donoho_echo(s, est.sigma, (M, N), est.n_atom) for s in est.s], axis=0)
        z.append((e[:3].numpy() - gd[:3]) / se[:3].numpy())
        rel.append(e[:3].numpy() / gd[:3] - 1)
    z = np.array(z)  # (draws, spikes); se conditional on the atoms (a little narrow, see binned_echo)
    assert np.abs(z).max() < 4.0, z  # every draw within its standard errors
    # no systematic offset beyond the closed form's own finite-size error (an asymptotic formula, M = 60):
    # the mean relative difference over 20 draws stays within 2% (observed up to ~1%, a 3.5 se offset at
    # spike 4.0; the estimate itself is unbiased for the true echo, test below)
    assert np.abs(np.mean(rel, 0)).max() < 0.02, np.mean(rel, 0)
    # bulk atoms: closed form says zero echo; the estimate is small compared with the top atoms
    assert float(e[10:].abs().max()) < 0.2 * float(e[0])


def test_cross_projection_is_unbiased_for_the_true_echo_of_its_atoms():
    # True echo of the atom matrix's atoms: a_i = u_i^T G v_i with G known. Over many draws the mean of
    # (a_hat - a) must be zero within a few standard errors of the mean, atom by atom; and the mean
    # squared error must match the mean of se^2 (se is calibrated).
    M, N, K, sigma = 24, 48, 8, 0.2
    gen = torch.Generator().manual_seed(2)
    G = spiked(M, N, [5.0, 3.0, 2.0, 1.0], sigma * math.sqrt(N / 4), gen)
    diffs, ses, insample = [], [], []
    for _ in range(400):
        R = G + sigma * torch.randn(K, M, N, generator=gen, dtype=torch.float64)
        cp = echo.cross_project_split(R, range(4), range(4, 8))
        U, S, Vh = torch.linalg.svd(R[:4].mean(0), full_matrices=False)
        true_echo = ((G @ Vh.T) * U).sum(0)
        diffs.append(cp.echo - true_echo)
        ses.append(cp.se)
        insample.append(S - true_echo)
    d, se = torch.stack(diffs), torch.stack(ses)  # (draws, r)
    z_mean = d.mean(0) / (d.std(0) / math.sqrt(d.size(0)))
    assert z_mean.abs().max() < 4.0, z_mean
    assert z_mean.abs().mean() < 1.2  # |N(0,1)| has mean 0.8
    mse_ratio = (d ** 2).mean(0) / (se ** 2).mean(0)
    assert ((mse_ratio > 0.75) & (mse_ratio < 1.33)).all(), mse_ratio
    # the same test detects the in-sample estimate (atoms probed with their own replicates) as biased
    ins = torch.stack(insample)
    assert (ins.mean(0) / (ins.std(0) / math.sqrt(ins.size(0)))).abs().max() > 20


def test_probing_with_atom_replicates_is_refused():
    R = torch.randn(6, 5, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="both the atom set and the probe set"):
        echo.cross_project_split(R, [0, 1, 2], [2, 3])
    with pytest.raises(ValueError, match="identical to atom replicate"):
        echo.cross_project(R[:3], R[2:5])
    with pytest.raises(ValueError, match="identical to atom replicate"):
        echo.cross_project(R[:3], R[1:2].clone())  # equal values in a different tensor
    with pytest.raises(ValueError, match="shape \\(K, M, N\\)"):
        echo.estimate_echo(R[0])
    with pytest.raises(ValueError, match="n_probe"):
        echo.estimate_echo(R, n_probe=6)


def test_splits_are_disjoint_and_leave_one_out_probes_each_replicate_once():
    for a, p in echo.random_splits(9, 6, n_probe=3, seed=3):
        assert not set(a) & set(p) and len(a) == 6 and len(p) == 3
    R = torch.randn(5, 6, 8, dtype=torch.float64)
    est = echo.estimate_echo(R, leave_one_out=True)
    assert [p for _, p in est.splits] == [[k] for k in range(5)]
    assert est.n_atom == 4 and torch.isnan(est.se).all()
    # leave-one-out split k: echo = u^T R_k v for the atoms of the mean of the other four
    U, S, Vh = torch.linalg.svd(R[1:].mean(0), full_matrices=False)
    torch.testing.assert_close(est.echo[0], torch.diag(U.T @ R[0] @ Vh.T))
    _, _, se = est.mean_curve()
    assert torch.isfinite(se).all()


def test_momentum_atoms_come_from_the_blended_matrix():
    R = torch.randn(4, 5, 6, dtype=torch.float64)
    buf = torch.randn(5, 6, dtype=torch.float64)
    cp = echo.cross_project(R[:2], R[2:], momentum_buffer=buf, momentum=0.9)
    U, S, Vh = torch.linalg.svd(0.9 * buf + 0.1 * R[:2].mean(0), full_matrices=False)
    torch.testing.assert_close(cp.s, S)
    torch.testing.assert_close(cp.echo, torch.diag(U.T @ R[2:].mean(0) @ Vh.T))


def test_noise_scales_are_unbiased():
    M, N, K, sigma = 10, 20, 6, 0.5
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(M, N, generator=gen, dtype=torch.float64) * 0.1
    out = [echo.noise_scales(G + sigma * torch.randn(K, M, N, generator=gen, dtype=torch.float64), batch_size=32)
           for _ in range(300)]
    grad_sq = np.array([o["grad_sq"] for o in out])
    trace = np.array([o["noise_trace"] for o in out])
    true_sq, true_trace = float((G ** 2).sum()), sigma ** 2 * M * N
    assert abs(grad_sq.mean() - true_sq) < 4 * grad_sq.std() / math.sqrt(len(out))
    assert abs(trace.mean() - true_trace) < 4 * trace.std() / math.sqrt(len(out))
    # one draw with little noise: B_simple = b tr(Sigma) / ||G||^2 close to the truth
    o = echo.noise_scales(G + 1e-3 * torch.randn(K, M, N, generator=gen, dtype=torch.float64), batch_size=32)
    assert o["b_simple"] == pytest.approx(32 * 1e-6 * M * N / true_sq, rel=0.1)


def test_noise_anisotropy_is_one_for_isotropic_noise_and_larger_along_a_noisy_direction():
    M, N, K, sigma = 20, 30, 40, 0.3
    gen = torch.Generator().manual_seed(5)
    G = spiked(M, N, [8.0, 6.0], sigma * math.sqrt(N), gen)
    R = G + sigma * torch.randn(K, M, N, generator=gen, dtype=torch.float64)
    cp = echo.cross_project_split(R, range(20), range(20, 40))
    assert echo.noise_anisotropy(cp, echo.noise_sigma(R), top=2) == pytest.approx(1.0, abs=0.5)
    # add strong noise along the top atom: anisotropy along it grows
    u, v = torch.linalg.svd(G)[0][:, :1], torch.linalg.svd(G)[2][:1].T
    R2 = R + 5 * sigma * torch.randn(K, 1, 1, generator=gen, dtype=torch.float64) * (u @ v.T)
    cp2 = echo.cross_project_split(R2, range(20), range(20, 40))
    assert echo.noise_anisotropy(cp2, echo.noise_sigma(R2), top=1) > 5


def test_binned_ratio_is_ratio_of_sums():
    s = torch.tensor([1.0, 1.5, 2.0, 8.0, 9.0])
    e = torch.tensor([0.1, 0.0, 0.4, 6.0, 8.0])
    b = echo.binned_ratio(s, e, edges=np.array([0.5, 4.0, 10.0]))
    np.testing.assert_allclose(b.ratio, [0.5 / 4.5, 14.0 / 17.0])
    np.testing.assert_allclose(b.s_mean, [1.5, 8.5])
    assert b.count.tolist() == [3, 2]


def test_replicate_se_of_one_split_is_the_spread_of_the_probes_bin_sums():
    # One split: the bin's echo sum is the mean over probes j of B_j = sum_{i in bin} u_i^T G_j v_i, so its se
    # is std(B_j) / sqrt(p), correlations between the atoms included (not sqrt(sum of per-atom variances)).
    R = torch.randn(8, 6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    est = echo.estimate_echo(R, n_splits=1)
    edges = np.array([0.0, float(est.s[0, 2]) * 1.0001, float(est.s[0, 0]) * 1.01])
    b = echo.binned_echo(est, edges)
    member = echo.bin_onehot(est.s.numpy(), edges)[0].astype(float)  # (r, bins)
    B = est.probe_values[0].numpy() @ member  # (p, bins)
    np.testing.assert_allclose(b.ratio_se * (est.s[0].numpy() @ member), B.std(0, ddof=1) / 2, rtol=1e-10)
    np.testing.assert_allclose(b.ratio, (est.echo[0].numpy() @ member) / (est.s[0].numpy() @ member))


def _coverage_draws(aniso: float, draws: int = 200, seed: int = 0):
    """Calibration set-up: 8 x 16 matrices, K = 8, 4 half splits, 40 bootstrap draws per estimate; noise
    isotropic plus `aniso` times a shared rank-one direction (correlated atoms, as in real gradients).
    Returns z-scores (draws, bins) of the binned ratio against (a) the true echo of each estimate's own
    atoms and (b) the population curve at this operating point (Monte Carlo over 4000 atom matrices), and
    the bootstrap-band coverage against (a)."""
    M, N, K = 8, 16, 8
    gen = torch.Generator().manual_seed(seed)
    G = spiked(M, N, [5.0, 3.5, 2.5, 1.8], math.sqrt(N) / 2, gen)
    direction = torch.outer(torch.randn(M, generator=gen, dtype=torch.float64),
                            torch.randn(N, generator=gen, dtype=torch.float64))

    def replicates(*batch):
        E = torch.randn(*batch, M, N, generator=gen, dtype=torch.float64)
        return G + E + aniso * torch.randn(*batch, 1, 1, generator=gen, dtype=torch.float64) * direction

    U, S, Vh = torch.linalg.svd(replicates(4000, 4).mean(1), full_matrices=False)  # atoms of a mean of 4
    a_pop, s_pop = ((G @ Vh.mT) * U).sum(-2).numpy(), S.numpy()
    edges = np.quantile(s_pop, np.linspace(0, 1, 6))
    edges[0], edges[-1] = 0.99 * edges[0], 1.01 * edges[-1]
    onehot = echo.bin_onehot(s_pop, edges).astype(float)
    population = np.einsum("nr,nrb->b", a_pop, onehot) / np.einsum("nr,nrb->b", s_pop, onehot)
    z_own, z_pop, covered = [], [], []
    for d, R in enumerate(replicates(draws, K)):
        est = echo.estimate_echo(R, n_splits=4, seed=d, n_boot=40)
        b = echo.binned_echo(est, edges)
        member = echo.bin_onehot(est.s.numpy(), edges).astype(float)  # (splits, r, bins)
        U, _, Vh = torch.linalg.svd(torch.stack([R[a].mean(0) for a, _ in est.splits]), full_matrices=False)
        a_true = ((G @ Vh.mT) * U).sum(-2).numpy()  # (splits, r): true echo of each split's atoms
        with np.errstate(invalid="ignore", divide="ignore"):
            own = np.einsum("kr,krb->b", a_true, member) / np.einsum("kr,krb->b", est.s.numpy(), member)
        z_own.append((b.ratio - own) / b.ratio_se)
        z_pop.append((b.ratio - population) / b.ratio_se)
        _, lo, hi = echo.bootstrap_binned_ratio(est, edges, level=0.9)
        covered.append((lo <= own) & (own <= hi))
    ok = np.isfinite(np.array(z_own))
    return np.array(z_own)[ok], np.array(z_pop)[ok], np.array(covered)[ok]


@pytest.mark.parametrize("aniso", [0.0, 2.0])
def test_bootstrap_bands_cover_the_truth_at_their_nominal_rate(aniso):
    # 200 draws x 5 bins; observed coverage of the 90% bands: 0.91 / 0.92 (own atoms), 0.88 / 0.91 (population)
    # for aniso 0 / 2. The old bootstrap (atoms fixed, each split resampled on its own) covered 0.63 / 0.69 here.
    from scipy.stats import t as student_t

    z_own, z_pop, covered = _coverage_draws(aniso)
    assert 0.85 <= covered.mean() <= 0.95, covered.mean()
    q = student_t.ppf(0.95, 7)
    for z in (z_own, z_pop):
        assert 0.85 <= np.mean(np.abs(z) < q) <= 0.95, np.mean(np.abs(z) < q)


def test_isotonic_fit_pools_adjacent_violators():
    np.testing.assert_allclose(echo.isotonic_fit(np.array([1.0, 3.0, 2.0, 4.0])), [1.0, 2.5, 2.5, 4.0])
    np.testing.assert_allclose(echo.isotonic_fit(np.array([3.0, 1.0]), np.array([1.0, 3.0])), [1.5, 1.5])
    y = np.random.default_rng(0).normal(size=50)
    fit = echo.isotonic_fit(y)
    assert (np.diff(fit) >= -1e-12).all() and fit.mean() == pytest.approx(y.mean())


@pytest.mark.parametrize("family, params", [
    ("hill", {"tau": 2.0}),
    ("hill_floor", {"r0": 0.05, "tau": 3.0}),
    ("hill_ceiling", {"r_max": 0.4, "tau": 1.5}),
    ("hill_power", {"tau": 2.0, "power": 3.0}),
    ("hill3", {"r0": 0.03, "r_max": 0.5, "tau": 2.5}),
    ("soft_sign", {"r_max": 0.7, "c": 4.0}),
])
def test_curve_fits_recover_known_constants(family, params):
    fam = echo.CURVE_FAMILIES[family]
    s = np.geomspace(0.2, 30.0, 25)
    # curve evaluated directly in raw units (s_ref = 1) plus small noise of known size
    r_true = fam.fn(s, *[params[n] for n in fam.names])
    noise = 0.002 * np.random.default_rng(1).normal(size=s.size)
    fit = echo.fit_curve(family, s, r_true + noise, np.full(s.size, 0.002))
    for name, value in params.items():
        assert fit.params[name] == pytest.approx(value, rel=0.05, abs=0.01), (name, fit.params)
    assert fit.n_params == len(params) and fit.dof == s.size - len(params)
    assert 0.3 < fit.reduced_chi2 < 2.0 and fit.r2 > 0.99
    assert abs(fit.resid_autocorr) < 0.5


def test_fit_statistics_flag_a_wrong_shape():
    s = np.geomspace(0.2, 30.0, 25)
    r_true = 0.3 + 0.5 * s ** 4 / (s ** 4 + 16.0)  # floor and steep knee: plain Hill cannot follow it
    fit = echo.fit_curve("hill", s, r_true, np.full(s.size, 0.01))
    assert fit.reduced_chi2 > 10 and fit.resid_autocorr > 0.3


def test_gavish_donoho_family_has_no_free_constants_and_matches_the_closed_form():
    s = np.array([3.0, 4.0, 6.0])
    fit = echo.fit_curve("gavish_donoho", s, np.full(3, 0.5), np.full(3, 0.1), sigma=0.1, shape=(30, 60), n_avg=4)
    assert fit.n_params == 0
    np.testing.assert_allclose(fit.predict(s), echo.gavish_donoho_echo(s, 0.1, (30, 60), 4) / s)
    with pytest.raises(ValueError, match="needs sigma"):
        echo.fit_curve("gavish_donoho", s, s, s)
    with pytest.raises(ValueError, match="unknown curve family"):
        echo.fit_curve("spline", s, s, s)


def test_fit_parameter_standard_errors_are_calibrated():
    s = np.geomspace(0.2, 30.0, 25)
    r_true = echo.CURVE_FAMILIES["hill"].fn(s, 2.0)
    rng = np.random.default_rng(7)
    fits = [echo.fit_curve("hill", s, r_true + 0.01 * rng.normal(size=s.size), np.full(s.size, 0.01))
            for _ in range(60)]
    taus = np.array([f.params["tau"] for f in fits])
    se = np.mean([f.param_se["tau"] for f in fits])
    assert taus.std() == pytest.approx(se, rel=0.3)
    assert abs(taus.mean() - 2.0) < 4 * se / math.sqrt(len(fits))


# ---- spectral_probe.py: the diagnostics built on these estimators -----------------------------------------

import spectral_probe  # noqa: E402


def test_monotonicity_flags_a_planted_reversal_only():
    x = np.geomspace(0.1, 10, 8)
    r = x ** 2 / (x ** 2 + 1)
    se = np.full(8, 0.01)
    clean = spectral_probe.monotonicity(x, r, se)
    assert clean["reversals"] == 0 and clean["spearman"] == pytest.approx(1.0) and not clean["top_dip"]
    assert clean["ratio"]["reversals"] == 0
    r_bad = r.copy()
    r_bad[4] = (r[3] - 0.1) * x[3] / x[4]  # amplitude a = r s drops by 0.1 s_3: z = 10 / sqrt(1 + (x4/x3)^2) > 4
    bad = spectral_probe.monotonicity(x, r_bad, se)
    assert bad["reversals"] == 1 and bad["max_reversal_z"] > 4 and bad["ratio"]["reversals"] >= 1
    # a falling ratio with a rising amplitude (noise at the low end of a signal-rich spectrum) is no reversal
    r_fall = np.linspace(1.4, 0.9, 8)
    fall = spectral_probe.monotonicity(x, r_fall, se)
    assert fall["reversals"] == 0 and fall["ratio"]["reversals"] == 7


def test_alignment_identifies_separated_spikes_but_not_the_noise_bulk():
    M, N, K, sigma = 30, 50, 8, 0.05
    gen = torch.Generator().manual_seed(8)
    G = spiked(M, N, [12.0, 8.0, 5.0], sigma * math.sqrt(N), gen)
    R = G + sigma * torch.randn(K, M, N, generator=gen, dtype=torch.float64)
    loo = echo.estimate_echo(R, leave_one_out=True)
    out = spectral_probe.alignment(R, loo.s, top=3)
    assert out["identifiable_top"] == 1.0 and out["first_unidentifiable"] >= 3
    assert out["identifiable_all"] < 0.5  # the bulk atoms do not match across halves


def test_knee_interpolates_on_log_x():
    x = np.array([0.5, 1.0, 2.0, 4.0])
    r = np.array([0.1, 0.3, 0.7, 0.9])
    k = spectral_probe.knee(x, r, np.array([0.01, 0.02, 0.04, 0.04]))
    assert k["level"] == 0.45 and k["x"] == pytest.approx(2 ** (0.15 / 0.4))
    assert k["halfwidth"] == pytest.approx(0.02 + 0.375 * 0.02)


def test_grouped_cv_picks_the_generating_family_with_the_fewest_constants():
    rng = np.random.default_rng(9)
    folds = []
    for _ in range(4):
        x = np.geomspace(0.3, 20, 10)
        se = np.full(10, 0.02)
        r = echo.CURVE_FAMILIES["hill"].fn(x, 2.0) + 0.02 * rng.normal(size=10)
        folds.append([{"bins": {"x": x.tolist(), "ratio": r.tolist(), "se": se.tolist()}, "shape": [40, 80],
                       "n_atom": 4}])
    cv = spectral_probe.grouped_cv(folds)
    assert cv["choice"] == "hill"
    assert cv["families"]["gavish_donoho"]["score"] > 5 * cv["families"]["hill"]["score"]


def small_mlp_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 12))
    W = torch.randn(12, 24) / 4

    def batches():
        gen = torch.Generator().manual_seed(1)
        while True:
            x = torch.randn(32, 24, generator=gen)
            yield x, x @ W.T + 0.5 * torch.randn(32, 12, generator=gen)
    return model, batches, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])


def test_probe_model_on_a_small_mlp_writes_every_diagnostic(tmp_path):
    model, batches, loss_fn = small_mlp_and_batches()
    # the replicates are the per-batch gradients
    params = spectral_probe.hidden_matrices(model)
    assert list(params) == ["0.weight", "2.weight"]
    some = [b for _, b in zip(range(3), batches())]
    reps, _ = spectral_probe.collect_replicates(model, some, params, loss_fn)
    model.zero_grad()
    loss_fn(model, some[2]).backward()
    torch.testing.assert_close(reps["2.weight"][2], model[2].weight.grad.double())
    model.zero_grad()

    records = []
    for step in (0, 10):
        if step:
            with torch.no_grad():  # move the model so the two steps differ
                model[0].weight.add_(0.05 * torch.randn_like(model[0].weight))
        records += spectral_probe.probe_model(model, batches(), 6, loss_fn, tokens_per_replicate=32, step=step,
                                              lr=0.05, n_boot=30, null_set=step == 10)
    mats = [r for r in records if r["kind"] == "matrix"]
    assert [r["name"] for r in mats] == ["0.weight", "2.weight"] * 2
    for r in mats:
        for key in ("d0", "a", "b", "c", "d", "g", "bins", "atoms"):
            assert key in r, key
        assert set(r["b"]["fits"]) >= {"gavish_donoho", "hill", "soft_sign", "isotonic"}
    # D0 of the first matrix equals the estimator on the same replicates
    reps, _ = spectral_probe.collect_replicates(model, [b for _, b in zip(range(6), batches())],
                                                spectral_probe.hidden_matrices(model), loss_fn)
    d0 = echo.noise_scales(reps["0.weight"], 32)
    assert mats[2]["d0"]["grad_sq"] == pytest.approx(d0["grad_sq"], rel=1e-4)
    model_recs = [r for r in records if r["kind"] == "model"]
    assert set(model_recs[0]["lookahead"]["delta"]) == {"msign", "fit_soft_sign", "fit_hill_floor", "rank_above_edge"}
    assert set(model_recs[0]["lookahead"]["best_eta"]) == set(model_recs[0]["lookahead"]["at_edge"])
    # the second step drew an independent replicate set: each matrix carries its same-step null
    assert all("f_null" not in r for r in mats[:2]) and all(r["f_null"] for r in mats[2:])
    null = spectral_probe.stability(mats)["hill"]["null"]
    assert len(null) == 2 and all(t > 0 for t in null)

    text = spectral_probe.write_outputs(str(tmp_path), records, {"K": 6, "tokens_per_step": 64,
                                                                 "tokens_per_replicate": 32})
    for phrase in ("Enough replicates", "monotone", "O(1) constants", "stable over training", "aligned"):
        assert phrase in text
    assert (tmp_path / "echo_step0.png").exists() and (tmp_path / "constants.png").exists()


def test_same_step_null_is_near_one_for_an_independent_set_of_the_same_gradient():
    # Two independent replicate sets of one gradient: the first set's curves on the second set's bins fit
    # almost as well as a refit (observed 1.1-1.3): the baseline a between-step transfer ratio is judged by.
    M, N, K = 20, 40, 8
    gen = torch.Generator().manual_seed(11)
    G = spiked(M, N, [8.0, 5.0, 3.0, 2.0], math.sqrt(N) / 2, gen)
    noise = lambda: torch.randn(K, M, N, generator=gen, dtype=torch.float64)
    rec, _ = spectral_probe.analyse_matrix(G + noise(), n_boot=20)
    same = spectral_probe.same_step_null(rec, G + noise(), 8, 12, 20, 0)
    assert set(same) == set(spectral_probe.STABILITY_FAMILIES)
    assert all(1.0 <= t < 1.6 for t in same.values()), same  # a refit can only fit its own bins better


def test_lookahead_grid_extends_past_an_edge_best_and_flags_what_it_cannot_bracket():
    # loss = 0.5 ||W - T||^2 with W - T = c Q, Q having orthonormal rows: msign(G) = Q, so the loss after
    # W -= eta lr Q is 0.5 (c - eta lr)^2 M, minimised at eta = c / lr, beyond the initial grid (max 4).
    M, N, lr = 4, 8, 0.01
    Q = torch.linalg.qr(torch.randn(N, M, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0].T
    for c, best, edge in ((0.16, 16.0, False), (10.0, 64.0, True)):
        W = torch.nn.Parameter(torch.zeros(M, N, dtype=torch.float64))
        target = -c * Q
        loss_fn = lambda m, batch: 0.5 * ((m.weight - target) ** 2).sum()
        model = torch.nn.Module()
        model.weight = W
        R = (c * Q).expand(2, M, N).clone()  # two identical replicates: G_A = c Q
        extras = {"weight": {"split": ([0], [1]), "edge": 1.0}}
        out = spectral_probe.lookahead(model, {"weight": W}, {"weight": R}, extras, [None], loss_fn, lr,
                                       rules=("msign",))
        assert out["best_eta"]["msign"] == best and out["at_edge"]["msign"] is edge
        assert min(out["delta"]["msign"], key=out["delta"]["msign"].get) == f"{best:g}"
        torch.testing.assert_close(W.detach(), torch.zeros(M, N, dtype=torch.float64))  # restored


def test_verdict_thresholds():
    sp = spectral_probe
    assert [sp.batch_verdict(x) for x in (1.0, 1.01, 99.9, 100.0, float("nan"))] == \
        ["holds", "undecided", "undecided", "fails", "undecided"]
    assert [sp.replicates_verdict(x) for x in (0.8, 0.79, 0.5, 0.49)] == ["holds", "undecided", "undecided", "fails"]
    assert [sp.fit_verdict(g, b) for g, b in ((0.8, 0.9), (0.79, 0.5), (0.79, 0.51))] == \
        ["holds", "undecided", "fails"]
    assert [sp.alignment_verdict(x) for x in (0.8, 0.5, 0.49)] == ["holds", "undecided", "fails"]
    assert [sp.monotone_verdict(r, d) for r, d in ((0, 0), (0, 1), (1, 0))] == ["holds", "undecided", "fails"]
    assert [sp.constants_verdict(c) for c in ([2, 3], [2, 4], [])] == ["holds at this scale", "fails", "undecided"]
    # stability: against the same-step null when there is one, else the absolute rule (and it says so)
    assert sp.stability_verdict(1.6, 1.5) == "holds"  # 1.6 <= 1.1 x 1.5
    assert sp.stability_verdict(3.0, 1.5) == "undecided" and sp.stability_verdict(3.1, 1.5) == "fails"
    assert sp.stability_verdict(1.05, None).startswith("holds (no same-step null")
    assert sp.stability_verdict(2.5, None).startswith("fails (no same-step null")
    assert sp.stability_verdict(float("nan"), 1.0).startswith("undecided")

    def look(best_rule, edge=False):
        delta = {"msign": {"1": -0.10}, "fit_soft_sign": {"1": -0.05}}
        delta[best_rule] = {"1": -0.20}
        return {"delta": delta, "at_edge": {best_rule: edge}}

    assert sp.utility_verdict([look("msign")] * 3).startswith("fails")
    assert sp.utility_verdict([look("fit_soft_sign")] * 3).startswith("holds")
    assert sp.utility_verdict([look("msign"), look("fit_soft_sign")]).startswith("undecided")
    assert sp.utility_verdict([look("msign"), look("msign", edge=True)]).startswith("undecided")
    assert sp.utility_verdict([]).startswith("undecided")


def test_probe_model_rejects_too_few_replicates_and_short_data():
    model, batches, loss_fn = small_mlp_and_batches()
    with pytest.raises(ValueError, match="K >= 4"):
        spectral_probe.probe_model(model, batches(), 3, loss_fn)
    with pytest.raises(ValueError, match="ran out"):
        spectral_probe.probe_model(model, [next(batches())] * 2, 6, loss_fn)


def test_probe_on_a_tiny_train_gpt_model_measures_the_matrices_the_optimizer_updates():
    import train_gpt

    cfg = train_gpt.parse_config(["--preset", "cpu-tiny", "--vocab-size", "96", "--model-dim", "32",
                                  "--num-heads", "2", "--head-dim", "16", "--num-layers", "2", "--skip-connections", "",
                                  "--long-window-layers", "0", "--no-zero-init-proj", "--num-value-embeds", "0",
                                  "--optimizer", "spectral_echo"])
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    matrix_opt = train_gpt.build_optimizers(model, cfg)[1]
    params = spectral_probe.gpt_hidden_matrices(model)
    assert sorted(params) == sorted(matrix_opt._names.values())  # the same matrices, by the same names
    gen = torch.Generator().manual_seed(1)

    def batches():
        while True:
            x = torch.randint(0, 96, (2, 33), generator=gen)
            yield x[:, :-1], x[:, 1:]

    def loss_fn(m, batch):
        return m(batch[0], batch[1], train_gpt.model_masks(m, batch[0], 32, False))

    records = spectral_probe.probe_model(model, batches(), 4, loss_fn, params, tokens_per_replicate=64, step=3,
                                         n_boot=20)
    mats = [r for r in records if r["kind"] == "matrix"]
    expected = sum(p.shape[0] if p.ndim == 3 else 1 for p in params.values())
    assert len(mats) == expected and all("d0" in r for r in mats)
    assert any(r["name"].endswith("qkvo_w[3]") for r in mats)


def test_random_row_batches_are_slices_of_the_shards(tmp_path):
    from data.shards import write_shard

    tokens = np.arange(5000, dtype=np.uint16)  # each token is its own position
    write_shard(str(tmp_path / "t_000001.bin"), tokens)
    it = spectral_probe.random_row_batches(str(tmp_path / "t_*.bin"), rows=3, seq_len=16, seed=0)
    starts = set()
    for _ in range(4):
        x, y = next(it)
        assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
        torch.testing.assert_close(x[:, 1:], y[:, :-1])
        for row in x:
            start = int(row[0])
            assert torch.equal(row, torch.as_tensor(tokens[start:start + 16].astype(np.int64)))  # contiguous
            starts.add(start)
    assert len(starts) > 6  # independent random positions, not one stream


def test_merge_sparse_bins_leaves_no_bin_below_the_minimum():
    s = np.array([0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 5.0, 9.0])
    edges = np.array([0.05, 0.5, 2.0, 10.0])
    np.testing.assert_allclose(echo.merge_sparse_bins(s, edges, 2), edges)  # counts 3, 3, 2: unchanged
    merged = echo.merge_sparse_bins(s, edges, 3)  # the top bin (2 atoms) joins the one below
    np.testing.assert_allclose(merged, [0.05, 0.5, 10.0])
    assert np.histogram(s, merged)[0].tolist() == [3, 5]
    np.testing.assert_allclose(echo.merge_sparse_bins(s, edges, 100), [0.05, 10.0])
