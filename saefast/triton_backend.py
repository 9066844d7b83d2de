"""The Triton backend: the backend contract (``saefast.backend``) on the kernels of
``saefast.kernels``, with the semantics of ``saefast.torch_backend``. Imported lazily by
``saefast.ops``.

Exact top-k without the dense matrix. The encode kernel keeps only entries above a threshold
``t`` while it computes the GEMM tiles. For BatchTopK the answer is contained in the candidates
exactly when ``t`` is at most the true cut, i.e. when at least B*k candidates survive (or every
positive entry survived); TopK checks the same per row. ``t`` is estimated from a small dense
sample of rows (evenly spaced, so no RNG is consumed) aiming at about twice the needed count.
When the estimate was too high the step reruns lower; when the candidate buffer overflowed it
reruns with the exact size the kernel counted; rows that still fail go through the PyTorch
backend's ``encode_forward`` on those rows alone. The final choice among candidates uses
``saefast.selection``, so results and tie-breaking are identical on both backends.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from saefast.kernels import decoder_norm as _norm_k
from saefast.kernels import sparse_decode as _sparse_k
from saefast.kernels import topk_encode as _encode_k

from . import torch_backend
from .backend import NORM_EPS
from .selection import csr_offsets, finish_codes, select_batch_top, select_row_top

SAMPLE_ROWS = 64          # rows of the dense sample used to estimate the threshold
CANDIDATE_MARGIN = 2.0    # aim for this many times the needed candidates
CAPACITY_FACTOR = 4.0     # candidate buffer, as a multiple of the needed count
MAX_RETRIES = 3


def _sample_pre(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    B = xc.shape[0]
    m = min(B, SAMPLE_ROWS)
    rows = torch.linspace(0, B - 1, m, device=xc.device).round().long()
    sample = xc[rows]
    pre = torch.addmm(b_enc, sample, W_enc) if b_enc is not None else sample @ W_enc
    pre = pre.float().clamp_min_(0)
    return rows, pre


def _run(xc, W_enc, b_enc, row_thr, col_thr, capacity):
    capacity = int(min(capacity, xc.shape[0] * W_enc.shape[1]))
    vals, lats, rows, total, row_count, row_pos = _encode_k.encode_candidates(
        xc, W_enc, b_enc, row_thr, col_thr, capacity)
    if total > capacity:  # the kernel counted exactly how many there are: rerun with room for all
        vals, lats, rows, total, row_count, row_pos = _encode_k.encode_candidates(
            xc, W_enc, b_enc, row_thr, col_thr, total)
    return vals[:total], lats[:total], rows[:total], row_count, row_pos


def _encode_batch(xc, W_enc, b_enc, k):
    B, d_sae = xc.shape[0], W_enc.shape[1]
    n_keep = B * k
    rows, pre = _sample_pre(xc, W_enc, b_enc)
    flat = pre.flatten()
    rank = math.ceil(CANDIDATE_MARGIN * k * rows.numel())
    n_pos_sample = int((flat > 0).sum())
    thr = float(flat.topk(rank).values[-1]) if rank <= n_pos_sample else 0.0
    for _ in range(MAX_RETRIES):
        row_thr = torch.full((B,), thr, dtype=torch.float32, device=xc.device)
        vals, lats, rws, _, row_pos = _run(xc, W_enc, b_enc, row_thr, None, CAPACITY_FACTOR * n_keep)
        if vals.numel() >= n_keep or vals.numel() == int(row_pos.sum()):
            chosen = select_batch_top(vals, rws, lats, d_sae, n_keep)
            return finish_codes(vals[chosen], lats[chosen], rws[chosen], B, d_sae)
        thr = 0.0 if thr <= 0 else thr * 0.25
    return torch_backend.encode_forward(xc, W_enc, b_enc, mode="batch", k=k)


def _encode_row(xc, W_enc, b_enc, k):
    B, d_sae = xc.shape[0], W_enc.shape[1]
    rows, pre = _sample_pre(xc, W_enc, b_enc)
    # The c*k-th value of a row scales roughly with the row's norm; take a low quantile of the
    # ratio over the sample so that most rows get more than k candidates.
    kk = min(d_sae, math.ceil(CANDIDATE_MARGIN * k))
    norms = xc.float().norm(dim=1)
    kth = pre.topk(kk, dim=1).values[:, -1]
    ratio = kth[kth > 0] / norms[rows][kth > 0].clamp_min(1e-30)
    q = float(torch.quantile(ratio, 0.1)) if ratio.numel() else 0.0
    row_thr = (q * norms).contiguous()
    vals, lats, rws, row_count, row_pos = _run(xc, W_enc, b_enc, row_thr, None, CAPACITY_FACTOR * B * k)
    failed = ((row_count < k) & (row_count < row_pos)).nonzero().flatten()
    if failed.numel():
        keep = ~torch.isin(rws, failed.to(torch.int32))
        redo = torch_backend.encode_forward(xc[failed], W_enc, b_enc, mode="row", k=k)
        vals = torch.cat([vals[keep], redo[0]])
        lats = torch.cat([lats[keep], redo[1]])
        rws = torch.cat([rws[keep], failed.to(torch.int32)[redo[2].long()]])
    chosen = select_row_top(vals, rws, lats, k)
    return finish_codes(vals[chosen], lats[chosen], rws[chosen], B, d_sae)


def _encode_threshold(xc, W_enc, b_enc, threshold):
    B, d_sae = xc.shape[0], W_enc.shape[1]
    rows, pre = _sample_pre(xc, W_enc, b_enc)
    frac = float((pre > threshold[None, :]).float().mean())
    capacity = math.ceil(1.5 * frac * B * d_sae) + 1024
    vals, lats, rws, _, _ = _run(xc, W_enc, b_enc, None, threshold, capacity)
    return finish_codes(vals, lats, rws, B, d_sae)


def encode_forward(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], *, mode: str, k: int = 0,
                   threshold: Optional[Tensor] = None):
    """See ``saefast.backend``; ``torch_backend.encode_forward``."""
    if xc.shape[0] == 0 or (mode != "threshold" and k == 0):
        return torch_backend.encode_forward(xc, W_enc, b_enc, mode=mode, k=k, threshold=threshold)
    if mode == "batch":
        return _encode_batch(xc, W_enc, b_enc, k)
    if mode == "row":
        return _encode_row(xc, W_enc, b_enc, k)
    return _encode_threshold(xc, W_enc, b_enc, threshold)


def _by_latent(indices: Tensor, row_ids: Tensor, d_sae: int):
    """Permutation sorting pairs by latent (stable), the sorted latents/rows, segment starts."""
    order = torch.sort(indices, stable=True).indices
    lat_sorted = indices[order].contiguous()
    return order, lat_sorted, row_ids[order].contiguous(), csr_offsets(lat_sorted, d_sae)


def encode_backward(grad_values: Tensor, xc: Tensor, W_enc: Tensor, indices: Tensor, row_ids: Tensor,
                    need_xc: bool, need_W: bool):
    """See ``saefast.backend``; ``torch_backend.encode_backward``."""
    d_in, d_sae = W_enc.shape
    grad_xc = grad_W = None
    if need_xc:
        grad_xc = torch.empty_like(xc)
        # W_enc [d_in, d_sae] read as [d_sae, d_in]: latent stride 1, feature stride d_sae.
        _sparse_k.csr_gather_sum(csr_offsets(row_ids, xc.shape[0]), indices, grad_values, W_enc,
                                 1, d_sae, d_in, grad_xc)
    order, lat_sorted, rows_sorted, seg = _by_latent(indices, row_ids, d_sae)
    grad_b = torch.empty(d_sae, dtype=torch.float32, device=xc.device)
    if need_W:
        grad_W = torch.empty_like(W_enc)
    _sparse_k.segment_outer(seg, lat_sorted, rows_sorted, grad_values[order].contiguous(),
                            xc if need_W else None, grad_W, 1, d_sae, wsum=grad_b)
    return grad_xc, grad_W, grad_b


def decode_forward(values: Tensor, indices: Tensor, offsets: Tensor, row_ids: Tensor, W_dec: Tensor,
                   b_dec: Optional[Tensor]) -> Tensor:
    """See ``saefast.backend``; ``torch_backend.decode_forward``."""
    n_rows, d_in = offsets.numel() - 1, W_dec.shape[1]
    out = torch.empty((n_rows, d_in), dtype=W_dec.dtype, device=W_dec.device)
    return _sparse_k.csr_gather_sum(offsets, indices, values, W_dec, d_in, 1, d_in, out, bias=b_dec)


def decode_backward(grad_out: Tensor, values: Tensor, indices: Tensor, row_ids: Tensor, W_dec: Tensor,
                    need_values: bool, need_W: bool):
    """See ``saefast.backend``; ``torch_backend.decode_backward``."""
    grad_values = grad_W = None
    if need_values:
        grad_values = _sparse_k.pair_dot(row_ids, indices, grad_out, W_dec, torch.empty_like(values))
    if need_W:
        d_sae, d_in = W_dec.shape
        order, lat_sorted, rows_sorted, seg = _by_latent(indices, row_ids, d_sae)
        grad_W = torch.empty_like(W_dec)
        _sparse_k.segment_outer(seg, lat_sorted, rows_sorted, values[order].contiguous(), grad_out, grad_W,
                                d_in, 1)
    return grad_values, grad_W


def normalize_decoder_(W_dec: Tensor) -> None:
    _norm_k.decoder_norm_(W_dec, None, normalize=True, project=False, eps=NORM_EPS)


def project_decoder_grad_(W_dec: Tensor, grad: Tensor) -> None:
    _norm_k.decoder_norm_(W_dec, grad, normalize=False, project=True, eps=NORM_EPS)


def normalize_decoder_and_project_grad_(W_dec: Tensor, grad: Tensor) -> None:
    _norm_k.decoder_norm_(W_dec, grad, normalize=True, project=True, eps=NORM_EPS)
