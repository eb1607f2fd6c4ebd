"""SpectralEcho (optimizers/spectral_echo.py): Muon equivalence, the soft-sign update against a float64 SVD,
the echo fit against a direct computation from the replicates, and 1 process vs 2 processes.

This file doubles as the 2-rank worker:
    torchrun --standalone --nproc_per_node=2 tests/test_spectral_echo.py OUT_DIR
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from optimizers import echo  # noqa: E402
from optimizers.muon import Muon  # noqa: E402
from optimizers import reverb  # noqa: E402
from optimizers.spectral_echo import (  # noqa: E402
    C_REL_GRID, R0_GRID, SpectralEcho, echo_bin_stats, fit_echo_curve, log_bin_edges, merge_sparse_stats,
    replicate_group_sizes,
)

SHAPES = [(16, 24), (16, 24), (24, 16), (2, 12, 20), (10, 10)]
STEPS = 6
K_TOTAL = 4  # replicates per step in the 1-vs-2-process scenarios


def make_params(shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.5) for s in shapes]


def signal(shape, seed=100):
    """A rank-3 'true gradient' with well separated singular values (per matrix of a stack)."""
    gen = torch.Generator().manual_seed(seed + sum(shape))
    *batch, M, N = shape
    U = torch.randn(*batch, M, 3, generator=gen)
    V = torch.randn(*batch, N, 3, generator=gen)
    return (U * torch.tensor([3.0, 1.5, 0.8])) @ V.mT / math.sqrt(M * N) * 4


def replicate(shape, step, j):
    """Replicate j of the gradient at `step`: signal + unit-variance noise (scaled like the signal)."""
    gen = torch.Generator().manual_seed(1000 * step + j + 7 * sum(shape))
    *_, M, N = shape
    return signal(shape) + torch.randn(shape, generator=gen) / math.sqrt(M * N) * 2


def feed(opt, params, step, rank=0, world_size=1, n_micro=K_TOTAL, record=True):
    """Accumulate this rank's micro-batches like train_gpt (loss / n_micro); replicate j = m * W + rank."""
    for p in params:
        p.grad = None
    for m in range(n_micro):
        j = m * world_size + rank
        for p in params:
            g = replicate(tuple(p.shape), step, j) / n_micro
            p.grad = g if p.grad is None else p.grad + g
        if record and hasattr(opt, "add_replicate_gradients"):
            opt.add_replicate_gradients()


def build(name, params):
    hyper = dict(lr=0.02, momentum=0.9, weight_decay=0.1)
    groups = [dict(params=params[:4]), dict(params=params[4:], lr=0.01, weight_decay_mul=2.0)]
    if name == "muon":
        return Muon(groups, **hyper)
    if name.startswith("off"):  # off, off_plateau, off_reverb_svd: shrinkage off in each mode
        return SpectralEcho(groups, shrink=False, mode=name[4:] or "fit", **hyper)
    if name in ("layer", "shape", "matrix"):
        return SpectralEcho(groups, fit_every=2, fit_scope=name, n_bins=12, bin_min=1e-2, pool_fits=2,
                            min_bin_atoms=1, **hyper)
    if name in ("plateau", "reverb_svd"):
        return SpectralEcho(groups, fit_every=2, mode=name, **hyper)
    raise ValueError(name)


SCENARIOS = ["muon", "off", "layer", "shape", "matrix", "plateau", "reverb_svd"]


def run_scenario(name, rank=0, world_size=1):
    params = make_params()
    opt = build(name, params)
    for step in range(STEPS):
        feed(opt, params, step, rank, world_size, n_micro=K_TOTAL // world_size)
        opt.step()
    return [p.detach().clone() for p in params], opt


def worker_main(out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = {name: run_scenario(name, rank, world_size)[0] for name in SCENARIOS}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ---- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fit", "plateau", "reverb_svd"])
def test_shrinkage_off_is_muon_bit_for_bit(mode):
    pa, pb = make_params(), make_params()
    muon, off = build("muon", pa), build("off" if mode == "fit" else f"off_{mode}", pb)
    assert off.param_groups[0]["mode"] == mode and not off.replicates_wanted()
    for step in range(4):
        for opt, ps in ((muon, pa), (off, pb)):
            feed(opt, ps, step)
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))


