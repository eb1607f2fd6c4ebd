"""Spectral-ORD: bit-identity with Muon at alpha = 0, the decomposition against an independent float64
computation, re-projection and matched scaling, state_dict resume, diagnostics (file, values, replicate SNR),
and a 2-process gloo run."""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

from optimizers import OPTIMIZERS, SpectralORD, get_optimizer_class
from optimizers.spectral_ord import spectral_ord_direction
from test_optimizers import load_worker, msign64, params_like, run_torchrun, save_and_load, set_grads

worker = load_worker()


def frob(a, b):
    return (a * b).sum(dim=(-2, -1), keepdim=True)


def ord_step(W0, G, lr=0.5, **options):
    """One SpectralORD step with momentum 0 (g_eff = G) and no weight decay; returns U = (W0 - W1) / (lr s)."""
    (p,) = params = params_like([W0])
    opt = SpectralORD(params, lr=lr, momentum=0.0, **options)
    set_grads(params, [G])
    opt.step()
    scale = max(1.0, W0.shape[-2] / W0.shape[-1]) ** 0.5
    return (W0 - p.detach()) / (lr * scale), opt


def reference_parts(W, G):
    """Independent float64 decomposition: rho, G_par, G_perp per matrix of (..., M, N)."""
    rho = frob(G, W) / frob(W, W)
    return rho, rho * W, G - rho * W


