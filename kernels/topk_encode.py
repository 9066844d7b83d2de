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

Optionally the same tiles also write the pre-activations of a set of columns (the dead latents of
aux-K), densely: ``dead_out[r, slot[l]] = pre[r, l]`` (rounded, before the ReLU) for every column l
with ``slot[l] >= 0``, so the aux-K selection needs no GEMM of its own.

dtypes: xc, W_enc, b_enc in fp32, bf16 or fp16 (all the same); thresholds fp32.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _target


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile of one program ([BLOCK_M, BLOCK_N] of ``pre``, BLOCK_K deep per step) and its launch."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# Tiles per (architecture, operand kind), chosen from the cubins (benchmarks/kernel_report.py):
# every one compiles without spills. 8 warps keep the fp32 accumulator of a 128x128 tile at 64
# registers a thread, which leaves room for the epilogue's scans. K depth and stages fill the
# shared memory a block can use with a 3-4 deep software pipeline (sm_80: 164 KiB; sm_90/100:
# 227 KiB): 16-bit 128x128x64 x 3 stages = 96 KiB, tf32 128x128x32 x 3 = 96 KiB. fp32 under
# "highest" precision multiplies on the FMA units (no tensor core is exact for fp32); a shallower
# K keeps its operand fragments in registers.
GEMM_CONFIGS = {
    (80, "16bit"): GemmConfig(128, 128, 32, 8, 4),
    (80, "tf32"): GemmConfig(128, 128, 32, 8, 3),
    (80, "ieee"): GemmConfig(128, 128, 16, 8, 3),
    (90, "16bit"): GemmConfig(128, 128, 64, 8, 3),
    (90, "tf32"): GemmConfig(128, 128, 32, 8, 3),
    (90, "ieee"): GemmConfig(128, 128, 16, 8, 3),
}


def gemm_config(capability: int, kind: str) -> GemmConfig:
    """The tile for ``kind`` ("16bit", "tf32" or "ieee") on a GPU of this compute capability
    (newer architectures take the newest table entry at or below them)."""
    known = sorted({cap for cap, _ in GEMM_CONFIGS if cap <= capability}) or [min(cap for cap, _ in GEMM_CONFIGS)]
    return GEMM_CONFIGS[(known[-1], kind)]


@triton.jit
def _column_quarters(x, QUARTER: tl.constexpr):
    """The four [BLOCK_M, QUARTER] column blocks of x [BLOCK_M, 4 * QUARTER], left to right."""
    halves = tl.permute(tl.reshape(x, (x.shape[0], 2, 2 * QUARTER)), (0, 2, 1))
    left, right = tl.split(halves)
    q0, q1 = tl.split(tl.permute(tl.reshape(left, (x.shape[0], 2, QUARTER)), (0, 2, 1)))
    q2, q3 = tl.split(tl.permute(tl.reshape(right, (x.shape[0], 2, QUARTER)), (0, 2, 1)))
    return q0, q1, q2, q3


