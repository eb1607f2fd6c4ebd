"""Synthetic gradients with a known truth, shared by the echo tests."""
import torch


def spiked(M: int, N: int, spikes, scale: float, gen: torch.Generator) -> torch.Tensor:
    """True G = sum_j spikes[j] * scale * u_j v_j^T with random orthonormal u, v: (M, N) float64."""
    U, _ = torch.linalg.qr(torch.randn(M, len(spikes), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(N, len(spikes), generator=gen, dtype=torch.float64))
    return (U * (torch.tensor(spikes, dtype=torch.float64) * scale)) @ V.T
