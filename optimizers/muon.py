"""Muon: momentum, then orthogonalisation (Polar Express msign) of each weight matrix's update.

Per matrix W (M, N) with averaged gradient g, momentum mu and learning rate lr:
    buf  <- buf + (1 - mu) (g - buf)                    (buf.lerp_(g, 1 - mu))
    g_eff = g + mu (buf - g)  if nesterov  else  buf    (g.lerp(buf, mu))
    O     = msign(g_eff)                                (~ U V^T of g_eff's SVD)
    W    <- W (1 - lr * weight_decay * weight_decay_mul)
    W    <- W - lr * lr_mul * max(1, M/N)^0.5 * O
lr is in units of spectral norm per update (O has singular values ~1). 3-D parameters (B, M, N) are stacks of
B matrices, each orthogonalised separately. Sharding over ranks, the per-matrix multiplier (lr_mul, shape_scale)
and the cautious weight decay option come from ShardedMatrixOptimizer (optimizers/distributed.py).
"""
from __future__ import annotations

import torch

import kernels
from optimizers.distributed import ShardedMatrixOptimizer


def muon_update(grad: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Momentum step on any shape (stacks included). Updates momentum_buffer in place; returns g_eff."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer.clone()


def check_muon_hyperparameters(group: dict) -> None:
    """ValueError for out-of-range Muon hyperparameters (shared by Muon and its subclasses)."""
    if not group["lr"] >= 0:
        raise ValueError(f"lr must be >= 0, got {group['lr']}")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    if not group["weight_decay_mul"] >= 0:
        raise ValueError(f"weight_decay_mul must be >= 0, got {group['weight_decay_mul']}")
    steps = group["msign_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"msign_steps must be an integer >= 1, got {steps!r}")
    backend = group["msign_backend"]
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"msign_backend must be None (auto) or a backend name string, got {backend!r}")


class Muon(ShardedMatrixOptimizer):
    """Muon for hidden weight matrices (2-D) and stacks of matrices (3-D).

    Args:
        lr: step size in units of spectral norm per update (before the max(1, M/N)^0.5 factor).
        momentum: mu in [0, 1); the buffer is an exponential moving average of gradients.
        nesterov: use g.lerp(buf, mu) (Nesterov-style) instead of buf.
        weight_decay: decoupled, W *= 1 - lr * weight_decay * weight_decay_mul (group key, default 1).
        msign_steps: Polar Express iterations; msign_backend: passed to kernels.msign (None = auto).
        cautious_weight_decay: record 18's cautious decay instead of plain decay; its weight_decay is per lr^2
            (see optimizers/distributed.py, step 3).
        shape_scale: "muon" (step x max(1, M/N)^0.5) or "none" (lr_mul alone); lr_mul is a group key (default 1).
    """

    def __init__(self, params, lr: float = 0.025, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, msign_steps: int = 5, msign_backend: str | None = None,
                 cautious_weight_decay: bool = False, shape_scale: str = "muon"):
        super().__init__(params, self.muon_defaults(lr, momentum, nesterov, weight_decay, msign_steps, msign_backend,
                                                    cautious_weight_decay, shape_scale))

    @staticmethod
    def muon_defaults(lr, momentum, nesterov, weight_decay, msign_steps, msign_backend,
                      cautious_weight_decay: bool = False, shape_scale: str = "muon") -> dict:
        """Group defaults shared by Muon and its subclasses (which add their own keys)."""
        return dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                    weight_decay_mul=1.0, msign_steps=msign_steps, msign_backend=msign_backend,
                    cautious_weight_decay=cautious_weight_decay, shape_scale=shape_scale)

    def validate_group(self, group: dict) -> None:
        check_muon_hyperparameters(group)

    def momentum_step(self, group: dict, grads: torch.Tensor, states: list[dict]) -> torch.Tensor:
        """Advance the owned momentum buffers with grads (n_own, *shape); return g_eff (n_own, *shape)."""
        for state, g in zip(states, grads):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
        buffers = [state["momentum_buffer"] for state in states]
        stacked = torch.stack(buffers)  # (n_own, *shape)
        g_eff = muon_update(grads, stacked, group["momentum"], group["nesterov"])
        torch._foreach_copy_(buffers, list(stacked.unbind(0)))
        return g_eff

    def direction(self, group: dict, owned: list[torch.Tensor], W: torch.Tensor, g_eff: torch.Tensor) -> torch.Tensor:
        """Update direction from the momentum-smoothed gradient: msign over the last two dims."""
        return kernels.msign(g_eff, steps=group["msign_steps"], backend=group["msign_backend"]).to(W.dtype)

    def compute_update(self, group, owned, W, grads, states):
        return self.direction(group, owned, W, self.momentum_step(group, grads, states))
