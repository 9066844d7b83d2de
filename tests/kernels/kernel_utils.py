"""Shared helpers for the kernel tests: the one tolerance table, dense oracles, data makers.

Every kernel test compares with the tolerances of :data:`TOL` (per dtype, for values accumulated
in fp32 and rounded to the output dtype), scaled where a test sums many terms.
"""
from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# (B, d_in, d_sae, k): one row, k = 1, k = d_sae, non-powers of two, more than one block of rows.
SHAPES = [(1, 7, 33, 1), (1, 16, 10, 10), (37, 48, 200, 5), (70, 33, 129, 17)]

# (rtol, atol) per dtype, for values accumulated in fp32 and rounded to the output dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, msg=""):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=msg or None)


def make_problem(B, d_in, d_sae, dtype, seed, *, b_enc=True, ties=False, device="cpu"):
    """x [B, d_in], W_enc [d_in, d_sae], b_dec [d_in], b_enc [d_sae] (or None).

    ``ties=True`` makes every pre-activation a small integer (exact in every dtype), so the
    top-k has large tied groups at the cut.
    """
    g = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(-2, 3, (B, d_in), generator=g).to(dtype)
        W = torch.randint(-1, 2, (d_in, d_sae), generator=g).to(dtype)
        bd = torch.zeros(d_in, dtype=dtype)
        be = torch.randint(-1, 2, (d_sae,), generator=g).to(dtype) if b_enc else None
    else:
        x = torch.randn(B, d_in, generator=g).to(dtype)
        W = (torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5).to(dtype)
        bd = (0.1 * torch.randn(d_in, generator=g)).to(dtype)
        be = (0.1 * torch.randn(d_sae, generator=g)).to(dtype) if b_enc else None
    out = [t.to(device) if t is not None else None for t in (x, W, bd, be)]
    return out


def problem(B, d_in, d_sae, dtype, seed, **kw):
    """:func:`make_problem` on the test device."""
    return make_problem(B, d_in, d_sae, dtype, seed, device=DEVICE, **kw)


def poisoned(shape, dtype):
    """An output buffer full of NaN, so that any element a kernel fails to write shows."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def dense_loss_grads(x, W, bd, be, keys, g_vals, W_dec, g_out):
    """float64 autograd through the dense computation restricted to the kept entries ``keys``
    (flat row * d_sae + latent): gradients of x, W_enc, b_dec, b_enc, W_dec for the loss
    sum(values * g_vals) + sum(decode * g_out)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, W, bd, be, W_dec)]
    x_, W_, bd_, be_, Wd_ = leaves
    pre = torch.relu((x_ - bd_) @ W_ + be_)
    vals = pre.flatten()[keys]
    dense = torch.zeros_like(pre).flatten().index_put((keys,), vals).reshape(pre.shape)
    recon = dense @ Wd_ + bd_
    loss = (vals * g_vals).sum() + (recon * g_out).sum()
    loss.backward()
    return [t.grad for t in leaves]


def dense_pre(xc, W_enc, b_enc):
    """relu(xc @ W_enc + b_enc) in fp32 accumulation, rounded to the input dtype."""
    pre = xc.double() @ W_enc.double()
    if b_enc is not None:
        pre = pre + b_enc.double()
    return pre.to(xc.dtype).clamp_min(0)


def expected_keys(pre: torch.Tensor, mode: str, k: int = 0, threshold=None) -> torch.Tensor:
    """Sorted flat keys row*d_sae+latent of the entries the op must keep, from the dense matrix,
    with the documented tie rule (lower flat index wins)."""
    B, d_sae = pre.shape
    if mode == "batch":
        flat = pre.flatten().float()
        order = torch.sort(flat, descending=True, stable=True).indices
        n_pos = int((flat > 0).sum())
        return torch.sort(order[: min(B * k, n_pos)]).values
    if mode == "row":
        order = torch.sort(pre.float(), dim=1, descending=True, stable=True).indices[:, :k]
        keys = order + torch.arange(B)[:, None] * d_sae
        keep = torch.gather(pre, 1, order) > 0
        return torch.sort(keys[keep]).values
    # float32 thresholds against the dtype-rounded values widened to float32 (the ops' rule)
    mask = (pre.float() > threshold.float()) & (pre > 0)
    return mask.flatten().nonzero().flatten()


def keys_of(values, indices, row_ids, d_sae):
    return row_ids.long() * d_sae + indices.long()


def check_csr(values, indices, row_ids, offsets, B, d_sae):
    """Structural invariants of encode output: sorted by (row, latent), offsets consistent."""
    assert indices.dtype == torch.int32 and row_ids.dtype == torch.int32 and offsets.dtype == torch.int64
    assert offsets.shape == (B + 1,) and int(offsets[0]) == 0 and int(offsets[-1]) == values.numel()
    keys = keys_of(values, indices, row_ids, d_sae)
    if keys.numel() > 1:
        assert bool((keys[1:] > keys[:-1]).all()), "entries must be sorted by (row, latent) without repeats"
    counts = torch.bincount(row_ids.long().cpu(), minlength=B) if row_ids.numel() else torch.zeros(B, dtype=torch.long)
    assert torch.equal(offsets.diff().cpu(), counts)
    assert bool((values > 0).all()), "only positive values may be kept"


def assert_same_selection(values, indices, row_ids, pre, mode, k=0, threshold=None, dtype=torch.float32,
                          exact=False):
    """The kept entries equal the dense oracle's, exactly when values are exact (ties, fp64);
    otherwise entries may differ only where the dense value sits within rounding of the cut
    (the kernel and the oracle accumulate in different orders)."""
    B, d_sae = pre.shape
    exp = expected_keys(pre, mode, k, threshold).to(values.device)
    got = keys_of(values, indices, row_ids, d_sae)
    flat = pre.flatten().to(values.device).double()
    assert_close(values, flat[got.long()].to(values.dtype), dtype, msg="kept values differ from the dense pre-activations")
    if torch.equal(got, exp):
        return
    assert not exact, f"selection differs from the dense oracle: got {got.tolist()[:20]}, expected {exp.tolist()[:20]}"
    diff = torch.cat([got[~torch.isin(got, exp)], exp[~torch.isin(exp, got)]]).long()
    rtol, atol = TOL[dtype]
    if mode == "batch":
        cut = torch.full((diff.numel(),), flat[exp.long()].min().item() if exp.numel() else 0.0, dtype=torch.float64,
                         device=flat.device)
    elif mode == "row":
        rows = diff // d_sae
        cuts = torch.zeros(B, dtype=torch.float64, device=flat.device)
        exp_rows = exp.long() // d_sae
        cuts.scatter_reduce_(0, exp_rows, flat[exp.long()], reduce="amin", include_self=False)
        cut = cuts[rows]
    else:
        cut = threshold.double().to(flat.device)[diff % d_sae].clamp_min(0)
    near = (flat[diff] - cut).abs() <= 4 * (rtol * cut.abs() + atol)
    near |= flat[diff].abs() <= 4 * atol  # the ReLU boundary
    assert bool(near.all()), f"selection differs away from the cut: {diff[~near][:10].tolist()}"
    if mode == "batch" and exp.numel() == B * k:
        assert got.numel() == exp.numel()
