"""Decoder-norm maintenance, in place, one program per block of decoder rows.

    unit[l]  = W_dec[l] / max(||W_dec[l]||, eps)
    grad[l] -= (grad[l] . unit[l]) * unit[l]          (PROJECT)
    W_dec[l] = unit[l]                                (NORMALIZE)

W_dec, grad: [d_sae, d_in], contiguous, the same dtype (fp32, bf16 or fp16); sums in fp32.
Rows of up to MAX_ONE_TILE_D features are read once and written once; wider rows are read twice
(norms and dot products, then the update). A row of zeros stays zeros. The projection uses the rows as they are before normalisation, which is the
BatchTopK reference code's order (normalise, then project onto the normalised rows).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


# Rows up to this width are held in registers whole (one read of W_dec and grad, one write);
# wider rows take two passes (norms and dot products, then the update).
MAX_ONE_TILE_D = 8192


@triton.jit
def _decoder_norm_kernel(
    w_ptr, g_ptr, R, D, eps,
    NORMALIZE: tl.constexpr, PROJECT: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < R
    base = rows.to(tl.int64)[:, None] * D
    if ONE_TILE:
        # The whole row fits in one tile: read W (and grad) once, write once.
        ds = tl.arange(0, BLOCK_D)
        m = r_mask[:, None] & (ds < D)[None, :]
        w = tl.load(w_ptr + base + ds[None, :], mask=m, other=0.0).to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), eps)
        if PROJECT:
            g = tl.load(g_ptr + base + ds[None, :], mask=m, other=0.0).to(tl.float32)
            coef = tl.sum(g * w, axis=1) * inv * inv
            tl.store(g_ptr + base + ds[None, :], (g - coef[:, None] * w).to(g_ptr.dtype.element_ty), mask=m)
        if NORMALIZE:
            tl.store(w_ptr + base + ds[None, :], (w * inv[:, None]).to(w_ptr.dtype.element_ty), mask=m)
        return
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    gw = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = r_mask[:, None] & (ds < D)[None, :]
        w = tl.load(w_ptr + base + ds[None, :], mask=m, other=0.0).to(tl.float32)
        sq += tl.sum(w * w, axis=1)
        if PROJECT:
            g = tl.load(g_ptr + base + ds[None, :], mask=m, other=0.0).to(tl.float32)
            gw += tl.sum(g * w, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(sq), eps)
    coef = gw * inv * inv
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = r_mask[:, None] & (ds < D)[None, :]
        w = tl.load(w_ptr + base + ds[None, :], mask=m, other=0.0).to(tl.float32)
        if PROJECT:
            g = tl.load(g_ptr + base + ds[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(g_ptr + base + ds[None, :], (g - coef[:, None] * w).to(g_ptr.dtype.element_ty), mask=m)
        if NORMALIZE:
            tl.store(w_ptr + base + ds[None, :], (w * inv[:, None]).to(w_ptr.dtype.element_ty), mask=m)


def decoder_norm_(W_dec: torch.Tensor, grad: Optional[torch.Tensor], normalize: bool, project: bool,
                  eps: float = 1e-12) -> None:
    """Apply the normalisation and/or the gradient projection in place."""
    if not W_dec.is_contiguous() or (grad is not None and not grad.is_contiguous()):
        raise ValueError("W_dec and grad must be contiguous")
    if project and (grad is None or grad.shape != W_dec.shape):
        raise ValueError("grad must have the shape of W_dec")
    R, D = W_dec.shape
    if R == 0 or D == 0:
        return
    one_tile = D <= MAX_ONE_TILE_D
    BLOCK_D = max(16, triton.next_power_of_2(D)) if one_tile else 256
    BLOCK_R = max(1, min(64, 4096 // BLOCK_D))
    _decoder_norm_kernel[(triton.cdiv(R, BLOCK_R),)](
        W_dec, grad if grad is not None else W_dec, R, D, eps,
        NORMALIZE=normalize, PROJECT=project, ONE_TILE=one_tile, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        num_warps=4 if BLOCK_R * BLOCK_D <= 4096 else 8,
    )
