"""Sparse products over active (row, latent) pairs: decode, its backward, the encoder backward.

Active pairs j = 0..nnz-1 carry (row_j, latent_j, coef_j). Three kernels cover every case:

* ``csr_gather_sum``   out[r, d] = sum_{j in row r} coef_j * W[latent_j, d] (+ bias[d])
      decode forward (W = W_dec [d_sae, d_in]) and the encoder's grad_xc (W = W_enc viewed as
      [d_sae, d_in] through its strides). Entries of a row are contiguous (CSR offsets).
* ``pair_dot``         out[j] = sum_d A[row_j, d] * W[latent_j, d]
      the gradient of the decoded values: grad_out . W_dec[latent].
* ``segment_outer``    out[l, d] = sum_{j: latent_j = l} coef_j * X[row_j, d] (+ extra[slot[l], d]);
      wsum[l] = sum coef_j; optionally dot[j] = X[row_j] . W[latent_j] on the way
      the scatter-add into active rows of W_dec (X = grad_out, coef = values; the dots are then
      the value gradients, each W_dec row read once) and into columns of W_enc (X = xc, coef =
      grad of values; wsum is then the b_enc gradient). ``extra`` adds a dense block of rows
      computed elsewhere (the aux-K latents' gradients, see ``saefast.triton_backend``). Pairs are
      sorted by latent; each program owns BLOCK_L latents x BLOCK_D features, folds its pairs in
      with a one-hot matrix product (on the tensor cores when coef and X share a 16-bit dtype:
      the products are exact) and writes every element it owns (zeros included), so no output
      needs zero-filling and the result is deterministic (fixed summation order, no atomics).
* ``matvec``           out[r] = sum_c W[r, c] * v[c] (the b_dec gradient -W_enc @ lat_sum).

Shapes: rows/latents int32, offsets/segments int64. W, A, X in fp32/bf16/fp16; accumulation in
fp32; outputs in the dtype of the given output tensor (segment_outer rounds to X's dtype first,
so a fp32 gradient of a 16-bit weight copy holds the 16-bit gradient's values). All work is
O(nnz * d_in).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _csr_gather_sum_kernel(
    offsets_ptr, latent_ptr, coef_ptr, w_ptr, bias_ptr, out_ptr,
    D, stride_wl, stride_wd, stride_out,
    HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = ds < D
    start = tl.load(offsets_ptr + r)
    end = tl.load(offsets_ptr + r + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_mask = es < end
        lat = tl.load(latent_ptr + es, mask=e_mask, other=0).to(tl.int64)
        c = tl.load(coef_ptr + es, mask=e_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + lat[:, None] * stride_wl + ds[None, :].to(tl.int64) * stride_wd,
                    mask=e_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * c[:, None], axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ds, mask=d_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * stride_out + ds, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _pair_dot_kernel(
    rows_ptr, latent_ptr, a_ptr, w_ptr, out_ptr,
    N, D, stride_a, stride_w,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = es < N
    row = tl.load(rows_ptr + es, mask=e_mask, other=0).to(tl.int64)
    lat = tl.load(latent_ptr + es, mask=e_mask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = e_mask[:, None] & (ds < D)[None, :]
        a = tl.load(a_ptr + row[:, None] * stride_a + ds[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + lat[:, None] * stride_w + ds[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * w, axis=1)
    tl.store(out_ptr + es, acc.to(out_ptr.dtype.element_ty), mask=e_mask)


@triton.jit
def _segment_outer_kernel(
    seg_ptr, latent_ptr, rows_ptr, coef_ptr, x_ptr, out_ptr, wsum_ptr, extra_ptr, slot_ptr, w_ptr, dot_ptr,
    L, D, NNZ, stride_x, stride_ol, stride_od, stride_w,
    HAS_OUT: tl.constexpr, HAS_WSUM: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_DOT: tl.constexpr,
    MMA_16BIT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    ls = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    l_mask = ls < L
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = ds < D
    seg_start = tl.load(seg_ptr + pid_l * BLOCK_L)
    seg_end = tl.load(seg_ptr + tl.minimum(pid_l * BLOCK_L + BLOCK_L, L))
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for e0 in range(seg_start, seg_end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_mask = es < seg_end
        lat = tl.load(latent_ptr + es, mask=e_mask, other=-1)
        c = tl.load(coef_ptr + es, mask=e_mask, other=0.0)
        one_hot = lat[None, :] == ls[:, None]  # [BLOCK_L, BLOCK_E]: pair e belongs to latent l
        if HAS_OUT:
            row = tl.load(rows_ptr + es, mask=e_mask, other=0).to(tl.int64)
            xv = tl.load(x_ptr + row[:, None] * stride_x + ds[None, :],
                         mask=e_mask[:, None] & d_mask[None, :], other=0.0)
            if HAS_DOT:
                # Each pair's W row, gathered from the BLOCK_L rows this program owns (read from
                # memory once, then from cache), against its X row: this block of features' share
                # of the pair's dot product.
                wv = tl.load(w_ptr + lat.to(tl.int64)[:, None] * stride_w + ds[None, :],
                             mask=e_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                tl.store(dot_ptr + pid_d.to(tl.int64) * NNZ + es, tl.sum(xv.to(tl.float32) * wv, axis=1),
                         mask=e_mask)
            if MMA_16BIT:
                # coef and X share a 16-bit dtype: the tensor cores form each product exactly
                # (16 x 16 bits fit in fp32) and accumulate in fp32, like the FMA path.
                acc = tl.dot(tl.where(one_hot, c[None, :], 0.0).to(xv.dtype), xv, acc)
            else:
                acc = tl.dot(tl.where(one_hot, c.to(tl.float32)[None, :], 0.0), xv.to(tl.float32), acc,
                             input_precision="ieee")
        if HAS_WSUM:
            wsum += tl.sum(tl.where(one_hot, c.to(tl.float32)[None, :], 0.0), axis=1)
    if HAS_OUT:
        if HAS_EXTRA:
            slot = tl.load(slot_ptr + ls, mask=l_mask, other=-1)
            acc += tl.load(extra_ptr + slot.to(tl.int64)[:, None] * D + ds[None, :],
                           mask=(slot >= 0)[:, None] & d_mask[None, :], other=0.0)
        # Rounded to X's dtype first: a fp32 gradient of a 16-bit copy of a fp32 master weight
        # holds the 16-bit gradient's value (no-op when X is fp32).
        acc = acc.to(x_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + ls.to(tl.int64)[:, None] * stride_ol + ds.to(tl.int64)[None, :] * stride_od,
                 acc, mask=l_mask[:, None] & d_mask[None, :])
    if HAS_WSUM:
        if pid_d == 0:
            tl.store(wsum_ptr + ls, wsum, mask=l_mask)


@triton.jit
def _matvec_kernel(w_ptr, v_ptr, out_ptr, C, BLOCK_C: tl.constexpr):
    r = tl.program_id(0)
    base = r.to(tl.int64) * C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        m = cs < C
        acc += tl.load(w_ptr + base + cs, mask=m, other=0.0).to(tl.float32) * tl.load(v_ptr + cs, mask=m, other=0.0)
    tl.store(out_ptr + r, tl.sum(acc, axis=0))


def _block_d(D: int) -> int:
    return min(256, max(16, triton.next_power_of_2(D)))


def csr_gather_sum(offsets: torch.Tensor, latents: torch.Tensor, coef: torch.Tensor, W: torch.Tensor,
                   stride_wl: int, stride_wd: int, D: int, out: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out [B, D] (row stride D) <- per-row sums of coef * W[latent] (W addressed by strides)."""
    n_rows = offsets.numel() - 1
    if n_rows == 0 or D == 0:
        return out
    BLOCK_D = _block_d(D)
    grid = (n_rows, triton.cdiv(D, BLOCK_D))
    # A gather waits on memory, so it wants many warps resident: 8 x 256 tiles on 8 warps take 64
    # registers under triton 3.6 (32 under 3.9), where 16 x 256 on 4 warps took 220 (one block per SM).
    _csr_gather_sum_kernel[grid](
        offsets, latents, coef, W, bias if bias is not None else coef, out,
        D, stride_wl, stride_wd, out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_E=8, BLOCK_D=BLOCK_D, num_warps=8 if BLOCK_D >= 256 else 4,
    )
    return out


