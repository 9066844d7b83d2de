"""Adam's update of an SAE decoder fused with its unit-norm maintenance, in place, one pass.

For the decoder W [d_sae, d_in] with gradient G and Adam moments M, V (all [d_sae, d_in]):

    unit[l] = W[l] / max(||W[l]||, norm_eps)
    g[l]    = G[l] - (G[l] . unit[l]) * unit[l]                  (PROJECT; else g = G)
    M       = M + (1 - beta1) * (g - M)
    V       = beta2 * V + (1 - beta2) * g * g
    W      -= step_size * M / (sqrt(V) / bias_correction2_sqrt + eps)
    W[l]    = W[l] / max(||W[l]||, norm_eps)                     (NORMALIZE)

``step_size = lr / (1 - beta1 ** step)`` and ``bias_correction2_sqrt = sqrt(1 - beta2 ** step)``
come from the caller (computed on the host in float64, as ``torch.optim.Adam`` does), so the
update is torch's Adam (no weight decay, no amsgrad) on the projected gradient, followed by the
row renormalisation: the same numbers as ``project_decoder_grad_``, ``Adam.step()`` and
``normalize_decoder_`` one after the other, up to fp32 rounding, with one read of W, G, M, V and
one write of W, M, V instead of three passes. G is not modified.

dtypes: W, G, M, V share one of fp32, bf16, fp16; arithmetic in fp32, results rounded to the
dtype (``torch.optim.Adam(fused=True)``'s rule). Rows of up to MAX_ONE_TILE_D features are held
in registers whole; wider rows take three sweeps (the dot products, the update, the rescale),
the later ones reading a row the first one brought into cache. Deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows up to this width are updated from registers (one read, one write of every tensor).
MAX_ONE_TILE_D = 4096
_WIDE_BLOCK_D = 1024


@triton.jit
def _adam_values(w, g, m, v, coef, step_size, beta1, beta2, eps, bc2_sqrt, PROJECT: tl.constexpr):
    """(new W, new M, new V) for fp32 tiles; coef [rows] is (G . W) / |W|^2 when PROJECT."""
    if PROJECT:
        g = g - coef[:, None] * w
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * (g * g)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    w = w - step_size * (m / denom)
    return w, m, v


@triton.jit
def _decoder_adam_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr, R, D,
    step_size, beta1, beta2, eps, bc2_sqrt, norm_eps,
    PROJECT: tl.constexpr, NORMALIZE: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < R
    base = rows.to(tl.int64)[:, None] * D
    out_ty = w_ptr.dtype.element_ty
    if ONE_TILE:
        ds = tl.arange(0, BLOCK_D)
        msk = r_mask[:, None] & (ds < D)[None, :]
        offs = base + ds[None, :]
        w = tl.load(w_ptr + offs, mask=msk, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=msk, other=0.0).to(tl.float32)
        coef = tl.zeros((BLOCK_R,), dtype=tl.float32)
        if PROJECT:
            inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), norm_eps)
            coef = tl.sum(g * w, axis=1) * inv * inv
        m = tl.load(m_ptr + offs, mask=msk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=msk, other=0.0).to(tl.float32)
        w, m, v = _adam_values(w, g, m, v, coef, step_size, beta1, beta2, eps, bc2_sqrt, PROJECT)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=msk)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=msk)
        if NORMALIZE:
            # The norm of the row as stored: the rounded values, so a 16-bit row ends at unit norm.
            w = w.to(out_ty).to(tl.float32)
            w = w * (1.0 / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), norm_eps))[:, None]
        tl.store(w_ptr + offs, w.to(out_ty), mask=msk)
    else:
        coef = tl.zeros((BLOCK_R,), dtype=tl.float32)
        if PROJECT:
            sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
            gw = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                msk = r_mask[:, None] & (ds < D)[None, :]
                w = tl.load(w_ptr + base + ds[None, :], mask=msk, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + base + ds[None, :], mask=msk, other=0.0).to(tl.float32)
                sq += tl.sum(w * w, axis=1)
                gw += tl.sum(g * w, axis=1)
            inv = 1.0 / tl.maximum(tl.sqrt(sq), norm_eps)
            coef = gw * inv * inv
        sq_new = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            msk = r_mask[:, None] & (ds < D)[None, :]
            offs = base + ds[None, :]
            w = tl.load(w_ptr + offs, mask=msk, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=msk, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + offs, mask=msk, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=msk, other=0.0).to(tl.float32)
            w, m, v = _adam_values(w, g, m, v, coef, step_size, beta1, beta2, eps, bc2_sqrt, PROJECT)
            tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=msk)
            tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=msk)
            w_out = w.to(out_ty)
            tl.store(w_ptr + offs, w_out, mask=msk)
            wf = w_out.to(tl.float32)
            sq_new += tl.sum(wf * wf, axis=1)
        if NORMALIZE:
            scale = 1.0 / tl.maximum(tl.sqrt(sq_new), norm_eps)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                msk = r_mask[:, None] & (ds < D)[None, :]
                w = tl.load(w_ptr + base + ds[None, :], mask=msk, other=0.0).to(tl.float32)
                tl.store(w_ptr + base + ds[None, :], (w * scale[:, None]).to(out_ty), mask=msk)


def decoder_adam_(W: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                  step_size: float, beta1: float, beta2: float, eps: float, bias_correction2_sqrt: float,
                  project: bool, normalize: bool, norm_eps: float = 1e-12) -> None:
    """One Adam step of W (in place, with exp_avg / exp_avg_sq) on its gradient, projected and
    renormalised as the module docstring says."""
    for name, t in (("W", W), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous() or t.shape != W.shape or t.dtype != W.dtype or t.device != W.device:
            raise ValueError(f"{name} must be contiguous, shaped, typed and placed like W {tuple(W.shape)} {W.dtype}")
    if W.dim() != 2:
        raise ValueError(f"W must be [d_sae, d_in], got shape {tuple(W.shape)}")
    R, D = W.shape
    if R == 0 or D == 0:
        return
    one_tile = D <= MAX_ONE_TILE_D
    BLOCK_D = max(16, triton.next_power_of_2(D)) if one_tile else _WIDE_BLOCK_D
    BLOCK_R = max(1, min(64, 2048 // BLOCK_D)) if one_tile else 1
    # About 16 elements of each of the five live fp32 tiles per thread.
    num_warps = max(4, min(8, BLOCK_R * BLOCK_D // 512))
    _decoder_adam_kernel[(triton.cdiv(R, BLOCK_R),)](
        W, grad, exp_avg, exp_avg_sq, R, D,
        step_size, beta1, beta2, eps, bias_correction2_sqrt, norm_eps,
        PROJECT=project, NORMALIZE=normalize, ONE_TILE=one_tile, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
