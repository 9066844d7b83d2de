"""Exact top-k selection rules and the sparse-code layout, shared by every backend (pure
PyTorch, any device).

Both encode backends produce *candidates* (value, row, latent) that are guaranteed to contain
every entry that belongs in the answer, then call these helpers to pick the answer exactly and
lay it out as codes (:func:`finish_codes`: sorted by (row, latent), CSR offsets, smallest kept
value). :func:`csr_offsets` is the one place CSR row offsets are built.

Tie-breaking (documented, deterministic): among equal values the entry with the lower flat
index ``row * d_sae + latent`` wins, i.e. the earlier row, then the lower latent. ``torch.topk``
on the dense matrix makes no promise about ties, so it can keep a different member of a tied
group; the kept values (as a multiset) are always the same.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _order_value_desc(values: Tensor, keys: Tensor) -> Tensor:
    """Permutation sorting by value descending, ties by key ascending."""
    by_key = torch.sort(keys, stable=True).indices
    by_value = torch.sort(values[by_key].float(), descending=True, stable=True).indices
    return by_key[by_value]


def select_batch_top(values: Tensor, row_ids: Tensor, indices: Tensor, d_sae: int, n_keep: int) -> Tensor:
    """Indices into the candidates of the ``n_keep`` largest values (BatchTopK rule)."""
    if values.numel() <= n_keep:
        return torch.arange(values.numel(), device=values.device)
    keys = row_ids.long() * d_sae + indices.long()
    return _order_value_desc(values, keys)[:n_keep]


def select_row_top(values: Tensor, row_ids: Tensor, indices: Tensor, k: int) -> Tensor:
    """Indices into the candidates of each row's ``k`` largest values (TopK rule)."""
    if values.numel() == 0:
        return torch.arange(0, device=values.device)
    order = _order_value_desc(values, indices.long())
    order = order[torch.sort(row_ids[order], stable=True).indices]
    rows = row_ids[order].long()
    n_rows = int(rows[-1]) + 1
    starts = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0) - torch.bincount(rows, minlength=n_rows)
    rank = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    return order[rank < k]


def row_topk_mask(pre: Tensor, k: int) -> Tensor:
    """Dense mask of each row's top ``k`` positive entries of ``pre`` [R, n], ties to lower index."""
    kk = min(k, pre.shape[1])
    if kk == 0 or pre.numel() == 0:
        return torch.zeros_like(pre, dtype=torch.bool)
    kth = pre.topk(kk, dim=1).values[:, -1:]
    above = pre > kth
    tied = pre == kth
    room = kk - above.sum(1, keepdim=True)
    return (above | (tied & (tied.cumsum(1) <= room))) & (pre > 0)


def csr_offsets(row_ids: Tensor, n_rows: int) -> Tensor:
    """Int64 [n_rows + 1] offsets of entries sorted by row: row r owns ``offsets[r]:offsets[r + 1]``."""
    offsets = torch.zeros(n_rows + 1, dtype=torch.long, device=row_ids.device)
    if row_ids.numel():
        torch.cumsum(torch.bincount(row_ids.long(), minlength=n_rows), 0, out=offsets[1:])
    return offsets


def to_csr(values: Tensor, indices: Tensor, row_ids: Tensor, n_rows: int, d_sae: int):
    """Sort entries by (row, latent) and build CSR offsets [n_rows + 1] (int64)."""
    keys = row_ids.long() * d_sae + indices.long()
    order = torch.sort(keys).indices
    row_ids = row_ids[order].to(torch.int32)
    return values[order], indices[order].to(torch.int32), row_ids, csr_offsets(row_ids, n_rows)


def finish_codes(values: Tensor, indices: Tensor, row_ids: Tensor, n_rows: int, d_sae: int):
    """The codes of a backend's encode (see ``saefast.backend``) from the chosen entries in any
    order: (values, indices int32, row_ids int32, offsets int64 [n_rows + 1], kept_min fp32)."""
    values, indices, row_ids, offsets = to_csr(values, indices, row_ids, n_rows, d_sae)
    kept_min = values.float().min() if values.numel() else torch.zeros((), device=values.device)
    return values, indices, row_ids, offsets, kept_min.float()
