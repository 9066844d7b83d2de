"""The Triton backend: the backend contract (``saefast.backend``) on the kernels of
``saefast.kernels``, with the semantics of ``saefast.torch_backend``. Imported lazily by
``saefast.ops``.

Exact top-k without the dense matrix. The encode kernel keeps only entries above a threshold
while it computes the GEMM tiles. For BatchTopK the answer is contained in the candidates
exactly when at least B*k candidates survive (or every positive entry survived); TopK checks the
same per row. The thresholds aim at about CANDIDATE_MARGIN times the needed count and are
scale-free (multiplying the data by any factor multiplies them by it, without overflow):

* BatchTopK: one threshold. The first encode with a weight takes the value of that rank in a
  small dense sample of rows (evenly spaced, so no RNG is consumed); later encodes with the same
  weight tensor (a training run: the weights move a little each step) place it from the previous
  encode's smallest kept value and candidate count (:data:`_BATCH_STATE`), on the device, with
  no sample GEMM and no host synchronisation.
* TopK: row r gets ``c * |xc[r]|`` (see ``_row_thresholds``), ``c`` taken from the sample so that
  every sampled row keeps its margin.

The candidate buffer is sized from the expected count. When it overflowed anyway the kernel
reruns with the exact size it counted; when a BatchTopK threshold was too high the step reruns
lower; TopK rows that still have too few candidates go through the PyTorch backend's
``encode_forward`` on those rows alone. Each of these is counted (``encode_counters``): they are
slow paths, reported by the benchmarks. The final choice among candidates uses
``saefast.selection``, so results and tie-breaking are identical on both backends.

Aux-K (``encode_forward_with_aux``). Where a dense block pays (:func:`aux_dense_pays`: k_aux per
row among few enough dead latents), the main encode kernel also writes the dead latents'
pre-activations into a dense [B, n_dead] buffer as it computes their tiles, each row's top
``k_aux`` is chosen exactly from it (ties to the lower latent), and the aux codes carry a
``DenseBlock``: their decode, its backward and their share of the encoder backward are dense
products over the dead columns (cuBLAS), in row chunks of at most ``DENSE_BLOCK_BYTES``; the
main codes keep the sparse kernels. Otherwise the aux codes come from a row encode of a copy of
the dead columns and go through the sparse kernels like the main ones.

Master weights (``READS_MASTER_WEIGHTS``): with 16-bit activations the backend also takes fp32
W_enc / W_dec (torch.autocast with fp32 parameters). A forward makes one 16-bit copy of the weight
(the cast autocast would make) and keeps it for the backward of the same weight (valid while the
weight's version counter and storage are unchanged), and the backward writes the weight's
gradient straight into fp32, holding the 16-bit gradient's values: no second cast, no cast of the
gradients.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from saefast.kernels import adam as _adam_k
from saefast.kernels import decoder_norm as _norm_k
from saefast.kernels import sparse_decode as _sparse_k
from saefast.kernels import topk_encode as _encode_k

from . import torch_backend
from .backend import NORM_EPS, DenseBlock, EncodeOut, aux_codes_by_copy
from .selection import csr_offsets, finish_codes, select_batch_top, select_row_top

READS_MASTER_WEIGHTS = True
SAMPLE_ROWS = 64          # rows of the dense sample used to estimate the threshold
CANDIDATE_MARGIN = 2.0    # aim for this many times the needed candidates
CAPACITY_FACTOR = 2.0     # candidate buffer, as a multiple of the larger of the needed and expected counts
MAX_RETRIES = 3
ROW_BUDGET = 8.0          # row mode: most candidates (x B*k) a threshold may aim at to spare odd rows a fallback
BIAS_SHARE = 0.25         # above this share of b_enc in the sampled pre-activations, row thresholds are capped
# A carried BatchTopK threshold stays within [CARRY_FLOOR, 1] x the previous smallest kept value.
CARRY_FLOOR = 0.25
# The largest dense [rows, n_dead] temporary of the aux-K block (bytes at 4 per element); bigger
# problems are processed in row chunks, and a fused encode whose whole [B, n_dead] buffer would
# exceed it keeps aux-K sparse.
DENSE_BLOCK_BYTES = 1 << 28
# Aux-K goes dense when n_dead <= ratio * k_aux: a dense product costs every (row, dead latent)
# 2 * d_in FLOPs at the matrix rate R, a sparse one every kept entry d_in elements of e bytes from
# cache at bandwidth W, so dense wins while n_dead / k_aux < R * e / (2 * W): about 100 for 16-bit
# and tf32 tensor cores (H100/H200: 790 or 395 TFLOP/s, 2 or 4 bytes, ~8 TB/s of L2), about 24
# for exact fp32 on the FMA units (67 TFLOP/s, 4 bytes, between L2 and memory bandwidth).
AUX_DENSE_RATIO = {"16bit": 100.0, "tf32": 100.0, "ieee": 24.0}

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


# 16-bit copies of fp32 master weights, by master: (version, data_ptr, copy) of the last forward's.
_COPIES: "WeakTensorKeyDictionary" = WeakTensorKeyDictionary()


def _forward_copy(W: Tensor, dtype: torch.dtype) -> Tensor:
    """W itself, or (a fp32 master with 16-bit activations) a fresh copy in ``dtype``, kept for
    the backward."""
    if W.dtype == dtype:
        return W
    copy = W.to(dtype)
    _COPIES[W] = (W._version, W.data_ptr(), copy)
    return copy


def _backward_copy(W: Tensor, dtype: torch.dtype) -> Tensor:
    """The copy the forward made of W, while W is unchanged; else a new one."""
    if W.dtype == dtype:
        return W
    entry = _COPIES.get(W)
    if entry is not None and entry[0] == W._version and entry[1] == W.data_ptr() and entry[2].dtype == dtype:
        return entry[2]
    return W.to(dtype)


_MM_OUT_DTYPE: Dict[str, bool] = {}


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (same dtype) as fp32, accumulated in fp32: cuBLAS's fp32-output GEMM for 16-bit
    operands where torch has it, else fp32 operands (exact products)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE.get("ok", True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE["ok"] = False
    return a.float() @ b.float()


def _gemm_kind(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "16bit"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# ----------------------------------------------------------------------------------------------
# Encode
# ----------------------------------------------------------------------------------------------

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


def _run(xc, W_enc, b_enc, row_thr, col_thr, capacity, mode, dead_out=None):
    """One kernel pass (two when the candidate buffer overflowed); ``dead_out`` = (slot, buffer)
    asks the pass for the dead columns' dense pre-activations."""
    capacity = int(min(capacity, xc.shape[0] * W_enc.shape[1]))
    slot, buf = dead_out if dead_out is not None else (None, None)
    vals, lats, rows, total, row_count, row_pos = _encode_k.encode_candidates(
        xc, W_enc, b_enc, row_thr, col_thr, capacity, slot, buf)
    if total > capacity:  # the kernel counted exactly how many there are: rerun with room for all
        _count(mode, "capacity_reruns")
        vals, lats, rows, total, row_count, row_pos = _encode_k.encode_candidates(
            xc, W_enc, b_enc, row_thr, col_thr, total)
    return vals[:total], lats[:total], rows[:total], row_count, row_pos


