"""One sharded distributed base for matrix optimizers (Muon, spectral-ORD, spectral-echo).

How a step runs (`ShardedMatrixOptimizer.step`):
  1. Within each param group, parameters are bucketed by (shape, dtype, device), in group order.
  2. For every bucket the local gradients are stacked to (n, *shape), zero-padded to per_rank * world_size
     entries (per_rank = ceil(n / world_size)) and reduce-scattered with SUM; the owner divides by world_size.
     All buckets' reductions are launched (async) before any bucket is processed, so communication overlaps
     with the maths of earlier buckets.
  3. Rank r owns stack entries [r * per_rank, (r + 1) * per_rank) clipped to [0, n). For its owned slice it
     calls `compute_update(group, owned, W, grads, states)` -> U (n_own, *shape), then applies, with the step
     multiplier s = lr_mul * update_scale(shape) (update_scale only under shape_scale="muon", else 1):
       plain decay (default):
         W <- W * (1 - lr * weight_decay * weight_decay_mul)      (decoupled weight decay)
         W <- W - lr * s * U
       cautious_weight_decay=True (record 18's form, applied elementwise with the mask from the old W):
         W <- W - (lr * weight_decay * weight_decay_mul) * (lr * s) * [U * W >= 0] * W - lr * s * U
     Cautious decay shrinks only the entries the update already pushes towards zero (update and weight of the
     same sign; a zero product counts). Units differ between the two forms: plain decay removes a fraction
     lr * weight_decay of W per step, cautious decay a fraction lr^2 * s * weight_decay, so its weight_decay
     is larger (the record uses 1.2 with lr 0.015 x schedule, against 0.01 to 0.1 for plain decay).
  4. The updated owned slices are all-gathered (async, waited at the end) and copied back, so every rank ends
     with identical parameters.
Without an initialised process group (world size 1) there is no communication at all: the single rank owns
every entry and the same steps 1-3 run on the full stacks.

Overlap (`launch_reductions`): a training loop may start step 2's reductions as soon as the last backward of a
step ends, before other work (Adam's update) runs, so that communication overlaps with that work; the next
`step()` consumes them instead of launching its own. The reduced values are the same tensors either way, so the
result is bit-identical with and without the early launch. The gradients are read at launch time: do not change
them between `launch_reductions()` and `step()`.

Subclass contract:
  - `compute_update(group, owned, W, grads, states) -> U`: `owned` is the list of owned parameter tensors,
    `W` (n_own, *shape) a stacked copy of their current values (before weight decay; do not modify it),
    `grads` whatever `reduce_gradients(...).wait()` returned (by default the (n_own, *shape) averaged gradient
    stack), `states` the list of per-parameter state dicts (`self.state[p]`, lazily filled by the subclass).
    Return the update direction U (n_own, *shape) in W's dtype; the base applies lr, scale and weight decay.
  - `reduce_gradients(bucket) -> PendingGrads`: starts the reduction of one bucket; `.wait()` must return the
    value passed as `grads` to `compute_update`. Override it to deliver something else to the owner
    (e.g. per-replicate partial sums); it is called for all buckets before the first `wait()`.
  - `update_scale(shape)`: lr multiplier per shape, default max(1, M/N)^0.5 with (M, N) the last two dims.
  - `apply_update(group, W, U, step_lr)`: how U changes W, step_lr = lr * s (default: step 3's decay and step;
    spectral_ord's radial brake overrides it).
  - `validate_group(group)` / `validate_param(p)`: argument checks, run for every param group added.

Group keys the base adds to every group (each may be set per group, or as a constructor default):
  - lr_mul (float >= 0, default 1.0): per-matrix lr multiplier, multiplied into the step (and, under cautious
    decay, into the decay, as in the record).
  - shape_scale ("muon" default | "none"): "muon" multiplies the step by update_scale(shape); "none" leaves the
    whole per-matrix multiplier to lr_mul. A preset that copies record 18 uses "none" with the record's products
    of shape factor and lr_mul as lr_mul: attention 2, MLP up 2, MLP down 4, gates 0.1. (The record's shape
    factor max(1, rows/cols)^0.5 is read off its own layouts, a (4d, d) merged QKVO and a (4d, d) transposed MLP
    down projection, so it differs from ours on a (4, d, d) QKVO stack or a (d, 4d) down projection.)
  - weight_decay_mul (float >= 0, default 1.0) and cautious_weight_decay (bool, default False): see step 3.

Gradients: a parameter with `requires_grad=False` is left out (the same on every rank). A parameter that
requires grad but has `grad is None` on this rank contributes a zero gradient, so all ranks stay in step
(its momentum still decays and weight decay still applies).

Each group gets a key "step": the number of completed `step()` calls for that group (saved in state_dict).
Under a process group each rank's `state` holds only the parameters it owns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when a process group is initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    """p.grad, or zeros of p's shape/dtype when this rank produced no gradient for p."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


