"""The PyTorch backend: every op of the backend contract (``saefast.backend``) in PyTorch.

It runs on every device (the CPU path, and the path for anything that is not CUDA) and states
the semantics the Triton backend must reproduce. Notation: B rows (tokens), d_in input width,
d_sae latents, k active latents per row.

* encode: ``pre = (x - b_dec) @ W_enc (+ b_enc)``; keep positive entries of ``pre`` chosen by
  ``mode``: ``"batch"`` the B*k largest over the whole batch (BatchTopK), ``"row"`` the k largest
  of each row (TopK), ``"threshold"`` every entry above a threshold (scalar or per latent).
  Output is sparse CSR: values, int32 latent indices, int32 row ids, int64 row offsets [B+1].
  Selection compares values in the output dtype (a threshold is float32, compared with the
  values widened exactly to float32); ties follow ``saefast.selection``.
* decode: ``x_hat[r] = sum_j values[j] * W_dec[indices[j]] + b_dec`` over the row's entries.
* decoder norm: rows of W_dec to unit norm; remove from W_dec.grad each row's component along
  its row.

The dense B x d_sae matrix is never held whole: pre-activations are computed in row chunks of
at most ``CHUNK_ELEMENTS`` entries.
Backward passes are written out (not autograd) so that they touch only active (row, latent)
pairs, O(nnz * d_in) work. On the CPU the active values form a ``torch.sparse`` CSR matrix
S [B, d_sae] and the gradients are sparse-dense products (``xc.T @ S``, ``S @ W_enc.T``,
``S.T @ grad_out``) and a sampled product (``torch.sparse.sampled_addmm``): multi-threaded sparse
BLAS (bf16/fp16 operands are widened to fp32 first, as those kernels take no 16-bit floats). The
products with a weight run over blocks of latents (``_latent_blocks``), so a weight gradient
costs its own buffer and nothing more of its size. On
other devices (``SPARSE_BLAS_DEVICES``) they are ``index_add_`` scatters and gathers of [nnz, d_in]
rows, chunked like the pre-activations. Accumulation is in fp32 (fp64 for fp64 inputs, used by
gradcheck).

On the CPU, where ``saefast.cpu_kernels`` is available (C++ built on first use; switched off
with ``SAEFAST_CPU_KERNELS=0``), its kernels replace the hot loops with the same results: the
TopK/BatchTopK encode runs the GEMM one block of ``ENCODE_BLOCK_ELEMENTS`` at a time and selects
while the block is in cache (the aux-K codes among dead latents in the same pass, see
:func:`encode_forward_with_aux`); the weight and value gradients walk the pairs grouped by latent
and write each gradient row once; the decoder projection and renormalisation take one pass per
row. Weight gradients go into buffers reused across steps (:func:`_grad_buffer`). Everything
else, and every other device, runs the PyTorch code below.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels
from .backend import NORM_EPS, EncodeOut, acc_dtype, aux_codes_by_copy, unfired
from .selection import csr_offsets, finish_codes, row_topk_mask, select_batch_top

CHUNK_ELEMENTS = 1 << 24
# Devices whose backward passes use torch.sparse CSR products (multi-threaded sparse BLAS; profiled
# on the CPU, where it is 5-20x faster than gathers and scatters). Elsewhere this backend uses plain
# gathers and index_add_ scatters.
SPARSE_BLAS_DEVICES = ("cpu",)
# The CPU weight gradients S.T @ dense are computed this many output elements at a time.
LATENT_BLOCK_ELEMENTS = 1 << 19
# Candidates kept per row before the global BatchTopK choice, as a multiple of k. Rows that
# may hold more of the global top than that are recomputed, so this only affects speed.
BATCH_ROW_CANDIDATES = 4
# Encode on the CPU kernels' path: the GEMM runs one block of latent columns at a time, each
# block [B, columns] holding about this many entries (4 MiB in fp32: it stays in cache while
# the selection reads it).
ENCODE_BLOCK_ELEMENTS = 1 << 20
_SELECT_MODES = {"batch": 1, "row": 2}
# encode_forward_with_aux(exclude_fired=True) on the CPU kernels: candidates each row keeps, as a
# multiple of k_aux, before the fired latents are dropped. Rows left short are recomputed, so this
# only affects speed: 2 covers the benchmark's dead latents, which fire as often as live ones.
AUX_KEEP_EXCLUDING_FIRED = 2


def _kernels(t: Tensor):
    """The C++ CPU kernels (``saefast.cpu_kernels``) for CPU tensors, or None (other devices, or
    kernels unavailable or switched off: then the PyTorch code below runs)."""
    return cpu_kernels.kernels() if t.device.type == "cpu" else None


def _block_columns(n_rows: int, d_sae: int) -> int:
    return max(16, min(d_sae, ENCODE_BLOCK_ELEMENTS // max(n_rows, 1)))


def _codes(values: Tensor, indices: Tensor, row_ids: Tensor, offsets: Tensor) -> EncodeOut:
    """Codes from entries already sorted by (row, latent) with their CSR offsets."""
    kept_min = values.float().min() if values.numel() else torch.zeros((), device=values.device)
    return values, indices, row_ids, offsets, kept_min.float()


# Gradient buffers reused across steps, per weight (CPU). A fresh [d_sae, d_in] buffer costs the
# OS's zeroing of its pages on first touch (50 ms for 128 MiB on the benchmark CPU), every step,
# since large blocks go back to the OS when freed. A buffer is handed out again only when nothing
# but this cache holds its memory (the previous step's gradient was cleared, e.g. by
# ``zero_grad(set_to_none=True)``), so a gradient still in use is never overwritten. Up to
# GRAD_BUFFERS_PER_WEIGHT per weight. A step whose loss reaches a weight through two nodes (the
# classic and dict APIs' separate aux-K encode and decode) asks for a second one, which autograd
# adds into the first; keeping it too measured 0.13-0.25 GiB more peak memory for those steps
# (it stays resident through the forward), so it is allocated each time instead.
GRAD_BUFFERS_PER_WEIGHT = 1
_GRAD_BUFFERS: Dict[int, Tuple["weakref.ref", list]] = {}
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _is_free(keeper: Tensor) -> bool:
    # One reference from the keeper and one from the storage object asked for here.
    return _storage_use_count(keeper.untyped_storage()._cdata) <= 2


def _grad_buffer(weight: Tensor) -> Tensor:
    """An uninitialised tensor shaped like ``weight`` for its gradient, reused when free."""
    if _storage_use_count is None:
        return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    key = id(weight)
    entry = _GRAD_BUFFERS.get(key)
    if entry is None or entry[0]() is not weight:
        entry = (weakref.ref(weight, lambda _ref, key=key: _GRAD_BUFFERS.pop(key, None)), [])
        _GRAD_BUFFERS[key] = entry
    keepers = entry[1]
    # A view: autograd takes over a returned gradient without copying only when nothing else
    # holds that tensor object.
    for keeper in keepers:
        if keeper.shape == weight.shape and keeper.dtype == weight.dtype and _is_free(keeper):
            return keeper.view(keeper.shape)
    keeper = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if len(keepers) < GRAD_BUFFERS_PER_WEIGHT:
        keepers.append(keeper)
    return keeper.view(keeper.shape)


def _chunks(n: int, width: int) -> Iterator[Tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _pre(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    return torch.addmm(b_enc, xc, W_enc, out=out) if b_enc is not None else torch.mm(xc, W_enc, out=out)


def _pre_chunks(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor]) -> Iterator[Tuple[int, int, Tensor]]:
    """(s, e, pre of rows s..e-1) in row chunks, each written into the same buffer: a chunk is
    tens of MB, and a fresh one per chunk costs the OS's zeroing of its pages every time (a
    quarter of the encode GEMM's time on a CPU). A chunk is only valid until the next one."""
    buf = None
    for s, e in _chunks(xc.shape[0], W_enc.shape[1]):
        if buf is None:
            buf = torch.empty((e - s, W_enc.shape[1]), dtype=xc.dtype, device=xc.device)
        yield s, e, _pre(xc[s:e], W_enc, b_enc, out=buf[:e - s])


