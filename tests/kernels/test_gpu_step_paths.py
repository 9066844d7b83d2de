"""The Triton backend's training-step paths that make the GPU step cheaper, each against a float64
dense oracle and against the PyTorch backend:

* aux-K as a dense block over the dead columns (the dead pre-activations written by the main
  encode kernel, the aux decode / its backward / the encoder backward as dense products, in row
  chunks), selected sets identical to the sparse path's with the same tie rule;
* fp32 master weights read by the backend under torch.autocast (no cast copies, fp32 weight
  gradients holding the 16-bit gradients' values);
* the BatchTopK threshold carried from one encode to the next of the same weight (no sample
  GEMM), exact however far the weights move;
* the sparse-product kernel options behind them (segment_outer's extra rows and dot products,
  fp32 gradients of 16-bit operands, the matvec of the b_dec gradient) on poisoned outputs.
"""
import pytest
import torch

import saefast
from saefast import ops
from saefast import triton_backend as tb
from saefast.backend import DenseBlock
from saefast.kernels import sparse_decode
from kernel_utils import (DEVICE, TOL, assert_close, assert_same_selection, dense_pre, expected_keys, keys_of, poisoned,
                          problem)

B, D_IN, D_SAE, K, K_AUX = 29, 24, 101, 4, 5


def _dead(d_sae=D_SAE):
    return (torch.arange(d_sae) % 3 == 1).to(DEVICE)


def _oracle(x, W, bd, be, W_dec, key_sets, g_out):
    """float64 gradients of sum(decode(stack_rows(*codes)) * g_out) for codes keeping ``key_sets``
    (flat row * d_sae + latent, one per stacked part) of relu((x - b_dec) @ W_enc + b_enc)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, W, bd, be, W_dec)]
    x_, W_, bd_, be_, Wd_ = leaves
    pre = torch.relu((x_ - bd_) @ W_ + be_)
    parts = []
    for keys in key_sets:
        flat = torch.zeros_like(pre).flatten()
        flat = flat.index_put((keys,), pre.flatten()[keys])
        parts.append(flat.reshape(pre.shape))
    recon = torch.cat(parts) @ Wd_ + bd_
    (recon * g_out.double()).sum().backward()
    return recon.detach(), [t.grad for t in leaves]


def _spy(monkeypatch, name, calls):
    """Record in ``calls`` each call of triton_backend.<name> (of a *_with_block function: each
    call with a dense block)."""
    real = getattr(tb, name)

    def wrapper(*args, **kwargs):
        if not name.endswith("_with_block") or isinstance(args[-1], DenseBlock):
            calls.append(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(tb, name, wrapper)


def _aux_step(x, W, bd, be, W_dec, dead, mode, g_out):
    """A TopK SAE training step's sparse part: main + aux-K codes, one decode of both, backward."""
    leaves = [t.clone().requires_grad_() for t in (x, W, bd, be, W_dec)]
    x_, W_, bd_, be_, Wd_ = leaves
    main, aux = ops.topk_encode_with_aux(x_, W_, bd_, K, dead, K_AUX, b_enc=be_, mode=mode)
    recon = saefast.sparse_decode(ops.stack_rows(main, aux), Wd_, bd_)
    (recon * g_out).sum().backward()
    return main, aux, recon.detach(), [t.grad for t in leaves]


