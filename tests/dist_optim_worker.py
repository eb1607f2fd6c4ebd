"""Distributed optimizer check: every rank feeds its own gradients; each rank saves its final parameters.

    torchrun --standalone --nproc_per_node=2 tests/dist_optim_worker.py OUT_DIR SCENARIO [SCENARIO ...]

writes OUT_DIR/rank<r>.pt = {scenario: [final parameter tensors]} (and OUT_DIR/diagnostics.jsonl for the
spectral-ORD scenario with diagnostics). The tests import this file too and run the
same scenarios in one process on the rank-averaged gradients (`run_scenario(name, averaged_grads(2))`).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from optimizers import AdamWMatrix, DistAdam, Muon, NorMuon  # noqa: E402

# Bucket sizes 3, 2, 1 and 1: none is a multiple of 2 ranks; (5, 5) alone leaves rank 1 owning nothing.
MATRIX_SHAPES = [(8, 12), (8, 12), (12, 8), (8, 12), (12, 8), (2, 6, 10), (5, 5)]
# (6, 4), (4,) are sharded by rows over 2 ranks; (5, 3), (7,), () are all-reduced.
ADAM_SHAPES = [(6, 4), (5, 3), (7,), (), (4,)]
STEPS = 10
DIAGNOSTICS_EVERY = 3  # spectral-ORD diagnostics on steps 0, 3, 6, 9


def make_params(shapes: list[tuple], seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.5) for shape in shapes]


def rank_grads(shapes: list[tuple], rank: int):
    """Gradient function (step -> list of tensors) for one rank: different on each rank and step."""
    def grads(step: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(10_000 * step + rank + 1)
        return [torch.randn(shape, generator=gen) for shape in shapes]
    return grads


def averaged_grads(shapes: list[tuple], world_size: int):
    """Gradient function giving the mean over ranks, summed then divided as the optimizers do."""
    per_rank = [rank_grads(shapes, r) for r in range(world_size)]

    def grads(step: int) -> list[torch.Tensor]:
        total = [sum(parts) for parts in zip(*(g(step) for g in per_rank))]
        return [t / world_size for t in total]
    return grads


def matrix_groups(params: list[torch.nn.Parameter], **hyper) -> list[dict]:
    """Two groups that share shapes, with different lr and weight-decay multiplier."""
    return [dict(params=params[:4] + params[5:6], **hyper),
            dict(params=[params[4], params[6]], lr=0.01, weight_decay_mul=2.0)]


def build(name: str, params: list[torch.nn.Parameter],
          diagnostics_path: str | None = None) -> torch.optim.Optimizer:
    if name == "muon":
        return Muon(matrix_groups(params), lr=0.02, momentum=0.9, weight_decay=0.1)
    if name == "muon_plain":  # no Nesterov, two groups
        return Muon(matrix_groups(params), lr=0.02, momentum=0.8, nesterov=False, weight_decay=0.1)
    if name == "adam":
        return DistAdam([dict(params=params[:3]), dict(params=params[3:], lr=0.02, weight_decay_mul=0.5)],
                        lr=0.01, weight_decay=0.1)
    if name == "adam_cautious_every2":  # record 18's Adam: cautious decay, a step on every second call
        return DistAdam([dict(params=params[:3], lr_mul=2.0), dict(params=params[3:], weight_decay_mul=3.0)],
                        lr=0.01, weight_decay=2.0, cautious_weight_decay=True, step_every=2)
    if name == "normuon":  # cautious decay, lr_mul, forced row normalisation in the second group
        groups = matrix_groups(params, lr_mul=2.0)
        groups[1]["neuron_axis"] = "rows"
        return NorMuon(groups, lr=0.02, momentum=0.9, beta2=0.9, weight_decay=2.0, cautious_weight_decay=True)
    if name == "muon_cautious":
        return Muon(matrix_groups(params, lr_mul=3.0), lr=0.02, momentum=0.9, weight_decay=2.0,
                    cautious_weight_decay=True, shape_scale="none")
    if name == "adamw_matrix":
        return AdamWMatrix(params, lr=0.01, momentum=0.95, weight_decay=0.1)
    if name.startswith("ord"):
        from optimizers.spectral_ord import SpectralORD
        options = {
            "ord0": dict(spectral_lr_mul=0.0, decompose=False),
            "ord_decomp": dict(spectral_lr_mul=0.5, decompose=True, diagnostics_every=DIAGNOSTICS_EVERY,
                               diagnostics_path=diagnostics_path),
            "ord_matched": dict(spectral_lr_mul=1.0, decompose=True, scale_mode="matched", reproject=True),
        }[name]
        groups = matrix_groups(params)
        position = {p: i for i, p in enumerate(params)}
        names = [f"m{position[p]}" for group in groups for p in group["params"]]  # m<i>: params[i]
        return SpectralORD(groups, lr=0.02, momentum=0.9, weight_decay=0.1, param_names=names, **options)
    raise ValueError(f"unknown scenario {name!r}")


def shapes_for(name: str) -> list[tuple]:
    return ADAM_SHAPES if name in ("adam", "adam_cautious_every2") else MATRIX_SHAPES


def run_scenario(name: str, grads_fn, steps: int = STEPS, diagnostics_path: str | None = None):
    """Run `steps` optimizer steps from the seeded initial parameters; return (final parameters, optimizer)."""
    params = make_params(shapes_for(name))
    opt = build(name, params, diagnostics_path)
    for step in range(steps):
        for p, g in zip(params, grads_fn(step)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params], opt


# ---- overlap: a tiny model trained on micro-batches, reductions inside backward or in step() -------------
VOCAB, DIM, TOKENS = 16, 8, 12
MODEL_STEPS, MICRO_BATCHES = 6, 2
MODEL_SCENARIOS = {"model_overlap": True, "model_plain": False}  # name -> overlapped


class TinyLM(torch.nn.Module):
    """Embedding, gains, residual matrices and a head: every kind of parameter the optimizers shard differently.
    On 2 ranks: embed, head (16, 8) and gain (8,) are reduce-scattered by DistAdam; mix (0-D) and unused (3,)
    are all-reduced; unused never gets a gradient, so its hook never fires and step() reduces its zeros."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def param(*shape, scale=0.5):
            return torch.nn.Parameter(torch.randn(shape, generator=gen) * scale)
        self.embed, self.head = param(VOCAB, DIM), param(VOCAB, DIM)
        self.gain, self.mix, self.unused = param(DIM), param(), param(3)
        self.mids = torch.nn.ParameterList([param(DIM, DIM), param(DIM, DIM)])
        self.up, self.down = param(2 * DIM, DIM), param(DIM, 2 * DIM)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed[tokens] * self.gain  # (T, DIM)
        for w in self.mids:
            x = x + torch.relu(x @ w.T)
        x = x + torch.relu(x @ self.up.T) @ self.down.T * torch.sigmoid(self.mix)
        logits = x @ self.head.T  # (T, VOCAB)
        return torch.nn.functional.cross_entropy(logits[:-1], tokens[1:])


