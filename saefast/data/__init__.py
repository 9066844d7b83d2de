"""Activation pipeline: transformer-lens models, token windows, shuffle buffer, activation cache.

Submodules (imported on first use, so ``import saefast.data`` stays cheap and never imports
transformer-lens by itself):

* :mod:`saefast.data.models`: ``load_model``, ``tiny_model``, ``hook_names``, ``run_to_hook``, ...
* :mod:`saefast.data.tokens`: ``TokenWindows``, ``load_dataset_any``
* :mod:`saefast.data.buffer`: ``ShuffleBuffer``
* :mod:`saefast.data.source`: ``ModelActivationSource``, ``ActivationBatch``
* :mod:`saefast.data.cache`: ``cache_activations``, ``CachedActivationSource``
* :mod:`saefast.data.synthetic`: ``SyntheticActivations`` (planted-dictionary data)
"""
from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {
    "load_model": "models", "tiny_model": "models", "hook_names": "models", "hook_d_in": "models",
    "run_to_hook": "models", "check_d_in": "models", "context_limit": "models",
    "TokenWindows": "tokens", "load_dataset_any": "tokens",
    "ShuffleBuffer": "buffer",
    "ModelActivationSource": "source", "ActivationBatch": "source",
    "estimate_norm_scaling_factor": "source",
    "cache_activations": "cache", "CachedActivationSource": "cache",
    "SyntheticActivations": "synthetic",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
