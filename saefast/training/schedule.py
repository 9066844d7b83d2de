"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

For optimizer step ``s`` (0-based) of ``total_steps``, with ``w`` warm-up steps and floor ``f``
(a fraction of the peak LR)::

    factor(s) = (s + 1) / w                                   for s < w
    factor(s) = f + (1 - f) * (1 + cos(pi * p)) / 2,          p = (s - w) / max(1, total_steps - 1 - w)

so the first step after warm-up runs at the peak LR and the last step at ``f * lr``.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine", "make_scheduler"]


class WarmupCosine:
    """Callable ``step -> LR factor``; a plain object so LambdaLR saves and restores its fields."""

    def __init__(self, warmup_steps: int, total_steps: int, floor: float) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor={floor} must be in [0, 1]")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.floor = floor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int, floor: float) -> LambdaLR:
    """LambdaLR over :class:`WarmupCosine`; call ``scheduler.step()`` after each optimizer step."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, floor))