def _empty_codes(xc: Tensor, W_enc: Tensor):
    dev = xc.device
    return (torch.empty(0, dtype=W_enc.dtype, device=dev), torch.empty(0, dtype=torch.int32, device=dev),
            torch.empty(0, dtype=torch.int32, device=dev))


def _masked_entries(pre: Tensor, mask: Tensor, row0: int):
    where = mask.nonzero()
    return pre[mask], where[:, 1].to(torch.int32), (where[:, 0] + row0).to(torch.int32)


def _encode_batch(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], k: int) -> EncodeOut:
    n_rows, d_sae = xc.shape[0], W_enc.shape[1]
    n_keep = n_rows * k
    k_row = min(d_sae, BATCH_ROW_CANDIDATES * k)
    # One value past the candidates tells, without another pass over pre, whether a row has
    # more positives than it kept and how large the largest entry it left out can be.
    k_top = min(d_sae, k_row + 1)
    vals, lats, rows, cut_rows, cut_q = [], [], [], [], []
    for s, e, pre in _pre_chunks(xc, W_enc, b_enc):
        top = pre.topk(k_top, dim=1)
        top_values, top_indices = top.values[:, :k_row], top.indices[:, :k_row]
        keep = top_values > 0
        row_idx = torch.arange(s, e, device=xc.device, dtype=torch.int32)
        vals.append(top_values[keep])
        lats.append(top_indices[keep].to(torch.int32))
        rows.append(row_idx[:, None].expand_as(top_indices)[keep])
        if k_top > k_row:
            left_out = top.values[:, k_row]
            truncated = left_out > 0
            cut_rows.append(row_idx[truncated])
            cut_q.append(left_out[truncated].float())
    values, indices, row_ids = torch.cat(vals), torch.cat(lats), torch.cat(rows)
    # A truncated row can hide entries of the global top only if the largest entry it left out
    # reaches the global cut T of the candidates (T is at most the true cut); refetch those rows.
    if values.numel() >= n_keep:
        cut = -torch.kthvalue(-values.float(), n_keep).values
    else:
        cut = torch.zeros((), device=xc.device)
    redo = torch.cat(cut_rows)[torch.cat(cut_q) >= cut] if cut_rows else row_ids[:0]
    if redo.numel():
        keep_old = ~torch.isin(row_ids, redo)
        vals, lats, rows = [values[keep_old]], [indices[keep_old]], [row_ids[keep_old]]
        for s, e, pre in _pre_chunks(xc[redo.long()], W_enc, b_enc):
            v, lat, r = _masked_entries(pre, (pre.float() >= cut) & (pre > 0), 0)
            vals.append(v)
            lats.append(lat)
            rows.append(redo[s:e][r.long()])
        values, indices, row_ids = torch.cat(vals), torch.cat(lats), torch.cat(rows)
    chosen = select_batch_top(values, row_ids, indices, d_sae, n_keep)
    return finish_codes(values[chosen], indices[chosen], row_ids[chosen], n_rows, d_sae)


