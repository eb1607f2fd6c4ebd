"""Distributed Adam (AdamW semantics) for embeddings, the head and scalars, plus an AdamW matrix optimizer.

Per parameter p with averaged gradient g, step t (1-based):
    p  <- p (1 - lr * weight_decay * weight_decay_mul)        (decoupled, as torch.optim.AdamW)
    m  <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
    p  <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
Distribution: with a process group, a parameter whose first dim is divisible by the world size is
reduce-scattered along dim 0 (each rank updates and keeps Adam state for its own rows, then the rows are
all-gathered); any other parameter (0-D scalars included) is all-reduced and updated identically on every rank.
All reductions are launched before the first update; every collective is waited on before step()
returns or raises. Gradients are averaged as SUM / world_size.
A parameter that requires grad but has no gradient on this rank contributes zeros.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from optimizers.distributed import PendingGather, PendingGrads, dist_info, grad_or_zeros, wait_for_all


def adam_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place on param, exp_avg, exp_avg_sq (all the same shape); step is 1-based."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def check_adam_hyperparameters(group: dict) -> None:
    if not group["lr"] >= 0:
        raise ValueError(f"lr must be >= 0, got {group['lr']}")
    betas = group["betas"]
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not group["eps"] >= 0:
        raise ValueError(f"eps must be >= 0, got {group['eps']}")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    if not group["weight_decay_mul"] >= 0:
        raise ValueError(f"weight_decay_mul must be >= 0, got {group['weight_decay_mul']}")


class DistAdam(torch.optim.Optimizer):
    """AdamW averaged over ranks; see the module docstring. Group keys: lr, betas, eps, weight_decay,
    weight_decay_mul (default 1.0)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.8, 0.95), eps: float = 1e-10,
                 weight_decay: float = 0.0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, weight_decay_mul=1.0)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("weight_decay_mul", 1.0)
        check_adam_hyperparameters(group)

    @staticmethod
    def _reduce(p: torch.Tensor, rank: int, world_size: int) -> tuple[slice | None, PendingGrads]:
        """Start averaging p's gradient. Returns (own row slice or None if replicated, pending grads)."""
        grad = grad_or_zeros(p)
        if world_size == 1:
            return None, PendingGrads(grad)
        if p.ndim >= 1 and p.shape[0] % world_size == 0:
            rows = p.shape[0] // world_size
            own = torch.empty((rows, *p.shape[1:]), dtype=grad.dtype, device=grad.device)
            sent = grad.contiguous()
            work = dist.reduce_scatter_tensor(own, sent, op=dist.ReduceOp.SUM, async_op=True)
            return slice(rank * rows, (rank + 1) * rows), PendingGrads(own, work, divisor=world_size, sent=sent)
        full = grad.clone()
        work = dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True)
        return None, PendingGrads(full, work, divisor=world_size)

    def _update(self, group: dict, p: torch.Tensor, target: torch.Tensor, grad: torch.Tensor) -> None:
        """One AdamW step on target (p, or this rank's rows of p) with the averaged grad; state lives under p."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(target)
            state["exp_avg_sq"] = torch.zeros_like(target)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adam_update(target, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
                    beta1, beta2, group["eps"], group["weight_decay"] * group["weight_decay_mul"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world_size = dist_info()
        reductions: list[tuple[dict, torch.Tensor, slice | None, PendingGrads]] = []
        gathers: list[PendingGather] = []
        try:
            for group in self.param_groups:  # launch every reduction before the first update
                for p in group["params"]:
                    if p.requires_grad:
                        reductions.append((group, p, *self._reduce(p, rank, world_size)))
            for group, p, rows, pending in reductions:
                grad = pending.wait()
                target = p if rows is None else p[rows].clone()  # own rows: updated, then all-gathered into p
                self._update(group, p, target, grad)
                if rows is not None:
                    gathers.append(PendingGather(dist.all_gather_into_tensor(p, target, async_op=True),
                                                 sent=target))
            for gather in gathers:
                gather.wait()
        except BaseException as error:
            wait_for_all([r[3].work for r in reductions] + [g.work for g in gathers], error)
            raise
        return loss


class AdamWMatrix(DistAdam):
    """AdamW for hidden matrices: the registry's "adamw" choice, the standard non-Muon baseline.

    Takes the common matrix-optimizer arguments: lr, weight_decay, and momentum, which is accepted and IGNORED
    (kept as a group key so a momentum schedule may write it; beta1 stays fixed). The betas are set with
    beta1/beta2 (floats, so they can be passed as optimizer args). Defaults: betas (0.9, 0.95), eps 1e-8.
    """

    def __init__(self, params, lr: float = 0.001, momentum: float | None = None, weight_decay: float = 0.0,
                 beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8):
        self._momentum = momentum  # unused by the update; see the class docstring
        super().__init__(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("momentum", self._momentum)
        super().add_param_group(param_group)