@dataclass
class Bucket:
    """Same-shape, same-dtype parameters of one param group, sharded over ranks.

    Rank r owns stack entries [r * per_rank, (r + 1) * per_rank) clipped to [0, len(params)).
    """

    group: dict
    params: list[torch.Tensor]
    rank: int
    world_size: int

    @property
    def shape(self) -> torch.Size:
        return self.params[0].shape

    @property
    def per_rank(self) -> int:
        return math.ceil(len(self.params) / self.world_size)

    @property
    def owned_start(self) -> int:
        return min(self.rank * self.per_rank, len(self.params))

    @property
    def owned(self) -> list[torch.Tensor]:
        return self.params[self.owned_start:self.owned_start + self.per_rank]

    def stacked_grads(self) -> torch.Tensor:
        """Local gradients (per_rank * world_size, *shape), zero-padded past len(params)."""
        first = self.params[0]
        dtype = first.grad.dtype if first.grad is not None else first.dtype
        stack = torch.zeros((self.per_rank * self.world_size, *self.shape), dtype=dtype, device=first.device)
        for i, p in enumerate(self.params):
            if p.grad is not None:
                stack[i].copy_(p.grad)
        return stack


class PendingGrads:
    """An in-flight gradient reduction. wait() returns the owner's reduced gradients.

    value: the tensor (or any object) the collective writes into; divisor: applied once after the wait
    (SUM -> mean, since gloo lacks an AVG reduce-op for some collectives).
    """

    def __init__(self, value: Any, work: Any = None, divisor: int = 1,
                 finish: Callable[[Any], Any] | None = None):
        self._value, self._work, self._divisor, self._finish = value, work, divisor, finish
        self._done = False

    def wait(self) -> Any:
        if not self._done:
            if self._work is not None:
                self._work.wait()
            if self._divisor != 1:
                self._value.div_(self._divisor)
            if self._finish is not None:
                self._value = self._finish(self._value)
            self._done = True
        return self._value


SHAPE_SCALES = ("muon", "none")
# keys every group of a sharded optimizer carries (see the module docstring), with their defaults
SHARDED_GROUP_DEFAULTS = dict(weight_decay_mul=1.0, lr_mul=1.0, shape_scale="muon", cautious_weight_decay=False)


def check_sharded_group(group: dict) -> None:
    """ValueError for a bad value of a key the sharded base reads (lr_mul, shape_scale, cautious_weight_decay)."""
    lr_mul = group["lr_mul"]
    if isinstance(lr_mul, bool) or not isinstance(lr_mul, (int, float)) or not lr_mul >= 0:
        raise ValueError(f"lr_mul must be a number >= 0 (per-matrix lr multiplier), got {lr_mul!r}")
    if group["shape_scale"] not in SHAPE_SCALES:
        raise ValueError(f"shape_scale must be one of {SHAPE_SCALES} (\"none\": lr_mul alone scales the step), "
                         f"got {group['shape_scale']!r}")
    if not isinstance(group["cautious_weight_decay"], bool):
        raise ValueError(f"cautious_weight_decay must be True or False, got {group['cautious_weight_decay']!r}")


def apply_decay_and_step(W: torch.Tensor, update: torch.Tensor, step_lr: float, decay: float, cautious: bool,
                         strict: bool = False) -> None:
    """In place on W (any shape; update the same shape): weight decay, then W -= step_lr * update.

    decay: the plain per-step fraction lr * weight_decay * weight_decay_mul.
    Plain: W *= 1 - decay. Cautious (record 18): W -= decay * step_lr * mask * W with mask = update * W >= 0
    (> 0 if strict, the record's form for Adam), taken from W before this step.
    """
    if cautious:
        product = update * W
        mask = product > 0 if strict else product >= 0
        W.addcmul_(W, mask.to(W.dtype), value=-decay * step_lr)
    else:
        W.mul_(1 - decay)
    W.add_(update, alpha=-step_lr)


