"""Optimizers: a registry of matrix optimizers (the --optimizer choices) over one sharded base, plus DistAdam.

OPTIMIZERS maps a name to a class called as Cls(params, lr=..., momentum=..., weight_decay=..., **specific).
"""
from __future__ import annotations

import torch

from optimizers.adam import AdamWMatrix, DistAdam, adam_update
from optimizers.distributed import ShardedMatrixOptimizer, dist_info
from optimizers.muon import Muon, muon_update
from optimizers.normuon import NorMuon
from optimizers.spectral_echo import SpectralEcho
from optimizers.spectral_ord import SpectralORD

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "muon": Muon,
    "normuon": NorMuon,
    "adamw": AdamWMatrix,
    "spectral_ord": SpectralORD,
    "spectral_echo": SpectralEcho,
}

__all__ = ["OPTIMIZERS", "get_optimizer_class", "Muon", "NorMuon", "SpectralORD", "SpectralEcho", "DistAdam",
           "AdamWMatrix", "ShardedMatrixOptimizer", "muon_update", "adam_update", "dist_info"]


def get_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The matrix optimizer class registered as `name`; ValueError naming the valid choices otherwise."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}") from None
