"""SAE evals.

* :mod:`saefast.evals.metrics`: reconstruction metrics and feature recovery on activation batches.
* :mod:`saefast.evals.model_evals`: the SAE spliced into a transformer-lens model
  (``spliced_ce_eval``: CE loss, CE loss recovered, KL; ``e2e_losses``: differentiable KL and
  downstream MSE for end-to-end training).

Submodules are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "spliced_ce_eval": "model_evals", "e2e_losses": "model_evals", "sae_reconstruct": "model_evals",
    "reconstruction_metrics": "metrics", "feature_recovery": "metrics",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'saefast.evals' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