def _assert_same_step(codes, recon, grads, ref_codes, ref_recon, ref_grads):
    """Codes (values, indices, row ids, offsets), reconstruction and gradients equal to the bit."""
    assert len(codes) == len(ref_codes) and len(grads) == len(ref_grads)
    for a, b in zip(codes, ref_codes):
        for t, u in zip(a[:4], b[:4]):
            assert torch.equal(t.cpu(), u.cpu())
    assert torch.equal(recon.cpu(), ref_recon.cpu())
    for g, h in zip(grads, ref_grads):
        assert torch.equal(g.cpu(), h.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_aux_dense_block_matches_the_dense_oracle(monkeypatch, dtype, mode):
    monkeypatch.setenv("SAEFAST_BACKEND", "triton")
    dead = _dead()
    n_dead = int(dead.sum())
    calls = []
    for name in ("decode_forward_with_block", "decode_backward_with_block", "encode_backward_with_block"):
        _spy(monkeypatch, name, calls)
    x, W, bd, be = problem(B, D_IN, D_SAE, dtype, seed=3)
    W_dec = W.t().contiguous()
    g_out = torch.randn(2 * B, D_IN, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    main, aux, recon, grads = _aux_step(x, W, bd, be, W_dec, dead, mode, g_out)
    assert sorted(set(calls)) == ["decode_backward_with_block", "decode_forward_with_block",
                                  "encode_backward_with_block"], "the dense block was not used"

    pre = torch.relu((x.double() - bd.double()) @ W.double() + be.double()).to(dtype).cpu()
    # The aux codes: each row's K_AUX largest among the dead latents, ties to the lower latent.
    dead_cols = dead.nonzero().flatten().cpu()
    local = expected_keys(pre[:, dead_cols], "row", K_AUX)
    exp_aux = (local // n_dead) * D_SAE + dead_cols[local % n_dead]
    got_aux = keys_of(aux.values, aux.indices, aux.row_ids, D_SAE).cpu()
    tol_cut = TOL[dtype][0] * 4
    if not torch.equal(got_aux, exp_aux):  # only entries within rounding of a row's cut may differ
        diff = torch.cat([got_aux[~torch.isin(got_aux, exp_aux)], exp_aux[~torch.isin(exp_aux, got_aux)]])
        cuts = pre.flatten()[exp_aux].reshape(-1).double()
        assert diff.numel() <= 2 and (pre.flatten()[diff].double() - cuts.min()).abs().max() < tol_cut, diff
    assert_close(aux.values.cpu(), pre.flatten()[got_aux], dtype, msg="aux values")

    keys_main = keys_of(main.values, main.indices, main.row_ids, D_SAE).cpu()
    exp_recon, exp_grads = _oracle(x.cpu(), W.cpu(), bd.cpu(), be.cpu(), W_dec.cpu(), [keys_main, got_aux],
                                   g_out.cpu())
    assert_close(recon.cpu(), exp_recon, dtype, scale=4, msg="recon")
    for name, got, exp in zip(["x", "W_enc", "b_dec", "b_enc", "W_dec"], grads, exp_grads):
        assert got.dtype == dtype, name
        assert_close(got.cpu(), exp, dtype, scale=(1 + exp.abs().max().item()) * (8 if dtype != torch.float32 else 1),
                     msg=name)


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aux_dense_block_equals_the_sparse_path_and_the_torch_backend_exactly(monkeypatch, mode, dtype):
    """Integer data (every product and sum exact): the dense block gives bit-identical codes and
    gradients to the Triton backend's sparse aux path and to the PyTorch backend, ties included
    (tied dead latents at a row's cut go to the lower latent)."""
    x, W, bd, be = problem(B, D_IN, D_SAE, dtype, seed=5, ties=True)
    W_dec = W.t().contiguous()
    dead = _dead()
    g_out = torch.randint(-2, 3, (2 * B, D_IN), generator=torch.Generator().manual_seed(6)).to(dtype).to(DEVICE)
    results = []
    for backend, ratio in (("triton", None), ("triton", 0.0), ("torch", None)):
        monkeypatch.setenv("SAEFAST_BACKEND", backend)
        if ratio is not None:
            monkeypatch.setattr(tb, "AUX_DENSE_RATIO", {kind: ratio for kind in tb.AUX_DENSE_RATIO})
        calls = []
        _spy(monkeypatch, "decode_forward_with_block", calls)
        main, aux, recon, grads = _aux_step(x, W, bd, be, W_dec, dead, mode, g_out)
        assert bool(calls) == (backend == "triton" and ratio is None)
        results.append((main, aux, recon, grads))
        monkeypatch.undo()
    ref_main, ref_aux, ref_recon, ref_grads = results[-1]
    # The tie rule is exercised: some row has tied dead pre-activations at its cut.
    pre = torch.relu((x - bd).double() @ W.double() + be.double()).cpu()[:, _dead().cpu()]
    kth = pre.topk(K_AUX, dim=1).values[:, -1:]
    assert bool(((pre == kth).sum(1) > 1).any())
    for main, aux, recon, grads in results[:-1]:
        _assert_same_step((main, aux), recon, grads, (ref_main, ref_aux), ref_recon, ref_grads)


def test_auxk_encode_alone_takes_the_dense_block_in_row_chunks(monkeypatch):
    """auxk_encode (the aux codes decoded on their own) through the dense block, its decode and
    backwards in chunks of 3 rows (10 chunks, the last partial: the chunk size is lowered after
    the encode, which sizes its whole buffer), against the PyTorch backend."""
    dtype = torch.float32
    x, W, bd, be = problem(B, D_IN, D_SAE, dtype, seed=7, ties=True)
    W_dec = W.t().contiguous()
    dead = _dead()
    g_out = torch.randint(-2, 3, (B, D_IN), generator=torch.Generator().manual_seed(8)).to(dtype).to(DEVICE)
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("SAEFAST_BACKEND", backend)
        calls = []
        _spy(monkeypatch, "aux_forward_dense", calls)
        _spy(monkeypatch, "encode_backward_with_block", calls)
        leaves = [t.clone().requires_grad_() for t in (x, W, bd, be, W_dec)]
        aux = saefast.auxk_encode(leaves[0], leaves[1], leaves[2], dead, K_AUX, b_enc=leaves[3])
        monkeypatch.setattr(tb, "DENSE_BLOCK_BYTES", 4 * int(dead.sum()) * 3)
        recon = saefast.sparse_decode(aux, leaves[4], leaves[2])
        (recon * g_out).sum().backward()
        assert (calls == ["aux_forward_dense", "encode_backward_with_block"]) == (backend == "triton"), calls
        results.append((aux, recon.detach(), [t.grad for t in leaves]))
        monkeypatch.undo()
    (a, ra, ga), (b, rb, gb) = results
    _assert_same_step((a,), ra, ga, (b,), rb, gb)


def test_triton_backend_reads_fp32_master_weights_under_autocast(monkeypatch):
    """Under torch.autocast with fp32 parameters the Triton backend receives the fp32 W_enc and
    W_dec (no cast copies made by ops), and the weights' fp32 gradients hold exactly the values of
    the explicit bf16 run's gradients, for the main and the aux (dense block) codes."""
    monkeypatch.setenv("SAEFAST_BACKEND", "triton")
    x, W, bd, be = problem(B, D_IN, D_SAE, torch.float32, seed=9)
    W_dec = W.t().contiguous()
    dead = _dead()
    g_out = torch.randn(2 * B, D_IN, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    seen = []
    for name in ("encode_forward_with_aux", "decode_forward_with_block", "decode_backward_with_block",
                 "encode_backward_with_block"):
        real = getattr(tb, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]))
            return _real(*args, **kwargs)
        monkeypatch.setattr(tb, name, wrapper)
    grads = []
    for use_autocast in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, W, bd, be, W_dec)]
        x_, W_, bd_, be_, Wd_ = leaves
        if use_autocast:
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                main, aux = ops.topk_encode_with_aux(x_, W_, bd_, K, dead, K_AUX, b_enc=be_)
                recon = saefast.sparse_decode(ops.stack_rows(main, aux), Wd_, bd_)
        else:
            main, aux = ops.topk_encode_with_aux(x_.bfloat16(), W_.bfloat16(), bd_.bfloat16(), K, dead, K_AUX,
                                                 b_enc=be_.bfloat16())
            recon = saefast.sparse_decode(ops.stack_rows(main, aux), Wd_.bfloat16(), bd_.bfloat16())
        assert recon.dtype == torch.bfloat16
        (recon.float() * g_out).sum().backward()
        grads.append([t.grad for t in leaves])
        if use_autocast:
            # every call: the 16-bit activations with the fp32 weight
            assert {n for n, _ in seen} == {"encode_forward_with_aux", "decode_forward_with_block",
                                           "decode_backward_with_block", "encode_backward_with_block"}
            assert all(torch.float32 in dts and torch.bfloat16 in dts for _, dts in seen), seen
    for name, a, b in zip(["x", "W_enc", "b_dec", "b_enc", "W_dec"], *grads):
        assert a.dtype == torch.float32, name
        assert torch.equal(a, b.float()), name


