"""Orthogonalisation kernels. `msign` is the one entry point the optimizers call.

Backends: "torch" (plain torch reference, any device) and "triton" (kernels/triton_polar.py:
batched symmetric kernels, CUDA; on CPU only under TRITON_INTERPRET=1). backend=None picks
Triton for CUDA tensors and torch for CPU tensors. Triton is imported only when it is used.
On CUDA the Triton path captures one CUDA graph per (shape, dtype, recipe) on first use and
replays it afterwards (kernels.triton_polar.USE_CUDA_GRAPHS, clear_graph_cache()).
"""
from __future__ import annotations

import importlib.util

import torch

from kernels.polar_express import (
    NEWTON_SCHULZ_QUINTIC,
    POLAR_EXPRESS_COEFFS,
    msign_reference,
    polar_coeffs,
    polar_express_coeffs,
    polar_iterate_reference,
)

__all__ = [
    "msign", "soft_msign", "gram_poly", "resolve_backend", "msign_reference", "polar_iterate_reference",
    "POLAR_EXPRESS_COEFFS", "NEWTON_SCHULZ_QUINTIC", "polar_express_coeffs", "polar_coeffs",
]

BACKENDS = ("torch", "triton")


def triton_available() -> bool:
    """Whether the triton package can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(G: torch.Tensor, backend: str | None) -> str:
    """The backend that will run on G: explicit `backend`, else triton for CUDA tensors, torch for CPU."""
    if backend is None:
        return "triton" if G.is_cuda and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or leave it None (auto)")
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton), or use backend='torch'")
    return backend


def msign(G: torch.Tensor, steps: int = 5, backend: str | None = None,
          compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate polar factor U V^T of G (..., M, N) by `steps` Polar Express iterations.

    Returns a tensor of G's shape and dtype. backend: None (auto: Triton on CUDA, torch on CPU),
    "torch" or "triton". compute_dtype: dtype the iterates are stored in (default bfloat16 on
    CUDA, float32 on CPU); products accumulate in fp32 on the Triton path.
    """
    coeffs = polar_express_coeffs(steps)
    if resolve_backend(G, backend) == "torch":
        return polar_iterate_reference(G, coeffs, compute_dtype)
    from kernels import triton_polar

    return triton_polar.polar_iterate(G, coeffs, compute_dtype)


from kernels.spectral import gram_poly, soft_msign  # noqa: E402  (spectral uses resolve_backend)