class _BatchState(NamedTuple):
    key: tuple
    threshold: Tensor    # fp32 0-d, device: the threshold the last kernel pass used
    candidates: int      # candidates that pass produced
    kept_min: Tensor     # fp32 0-d, device: the smallest value the encode kept


# BatchTopK thresholds carried from one encode to the next of the same weight tensor.
_BATCH_STATE: "WeakTensorKeyDictionary" = WeakTensorKeyDictionary()


def _carried_threshold(state: _BatchState, n_keep: int) -> Tensor:
    """The next threshold from the last encode's: between (kept_min, n_keep) and (threshold,
    candidates) the count of entries above a value is taken as linear, and the threshold is put
    where it reaches CANDIDATE_MARGIN * n_keep; kept within [CARRY_FLOOR, 1] x kept_min."""
    km, t = state.kept_min, state.threshold
    target = CANDIDATE_MARGIN * n_keep
    if state.candidates > 1.01 * n_keep:
        thr = km - (km - t) * ((target - n_keep) / (state.candidates - n_keep))
    else:
        thr = t * 0.5
    return torch.minimum(torch.maximum(thr, km * CARRY_FLOOR), km)


def _encode_batch(xc, W_enc, b_enc, k, dead_out=None, key_weight=None):
    """BatchTopK; ``key_weight`` (default W_enc) is the tensor the carried threshold belongs to."""
    B, d_sae = xc.shape[0], W_enc.shape[1]
    n_keep = B * k
    key = (B, k, d_sae, xc.dtype, b_enc is None)
    key_weight = W_enc if key_weight is None else key_weight
    state = _BATCH_STATE.get(key_weight)
    if state is not None and state.key == key and bool(state.candidates):
        thr = _carried_threshold(state, n_keep)
        expected = CANDIDATE_MARGIN * n_keep
    else:
        rows, pre, _ = _sample_pre(xc, W_enc, b_enc)
        flat = pre.flatten()
        # A value quantile of the sample: aims at CANDIDATE_MARGIN * B * k candidates whatever the
        # scale of the data.
        rank = math.ceil(CANDIDATE_MARGIN * k * rows.numel())
        n_pos_sample = int((flat > 0).sum())
        thr = flat.topk(rank).values[-1] if rank <= n_pos_sample else flat.new_zeros(())
        expected = B * float((flat >= thr).logical_and_(flat > 0).float().mean()) * d_sae
    for attempt in range(MAX_RETRIES):
        if attempt:
            _count("batch", "threshold_reruns")
            dead_out = None  # written by the first pass
        row_thr = thr.reshape(1).expand(B).contiguous()
        vals, lats, rws, _, row_pos = _run(xc, W_enc, b_enc, row_thr, None, _capacity(n_keep, expected), "batch",
                                           dead_out)
        if vals.numel() >= n_keep or vals.numel() == int(row_pos.sum()):
            chosen = select_batch_top(vals, rws, lats, d_sae, n_keep)
            codes = finish_codes(vals[chosen], lats[chosen], rws[chosen], B, d_sae)
            _BATCH_STATE[key_weight] = _BatchState(key, thr.float(), vals.numel() if vals.numel() > n_keep else 0,
                                              codes[4])
            return codes
        thr = thr * 0.25
        expected = max(expected, 4 * vals.numel())
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