def test_without_replicates_it_falls_back_to_muon_with_a_warning():
    pa, pb = make_params(), make_params()
    muon, se = build("muon", pa), build("layer", pb)
    with pytest.warns(UserWarning, match="replicate"):
        for step in range(3):
            for opt, ps in ((muon, pa), (se, pb)):
                feed(opt, ps, step, n_micro=2, record=opt is se)  # 2 replicates < 4: no fit possible
                opt.step()
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert se.echo_report() == []


def test_first_fit_step_updates_like_muon_then_the_curve_applies():
    pa, pb = make_params(), make_params()
    muon, se = build("muon", pa), build("layer", pb)
    for opt, ps in ((muon, pa), (se, pb)):
        feed(opt, ps, 0)
        opt.step()
    # step 0: the fit belongs to this step and applies from the next; the mean of the replicates is Muon's input
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert len(se.echo_report()) == len(SHAPES)
    for opt, ps in ((muon, pa), (se, pb)):
        feed(opt, ps, 1)
        opt.step()
    assert max(float((a - b).detach().abs().max()) for a, b in zip(pa, pb)) > 1e-3  # shrinkage now changes the step


def svd_soft_update(X, c_rel):
    """Float64 reference: U diag(f(s) / f(s_max)) V^T, f(s) = s / sqrt(s^2 + c), c = c_rel ||X||_F^2."""
    X = X.double()
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    c = c_rel * (X ** 2).sum((-2, -1), keepdim=True)[..., 0]
    f = S / torch.sqrt(S ** 2 + c)
    return (U * (f / f[..., :1])[..., None, :]) @ Vh


@pytest.mark.parametrize("shape", [(20, 32), (32, 20), (3, 12, 18)], ids=["wide", "tall", "stack3d"])
@pytest.mark.parametrize("c_rel", [1e-3, 0.05])
def test_soft_sign_update_matches_float64_svd(shape, c_rel):
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    g = torch.randn(shape, generator=gen)
    before = p.detach().clone()
    opt = SpectralEcho([p], lr=0.1, momentum=0.0, weight_decay=0.0, c_rel=c_rel, power_iters=20)
    p.grad = g.clone()
    opt.step()  # momentum 0: Muon's input is the gradient itself
    update = (before - p.detach()) / (0.1 * max(1.0, shape[-2] / shape[-1]) ** 0.5)
    ref = svd_soft_update(g, c_rel)
    assert float((update.double() - ref).abs().max()) < 2e-3 * float(ref.abs().max())
    top = torch.linalg.matrix_norm(update.double(), ord=2)
    torch.testing.assert_close(top, torch.ones_like(top), rtol=5e-3, atol=0)


def test_a_zero_gradient_step_does_not_break_the_next_update():
    """A zero Muon input (the first step of a model with a zero-initialised head) gives the power iteration no
    direction; the next, nonzero step must still get an update of spectral norm 1 (it had become inf)."""
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(3, 12, 18, generator=gen))
    opt = SpectralEcho([p], lr=0.1, momentum=0.0, weight_decay=0.0, c_rel=0.01)
    p.grad = torch.zeros_like(p)
    opt.step()
    g = torch.randn(3, 12, 18, generator=gen)
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    update = (before - p.detach()) / 0.1
    torch.testing.assert_close(torch.linalg.matrix_norm(update.double(), ord=2), torch.ones(3, dtype=torch.float64),
                               rtol=5e-3, atol=0)
    ref = svd_soft_update(g, 0.01)
    assert float((update.double() - ref).abs().max()) < 2e-3 * float(ref.abs().max())


