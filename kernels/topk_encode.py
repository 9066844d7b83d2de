"""Fused encoder GEMM + ReLU + candidate selection for (Batch)TopK and threshold encodes.

    pre[r, l] = relu(xc[r] @ W_enc[:, l] + b_enc[l])          xc: [B, d_in], W_enc: [d_in, d_sae]

One program computes a [BLOCK_M, BLOCK_N] tile of ``pre`` in registers (fp32 accumulation,
rounded to the output dtype so that every comparison happens on the values the caller gets) and
writes out only the entries that pass

    pre > 0  and  pre >= row_thr[r]  (optional)  and  pre > col_thr[l]  (optional)

as (value, latent, row) triples, compacted through one atomic counter. Writes past ``capacity``
are dropped but still counted, so the caller can tell and rerun. Per-row counts of written
candidates and of positive entries come back too. The dense [B, d_sae] matrix is never written.
The order of candidates depends on scheduling; callers sort them, so results are deterministic.

dtypes: xc, W_enc, b_enc in fp32, bf16 or fp16 (all the same); thresholds fp32.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _encode_candidates_kernel(
    xc_ptr, w_ptr, b_enc_ptr, row_thr_ptr, col_thr_ptr,
    out_val_ptr, out_col_ptr, out_row_ptr, counter_ptr, row_count_ptr, row_pos_ptr,
    B, D_IN, D_SAE, capacity,
    HAS_B_ENC: tl.constexpr, HAS_ROW_THR: tl.constexpr, HAS_COL_THR: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    col_mask = cols < D_SAE
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D_IN
        a = tl.load(xc_ptr + rows64[:, None] * D_IN + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptr + ks.to(tl.int64)[:, None] * D_SAE + cols64[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if HAS_B_ENC:
        acc += tl.load(b_enc_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    value = acc.to(out_val_ptr.dtype.element_ty)
    vf = value.to(tl.float32)

    positive = row_mask[:, None] & col_mask[None, :] & (vf > 0)
    keep = positive
    if HAS_ROW_THR:
        keep = keep & (vf >= tl.load(row_thr_ptr + rows, mask=row_mask, other=0.0)[:, None])
    if HAS_COL_THR:
        keep = keep & (vf > tl.load(col_thr_ptr + cols, mask=col_mask, other=0.0)[None, :])
    keep_i = keep.to(tl.int32)
    row_keep = tl.sum(keep_i, axis=1)
    tl.atomic_add(row_count_ptr + rows, row_keep, mask=row_mask)
    tl.atomic_add(row_pos_ptr + rows, tl.sum(positive.to(tl.int32), axis=1), mask=row_mask)
    n_keep = tl.sum(row_keep, axis=0)
    if n_keep > 0:
        base = tl.atomic_add(counter_ptr, n_keep)
        flat_keep = tl.reshape(keep_i, (BLOCK_M * BLOCK_N,))
        slot = base + tl.cumsum(flat_keep, axis=0) - flat_keep
        write = (flat_keep > 0) & (slot < capacity)
        slot64 = slot.to(tl.int64)
        row_grid = rows[:, None] + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        col_grid = cols[None, :] + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        tl.store(out_val_ptr + slot64, tl.reshape(value, (BLOCK_M * BLOCK_N,)), mask=write)
        tl.store(out_col_ptr + slot64, tl.reshape(col_grid, (BLOCK_M * BLOCK_N,)), mask=write)
        tl.store(out_row_ptr + slot64, tl.reshape(row_grid, (BLOCK_M * BLOCK_N,)), mask=write)


def _input_precision(dtype: torch.dtype):
    """fp32 GEMMs follow torch's own setting, so the values match a dense ``torch.mm``; 16-bit
    operands always multiply exactly on the tensor cores (no setting applies)."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def encode_candidates(
    xc: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor],
    row_thr: Optional[torch.Tensor], col_thr: Optional[torch.Tensor], capacity: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Launch the candidate kernel.

    Returns (values [capacity], latents int32 [capacity], rows int32 [capacity], total,
    per-row candidate counts int32 [B], per-row positive counts int32 [B]). Only the first
    ``min(total, capacity)`` slots are written; ``total > capacity`` means candidates were lost.
    """
    B, d_in = xc.shape
    d_sae = W_enc.shape[1]
    for name, t in (("xc", xc), ("W_enc", W_enc)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if W_enc.shape[0] != d_in or W_enc.dtype != xc.dtype:
        raise ValueError("W_enc must be [d_in, d_sae] with the dtype of xc")
    if capacity >= 2 ** 31:
        raise ValueError(f"capacity={capacity} exceeds the int32 candidate counter")
    dev = xc.device
    capacity = max(int(capacity), 1)
    values = torch.empty(capacity, dtype=xc.dtype, device=dev)
    latents = torch.empty(capacity, dtype=torch.int32, device=dev)
    rows = torch.empty(capacity, dtype=torch.int32, device=dev)
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    row_count = torch.zeros(B, dtype=torch.int32, device=dev)
    row_pos = torch.zeros(B, dtype=torch.int32, device=dev)
    BLOCK_M, BLOCK_N, BLOCK_K = 64, 128, 32
    upcast = xc.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1"
    grid = (triton.cdiv(B, BLOCK_M), triton.cdiv(d_sae, BLOCK_N))
    _encode_candidates_kernel[grid](
        xc, W_enc, b_enc if b_enc is not None else W_enc, row_thr if row_thr is not None else xc,
        col_thr if col_thr is not None else xc,
        values, latents, rows, counter, row_count, row_pos,
        B, d_in, d_sae, capacity,
        HAS_B_ENC=b_enc is not None, HAS_ROW_THR=row_thr is not None, HAS_COL_THR=col_thr is not None,
        INPUT_PRECISION=_input_precision(xc.dtype) if not upcast else "ieee",
        # The Triton interpreter mis-multiplies 16-bit dot operands; fp32 operands give the same
        # exact products (16-bit x 16-bit fits in fp32) with the same fp32 accumulation.
        UPCAST=upcast,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3,
    )
    return values, latents, rows, int(counter.item()), row_count, row_pos