class ShardedMatrixOptimizer(torch.optim.Optimizer):
    """Base for optimizers of 2-D / 3-D weight matrices; see the module docstring for the contract."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self._launched: tuple[list[Bucket], list[PendingGrads]] | None = None  # set by launch_reductions()

    # ---- hooks for subclasses -------------------------------------------------------------------------
    def validate_group(self, group: dict) -> None:
        """Raise ValueError on a bad hyperparameter in `group` (called for every group added)."""

    def validate_param(self, p: torch.Tensor) -> None:
        if p.ndim < 2:
            raise ValueError(
                f"{type(self).__name__} updates matrices (2-D) or stacks of matrices (3-D); got a parameter of "
                f"shape {tuple(p.shape)}. Route 1-D parameters (biases, gains, scalars) and embeddings to "
                f"optimizers.DistAdam instead.")

    def update_scale(self, shape: torch.Size) -> float:
        """lr multiplier max(1, M/N)^0.5 for matrices (M, N) (last two dims): tall matrices step further."""
        rows, cols = shape[-2], shape[-1]
        return max(1.0, rows / cols) ** 0.5

    def step_multiplier(self, group: dict, shape: torch.Size) -> float:
        """lr_mul times update_scale(shape) (shape_scale "muon") or times 1 (shape_scale "none")."""
        shape_factor = self.update_scale(shape) if group["shape_scale"] == "muon" else 1.0
        return group["lr_mul"] * shape_factor

    def compute_update(self, group: dict, owned: list[torch.Tensor], W: torch.Tensor, grads: Any,
                       states: list[dict]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement compute_update")

    def apply_update(self, group: dict, W: torch.Tensor, update: torch.Tensor, step_lr: float) -> None:
        """In place on the owned stack W (n_own, *shape): weight decay (plain or cautious), then W -= step_lr U."""
        apply_decay_and_step(W, update, step_lr, group["lr"] * group["weight_decay"] * group["weight_decay_mul"],
                             group["cautious_weight_decay"])

    def reduce_gradients(self, bucket: Bucket) -> PendingGrads:
        """Start averaging this bucket's gradients over ranks; the owner gets its slice (n_own, *shape)."""
        n_own = len(bucket.owned)
        if bucket.world_size == 1:
            stack = bucket.stacked_grads()  # (n, *shape): nothing to pad or communicate
            return PendingGrads(stack)
        stack = bucket.stacked_grads()  # (per_rank * world_size, *shape)
        owned = torch.empty((bucket.per_rank, *bucket.shape), dtype=stack.dtype, device=stack.device)
        work = dist.reduce_scatter_tensor(owned, stack, op=dist.ReduceOp.SUM, async_op=True)
        return PendingGrads(owned, work, divisor=bucket.world_size, finish=lambda g: g[:n_own])

    # ---- machinery ------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key, default in SHARDED_GROUP_DEFAULTS.items():
            group.setdefault(key, default)
        group.setdefault("step", 0)
        check_sharded_group(group)
        self.validate_group(group)
        for p in group["params"]:
            self.validate_param(p)

    def make_buckets(self, rank: int, world_size: int) -> list[Bucket]:
        buckets = []
        for group in self.param_groups:
            by_key: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.requires_grad:
                    by_key.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            buckets += [Bucket(group, ps, rank, world_size) for ps in by_key.values()]
        return buckets

    def _update_bucket(self, bucket: Bucket, grads: Any) -> Callable[[], None]:
        """Update the owned slice; return a function that finishes the all-gather and copies back."""
        owned, group = bucket.owned, bucket.group
        first = bucket.params[0]
        if bucket.world_size == 1:
            send = torch.stack(owned)  # (n, *shape) working copy
        else:
            send = torch.zeros((bucket.per_rank, *bucket.shape), dtype=first.dtype, device=first.device)
            for dst, p in zip(send, owned):
                dst.copy_(p)
        W = send[:len(owned)]  # (n_own, *shape)
        if owned:
            states = [self.state[p] for p in owned]
            update = self.compute_update(group, owned, W, grads, states)
            self.apply_update(group, W, update, group["lr"] * self.step_multiplier(group, bucket.shape))
        if bucket.world_size == 1:
            torch._foreach_copy_(owned, list(W.unbind(0)))
            return lambda: None
        full = torch.empty((bucket.per_rank * bucket.world_size, *bucket.shape), dtype=send.dtype,
                           device=send.device)
        work = dist.all_gather_into_tensor(full, send, async_op=True)

        def finish() -> None:
            work.wait()
            torch._foreach_copy_(bucket.params, list(full[:len(bucket.params)].unbind(0)))
        return finish

    @torch.no_grad()
    def launch_reductions(self) -> None:
        """Start every bucket's gradient reduction now; the next step() consumes them (module docstring).

        Call once, after the last backward of a step and before step(); every rank must call it at the same point.
        """
        if self._launched is not None:
            raise RuntimeError(f"{type(self).__name__}.launch_reductions() was called twice without a step() "
                               "in between; call it once per step, after the last backward")
        rank, world_size = dist_info()
        buckets = self.make_buckets(rank, world_size)
        self._launched = (buckets, [self.reduce_gradients(b) for b in buckets])  # every launch before any wait

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            if self._launched is not None:
                raise RuntimeError("step(closure) after launch_reductions(): the closure's gradients would not be "
                                   "the ones already being reduced; pass no closure, or do not launch early")
            with torch.enable_grad():
                loss = closure()
        if self._launched is None:
            self.launch_reductions()
        (buckets, pending), self._launched = self._launched, None
        finishers = [self._update_bucket(b, grads.wait()) for b, grads in zip(buckets, pending)]
        for finish in finishers:
            finish()
        for group in self.param_groups:
            group["step"] += 1
        return loss
