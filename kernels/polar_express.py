"""Polar Express orthogonalisation: msign(G) = U V^T without an SVD.

This module holds the one copy of the Polar Express coefficients and the plain-torch
reference iteration. Faster backends (Triton) live beside it and must agree with
`msign_reference`.

Iteration on the wide orientation X (M <= N; tall inputs are transposed):
    X0 = G / (||G||_F * (1 + 0.02) + 1e-6)
    for (a, b, c):  A = X X^T;  B = b A + c A A;  X = a X + B X
"""
from __future__ import annotations

import torch

# Polar Express (arXiv 2505.16932): 5 iterations, safety factor 0.02, cushion 0.02.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NORM_SAFETY = 1.02  # X0 = G / (||G||_F * NORM_SAFETY + NORM_EPS)
NORM_EPS = 1e-6


def polar_express_coeffs(steps: int) -> list[tuple[float, float, float]]:
    """The first `steps` coefficient triples; steps past the list repeat the last triple."""
    if steps < 1:
        raise ValueError(f"msign needs steps >= 1, got {steps}")
    coeffs = list(POLAR_EXPRESS_COEFFS[:steps])
    coeffs += [POLAR_EXPRESS_COEFFS[-1]] * (steps - len(coeffs))
    return coeffs


def msign_reference(G: torch.Tensor, steps: int = 5, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch Polar Express. G: (..., M, N), any float dtype; returns G's shape and dtype.

    compute_dtype: dtype of the iteration (default: bfloat16 on CUDA, float32 on CPU; pass
    torch.float64 for a high-precision reference).
    """
    return polar_iterate_reference(G, polar_express_coeffs(steps), compute_dtype)


# Quintic Newton-Schulz step p(x) = (15 x - 10 x^3 + 3 x^5) / 8: p(1) = 1, p'(1) = p''(1) = 0.
# After the Polar Express steps (singular values in [0.85, 1.15]) each such step squares the
# remaining distance to 1 and more, so a step or two "polish" the polar factor.
NEWTON_SCHULZ_QUINTIC: tuple[float, float, float] = (15 / 8, -10 / 8, 3 / 8)


def polar_coeffs(steps: int = 5, polish: int = 0) -> list[tuple[float, float, float]]:
    """Polar Express triples for `steps` iterations followed by `polish` quintic Newton-Schulz steps."""
    if polish < 0:
        raise ValueError(f"polish must be >= 0, got {polish}")
    return polar_express_coeffs(steps) + [NEWTON_SCHULZ_QUINTIC] * polish


def polar_iterate_reference(G: torch.Tensor, coeffs, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch odd-polynomial polar iteration with the given (a, b, c) triples.

    G: (..., M, N), any float dtype; returns G's shape and dtype. compute_dtype as in msign_reference.
    """
    if G.ndim < 2:
        raise ValueError(f"msign needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(compute_dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT  # work on the wide side: (..., M, N) with M <= N
    norm = X.float().norm(dim=(-2, -1), keepdim=True)
    X = X / (norm * NORM_SAFETY + NORM_EPS).to(compute_dtype)
    for a, b, c in coeffs:
        A = X @ X.mT  # (..., M, M)
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype).contiguous()
