"""Analysis of trained SAEs (``saefast analyze`` runs all of it).

* :mod:`saefast.analysis.database`: ``ActivationDatabase`` (sparse token x feature matrix with
  token metadata, safetensors on disk) and its builders ``build_database`` (model + token
  windows), ``build_database_from_activations``, ``build_database_from_cache``.
* :mod:`saefast.analysis.features`: ``feature_stats``, ``sparsity_report``,
  ``max_activating_examples``, ``top_tokens``, ``token_strings``.
* :mod:`saefast.analysis.similarity`: ``decoder_neighbours`` (chunked decoder cosine),
  ``cooccurrence_counts`` / ``cooccurrence_scores`` (sparse), ``cooccurring_features``.
* :mod:`saefast.analysis.patching`: ``edit_acts``, ``feature_patch_hook``, ``patch_features``
  (ablate / amplify / set features inside a model forward), ``ablation_study``.
* :mod:`saefast.analysis.plots`: ``plot_feature_density``, ``read_metrics``, ``plot_training_curves``.
* :mod:`saefast.analysis.report`: ``write_html_report``.
* :mod:`saefast.analysis.run`: ``analyze`` (everything, into one folder), ``select_features``.

Submodules are imported on first use.
"""
from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {
    "ActivationDatabase": "database", "build_database": "database", "build_database_from_activations": "database",
    "build_database_from_cache": "database",
    "FeatureStats": "features", "feature_stats": "features", "sparsity_report": "features", "Example": "features",
    "max_activating_examples": "features", "top_tokens": "features", "token_strings": "features",
    "decoder_neighbours": "similarity", "cooccurrence_counts": "similarity", "cooccurrence_scores": "similarity",
    "cooccurring_features": "similarity",
    "edit_acts": "patching", "feature_patch_hook": "patching", "patch_features": "patching",
    "ablation_study": "patching",
    "plot_feature_density": "plots", "read_metrics": "plots", "plot_training_curves": "plots",
    "write_html_report": "report",
    "analyze": "run", "select_features": "run",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