def _encode_row(xc, W_enc, b_enc, k, dead_out=None):
    B, d_sae = xc.shape[0], W_enc.shape[1]
    rows, pre, bias_share = _sample_pre(xc, W_enc, b_enc)
    row_thr, expected = _row_thresholds(xc, b_enc, rows, pre, k, bias_share)
    capacity = _capacity(B * k, expected)
    vals, lats, rws, row_count, row_pos = _run(xc, W_enc, b_enc, row_thr, None, capacity, "row", dead_out)
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
    return _encode(xc, W_enc, b_enc, mode=mode, k=k, threshold=threshold)


def _encode(xc, W_enc, b_enc, *, mode, k=0, threshold=None, dead_out=None):
    """An encode of xc with W_enc (or a fp32 master of it: see the module docstring)."""
    if xc.shape[0] == 0 or (mode != "threshold" and k == 0):
        none = torch.empty(0, dtype=torch.int32, device=xc.device)
        return finish_codes(xc.new_empty(0), none, none, xc.shape[0], W_enc.shape[1])
    _count(mode, "calls")
    _count(mode, "rows", xc.shape[0])
    W = _forward_copy(W_enc, xc.dtype)
    if mode == "batch":
        return _encode_batch(xc, W, b_enc, k, dead_out, key_weight=W_enc)
    if mode == "row":
        return _encode_row(xc, W, b_enc, k, dead_out)
    return _encode_threshold(xc, W, b_enc, threshold)