def _encode_row(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], k: int) -> EncodeOut:
    """Each row's k largest positive entries: torch.topk, except for rows where a tie straddles
    the cut (topk's pick among equal values is arbitrary), which take the exact rule."""
    n_rows, d_sae = xc.shape[0], W_enc.shape[1]
    k_top = min(d_sae, k + 1)
    vals, lats, rows = [], [], []
    for s, e, pre in _pre_chunks(xc, W_enc, b_enc):
        top = pre.topk(k_top, dim=1)
        top_values, top_indices = top.values[:, :k], top.indices[:, :k]
        row_idx = torch.arange(s, e, device=xc.device, dtype=torch.int32)
        if k_top > k:
            tied = (top.values[:, k - 1] == top.values[:, k]) & (top.values[:, k - 1] > 0)
        else:
            tied = torch.zeros(e - s, dtype=torch.bool, device=xc.device)
        keep = (top_values > 0) & ~tied[:, None]
        vals.append(top_values[keep])
        lats.append(top_indices[keep].to(torch.int32))
        rows.append(row_idx[:, None].expand_as(top_indices)[keep])
        if bool(tied.any()):
            redo = tied.nonzero().flatten()
            sub = pre[redo]
            v, lat, r = _masked_entries(sub, row_topk_mask(sub, k), 0)
            vals.append(v)
            lats.append(lat)
            rows.append(row_idx[redo][r.long()])
    return finish_codes(torch.cat(vals), torch.cat(lats), torch.cat(rows), n_rows, d_sae)