@triton.jit
def _select_and_append(acc, rows, cols, row_mask, b_enc_ptr, row_thr_ptr, col_thr_ptr,
                       out_val_ptr, out_col_ptr, out_row_ptr, counter_ptr, slot_ptr, dead_out_ptr, D_SAE, capacity,
                       N_DEAD, HAS_B_ENC: tl.constexpr, HAS_ROW_THR: tl.constexpr, HAS_COL_THR: tl.constexpr,
                       HAS_DEAD: tl.constexpr):
    """Finish one column block of the tile: bias, rounding to the output dtype, the dense write of
    the dead columns (HAS_DEAD), the keep test, and the append of the kept entries to the
    candidate lists in row-major order (one atomic reserves the block's slots, an exclusive scan
    over the row counts places each row and a scan along each row places each entry; int32
    slots, as capacity < 2**31). Returns the per-row counts of kept and of positive entries."""
    col_mask = cols < D_SAE
    if HAS_B_ENC:
        acc += tl.load(b_enc_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    value = acc.to(out_val_ptr.dtype.element_ty)
    if HAS_DEAD:
        # int32 offsets: the caller keeps B * N_DEAD below 2**31.
        # (named apart from the append's ``slot`` below: Triton types a name once per scope)
        dead_slot = tl.load(slot_ptr + cols, mask=col_mask, other=-1)
        if tl.max(dead_slot, axis=0) >= 0:
            tl.store(dead_out_ptr + rows[:, None] * N_DEAD + dead_slot[None, :], value,
                     mask=row_mask[:, None] & (dead_slot >= 0)[None, :])
    vf = value.to(tl.float32)
    positive = row_mask[:, None] & col_mask[None, :] & (vf > 0)
    keep = positive
    if HAS_ROW_THR:
        keep = keep & (vf >= tl.load(row_thr_ptr + rows, mask=row_mask, other=0.0)[:, None])
    if HAS_COL_THR:
        keep = keep & (vf > tl.load(col_thr_ptr + cols, mask=col_mask, other=0.0)[None, :])
    keep_i = keep.to(tl.int32)
    row_keep = tl.sum(keep_i, axis=1)
    n_keep = tl.sum(row_keep, axis=0)
    if n_keep > 0:
        base = tl.atomic_add(counter_ptr, n_keep)
        row_start = base + tl.cumsum(row_keep, axis=0) - row_keep
        slot = row_start[:, None] + tl.cumsum(keep_i, axis=1) - keep_i
        write = keep & (slot < capacity)
        tl.store(out_val_ptr + slot, value, mask=write)
        tl.store(out_col_ptr + slot, cols[None, :] + tl.zeros_like(slot), mask=write)
        tl.store(out_row_ptr + slot, rows[:, None] + tl.zeros_like(slot), mask=write)
    return row_keep, tl.sum(positive.to(tl.int32), axis=1)


@triton.jit
def _encode_candidates_kernel(
    xc_ptr, w_ptr, b_enc_ptr, row_thr_ptr, col_thr_ptr,
    out_val_ptr, out_col_ptr, out_row_ptr, counter_ptr, row_count_ptr, row_pos_ptr, slot_ptr, dead_out_ptr,
    B, D_IN, D_SAE, capacity, N_DEAD,
    HAS_B_ENC: tl.constexpr, HAS_ROW_THR: tl.constexpr, HAS_COL_THR: tl.constexpr, HAS_DEAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Row blocks vary fastest: the B / BLOCK_M programs that share one column block of W_enc run
    # together, so W_enc streams from memory once while xc stays in L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    col_mask = cols < D_SAE

    a_ptrs = xc_ptr + rows.to(tl.int64)[:, None] * D_IN + tl.arange(0, BLOCK_K)[None, :]
    b_ptrs = w_ptr + tl.arange(0, BLOCK_K).to(tl.int64)[:, None] * D_SAE + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        k_mask = (k0 + tl.arange(0, BLOCK_K)) < D_IN
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * D_SAE

    # The epilogue runs on quarters of the tile's columns: on a whole 128 x 128 tile its scans
    # and scattered stores need more registers than a thread has (the cubins showed spills).
    QUARTER: tl.constexpr = BLOCK_N // 4
    q0, q1, q2, q3 = _column_quarters(acc, QUARTER)
    c0 = pid_n * BLOCK_N + tl.arange(0, QUARTER)
    keep0, pos0 = _select_and_append(q0, rows, c0, row_mask, b_enc_ptr, row_thr_ptr, col_thr_ptr,
                                     out_val_ptr, out_col_ptr, out_row_ptr, counter_ptr, slot_ptr, dead_out_ptr,
                                     D_SAE, capacity, N_DEAD, HAS_B_ENC, HAS_ROW_THR, HAS_COL_THR, HAS_DEAD)
    keep1, pos1 = _select_and_append(q1, rows, c0 + QUARTER, row_mask, b_enc_ptr, row_thr_ptr, col_thr_ptr,
                                     out_val_ptr, out_col_ptr, out_row_ptr, counter_ptr, slot_ptr, dead_out_ptr,
                                     D_SAE, capacity, N_DEAD, HAS_B_ENC, HAS_ROW_THR, HAS_COL_THR, HAS_DEAD)
    keep2, pos2 = _select_and_append(q2, rows, c0 + 2 * QUARTER, row_mask, b_enc_ptr, row_thr_ptr, col_thr_ptr,
                                     out_val_ptr, out_col_ptr, out_row_ptr, counter_ptr, slot_ptr, dead_out_ptr,
                                     D_SAE, capacity, N_DEAD, HAS_B_ENC, HAS_ROW_THR, HAS_COL_THR, HAS_DEAD)
    keep3, pos3 = _select_and_append(q3, rows, c0 + 3 * QUARTER, row_mask, b_enc_ptr, row_thr_ptr, col_thr_ptr,
                                     out_val_ptr, out_col_ptr, out_row_ptr, counter_ptr, slot_ptr, dead_out_ptr,
                                     D_SAE, capacity, N_DEAD, HAS_B_ENC, HAS_ROW_THR, HAS_COL_THR, HAS_DEAD)
    tl.atomic_add(row_count_ptr + rows, keep0 + keep1 + keep2 + keep3, mask=row_mask)
    tl.atomic_add(row_pos_ptr + rows, pos0 + pos1 + pos2 + pos3, mask=row_mask)


def _input_precision(dtype: torch.dtype):
    """fp32 GEMMs follow torch's own setting, so the values match a dense ``torch.mm``; 16-bit
    operands always multiply exactly on the tensor cores (no setting applies)."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def encode_candidates(
    xc: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor],
    row_thr: Optional[torch.Tensor], col_thr: Optional[torch.Tensor], capacity: int,
    dead_slot: Optional[torch.Tensor] = None, dead_out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Launch the candidate kernel.

    Returns (values [capacity], latents int32 [capacity], rows int32 [capacity], total,
    per-row candidate counts int32 [B], per-row positive counts int32 [B]). Only the first
    ``min(total, capacity)`` slots are written; ``total > capacity`` means candidates were lost.
    With ``dead_slot`` (int32 [d_sae], -1 for columns not wanted) and ``dead_out`` [B, n_dead] in
    xc's dtype, the wanted columns' pre-activations are written into dead_out as well.
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
    if (dead_slot is None) != (dead_out is None):
        raise ValueError("dead_slot and dead_out go together")
    n_dead = dead_out.shape[1] if dead_out is not None else 0
    if dead_out is not None and (dead_out.shape[0] != B or dead_out.dtype != xc.dtype or B * n_dead >= 2 ** 31
                                 or not dead_out.is_contiguous()):
        raise ValueError("dead_out must be a contiguous [B, n_dead] tensor of xc's dtype with B * n_dead < 2**31")
    dev = xc.device
    capacity = max(int(capacity), 1)
    values = torch.empty(capacity, dtype=xc.dtype, device=dev)
    latents = torch.empty(capacity, dtype=torch.int32, device=dev)
    rows = torch.empty(capacity, dtype=torch.int32, device=dev)
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    row_count = torch.zeros(B, dtype=torch.int32, device=dev)
    row_pos = torch.zeros(B, dtype=torch.int32, device=dev)
    upcast = xc.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1"
    precision = _input_precision(xc.dtype)
    cfg = gemm_config(_target.compute_capability(dev), "16bit" if precision is None else precision)
    grid = (triton.cdiv(B, cfg.BLOCK_M), triton.cdiv(d_sae, cfg.BLOCK_N))
    _encode_candidates_kernel[grid](
        xc, W_enc, b_enc if b_enc is not None else W_enc, row_thr if row_thr is not None else xc,
        col_thr if col_thr is not None else xc,
        values, latents, rows, counter, row_count, row_pos,
        dead_slot if dead_slot is not None else row_count, dead_out if dead_out is not None else values,
        B, d_in, d_sae, capacity, n_dead,
        HAS_B_ENC=b_enc is not None, HAS_ROW_THR=row_thr is not None, HAS_COL_THR=col_thr is not None,
        HAS_DEAD=dead_out is not None,
        INPUT_PRECISION=precision if not upcast else "ieee",
        # The Triton interpreter mis-multiplies 16-bit dot operands; fp32 operands give the same
        # exact products (16-bit x 16-bit fits in fp32) with the same fp32 accumulation.
        UPCAST=upcast,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return values, latents, rows, int(counter.item()), row_count, row_pos
