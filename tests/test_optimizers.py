"""Muon, DistAdam and the shared sharded base: maths against hand computations, torch.optim.AdamW parity,
state_dict resume, and 2-process gloo runs against a single process on the averaged gradients."""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys

import pytest
import torch

from kernels.polar_express import msign_reference
from optimizers import OPTIMIZERS, AdamWMatrix, DistAdam, Muon, NorMuon, ShardedMatrixOptimizer, get_optimizer_class

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS_DIR, "dist_optim_worker.py")


def load_worker():
    spec = importlib.util.spec_from_file_location("dist_optim_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_torchrun(out_dir: str, scenarios: list[str], nproc: int = 2) -> list[dict]:
    """Launch the worker on `nproc` gloo ranks; return each rank's {scenario: final params}."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           WORKER, out_dir, *scenarios]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(nproc)]


def params_like(tensors):
    return [torch.nn.Parameter(t.clone()) for t in tensors]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def save_and_load(state_dict: dict) -> dict:
    """A state_dict as a checkpoint file would return it (no tensors shared with the live optimizer)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def msign64(G):
    return msign_reference(G, 5, compute_dtype=torch.float64)


# ---- Muon ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (2, 6, 10)], ids=["tall", "wide", "stack3d"])
def test_muon_two_steps_match_hand_computation(shape):
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    g1, g2 = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    lr, mu, wd = 0.05, 0.9, 0.3
    (p,) = params = params_like([W0])
    opt = Muon(params, lr=lr, momentum=mu, weight_decay=wd)
    scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
    # hand computation: buf_t = mu buf_{t-1} + (1 - mu) g_t; nesterov g_eff = (1 - mu) g_t + mu buf_t
    buf1 = (1 - mu) * g1
    W1 = W0 * (1 - lr * wd) - lr * scale * msign64((1 - mu) * g1 + mu * buf1)
    buf2 = mu * buf1 + (1 - mu) * g2
    W2 = W1 * (1 - lr * wd) - lr * scale * msign64((1 - mu) * g2 + mu * buf2)
    set_grads(params, [g1])
    opt.step()
    torch.testing.assert_close(p.detach(), W1, rtol=0, atol=2e-6)  # msign runs in float32 on CPU
    set_grads(params, [g2])
    opt.step()
    torch.testing.assert_close(p.detach(), W2, rtol=0, atol=4e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf2, rtol=1e-12, atol=1e-12)


def test_muon_without_nesterov_uses_the_buffer():
    gen = torch.Generator().manual_seed(1)
    W0, g = torch.randn(6, 9, generator=gen, dtype=torch.float64), torch.randn(6, 9, generator=gen, dtype=torch.float64)
    (p,) = params = params_like([W0])
    opt = Muon(params, lr=0.1, momentum=0.5, nesterov=False)
    set_grads(params, [g])
    opt.step()
    torch.testing.assert_close(p.detach(), W0 - 0.1 * msign64(0.5 * g), rtol=0, atol=2e-6)


def test_orientations_and_3d_stacks_are_orthogonalised_per_matrix():
    gen = torch.Generator().manual_seed(2)
    G = torch.randn(2, 6, 10, generator=gen)
    W = torch.randn(2, 6, 10, generator=gen)
    # tall == sqrt(M/N) * transpose of wide; a (2, 6, 10) stack == two separate (6, 10) matrices
    tall, wide, stack, a, b = params = params_like([W[0].mT, W[0], W, W[0], W[1]])
    set_grads(params, [G[0].mT, G[0], G, G[0], G[1]])
    Muon(params, lr=0.1, momentum=0.0).step()
    step_tall, step_wide = (W[0].mT - tall.detach()), (W[0] - wide.detach())
    torch.testing.assert_close(step_tall, (10 / 6) ** 0.5 * step_wide.mT, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stack.detach(), torch.stack([a.detach(), b.detach()]), rtol=1e-5, atol=1e-6)
    # the step is orthogonal-ish: singular values of O = step / lr near 1 (Polar Express, 5 steps)
    sv = torch.linalg.svdvals(step_wide.double() / 0.1)
    assert sv.min() > 0.6 and sv.max() < 1.3, sv


def test_weight_decay_multipliers_per_group():
    gen = torch.Generator().manual_seed(3)
    W = [torch.randn(4, 5, generator=gen) for _ in range(3)]
    params = params_like(W)
    opt = Muon([dict(params=params[:2]), dict(params=params[2:], weight_decay_mul=2.5, lr=0.2)],
               lr=0.1, weight_decay=0.3)
    set_grads(params, [torch.zeros(4, 5)] * 3)  # zero gradient: the step is pure decoupled decay
    opt.step()
    for p, w0, lr, mul in zip(params, W, [0.1, 0.1, 0.2], [1.0, 1.0, 2.5]):
        torch.testing.assert_close(p.detach(), w0 * (1 - lr * 0.3 * mul), rtol=1e-6, atol=0)


def test_missing_grad_counts_as_zero_and_frozen_params_are_left_alone():
    W = torch.randn(4, 5)
    p, frozen = params_like([W, W])
    frozen.requires_grad_(False)
    opt = Muon([p, frozen], lr=0.1, weight_decay=0.5)
    opt.step()  # p.grad is None
    torch.testing.assert_close(p.detach(), W * 0.95)
    assert torch.equal(frozen, W) and frozen not in opt.state


# ---- sharded base: per-matrix lr multipliers and cautious weight decay ----------------------------------
class GradientDirection(ShardedMatrixOptimizer):
    """U = the averaged gradient itself: the base's decay and step rules on an exactly known direction."""

    def compute_update(self, group, owned, W, grads, states):
        return grads.to(W.dtype)


def test_cautious_weight_decay_matches_float64_reference():
    gen = torch.Generator().manual_seed(5)
    shapes = [(12, 8), (8, 12), (2, 6, 10)]
    W = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params = params_like(W)
    groups = [dict(params=params[:2], lr_mul=2.0), dict(params=params[2:], lr=0.2, weight_decay_mul=3.0,
                                                        shape_scale="none")]
    opt = GradientDirection(groups, dict(lr=0.1, weight_decay=4.0, cautious_weight_decay=True))
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads[0][0] = 0.0  # a zero update counts as agreeing in sign (mask U * W >= 0): row 0 is decayed
    set_grads(params, grads)
    opt.step()
    for p, w0, g, lr, wd_mul, shape_mul in zip(params, W, grads, [0.1, 0.1, 0.2], [1.0, 1.0, 3.0],
                                               [2.0 * 1.5 ** 0.5, 2.0, 1.0]):
        step_lr = lr * shape_mul  # lr * lr_mul * max(1, M/N)^0.5 (shape_scale "muon"), or lr alone ("none")
        mask = (g * w0 >= 0).double()
        expected = w0 - (lr * 4.0 * wd_mul) * step_lr * mask * w0 - step_lr * g
        torch.testing.assert_close(p.detach(), expected, rtol=1e-13, atol=1e-15)
        assert 0.2 < mask.mean() < 0.8
    decayed_row = W[0][0] * (1 - 0.1 * 4.0 * 0.1 * 2.0 * 1.5 ** 0.5)
    torch.testing.assert_close(params[0].detach()[0], decayed_row, rtol=1e-15, atol=0)


def test_lr_mul_and_shape_scale():
    gen = torch.Generator().manual_seed(6)
    W, g = torch.randn(16, 4, generator=gen), torch.randn(16, 4, generator=gen)
    a, b, c = params = params_like([W, W, W])
    set_grads(params, [g, g, g])
    opt = Muon([dict(params=[a]), dict(params=[b], lr_mul=2.0, shape_scale="none"), dict(params=[c], lr_mul=3.0)],
               lr=0.1, momentum=0.0, weight_decay=0.2)
    opt.step()
    # (16, 4): the Muon shape factor is 2, so lr_mul 2 without it is the same step, bit for bit
    assert torch.equal(a, b)
    torch.testing.assert_close(W * (1 - 0.02) - c.detach(), 3 * (W * (1 - 0.02) - a.detach()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(lr_mul=-1.0), "lr_mul"), (dict(shape_scale="record18"), "shape_scale"),
    (dict(cautious_weight_decay="true"), "cautious_weight_decay"),
])
def test_sharded_base_rejects_bad_group_keys(bad, message):
    with pytest.raises(ValueError, match=message):
        Muon([dict(params=[torch.nn.Parameter(torch.randn(3, 3))], **bad)])


