"""Sparse products: sparse_decode and the gradients of encode and decode (they touch only the
kept pairs) on every backend against dense autograd, float64 gradcheck of the PyTorch backend,
stack_rows, and the Triton sparse-product launchers called directly with poisoned outputs."""
import pytest
import torch

import saefast
from saefast import torch_backend
from saefast import triton_backend as tb
from saefast.kernels import sparse_decode
from kernel_utils import (DEVICE, DTYPES, SHAPES, assert_close, dense_loss_grads, make_problem, poisoned, problem)


@pytest.mark.parametrize("B,d_in,d_sae,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_encode_decode_backward_matches_dense(backend, B, d_in, d_sae, k, dtype, mode):
    x, W, bd, be = problem(B, d_in, d_sae, dtype, seed=B + d_in + k)
    W_dec = (torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(2)) / d_in ** 0.5).to(dtype).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, W, bd, be, W_dec)]
    x_, W_, bd_, be_, Wd_ = leaves
    acts = saefast.topk_encode(x_, W_, bd_, k, b_enc=be_, mode=mode)
    recon = saefast.sparse_decode(acts, Wd_, bd_)
    gen = torch.Generator().manual_seed(9)
    g_vals = torch.randn(acts.nnz, generator=gen).to(dtype).to(DEVICE)
    g_out = torch.randn(B, d_in, generator=gen).to(dtype).to(DEVICE)
    ((acts.values * g_vals).sum() + (recon * g_out).sum()).backward()
    keys = (acts.row_ids.long() * d_sae + acts.indices.long()).cpu()
    expected = dense_loss_grads(x.cpu(), W.cpu(), bd.cpu(), be.cpu(), keys, g_vals.cpu().double(),
                                 W_dec.cpu(), g_out.cpu().double())
    assert_close(recon.detach().cpu(), (acts.to_dense().detach().cpu().double() @ W_dec.cpu().double()
                                         + bd.cpu().double()), dtype, scale=4)
    for name, leaf, exp in zip(["x", "W_enc", "b_dec", "b_enc", "W_dec"], leaves, expected):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        scale = 1 + exp.abs().max().item()
        assert_close(leaf.grad.cpu(), exp, dtype, scale=scale * (8 if dtype == torch.bfloat16 else 1), msg=name)



def test_decode_gradients_only_where_asked(backend):
    B, d_in, d_sae, k = 11, 8, 30, 3
    x, W, bd, _ = problem(B, d_in, d_sae, torch.float32, seed=8)
    acts = saefast.topk_encode(x, W, bd, k)  # nothing requires grad
    W_dec = torch.randn(d_sae, d_in, device=DEVICE, requires_grad=True)
    saefast.sparse_decode(acts, W_dec).sum().backward()
    assert acts.values.grad is None and W_dec.grad is not None
    untouched = torch.ones(d_sae, dtype=torch.bool)
    untouched[acts.indices.long().cpu()] = False
    assert bool((W_dec.grad.cpu()[untouched] == 0).all()), "rows of inactive latents must get zero gradient"



@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("block_elements", [1 << 19, 15], ids=["one-block", "blocks-of-3-latents"])
def test_gradcheck_torch_backend_encode_decode(monkeypatch, mode, block_elements):
    monkeypatch.setenv("SAEFAST_BACKEND", "torch")
    # the CPU weight gradients run over blocks of latents: all in one, and 13 = 4 * 3 + 1
    monkeypatch.setattr(torch_backend, "LATENT_BLOCK_ELEMENTS", block_elements)
    B, d_in, d_sae, k = 6, 5, 13, 3
    x, W, bd, be = make_problem(B, d_in, d_sae, torch.float64, seed=12)
    W_dec = torch.randn(d_sae, d_in, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, W, bd, be, W_dec)]

    def f(x_, W_, bd_, be_, Wd_):
        acts = saefast.topk_encode(x_, W_, bd_, k, b_enc=be_, mode=mode)
        return saefast.sparse_decode(acts, Wd_, bd_)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)



def test_stack_rows_kept_min_ignores_empty_parts(backend):
    x, W, bd, _ = problem(9, 10, 40, torch.float32, seed=11)
    main = saefast.topk_encode(x, W, bd, 3)
    nothing = saefast.auxk_encode(x, W, bd, torch.zeros(40, dtype=torch.bool, device=DEVICE), 4)
    assert main.nnz and nothing.nnz == 0
    for parts in ((main, nothing), (nothing, main)):
        stacked = saefast.ops.stack_rows(*parts)
        assert float(stacked.kept_min) == float(main.values.min()) > 0
    assert float(saefast.ops.stack_rows(nothing, nothing).kept_min) == 0.0



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d_in,d_sae,k", [(1, 9, 40, 3), (53, 37, 101, 6)])
def test_sparse_product_kernels_write_every_output(dtype, B, d_in, d_sae, k):
    x, W, bd, be = make_problem(B, d_in, d_sae, dtype, seed=k, device=DEVICE)
    values, indices, row_ids, offsets, _ = torch_backend.encode_forward((x - bd), W, be, mode="row", k=k)
    W_dec = W.t().contiguous()
    grad_out = torch.randn(B, d_in, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)

    out = sparse_decode.csr_gather_sum(offsets, indices, values, W_dec, d_in, 1, d_in, poisoned((B, d_in), dtype), bias=bd)
    assert_close(out, torch_backend.decode_forward(values, indices, offsets, row_ids, W_dec, bd), dtype, scale=4)

    # grad_xc reads W_enc [d_in, d_sae] through strides as if it were [d_sae, d_in].
    gx = sparse_decode.csr_gather_sum(offsets, indices, values, W, 1, d_sae, d_in, poisoned((B, d_in), dtype))
    assert_close(gx, torch_backend.decode_forward(values, indices, offsets, row_ids, W_dec, None), dtype, scale=4)

    dots = sparse_decode.pair_dot(row_ids, indices, grad_out, W_dec, poisoned(values.shape, dtype))
    ref_vals, ref_W = torch_backend.decode_backward(grad_out, values, indices, row_ids, W_dec, True, True)
    assert_close(dots, ref_vals, dtype, scale=4)

    order, lat_sorted, rows_sorted, seg = tb._by_latent(indices, row_ids, d_sae)
    gW = poisoned((d_sae, d_in), dtype)
    wsum = poisoned((d_sae,), torch.float32)
    sparse_decode.segment_outer(seg, lat_sorted, rows_sorted, values[order].contiguous(), grad_out, gW, d_in, 1,
                                wsum=wsum)
    assert_close(gW, ref_W, dtype, scale=4)
    expected_wsum = torch.zeros(d_sae).index_add_(0, indices.long().cpu(), values.float().cpu())
    assert_close(wsum.cpu(), expected_wsum, torch.float32, scale=4)
    # Transposed output (the W_enc gradient [d_in, d_sae]).
    gWt = poisoned((d_in, d_sae), dtype)
    sparse_decode.segment_outer(seg, lat_sorted, rows_sorted, values[order].contiguous(), grad_out, gWt, 1, d_sae)
    assert_close(gWt.t(), ref_W, dtype, scale=4)

