"""Distributed Adam (AdamW semantics) for embeddings, the head and scalars, plus an AdamW matrix optimizer.

Per parameter p with averaged gradient g, step t (1-based, counting the steps that update p), lr = lr * lr_mul:
    m  <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
    d   = m / (1 - beta1^t) / (sqrt(v) / sqrt(1 - beta2^t) + eps)            (as torch.optim.AdamW)
  plain decay (default):
    p  <- p (1 - lr * weight_decay * weight_decay_mul);   p <- p - lr d
  cautious_weight_decay=True (record 18's Adam form; mask from p before the step, strictly positive product):
    p  <- p - (lr * weight_decay * weight_decay_mul) * lr * [d * p > 0] * p - lr d
    so cautious weight_decay is per lr^2: the record uses 0.005 (x150 for embed and head, x5 for value
    embeddings) with lr 0.004 (x75 for value embeddings) times the lr schedule. Rows whose update is exactly
    zero (embedding rows of tokens not yet seen) are not decayed, unlike plain decay.
  Record 18 places eps outside the v bias correction (d = m / (1 - beta1^t) / (sqrt(v) + eps) * sqrt(1 - beta2^t))
  and keeps m, v in bf16; here eps is inside, as torch.optim.AdamW, and m, v take the parameter's dtype: the
  two differ by an effective eps of eps / sqrt(1 - beta2^t) in the first ~100 steps.

Stepping every k-th call (step_every=k, group key, default 1): step() calls are counted per group
(group key "step_calls", saved in state_dict). Calls with (step_calls + 1) % k != 0 skip the group: each
parameter's gradient is taken off it (p.grad becomes None) and held in state["held_grad"] (summed over the
skipped calls, this rank's local gradient, nothing communicated). The next active call adds the held gradient
to this call's gradient and steps on the SUM, at that call's lr, with t counting active calls only. With k = 2
this is record 18 (both Adam optimizers step on odd steps only; the even step's gradient stays accumulated in
.grad and joins the odd step's): calls 1, 3, 5, ... (0-based) update the parameters.

Distribution: with a process group, a parameter whose first dim is divisible by the world size is
reduce-scattered along dim 0 (each rank updates and keeps Adam state for its own rows, then the rows are
all-gathered); any other parameter (0-D scalars included) is all-reduced and updated identically on every rank.
All reductions are launched before the first update. Gradients are averaged as SUM / world_size.
A parameter that requires grad but has no gradient on this rank contributes zeros.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from optimizers.distributed import PendingGrads, apply_decay_and_step, dist_info, grad_or_zeros


def adam_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                cautious: bool = False) -> None:
    """One AdamW step in place on param, exp_avg, exp_avg_sq (all the same shape); step is 1-based.
    weight_decay includes its multiplier; cautious: record 18's cautious decay (module docstring)."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    if cautious:
        direction = (exp_avg / denom).div_(bias_correction1)
        apply_decay_and_step(param, direction, lr, lr * weight_decay, cautious=True, strict=True)
    else:
        param.mul_(1 - lr * weight_decay)
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
    lr_mul = group["lr_mul"]
    if isinstance(lr_mul, bool) or not isinstance(lr_mul, (int, float)) or not lr_mul >= 0:
        raise ValueError(f"lr_mul must be a number >= 0, got {lr_mul!r}")
    if not isinstance(group["cautious_weight_decay"], bool):
        raise ValueError(f"cautious_weight_decay must be True or False, got {group['cautious_weight_decay']!r}")
    every = group["step_every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"step_every must be an integer >= 1 (1: step on every call; record 18: 2), got {every!r}")


class DistAdam(torch.optim.Optimizer):
    """AdamW averaged over ranks; see the module docstring. Group keys: lr, betas, eps, weight_decay,
    weight_decay_mul (default 1.0), lr_mul (default 1.0), cautious_weight_decay (default False),
    step_every (default 1) and the call counter step_calls."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.8, 0.95), eps: float = 1e-10,
                 weight_decay: float = 0.0, cautious_weight_decay: bool = False, step_every: int = 1):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, weight_decay_mul=1.0,
                        lr_mul=1.0, cautious_weight_decay=cautious_weight_decay, step_every=step_every)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key, default in dict(weight_decay_mul=1.0, lr_mul=1.0, cautious_weight_decay=False, step_every=1,
                                 step_calls=0).items():
            group.setdefault(key, default)
        check_adam_hyperparameters(group)

    @staticmethod
    def _reduce(grad: torch.Tensor, p: torch.Tensor, rank: int, world_size: int
                ) -> tuple[slice | None, PendingGrads]:
        """Start averaging p's local gradient `grad`. Returns (own row slice or None if replicated, pending)."""
        if world_size == 1:
            return None, PendingGrads(grad)
        if p.ndim >= 1 and p.shape[0] % world_size == 0:
            rows = p.shape[0] // world_size
            own = torch.empty((rows, *p.shape[1:]), dtype=grad.dtype, device=grad.device)
            work = dist.reduce_scatter_tensor(own, grad.contiguous(), op=dist.ReduceOp.SUM, async_op=True)
            return slice(rank * rows, (rank + 1) * rows), PendingGrads(own, work, divisor=world_size)
        full = grad.clone()
        work = dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True)
        return None, PendingGrads(full, work, divisor=world_size)

    def _hold_grad(self, p: torch.Tensor) -> None:
        """A skipped call: take p.grad off p into state["held_grad"] (summed with what is held already)."""
        if p.grad is None:
            return
        state = self.state[p]
        held = state.get("held_grad")
        state["held_grad"] = p.grad if held is None else held + p.grad  # out of place: p.grad is not ours
        p.grad = None

    def _local_grad(self, p: torch.Tensor) -> torch.Tensor:
        """An active call: this rank's gradient of p plus the gradients held from skipped calls."""
        held = self.state[p].pop("held_grad", None) if p in self.state else None
        grad = grad_or_zeros(p)
        return grad if held is None else held + grad

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world_size = dist_info()
        work = []
        for group in self.param_groups:
            active = (group["step_calls"] + 1) % group["step_every"] == 0
            group["step_calls"] += 1
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if active:
                    work.append((group, p, *self._reduce(self._local_grad(p), p, rank, world_size)))
                else:
                    self._hold_grad(p)
        gathers = []
        for group, p, rows, pending in work:
            grad = pending.wait()
            target = p if rows is None else p[rows].clone()  # own rows: updated, then all-gathered into p
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(target)
                state["exp_avg_sq"] = torch.zeros_like(target)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            adam_update(target, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                        group["lr"] * group["lr_mul"], beta1, beta2, group["eps"],
                        group["weight_decay"] * group["weight_decay_mul"], group["cautious_weight_decay"])
            if rows is not None:
                gathers.append(dist.all_gather_into_tensor(p, target, async_op=True))
        for handle in gathers:
            handle.wait()
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