def _encode_masked(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], mask_fn) -> EncodeOut:
    n_rows, d_sae = xc.shape[0], W_enc.shape[1]
    vals, lats, rows = [], [], []
    for s, e, pre in _pre_chunks(xc, W_enc, b_enc):
        v, lat, r = _masked_entries(pre, mask_fn(pre), s)
        vals.append(v)
        lats.append(lat)
        rows.append(r)
    if not vals:
        return finish_codes(*_empty_codes(xc, W_enc), n_rows, d_sae)
    return finish_codes(torch.cat(vals), torch.cat(lats), torch.cat(rows), n_rows, d_sae)


def encode_forward(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], *, mode: str, k: int = 0,
                   threshold: Optional[Tensor] = None) -> EncodeOut:
    """Sparse codes of ``xc = x - b_dec``: (values, indices, row_ids, offsets, smallest kept value)."""
    if xc.shape[0] == 0 or (mode != "threshold" and k == 0):
        return finish_codes(*_empty_codes(xc, W_enc), xc.shape[0], W_enc.shape[1])
    kernels = _kernels(xc)
    if kernels is not None and mode in _SELECT_MODES:
        out = kernels.encode_select(xc, W_enc, b_enc, _SELECT_MODES[mode], k, None, 0,
                                    _block_columns(xc.shape[0], W_enc.shape[1]))
        return _codes(*out[:4])
    if mode == "batch":
        return _encode_batch(xc, W_enc, b_enc, k)
    if mode == "row":
        return _encode_row(xc, W_enc, b_enc, k)
    # The documented rule: the dtype-rounded pre-activation, widened exactly, against the float32
    # threshold (never the threshold rounded to a 16-bit dtype).
    acc = acc_dtype(xc.dtype)
    thr = threshold.to(acc)
    return _encode_masked(xc, W_enc, b_enc, lambda pre: (pre.to(acc) > thr) & (pre > 0))


def encode_forward_with_aux(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], *, mode: str, k: int,
                            dead: Tensor, k_aux: int, exclude_fired: bool = False) -> Tuple[EncodeOut, EncodeOut]:
    """``(encode_forward(xc, ..., mode=mode, k=k), aux codes)``: the aux codes are each row's
    ``k_aux`` largest positive entries among the latents ``dead``, or with ``exclude_fired`` among
    those of them that the main codes leave inactive in every row (see ``saefast.backend``).

    With the CPU kernels both come from one pass over the pre-activations: the aux-K selection
    reads the dead latents' columns of each GEMM block the main selection reads, so aux-K costs
    no GEMM of its own. Excluding fired latents, each row first keeps ``AUX_KEEP_EXCLUDING_FIRED``
    times ``k_aux`` candidates; a row left with fewer than ``k_aux`` once the fired latents are
    dropped is recomputed over the unfired ones alone, so the result is exact either way."""
    kernels = _kernels(xc)
    if kernels is not None and mode in _SELECT_MODES and xc.shape[0] and k and dead.numel():
        dead_mask = torch.zeros(W_enc.shape[1], dtype=torch.bool, device=xc.device)
        dead_mask[dead] = True
        out = kernels.encode_select(xc, W_enc, b_enc, _SELECT_MODES[mode], k, dead_mask, k_aux,
                                    _block_columns(xc.shape[0], W_enc.shape[1]),
                                    AUX_KEEP_EXCLUDING_FIRED * k_aux if exclude_fired else 0, exclude_fired)
        return _codes(*out[:4]), _codes(*out[4:])
    main = encode_forward(xc, W_enc, b_enc, mode=mode, k=k)
    if exclude_fired:
        dead = unfired(dead, main[1])
    return main, aux_codes_by_copy(encode_forward, xc, W_enc, b_enc, dead, k_aux)


