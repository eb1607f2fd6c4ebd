"""NorMuon: its per-neuron normalisation against a float64 reference written from the record-18 formula, the
bit-identity with Muon when the normalisation is off, argument checks. (State round trip and 2-process parity:
tests/test_optimizers.py.)"""
from __future__ import annotations

import pytest
import torch

from kernels.polar_express import msign_reference
from optimizers import Muon, NorMuon, get_optimizer_class


def params_like(tensors):
    return [torch.nn.Parameter(t.clone()) for t in tensors]


def normuon_reference(W0, grads, lr, mu, beta2, weight_decay, step_mul, cautious, neuron_axis="auto"):
    """Float64 NorMuon, one matrix at a time with explicit per-neuron vectors. Returns (W, v per matrix, masks)."""
    W = W0.clone()
    buf = torch.zeros_like(W0)
    rows, cols = W0.shape[-2:]
    per_row = neuron_axis == "rows" or (neuron_axis == "auto" and rows >= cols)
    n_mats = W0.reshape(-1, rows, cols).shape[0]
    v = [torch.zeros(rows if per_row else cols, dtype=torch.float64) for _ in range(n_mats)]
    masks = []
    for g in grads:
        buf = mu * buf + (1 - mu) * g
        O = msign_reference((1 - mu) * g + mu * buf, 5, compute_dtype=torch.float64).reshape(-1, rows, cols)
        U = torch.empty_like(O)
        for k in range(n_mats):
            mean_sq = (O[k] ** 2).mean(dim=1 if per_row else 0)  # one entry per neuron
            v[k] = beta2 * v[k] + (1 - beta2) * mean_sq
            inv = 1 / torch.sqrt(torch.clamp(v[k], min=1e-10))
            Z = O[k] * (inv[:, None] if per_row else inv[None, :])
            U[k] = Z * (torch.linalg.norm(O[k]) / torch.linalg.norm(Z))
        U = U.reshape(W.shape)
        if cautious:
            mask = (U * W >= 0).double()
            masks.append(mask)
            W = W - weight_decay * lr * (lr * step_mul) * mask * W - lr * step_mul * U
        else:
            W = W * (1 - lr * weight_decay) - lr * step_mul * U
    return W, v, masks


CASES = {  # name: (shape, options)
    "tall": ((12, 8), dict()),
    "wide": ((8, 12), dict()),
    "stack3d": ((3, 6, 10), dict()),  # each (6, 10) matrix separately: per-column moments
    "square_stack": ((4, 8, 8), dict(cautious_weight_decay=True, shape_scale="none", lr_mul=2.0)),  # a QKVO stack
    "tall_cautious": ((12, 8), dict(cautious_weight_decay=True)),
    "gate_rows": ((4, 16), dict(neuron_axis="rows", cautious_weight_decay=True, lr_mul=0.1)),
    "wide_cols": ((12, 8), dict(neuron_axis="cols")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_normuon_matches_float64_reference(case):
    shape, options = CASES[case]
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    lr, mu, beta2, wd = 0.05, 0.9, 0.8, 3.0
    options = dict(options)
    lr_mul = options.pop("lr_mul", 1.0)
    cautious = options.get("cautious_weight_decay", False)
    shape_factor = max(1.0, shape[-2] / shape[-1]) ** 0.5 if options.get("shape_scale", "muon") == "muon" else 1.0
    (p,) = params = params_like([W0])
    opt = NorMuon([dict(params=params, lr_mul=lr_mul)], lr=lr, momentum=mu, beta2=beta2, weight_decay=wd, **options)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    W_ref, v_ref, masks = normuon_reference(W0, grads, lr, mu, beta2, wd, lr_mul * shape_factor, cautious,
                                            options.get("neuron_axis", "auto"))
    torch.testing.assert_close(p.detach(), W_ref, rtol=0, atol=2e-5)  # msign runs in float32 on CPU
    moment = opt.state[p]["second_moment"]
    assert moment.dtype == torch.float64 and moment.shape[-1] * moment.shape[-2] == v_ref[0].numel()
    torch.testing.assert_close(moment.reshape(len(v_ref), -1), torch.stack(v_ref), rtol=1e-4, atol=0)
    for mask in masks:  # the sign-agreement mask is a real selection, not all or nothing
        assert 0.2 < mask.mean() < 0.8


def test_normalisation_makes_neuron_norms_follow_the_second_moment():
    # one step from zero state: v = (1 - beta2) r, so every row of U has the same norm (sqrt of the mean)
    gen = torch.Generator().manual_seed(1)
    (p,) = params = params_like([torch.zeros(16, 6)])
    p.grad = torch.randn(16, 6, generator=gen) * torch.linspace(0.1, 3.0, 16)[:, None]  # rows of unequal scale
    opt = NorMuon(params, lr=1.0, momentum=0.0, beta2=0.95)
    opt.step()
    U = -p.detach()  # W0 = 0, no decay, shape factor (16/6)^0.5
    row_norms = U.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.full_like(row_norms, row_norms.mean().item()), rtol=1e-5, atol=0)
    O_norm = torch.linalg.norm(msign_reference(p.grad, 5))  # ||U||_F == ||O||_F * shape factor
    torch.testing.assert_close(U.norm(), O_norm * (16 / 6) ** 0.5, rtol=1e-5, atol=0)


@pytest.mark.parametrize("cautious", [False, True], ids=["plain_decay", "cautious_decay"])
def test_normuon_without_normalisation_is_muon_bit_for_bit(cautious):
    gen = torch.Generator().manual_seed(2)
    shapes = [(12, 8), (8, 12), (2, 6, 10), (12, 8)]
    W = [torch.randn(s, generator=gen) for s in shapes]
    ours, ref = params_like(W), params_like(W)

    def groups(ps):
        return [dict(params=ps[:3], lr_mul=2.0), dict(params=ps[3:], lr=0.01, weight_decay_mul=2.0)]
    hyper = dict(lr=0.02, momentum=0.9, weight_decay=0.5, cautious_weight_decay=cautious)
    opt = NorMuon(groups(ours), normalize=False, **hyper)
    ref_opt = Muon(groups(ref), **hyper)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for params, o in ((ours, opt), (ref, ref_opt)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"])
        assert "second_moment" not in opt.state[a]


def test_zero_gradient_gives_a_finite_zero_update():
    W = torch.randn(5, 7)
    (p,) = params = params_like([W])
    opt = NorMuon(params, lr=0.1)
    opt.step()  # p.grad is None: a zero gradient, msign(0) = 0
    assert torch.equal(p.detach(), W) and torch.isfinite(opt.state[p]["second_moment"]).all()


@pytest.mark.parametrize("bad, message", [
    (dict(beta2=1.0), "beta2"), (dict(beta2=-0.1), "beta2"), (dict(eps=-1e-8), "eps"), (dict(eps=float("nan")), "eps"),
    (dict(normalize="yes"), "normalize"), (dict(neuron_axis="diag"), "neuron_axis"), (dict(lr=-1.0), "lr"),
    (dict(shape_scale="record"), "shape_scale"), (dict(cautious_weight_decay=1), "cautious_weight_decay"),
])
def test_normuon_rejects_bad_hyperparameters(bad, message):
    with pytest.raises(ValueError, match=message):
        NorMuon([torch.nn.Parameter(torch.randn(3, 3))], **bad)


def test_registered_as_normuon():
    assert get_optimizer_class("normuon") is NorMuon