def aux_dense_pays(n_rows: int, n_dead: int, k_aux: int, dtype: torch.dtype, kind: Optional[str] = None) -> bool:
    """Whether aux-K (``min(k_aux, n_dead)`` per row among ``n_dead`` dead latents, ``n_rows``
    rows, activations of ``dtype``) goes through a dense block (see :data:`AUX_DENSE_RATIO`);
    ``kind`` ("16bit", "tf32", "ieee") overrides the one torch's matmul precision gives."""
    k_eff = min(k_aux, n_dead)
    if n_rows == 0 or k_eff == 0:
        return False
    if n_rows * n_dead * 4 > DENSE_BLOCK_BYTES:
        return False
    return n_dead <= AUX_DENSE_RATIO[kind or _gemm_kind(dtype)] * k_eff


def _select_rows_dense(pre: Tensor, cols: Tensor, k: int) -> Tuple[EncodeOut, Tensor]:
    """Each row's ``k`` largest positive entries of the dense ``pre`` [B, n] (ties to the lower
    column), as codes with indices ``cols[column]`` (cols increasing, so the codes are sorted by
    (row, latent)), and each kept entry's column (int32)."""
    B, n = pre.shape
    kk = min(k, n)
    kth = pre.topk(kk, dim=1).values[:, -1:]
    keep = pre >= kth
    # Ties at a positive cut: only the lower columns of the tied group stay. (Where the cut is
    # not positive the row keeps all its positive entries, whatever the ties.)
    over = (keep.sum(1) > kk) & (kth[:, 0] > 0)
    if bool(over.any()):
        r = over.nonzero().flatten()
        sub, cut = pre[r], kth[r]
        above, tied = sub > cut, sub == cut
        room = kk - above.sum(1, keepdim=True)
        keep[r] = above | (tied & (tied.cumsum(1, dtype=torch.int32) <= room))
    keep &= pre > 0
    where = keep.nonzero()
    rows, slots = where[:, 0].to(torch.int32), where[:, 1]
    values = pre[keep]
    indices = cols[slots].to(torch.int32)
    kept_min = values.float().min() if values.numel() else torch.zeros((), device=pre.device)
    return (values, indices, rows, csr_offsets(rows, B), kept_min.float()), slots.to(torch.int32)


def encode_forward_with_aux(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], *, mode: str, k: int,
                            dead: Tensor, k_aux: int):
    """See ``saefast.backend`` (optional): the main codes and the aux-K codes, the latter with a
    ``DenseBlock`` when :func:`aux_dense_pays` (the dead columns' pre-activations come from the
    main encode's own kernel pass)."""
    B, d_sae = xc.shape[0], W_enc.shape[1]
    n_dead = dead.numel()
    if not (k and aux_dense_pays(B, n_dead, k_aux, xc.dtype)):
        main = encode_forward(xc, W_enc, b_enc, mode=mode, k=k)
        return main, aux_codes_by_copy(encode_forward, xc, W_enc, b_enc, dead, k_aux)
    slot = torch.full((d_sae,), -1, dtype=torch.int32, device=xc.device)
    slot[dead] = torch.arange(n_dead, dtype=torch.int32, device=xc.device)
    pre_dead = torch.empty((B, n_dead), dtype=xc.dtype, device=xc.device)
    main = _encode(xc, W_enc, b_enc, mode=mode, k=k, dead_out=(slot, pre_dead))
    aux, slots = _select_rows_dense(pre_dead, dead, k_aux)
    return main, aux, DenseBlock(0, aux[0].numel(), 0, B, dead, slots)


def aux_forward_dense(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], dead: Tensor, k_aux: int):
    """The aux-K codes alone (``auxk_encode``) as a dense block: (codes, DenseBlock), or None when
    :func:`aux_dense_pays` says no. The dead columns' pre-activations come from one GEMM on a
    copy of those columns."""
    B, n_dead = xc.shape[0], dead.numel()
    if not aux_dense_pays(B, n_dead, k_aux, xc.dtype):
        return None
    pre = _mm_f32(xc, _forward_copy(W_enc, xc.dtype).index_select(1, dead))
    if b_enc is not None:
        pre += b_enc.index_select(0, dead).float()
    aux, slots = _select_rows_dense(pre.to(xc.dtype), dead, k_aux)
    return aux, DenseBlock(0, aux[0].numel(), 0, B, dead, slots)


