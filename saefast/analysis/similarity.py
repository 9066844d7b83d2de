"""Feature similarity (decoder directions) and co-occurrence (from an activation database).

* :func:`decoder_neighbours`: for each feature, the ``top_n`` other features with the largest
  cosine similarity between decoder rows. Computed in chunks of query rows (``chunk_size x d_sae``
  similarities at a time), on the decoder's device, so dictionaries of 2^16 features and more fit.
* :func:`cooccurrence_counts`: the sparse matrix ``C[i, j]`` = number of tokens on which features
  i and j both fire (``C[i, i]`` = firing count), from the database's sparse entries, in chunks of
  tokens; never a dense ``[n_tokens, d_sae]`` matrix, and a dense ``[F, F]`` one only if asked.
* :func:`cooccurrence_scores`: Jaccard, conditional probability P(j | i), PMI or the Pearson
  correlation of the firing indicators, on the nonzero counts.
* :func:`cooccurring_features`: the features that fire together with one feature most, straight
  from that feature's tokens (no pairwise matrix).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .database import ActivationDatabase

__all__ = ["decoder_neighbours", "cooccurrence_counts", "cooccurrence_scores", "cooccurring_features",
           "COOCCURRENCE_METRICS"]

COOCCURRENCE_METRICS = ("count", "jaccard", "conditional", "pmi", "correlation")
_SIM_ELEMENTS = 2 ** 24  # similarities per chunk by default (64 MiB in fp32)


def _feature_list(features: Optional[Union[Sequence[int], Tensor]], d_sae: int, name: str = "features") -> Tensor:
    if features is None:
        return torch.arange(d_sae)
    ids = torch.as_tensor(features).reshape(-1)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer feature ids, got dtype {ids.dtype}")
    ids = ids.long().cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= d_sae):
        raise ValueError(f"{name} must lie in [0, d_sae={d_sae})")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"{name} contains repeated feature ids")
    return ids


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, top_n: int = 10, features: Optional[Union[Sequence[int], Tensor]] = None,
                       chunk_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Nearest features by decoder cosine similarity.

    Args:
        W_dec: [d_sae, d_in] decoder (rows = feature directions; need not be unit norm).
        top_n: neighbours per feature (at most d_sae - 1); the feature itself is excluded.
        features: query features (default: all).
        chunk_size: query rows per chunk (default: as many as keep a chunk at 2^24 similarities).

    Returns (cosines [n_query, top_n] fp32, feature ids [n_query, top_n] int64) on the CPU, by
    decreasing cosine (equal cosines: lower feature id first among those returned). A zero decoder
    row has cosine 0 with everything.
    """
    if not isinstance(W_dec, Tensor) or W_dec.dim() != 2:
        raise ValueError(f"W_dec must be a [d_sae, d_in] tensor, got "
                         f"{tuple(W_dec.shape) if isinstance(W_dec, Tensor) else type(W_dec).__name__}")
    d_sae = W_dec.shape[0]
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= d_sae - 1:
        raise ValueError(f"top_n={top_n!r} must be between 1 and d_sae - 1 = {d_sae - 1}")
    queries = _feature_list(features, d_sae)
    if chunk_size is None:
        chunk_size = max(1, _SIM_ELEMENTS // d_sae)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    unit = torch.nn.functional.normalize(W_dec.detach().float(), dim=1)
    values, indices = [], []
    for start in range(0, queries.numel(), chunk_size):
        q = queries[start:start + chunk_size].to(unit.device)
        sims = unit[q] @ unit.T                                       # [chunk, d_sae]
        sims[torch.arange(q.numel(), device=unit.device), q] = -math.inf   # not its own neighbour
        # topk picks arbitrarily among values equal to the cut-off: keep everything above it and
        # the lowest ids equal to it, so the result is exact and deterministic
        cut = torch.topk(sims, top_n, dim=1).values[:, -1:]
        above = sims > cut
        tied = sims == cut
        room = top_n - above.sum(dim=1, keepdim=True)
        chosen = above | (tied & (torch.cumsum(tied.int(), dim=1) <= room))
        i = torch.nonzero(chosen)[:, 1].reshape(q.numel(), top_n)      # ids in increasing order
        v = torch.gather(sims, 1, i)
        order = torch.sort(v, dim=1, descending=True, stable=True).indices
        values.append(torch.gather(v, 1, order).cpu())
        indices.append(torch.gather(i, 1, order).cpu())
    if not values:
        return torch.zeros(0, top_n), torch.zeros(0, top_n, dtype=torch.long)
    return torch.cat(values), torch.cat(indices)


def cooccurrence_counts(db: ActivationDatabase, features: Optional[Union[Sequence[int], Tensor]] = None,
                        max_pairs: int = 2 ** 24) -> Tensor:
    """Sparse co-occurrence counts among ``features`` (default: all d_sae features).

    Returns a coalesced ``torch.sparse_coo_tensor`` int64 ``[F, F]`` (F = len(features); row/column
    i is ``features[i]``) with ``C[i, j]`` = number of tokens where both fire; the diagonal holds the
    firing counts. Tokens are processed in chunks of at most ``max_pairs`` (token-local) pairs.
    """
    if not isinstance(db, ActivationDatabase):
        raise TypeError(f"db must be an ActivationDatabase, got {type(db).__name__}")
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
        raise ValueError(f"max_pairs={max_pairs!r} must be a positive integer")
    ids = _feature_list(features, db.d_sae)
    n_f = ids.numel()
    local = torch.full((db.d_sae,), -1, dtype=torch.long)
    local[ids] = torch.arange(n_f)
    f = local[db.feature_ids.long()]
    keep = f >= 0
    f, tok = f[keep], db.token_index[keep]           # still sorted by token
    k = torch.bincount(tok, minlength=db.n_tokens)   # selected features per token
    starts = torch.cumsum(k, 0) - k
    pairs_per_token = k * k
    cum_pairs = torch.cumsum(pairs_per_token, 0)
    keys_acc: List[Tensor] = []
    counts_acc: List[Tensor] = []
    t0 = 0
    while t0 < db.n_tokens:
        # take tokens while their pairs fit (at least one token per chunk)
        base = int(cum_pairs[t0 - 1]) if t0 else 0
        t1 = int(torch.searchsorted(cum_pairs, torch.tensor(base + max_pairs), right=True))
        t1 = max(t1, t0 + 1)
        lo, hi = int(starts[t0]), int(starts[t1 - 1] + k[t1 - 1])
        if hi > lo:
            ef, et = f[lo:hi], tok[lo:hi]
            rep = k[et]                                        # each entry pairs with its token's entries
            rows = torch.repeat_interleave(ef, rep)
            first = torch.repeat_interleave(starts[et] - lo, rep)
            within = torch.arange(rows.numel()) - torch.repeat_interleave(torch.cumsum(rep, 0) - rep, rep)
            cols = ef[first + within]
            uniq, cnt = torch.unique(rows * n_f + cols, return_counts=True)
            keys_acc.append(uniq)
            counts_acc.append(cnt)
            if len(keys_acc) > 8:  # bound memory: fold the partial counts together
                merged_keys, merged_counts = _merge(keys_acc, counts_acc)
                keys_acc, counts_acc = [merged_keys], [merged_counts]
        t0 = t1
    if keys_acc:
        keys, counts = _merge(keys_acc, counts_acc)
    else:
        keys, counts = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    indices = torch.stack([keys // max(n_f, 1), keys % max(n_f, 1)])
    return torch.sparse_coo_tensor(indices, counts, (n_f, n_f), is_coalesced=True, check_invariants=False)


def _merge(keys: List[Tensor], counts: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Sum counts of equal keys over several (sorted unique keys, counts) pairs."""
    all_keys, all_counts = torch.cat(keys), torch.cat(counts)
    uniq, inverse = torch.unique(all_keys, return_inverse=True)
    return uniq, torch.zeros(uniq.numel(), dtype=torch.long).index_add_(0, inverse, all_counts)


def _score(c: Tensor, ci: Tensor, cj: Tensor, n: float, metric: str) -> Tensor:
    """Score of co-occurrence counts c given firing counts ci, cj over n tokens (fp64)."""
    if metric == "count":
        return c
    if metric == "jaccard":
        return c / (ci + cj - c)
    if metric == "conditional":
        return c / ci
    if metric == "pmi":
        return torch.log(c * n / (ci * cj))
    var = (ci * (n - ci) * cj * (n - cj)).sqrt()
    return torch.where(var > 0, (n * c - ci * cj) / var.clamp_min(1e-300), torch.zeros_like(c))


def cooccurrence_scores(counts: Tensor, n_tokens: int, metric: str = "jaccard") -> Tensor:
    """Scores of the nonzero entries of a co-occurrence matrix from :func:`cooccurrence_counts`.

    metric: ``"count"``; ``"jaccard"`` C_ij / (C_ii + C_jj - C_ij); ``"conditional"`` P(j fires | i
    fires) = C_ij / C_ii; ``"pmi"`` log(C_ij n_tokens / (C_ii C_jj)); ``"correlation"`` Pearson
    correlation of the two firing indicators over the n_tokens tokens (0 when either fires on
    every token). Returns a sparse fp64 tensor with the same pattern (pairs that never co-occur,
    whose score is 0, -inf or negative, are left out).
    """
    if metric not in COOCCURRENCE_METRICS:
        raise ValueError(f"metric={metric!r} must be one of {COOCCURRENCE_METRICS}")
    if not isinstance(counts, Tensor) or not counts.is_sparse or counts.dim() != 2:
        raise TypeError("counts must be the sparse [F, F] tensor returned by cooccurrence_counts")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} must be a positive integer")
    counts = counts.coalesce()
    (i, j), c = counts.indices(), counts.values().double()
    diag = torch.zeros(counts.shape[0], dtype=torch.float64)
    on_diag = i == j
    diag[i[on_diag]] = c[on_diag]
    score = _score(c, diag[i], diag[j], float(n_tokens), metric)
    return torch.sparse_coo_tensor(counts.indices(), score, counts.shape, is_coalesced=True, check_invariants=False)


def cooccurring_features(db: ActivationDatabase, feature: int, top_n: int = 10,
                         metric: str = "jaccard") -> List[Tuple[int, int, float]]:
    """[(other feature, co-occurrence count, score)] of the ``top_n`` features with the highest
    ``metric`` (see :func:`cooccurrence_scores`) with ``feature``, from ``feature``'s tokens only
    (ties: higher count, then lower id, first). Empty when the feature never fires."""
    if metric not in COOCCURRENCE_METRICS:
        raise ValueError(f"metric={metric!r} must be one of {COOCCURRENCE_METRICS}")
    tokens, _ = db.feature_activations(feature)
    if not tokens.numel():
        return []
    offsets = db.token_offsets
    lens = offsets[tokens + 1] - offsets[tokens]
    first = torch.repeat_interleave(offsets[tokens], lens)
    within = torch.arange(first.numel()) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    others = db.feature_ids[first + within].long()
    pair = torch.bincount(others, minlength=db.d_sae)
    pair[feature] = 0
    cand = torch.nonzero(pair).flatten()
    if not cand.numel():
        return []
    totals = db.feature_counts().double()
    score = _score(pair[cand].double(), totals[feature], totals[cand], float(db.n_tokens), metric)
    # cand is in increasing id order; stable sorts give (score desc, count desc, id asc)
    order = torch.sort(pair[cand], descending=True, stable=True).indices
    order = order[torch.sort(score[order], descending=True, stable=True).indices][:top_n]
    return [(int(cand[o]), int(pair[cand[o]]), float(score[o])) for o in order]
