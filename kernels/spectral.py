"""SVD-free spectral functions f(G) = U f(S) V^T built from the polar kernels.

- soft_msign(G, c):  f_c(s) = s / sqrt(s^2 + c), i.e. G (G^T G + c I)^{-1/2}, as the left block of
  the polar factor of the augmented matrix [G, sqrt(c) I] taken on the short side. Soft clip at
  level c is c * soft_msign(G, c^2); sums of soft signs with several c give monotone saturating curves.
- gram_poly(G, coeffs):  f(s) = s g(s^2) with polynomial g, i.e. G g(G^T G), matmuls only.

Both dispatch like kernels.msign: backend None (Triton on CUDA, torch on CPU), "torch" or "triton".
"""
from __future__ import annotations

from typing import Sequence

import torch

from kernels import resolve_backend
from kernels.polar_express import polar_coeffs, polar_iterate_reference


def _augment(G: torch.Tensor, c) -> torch.Tensor:
    """[G, sqrt(c) I_M] for wide G (M <= N), [G; sqrt(c) I_N] for tall G; c float or per-matrix tensor."""
    rows, cols = G.shape[-2], G.shape[-1]
    k = min(rows, cols)
    if isinstance(c, torch.Tensor):
        if c.shape != G.shape[:-2] and c.numel() != 1:
            raise ValueError(f"c must be a number or a tensor of shape {tuple(G.shape[:-2])} (one per matrix), "
                             f"got shape {tuple(c.shape)}")
        if not bool((c > 0).all()):
            raise ValueError("soft_msign needs c > 0 (c = 0 is msign itself: use kernels.msign)")
        c = c.to(device=G.device, dtype=torch.float32)
        root_c = c.reshape(()).sqrt() if c.numel() == 1 else c.sqrt()[..., None, None]
    else:
        c = float(c)
        if not c > 0:
            raise ValueError(f"soft_msign needs c > 0, got {c} (c = 0 is msign itself: use kernels.msign)")
        root_c = torch.tensor(c, device=G.device, dtype=torch.float32).sqrt()
    eye = torch.eye(k, device=G.device, dtype=torch.float32) * root_c  # (..., k, k)
    eye = eye.expand(*G.shape[:-2], k, k).to(G.dtype)
    return torch.cat([G, eye], dim=-1 if rows <= cols else -2)


def soft_msign(G: torch.Tensor, c, steps: int = 5, polish: int = 2, backend: str | None = None,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """G (G^T G + c I)^{-1/2} = U diag(s / sqrt(s^2 + c)) V^T for G (..., M, N); G's shape and dtype.

    c: > 0, in units of squared singular values of G (a number, or a tensor with one value per
    matrix of the stack). Computed as the polar factor of the augmented matrix [G, sqrt(c) I] on
    the short side (its singular values sqrt(s^2 + c) are at least sqrt(c), so the iteration
    converges fast) by `steps` Polar Express iterations plus `polish` quintic Newton-Schulz steps
    that pull the remaining +-15% spread of Polar Express down to rounding. Accurate while
    sqrt(c) >= ~1e-3 * ||[G, sqrt(c) I]||_F, i.e. c >= ~1e-6 ||G||_F^2.
    """
    if G.ndim < 2:
        raise ValueError(f"soft_msign needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    rows, cols = G.shape[-2], G.shape[-1]
    Y = _augment(G, c)
    coeffs = polar_coeffs(steps, polish)
    if resolve_backend(G, backend) == "torch":
        P = polar_iterate_reference(Y, coeffs, compute_dtype)
    else:
        from kernels import triton_polar

        P = triton_polar.polar_iterate(Y, coeffs, compute_dtype)
    return P[..., :rows, :cols].contiguous()


def gram_poly_reference(G: torch.Tensor, coeffs: Sequence[float], compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch G g(G^T G), g(x) = sum_k coeffs[k] x^k, evaluated on the short side."""
    if G.ndim < 2:
        raise ValueError(f"gram_poly needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    coeffs = [float(c) for c in coeffs]
    if len(coeffs) == 0:
        raise ValueError("gram_poly needs at least one coefficient")
    if len(coeffs) == 1:
        return G * coeffs[0]
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if G.is_cuda else torch.float32
    transposed = G.size(-2) > G.size(-1)
    X = G.to(compute_dtype)
    if transposed:
        X = X.mT  # (..., m, n), m <= n
    A = X @ X.mT  # (..., m, m)
    eye = torch.eye(A.size(-1), dtype=compute_dtype, device=G.device)
    P = coeffs[-1] * A + coeffs[-2] * eye
    for ck in reversed(coeffs[:-2]):
        P = P @ A + ck * eye
    out = P @ X
    if transposed:
        out = out.mT
    return out.to(G.dtype).contiguous()


def gram_poly(G: torch.Tensor, coeffs: Sequence[float], backend: str | None = None,
              compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """G g(G^T G) = U diag(s g(s^2)) V^T with g(x) = sum_k coeffs[k] x^k; G's shape and dtype.

    Cost on the short side m <= n: one Gram matrix (m^2 n MACs, symmetric), (deg g - 1) symmetric
    m x m products, one m x m by m x n product. Mind the dtype: in bfloat16 (the CUDA default)
    a high-degree g with large coefficients loses digits; pass compute_dtype=torch.float32 then.
    """
    if resolve_backend(G, backend) == "torch":
        return gram_poly_reference(G, coeffs, compute_dtype)
    from kernels import triton_polar

    return triton_polar.gram_poly(G, coeffs, compute_dtype)
