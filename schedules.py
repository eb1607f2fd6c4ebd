"""Schedules: every scalar that changes with the step (window, lr multiplier, momentum), as pure functions of
(cfg, step) so that tests and `--dry-run` read the same numbers the loop uses."""
from __future__ import annotations

import math

from config import Hyperparameters


def window_tokens_at(cfg: Hyperparameters, step: int) -> int:
    """Sliding window for the long layers at this step: max_window * (4x^3 - 6x^2 + 3x), rounded up to blocks."""
    x = step / cfg.num_iterations
    tokens = cfg.max_window_tokens * (4 * x**3 - 6 * x**2 + 3 * x)
    blocks = max(1, math.ceil(tokens / cfg.window_block))
    return blocks * cfg.window_block


def lr_multiplier(cfg: Hyperparameters, step: int) -> float:
    """1.0, then linear decay to final_lr_frac over the last cooldown_frac of the run."""
    x = step / cfg.num_iterations
    if x < 1 - cfg.cooldown_frac:
        return 1.0
    w = (1 - x) / cfg.cooldown_frac
    return w * 1.0 + (1 - w) * cfg.final_lr_frac


def momentum_at(cfg: Hyperparameters, step: int) -> float:
    frac = min(step / cfg.momentum_warmup_steps, 1) if cfg.momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * cfg.momentum_warmup_start + frac * cfg.momentum


def validation_due(cfg: Hyperparameters, step: int) -> bool:
    """Whether the loop validates before training step `step` (0-based; step == num_iterations is the end):
    always at the end; every val_loss_every steps; with val_loss_every_late > 0, every val_loss_every_late steps
    instead once step / num_iterations >= val_late_start (track 3: 125, then 25 in the last 10%)."""
    if step == cfg.num_iterations:
        return True
    late = cfg.val_loss_every_late > 0 and step / cfg.num_iterations >= cfg.val_late_start
    every = cfg.val_loss_every_late if late else cfg.val_loss_every
    return every > 0 and step % every == 0
