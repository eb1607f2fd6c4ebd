"""Orthogonalisation kernels. `msign` is the one entry point the optimizers call."""
from __future__ import annotations

import torch

from kernels.polar_express import POLAR_EXPRESS_COEFFS, msign_reference, polar_express_coeffs

__all__ = ["msign", "msign_reference", "POLAR_EXPRESS_COEFFS", "polar_express_coeffs"]


def msign(G: torch.Tensor, steps: int = 5, backend: str | None = None) -> torch.Tensor:
    """Approximate polar factor U V^T of G (..., M, N) by `steps` Polar Express iterations.

    Returns a tensor of G's shape and dtype. backend: None (auto) or "torch".
    """
    if backend not in (None, "torch"):
        raise ValueError(f"unknown msign backend {backend!r}; choose 'torch' or leave it None")
    return msign_reference(G, steps)
