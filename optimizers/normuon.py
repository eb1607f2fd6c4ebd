"""NorMuon: Muon, then a per-neuron second-moment normalisation of the orthogonalised update (record 18).

The formula of the modded-nanogpt medium record 18 (train_gpt_medium.py at d701163, `NorMuon` and
`apply_normuon_variance_reduction`). Per matrix W (M, N) with averaged gradient g (each matrix of a 3-D stack
(B, M, N) separately, as the record does for its merged QKVO weight viewed as 4 (d, d) blocks):
    g_eff = Muon's momentum step                           (buf.lerp_(g, 1 - mu); Nesterov: g.lerp(buf, mu))
    O     = msign(g_eff)                                   (M, N), Polar Express (kernels.msign)
    neurons: the rows of O when M >= N, else its columns   (neuron_axis="auto"; "rows" / "cols" force one axis;
                                                            the record forces rows for its (heads, 16) gates)
    r     = mean of O^2 along each neuron                  (M, 1) for rows, (1, N) for columns; fp32 at least
    v    <- beta2 v + (1 - beta2) r                        state "second_moment": r's shape, the gradient's
                                                           dtype, zeros at the first step, no bias correction
    Z     = O / sqrt(max(v, eps))
    U     = Z * ||O||_F / max(||Z||_F, eps)                the update keeps O's Frobenius norm per matrix
    W    <- weight decay (plain or cautious), then W - lr * s * U   (s: lr_mul and shape factor; see
                                                           optimizers/distributed.py)
A constant factor in v cancels in U, which is why the zero-initialised v needs no bias correction.
normalize=False skips the normalisation: U = O, the same code path as Muon (bit-identical to it).
"""
from __future__ import annotations

import torch

from optimizers.distributed import ShardedMatrixOptimizer
from optimizers.muon import Muon

NEURON_AXES = ("auto", "rows", "cols")


def neuron_reduce_dim(neuron_axis: str, rows: int, cols: int) -> int:
    """The dim averaged over for each neuron's second moment: -1 (one value per row) or -2 (per column)."""
    if neuron_axis == "rows" or (neuron_axis == "auto" and rows >= cols):
        return -1
    return -2


def normuon_normalize(O: torch.Tensor, second_moment: torch.Tensor, beta2: float, eps: float,
                      reduce_dim: int) -> torch.Tensor:
    """Normalise O (..., M, N) in place per neuron and return it; see the module docstring.

    second_moment: (..., M, 1) if reduce_dim == -1, (..., 1, N) if -2; updated in place (v <- lerp(v, r, 1 - beta2)).
    The norms come from r alone (||O||_F^2 = sum(r) * n, ||Z||_F^2 = sum(r * n / v)), so O is touched twice.
    """
    compute = torch.promote_types(O.dtype, torch.float32)
    n_reduced = O.size(reduce_dim)
    r = O.to(compute).square().mean(dim=reduce_dim, keepdim=True)  # per-neuron mean square
    second_moment.lerp_(r.to(second_moment.dtype), 1 - beta2)
    inv_rms = second_moment.clamp_min(eps).rsqrt().to(compute)
    norm_O = (r.sum(dim=(-2, -1), keepdim=True) * n_reduced).sqrt()  # (..., 1, 1)
    norm_Z = (r * n_reduced * inv_rms.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    scale = inv_rms * (norm_O / norm_Z.clamp_min(eps))
    return O.mul_(scale.to(O.dtype))


def check_normuon_hyperparameters(group: dict) -> None:
    """ValueError for out-of-range NorMuon-specific hyperparameters (Muon's are checked separately)."""
    beta2 = group["beta2"]
    if isinstance(beta2, bool) or not isinstance(beta2, (int, float)) or not 0 <= beta2 < 1:
        raise ValueError(f"beta2 must be in [0, 1) (second-moment decay), got {beta2!r}")
    eps = group["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(group["normalize"], bool):
        raise ValueError(f"normalize must be True or False, got {group['normalize']!r}")
    if group["neuron_axis"] not in NEURON_AXES:
        raise ValueError(f"neuron_axis must be one of {NEURON_AXES}, got {group['neuron_axis']!r}")


class NorMuon(Muon):
    """Muon with the per-neuron second-moment normalisation of record 18 (see the module docstring).

    Args (besides Muon's lr, momentum, nesterov, weight_decay, msign_steps, msign_backend, cautious_weight_decay,
    shape_scale; all are group keys, like lr_mul):
        beta2: decay of the per-neuron second moment, in [0, 1) (record 18: 0.95).
        eps: floor of v and of ||Z||_F, >= 0 (record 18: 1e-10).
        normalize: False -> U = msign(g_eff), exactly Muon.
        neuron_axis: "auto" (rows if M >= N else columns), "rows" or "cols".
    Record 18 runs it with lr 0.015, momentum 0.85 -> 0.95 -> 0.85, cautious_weight_decay=True with
    weight_decay 1.2, and per-matrix multipliers (shape_scale="none", lr_mul: attention 2, MLP up 2, MLP down 4,
    gates 0.1 with neuron_axis="rows").
    """

    def __init__(self, params, lr: float = 0.025, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, beta2: float = 0.95, eps: float = 1e-10, normalize: bool = True,
                 neuron_axis: str = "auto", msign_steps: int = 5, msign_backend: str | None = None,
                 cautious_weight_decay: bool = False, shape_scale: str = "muon"):
        defaults = self.muon_defaults(lr, momentum, nesterov, weight_decay, msign_steps, msign_backend,
                                      cautious_weight_decay, shape_scale)
        defaults.update(beta2=beta2, eps=eps, normalize=normalize, neuron_axis=neuron_axis)
        ShardedMatrixOptimizer.__init__(self, params, defaults)

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        check_normuon_hyperparameters(group)

    def compute_update(self, group, owned, W, grads, states):
        O = super().compute_update(group, owned, W, grads, states)  # Muon: momentum, then msign
        if not group["normalize"]:
            return O
        rows, cols = W.shape[-2], W.shape[-1]
        reduce_dim = neuron_reduce_dim(group["neuron_axis"], rows, cols)
        moment_shape = (*W.shape[1:-2], rows, 1) if reduce_dim == -1 else (*W.shape[1:-2], 1, cols)
        for state in states:
            if "second_moment" not in state:
                state["second_moment"] = torch.zeros(moment_shape, dtype=grads.dtype, device=grads.device)
        moments = [state["second_moment"] for state in states]
        stacked = torch.stack(moments)  # (n_own, *moment_shape)
        U = normuon_normalize(O, stacked, group["beta2"], group["eps"], reduce_dim)
        torch._foreach_copy_(moments, list(stacked.unbind(0)))
        return U