def test_echo_bin_stats_match_cross_projection_and_binned_ratio():
    gen = torch.Generator().manual_seed(4)
    M, N = 18, 30
    G = signal((M, N))
    R = G.double() + torch.randn(8, M, N, generator=gen, dtype=torch.float64) * 0.05
    X = R[:4].mean(0)
    edges = log_bin_edges(12, 1e-3)
    stats = echo_bin_stats(X, R[4:6].mean(0), R[6:8].mean(0), 2, 2, edges)
    cp = echo.cross_project(R[:4], R[4:])  # atoms of the same mean, probed with the mean of the 4 probes
    norm = float(torch.linalg.matrix_norm(X.double()))
    ref = echo.binned_ratio(cp.s / norm, cp.echo / norm, edges=edges.numpy())
    got = (stats[:, 1] / stats[:, 0]).numpy()
    has = ref.count > 0
    np.testing.assert_allclose(stats[:, 3].numpy(), ref.count)
    np.testing.assert_allclose(got[has], ref.ratio[has], rtol=1e-6, atol=1e-9)


def test_fit_echo_curve_recovers_known_curves_and_flags_edges():
    x = np.geomspace(1e-3, 0.5, 16)
    step = C_REL_GRID[1] / C_REL_GRID[0]

    def stats_for(r, se_rel=0.01):
        se = se_rel * r.max()
        return torch.tensor(np.stack([x * 5, r * x * 5, (se * x * 5) ** 2, np.full_like(x, 5)], 1))

    for c_rel, r_max in ((1e-3, 0.6), (3e-2, 0.25)):
        fit = fit_echo_curve(stats_for(r_max * x / np.sqrt(x ** 2 + c_rel)), "soft_sign")
        assert c_rel / step <= fit["c_rel"] <= c_rel * step and fit["r0"] == 0.0 and fit["at_edge"] == []
        assert fit["r_max"] == pytest.approx(r_max, rel=0.03)
    # the floor family finds a planted floor; the family without one cannot
    r = 0.5 * (0.2 + 0.8 * x / np.sqrt(x ** 2 + 1e-2))
    floor = fit_echo_curve(stats_for(r), "soft_sign_floor")
    assert floor["r0"] == pytest.approx(0.2, abs=R0_GRID[1] / 2) and floor["r_max"] == pytest.approx(0.5, rel=0.03)
    assert floor["chi2"] < 0.01 * fit_echo_curve(stats_for(r), "soft_sign")["chi2"]
    # a ratio proportional to s wants c beyond the grid's top (a normalised gradient step): flagged
    edge = fit_echo_curve(stats_for(0.3 * x), "soft_sign")
    assert edge["at_edge"] == ["c_rel"] and edge["c_rel"] == C_REL_GRID[-1]
    assert fit_echo_curve(torch.zeros(12, 4)) is None  # no bins with atoms: no fit
    with pytest.raises(ValueError, match="family"):
        fit_echo_curve(stats_for(r), "hill")


def test_sparse_bins_merge_into_neighbours_and_sums_are_kept():
    stats = np.array([[1.0, 0.1, 0.01, 1], [0, 0, 0, 0], [3.0, 0.9, 0.02, 3], [2.0, 1.5, 0.03, 1]])
    merged = merge_sparse_stats(stats, min_count=2)
    np.testing.assert_allclose(merged, [[1.0 + 3.0 + 2.0, 2.5, 0.06, 5]])
    merged = merge_sparse_stats(stats, min_count=1)  # only the empty bin goes
    np.testing.assert_allclose(merged, stats[[0, 2, 3]])


