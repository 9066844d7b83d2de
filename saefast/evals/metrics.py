"""Reconstruction metrics of an SAE on activation batches, and planted-feature recovery.

All metrics are computed from the sparse encoding (``sae.encode_sparse`` / ``sae.decode_sparse``),
so no [B, d_sae] tensor is built, and accumulated in float64 over any number of batches:

* ``mse``: mean over all entries of (x - x_hat)^2.
* ``explained_variance``: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, with the mean over all
  rows of all batches (1 for a perfect reconstruction, 0 for predicting the mean).
* ``cosine_similarity``: mean over rows of cos(x, x_hat).
* ``relative_mse``: sum ||x - x_hat||^2 / sum ||x||^2.
* ``l0``: mean number of active latents per row; ``l1``: mean sum of activations per row.
* ``inactive_fraction``: latents that fire on none of these rows (a property of this sample);
  ``dense_fraction``: latents firing on more than ``dense_threshold`` of the rows.
* ``dead_fraction``: latents the SAE counts as dead, i.e. that have not fired in the last
  ``n_batches_to_dead`` training steps (``sae.dead_mask()``, the count the aux-K loss, the
  progress bar and metrics.jsonl use); present when the SAE carries training counters (it has
  fired at least once since they were created or loaded).
* SAEs with nested prefixes (``sae.decode_prefixes``, Matryoshka) add ``explained_variance_prefix_<p>``
  for each prefix size p: the explained variance of the reconstruction from latents 0..p-1 alone.

For a transcoder the batches are :class:`~saefast.data.source.ActivationPair` ``(x, target)`` and
x_hat is its prediction of the target: mse, explained_variance, cosine_similarity and
relative_mse then measure the target.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from torch import Tensor, nn

__all__ = ["reconstruction_metrics", "feature_recovery", "training_dead_fraction"]


@torch.no_grad()
def reconstruction_metrics(sae: nn.Module, batches: Iterable[Any], dense_threshold: float = 0.1) -> Dict[str, float]:
    """Metrics of ``sae`` (in its current train/eval mode) on ``batches`` of [B, d_in] activations
    (a transcoder: ``ActivationPair(x [B, d_in], target [B, d_out])``).

    Returns a dict of floats: mse, explained_variance, cosine_similarity, relative_mse, l0, l1,
    inactive_fraction, dense_fraction, n_rows, dead_fraction when the SAE carries training counters,
    and explained_variance_prefix_<p> for nested-prefix SAEs. Batches are moved to the SAE's device
    and dtype.
    """
    if not 0 < dense_threshold <= 1:
        raise ValueError(f"dense_threshold={dense_threshold} must be in (0, 1]")
    from ..data.source import split_pair

    param = next(sae.parameters())
    config = getattr(sae, "config", None)
    needs_x = bool(getattr(config, "input_unit_norm", False) or getattr(config, "skip_connection", False))
    transcoder = bool(getattr(config, "is_transcoder", False))
    d_sae = None
    n_rows = 0
    sq_err = sum_x = sum_x2 = cos_sum = l1_sum = 0.0
    nnz = 0
    counts = None
    d_in = None
    decode_prefixes = getattr(sae, "decode_prefixes", None)
    prefix_sq_err = None
    for batch in batches:
        x, target = split_pair(batch)
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"each batch must be a [batch, d_in] tensor, got {getattr(x, 'shape', type(x))}")
        if transcoder and (not isinstance(target, Tensor) or target.shape[0] != x.shape[0]):
            raise ValueError("a transcoder's metrics need ActivationPair(x, target) batches: its output is compared "
                             "with the target")
        x = x.to(device=param.device, dtype=param.dtype)
        acts = sae.encode_sparse(x)
        # standardisation is undone, and a skip connection reads, with the rows that were encoded
        x_hat = sae.decode_sparse(acts, x) if needs_x else sae.decode_sparse(acts)
        y = target.to(device=param.device, dtype=param.dtype) if transcoder else x
        xd, hd = y.double(), x_hat.double()
        diff2 = (xd - hd).pow(2).sum(dim=1)
        sq_err += diff2.sum().item()
        if decode_prefixes is not None:
            nested = decode_prefixes(acts, x) if needs_x else decode_prefixes(acts)
            err = (nested.double() - xd).pow(2).sum(dim=(1, 2))
            prefix_sq_err = err if prefix_sq_err is None else prefix_sq_err + err
        sum_x = sum_x + xd.sum(dim=0)
        sum_x2 += xd.pow(2).sum().item()
        cos_sum += torch.nn.functional.cosine_similarity(xd, hd, dim=1, eps=1e-12).sum().item()
        l1_sum += acts.values.double().abs().sum().item()
        nnz += acts.nnz
        c = acts.counts()
        counts = c if counts is None else counts + c
        d_sae, d_in = acts.d_sae, y.shape[1]
        n_rows += x.shape[0]
    if n_rows == 0:
        raise ValueError("reconstruction_metrics got no rows: batches is empty")
    # total variance around the mean of all rows: sum ||x||^2 - n * ||mean||^2
    mean = sum_x / n_rows
    total_var = sum_x2 - n_rows * mean.pow(2).sum().item()
    metrics = {
        "mse": sq_err / (n_rows * d_in),
        "explained_variance": 1.0 - sq_err / total_var if total_var > 0 else float("nan"),
        "cosine_similarity": cos_sum / n_rows,
        "relative_mse": sq_err / sum_x2 if sum_x2 > 0 else float("nan"),
        "l0": nnz / n_rows,
        "l1": l1_sum / n_rows,
        "inactive_fraction": (counts == 0).sum().item() / d_sae,
        "dense_fraction": (counts > dense_threshold * n_rows).sum().item() / d_sae,
        "n_rows": n_rows,
    }
    if prefix_sq_err is not None:
        for size, err in zip(sae.config.prefix_sizes, prefix_sq_err.tolist()):
            metrics[f"explained_variance_prefix_{size}"] = 1.0 - err / total_var if total_var > 0 else float("nan")
    dead = training_dead_fraction(sae)
    if dead is not None:
        metrics["dead_fraction"] = dead
    return metrics


def training_dead_fraction(sae: nn.Module) -> Optional[float]:
    """The fraction of latents ``sae`` counts as dead (``sae.dead_mask()``: not fired in the last
    ``n_batches_to_dead`` training steps), or None when the SAE has no training counters (none of
    its latents has fired since they were created or loaded, e.g. a folder from another library)."""
    fired = getattr(sae, "ever_fired", None)
    if not callable(getattr(sae, "dead_mask", None)) or fired is None or not bool(fired.any()):
        return None
    return sae.dead_mask().float().mean().item()


@torch.no_grad()
def feature_recovery(W_dec: Tensor, true_features: Tensor, chunk: int = 4096) -> float:
    """Mean over planted features of the best cosine similarity with any learned decoder row.

    W_dec: [d_sae, d_in] learned decoder; true_features: [n_features, d_in] planted directions.
    1.0 means every planted direction has an exact copy in the dictionary.
    """
    if W_dec.dim() != 2 or true_features.dim() != 2:
        raise ValueError(f"W_dec {tuple(W_dec.shape)} and true_features {tuple(true_features.shape)} must be 2-D")
    if W_dec.shape[1] != true_features.shape[1]:
        raise ValueError(f"W_dec has d_in={W_dec.shape[1]} but true_features has d_in={true_features.shape[1]}; "
                         "pass W_dec as [d_sae, d_in]")
    learned = torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=1)
    planted = torch.nn.functional.normalize(true_features.detach().float().cpu(), dim=1)
    best = torch.cat([(planted[s:s + chunk] @ learned.T).max(dim=1).values
                      for s in range(0, planted.shape[0], chunk)])
    return best.mean().item()