def random_pair(shape, seed, radial=0.0):
    """W and a gradient G with an extra radial component `radial * W` (so rho is not tiny)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=gen, dtype=torch.float64)
    G = torch.randn(shape, generator=gen, dtype=torch.float64) + radial * W
    return W, G


def test_registered():
    assert get_optimizer_class("spectral_ord") is SpectralORD and OPTIMIZERS["spectral_ord"] is SpectralORD


@pytest.mark.parametrize("options", [dict(spectral_lr_mul=0.0, decompose=False), dict(spectral_lr_mul=0.0)],
                         ids=["explicit", "default_decompose"])
def test_alpha_zero_without_decomposition_is_bit_identical_to_muon(options):
    grads = worker.rank_grads(worker.MATRIX_SHAPES, 0)
    muon, _ = worker.run_scenario("muon", grads)  # lr 0.02, momentum 0.9, wd 0.1, two groups, 10 steps
    params = worker.make_params(worker.MATRIX_SHAPES)
    opt = SpectralORD(worker.matrix_groups(params), lr=0.02, momentum=0.9, weight_decay=0.1, **options)
    for step in range(worker.STEPS):
        set_grads(params, grads(step))
        opt.step()
    for p, m in zip(params, muon):
        assert torch.equal(p.detach(), m)
    # and the decomposition does change the trajectory (the identity above is not vacuous)
    decomposed, _ = worker.run_scenario("ord_decomp", grads)
    assert not torch.allclose(decomposed[0], muon[0])


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (2, 6, 10)], ids=["tall", "wide", "stack3d"])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_decomposed_update_matches_independent_float64(shape, alpha):
    W, G = random_pair(shape, seed=5, radial=0.3)
    rho, G_par, G_perp = reference_parts(W, G)
    U, _ = ord_step(W, G, spectral_lr_mul=alpha, decompose=True)
    torch.testing.assert_close(U, msign64(G_perp) + alpha * G_par, rtol=0, atol=1e-5)
    # the G_perp the optimizer orthogonalises is orthogonal to W (per matrix)
    seen = []
    spectral_ord_direction(G, W, lambda X: seen.append(X) or X, alpha, decompose=True)
    inner = frob(seen[0], W) / (frob(seen[0], seen[0]).sqrt() * frob(W, W).sqrt())
    assert inner.abs().max() < 1e-12
    torch.testing.assert_close(seen[0], G_perp, rtol=1e-12, atol=1e-12)


def test_decomposition_off_with_alpha_adds_radial_term_to_polar_of_g():
    W, G = random_pair((6, 9), seed=6, radial=0.5)
    _, G_par, _ = reference_parts(W, G)
    U, _ = ord_step(W, G, spectral_lr_mul=0.5, decompose=False)
    torch.testing.assert_close(U, msign64(G) + 0.5 * G_par, rtol=0, atol=1e-5)


def test_reprojection_removes_the_polar_component_along_w():
    W, G = random_pair((8, 12), seed=7, radial=0.3)
    _, G_par, G_perp = reference_parts(W, G)
    P = msign64(G_perp)
    P_reproj = P - frob(P, W) / frob(W, W) * W
    U, _ = ord_step(W, G, spectral_lr_mul=1.0, decompose=True, reproject=True)
    torch.testing.assert_close(U, P_reproj + G_par, rtol=0, atol=1e-5)
    # re-projection was not a no-op: Polar(G_perp) has a W-component
    assert (frob(P, W) / (frob(P, P) * frob(W, W)).sqrt()).abs().item() > 1e-3


def test_matched_scale_gives_the_radial_term_its_share_of_the_gradient():
    W, G = random_pair((8, 12), seed=8, radial=0.4)
    _, G_par, G_perp = reference_parts(W, G)
    P = msign64(G_perp)
    alpha = 2.0
    U, _ = ord_step(W, G, spectral_lr_mul=alpha, decompose=True, scale_mode="matched")
    radial = U - P  # the radial term as applied
    torch.testing.assert_close(radial, alpha * P.norm() / G.norm() * G_par, rtol=0, atol=1e-5)
    assert math.isclose(radial.norm() / P.norm(), alpha * G_par.norm() / G.norm(), rel_tol=1e-4)


def test_zero_weights_give_rho_zero_and_plain_polar():
    W = torch.zeros(6, 9, dtype=torch.float64)  # zero-initialised output projection
    G = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    U, opt = ord_step(W, G, spectral_lr_mul=1.0, decompose=True, diagnostics_every=1)
    torch.testing.assert_close(U, msign64(G), rtol=0, atol=1e-5)
    record = opt.diagnostics[0]["matrices"][0]
    assert record["rho"] == 0.0 and record["spectral_frac"] == 0.0 and record["cos_polar_w"] == 0.0


def test_state_dict_round_trip():
    grads = worker.rank_grads(worker.MATRIX_SHAPES, 0)
    a = worker.make_params(worker.MATRIX_SHAPES)

    def make(params):
        return SpectralORD(worker.matrix_groups(params), lr=0.02, momentum=0.9, weight_decay=0.1,
                           spectral_lr_mul=0.5, decompose=True, scale_mode="matched", reproject=True)
    opt_a = make(a)
    for step in range(3):
        set_grads(a, grads(step))
        opt_a.step()
    b = params_like([p.detach() for p in a])
    opt_b = make(b)
    opt_b.load_state_dict(save_and_load(opt_a.state_dict()))
    assert opt_b.param_groups[0]["step"] == 3
    for step in range(3, 6):
        for params, opt in ((a, opt_a), (b, opt_b)):
            set_grads(params, grads(step))
            opt.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def test_diagnostics_file_and_values(tmp_path):
    path = tmp_path / "diag" / "ord.jsonl"
    W0, G0 = random_pair((2, 6, 10), seed=10, radial=0.2)
    W1, G1 = random_pair((12, 8), seed=11, radial=-0.1)
    params = params_like([W0, W1])
    opt = SpectralORD(params, lr=0.01, momentum=0.0, spectral_lr_mul=0.5, decompose=True,
                      diagnostics_every=2, diagnostics_path=str(path), param_names=["attn", "mlp"])
    for _ in range(5):
        set_grads(params, [G0, G1])
        opt.step()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [entry["step"] for entry in lines] == [0, 2, 4] and lines == opt.diagnostics
    first = lines[0]["matrices"]
    assert [(r["name"], r.get("slice")) for r in first] == [("attn", 0), ("attn", 1), ("mlp", None)]
    for entry in lines:
        for record in entry["matrices"]:
            assert all(math.isfinite(v) for k, v in record.items() if k not in ("name", "radial_snr", "slice"))
            assert record["radial_snr"] is None  # one process: no replicates
    # step 0 values against the float64 closed forms
    for record, W, G in [(first[0], W0[0], G0[0]), (first[1], W0[1], G0[1]), (first[2], W1, G1)]:
        rho, G_par, G_perp = reference_parts(W, G)
        P = msign64(G_perp)
        expected = dict(rho=rho.item(), spectral_frac=(G_par.norm() / G.norm()).item(),
                        term_ratio=(0.5 * G_par.norm() / P.norm()).item(),
                        cos_polar_w=(frob(P, W) / (P.norm() * W.norm())).item(),
                        g_norm=G.norm().item(), w_norm=W.norm().item())
        for key, value in expected.items():
            assert math.isclose(record[key], value, rel_tol=1e-4, abs_tol=1e-6), (key, record[key], value)


def test_rolled_back_warmup_steps_leave_no_diagnostics(tmp_path):
    path = tmp_path / "ord.jsonl"
    path.write_text('{"step": -1, "matrices": []}\n')  # an earlier run's line (resume appends): kept
    W, G = random_pair((6, 9), seed=12, radial=0.2)
    params = params_like([W])
    opt = SpectralORD(params, lr=0.01, spectral_lr_mul=1.0, diagnostics_every=1, diagnostics_path=str(path))
    saved = copy.deepcopy(opt.state_dict())  # as train_gpt does around its untimed warm-up
    for _ in range(3):
        set_grads(params, [G])
        opt.step()
    assert len(path.read_text().splitlines()) == 4
    opt.load_state_dict(saved)
    assert opt.diagnostics == [] and path.read_text().splitlines() == ['{"step": -1, "matrices": []}']
    for _ in range(2):
        set_grads(params, [G])
        opt.step()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [-1, 0, 1]


@pytest.mark.parametrize("bad, message", [
    (dict(scale_mode="unit"), "scale_mode"), (dict(decompose="yes"), "decompose"),
    (dict(diagnostics_path="x.jsonl"), "diagnostics_every"), (dict(diagnostics_every=-1), "diagnostics_every"),
    (dict(param_names=["a", "b"]), "param_names"), (dict(spectral_lr_mul=float("nan")), "spectral_lr_mul"),
])
def test_rejects_bad_options(bad, message):
    with pytest.raises(ValueError, match=message):
        SpectralORD([torch.nn.Parameter(torch.randn(3, 3))], **bad)


# ---- 2-process gloo ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist_ord"))
    return out_dir, run_torchrun(out_dir, ["muon", "ord0", "ord_decomp", "ord_matched"])


@pytest.mark.slow
def test_two_ranks_alpha_zero_is_bit_identical_to_muon(two_rank_run):
    _, ranks = two_rank_run
    for result in ranks:
        for p, m in zip(result["ord0"], result["muon"]):
            assert torch.equal(p, m)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["ord_decomp", "ord_matched"])
def test_two_ranks_match_single_process(two_rank_run, scenario):
    _, (rank0, rank1) = two_rank_run
    reference, _ = worker.run_scenario(scenario, worker.averaged_grads(worker.MATRIX_SHAPES, 2))
    for p0, p1, ref in zip(rank0[scenario], rank1[scenario], reference):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_ranks_diagnostics_file(two_rank_run):
    out_dir, _ = two_rank_run
    with open(os.path.join(out_dir, "diagnostics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    _, single = worker.run_scenario("ord_decomp", worker.averaged_grads(worker.MATRIX_SHAPES, 2))
    assert [e["step"] for e in lines] == [e["step"] for e in single.diagnostics] == [0, 3, 6, 9]
    # 6 matrices + a (2, 6, 10) stack = 8 records per step, from both owners, matching one process
    for entry, ref in zip(lines, single.diagnostics):
        assert len(entry["matrices"]) == 8
        for record, ref_record in zip(entry["matrices"], ref["matrices"]):
            assert record["name"] == ref_record["name"]
            for key in ("rho", "spectral_frac", "term_ratio", "cos_polar_w", "g_norm", "w_norm"):
                assert math.isclose(record[key], ref_record[key], rel_tol=1e-4, abs_tol=1e-6), key
    # radial SNR at step 0 from the two ranks' raw gradients: mean(rho_k)^2 / (var(rho_k) / K)
    W = worker.make_params(worker.MATRIX_SHAPES)
    G = [worker.rank_grads(worker.MATRIX_SHAPES, r)(0) for r in range(2)]
    for record in lines[0]["matrices"]:
        i, s = int(record["name"][1:]), record.get("slice")  # name m<i> is worker param i
        w = W[i].detach().double() if s is None else W[i].detach().double()[s]
        rho_k = torch.tensor([(frob(g[i].double() if s is None else g[i].double()[s], w) / frob(w, w)).item()
                              for g in G], dtype=torch.float64)
        expected = (rho_k.mean() ** 2 / (rho_k.var() / 2)).item()
        assert math.isclose(record["radial_snr"], expected, rel_tol=1e-3), (record["name"], record["radial_snr"])


# ---- radial brake ---------------------------------------------------------------------------------------------
def brake_reference(W, D, decay, outward, inward):
    """Float64, per matrix: the step decay W + D with its radial part scaled by k, then the norm set to
    decay ||W|| + k r ||W|| (r = <D, W> / ||W||^2, k = outward if r > 0 else inward)."""
    r = frob(D, W) / frob(W, W)
    k = torch.where(r > 0, torch.full_like(r, outward), torch.full_like(r, inward))
    moved = decay * W + D + (k - 1) * r * W
    norm_w = frob(W, W).sqrt()
    return moved * (decay * norm_w + k * r * norm_w) / frob(moved, moved).sqrt()


def braked_and_plain(W, G, lr=0.3, weight_decay=0.1, **brake):
    """One step of SpectralORD (Muon's direction, momentum 0) with and without the brake; float64 weights."""
    out = []
    for options in (brake, {}):
        (p,) = params = params_like([W])
        opt = SpectralORD(params, lr=lr, momentum=0.0, weight_decay=weight_decay, **options)
        set_grads(params, [G])
        opt.step()
        out.append(p.detach())
    return out


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (2, 6, 10)], ids=["tall", "wide", "stack3d"])
@pytest.mark.parametrize("radial", [-3.0, 3.0], ids=["outward", "inward"])
@pytest.mark.parametrize("outward, inward", [(0.5, 1.0), (0.0, 0.25)])
def test_radial_brake_matches_float64_reference(shape, radial, outward, inward):
    """The braked step equals the float64 reference applied to the unbraked step D = W_plain - decay W; a
    gradient along -W makes Muon's step outward, along +W inward."""
    W, G = random_pair(shape, seed=9, radial=radial)
    decay = 1 - 0.3 * 0.1
    braked, plain = braked_and_plain(W, G, brake_outward=outward, brake_inward=inward)
    D = plain - decay * W
    r = frob(D, W) / frob(W, W)
    assert bool((r > 0).all()) == (radial < 0)  # the case is the intended one for every matrix
    torch.testing.assert_close(braked, brake_reference(W, D, decay, outward, inward), rtol=0, atol=1e-12)
    # the norm moves by k times the radial part of the plain step: growth halved, shrinkage kept (or scaled)
    k = outward if radial < 0 else inward
    norm = frob(braked, braked).sqrt()
    torch.testing.assert_close(norm, frob(W, W).sqrt() * (decay + k * r), rtol=1e-12, atol=0)


def test_radial_brake_off_is_bit_identical_and_zero_weights_take_the_plain_step():
    W, G = random_pair((2, 6, 10), seed=3, radial=-1.0)
    braked, plain = braked_and_plain(W, G, brake_outward=1.0, brake_inward=1.0)
    assert torch.equal(braked, plain)
    W[1] = 0.0  # a zero-initialised projection has no radial direction
    braked, plain = braked_and_plain(W, G, brake_outward=0.5)
    torch.testing.assert_close(braked[1], plain[1], rtol=0, atol=1e-15)
    assert not torch.allclose(braked[0], plain[0])
    with pytest.raises(ValueError, match="brake_outward"):
        SpectralORD(params_like([W]), brake_outward=1.5)