def test_fit_from_micro_batch_replicates_matches_a_direct_computation():
    # 8 micro-batch replicates, one 2-D parameter: atoms from the Muon input of replicates 0-3 (zero buffer),
    # probes 4,5 and 6,7; the fitted constant equals the fit of bin sums computed here with numpy.
    shape, mu = (16, 24), 0.9
    p = make_params([shape])[0]
    opt = SpectralEcho([p], lr=0.02, momentum=mu, fit_every=5, n_bins=12, bin_min=1e-2)
    assert opt.replicates_wanted()
    feed(opt, [p], step=0, n_micro=8)
    R = torch.stack([replicate(shape, 0, j) for j in range(8)]).double()
    opt.step()
    assert not opt.replicates_wanted()  # next fit at step 5
    GA = R[:4].mean(0)
    X = GA + mu * ((1 - mu) * GA - GA)  # Nesterov input from a zero buffer
    norm = float(torch.linalg.matrix_norm(X))
    U, S, Vh = torch.linalg.svd(X / norm)
    P1, P2 = R[4:6].mean(0) / norm, R[6:8].mean(0) / norm
    a = torch.diag(U.T @ ((P1 + P2) / 2) @ Vh[: S.numel()].T).numpy()
    d = torch.diag(U.T @ (P1 - P2) @ Vh[: S.numel()].T).numpy()
    edges = np.geomspace(1e-2, 1.0, 13)
    b = np.searchsorted(edges, S.numpy(), side="right") - 1
    stats = np.zeros((12, 4))
    for i, bi in enumerate(b):
        if 0 <= bi < 12:
            stats[bi] += [S[i].item(), a[i], d[i], 1]
    stats[:, 2] = stats[:, 2] ** 2 / 4  # Var(mean of 2 groups of 2) from the bin sum of their difference
    expected = fit_echo_curve(torch.tensor(stats), "soft_sign_floor", min_bin_atoms=2)
    got = opt.state[p]["echo_fit"]["fits"][0]
    for key in ("c_rel", "r0", "r_max", "chi2"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4), key
    if not expected["at_edge"]:
        assert float(opt.state[p]["echo_c_rel"]) == pytest.approx(expected["c_rel"], rel=1e-6)


def one_step_update(opt, p, grads):
    """Set p.grad to the mean of `grads`, record each as a micro-batch replicate, step; return the update
    direction (before - after) / (lr * max(1, M/N)^0.5) (momentum 0 and no weight decay in these tests)."""
    before = p.detach().clone()
    p.grad = None
    for g in grads:
        p.grad = g / len(grads) if p.grad is None else p.grad + g / len(grads)
        opt.add_replicate_gradients()
    opt.step()
    group = opt.param_groups[0]
    return (before - p.detach()).double() / (group["lr"] * max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5)


def test_reverb_svd_applies_the_users_reverb_zeta_on_an_svd_of_the_input():
    shape, K = (2, 12, 20), 6
    p = make_params([shape])[0]
    opt = SpectralEcho([p], lr=0.1, momentum=0.0, mode="reverb_svd", fit_every=2)
    reps = [replicate(shape, 0, j) for j in range(K)]
    step0 = one_step_update(opt, p, reps)  # fit step: zeta from these replicas applies at once (as the user's)
    zeta = torch.stack([reverb.reverb_echo(torch.stack([r[b] for r in reps]), "none", "fieller")["zeta"]
                        for b in range(2)])  # (B, D)
    torch.testing.assert_close(opt.state[p]["reverb_zeta"], zeta.float())

    def reference(X):
        U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
        return (U * zeta[:, None, :]) @ Vh

    torch.testing.assert_close(step0, reference(sum(reps) / K), rtol=0, atol=1e-4)
    g1 = replicate(shape, 1, 0)
    step1 = one_step_update(opt, p, [g1])  # not a fit step: no replicates needed, the last zeta applies
    torch.testing.assert_close(step1, reference(g1), rtol=0, atol=1e-4)
    assert opt.echo_report()[0]["reverb_zeta_top"][0] == pytest.approx(zeta[0, :4].tolist(), abs=1e-6)


