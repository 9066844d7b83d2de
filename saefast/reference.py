"""PyTorch semantics of every saefast op: the CPU path, the fallback, and the tests' oracle.

Notation: B rows (tokens), d_in input width, d_sae latents, k active latents per row.

* encode: ``pre = (x - b_dec) @ W_enc (+ b_enc)``; keep positive entries of ``pre`` chosen by
  ``mode``: ``"batch"`` the B*k largest over the whole batch (BatchTopK), ``"row"`` the k largest
  of each row (TopK), ``"threshold"`` every entry above a threshold (scalar or per latent).
  Output is sparse CSR: values, int32 latent indices, int32 row ids, int64 row offsets [B+1].
  Selection compares values in the output dtype; ties follow ``saefast.selection``.
* decode: ``x_hat[r] = sum_j values[j] * W_dec[indices[j]] + b_dec`` over the row's entries.
* decoder norm: rows of W_dec to unit norm; remove from W_dec.grad each row's component along
  its row.

The dense B x d_sae matrix is never held whole: pre-activations are computed in row chunks of
at most ``CHUNK_ELEMENTS`` entries, and gathers of [nnz, d_in] are chunked the same way.
Backward passes are written out (not autograd) so that they touch only active (row, latent)
pairs: ``index_add_`` scatters and ``embedding_bag`` gathers, O(nnz * d_in) work.
Accumulation is in fp32 (fp64 for fp64 inputs, used by gradcheck).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .selection import row_topk_mask, select_batch_top, to_csr

CHUNK_ELEMENTS = 1 << 24
NORM_EPS = 1e-12
# Candidates kept per row before the global BatchTopK choice, as a multiple of k. Rows that
# may hold more of the global top than that are recomputed, so this only affects speed.
BATCH_ROW_CANDIDATES = 4

EncodeOut = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(n: int, width: int) -> Iterator[Tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _pre(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor]) -> Tensor:
    return torch.addmm(b_enc, xc, W_enc) if b_enc is not None else xc @ W_enc


def _empty_codes(xc: Tensor, W_enc: Tensor):
    dev = xc.device
    return (torch.empty(0, dtype=W_enc.dtype, device=dev), torch.empty(0, dtype=torch.int32, device=dev),
            torch.empty(0, dtype=torch.int32, device=dev))


def _finish(values: Tensor, indices: Tensor, row_ids: Tensor, n_rows: int, d_sae: int) -> EncodeOut:
    values, indices, row_ids, offsets = to_csr(values, indices, row_ids, n_rows, d_sae)
    kept_min = values.float().min() if values.numel() else torch.zeros((), device=values.device)
    return values, indices, row_ids, offsets, kept_min.float()


def _masked_entries(pre: Tensor, mask: Tensor, row0: int):
    where = mask.nonzero()
    return pre[mask], where[:, 1].to(torch.int32), (where[:, 0] + row0).to(torch.int32)


def _encode_batch(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], k: int) -> EncodeOut:
    n_rows, d_sae = xc.shape[0], W_enc.shape[1]
    n_keep = n_rows * k
    k_row = min(d_sae, BATCH_ROW_CANDIDATES * k)
    vals, lats, rows, cut_rows, cut_q = [], [], [], [], []
    for s, e in _chunks(n_rows, d_sae):
        pre = _pre(xc[s:e], W_enc, b_enc)
        top = pre.topk(k_row, dim=1)
        keep = top.values > 0
        truncated = (pre > 0).sum(1) > k_row
        row_idx = torch.arange(s, e, device=xc.device, dtype=torch.int32)
        vals.append(top.values[keep])
        lats.append(top.indices[keep].to(torch.int32))
        rows.append(row_idx[:, None].expand_as(top.indices)[keep])
        cut_rows.append(row_idx[truncated])
        cut_q.append(top.values[truncated, -1].float())
    values, indices, row_ids = torch.cat(vals), torch.cat(lats), torch.cat(rows)
    cut_rows, cut_q = torch.cat(cut_rows), torch.cat(cut_q)
    # A truncated row can hide entries of the global top only if its last candidate reaches the
    # global cut T of the candidates (T is at most the true cut); refetch those rows whole.
    if values.numel() >= n_keep:
        cut = -torch.kthvalue(-values.float(), n_keep).values
    else:
        cut = torch.zeros((), device=xc.device)
    redo = cut_rows[cut_q >= cut]
    if redo.numel():
        keep_old = ~torch.isin(row_ids, redo)
        vals, lats, rows = [values[keep_old]], [indices[keep_old]], [row_ids[keep_old]]
        for s, e in _chunks(redo.numel(), d_sae):
            pre = _pre(xc[redo[s:e].long()], W_enc, b_enc)
            v, lat, r = _masked_entries(pre, (pre.float() >= cut) & (pre > 0), 0)
            vals.append(v)
            lats.append(lat)
            rows.append(redo[s:e][r.long()])
        values, indices, row_ids = torch.cat(vals), torch.cat(lats), torch.cat(rows)
    chosen = select_batch_top(values, row_ids, indices, d_sae, n_keep)
    return _finish(values[chosen], indices[chosen], row_ids[chosen], n_rows, d_sae)


def _encode_masked(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], mask_fn) -> EncodeOut:
    n_rows, d_sae = xc.shape[0], W_enc.shape[1]
    vals, lats, rows = [], [], []
    for s, e in _chunks(n_rows, d_sae):
        pre = _pre(xc[s:e], W_enc, b_enc)
        v, lat, r = _masked_entries(pre, mask_fn(pre), s)
        vals.append(v)
        lats.append(lat)
        rows.append(r)
    if not vals:
        return _finish(*_empty_codes(xc, W_enc), n_rows, d_sae)
    return _finish(torch.cat(vals), torch.cat(lats), torch.cat(rows), n_rows, d_sae)


def encode_forward(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], *, mode: str, k: int = 0,
                   threshold: Optional[Tensor] = None) -> EncodeOut:
    """Sparse codes of ``xc = x - b_dec``: (values, indices, row_ids, offsets, smallest kept value)."""
    if xc.shape[0] == 0 or (mode != "threshold" and k == 0):
        return _finish(*_empty_codes(xc, W_enc), xc.shape[0], W_enc.shape[1])
    if mode == "batch":
        return _encode_batch(xc, W_enc, b_enc, k)
    if mode == "row":
        return _encode_masked(xc, W_enc, b_enc, lambda pre: row_topk_mask(pre, k))
    thr = threshold.to(xc.dtype)
    return _encode_masked(xc, W_enc, b_enc, lambda pre: (pre > thr) & (pre > 0))


def matvec_acc(W: Tensor, v: Tensor) -> Tensor:
    """``W @ v`` for W [n, m] accumulated in fp32 (fp64 for fp64), in column chunks so that no
    full-precision copy of W is made."""
    acc = acc_dtype(W.dtype)
    out = torch.zeros(W.shape[0], dtype=acc, device=W.device)
    v = v.to(acc)
    for s, e in _chunks(W.shape[1], W.shape[0]):
        out += W[:, s:e].to(acc) @ v[s:e]
    return out


def _nnz_chunks(nnz: int, width: int) -> Iterator[slice]:
    for s, e in _chunks(nnz, width):
        yield slice(s, e)


def encode_backward(grad_values: Tensor, xc: Tensor, W_enc: Tensor, indices: Tensor, row_ids: Tensor,
                    need_xc: bool, need_W: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """Gradients of the active values w.r.t. xc and W_enc (each when asked) and the per-latent sum
    of the value gradients (fp32; it is the b_enc gradient, and -W_enc @ it the b_dec one)."""
    d_in, d_sae = W_enc.shape
    acc = acc_dtype(xc.dtype)
    g = grad_values.to(acc)
    lat, rows = indices.long(), row_ids.long()
    grad_b_enc = torch.zeros(d_sae, dtype=acc, device=xc.device).index_add_(0, lat, g)
    grad_W_enc = grad_xc = None
    if need_W:
        grad_W_t = torch.zeros(d_sae, d_in, dtype=acc, device=xc.device)
        for sl in _nnz_chunks(g.numel(), d_in):
            grad_W_t.index_add_(0, lat[sl], g[sl, None] * xc[rows[sl]].to(acc))
        grad_W_enc = grad_W_t.t().to(W_enc.dtype).contiguous()
    if need_xc:
        grad_xc = torch.zeros(xc.shape, dtype=acc, device=xc.device)
        for sl in _nnz_chunks(g.numel(), d_in):
            grad_xc.index_add_(0, rows[sl], g[sl, None] * W_enc[:, lat[sl]].t().to(acc))
        grad_xc = grad_xc.to(xc.dtype)
    return grad_xc, grad_W_enc, grad_b_enc


def decode_forward(values: Tensor, indices: Tensor, offsets: Tensor, row_ids: Tensor, W_dec: Tensor,
                   b_dec: Optional[Tensor]) -> Tensor:
    """x_hat [B, d_in] = per-row sum of values * W_dec rows (+ b_dec)."""
    acc = acc_dtype(W_dec.dtype)
    n_rows = offsets.numel() - 1
    if n_rows == 0:
        out = W_dec.new_zeros((0, W_dec.shape[1]), dtype=acc)
    else:
        out = F.embedding_bag(indices.long(), W_dec.to(acc), offsets, mode="sum",
                              per_sample_weights=values.to(acc), include_last_offset=True)
    if b_dec is not None:
        out = out + b_dec.to(acc)
    return out.to(W_dec.dtype)


def decode_backward(grad_out: Tensor, values: Tensor, indices: Tensor, row_ids: Tensor, W_dec: Tensor,
                    need_values: bool, need_W: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of the active values (a gather of dot products) and of W_dec (a scatter-add)."""
    acc = acc_dtype(W_dec.dtype)
    g = grad_out.to(acc)
    lat, rows = indices.long(), row_ids.long()
    grad_values = grad_W = None
    if need_values:
        grad_values = torch.empty(values.shape, dtype=acc, device=values.device)
        for sl in _nnz_chunks(lat.numel(), W_dec.shape[1]):
            grad_values[sl] = (g[rows[sl]] * W_dec[lat[sl]].to(acc)).sum(1)
        grad_values = grad_values.to(values.dtype)
    if need_W:
        grad_W = torch.zeros(W_dec.shape, dtype=acc, device=W_dec.device)
        for sl in _nnz_chunks(lat.numel(), W_dec.shape[1]):
            grad_W.index_add_(0, lat[sl], values[sl, None].to(acc) * g[rows[sl]])
        grad_W = grad_W.to(W_dec.dtype)
    return grad_values, grad_W


def _unit_rows(W_dec: Tensor) -> Tensor:
    W = W_dec.to(acc_dtype(W_dec.dtype))
    return W / W.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def _remove_parallel(grad: Tensor, unit: Tensor) -> Tensor:
    g = grad.to(unit.dtype)
    return g - (g * unit).sum(1, keepdim=True) * unit


def normalize_decoder_(W_dec: Tensor) -> None:
    """Scale each row of W_dec to unit L2 norm, in place (rows of norm 0 stay 0)."""
    W_dec.copy_(_unit_rows(W_dec))


def project_decoder_grad_(W_dec: Tensor, grad: Tensor) -> None:
    """Remove from each row of ``grad`` its component along the same row of W_dec, in place."""
    grad.copy_(_remove_parallel(grad, _unit_rows(W_dec)))


def normalize_decoder_and_project_grad_(W_dec: Tensor, grad: Tensor) -> None:
    """Both of the above in one pass: rows to unit norm, then the gradient made orthogonal to them."""
    unit = _unit_rows(W_dec)
    grad.copy_(_remove_parallel(grad, unit))
    W_dec.copy_(unit)
