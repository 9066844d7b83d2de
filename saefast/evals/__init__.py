"""SAE evals.

* :mod:`saefast.evals.metrics`: reconstruction metrics and feature recovery on activation batches.
* :mod:`saefast.evals.model_evals`: the SAE spliced into a transformer-lens model
  (``spliced_ce_eval``: CE loss, CE loss recovered, KL; ``e2e_losses``: differentiable KL and
  downstream MSE for end-to-end training).

Submodules are imported on first use.
"""
from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {
    "spliced_ce_eval": "model_evals", "e2e_losses": "model_evals", "sae_reconstruct": "model_evals",
    "reconstruction_metrics": "metrics", "feature_recovery": "metrics",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