def test_plateau_applies_rho_of_note_06_times_a_fixed_soft_sign():
    from optimizers.spectral_echo import PLATEAU_C_REL

    shape, K = (16, 24), 4
    p = make_params([shape])[0]
    opt = SpectralEcho([p], lr=0.1, momentum=0.0, mode="plateau", fit_every=2, power_iters=20)
    reps = [replicate(shape, 0, j) for j in range(K)]
    step0 = one_step_update(opt, p, reps)  # rho from these replicas applies at once
    rho = reverb.plateau_rho(torch.stack(reps))["rho"]
    ref0 = rho * svd_soft_update(sum(reps) / K, PLATEAU_C_REL)
    assert float((step0 - ref0).abs().max()) < 2e-3 * float(ref0.abs().max())
    assert float(opt.state[p]["plateau_rho"]) == pytest.approx(rho, rel=1e-4) and 0 < rho < 1
    g1 = replicate(shape, 1, 0)
    step1 = one_step_update(opt, p, [g1])
    ref = rho * svd_soft_update(g1, PLATEAU_C_REL)
    assert float((step1 - ref).abs().max()) < 2e-3 * float(ref.abs().max())


def test_the_floor_family_adds_r0_msign_and_normalises_the_top_weight():
    import kernels

    shape = (20, 32)
    p = make_params([shape])[0]
    opt = SpectralEcho([p], lr=0.1, momentum=0.0, power_iters=20, c_rel=1e-2, r0=0.3)  # the curve a fit may give
    g = replicate(shape, 1, 0)
    update = one_step_update(opt, p, [g])
    X = g.double()
    S = torch.linalg.svdvals(X)
    c = 1e-2 * float((X ** 2).sum())
    top = 0.3 + 0.7 * float(S[0] / torch.sqrt(S[0] ** 2 + c))
    ref = (0.3 * kernels.msign(g).double() + 0.7 * svd_soft_update(g, 1e-2) * float(S[0] / torch.sqrt(S[0] ** 2 + c)))
    ref = ref / top
    assert float((update - ref).abs().max()) < 2e-3 * float(ref.abs().max())


def test_fits_pool_bin_sums_over_fit_steps_and_edge_fits_are_not_applied(monkeypatch):
    import optimizers.spectral_echo as se

    p = make_params([(16, 24)])[0]
    opt = SpectralEcho([p], lr=0.02, momentum=0.0, fit_every=1, pool_fits=2, n_bins=12, bin_min=1e-2)
    seen = []
    real_fit = se.fit_echo_curve
    monkeypatch.setattr(se, "fit_echo_curve", lambda st, *a, **k: seen.append(st.clone()) or real_fit(st, *a, **k))
    for step in range(3):
        one_step_update(opt, p, [replicate((16, 24), step, j) for j in range(4)])
    pool = opt.state[p]["echo_stat_pool"]
    assert pool.shape[:2] == (2, 1)  # the last two fit steps, one 2-D matrix
    torch.testing.assert_close(seen[-1], pool.sum(0)[0])  # the third fit saw steps 1 and 2 together
    # a fit at a grid edge is recorded but not applied: the matrix keeps its curve (here: none, so Muon)
    q = make_params([(16, 24)])[0]
    flagged = {"family": "soft_sign_floor", "c_rel": 1.0, "r0": 0.0, "r_max": 0.3, "chi2": 1.0, "dof": 3,
               "n_bins": 6, "at_edge": ["c_rel"]}
    monkeypatch.setattr(se, "fit_echo_curve", lambda *a, **k: dict(flagged))
    opt2 = SpectralEcho([q], lr=0.02, momentum=0.0, fit_every=1)
    muon = Muon([torch.nn.Parameter(q.detach().clone())], lr=0.02, momentum=0.0)
    reps = [replicate((16, 24), 0, j) for j in range(4)]
    w = muon.param_groups[0]["params"][0]
    for g in (sum(reps) / 4, replicate((16, 24), 1, 0)):  # Muon on the same two steps
        w.grad = g.clone()
        muon.step()
    one_step_update(opt2, q, reps)
    assert "echo_c_rel" not in opt2.state[q] and opt2.state[q]["echo_fit"]["applied"] == [False]
    assert opt2.echo_report()[0]["fits"][0]["at_edge"] == ["c_rel"]
    with pytest.warns(UserWarning, match="1 replicate"):  # step 1 is a fit step too, with one replicate
        one_step_update(opt2, q, [replicate((16, 24), 1, 0)])
    torch.testing.assert_close(q.detach(), w.detach(), rtol=0, atol=1e-6)


