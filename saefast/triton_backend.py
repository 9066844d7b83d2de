"""The Triton backend: the backend contract (``saefast.backend``) on the kernels of
``saefast.kernels``, with the semantics of ``saefast.torch_backend``. Imported lazily by
``saefast.ops``.

Exact top-k without the dense matrix. The encode kernel keeps only entries above a threshold
while it computes the GEMM tiles. For BatchTopK the answer is contained in the candidates
exactly when at least B*k candidates survive (or every positive entry survived); TopK checks the
same per row. The thresholds come from a small dense sample of rows (evenly spaced, so no RNG is
consumed) and aim at about CANDIDATE_MARGIN times the needed count; both estimates are
scale-free (multiplying the data by any factor multiplies them by it, without overflow):

* BatchTopK: one threshold, the sample's value of that rank;
* TopK: row r gets ``c * |xc[r]|`` (see ``_row_thresholds``), ``c`` taken so that every sampled
  row keeps its margin.

The candidate buffer is sized from the sample's count. When it overflowed anyway the kernel
reruns with the exact size it counted; when a BatchTopK threshold was too high the step reruns
lower; TopK rows that still have too few candidates go through the PyTorch backend's
``encode_forward`` on those rows alone. Each of these is counted (``encode_counters``): they are
slow paths, reported by the benchmarks. The final choice among candidates uses
``saefast.selection``, so results and tie-breaking are identical on both backends.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from saefast.kernels import adam as _adam_k
from saefast.kernels import decoder_norm as _norm_k
from saefast.kernels import sparse_decode as _sparse_k
from saefast.kernels import topk_encode as _encode_k

from . import torch_backend
from .backend import NORM_EPS
from .selection import csr_offsets, finish_codes, select_batch_top, select_row_top

SAMPLE_ROWS = 64          # rows of the dense sample used to estimate the threshold
CANDIDATE_MARGIN = 2.0    # aim for this many times the needed candidates
CAPACITY_FACTOR = 2.0     # candidate buffer, as a multiple of the larger of the needed and expected counts
MAX_RETRIES = 3
ROW_BUDGET = 8.0          # row mode: most candidates (x B*k) a threshold may aim at to spare odd rows a fallback
BIAS_SHARE = 0.25         # above this share of b_enc in the sampled pre-activations, row thresholds are capped

# How often the encode needed more than one kernel pass, since the last reset_encode_counters():
# a slow path on a GPU, so the benchmarks report these (see encode_counters). Keys
# "<mode>_<event>" for mode batch / row / threshold:
#   calls, rows            encodes and rows encoded
#   capacity_reruns        the candidate buffer overflowed: the kernel ran again with the exact size
#   threshold_reruns       (batch) too few candidates passed the estimate: the kernel ran again lower
#   fallback_calls         encodes where some rows went through the PyTorch backend
#   fallback_rows          rows that went through the PyTorch backend
_COUNTERS: Counter = Counter()


def encode_counters() -> Dict[str, int]:
    """The counters above (zero where nothing happened) since the last :func:`reset_encode_counters`."""
    events = ("calls", "rows", "capacity_reruns", "threshold_reruns", "fallback_calls", "fallback_rows")
    return {f"{mode}_{event}": _COUNTERS[f"{mode}_{event}"] for mode in ("batch", "row", "threshold")
            for event in events}


def reset_encode_counters() -> None:
    _COUNTERS.clear()


def _count(mode: str, event: str, n: int = 1) -> None:
    _COUNTERS[f"{mode}_{event}"] += n


def _sample_pre(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor]) -> Tuple[Tensor, Tensor, float]:
    """(rows, relu(pre) of those rows in fp32, bias share): up to SAMPLE_ROWS evenly spaced rows
    (no RNG); the bias share is the largest over them of |b_enc| / |xc[r] @ W_enc| (0 without b_enc)."""
    B = xc.shape[0]
    m = min(B, SAMPLE_ROWS)
    rows = torch.linspace(0, B - 1, m, device=xc.device).round().long()
    pre = (xc[rows] @ W_enc).float()
    share = 0.0
    if b_enc is not None:
        b = b_enc.float()
        share = float((torch.linalg.vector_norm(b) / torch.linalg.vector_norm(pre, dim=1)).max())
        pre.add_(b)
    return rows, pre.clamp_min_(0), share


def _capacity(needed: float, expected: float) -> int:
    """Candidate buffer size for ``needed`` kept entries when the sample predicts ``expected``
    candidates (a little more on small problems, where a sample's estimate is rough)."""
    return math.ceil(CAPACITY_FACTOR * (max(needed, expected) + 512))


def _run(xc, W_enc, b_enc, row_thr, col_thr, capacity, mode):
    capacity = int(min(capacity, xc.shape[0] * W_enc.shape[1]))
    vals, lats, rows, total, row_count, row_pos = _encode_k.encode_candidates(
        xc, W_enc, b_enc, row_thr, col_thr, capacity)
    if total > capacity:  # the kernel counted exactly how many there are: rerun with room for all
        _count(mode, "capacity_reruns")
        vals, lats, rows, total, row_count, row_pos = _encode_k.encode_candidates(
            xc, W_enc, b_enc, row_thr, col_thr, total)
    return vals[:total], lats[:total], rows[:total], row_count, row_pos


def _encode_batch(xc, W_enc, b_enc, k):
    B, d_sae = xc.shape[0], W_enc.shape[1]
    n_keep = B * k
    rows, pre, _ = _sample_pre(xc, W_enc, b_enc)
    flat = pre.flatten()
    # A value quantile of the sample: aims at CANDIDATE_MARGIN * B * k candidates whatever the
    # scale of the data.
    rank = math.ceil(CANDIDATE_MARGIN * k * rows.numel())
    n_pos_sample = int((flat > 0).sum())
    thr = float(flat.topk(rank).values[-1]) if rank <= n_pos_sample else 0.0
    for attempt in range(MAX_RETRIES):
        if attempt:
            _count("batch", "threshold_reruns")
        expected = B * float((flat >= thr).logical_and_(flat > 0).float().mean()) * d_sae
        row_thr = torch.full((B,), thr, dtype=torch.float32, device=xc.device)
        vals, lats, rws, _, row_pos = _run(xc, W_enc, b_enc, row_thr, None, _capacity(n_keep, expected), "batch")
        if vals.numel() >= n_keep or vals.numel() == int(row_pos.sum()):
            chosen = select_batch_top(vals, rws, lats, d_sae, n_keep)
            return finish_codes(vals[chosen], lats[chosen], rws[chosen], B, d_sae)
        thr = 0.0 if thr <= 0 else thr * 0.25
    _count("batch", "fallback_calls")
    _count("batch", "fallback_rows", B)
    return torch_backend.encode_forward(xc, W_enc, b_enc, mode="batch", k=k)


def _row_scales(xc: Tensor) -> Tensor:
    """The Euclidean norm of each row in fp32, taken of the row divided by its largest magnitude
    (so entries of 1e20 do not overflow, nor 1e-30 underflow) and scaled back."""
    peak = xc.abs().amax(dim=1).float()
    unit = xc.float() / torch.where(peak > 0, peak, torch.ones_like(peak))[:, None]
    return torch.linalg.vector_norm(unit, dim=1) * peak


def _row_thresholds(xc: Tensor, b_enc: Optional[Tensor], rows: Tensor, pre: Tensor, k: int,
                    bias_share: float) -> Tuple[Tensor, float]:
    """Per-row thresholds [B] (fp32) for the k largest of each row, and the number of candidates
    they are expected to pass (from the sample).

    A row's large pre-activations scale with its norm, so row r gets ``c * |xc[r]|``: scale-free,
    whatever the magnitude of the data. ``c`` is the smallest, over the sampled rows, of (the
    row's ``CANDIDATE_MARGIN * k``-th largest pre-activation) / (its norm), so that every sampled
    row gets its margin and rows like them their k. A sampled row with fewer positive entries
    than that margin is best served by all of them, i.e. ``c = 0``, unless the sample then
    predicts more than ``ROW_BUDGET * B * k`` candidates: then ``c`` ignores such rows (which may
    fall back), so that a few odd rows cannot make the kernel keep the dense matrix.
    """
    B, d_sae = xc.shape[0], pre.shape[1]
    scales = _row_scales(xc)
    sampled = scales[rows]
    # 0 where the row has fewer positives than the margin asks
    need = pre.topk(min(d_sae, math.ceil(CANDIDATE_MARGIN * k)), dim=1).values[:, -1]
    informative = sampled > 0  # an all-zero row gets threshold 0 whatever c is
    wide = informative & (need > 0)
    bias_led = b_enc is not None and bias_share > BIAS_SHARE

    def thresholds(use: Tensor) -> Tuple[Tensor, float]:
        if not bool(use.any()):
            thr = torch.zeros_like(scales)
        else:
            thr = float((need[use] / sampled[use]).min()) * scales
            if bias_led:
                # Where b_enc outweighs xc @ W_enc the pre-activations stop scaling with the
                # norm: no threshold goes above the smallest sampled need.
                thr.clamp_max_(float(need[use].min()))
        passing = (pre >= thr[rows][:, None]).logical_and_(pre > 0).sum(1).float().mean()
        return thr.contiguous(), B * float(passing)

    thr, expected = thresholds(informative)
    if bool(wide.any()) and not bool(wide[informative].all()) and expected > ROW_BUDGET * B * k:
        thr, expected = thresholds(wide)
    return thr, expected


def _encode_row(xc, W_enc, b_enc, k):
    B, d_sae = xc.shape[0], W_enc.shape[1]
    rows, pre, bias_share = _sample_pre(xc, W_enc, b_enc)
    row_thr, expected = _row_thresholds(xc, b_enc, rows, pre, k, bias_share)
    capacity = _capacity(B * k, expected)
    vals, lats, rws, row_count, row_pos = _run(xc, W_enc, b_enc, row_thr, None, capacity, "row")
    failed = ((row_count < k) & (row_count < row_pos)).nonzero().flatten()
    if failed.numel():
        _count("row", "fallback_calls")
        _count("row", "fallback_rows", failed.numel())
        keep = ~torch.isin(rws, failed.to(torch.int32))
        redo = torch_backend.encode_forward(xc[failed], W_enc, b_enc, mode="row", k=k)
        vals = torch.cat([vals[keep], redo[0]])
        lats = torch.cat([lats[keep], redo[1]])
        rws = torch.cat([rws[keep], failed.to(torch.int32)[redo[2].long()]])
    chosen = select_row_top(vals, rws, lats, k)
    return finish_codes(vals[chosen], lats[chosen], rws[chosen], B, d_sae)


def _encode_threshold(xc, W_enc, b_enc, threshold):
    B, d_sae = xc.shape[0], W_enc.shape[1]
    rows, pre, _ = _sample_pre(xc, W_enc, b_enc)
    frac = float((pre > threshold[None, :]).float().mean())
    vals, lats, rws, _, _ = _run(xc, W_enc, b_enc, None, threshold, _capacity(0, frac * B * d_sae), "threshold")
    return finish_codes(vals, lats, rws, B, d_sae)


def encode_forward(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], *, mode: str, k: int = 0,
                   threshold: Optional[Tensor] = None):
    """See ``saefast.backend``; ``torch_backend.encode_forward``."""
    if xc.shape[0] == 0 or (mode != "threshold" and k == 0):
        return torch_backend.encode_forward(xc, W_enc, b_enc, mode=mode, k=k, threshold=threshold)
    _count(mode, "calls")
    _count(mode, "rows", xc.shape[0])
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


def decoder_adam_(W_dec: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step_size: float,
                  beta1: float, beta2: float, eps: float, bias_correction2_sqrt: float, project: bool,
                  normalize: bool) -> None:
    """See ``saefast.backend`` (optional); ``saefast.kernels.adam``."""
    _adam_k.decoder_adam_(W_dec, grad, exp_avg, exp_avg_sq, step_size=step_size, beta1=beta1, beta2=beta2,
                          eps=eps, bias_correction2_sqrt=bias_correction2_sqrt, project=project,
                          normalize=normalize, norm_eps=NORM_EPS)