@pytest.mark.parametrize("make", [
    lambda ps: Muon(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
    lambda ps: DistAdam(ps, lr=0.01, weight_decay=0.1),
    lambda ps: AdamWMatrix(ps, lr=0.01, momentum=0.9, weight_decay=0.1),
    lambda ps: NorMuon([dict(params=ps[:3], lr_mul=2.0), dict(params=ps[3:], neuron_axis="rows")], lr=0.05,
                       momentum=0.9, weight_decay=2.0, cautious_weight_decay=True),
    # 3 steps end on a skipped call, so the checkpoint holds a gradient
    lambda ps: DistAdam(ps, lr=0.01, weight_decay=0.5, cautious_weight_decay=True, step_every=2),
    # torch.optim casts loaded state to the parameter's dtype; DistAdam casts m, v back to bf16
    lambda ps: DistAdam(ps, lr=0.01, weight_decay=0.1, state_dtype=torch.bfloat16),
], ids=["muon", "dist_adam", "adamw_matrix", "normuon", "dist_adam_every2", "dist_adam_bf16_state"])
def test_state_dict_round_trip(make):
    worker = load_worker()
    shapes = worker.MATRIX_SHAPES
    grads = worker.rank_grads(shapes, 0)
    a = worker.make_params(shapes)
    opt_a = make(a)
    for step in range(3):
        set_grads(a, grads(step))
        opt_a.step()
    b = params_like([p.detach() for p in a])
    opt_b = make(b)
    opt_b.load_state_dict(save_and_load(opt_a.state_dict()))
    for step in range(3, 6):
        for params, opt in ((a, opt_a), (b, opt_b)):
            set_grads(params, grads(step))
            opt.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("bad, message", [
    (dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(msign_steps=0), "msign_steps"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_muon_rejects_bad_hyperparameters(bad, message):
    with pytest.raises(ValueError, match=message):
        Muon([torch.nn.Parameter(torch.randn(3, 3))], **bad)


def test_muon_rejects_vectors_and_points_to_dist_adam():
    with pytest.raises(ValueError, match="DistAdam"):
        Muon([torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="betas"):
        DistAdam([torch.nn.Parameter(torch.randn(3))], lr=0.1, betas=(0.9, 1.0))


def test_registry():
    assert get_optimizer_class("muon") is Muon and get_optimizer_class("adamw") is AdamWMatrix
    with pytest.raises(ValueError, match="muon"):
        get_optimizer_class("sgd")
    assert all(issubclass(cls, torch.optim.Optimizer) for cls in OPTIMIZERS.values())


# ---- DistAdam --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, betas, eps", [
    (lambda ps: DistAdam(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1), (0.8, 0.95), 1e-10),
    (lambda ps: AdamWMatrix(ps, lr=0.01, momentum=0.5, weight_decay=0.1), (0.9, 0.95), 1e-8),
], ids=["dist_adam", "adamw_matrix"])
def test_dist_adam_matches_torch_adamw(make, betas, eps):
    gen = torch.Generator().manual_seed(4)
    shapes = [(6, 4), (7,), ()]
    W = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ours, ref = params_like(W), params_like(W)
    opt = make(ours)
    ref_opt = torch.optim.AdamW(ref, lr=0.01, betas=betas, eps=eps, weight_decay=0.1)
    for _ in range(5):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        set_grads(ours, grads)
        set_grads(ref, grads)
        opt.step()
        ref_opt.step()
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-12, atol=1e-14)


def adam_reference(p0, grads, lrs, betas, eps, weight_decay, cautious):
    """Float64 AdamW written out (eps inside the bias correction, as torch.optim.AdamW); optional cautious decay
    W -= lr^2 * weight_decay * [d * W > 0] * W (record 18's Adam form). grads[t], lrs[t]: active step t."""
    beta1, beta2 = betas
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        d = (m / (1 - beta1 ** t)) / (torch.sqrt(v / (1 - beta2 ** t)) + eps)
        if cautious:
            p = p - lr * weight_decay * lr * (d * p > 0).double() * p - lr * d
        else:
            p = p * (1 - lr * weight_decay) - lr * d
    return p


def test_dist_adam_cautious_weight_decay_matches_float64_reference():
    gen = torch.Generator().manual_seed(7)
    shapes = [(6, 4), (7,), ()]
    W = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params = params_like(W)
    opt = DistAdam([dict(params=params[:2], lr_mul=3.0), dict(params=params[2:], weight_decay_mul=2.0)],
                   lr=0.1, betas=(0.8, 0.95), eps=1e-8, weight_decay=5.0, cautious_weight_decay=True)
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(4)]
    for step_grads in grads:
        step_grads[0][1] = 0.0  # row 1 never gets a gradient: its update is 0 and (strict mask) it is not decayed
        set_grads(params, step_grads)
        opt.step()
    for i, (lr, wd) in enumerate([(0.3, 5.0), (0.3, 5.0), (0.1, 10.0)]):
        expected = adam_reference(W[i], [g[i] for g in grads], [lr] * 4, (0.8, 0.95), 1e-8, wd, cautious=True)
        torch.testing.assert_close(params[i].detach(), expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(params[0].detach()[1], W[0][1])
    plain = adam_reference(W[0], [g[0] for g in grads], [0.3] * 4, (0.8, 0.95), 1e-8, 5.0, cautious=False)
    assert not torch.allclose(plain, params[0].detach(), rtol=1e-3)  # the mask changed the result


def test_dist_adam_steps_every_second_call_on_the_summed_gradients():
    gen = torch.Generator().manual_seed(8)
    W = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    lrs = [0.5, 0.1, 0.7, 0.05]  # a schedule: the active call's lr is the one used
    (p,) = params = params_like([W])
    opt = DistAdam(params, lr=1.0, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.3, step_every=2)
    after = []
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        set_grads(params, [g])
        opt.step()
        after.append(p.detach().clone())
        if len(after) % 2 == 1:  # call 0, 2: skipped; the gradient moved off the parameter into the state
            assert p.grad is None and torch.equal(opt.state[p]["held_grad"], g)
        else:
            assert "held_grad" not in opt.state[p]
    # hand computation: t = 1 on g0 + g1 at lr 0.1, t = 2 on g2 + g3 at lr 0.05
    m1, v1 = 0.2 * (grads[0] + grads[1]), 0.05 * (grads[0] + grads[1]) ** 2
    W1 = W * (1 - 0.1 * 0.3) - 0.1 * (m1 / 0.2) / (torch.sqrt(v1 / 0.05) + 1e-8)
    g23 = grads[2] + grads[3]
    m2, v2 = 0.8 * m1 + 0.2 * g23, 0.95 * v1 + 0.05 * g23 ** 2
    W2 = W1 * (1 - 0.05 * 0.3) - 0.05 * (m2 / (1 - 0.8 ** 2)) / (torch.sqrt(v2 / (1 - 0.95 ** 2)) + 1e-8)
    assert torch.equal(after[0], W) and torch.equal(after[2], after[1])
    torch.testing.assert_close(after[1], W1, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(after[3], W2, rtol=1e-13, atol=1e-15)
    assert opt.state[p]["step"] == 2 and opt.param_groups[0]["step_calls"] == 4


@pytest.mark.parametrize("bad, message", [
    (dict(step_every=0), "step_every"), (dict(step_every=1.5), "step_every"),
    (dict(cautious_weight_decay=None), "cautious_weight_decay"),
])
def test_dist_adam_rejects_bad_options(bad, message):
    with pytest.raises(ValueError, match=message):
        DistAdam([torch.nn.Parameter(torch.randn(3))], lr=0.1, **bad)
    with pytest.raises(ValueError, match="lr_mul"):
        DistAdam([dict(params=[torch.nn.Parameter(torch.randn(3))], lr_mul=-2.0)], lr=0.1)


# ---- 2-process gloo vs single process on averaged gradients ----------------------------------------------
SCENARIOS = ["muon", "muon_plain", "adam", "adamw_matrix", "normuon", "muon_cautious", "adam_cautious_every2"]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    # one launch for every scenario: the optimizer scenarios and the tiny-model overlap runs
    return run_torchrun(str(tmp_path_factory.mktemp("dist_optim")), SCENARIOS + list(load_worker().MODEL_SCENARIOS))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks_match_single_process_on_averaged_grads(two_rank_results, scenario):
    worker = load_worker()
    reference, _ = worker.run_scenario(scenario, worker.averaged_grads(worker.shapes_for(scenario), 2))
    rank0, rank1 = (r[scenario] for r in two_rank_results)
    for p0, p1, ref in zip(rank0, rank1, reference):
        assert torch.equal(p0, p1), "ranks ended with different parameters"
        torch.testing.assert_close(p0, ref, rtol=1e-5, atol=1e-5)
    # the run moved the parameters (a no-op optimizer would also make the ranks agree)
    initial = worker.make_params(worker.shapes_for(scenario))
    assert all(not torch.allclose(p, w) for p, w in zip(rank0, initial))


# ---- overlap: DistAdam reduces inside backward, the matrix optimizer launches before Adam's step ----------
# Adam's embed/head group steps on calls 1, 3, 5 (step_every=2); on those steps the hooks of embed, head, gain
# and mix fire (unused never gets a gradient), on the others only gain and mix.
HOOKED_PER_STEP = [2, 4, 2, 4, 2, 4]


def test_overlap_at_world_size_1_is_bit_identical():
    worker = load_worker()
    batches = [(0, 0), (0, 1), (0, 2)]
    plain = worker.run_model_scenario(False, batches)
    overlapped = worker.run_model_scenario(True, batches)
    assert overlapped["started_in_backward"] == HOOKED_PER_STEP and plain["started_in_backward"] == [0] * 6
    assert torch.equal(plain["losses"], overlapped["losses"])
    for a, b in zip(plain["params"], overlapped["params"]):
        assert torch.equal(a, b)
    initial = list(worker.TinyLM().parameters())
    assert all(not torch.equal(p, w) for p, w in zip(plain["params"], initial))  # `unused`: weight decay alone
    assert plain["losses"][-1] < plain["losses"][0]


def test_matrix_launch_reductions_rules():
    a, b = params_like([torch.randn(6, 4), torch.randn(6, 4)])
    opt = Muon([a, b], lr=0.1)
    set_grads([a, b], [torch.randn(6, 4), torch.randn(6, 4)])
    opt.launch_reductions()
    with pytest.raises(RuntimeError, match="twice"):
        opt.launch_reductions()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: None)
    opt.step()  # consumes the launched reductions; a later step launches its own
    opt.step()
    assert opt.param_groups[0]["step"] == 2


def test_dist_adam_hooks_must_be_registered_and_armed_once_per_step():
    worker = load_worker()
    model = worker.TinyLM()
    adam, _ = worker.model_optimizers(model)
    with pytest.raises(RuntimeError, match="register_grad_hooks"):
        adam.arm_grad_hooks()
    adam.register_grad_hooks()
    adam.arm_grad_hooks()
    model(worker.model_batch(0, 0, 0)).backward()
    assert adam.reductions_in_flight() == 2  # gain and mix: the embed/head group skips this call
    with pytest.raises(RuntimeError, match="LAST micro-batch"):
        model(worker.model_batch(0, 0, 1)).backward()  # armed too early: a second backward re-fires the hooks
    adam.remove_grad_hooks()
    model.zero_grad(set_to_none=True)
    model(worker.model_batch(0, 0, 1)).backward()  # no hooks: nothing starts
    assert adam.reductions_in_flight() == 2


def test_dist_adam_hooks_a_parameter_once_it_trains():
    """An embedding frozen while tied to the head gets its hook when it starts to train (after the split)."""
    worker = load_worker()
    model = worker.TinyLM()
    model.embed.requires_grad_(False)
    adam, _ = worker.model_optimizers(model)
    adam.register_grad_hooks()
    for step in range(3):
        if step == 2:
            model.embed.requires_grad_(True)
        adam.arm_grad_hooks()
        model(worker.model_batch(step, 0, 0)).backward()
        # step 1: head, gain, mix (embed frozen); step 2: embed's group is skipped (step_every=2) -> gain, mix
        assert adam.reductions_in_flight() == [2, 3, 2][step]
        adam.step()
        model.zero_grad(set_to_none=True)
    adam.arm_grad_hooks()
    model(worker.model_batch(3, 0, 0)).backward()
    assert adam.reductions_in_flight() == 4  # embed, head, gain, mix


@pytest.mark.slow
def test_two_ranks_overlapped_equals_plain_and_single_process(two_rank_results):
    worker = load_worker()
    ranks = [{name: r[name] for name in worker.MODEL_SCENARIOS} for r in two_rank_results]
    for name in worker.MODEL_SCENARIOS:
        for p0, p1 in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
            assert torch.equal(p0, p1), f"{name}: ranks ended with different parameters"
        assert torch.equal(ranks[0][name]["losses"], ranks[1][name]["losses"])
    overlapped, plain = ranks[0]["model_overlap"], ranks[0]["model_plain"]
    assert overlapped["started_in_backward"] == HOOKED_PER_STEP and plain["started_in_backward"] == [0] * 6
    # the same reductions of the same tensors, started earlier: bit for bit the same run
    assert torch.equal(overlapped["losses"], plain["losses"])
    for a, b in zip(overlapped["params"], plain["params"]):
        assert torch.equal(a, b)
    # one process on both ranks' micro-batches: the same run up to float summation order
    single = worker.run_model_scenario(False, [(r, m) for r in range(2) for m in range(worker.MICRO_BATCHES)])
    torch.testing.assert_close(overlapped["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    for a, ref in zip(overlapped["params"], single["params"]):
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


# ---- bf16 storage and bf16 Adam state ----------------------------------------------------------------------
def rounded_adam_reference(p0, grads, lr, betas, eps, weight_decay, storage, state):
    """Float64 AdamW whose parameter is rounded to `storage` and m, v to `state` after every step: the exact
    semantics of DistAdam's narrow storage (wide arithmetic, one rounding per stored tensor per step)."""
    beta1, beta2 = betas
    p, m, v = p0.double(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        d = (m / (1 - beta1 ** t)) / (torch.sqrt(v / (1 - beta2 ** t)) + eps)
        p = (p * (1 - lr * weight_decay) - lr * d).to(storage).double()
        m, v = m.to(state).double(), v.to(state).double()
    return p


@pytest.mark.parametrize("storage, state_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, None),
                                                   (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32_param_bf16_state", "bf16_param", "bf16_param_bf16_state"])
def test_dist_adam_narrow_storage_matches_rounded_float64_reference(storage, state_dtype):
    gen = torch.Generator().manual_seed(9)
    W = torch.randn(6, 5, generator=gen).to(storage)
    grads = [torch.randn(6, 5, generator=gen).to(storage) for _ in range(6)]
    (p,) = params = [torch.nn.Parameter(W.clone())]
    opt = DistAdam(params, lr=0.05, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1, state_dtype=state_dtype)
    for g in grads:
        p.grad = g
        opt.step()
    state = state_dtype or storage
    assert p.dtype == storage and opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == state
    expected = rounded_adam_reference(W, grads, 0.05, (0.8, 0.95), 1e-8, 0.1, storage, state)
    # fp32 against float64 arithmetic: one ulp of a bf16 weight (a rounding the other way), or the fp32 error
    # of six steps of unit-sized arithmetic on an fp32 weight
    if storage == torch.bfloat16:
        tolerance = torch.finfo(storage).eps * expected.abs()
    else:
        tolerance = 8 * torch.finfo(storage).eps * expected.abs().clamp_min(1.0)
    assert ((p.detach().double() - expected).abs() <= tolerance).all()
    wide = rounded_adam_reference(W, grads, 0.05, (0.8, 0.95), 1e-8, 0.1, torch.float64, torch.float64)
    assert ((p.detach().double() - wide).abs() > tolerance).any()  # the check would notice a wide path


def test_dist_adam_rejects_other_state_dtypes():
    with pytest.raises(ValueError, match="state_dtype"):
        DistAdam([torch.nn.Parameter(torch.randn(3))], lr=0.01, state_dtype=torch.float16)


@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_matrix_optimizers_keep_bf16_storage(cls):
    """bf16 parameters (record 18's gates) stay bf16 with bf16 state and follow the fp32 run to bf16 precision."""
    gen = torch.Generator().manual_seed(10)
    W, G = torch.randn(3, 16, 8, generator=gen), torch.randn(3, 16, 8, generator=gen)
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(w.clone().to(dtype)) for w in W]
        opt = cls(params, lr=0.05, momentum=0.9, weight_decay=0.1)
        for _ in range(3):
            set_grads(params, [g.to(dtype) for g in G])
            opt.step()
        assert all(p.dtype == dtype and opt.state[p]["momentum_buffer"].dtype == dtype for p in params)
        moved[dtype] = torch.stack([p.detach().float() for p in params]) - W.to(dtype).float()
    # the displacement agrees up to the rounding of the stored weights (|W| < 4: bf16 ulp <= 2^-6 per step)
    assert (moved[torch.bfloat16] - moved[torch.float32]).abs().max() < 3 * 2 ** -5
    assert moved[torch.float32].abs().max() > 0.1