def test_batch_threshold_carried_between_encodes_stays_exact(monkeypatch):
    """Consecutive BatchTopK encodes with one weight tensor (updated in place, as an optimizer
    does) sample the pre-activations once; later encodes start from the carried threshold and
    stay exact, whether the weights move a little or the scale jumps up or down 8x."""
    monkeypatch.setenv("SAEFAST_BACKEND", "triton")
    samples = []
    _spy(monkeypatch, "_sample_pre", samples)
    x, W, bd, be = problem(B, D_IN, D_SAE, torch.float32, seed=11)
    gen = torch.Generator().manual_seed(12)
    for step, change in enumerate(["none", "small", "small", "x8", "x1/64", "small"]):
        if change == "small":
            W.add_(0.01 * torch.randn(W.shape, generator=gen).to(DEVICE))
        elif change == "x8":
            W.mul_(8)
        elif change == "x1/64":
            W.mul_(1 / 64)
        acts = saefast.topk_encode(x, W, bd, K, b_enc=be, mode="batch")
        assert_same_selection(acts.values.cpu(), acts.indices.cpu(), acts.row_ids.cpu(),
                              dense_pre((x - bd).cpu(), W.cpu(), be.cpu()), "batch", K)
        assert len(samples) == 1, f"step {step} sampled again"
    # A fresh weight tensor samples again.
    saefast.topk_encode(x, W.clone(), bd, K, b_enc=be, mode="batch")
    assert len(samples) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_outer_extra_rows_dot_products_and_fp32_output(dtype):
    """segment_outer with (a) extra dense rows added into chosen latents, (b) the pairs' dot
    products X[row] . W[latent] on the way, (c) a fp32 output for 16-bit operands holding the
    16-bit result's values; and matvec, all on NaN-poisoned outputs against float64."""
    Bx, d_in, d_sae, k = 23, 40, 57, 6
    gen = torch.Generator().manual_seed(13)
    X = torch.randn(Bx, d_in, generator=gen).to(dtype).to(DEVICE)
    W = torch.randn(d_sae, d_in, generator=gen).to(dtype).to(DEVICE)
    lat = torch.stack([torch.randperm(d_sae, generator=gen)[:k] for _ in range(Bx)]).flatten()
    rows = torch.arange(Bx).repeat_interleave(k)
    coef = torch.randn(lat.numel(), generator=gen).to(dtype)
    order, lat_sorted, rows_sorted, seg = tb._by_latent(lat.int().to(DEVICE), rows.int().to(DEVICE), d_sae)
    extra_cols = torch.tensor([0, 5, 6, 56])
    extra = torch.randn(extra_cols.numel(), d_in, generator=gen).to(DEVICE)
    slot = tb._slot_map(extra_cols.to(DEVICE), d_sae)
    n_blocks = -(-d_in // sparse_decode.segment_outer_block_d(d_in, True))
    dots = poisoned((n_blocks, lat.numel()), torch.float32)
    out = poisoned((d_sae, d_in), torch.float32)
    sparse_decode.segment_outer(seg, lat_sorted, rows_sorted, coef.to(DEVICE)[order].contiguous(), X, out, d_in, 1,
                                extra=extra, extra_slot=slot, W=W, dot=dots)
    expected = torch.zeros(d_sae, d_in, dtype=torch.float64).index_add_(
        0, lat, coef.double()[:, None] * X.cpu().double()[rows])
    expected[extra_cols] += extra.cpu().double()
    expected = expected.to(dtype)  # the output holds the operands' dtype's values
    assert_close(out.cpu(), expected, dtype, scale=4)
    assert torch.equal(out.cpu(), out.cpu().to(dtype).float()), "fp32 output must hold 16-bit values"
    exp_dots = (X.cpu().double()[rows] * W.cpu().double()[lat]).sum(1)
    got_dots = torch.empty_like(exp_dots)
    got_dots[order.cpu()] = dots.sum(0).cpu().double()
    assert_close(got_dots, exp_dots, torch.float32, scale=4 * d_in ** 0.5)
    v = torch.randn(d_in, generator=gen).to(DEVICE)
    mv = sparse_decode.matvec(W, v, poisoned((d_sae,), torch.float32))
    assert_close(mv.cpu(), W.cpu().double() @ v.cpu().double(), torch.float32, scale=4 * d_in ** 0.5)