def model_optimizers(model: TinyLM) -> tuple[DistAdam, Muon]:
    """Record-18-like split: Adam with step_every=2 and cautious decay on embed/head, every call on the rest."""
    adam = DistAdam([dict(params=[model.embed, model.head], step_every=2, cautious_weight_decay=True,
                          weight_decay=2.0),
                     dict(params=[model.gain, model.mix, model.unused], lr=0.02)],
                    lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.05)
    matrix = Muon([*model.mids, model.up, model.down], lr=0.02, momentum=0.9, weight_decay=0.1)
    return adam, matrix


def model_batch(step: int, rank: int, micro: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randint(0, VOCAB, (TOKENS,), generator=gen)


def run_model_scenario(overlapped: bool, batch_ids: list[tuple[int, int]], world_size: int = 1) -> dict:
    """MODEL_STEPS steps on the micro-batches batch_ids = [(rank, micro), ...] of this process. Overlapped:
    DistAdam reduces inside the last micro-batch's backward and Muon launches its reductions right after
    backward, before Adam's step. Returns final params, per-step rank-mean losses and, per step, how many Adam
    reductions the hooks had started before step() (0 when not overlapped)."""
    from train_log import DeviceLosses

    model = TinyLM()
    adam, matrix = model_optimizers(model)
    if overlapped:
        adam.register_grad_hooks()
    losses = DeviceLosses(MODEL_STEPS, "cpu", world_size)
    started_in_backward = []
    for step in range(MODEL_STEPS):
        total = torch.zeros(())
        for i, (rank, micro) in enumerate(batch_ids):
            if overlapped and i == len(batch_ids) - 1:
                adam.arm_grad_hooks()
            loss = model(model_batch(step, rank, micro))
            (loss / len(batch_ids)).backward()
            total += loss.detach()
        started_in_backward.append(adam.reductions_in_flight())
        if overlapped:
            matrix.launch_reductions()
        adam.step()
        matrix.step()
        model.zero_grad(set_to_none=True)
        losses.record(total / len(batch_ids))
    return dict(params=[p.detach().clone() for p in model.parameters()], losses=torch.tensor(losses.read()),
                started_in_backward=started_in_backward)


def main() -> None:
    out_dir, scenarios = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        diagnostics_path = os.path.join(out_dir, "diagnostics.jsonl")
        own_batches = [(rank, micro) for micro in range(MICRO_BATCHES)]
        results = {name: run_model_scenario(MODEL_SCENARIOS[name], own_batches, world_size)
                   if name in MODEL_SCENARIOS else
                   run_scenario(name, rank_grads(shapes_for(name), rank), diagnostics_path=diagnostics_path)[0]
                   for name in scenarios}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
