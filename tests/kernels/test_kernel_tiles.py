"""The kernels on the tiles each architecture gets (kernels._target answers the capability), on
shapes that cross tile and quarter boundaries, in every dtype path; outputs checked element by
element against dense PyTorch."""
import pytest
import torch

from saefast import torch_backend
from saefast import triton_backend as tb
from saefast.kernels import _target, sparse_decode, topk_encode
from kernel_utils import assert_close, dense_pre, make_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = [(torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest"), (torch.float16, "highest")]


@pytest.fixture
def capability(request, monkeypatch):
    if DEVICE == "cuda":  # natively the device decides
        return _target.compute_capability(torch.device(DEVICE))
    monkeypatch.setattr(_target, "compute_capability", lambda device: request.param)
    return request.param


@pytest.fixture
def matmul_precision(request):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(old)


def test_each_architecture_has_a_tile_for_each_operand_kind():
    for cap in (80, 86, 89, 90, 100, 120):
        for kind in ("16bit", "tf32", "ieee"):
            cfg = topk_encode.gemm_config(cap, kind)
            assert cfg.BLOCK_N % 64 == 0, "the epilogue splits the columns in quarters of at least 16"
            assert cfg == topk_encode.GEMM_CONFIGS[(80 if cap < 90 else 90, kind)]


@pytest.mark.parametrize("capability", [80, 90], indirect=True)
@pytest.mark.parametrize("dtype,matmul_precision", PATHS, indirect=["matmul_precision"],
                         ids=["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("B,d_in,d_sae", [(1, 7, 33), (131, 70, 515)])
def test_encode_candidates_on_every_tile(capability, dtype, matmul_precision, B, d_in, d_sae):
    # Small-integer data: every product and sum is exact in every dtype path (tf32 included), so
    # the kept set, the values and the counts must match the dense matrix exactly.
    x, W, bd, be = make_problem(B, d_in, d_sae, dtype, seed=B * 7 + d_sae, ties=True, device=DEVICE)
    xc = (x - bd).contiguous()
    gen = torch.Generator().manual_seed(B)
    row_thr = (torch.randint(0, 3, (B,), generator=gen) + 0.5).float().to(DEVICE)
    pre = dense_pre(xc, W, be).float()
    expected = (pre > 0) & (pre >= row_thr[:, None])
    n = int(expected.sum())
    assert n > 0
    vals, lats, rows, total, row_count, row_pos = topk_encode.encode_candidates(xc, W, be, row_thr, None, n + 7)
    assert total == n
    got = torch.zeros_like(expected)
    got[rows[:n].long(), lats[:n].long()] = True
    assert torch.equal(got, expected)
    assert (rows[:n].long() * d_sae + lats[:n].long()).unique().numel() == n, "every entry written once"
    assert torch.equal(vals[:n].float(), pre[rows[:n].long(), lats[:n].long()])
    assert torch.equal(row_count.cpu().long(), expected.sum(1).cpu())
    assert torch.equal(row_pos.cpu().long(), (pre > 0).sum(1).cpu())
    # A buffer too small for the candidates: only `capacity` slots are written, the count is exact.
    vals2, lats2, rows2, total2, _, _ = topk_encode.encode_candidates(xc, W, be, row_thr, None, max(1, n // 4))
    assert total2 == n
    assert bool(expected[rows2.long(), lats2.long()].all())


@pytest.mark.parametrize("capability", [80, 90], indirect=True)
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_triton_encode_matches_torch_backend_with_k_equal_to_d_sae(capability, mode):
    B, d_in, d_sae = 3, 19, 37
    x, W, bd, be = make_problem(B, d_in, d_sae, torch.float32, seed=41, ties=True, device=DEVICE)
    xc = (x - bd).contiguous()
    got = tb.encode_forward(xc, W, be, mode=mode, k=d_sae)
    want = torch_backend.encode_forward(xc.cpu(), W.cpu(), be.cpu(), mode=mode, k=d_sae)
    for a, b in zip(got[:4], want[:4]):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,D,per_latent", [(1, 16, 40), (37, 200, 3), (130, 33, 70)])
def test_segment_outer_every_output_written(dtype, L, D, per_latent):
    gen = torch.Generator().manual_seed(L + D)
    n_rows = 50
    counts = torch.randint(0, per_latent + 1, (L,), generator=gen)
    counts[::5] = 0  # latents without pairs must come out as zeros
    lat = torch.repeat_interleave(torch.arange(L), counts).to(torch.int32)
    rows = torch.randint(0, n_rows, (lat.numel(),), generator=gen).to(torch.int32)
    coef = torch.randn(lat.numel(), generator=gen).to(dtype)
    X = torch.randn(n_rows, D, generator=gen).to(dtype)
    seg = torch.zeros(L + 1, dtype=torch.long)
    seg[1:] = torch.cumsum(counts, 0)
    out = torch.full((L, D), float("nan"), dtype=dtype)
    wsum = torch.full((L,), float("nan"))
    args = [t.to(DEVICE) for t in (seg, lat, rows, coef, X)]
    out, wsum = out.to(DEVICE), wsum.to(DEVICE)
    sparse_decode.segment_outer(*args, out, D, 1, wsum=wsum)
    want = torch.zeros(L, D, dtype=torch.float64).index_add_(0, lat.long(), coef.double()[:, None] * X.double()[rows.long()])
    assert_close(out.cpu(), want.to(dtype), dtype, scale=4)
    assert_close(wsum.cpu(), torch.zeros(L, dtype=torch.float64).index_add_(0, lat.long(), coef.double()).float(),
                 torch.float32, scale=4)
    assert not torch.isnan(out).any() and not torch.isnan(wsum).any()
