"""The C++ CPU kernels (saefast.cpu_kernels) against the PyTorch path and the dense oracle, on
fresh random data, odd shapes (one row, non-powers of two, k = d_sae, several column blocks),
ties, and every dtype they take; and the fallback when they cannot be built.

The PyTorch path is forced with ``SAEFAST_CPU_KERNELS=0``. Tests that need the kernels skip
where no compiler is found (the fallback tests still run there).
"""
import logging

import pytest
import torch

import saefast
from saefast import cpu_kernels, torch_backend
from kernel_utils import assert_close, assert_same_selection, check_csr, dense_pre, make_problem

MODES = {"batch": 1, "row": 2}
SHAPES = [(1, 7, 33, 1, 3), (1, 16, 10, 10, 10), (37, 48, 200, 5, 7), (70, 33, 129, 17, 40), (130, 24, 515, 9, 600)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.fixture
def ops():
    kernels = cpu_kernels.kernels()
    if kernels is None:
        pytest.skip("the CPU kernels could not be built here (no compiler or ninja)")
    return kernels


@pytest.fixture
def pytorch_path(monkeypatch):
    """Run the body of a ``with`` on the pure-PyTorch path."""
    class _Off:
        def __enter__(self):
            monkeypatch.setenv(cpu_kernels.ENV, "0")

        def __exit__(self, *exc):
            monkeypatch.delenv(cpu_kernels.ENV)
    return _Off()


def _dead_mask(d_sae, n_dead, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(d_sae, dtype=torch.bool)
    mask[torch.randperm(d_sae, generator=g)[:n_dead]] = True
    return mask


@pytest.mark.parametrize("B,d_in,d_sae,k,k_aux", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("block_cols", [7, 64, 1 << 20])
def test_encode_select_matches_pytorch_path(ops, pytorch_path, B, d_in, d_sae, k, k_aux, dtype, mode, block_cols):
    x, W, bd, be = make_problem(B, d_in, d_sae, dtype, seed=B * 7 + d_sae + block_cols)
    xc = x - bd
    dead = _dead_mask(d_sae, max(1, d_sae // 3), seed=d_sae)
    out = ops.encode_select(xc, W, be, MODES[mode], k, dead, k_aux, block_cols)
    main, aux = out[:4], out[4:]
    with pytorch_path:
        ref = torch_backend.encode_forward(xc, W, be, mode=mode, k=k)
        dead_idx = dead.nonzero().flatten()
        ref_aux = torch_backend.encode_forward(xc, W[:, dead_idx].contiguous(),
                                               be[dead_idx] if be is not None else None, mode="row",
                                               k=min(k_aux, dead_idx.numel()))
    check_csr(*main, B, d_sae)
    check_csr(*aux, B, d_sae)
    pre = dense_pre(xc, W, be)
    assert_same_selection(*main[:3], pre, mode, k, dtype=dtype, exact=dtype == torch.float64)
    assert bool(dead[aux[1].long()].all()), "aux codes must be dead latents"
    position_among_dead = torch.searchsorted(dead_idx, aux[1].long()).int()
    assert_same_selection(aux[0], position_among_dead, aux[2], pre[:, dead_idx], "row", k_aux, dtype=dtype,
                          exact=dtype == torch.float64)
    if dtype == torch.float64:  # values agree up to the GEMM's summation order
        assert_close(main[0], ref[0], dtype)
        for got, want in zip(main[1:], ref[1:4]):
            assert torch.equal(got, want)
        assert torch.equal(aux[1], dead_idx[ref_aux[1].long()].int())
        assert torch.equal(aux[3], ref_aux[3])
        assert_close(aux[0], ref_aux[0], dtype)


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("B,d_in,d_sae,k", [(1, 5, 24, 3), (23, 9, 61, 4), (9, 4, 40, 40), (7, 6, 600, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_select_ties_match_exactly(ops, pytorch_path, mode, B, d_in, d_sae, k, dtype):
    """Integer pre-activations: large tied groups at every cut, broken to the lower (row, latent);
    with d_sae 600 each row's buffers are cut while the scan goes on (bar above 0, ties at it)."""
    x, W, bd, be = make_problem(B, d_in, d_sae, dtype, seed=11 + B, ties=True)
    xc = x - bd
    dead = _dead_mask(d_sae, d_sae // 2, seed=B)
    out = ops.encode_select(xc, W, be, MODES[mode], k, dead, k, 5)
    with pytorch_path:
        ref = torch_backend.encode_forward(xc, W, be, mode=mode, k=k)
        dead_idx = dead.nonzero().flatten()
        ref_aux = torch_backend.encode_forward(xc, W[:, dead_idx].contiguous(), be[dead_idx], mode="row",
                                               k=min(k, dead_idx.numel()))
    for got, want in zip(out[:4], ref[:4]):
        assert torch.equal(got, want)
    assert torch.equal(out[4], ref_aux[0])
    assert torch.equal(out[5], dead_idx[ref_aux[1].long()].int())
    assert torch.equal(out[6], ref_aux[2]) and torch.equal(out[7], ref_aux[3])


@pytest.mark.parametrize("B,d_in,d_sae,k,k_aux", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("keep", [1, 2])
def test_encode_select_aux_excluding_fired_matches_dense(ops, B, d_in, d_sae, k, k_aux, dtype, mode, keep):
    """aux_exclude_fired: each row's k_aux best among the dead latents that no row's main codes use.
    keep=1 keeps only k_aux candidates per row before dropping the fired ones, so rows run short
    and take the recompute path; keep=2 mostly does not."""
    x, W, bd, be = make_problem(B, d_in, d_sae, dtype, seed=B * 5 + d_sae + keep)
    xc = x - bd
    dead = _dead_mask(d_sae, max(1, (2 * d_sae) // 3), seed=d_sae + 1)
    dead[ops.encode_select(xc, W, be, MODES[mode], k, None, 0, 7)[1][::2].long()] = True  # some dead latents fire
    out = ops.encode_select(xc, W, be, MODES[mode], k, dead, k_aux, 7, keep * k_aux, True)
    main, aux = out[:4], out[4:]
    check_csr(*main, B, d_sae)
    check_csr(*aux, B, d_sae)
    pre = dense_pre(xc, W, be)
    exact = dtype == torch.float64
    assert_same_selection(*main[:3], pre, mode, k, dtype=dtype, exact=exact)
    fired = torch.zeros(d_sae, dtype=torch.bool)
    fired[main[1].long()] = True
    assert bool((dead & fired).any()), "some dead-listed latent must fire, or nothing is excluded"
    unfired = (dead & ~fired).nonzero().flatten()
    assert not bool(fired[aux[1].long()].any()), "aux codes must skip latents the main codes use"
    assert bool(dead[aux[1].long()].all())
    position = torch.searchsorted(unfired, aux[1].long()).int()
    assert_same_selection(aux[0], position, aux[2], pre[:, unfired], "row", min(k_aux, unfired.numel()), dtype=dtype,
                          exact=exact)


def test_encode_select_without_dead_latents_or_positives(ops):
    x, W, bd, be = make_problem(6, 8, 30, torch.float32, seed=3)
    out = ops.encode_select(x - bd, W, be, 1, 4, torch.zeros(30, dtype=torch.bool), 8, 16)
    assert out[4].numel() == 0 and torch.equal(out[7], torch.zeros(7, dtype=torch.long))
    assert out[0].numel() == 6 * 4
    nothing = ops.encode_select(torch.ones(3, 4), -torch.ones(4, 9), None, 1, 2, torch.ones(9, dtype=torch.bool), 3, 4)
    assert all(t.numel() == 0 for t in nothing[:3] + nothing[4:7])
    assert torch.equal(nothing[3], torch.zeros(4, dtype=torch.long))


def _pairs(B, d_sae, per_row, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    lat = torch.stack([torch.randperm(d_sae, generator=g)[:per_row].sort().values for _ in range(B)])
    rows = torch.arange(B).repeat_interleave(per_row).int()
    values = torch.rand(B * per_row, generator=g).to(dtype) + 0.1
    return values, lat.flatten().int(), rows


def _ragged_pairs(n_rows, d_sae, seed, dtype, max_per_row):
    """Entries of rows with 0..max_per_row latents each (empty rows included), sorted by (row,
    latent) as codes are, repeated latents allowed."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_per_row + 1, (n_rows,), generator=g)
    lat = torch.randint(0, d_sae, (int(counts.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    rows = torch.repeat_interleave(torch.arange(n_rows), counts)
    lat = lat[torch.argsort(rows * d_sae + lat, stable=True)].int()
    rows = rows.int()
    values = (torch.rand(lat.numel(), generator=g) + 0.1).to(dtype)
    return values, lat, rows, offsets


@pytest.mark.parametrize("n_rows,d_in,d_sae,max_per_row", [(1, 7, 33, 5), (2, 16, 3, 40), (37, 48, 200, 9),
                                                           (130, 33, 129, 60), (9, 5, 1000, 2)])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_forward_matches_row_by_row_sums(ops, n_rows, d_in, d_sae, max_per_row, dtype, threads):
    """The latent-by-latent decode adds each row's entries in the row's own order: the same sums
    as embedding_bag's row by row (float32: to the bit), for any split of the rows over threads,
    empty rows and repeated latents included; every output row written (poisoned buffer pool)."""
    values, idx, rows, offsets = _ragged_pairs(n_rows, d_sae, seed=n_rows + d_sae + threads, dtype=dtype,
                                               max_per_row=max_per_row)
    W_dec = torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(4)).to(dtype)
    acc = torch_backend.acc_dtype(dtype)
    torch.full((n_rows + 3, d_in), float("nan"), dtype=acc)  # leave NaNs in freed memory
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ops.decode_forward(values, idx, offsets, W_dec)
    finally:
        torch.set_num_threads(before)
    assert out.dtype == acc and out.shape == (n_rows, d_in)
    expected = torch.nn.functional.embedding_bag(idx.long(), W_dec.to(acc), offsets, mode="sum",
                                                 per_sample_weights=values.to(acc), include_last_offset=True)
    if dtype == torch.float32:
        assert torch.equal(out, expected)
    dense = torch.zeros(n_rows, d_sae, dtype=torch.float64).index_put_((rows.long(), idx.long()), values.double(),
                                                                       accumulate=True)
    assert_close(out, dense @ W_dec.double(), acc, scale=max_per_row ** 0.5)


def test_decode_forward_refuses_entries_out_of_range(ops):
    """The kernel indexes W_dec by latent: latents outside [0, d_sae) or offsets that do not run
    from 0 to nnz get an error naming the argument instead of a write out of bounds."""
    values, idx, rows, offsets = _ragged_pairs(6, 20, seed=1, dtype=torch.float32, max_per_row=5)
    W_dec = torch.randn(20, 8)
    for bad in (20, -1):
        wrong = idx.clone()
        wrong[-1] = bad
        with pytest.raises(RuntimeError, match=r"acts\.indices must lie in \[0, d_sae = 20\)"):
            ops.decode_forward(values, wrong, offsets, W_dec)
    for wrong in (offsets + 1, offsets.flip(0), torch.cat([offsets[:-1], offsets[-1:] + 3])):
        with pytest.raises(RuntimeError, match=r"acts\.offsets must rise from 0 to nnz"):
            ops.decode_forward(values, idx, wrong.contiguous(), W_dec)


def test_decode_forward_kernel_runs_where_it_pays(ops, monkeypatch):
    """sparse_decode takes the latent-by-latent kernel once the entries average enough per latent
    and thread (the aux-K codes stacked under the main ones), else embedding_bag; a 16-bit W_dec
    takes it always."""
    calls = []
    real = torch_backend._decode_by_latent_pays
    monkeypatch.setattr(torch_backend, "_decode_by_latent_pays", lambda *a: calls.append(real(*a)) or calls[-1])
    x, W, bd, be = make_problem(8, 16, 64, torch.float32, seed=3)
    acts = saefast.topk_encode(x, W, bd, 4, b_enc=be, mode="row")
    few = saefast.sparse_decode(acts, W.t().contiguous())
    threads = torch.get_num_threads()
    many = saefast.topk_encode(x.repeat(threads * torch_backend.DECODE_BY_LATENT_MIN_ENTRIES * 2, 1), W, bd, 4,
                               b_enc=be, mode="row")
    lots = saefast.sparse_decode(many, W.t().contiguous())
    assert calls == [False, True]
    assert torch.equal(lots[:8], few) and torch.equal(lots[-8:], few)  # same rows and entries: same sums
    # A 16-bit W_dec: always the kernel (embedding_bag would widen all of W_dec first).
    half = saefast.sparse_decode(saefast.topk_encode(x.bfloat16(), W.bfloat16(), bd.bfloat16(), 4,
                                                     b_enc=be.bfloat16(), mode="row"), W.t().contiguous().bfloat16())
    assert calls == [False, True, True] and half.dtype == torch.bfloat16


@pytest.mark.parametrize("B,d_in,d_sae,per_row", [(1, 7, 33, 1), (37, 48, 200, 5), (70, 33, 129, 17), (5, 16, 10, 10)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_backward_matches_pytorch_path(ops, pytorch_path, B, d_in, d_sae, per_row, dtype):
    values, idx, rows = _pairs(B, d_sae, per_row, seed=B + d_sae, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    grad_out = torch.randn(B, d_in, generator=g).to(dtype)
    W_dec = torch.randn(d_sae, d_in, generator=g).to(dtype)
    out_W = torch.full_like(W_dec, float("nan"))
    gv, gW = ops.decode_backward(grad_out, values, idx, rows, W_dec, True, out_W)
    with pytorch_path:
        ref_v, ref_W = torch_backend.decode_backward(grad_out, values, idx, rows, W_dec, True, True)
    assert gW.data_ptr() == out_W.data_ptr()
    assert_close(gv, ref_v, dtype, scale=d_in ** 0.5)
    assert_close(gW, ref_W, dtype, scale=per_row ** 0.5)
    gv_only, no_W = ops.decode_backward(grad_out, values, idx, rows, W_dec, True, None)
    assert no_W is None
    assert_close(gv_only, ref_v, dtype, scale=d_in ** 0.5)


@pytest.mark.parametrize("B,d_in,d_sae,per_row", [(1, 7, 33, 1), (37, 48, 200, 5), (70, 33, 129, 17), (5, 16, 10, 10)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_backward_weight_matches_pytorch_path(ops, pytorch_path, B, d_in, d_sae, per_row, dtype):
    values, idx, rows = _pairs(B, d_sae, per_row, seed=3 * B + d_sae, dtype=dtype)
    g = torch.Generator().manual_seed(9)
    xc = torch.randn(B, d_in, generator=g).to(dtype)
    W_enc = torch.randn(d_in, d_sae, generator=g).to(dtype)
    acc = torch_backend.acc_dtype(dtype)
    grad_values = torch.randn(values.shape, generator=g).to(dtype)
    out_W = torch.full_like(W_enc, float("nan"))
    lat_sum, gW = ops.encode_backward_weight(grad_values.to(acc), xc, idx, rows, d_sae, out_W)
    with pytorch_path:
        _, ref_W, ref_sum = torch_backend.encode_backward(grad_values, xc, W_enc, idx, rows, False, True)
    assert gW.data_ptr() == out_W.data_ptr()
    assert_close(gW, ref_W, dtype, scale=per_row ** 0.5)
    assert_close(lat_sum, ref_sum, dtype)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert cpu_kernels.kernels() is None and not cpu_kernels.available()


def test_no_compiler_falls_back_with_a_warning(monkeypatch, caplog):
    """Without a compiler the loader gives None (the PyTorch path runs) and says so once."""
    monkeypatch.setitem(cpu_kernels._state, "tried", False)
    monkeypatch.setitem(cpu_kernels._state, "ops", None)
    monkeypatch.setenv("CXX", "saefast-no-such-compiler")
    with caplog.at_level(logging.WARNING, logger="saefast.cpu_kernels"):
        assert cpu_kernels.kernels() is None
    assert "no C++ compiler" in caplog.text
    caplog.clear()
    assert cpu_kernels.kernels() is None and caplog.text == ""


def test_failed_build_falls_back(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("error: simulated compiler failure")

    monkeypatch.setitem(cpu_kernels._state, "tried", False)
    monkeypatch.setitem(cpu_kernels._state, "ops", None)
    monkeypatch.setattr(cpp_extension, "load", broken)
    with caplog.at_level(logging.WARNING, logger="saefast.cpu_kernels"):
        assert cpu_kernels.kernels() is None
    assert "simulated compiler failure" in caplog.text


def test_build_name_changes_with_the_source(monkeypatch, tmp_path):
    """Two saefast versions sharing one extensions cache build under different names, so neither
    rebuilds over (or loads) the other's library."""
    from torch.utils import cpp_extension

    names = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kwargs: names.append(name))
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    monkeypatch.setattr(cpu_kernels, "_compiler_found", lambda: True)
    for text in ("// version one", "// version two", "// version one"):
        source = tmp_path / "cpu_kernels.cpp"
        source.write_text(text)
        monkeypatch.setattr(cpu_kernels, "SOURCE", source)
        cpu_kernels._build()
    assert names[0] != names[1] and names[0] == names[2]


@pytest.mark.parametrize("d_sae,d_in", [(1, 7), (33, 16), (300, 37), (1030, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("what", ["project", "normalize", "both"])
def test_decoder_norm_matches_pytorch_path(ops, pytorch_path, d_sae, d_in, dtype, what):
    g = torch.Generator().manual_seed(d_sae + d_in)
    W = torch.randn(d_sae, d_in, generator=g).to(dtype)
    W[0] = 0  # a zero row stays zero and its gradient is left as it is
    grad = torch.randn(d_sae, d_in, generator=g).to(dtype)
    W_ref, grad_ref = W.clone(), grad.clone()
    with pytorch_path:
        {"project": lambda: torch_backend.project_decoder_grad_(W_ref, grad_ref),
         "normalize": lambda: torch_backend.normalize_decoder_(W_ref),
         "both": lambda: torch_backend.normalize_decoder_and_project_grad_(W_ref, grad_ref)}[what]()
    ops.decoder_norm_(W, None if what == "normalize" else grad, what != "project", torch_backend.NORM_EPS)
    assert_close(W, W_ref, dtype)
    assert_close(grad, grad_ref, dtype, scale=d_in ** 0.5)


def _train_step(W_enc, W_dec, b_dec, x, dead):
    acts, aux = saefast.ops.topk_encode_with_aux(x, W_enc, b_dec, 3, dead, 5)
    both = saefast.sparse_decode(saefast.ops.stack_rows(acts, aux), W_dec)
    x_hat = both[: x.shape[0]] + b_dec
    loss = (x_hat - x).pow(2).mean() + (both[x.shape[0]:] - (x - x_hat).detach()).pow(2).mean()
    loss.backward()


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.nn.Parameter(torch.randn(12, 80, generator=g) / 4)
    W_dec = torch.nn.Parameter(W_enc.detach().t().contiguous())
    b_dec = torch.nn.Parameter(torch.zeros(12))
    x = torch.randn(16, 12, generator=g)
    dead = torch.arange(80) % 4 == 0
    return W_enc, W_dec, b_dec, x, dead


def test_gradient_buffers_are_reused_and_never_overwrite_a_live_gradient(ops):
    W_enc, W_dec, b_dec, x, dead = _weights(0)
    _train_step(W_enc, W_dec, b_dec, x, dead)
    first = W_enc.grad.clone(), W_dec.grad.clone()
    ptrs = W_enc.grad.data_ptr(), W_dec.grad.data_ptr()
    # Cleared (zero_grad's default): the next step writes into the same memory.
    W_enc.grad = W_dec.grad = None
    _train_step(W_enc, W_dec, b_dec, x, dead)
    assert (W_enc.grad.data_ptr(), W_dec.grad.data_ptr()) == ptrs
    torch.testing.assert_close(W_enc.grad, first[0])
    torch.testing.assert_close(W_dec.grad, first[1])
    # Kept (accumulation over two backward passes): the gradients add up.
    _train_step(W_enc, W_dec, b_dec, x, dead)
    torch.testing.assert_close(W_enc.grad, 2 * first[0])
    torch.testing.assert_close(W_dec.grad, 2 * first[1])
    # A caller holding on to a gradient (or a view of it) keeps it intact.
    held = W_dec.grad[:5]
    held_before = held.clone()
    W_enc.grad = W_dec.grad = None
    _train_step(W_enc, W_dec, b_dec, x, dead)
    torch.testing.assert_close(held, held_before)
    torch.testing.assert_close(W_dec.grad, first[1])


def test_gradients_match_the_pytorch_path(ops, pytorch_path):
    grads = []
    for off in (False, True):
        W_enc, W_dec, b_dec, x, dead = _weights(1)
        if off:
            with pytorch_path:
                _train_step(W_enc, W_dec, b_dec, x, dead)
        else:
            _train_step(W_enc, W_dec, b_dec, x, dead)
        grads.append([W_enc.grad, W_dec.grad, b_dec.grad])
    for a, b in zip(*grads):
        assert_close(a, b, torch.float32, scale=4)
