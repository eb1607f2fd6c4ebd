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

Async collectives: every handle a step starts is waited on before `step()` returns or raises (`wait_for_all` on
the error path), and each handle keeps its input tensor referenced until its wait (see `PendingGrads`). The
process group itself is opened and closed with `start_process_group` / `close_process_group`; their docstrings
give the reason (issue 15: "terminate called without an active exception" at exit).
torch 2.13 deprecates `reduce_scatter_tensor` / `all_gather_into_tensor` in favour of `reduce_scatter_single` /
`all_gather_single` (the old names now forward to the new ones, so the FutureWarning they print is harmless),
but torch 2.11, the GPU machine's, has only the old names: the old names stay until 2.11 is retired.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when a process group is initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---- process group lifetime ------------------------------------------------------------------------------
# Why a run must end with close_process_group() (issue 15, a rare SIGABRT of a 2-rank gloo run at exit,
# "terminate called without an active exception"):
#   1. gloo runs each collective on one of its worker threads (pt_gloo_runloop). wait() returns as soon as the
#      collective is marked complete; the worker thread drops its reference to the collective's tensors a moment
#      later. A tensor whose Python object died while the collective held it (a temporary, a buffer let go after
#      the wait) is then freed by that worker thread, and freeing its Python object takes the GIL
#      (TensorImpl::decref_pyobject -> pybind11 gil_scoped_acquire -> PyEval_AcquireThread).
#   2. If the interpreter is finalizing by then, CPython (3.11 here, 3.12 on the GPU machine) ends any other
#      thread that takes the GIL, or waits for it, with pthread_exit. The forced unwind meets a noexcept C++
#      destructor on the worker's stack and the C++ runtime calls std::terminate: "terminate called without an
#      active exception", exit code -6, and torchrun SIGTERMs the other rank.
#   3. destroy_process_group() would have joined those worker threads (its destructor drops the GIL while it
#      joins), but it did not destroy anything: torch.distributed.nn.functional binds `group=group.WORLD` as
#      default arguments when imported, and the first torch.optim.Optimizer imports it (through torch._dynamo)
#      after init_process_group, so the default group stayed referenced until interpreter finalization.
# So a run aborts when a worker thread, delayed after a collective (a loaded machine deschedules it), asks for
# the GIL within a few milliseconds of the main thread starting interpreter shutdown: rare, and rarer still on
# an idle machine. bench/stress_dist.py --gil-delay-ms forces that timing. start_process_group() removes step 3;
# close_process_group() waits for every rank (barrier), then joins the threads while Python is fully alive.


def start_process_group(backend: str, **kwargs: Any) -> None:
    """dist.init_process_group(backend, **kwargs), with torch.distributed.nn imported first.

    torch.distributed.nn.functional evaluates `group=group.WORLD` once, at import: imported before the group
    exists those defaults are None; imported after, they hold the default group for the life of the process and
    destroy_process_group() can no longer release it (see the comment above).
    """
    import torch.distributed.nn  # noqa: F401  (before the group exists; see the docstring)

    dist.init_process_group(backend, **kwargs)


def close_process_group() -> list[str]:
    """End a run that every rank finished: barrier, then destroy_process_group(). No-op without a group.

    The barrier returns once every rank has finished every collective (gloo's barrier also waits for this
    rank's earlier work), so no peer is mid-collective when the connections close. destroy_process_group() then
    releases the group, whose destructor joins gloo's worker threads after they dropped the tensors of finished
    collectives, while the interpreter is fully alive. Call it only where every rank arrives (the success path):
    after a failure on one rank the barrier would wait for ranks that never come.
    Returns the names of gloo threads still alive afterwards (empty when the teardown was complete).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    dist.barrier()
    dist.destroy_process_group()
    return gloo_threads()


def gloo_threads() -> list[str]:
    """Names of this process's threads that belong to gloo, from /proc/self/task (Linux; [] elsewhere)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended while we looked
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)


def wait_for_all(works: Iterable[Any], error: BaseException) -> None:
    """Error path of a step: wait for every collective it started, then let `error` propagate.

    The peer ranks start the same collectives (same code, same buckets), so these waits return; afterwards no
    collective of the failed step is still running or holding its tensors. A wait that fails too (e.g. the peer
    has gone) is added to `error` as a note rather than replacing it. None entries (no collective) are skipped.
    """
    for work in works:
        if work is None or work.is_completed():
            continue
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001  (reported on `error`, which is the one raised)
            note = f"while waiting for the failed step's other collectives: {type(exc).__name__}: {exc}"
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(note)
            else:
                warnings.warn(note, stacklevel=2)


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

    value: the tensor (or any object) the collective writes into; work: its async handle (None: nothing to
    wait for); divisor: applied once after the wait (SUM -> mean, since gloo lacks an AVG reduce-op for some
    collectives); sent: the collective's input, referenced until the wait returns, so that its Python object
    does not die while the collective still reads the tensor (a gloo thread would then be the one to free it,
    which takes the GIL; see the comment above start_process_group).
    """

    def __init__(self, value: Any, work: Any = None, divisor: int = 1,
                 finish: Callable[[Any], Any] | None = None, sent: torch.Tensor | None = None):
        self._value, self.work, self._divisor, self._finish, self._sent = value, work, divisor, finish, sent
        self._done = False

    @property
    def works(self) -> list[Any]:
        """Every async handle behind this reduction (what an error path must wait for)."""
        return [self.work]

    def wait(self) -> Any:
        if not self._done:
            if self.work is not None:
                self.work.wait()
            self._sent = None
            if self._divisor != 1:
                self._value.div_(self._divisor)
            if self._finish is not None:
                self._value = self._finish(self._value)
            self._done = True
        return self._value


class PendingGather:
    """An in-flight all-gather. wait() finishes it and copies gathered[:len(params)] into params (if any).

    work None: nothing to wait for (world size 1). sent: the input, referenced until the wait returns (as in
    `PendingGrads`).
    """

    def __init__(self, work: Any, sent: torch.Tensor | None = None, gathered: torch.Tensor | None = None,
                 params: list[torch.Tensor] | None = None):
        self.work, self._sent, self._gathered, self._params = work, sent, gathered, params or []

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        self._sent = None
        if self._params:
            torch._foreach_copy_(self._params, list(self._gathered[:len(self._params)].unbind(0)))


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
        return PendingGrads(owned, work, divisor=bucket.world_size, finish=lambda g: g[:n_own], sent=stack)

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

    def _update_bucket(self, bucket: Bucket, grads: Any) -> PendingGather:
        """Update the owned slice; return the all-gather that copies every rank's slice back (or, at world
        size 1, the copy of the updated stack)."""
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
            return PendingGather(None, gathered=send, params=bucket.params)
        full = torch.empty((bucket.per_rank * bucket.world_size, *bucket.shape), dtype=send.dtype,
                           device=send.device)
        work = dist.all_gather_into_tensor(full, send, async_op=True)
        return PendingGather(work, sent=send, gathered=full, params=bucket.params)

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
        gathers: list[PendingGather] = []
        try:
            for bucket, grads in zip(buckets, pending):
                gathers.append(self._update_bucket(bucket, grads.wait()))
            for gather in gathers:
                gather.wait()
        except BaseException as error:
            wait_for_all([w for p in pending for w in p.works] + [g.work for g in gathers], error)
            raise
        for group in self.param_groups:
            group["step"] += 1
        return loss