def pair_dot(rows: torch.Tensor, latents: torch.Tensor, A: torch.Tensor, W: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
    """out [nnz] <- A[rows] . W[latents] row by row (A: [B, D], W: [d_sae, D], both contiguous)."""
    N, D = rows.numel(), A.shape[1]
    if N == 0:
        return out
    BLOCK_E, BLOCK_D = 32, min(128, _block_d(D))
    _pair_dot_kernel[(triton.cdiv(N, BLOCK_E),)](
        rows, latents, A, W, out, N, D, A.stride(0), W.stride(0),
        BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return out


def segment_outer(seg: torch.Tensor, latents: torch.Tensor, rows: torch.Tensor, coef: torch.Tensor,
                  X: Optional[torch.Tensor], out: Optional[torch.Tensor], stride_ol: int, stride_od: int,
                  wsum: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None,
                  extra_slot: Optional[torch.Tensor] = None, W: Optional[torch.Tensor] = None,
                  dot: Optional[torch.Tensor] = None) -> None:
    """out[l, d] (addressed by strides) <- sum over pairs of latent l of coef * X[row, d]
    (+ extra[extra_slot[l], d] where extra_slot[l] >= 0), and wsum [L] (fp32) <- sum of coef per
    latent. Pairs must be sorted by latent; seg [L + 1] int64 holds each latent's first pair.
    Every element of out and wsum is written. With W [L, D] (contiguous rows) and dot
    [n_blocks(D), nnz] (fp32), dot[b, j] <- the share of X[row_j] . W[latent_j] over the b-th
    block of :func:`segment_outer_blocks` features (sum over b for the dot products).
    extra: fp32 [n_extra, D] contiguous; extra_slot: int32 [L]."""
    L = seg.numel() - 1
    D = X.shape[1] if X is not None else 1
    if L == 0:
        return
    BLOCK_L, BLOCK_E = 16, 32
    BLOCK_D = segment_outer_block_d(D, dot is not None) if X is not None else 16
    # 16-bit operands of one dtype go through the tensor cores exactly; the Triton interpreter
    # mis-multiplies 16-bit dot operands, so there they take the fp32 path (the same products).
    mma_16bit = (X is not None and X.dtype in (torch.bfloat16, torch.float16) and coef.dtype == X.dtype
                 and os.environ.get("TRITON_INTERPRET") != "1")
    if (extra is None) != (extra_slot is None) or (W is None) != (dot is None):
        raise ValueError("extra and extra_slot, W and dot go together")
    if dot is not None and (X is None or out is None or dot.shape != (triton.cdiv(D, BLOCK_D), latents.numel())):
        raise ValueError("dot needs X, out and the shape [n_blocks(D), nnz]")
    grid = (triton.cdiv(L, BLOCK_L), triton.cdiv(D, BLOCK_D) if X is not None else 1)
    _segment_outer_kernel[grid](
        seg, latents, rows, coef, X if X is not None else coef, out if out is not None else coef,
        wsum if wsum is not None else coef, extra if extra is not None else coef,
        extra_slot if extra_slot is not None else seg, W if W is not None else coef, dot if dot is not None else coef,
        L, D, latents.numel(), X.stride(0) if X is not None else 0, stride_ol, stride_od,
        W.stride(0) if W is not None else 0,
        HAS_OUT=out is not None, HAS_WSUM=wsum is not None, HAS_EXTRA=extra is not None, HAS_DOT=dot is not None,
        MMA_16BIT=mma_16bit, BLOCK_L=BLOCK_L, BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D, num_warps=4,
    )


def segment_outer_block_d(D: int, with_dot: bool = False) -> int:
    """The feature block of segment_outer for rows of D features (narrower with the dot
    products, whose W tile would otherwise push the fp32 kernel past the register file)."""
    return min(64 if with_dot else 128, _block_d(D))


def matvec(W: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [R] (fp32) <- W [R, C] @ v [C] (fp32), summed in fp32. One program per row of W
    (contiguous): deterministic, one read of W in its own dtype (no fp32 copy of a 16-bit W)."""
    R, C = W.shape
    if R == 0:
        return out
    if C == 0:
        return out.zero_()
    _matvec_kernel[(R,)](W, v, out, C, BLOCK_C=min(2048, max(16, triton.next_power_of_2(C))), num_warps=4)
    return out