def _csr(offsets: Tensor, col_indices: Tensor, values: Tensor, n_cols: int) -> Tensor:
    """torch.sparse CSR matrix [len(offsets) - 1, n_cols] from CSR row offsets and the entries'
    column indices and values (in row order)."""
    index_dtype = torch.int32 if values.numel() < 2 ** 31 else torch.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(offsets.to(index_dtype), col_indices.to(index_dtype), values,
                                       (offsets.numel() - 1, n_cols), check_invariants=False)


def _sparse_matrix(values: Tensor, indices: Tensor, row_ids: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """The entries (sorted by row, then latent) as a torch.sparse CSR matrix [n_rows, n_cols]."""
    return _csr(csr_offsets(row_ids, n_rows), indices, values, n_cols)


def _latent_blocks(values: Tensor, indices: Tensor, row_ids: Tensor, n_rows: int, d_sae: int,
                   width: int) -> Iterator[Tuple[int, int, Tensor]]:
    """(s, e, T) for consecutive blocks of latents, T the torch.sparse CSR matrix [e - s, n_rows]
    of the entries of latents s..e-1 (rows of S.T, with S [n_rows, d_sae] the entries' matrix).

    The entries are sorted latent-major once; blocks hold ``LATENT_BLOCK_ELEMENTS // width``
    latents, so products written block by block into their slice of a [d_sae, width] result
    need no second result-sized buffer (a whole torch.sparse product allocates one) and no
    zero fill (latents without entries get zeros from their empty rows).
    """
    order = torch.argsort(indices, stable=True)
    ST = _csr(csr_offsets(indices[order], d_sae), row_ids[order], values[order], n_rows)
    crow, cols, vals = ST.crow_indices(), ST.col_indices(), ST.values()
    block = max(1, LATENT_BLOCK_ELEMENTS // max(width, 1))
    starts = list(range(0, d_sae, block))
    bounds = crow[starts + [d_sae]].tolist()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        for i, s in enumerate(starts):
            e = min(s + block, d_sae)
            a, b = bounds[i], bounds[i + 1]
            yield s, e, torch.sparse_csr_tensor(crow[s:e + 1] - a, cols[a:b], vals[a:b], (e - s, n_rows),
                                                check_invariants=False)


def _write_block(out: Tensor, sub: Tensor, dense: Tensor) -> None:
    """out = sub @ dense, straight into ``out`` when the dtypes allow."""
    if out.dtype == dense.dtype:
        torch.mm(sub, dense, out=out)
    else:
        out.copy_(sub @ dense)


def encode_backward(grad_values: Tensor, xc: Tensor, W_enc: Tensor, indices: Tensor, row_ids: Tensor,
                    need_xc: bool, need_W: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """Gradients of the active values w.r.t. xc and W_enc (each when asked) and the per-latent sum
    of the value gradients (fp32; it is the b_enc gradient, and -W_enc @ it the b_dec one).

    With S [B, d_sae] the sparse matrix of value gradients: grad_xc = S @ W_enc.T and
    grad_W_enc = xc.T @ S.
    """
    d_in, d_sae = W_enc.shape
    acc = acc_dtype(xc.dtype)
    g = grad_values.to(acc)
    kernels = _kernels(xc)
    if kernels is not None and not need_xc:
        lat_sum, grad_W_enc = kernels.encode_backward_weight(g.contiguous(), xc, indices, row_ids, d_sae,
                                                             _grad_buffer(W_enc) if need_W else None)
        return None, grad_W_enc, lat_sum
    grad_b_enc = torch.zeros(d_sae, dtype=acc, device=xc.device).index_add_(0, indices.long(), g)
    grad_W_enc = grad_xc = None
    if not (need_W or need_xc):
        return grad_xc, grad_W_enc, grad_b_enc
    if xc.device.type not in SPARSE_BLAS_DEVICES:
        grad_xc, grad_W_enc = _encode_backward_gather(g, xc, W_enc, indices, row_ids, need_xc, need_W)
        return grad_xc, grad_W_enc, grad_b_enc
    # One latent-major pass: per block of latents, its columns of grad_W_enc (written in place
    # through the transposed view) and its share of grad_xc (accumulated transposed, [d_in, B]).
    grad_W_t = torch.empty(W_enc.shape, dtype=W_enc.dtype, device=W_enc.device).t() if need_W else None
    grad_xc_t = torch.zeros(d_in, xc.shape[0], dtype=acc, device=xc.device) if need_xc else None
    xc_acc = xc.to(acc) if need_W else None
    for s, e, sub in _latent_blocks(g, indices, row_ids, xc.shape[0], d_sae, d_in):
        if need_W:
            _write_block(grad_W_t[s:e], sub, xc_acc)
        if need_xc:
            grad_xc_t.addmm_(W_enc[:, s:e].to(acc), sub)
    grad_W_enc = grad_W_t.t() if need_W else None
    grad_xc = grad_xc_t.t().to(xc.dtype).contiguous() if need_xc else None
    return grad_xc, grad_W_enc, grad_b_enc


def _nnz_chunks(nnz: int, width: int) -> Iterator[slice]:
    for s, e in _chunks(nnz, width):
        yield slice(s, e)


def _encode_backward_gather(g: Tensor, xc: Tensor, W_enc: Tensor, indices: Tensor, row_ids: Tensor,
                            need_xc: bool, need_W: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """encode_backward's products as gathers of [nnz, d_in] rows and index_add_ scatters."""
    d_in, d_sae = W_enc.shape
    acc = g.dtype
    lat, rows = indices.long(), row_ids.long()
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
    return grad_xc, grad_W_enc


def decode_forward(values: Tensor, indices: Tensor, offsets: Tensor, row_ids: Tensor, W_dec: Tensor,
                   b_dec: Optional[Tensor]) -> Tensor:
    """x_hat [B, d_in] = per-row sum of values * W_dec rows (+ b_dec)."""
    acc = acc_dtype(W_dec.dtype)
    n_rows = offsets.numel() - 1
    kernels = _kernels(W_dec)
    if n_rows == 0:
        out = W_dec.new_zeros((0, W_dec.shape[1]), dtype=acc)
    elif (kernels is not None and values.dtype == W_dec.dtype
          and _decode_by_latent_pays(values.numel(), W_dec.shape[0], W_dec.dtype)):
        out = kernels.decode_forward(values.contiguous(), indices.to(torch.int32).contiguous(),
                                     offsets.to(torch.int64).contiguous(), W_dec.contiguous())
    else:
        out = F.embedding_bag(indices.long(), W_dec.to(acc), offsets, mode="sum",
                              per_sample_weights=values.to(acc), include_last_offset=True)
    if b_dec is not None:
        out = out + b_dec.to(acc)
    return out.to(W_dec.dtype)


# The CPU kernel's decode walks each thread's rows latent by latent, reading a W_dec row once per
# thread instead of once per entry; in fp32/fp64 that pays when the entries average this many per
# latent and thread (measured: about even at 2 with d_sae 65536 on 2 threads, 1.5x faster at 4,
# the aux-K codes stacked under the main ones; below it, embedding_bag's row-by-row sum is
# faster). A 16-bit W_dec always takes the kernel: embedding_bag would first copy all of W_dec to
# fp32 (the main codes alone, d_sae 65536, bf16: 5.7 ms against 7.8 ms).
DECODE_BY_LATENT_MIN_ENTRIES = 3


def _decode_by_latent_pays(nnz: int, d_sae: int, dtype: torch.dtype) -> bool:
    if dtype in (torch.bfloat16, torch.float16):
        return True
    return nnz >= DECODE_BY_LATENT_MIN_ENTRIES * d_sae * max(1, torch.get_num_threads())


def decode_backward(grad_out: Tensor, values: Tensor, indices: Tensor, row_ids: Tensor, W_dec: Tensor,
                    need_values: bool, need_W: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of the active values and of W_dec.

    grad_values[j] = grad_out[row_j] . W_dec[latent_j] (a product sampled at the active pairs
    only) and grad_W_dec = S.T @ grad_out with S [B, d_sae] the sparse matrix of values.
    """
    kernels = _kernels(W_dec)
    if kernels is not None:
        grad_values, grad_W = kernels.decode_backward(grad_out, values, indices, row_ids, W_dec, need_values,
                                                      _grad_buffer(W_dec) if need_W else None)
        return grad_values, grad_W
    acc = acc_dtype(W_dec.dtype)
    g = grad_out.to(acc)
    n_rows, d_sae = grad_out.shape[0], W_dec.shape[0]
    if W_dec.device.type not in SPARSE_BLAS_DEVICES:
        return _decode_backward_gather(g, values, indices, row_ids, W_dec, need_values, need_W)
    grad_values = grad_W = None
    if need_values:
        pattern = _sparse_matrix(torch.zeros(values.shape, dtype=acc, device=values.device), indices,
                                 row_ids, n_rows, d_sae)
        sampled = torch.sparse.sampled_addmm(pattern, g, W_dec.to(acc).t(), beta=0.0)
        grad_values = sampled.values().to(values.dtype)
    if need_W:
        grad_W = torch.empty(W_dec.shape, dtype=W_dec.dtype, device=W_dec.device)
        for s, e, sub in _latent_blocks(values.to(acc), indices, row_ids, n_rows, d_sae, W_dec.shape[1]):
            _write_block(grad_W[s:e], sub, g)
    return grad_values, grad_W


def _decode_backward_gather(g: Tensor, values: Tensor, indices: Tensor, row_ids: Tensor, W_dec: Tensor,
                            need_values: bool, need_W: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """decode_backward as a gather of dot products and an index_add_ scatter."""
    acc = g.dtype
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


def _row_norms(W_dec: Tensor) -> Tensor:
    """L2 norm of each row [d_sae], in the accumulation dtype, at least NORM_EPS."""
    return torch.linalg.vector_norm(W_dec, dim=1, dtype=acc_dtype(W_dec.dtype)).clamp_min(NORM_EPS)


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products [d_sae] in the accumulation dtype (for fp32/fp64 inputs without any
    [d_sae, d_in] temporary)."""
    acc = acc_dtype(a.dtype)
    return torch.einsum("ij,ij->i", a.to(acc), b.to(acc))


def normalize_decoder_(W_dec: Tensor) -> None:
    """Scale each row of W_dec to unit L2 norm, in place (rows of norm 0 stay 0)."""
    kernels = _kernels(W_dec)
    if kernels is not None:
        kernels.decoder_norm_(W_dec, None, True, NORM_EPS)
        return
    W_dec.div_(_row_norms(W_dec)[:, None])


def project_decoder_grad_(W_dec: Tensor, grad: Tensor) -> None:
    """Remove from each row of ``grad`` its component along the same row of W_dec, in place:
    ``grad -= (grad . W) / |W|^2 * W`` per row."""
    kernels = _kernels(W_dec)
    if kernels is not None:
        kernels.decoder_norm_(W_dec, grad, False, NORM_EPS)
        return
    scale = _row_dots(grad, W_dec) / _row_norms(W_dec).square()
    grad.addcmul_(W_dec, scale[:, None], value=-1)


def normalize_decoder_and_project_grad_(W_dec: Tensor, grad: Tensor) -> None:
    """Both of the above in one pass: rows to unit norm, then the gradient made orthogonal to them."""
    kernels = _kernels(W_dec)
    if kernels is not None:
        kernels.decoder_norm_(W_dec, grad, True, NORM_EPS)
        return
    norms = _row_norms(W_dec)
    grad.addcmul_(W_dec, (_row_dots(grad, W_dec) / norms.square())[:, None], value=-1)
    W_dec.div_(norms[:, None])
