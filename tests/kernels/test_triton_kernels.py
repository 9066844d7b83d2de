"""The Triton launchers called directly, outputs poisoned with NaN first, against PyTorch; and the
Triton encode's fix-up paths (threshold too high, buffer too small, rows that need the fallback)
forced on purpose."""
import pytest
import torch

from saefast import reference
from saefast import triton_backend as tb
from saefast.kernels import decoder_norm, sparse_decode, topk_encode
from kernel_utils import assert_close, assert_same_selection, check_csr, dense_pre, make_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d_in,d_sae", [(1, 7, 33), (67, 45, 259)])
def test_encode_candidates_writes_exactly_the_passing_entries(dtype, B, d_in, d_sae):
    # Integer pre-activations and half-integer thresholds: every comparison is exact in any dtype.
    x, W, bd, be = make_problem(B, d_in, d_sae, dtype, seed=B + d_sae, ties=True, device=DEVICE)
    xc = (x - bd).contiguous()
    gen = torch.Generator().manual_seed(0)
    row_thr = (torch.randint(0, 4, (B,), generator=gen) + 0.5).float().to(DEVICE)
    col_thr = (torch.randint(-1, 3, (d_sae,), generator=gen) + 0.5).float().to(DEVICE)
    pre = dense_pre(xc, W, be).float()
    expected = (pre > 0) & (pre >= row_thr[:, None]) & (pre > col_thr[None, :])
    n = int(expected.sum())
    assert 0 < n < expected.numel() // 2
    capacity = n + 50
    vals, lats, rows, total, row_count, row_pos = topk_encode.encode_candidates(xc, W, be, row_thr, col_thr, capacity)
    assert total == n
    assert torch.equal(row_count.cpu().long(), expected.sum(1).cpu())
    assert torch.equal(row_pos.cpu().long(), (pre > 0).sum(1).cpu())
    got = torch.zeros_like(expected)
    got[rows[:n].long(), lats[:n].long()] = True
    assert torch.equal(got, expected), "written entries must be exactly those passing the thresholds"
    assert torch.equal(vals[:n].float(), pre[rows[:n].long(), lats[:n].long()])
    assert (rows[:n].long() * d_sae + lats[:n].long()).unique().numel() == n, "every slot written once"
    # Overflow: only `capacity` slots are written, but the count is exact.
    small = max(1, n // 3)
    v2, l2, r2, total_small, _, _ = topk_encode.encode_candidates(xc, W, be, row_thr, col_thr, small)
    assert total_small == n
    assert bool(expected[r2.long(), l2.long()].all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d_in,d_sae,k", [(1, 9, 40, 3), (53, 37, 101, 6)])
def test_sparse_product_kernels_write_every_output(dtype, B, d_in, d_sae, k):
    x, W, bd, be = make_problem(B, d_in, d_sae, dtype, seed=k, device=DEVICE)
    values, indices, row_ids, offsets, _ = reference.encode_forward((x - bd), W, be, mode="row", k=k)
    W_dec = W.t().contiguous()
    grad_out = torch.randn(B, d_in, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)

    out = sparse_decode.csr_gather_sum(offsets, indices, values, W_dec, d_in, 1, d_in, _nan((B, d_in), dtype), bias=bd)
    assert_close(out, reference.decode_forward(values, indices, offsets, row_ids, W_dec, bd), dtype, scale=4)

    # grad_xc reads W_enc [d_in, d_sae] through strides as if it were [d_sae, d_in].
    gx = sparse_decode.csr_gather_sum(offsets, indices, values, W, 1, d_sae, d_in, _nan((B, d_in), dtype))
    assert_close(gx, reference.decode_forward(values, indices, offsets, row_ids, W_dec, None), dtype, scale=4)

    dots = sparse_decode.pair_dot(row_ids, indices, grad_out, W_dec, _nan(values.shape, dtype))
    ref_vals, ref_W = reference.decode_backward(grad_out, values, indices, row_ids, W_dec, True, True)
    assert_close(dots, ref_vals, dtype, scale=4)

    order, lat_sorted, rows_sorted, seg = tb._by_latent(indices, row_ids, d_sae)
    gW = _nan((d_sae, d_in), dtype)
    wsum = _nan((d_sae,), torch.float32)
    sparse_decode.segment_outer(seg, lat_sorted, rows_sorted, values[order].contiguous(), grad_out, gW, d_in, 1,
                                wsum=wsum)
    assert_close(gW, ref_W, dtype, scale=4)
    expected_wsum = torch.zeros(d_sae).index_add_(0, indices.long().cpu(), values.float().cpu())
    assert_close(wsum.cpu(), expected_wsum, torch.float32, scale=4)
    # Transposed output (the W_enc gradient [d_in, d_sae]).
    gWt = _nan((d_in, d_sae), dtype)
    sparse_decode.segment_outer(seg, lat_sorted, rows_sorted, values[order].contiguous(), grad_out, gWt, 1, d_sae)
    assert_close(gWt.t(), ref_W, dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_tile_max", [8192, 64], ids=["one-tile", "two-pass"])
def test_decoder_norm_kernel_modes(dtype, one_tile_max, monkeypatch):
    monkeypatch.setattr(decoder_norm, "MAX_ONE_TILE_D", one_tile_max)
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(77, 300, generator=gen).to(dtype).to(DEVICE)
    G = torch.randn(77, 300, generator=gen).to(dtype).to(DEVICE)
    for normalize, project in [(True, False), (False, True), (True, True)]:
        W1, G1, W2, G2 = W.clone(), G.clone(), W.clone(), G.clone()
        decoder_norm.decoder_norm_(W1, G1, normalize=normalize, project=project)
        if normalize and project:
            reference.normalize_decoder_and_project_grad_(W2, G2)
        elif normalize:
            reference.normalize_decoder_(W2)
        else:
            reference.project_decoder_grad_(W2, G2)
        assert_close(W1, W2, dtype)
        assert_close(G1, G2, dtype, scale=4)


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("patch", ["threshold_too_high", "buffer_too_small", "bad_sample"])
def test_triton_encode_fixups_stay_exact(monkeypatch, mode, patch):
    if patch == "threshold_too_high":
        monkeypatch.setattr(tb, "CANDIDATE_MARGIN", 0.2)
    elif patch == "buffer_too_small":
        monkeypatch.setattr(tb, "CAPACITY_FACTOR", 0.05)
    else:
        monkeypatch.setattr(tb, "SAMPLE_ROWS", 2)
    B, d_in, d_sae, k = 150, 24, 170, 5
    x, W, bd, be = make_problem(B, d_in, d_sae, torch.float32, seed=17, device=DEVICE)
    x[::7] *= 6  # rows of very different scale defeat a single threshold estimate
    xc = (x - bd).contiguous()
    out = tb.encode_forward(xc, W, be, mode=mode, k=k)
    check_csr(*out[:4], B, d_sae)
    assert_same_selection(out[0], out[1], out[2], dense_pre(xc, W, be).cpu(), mode, k)


def test_triton_encode_threshold_mode_capacity_estimate(monkeypatch):
    monkeypatch.setattr(tb, "SAMPLE_ROWS", 1)  # a one-row sample misjudges the density
    B, d_in, d_sae = 90, 16, 130
    x, W, bd, be = make_problem(B, d_in, d_sae, torch.float32, seed=23, device=DEVICE)
    x[1:] *= 5
    xc = (x - bd).contiguous()
    thr = torch.full((d_sae,), 0.05, device=DEVICE)
    out = tb.encode_forward(xc, W, be, mode="threshold", threshold=thr)
    assert_same_selection(out[0], out[1], out[2], dense_pre(xc, W, be).cpu(), "threshold", threshold=thr.cpu())
