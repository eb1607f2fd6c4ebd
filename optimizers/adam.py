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
All reductions are launched before the first update; every collective is waited on before step()
returns or raises. Gradients are averaged as SUM / world_size.
A parameter that requires grad but has no gradient on this rank contributes zeros.

Reduction inside backward (record 18's overlap): after `register_grad_hooks()`, a training loop calls
`arm_grad_hooks()` just before the backward of a step's LAST micro-batch. While armed, a post-accumulate-grad
hook starts each parameter's reduction (its held gradient added first) the moment autograd has finished its
gradient, so communication overlaps with the rest of backward; step() then waits on those reductions instead of
launching them. Only groups whose next step() call is active are armed (under step_every=2 the skipped calls'
gradients are held, never communicated). A parameter whose hook did not fire (no gradient on the last
micro-batch) is reduced in step() as before. The values reduced and the update are the same tensors and the same
operations as without hooks, so results are bit-identical; at world size 1 the hooks only move the held-gradient
sum into backward. Every rank must produce gradients for the same parameters (the same model on every rank
does), so that the collectives are issued in the same order everywhere.

Precision: `state_dtype` (None: the parameter's dtype, the default; record 18: torch.bfloat16) sets the dtype
of m and v. Parameters may themselves be stored in bf16 (record 18's embeddings, head and gates); their
gradients, and so the reductions, are then bf16 too. Whenever the parameter or the state is narrower than fp32
the arithmetic of a step runs in fp32 and the results are rounded once on the way back into storage; an fp32
(or float64) parameter with state of its own dtype takes exactly the plain path.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from optimizers.distributed import (PendingGather, PendingGrads, apply_decay_and_step, dist_info, grad_or_zeros,
                                    wait_for_all)


def adam_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                cautious: bool = False) -> None:
    """One AdamW step in place on param, exp_avg, exp_avg_sq (all the same shape); step is 1-based.
    weight_decay includes its multiplier; cautious: record 18's cautious decay (module docstring).
    Tensors narrower than fp32 (bf16 storage or state) are updated through fp32 copies, rounded once at the end."""
    compute = torch.promote_types(torch.promote_types(param.dtype, exp_avg.dtype), torch.float32)
    stored = (param, exp_avg, exp_avg_sq)
    if any(t.dtype != compute for t in (*stored, grad)):
        wide = [t.to(compute) for t in stored]
        adam_update(*wide[:1], grad.to(compute), *wide[1:], step, lr, beta1, beta2, eps, weight_decay, cautious)
        for dst, src in zip(stored, wide):
            dst.copy_(src)
        return
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


STATE_DTYPES = (None, torch.float32, torch.bfloat16)


class DistAdam(torch.optim.Optimizer):
    """AdamW averaged over ranks; see the module docstring. Group keys: lr, betas, eps, weight_decay,
    weight_decay_mul (default 1.0), lr_mul (default 1.0), cautious_weight_decay (default False),
    step_every (default 1) and the call counter step_calls.

    state_dtype: dtype of m and v for every parameter: None (the parameter's own, default) or torch.bfloat16
    (record 18) or torch.float32. Reduction inside backward: register_grad_hooks(), then arm_grad_hooks() before
    each step's last backward (module docstring)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.8, 0.95), eps: float = 1e-10,
                 weight_decay: float = 0.0, cautious_weight_decay: bool = False, step_every: int = 1,
                 state_dtype: torch.dtype | None = None):
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES} (None: the parameter's dtype), "
                             f"got {state_dtype!r}")
        self.state_dtype = state_dtype
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, weight_decay_mul=1.0,
                        lr_mul=1.0, cautious_weight_decay=cautious_weight_decay, step_every=step_every)
        super().__init__(params, defaults)
        self._hooks_on = False  # register_grad_hooks() was called
        self._hook_handles: dict[torch.Tensor, Any] = {}  # parameter -> its post-accumulate-grad hook
        self._armed: set[torch.Tensor] = set()  # parameters whose hook reduces during the coming backward
        self._in_flight: dict[torch.Tensor, tuple] = {}  # parameter -> (rows, PendingGrads) started by a hook

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
            sent = grad.contiguous()
            work = dist.reduce_scatter_tensor(own, sent, op=dist.ReduceOp.SUM, async_op=True)
            return slice(rank * rows, (rank + 1) * rows), PendingGrads(own, work, divisor=world_size, sent=sent)
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

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer's, which casts state to the parameter's dtype; m and v go back to
        state_dtype so that a resumed run keeps bf16 state."""
        super().load_state_dict(state_dict)
        if self.state_dtype is None:
            return
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.state_dtype)

    # ---- reduction inside backward ------------------------------------------------------------------------
    def register_grad_hooks(self) -> None:
        """Turn on the reduction inside backward: from now on arm_grad_hooks() arms post-accumulate-grad hooks.
        A hook is installed on each parameter the first time it is armed while it requires grad, so a parameter
        that starts frozen (an embedding tied to the head until the split) gets its hook once it trains."""
        self._hooks_on = True

    def remove_grad_hooks(self) -> None:
        for handle in self._hook_handles.values():
            handle.remove()
        self._hook_handles.clear()
        self._armed.clear()
        self._hooks_on = False

    def arm_grad_hooks(self) -> None:
        """Call just before the backward of a step's last micro-batch: the hooks of the groups whose next step()
        call is active start their reductions during that backward."""
        if not self._hooks_on:
            raise RuntimeError("arm_grad_hooks() needs the hooks: call register_grad_hooks() once after building "
                               "the optimizer")
        self._armed = {p for group in self.param_groups if self._next_call_active(group)
                       for p in group["params"] if p.requires_grad}
        for p in self._armed:
            if p not in self._hook_handles:
                self._hook_handles[p] = p.register_post_accumulate_grad_hook(self._reduce_in_backward)

    def reductions_in_flight(self) -> int:
        """How many parameters' reductions the hooks have started and step() has not consumed yet."""
        return len(self._in_flight)

    @staticmethod
    def _next_call_active(group: dict) -> bool:
        return (group["step_calls"] + 1) % group["step_every"] == 0

    @torch.no_grad()
    def _reduce_in_backward(self, p: torch.Tensor) -> None:
        if p not in self._armed:
            return
        if p in self._in_flight:
            raise RuntimeError("a DistAdam gradient hook fired twice before step(): arm_grad_hooks() belongs just "
                               "before the LAST micro-batch's backward of a step, once per step")
        rank, world_size = dist_info()
        self._in_flight[p] = self._reduce(self._local_grad(p), p, rank, world_size)

    def _update(self, group: dict, p: torch.Tensor, target: torch.Tensor, grad: torch.Tensor) -> None:
        """One AdamW step on target (p, or this rank's rows of p) with the averaged grad; state lives under p."""
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(target, dtype=self.state_dtype)
            state["exp_avg_sq"] = torch.zeros_like(target, dtype=self.state_dtype)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adam_update(target, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                    group["lr"] * group["lr_mul"], beta1, beta2, group["eps"],
                    group["weight_decay"] * group["weight_decay_mul"], group["cautious_weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world_size = dist_info()
        work: list[tuple[dict, torch.Tensor, slice | None, PendingGrads]] = []
        gathers: list[PendingGather] = []
        self._armed = set()
        try:
            for group in self.param_groups:
                active = self._next_call_active(group)
                group["step_calls"] += 1
                for p in group["params"]:
                    if not p.requires_grad:
                        continue
                    if active:
                        started = self._in_flight.pop(p, None)  # by the hook, during backward
                        if started is None:
                            started = self._reduce(self._local_grad(p), p, rank, world_size)
                        work.append((group, p, *started))
                    else:
                        self._hold_grad(p)
            if self._in_flight:
                raise RuntimeError("DistAdam: gradient reductions were started for a group whose step() call was "
                                   "skipped; do not change step_calls or step_every between arm_grad_hooks() and "
                                   "step()")
            for group, p, rows, pending in work:
                grad = pending.wait()
                target = p if rows is None else p[rows].clone()  # own rows: updated, then all-gathered into p
                self._update(group, p, target, grad)
                if rows is not None:
                    gathers.append(PendingGather(dist.all_gather_into_tensor(p, target, async_op=True),
                                                 sent=target))
            for gather in gathers:
                gather.wait()
        except BaseException as error:
            reductions = [pending for *_, pending in work] + [pending for _, pending in self._in_flight.values()]
            self._in_flight.clear()
            wait_for_all([w for pending in reductions for w in pending.works] + [g.work for g in gathers], error)
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