# ----------------------------------------------------------------------------------------------
# Dense blocks (aux-K): chunks of rows as dense [rows, n_cols] matrices
# ----------------------------------------------------------------------------------------------

def _block_chunks(block: DenseBlock, row_ids: Tensor) -> Iterator[Tuple[int, int, slice, Tensor]]:
    """(r0, r1, entries, local rows) per chunk of the block's rows: rows r0..r1-1 (absolute), the
    slice of the codes' entries in them and those entries' rows minus r0 (int64). Block entries
    are sorted by row; a chunk's dense [r1 - r0, n_cols] fp32 matrix is at most DENSE_BLOCK_BYTES."""
    n_cols = max(block.cols.numel(), 1)
    step = max(1, DENSE_BLOCK_BYTES // (4 * n_cols))
    block_rows = row_ids[block.entry0:block.entry1]
    starts = list(range(block.row0, block.row1, step))
    if len(starts) == 1:
        bounds = [block.entry0, block.entry1]
    else:
        where = torch.tensor(starts[1:], dtype=block_rows.dtype, device=row_ids.device)
        bounds = [block.entry0] + (torch.searchsorted(block_rows, where) + block.entry0).tolist() + [block.entry1]
    for i, r0 in enumerate(starts):
        r1 = min(r0 + step, block.row1)
        sl = slice(bounds[i], bounds[i + 1])
        yield r0, r1, sl, row_ids[sl].long() - r0


def _dense(values: Tensor, rows_local: Tensor, slots: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """The [n_rows, n_cols] matrix holding ``values`` at (rows_local, slots), zeros elsewhere."""
    out = torch.zeros((n_rows, n_cols), dtype=values.dtype, device=values.device)
    return out.index_put_((rows_local, slots.long()), values)


def _slot_map(cols: Tensor, n: int) -> Tensor:
    """int32 [n]: each column's position in ``cols``, -1 for the others."""
    slot = torch.full((n,), -1, dtype=torch.int32, device=cols.device)
    slot[cols] = torch.arange(cols.numel(), dtype=torch.int32, device=cols.device)
    return slot


def _light(t: Tensor, block: Optional[DenseBlock]) -> Tensor:
    """The entries of ``t`` outside the block (a view when the block ends the codes)."""
    if block is None:
        return t
    if block.entry1 == t.numel():
        return t[:block.entry0]
    return torch.cat([t[:block.entry0], t[block.entry1:]])


def _block_slots(block: DenseBlock, sl: slice) -> Tensor:
    return block.slots[sl.start - block.entry0:sl.stop - block.entry0]


# ----------------------------------------------------------------------------------------------
# Encode backward
# ----------------------------------------------------------------------------------------------

def _by_latent(indices: Tensor, row_ids: Tensor, d_sae: int):
    """Permutation sorting pairs by latent (stable), the sorted latents/rows, segment starts."""
    order = torch.sort(indices, stable=True).indices
    lat_sorted = indices[order].contiguous()
    return order, lat_sorted, row_ids[order].contiguous(), csr_offsets(lat_sorted, d_sae)


def encode_backward(grad_values: Tensor, xc: Tensor, W_enc: Tensor, indices: Tensor, row_ids: Tensor,
                    need_xc: bool, need_W: bool):
    """See ``saefast.backend``; ``torch_backend.encode_backward``."""
    return encode_backward_with_block(grad_values, xc, W_enc, indices, row_ids, need_xc, need_W, None)


def encode_backward_with_block(grad_values: Tensor, xc: Tensor, W_enc: Tensor, indices: Tensor, row_ids: Tensor,
                               need_xc: bool, need_W: bool, block: Optional[DenseBlock]):
    """See ``saefast.backend`` (optional). The block's entries go through dense products over
    its columns: their share of grad W_enc is ``dA.T @ xc`` (added by segment_outer as it writes
    those columns), of grad_xc ``dA @ W_enc[:, cols].T``, with dA their value gradients laid out
    densely; the other entries through the sparse kernels."""
    d_in, d_sae = W_enc.shape
    dtype = xc.dtype
    grad_dtype = W_enc.dtype
    if need_xc:
        W_enc = _backward_copy(W_enc, dtype)
    extra = extra_slot = lat_extra = grad_xc = None
    if block is not None and block.cols.numel():
        n_cols = block.cols.numel()
        lat_extra = torch.zeros(n_cols, dtype=torch.float32, device=xc.device)
        if need_W:
            extra = torch.zeros((n_cols, d_in), dtype=torch.float32, device=xc.device)
            extra_slot = _slot_map(block.cols, d_sae)
        W_cols = W_enc.index_select(1, block.cols) if need_xc else None
        if need_xc:
            grad_xc = torch.zeros(xc.shape, dtype=torch.float32, device=xc.device)
        for r0, r1, sl, local in _block_chunks(block, row_ids):
            dA = _dense(grad_values[sl], local, _block_slots(block, sl), r1 - r0, n_cols)
            lat_extra += dA.float().sum(0)
            if need_W:
                extra += _mm_f32(dA.t(), xc[r0:r1])
            if need_xc:
                grad_xc[r0:r1] += _mm_f32(dA, W_cols.t())
    g_light, idx_light, rows_light = (_light(t, block) for t in (grad_values, indices, row_ids))
    if need_xc:
        # W_enc [d_in, d_sae] read as [d_sae, d_in]: latent stride 1, feature stride d_sae.
        part = torch.empty_like(xc)
        _sparse_k.csr_gather_sum(csr_offsets(rows_light, xc.shape[0]), idx_light, g_light, W_enc,
                                 1, d_sae, d_in, part)
        grad_xc = part if grad_xc is None else (grad_xc + part.float()).to(dtype)
    order, lat_sorted, rows_sorted, seg = _by_latent(idx_light, rows_light, d_sae)
    grad_b = torch.empty(d_sae, dtype=torch.float32, device=xc.device)
    grad_W = torch.empty(W_enc.shape, dtype=grad_dtype, device=W_enc.device) if need_W else None
    _sparse_k.segment_outer(seg, lat_sorted, rows_sorted, g_light[order].contiguous(),
                            xc if need_W else None, grad_W, 1, d_sae, wsum=grad_b, extra=extra,
                            extra_slot=extra_slot)
    if lat_extra is not None:
        grad_b.index_add_(0, block.cols, lat_extra)
    return grad_xc, grad_W, grad_b


def weight_matvec(W: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    """See ``saefast.backend`` (optional): W (as its ``dtype`` copy) @ v summed in fp32."""
    W = _backward_copy(W, dtype)
    out = torch.empty(W.shape[0], dtype=torch.float32, device=W.device)
    return _sparse_k.matvec(W, v.float().contiguous(), out)


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------

def decode_forward(values: Tensor, indices: Tensor, offsets: Tensor, row_ids: Tensor, W_dec: Tensor,
                   b_dec: Optional[Tensor]) -> Tensor:
    """See ``saefast.backend``; ``torch_backend.decode_forward``."""
    return decode_forward_with_block(values, indices, offsets, row_ids, W_dec, b_dec, None)


def decode_forward_with_block(values: Tensor, indices: Tensor, offsets: Tensor, row_ids: Tensor, W_dec: Tensor,
                              b_dec: Optional[Tensor], block: Optional[DenseBlock]) -> Tensor:
    """See ``saefast.backend`` (optional): the block's rows as ``A @ W_dec[cols]`` (A their
    entries laid out densely), the other rows by the sparse gather."""
    n_rows, d_in = offsets.numel() - 1, W_dec.shape[1]
    dtype = values.dtype
    W_dec = _forward_copy(W_dec, dtype)
    out = torch.empty((n_rows, d_in), dtype=dtype, device=W_dec.device)
    spans = [(0, n_rows)] if block is None else [(0, block.row0), (block.row1, n_rows)]
    for a, b in spans:
        if b > a:
            _sparse_k.csr_gather_sum(offsets[a:b + 1], indices, values, W_dec, d_in, 1, d_in, out[a:b], bias=b_dec)
    if block is not None and block.row1 > block.row0:
        W_cols = W_dec.index_select(0, block.cols)
        for r0, r1, sl, local in _block_chunks(block, row_ids):
            part = _mm_f32(_dense(values[sl], local, _block_slots(block, sl), r1 - r0, block.cols.numel()), W_cols)
            if b_dec is not None:
                part += b_dec.float()
            out[r0:r1] = part.to(dtype)
    return out


def decode_backward(grad_out: Tensor, values: Tensor, indices: Tensor, row_ids: Tensor, W_dec: Tensor,
                    need_values: bool, need_W: bool):
    """See ``saefast.backend``; ``torch_backend.decode_backward``."""
    return decode_backward_with_block(grad_out, values, indices, row_ids, W_dec, need_values, need_W, None)


def decode_backward_with_block(grad_out: Tensor, values: Tensor, indices: Tensor, row_ids: Tensor, W_dec: Tensor,
                               need_values: bool, need_W: bool, block: Optional[DenseBlock]):
    """See ``saefast.backend`` (optional). Sparse entries: with need_W, one pass over the pairs
    sorted by latent writes grad W_dec and the value gradients together (each W_dec row read
    once); the block's entries: ``G @ W_dec[cols].T`` sampled at them, and ``A.T @ G`` added to
    those rows of grad W_dec."""
    d_sae, d_in = W_dec.shape
    dtype = values.dtype
    grad_dtype = W_dec.dtype
    W_dec = _backward_copy(W_dec, dtype)
    grad_values = torch.empty_like(values) if need_values else None
    extra = extra_slot = None
    if block is not None and block.cols.numel():
        n_cols = block.cols.numel()
        W_cols = W_dec.index_select(0, block.cols) if need_values else None
        if need_W:
            extra = torch.zeros((n_cols, d_in), dtype=torch.float32, device=W_dec.device)
            extra_slot = _slot_map(block.cols, d_sae)
        for r0, r1, sl, local in _block_chunks(block, row_ids):
            slots = _block_slots(block, sl)
            G = grad_out[r0:r1]
            if need_values:
                grad_values[sl] = (G @ W_cols.t())[local, slots.long()]
            if need_W:
                extra += _mm_f32(_dense(values[sl], local, slots, r1 - r0, n_cols).t(), G)
    v_light, idx_light, rows_light = (_light(t, block) for t in (values, indices, row_ids))
    n_light = v_light.numel()
    grad_W = None
    if need_W:
        order, lat_sorted, rows_sorted, seg = _by_latent(idx_light, rows_light, d_sae)
        grad_W = torch.empty(W_dec.shape, dtype=grad_dtype, device=W_dec.device)
        dots = None
        if need_values and n_light:
            dots = torch.empty((-(-d_in // _sparse_k.segment_outer_block_d(d_in, True)), n_light), dtype=torch.float32,
                               device=W_dec.device)
        _sparse_k.segment_outer(seg, lat_sorted, rows_sorted, v_light[order].contiguous(), grad_out, grad_W,
                                d_in, 1, extra=extra, extra_slot=extra_slot, W=W_dec if dots is not None else None,
                                dot=dots)
        if dots is not None:
            light_grads = torch.empty(n_light, dtype=dtype, device=W_dec.device)
            light_grads[order] = dots.sum(0).to(dtype)
    elif need_values and n_light:
        light_grads = _sparse_k.pair_dot(rows_light, idx_light, grad_out, W_dec,
                                         torch.empty(n_light, dtype=dtype, device=W_dec.device))
    if need_values and n_light:
        if block is None:
            grad_values = light_grads
        else:
            grad_values[:block.entry0] = light_grads[:block.entry0]
            grad_values[block.entry1:] = light_grads[block.entry0:]
    return grad_values, grad_W


# ----------------------------------------------------------------------------------------------
# Decoder norm and the fused decoder Adam
# ----------------------------------------------------------------------------------------------

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
