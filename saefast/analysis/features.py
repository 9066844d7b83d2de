"""Per-feature views of an activation database: statistics, sparsity report, max-activating examples.

* :func:`feature_stats`: firing count, density (firing frequency), log10 density, mean and max
  activation of every feature.
* :func:`sparsity_report`: L0 per token, inactive / dense / rare features, the SAE's dead count (JSON-safe dict).
* :func:`max_activating_examples`: the tokens where a feature fires most strongly, each with the
  surrounding tokens and the feature's activation on every one of them (for highlighting), and the
  decoded text when a tokenizer is given. Order: decreasing activation, ties by lower token index.
* :func:`top_tokens`: the token ids on which a feature fires most often.
* :func:`token_strings`: per-token text of a token-id sequence, whitespace included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..evals.metrics import training_dead_fraction
from .database import ActivationDatabase

__all__ = ["FeatureStats", "feature_stats", "sparsity_report", "Example", "max_activating_examples",
           "top_tokens", "token_strings", "LOG10_DENSITY_OF_DEAD"]

# log10 density reported for features that never fire (as SAELens' sparsity files do)
LOG10_DENSITY_OF_DEAD = -10.0


@dataclass
class FeatureStats:
    """Statistics of every feature over a database's ``n_tokens`` tokens; all tensors are [d_sae].

    counts (int64): tokens where the feature fires; density (fp64): counts / n_tokens;
    log10_density (fp64): log10 of density, ``LOG10_DENSITY_OF_DEAD`` for features that never fire;
    mean_activation (fp64): mean over the tokens where it fires (0 if never);
    max_activation (fp32): largest activation (0 if never).
    """

    n_tokens: int
    counts: Tensor
    density: Tensor
    log10_density: Tensor
    mean_activation: Tensor
    max_activation: Tensor


def feature_stats(db: ActivationDatabase) -> FeatureStats:
    """Per-feature statistics of ``db`` (see :class:`FeatureStats`)."""
    if not isinstance(db, ActivationDatabase):
        raise TypeError(f"db must be an ActivationDatabase, got {type(db).__name__}")
    counts = db.feature_counts()
    density = counts.double() / max(db.n_tokens, 1)
    log10 = torch.where(counts > 0, torch.log10(density.clamp_min(1e-300)),
                        torch.full_like(density, LOG10_DENSITY_OF_DEAD))
    return FeatureStats(db.n_tokens, counts, density, log10, db.feature_mean_activation(),
                        db.feature_max_activation())


def sparsity_report(db: ActivationDatabase, dense_threshold: float = 0.1, rare_threshold: float = 1e-4,
                    sae: Optional[Any] = None) -> Dict[str, Any]:
    """Sparsity and dead-feature report of ``db``, as a JSON-safe dict.

    Keys: ``n_tokens``, ``d_sae``, ``nnz``; ``l0_mean``, ``l0_std``, ``l0_median``, ``l0_max`` (active
    features per token); ``l1_mean`` (sum of activations per token); ``n_inactive`` /
    ``inactive_fraction`` / ``inactive_features`` (fire on none of these tokens); ``n_dense`` /
    ``dense_fraction`` / ``dense_features`` (fire on more than ``dense_threshold`` of the tokens);
    ``n_rare`` / ``rare_fraction`` (fire, but on fewer than ``rare_threshold`` of the tokens);
    ``log10_density_quantiles`` (p1, p10, p50, p90, p99 over the features that fire). With a saefast
    ``sae`` that carries training counters, also ``n_dead`` / ``dead_fraction`` (latents not fired
    in the last ``n_batches_to_dead`` training steps: saefast's one meaning of dead) and
    ``training_never_fired``.
    """
    if not 0 < dense_threshold <= 1:
        raise ValueError(f"dense_threshold={dense_threshold} must be in (0, 1]")
    if not 0 < rare_threshold <= 1:
        raise ValueError(f"rare_threshold={rare_threshold} must be in (0, 1]")
    stats = feature_stats(db)
    l0 = db.token_l0().double()
    l1 = torch.zeros(db.n_tokens, dtype=torch.float64).index_add_(0, db.token_index, db.values.double())
    inactive = stats.counts == 0
    dense = stats.density > dense_threshold
    rare = (~inactive) & (stats.density < rare_threshold)
    live = stats.log10_density[~inactive]
    quantiles: Dict[str, float] = {}
    if live.numel():
        qs = torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
        quantiles = {f"p{int(round(q * 100))}": float(v) for q, v in zip(qs.tolist(), torch.quantile(live, qs))}
    d = db.d_sae
    report: Dict[str, Any] = {
        "n_tokens": db.n_tokens, "d_sae": d, "nnz": db.nnz,
        "l0_mean": float(l0.mean()) if db.n_tokens else 0.0,
        "l0_std": float(l0.std(unbiased=False)) if db.n_tokens else 0.0,
        "l0_median": float(l0.median()) if db.n_tokens else 0.0,
        "l0_max": int(l0.max()) if db.n_tokens else 0,
        "l1_mean": float(l1.mean()) if db.n_tokens else 0.0,
        "n_inactive": int(inactive.sum()), "inactive_fraction": float(inactive.sum()) / d,
        "inactive_features": torch.nonzero(inactive).flatten().tolist(),
        "n_dense": int(dense.sum()), "dense_fraction": float(dense.sum()) / d,
        "dense_features": torch.nonzero(dense).flatten().tolist(),
        "dense_threshold": dense_threshold,
        "n_rare": int(rare.sum()), "rare_fraction": float(rare.sum()) / d, "rare_threshold": rare_threshold,
        "log10_density_quantiles": quantiles,
    }
    dead = training_dead_fraction(sae) if sae is not None else None
    if dead is not None:
        report["n_dead"] = int(sae.count_dead_features())
        report["dead_fraction"] = dead
        report["training_never_fired"] = int(sae.count_never_fired())
    return report


def token_strings(tokenizer: Any, ids: Sequence[int]) -> List[str]:
    """The text of each token of ``ids`` as it appears in the decoded sequence (leading spaces
    included): token i gets ``decode(ids[:i + 1])`` minus ``decode(ids[:i])``, or ``decode([id])``
    where that is not a prefix extension. Ids < 0 (unknown) give ``""``; without a tokenizer each
    known token is shown as ``<id>``."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [f"<{i}>" if i >= 0 else "" for i in ids]
    out: List[str] = []
    known: List[int] = []
    prev = ""
    for i in ids:
        if i < 0:
            out.append("")
            known, prev = [], ""  # decoding restarts after an unknown token
            continue
        known.append(i)
        text = tokenizer.decode(known, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(text[len(prev):] if text.startswith(prev) else
                   tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        prev = text
    return out


@dataclass
class Example:
    """One max-activating example of a feature.

    token_index: database row of the token; activation: the feature's value there; window_id,
    position, token_id: the token's metadata (-1: unknown); context_ids [L]: token ids around it
    (-1: unknown); context_acts [L]: the feature's activation on each of them (0 where it does not
    fire or the token is not in the database); center: index of the token in the context;
    context_text [L]: the tokens' text (empty without a tokenizer and token ids).
    """

    token_index: int
    activation: float
    window_id: int
    position: int
    token_id: int
    context_ids: List[int]
    context_acts: List[float]
    center: int
    context_text: List[str] = field(default_factory=list)


def max_activating_examples(db: ActivationDatabase, feature: int, n: int = 10, before: int = 10, after: int = 4,
                            tokenizer: Any = None) -> List[Example]:
    """The ``n`` tokens with the largest activation of ``feature`` (ties: lower token index first),
    each with ``before`` tokens before and ``after`` tokens after it (within its window)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative integer")
    tokens, values = db.feature_activations(feature, top_k=n)
    examples = []
    for t, v in zip(tokens.tolist(), values.tolist()):
        ids, rows, center = db.context(t, before, after)
        acts = db.values_at(feature, rows)
        text = token_strings(tokenizer, ids.tolist()) if (tokenizer is not None and db.has_token_ids) else []
        examples.append(Example(t, v, int(db.window_ids[t]), int(db.positions[t]), int(db.token_ids[t]),
                                ids.tolist(), acts.tolist(), center, text))
    return examples


def top_tokens(db: ActivationDatabase, feature: int, n: int = 10) -> List[Tuple[int, int]]:
    """[(token id, count)] of the token ids on which ``feature`` fires most often (ties: lower id
    first); empty when the database has no token ids."""
    tokens, _ = db.feature_activations(feature)
    ids = db.token_ids[tokens]
    ids = ids[ids >= 0]
    if not ids.numel():
        return []
    uniq, counts = torch.unique(ids, return_counts=True)
    order = torch.sort(counts, descending=True, stable=True).indices[:n]
    return [(int(uniq[i]), int(counts[i])) for i in order]