def test_echo_report_uses_param_names():
    params = make_params()
    names = [f"m{i}" for i in range(len(params))]
    opt = SpectralEcho(params, lr=0.02, fit_every=2, n_bins=12, bin_min=1e-2, param_names=names)
    feed(opt, params, 0)
    opt.step()
    assert sorted(e["param"] for e in opt.echo_report()) == names
    with pytest.raises(ValueError, match="param_names"):
        SpectralEcho(params, param_names=names[:2])


def test_replicate_groups_and_recording_only_on_fit_steps():
    assert replicate_group_sizes(8) == (4, 2, 2)
    assert replicate_group_sizes(4) == (2, 1, 1)
    assert replicate_group_sizes(7) == (4, 2, 1)
    params = make_params()
    opt = build("layer", params)
    feed(opt, params, 0)
    opt.step()
    assert not opt.replicates_wanted()
    feed(opt, params, 1)  # step 1 is not a fit step: nothing is recorded
    assert opt._micro == {}
    opt.step()


def test_state_dict_round_trip_keeps_the_curves():
    pa = make_params()
    a = build("shape", pa)
    for step in range(3):
        feed(a, pa, step)
        a.step()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    b = build("shape", pb)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    assert b.param_groups[0]["echo_shape_fits"] == a.param_groups[0]["echo_shape_fits"] != {}
    for opt, ps in ((a, pa), (b, pb)):
        feed(opt, ps, 3)
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))


@pytest.mark.parametrize("bad, message", [
    (dict(fit_every=0), "fit_every"), (dict(fit_scope="model"), "fit_scope"), (dict(normalize="rms"), "normalize"),
    (dict(c_rel=0.0), "c_rel"), (dict(n_bins=2), "n_bins"), (dict(bin_min=2.0), "bin_min"),
    (dict(power_iters=0), "power_iters"), (dict(momentum=1.0), "momentum"), (dict(mode="svd"), "mode"),
    (dict(family="hill"), "family"), (dict(pool_fits=0), "pool_fits"), (dict(min_bin_atoms=0), "min_bin_atoms"),
    (dict(reverb_align="hungarian"), "reverb_align"), (dict(reverb_solver="ols"), "reverb_solver"),
    (dict(r0=1.0), "r0"),
])
def test_bad_hyperparameters_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        SpectralEcho(make_params(), **bad)


def test_overhead_bench_times_every_mode(tmp_path):
    """The benchmark script itself on toy matrices, so that it cannot rot (no timing is asserted)."""
    from bench import bench_echo_overhead

    out = tmp_path / "echo.json"
    report = bench_echo_overhead.main(["--preset", "toy", "--reps", "1", "--replicates", "4", "--out", str(out)])
    for mode in ("fit", "plateau", "reverb_svd"):
        assert report[f"{mode}_apply_ms"] > 0 and report[f"{mode}_fit_ms"] > 0
    assert json.loads(out.read_text())["modes"] == ["fit", "plateau", "reverb_svd"]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    for name in SCENARIOS:
        single, opt = run_scenario(name)
        if name not in ("muon", "off"):
            assert opt.echo_report(), "the single-process run must have estimates"
        for r in range(2):
            for a, b in zip(ranks[r][name], single):
                torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    # shrinkage off under a process group: still Muon bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["off"], ranks[0]["muon"]))
    # and the curve makes a difference there too
    assert max(float((a - b).abs().max()) for a, b in zip(ranks[0]["layer"], ranks[0]["muon"])) > 1e-3


if __name__ == "__main__":
    worker_main(sys.argv[1])
