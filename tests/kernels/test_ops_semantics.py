"""Every op, on every backend, against dense PyTorch oracles: forward and backward.

The ``backend`` fixture runs each test once on the PyTorch reference and once on the Triton
kernels (natively on a GPU, under TRITON_INTERPRET=1 on a CPU).
"""
import pytest
import torch

import saefast
from saefast import reference
from kernel_utils import (TOL, assert_close, assert_same_selection, check_csr, dense_pre, make_problem)

# "torch-gather": the reference's index_add_/gather backward that non-CPU devices use, forced on
# the CPU (which otherwise uses torch.sparse products).
BACKENDS = ["torch", "torch-gather", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, d_in, d_sae, k): one row, k = 1, k = d_sae, non-powers of two, more than one block of rows.
SHAPES = [(1, 7, 33, 1), (1, 16, 10, 10), (37, 48, 200, 5), (70, 33, 129, 17)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SAEFAST_BACKEND", request.param.split("-")[0])
    if request.param == "torch-gather":
        monkeypatch.setattr(reference, "SPARSE_BLAS_DEVICES", ())
    # Blocks of a few latents, so the CPU backward's latent blocks (and a partial last one) run
    # on these small shapes too.
    monkeypatch.setattr(reference, "LATENT_BLOCK_ELEMENTS", 64)
    return request.param


def _problem(B, d_in, d_sae, dtype, seed, **kw):
    return make_problem(B, d_in, d_sae, dtype, seed, device=DEVICE, **kw)


@pytest.mark.parametrize("B,d_in,d_sae,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_topk_encode_forward_matches_dense(backend, B, d_in, d_sae, k, dtype, mode):
    x, W, bd, be = _problem(B, d_in, d_sae, dtype, seed=B * 1000 + d_sae)
    acts = saefast.topk_encode(x, W, bd, k, b_enc=be, mode=mode)
    pre = dense_pre(x - bd, W, be)
    check_csr(acts.values, acts.indices, acts.row_ids, acts.offsets, B, d_sae)
    assert_same_selection(acts.values, acts.indices, acts.row_ids, pre.cpu(), mode, k, dtype=dtype)
    if acts.nnz:
        assert float(acts.kept_min) == float(acts.values.float().min())
    if mode == "row":
        assert int(acts.offsets.diff().max()) <= k


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("B,d_in,d_sae,k", [(1, 5, 24, 3), (23, 9, 61, 4), (9, 4, 40, 40)])
def test_topk_encode_ties_break_to_lower_index(backend, mode, B, d_in, d_sae, k):
    x, W, bd, be = _problem(B, d_in, d_sae, torch.float32, seed=7 + B, ties=True)
    acts = saefast.topk_encode(x, W, bd, k, b_enc=be, mode=mode)
    pre = dense_pre(x - bd, W, be).cpu()
    assert (pre > 0).sum() > 0 and pre.unique().numel() < pre.numel() // 4, "the data must have ties"
    check_csr(acts.values, acts.indices, acts.row_ids, acts.offsets, B, d_sae)
    assert_same_selection(acts.values, acts.indices, acts.row_ids, pre, mode, k, exact=True)


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_topk_encode_degenerate_inputs(backend, mode):
    B, d_in, d_sae, k = 13, 6, 50, 8
    x, W, bd, _ = _problem(B, d_in, d_sae, torch.float32, seed=3)
    zero = saefast.topk_encode(torch.zeros_like(x), W, torch.zeros_like(bd), k, mode=mode)
    assert zero.nnz == 0 and torch.equal(zero.offsets.cpu(), torch.zeros(B + 1, dtype=torch.long))
    assert float(zero.kept_min) == 0.0
    negative = saefast.topk_encode(x, W, bd, k, b_enc=torch.full((d_sae,), -100.0, device=DEVICE), mode=mode)
    assert negative.nnz == 0
    # B*k larger than the number of positive entries: every positive entry is kept.
    be = torch.full((d_sae,), -100.0, device=DEVICE)
    be[:3] = 100.0
    few = saefast.topk_encode(x, W, bd, k, b_enc=be, mode=mode)
    assert few.nnz == 3 * B and set(few.indices.tolist()) == {0, 1, 2}


def test_batch_topk_rows_may_keep_more_or_fewer_than_k(backend):
    B, d_in, d_sae, k = 16, 12, 90, 4
    x, W, bd, be = _problem(B, d_in, d_sae, torch.float32, seed=11)
    x[3] *= 20  # one loud row should take far more than k of the batch's budget
    acts = saefast.topk_encode(x, W, bd, k, b_enc=be, mode="batch")
    per_row = acts.offsets.diff()
    assert acts.nnz == B * k and int(per_row[3]) > 4 * k and int(per_row.min()) < k
    assert_same_selection(acts.values, acts.indices, acts.row_ids, dense_pre(x - bd, W, be).cpu(), "batch", k)


def test_reference_batch_topk_refetches_truncated_rows(monkeypatch):
    """The reference keeps BATCH_ROW_CANDIDATES*k candidates per row; a row holding more of the
    global top must be recomputed whole. Small chunks exercise the chunked path too."""
    monkeypatch.setattr(reference, "BATCH_ROW_CANDIDATES", 1)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 300)
    B, d_in, d_sae, k = 19, 10, 77, 3
    x, W, bd, be = make_problem(B, d_in, d_sae, torch.float32, seed=5)
    x[[2, 11]] *= 30
    out = reference.encode_forward(x - bd, W, be, mode="batch", k=k)
    assert_same_selection(out[0], out[1], out[2], dense_pre(x - bd, W, be), "batch", k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threshold_encode_matches_dense(backend, dtype):
    B, d_in, d_sae = 29, 20, 111
    x, W, bd, be = _problem(B, d_in, d_sae, dtype, seed=21)
    thr = (0.3 * torch.rand(d_sae, generator=torch.Generator().manual_seed(1))).to(DEVICE)
    acts = saefast.threshold_encode(x, W, bd, thr, b_enc=be)
    pre = dense_pre(x - bd, W, be).cpu()
    check_csr(acts.values, acts.indices, acts.row_ids, acts.offsets, B, d_sae)
    assert_same_selection(acts.values, acts.indices, acts.row_ids, pre, "threshold", threshold=thr.cpu(), dtype=dtype)
    scalar = saefast.threshold_encode(x, W, bd, 0.2, b_enc=be)
    assert_same_selection(scalar.values, scalar.indices, scalar.row_ids, pre, "threshold",
                          threshold=torch.full((d_sae,), 0.2), dtype=dtype)


def _dense_loss_grads(x, W, bd, be, keys, g_vals, W_dec, g_out):
    """Autograd through the dense computation restricted to the kept entries."""
    leaves = [t.detach().double().requires_grad_() for t in (x, W, bd, be, W_dec)]
    x_, W_, bd_, be_, Wd_ = leaves
    pre = torch.relu((x_ - bd_) @ W_ + be_)
    vals = pre.flatten()[keys]
    dense = torch.zeros_like(pre).flatten().index_put((keys,), vals).reshape(pre.shape)
    recon = dense @ Wd_ + bd_
    loss = (vals * g_vals).sum() + (recon * g_out).sum()
    loss.backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("B,d_in,d_sae,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_encode_decode_backward_matches_dense(backend, B, d_in, d_sae, k, dtype, mode):
    x, W, bd, be = _problem(B, d_in, d_sae, dtype, seed=B + d_in + k)
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
    expected = _dense_loss_grads(x.cpu(), W.cpu(), bd.cpu(), be.cpu(), keys, g_vals.cpu().double(),
                                 W_dec.cpu(), g_out.cpu().double())
    assert_close(recon.detach().cpu(), (acts.to_dense().detach().cpu().double() @ W_dec.cpu().double()
                                         + bd.cpu().double()), dtype, scale=4)
    for name, leaf, exp in zip(["x", "W_enc", "b_dec", "b_enc", "W_dec"], leaves, expected):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        scale = 1 + exp.abs().max().item()
        assert_close(leaf.grad.cpu(), exp, dtype, scale=scale * (8 if dtype == torch.bfloat16 else 1), msg=name)


def test_threshold_encode_backward_and_no_b_enc(backend):
    B, d_in, d_sae = 17, 9, 45
    x, W, bd, _ = _problem(B, d_in, d_sae, torch.float32, seed=4)
    leaves = [t.clone().requires_grad_() for t in (x, W, bd)]
    acts = saefast.threshold_encode(*leaves, 0.05)
    g = torch.randn(acts.nnz, device=DEVICE)
    (acts.values * g).sum().backward()
    keys = (acts.row_ids.long() * d_sae + acts.indices.long()).cpu()
    zero_be = torch.zeros(d_sae)
    exp = _dense_loss_grads(x.cpu(), W.cpu(), bd.cpu(), zero_be, keys, g.cpu().double(), torch.zeros(d_sae, d_in),
                            torch.zeros(B, d_in, dtype=torch.float64))
    for leaf, e in zip(leaves, exp[:3]):
        assert_close(leaf.grad.cpu(), e, torch.float32, scale=1 + e.abs().max().item())


def test_decode_gradients_only_where_asked(backend):
    B, d_in, d_sae, k = 11, 8, 30, 3
    x, W, bd, _ = _problem(B, d_in, d_sae, torch.float32, seed=8)
    acts = saefast.topk_encode(x, W, bd, k)  # nothing requires grad
    W_dec = torch.randn(d_sae, d_in, device=DEVICE, requires_grad=True)
    saefast.sparse_decode(acts, W_dec).sum().backward()
    assert acts.values.grad is None and W_dec.grad is not None
    untouched = torch.ones(d_sae, dtype=torch.bool)
    untouched[acts.indices.long().cpu()] = False
    assert bool((W_dec.grad.cpu()[untouched] == 0).all()), "rows of inactive latents must get zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auxk_encode_matches_dense_dead_topk(backend, dtype):
    B, d_in, d_sae, k_aux = 21, 14, 67, 6
    x, W, bd, be = _problem(B, d_in, d_sae, dtype, seed=31)
    dead = torch.rand(d_sae, generator=torch.Generator().manual_seed(3)) < 0.3
    acts = saefast.auxk_encode(x, W, bd, dead.to(DEVICE), k_aux, b_enc=be)
    pre = dense_pre(x - bd, W, be).cpu()
    masked = pre.masked_fill(~dead, 0)
    check_csr(acts.values, acts.indices, acts.row_ids, acts.offsets, B, d_sae)
    assert set(acts.indices.cpu().tolist()) <= set(dead.nonzero().flatten().tolist())
    assert_same_selection(acts.values, acts.indices, acts.row_ids, masked, "row", min(k_aux, int(dead.sum())),
                          dtype=dtype)
    none_dead = saefast.auxk_encode(x, W, bd, torch.zeros(d_sae, dtype=torch.bool, device=DEVICE), k_aux)
    assert none_dead.nnz == 0 and none_dead.offsets.shape == (B + 1,)
    assert saefast.sparse_decode(none_dead, W.t().contiguous()).abs().sum() == 0


@pytest.mark.parametrize("d_sae,d_in", [(1, 5), (37, 19), (130, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_norm_ops(backend, d_sae, d_in, dtype):
    gen = torch.Generator().manual_seed(d_sae)
    W = (3 * torch.randn(d_sae, d_in, generator=gen)).to(dtype).to(DEVICE)
    W[0] = 0  # a zero row stays zero instead of becoming NaN
    G = torch.randn(d_sae, d_in, generator=gen).to(dtype).to(DEVICE)
    Wd, Gd = W.cpu().double(), G.cpu().double()
    unit = Wd / Wd.norm(dim=1, keepdim=True).clamp_min(1e-12)
    proj = Gd - (Gd * unit).sum(1, keepdim=True) * unit

    W1 = W.clone()
    saefast.normalize_decoder_(W1)
    assert_close(W1.cpu(), unit, dtype)
    G1 = G.clone()
    saefast.project_decoder_grad_(W, G1)
    assert_close(G1.cpu(), proj, dtype, scale=4)
    W2, G2 = W.clone(), G.clone()
    saefast.normalize_decoder_and_project_grad_(W2, G2)
    assert_close(W2.cpu(), unit, dtype)
    assert_close(G2.cpu(), proj, dtype, scale=4)
    p = torch.nn.Parameter(W.clone())
    p.grad = G.clone()
    saefast.project_decoder_grad_(p, p.grad)
    saefast.normalize_decoder_(p)
    assert_close(p.detach().cpu(), unit, dtype)


# -- float64 gradcheck of the references (the documented semantics) ----------------------------

@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("block_elements", [1 << 19, 15], ids=["one-block", "blocks-of-3-latents"])
def test_gradcheck_reference_encode_decode(monkeypatch, mode, block_elements):
    monkeypatch.setenv("SAEFAST_BACKEND", "torch")
    # the CPU weight gradients run over blocks of latents: all in one, and 13 = 4 * 3 + 1
    monkeypatch.setattr(reference, "LATENT_BLOCK_ELEMENTS", block_elements)
    B, d_in, d_sae, k = 6, 5, 13, 3
    x, W, bd, be = make_problem(B, d_in, d_sae, torch.float64, seed=12)
    W_dec = torch.randn(d_sae, d_in, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, W, bd, be, W_dec)]

    def f(x_, W_, bd_, be_, Wd_):
        acts = saefast.topk_encode(x_, W_, bd_, k, b_enc=be_, mode=mode)
        return saefast.sparse_decode(acts, Wd_, bd_)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_gradcheck_reference_threshold_and_auxk(monkeypatch):
    monkeypatch.setenv("SAEFAST_BACKEND", "torch")
    B, d_in, d_sae = 5, 4, 11
    x, W, bd, be = make_problem(B, d_in, d_sae, torch.float64, seed=13)
    dead = torch.arange(d_sae) % 2 == 0
    inputs = [t.clone().requires_grad_() for t in (x, W, bd, be)]

    def f(x_, W_, bd_, be_):
        a = saefast.threshold_encode(x_, W_, bd_, 0.1, b_enc=be_)
        b = saefast.auxk_encode(x_, W_, bd_, dead, 2, b_enc=be_)
        return torch.cat([a.values, b.values])

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


# -- bad arguments name themselves -------------------------------------------------------------

def test_bad_arguments_raise_clear_errors():
    x, W, bd, be = make_problem(4, 6, 10, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"k=0 must be between 1 and d_sae=10"):
        saefast.topk_encode(x, W, bd, 0)
    with pytest.raises(ValueError, match=r"k=11 must be between 1 and d_sae=10"):
        saefast.topk_encode(x, W, bd, 11)
    with pytest.raises(ValueError, match=r"x has 5 features per row but W_enc expects d_in=6"):
        saefast.topk_encode(x[:, :5].contiguous(), W, bd, 2)
    with pytest.raises(ValueError, match=r"x must have 2 dimension"):
        saefast.topk_encode(x[None], W, bd, 2)
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but must match"):
        saefast.topk_encode(x.bfloat16(), W, bd, 2)
    with pytest.raises(TypeError, match=r"W_enc has dtype torch.int64"):
        saefast.topk_encode(x, W.long(), bd, 2)
    with pytest.raises(ValueError, match=r"W_enc must be contiguous"):
        saefast.topk_encode(x, W.t().contiguous().t(), bd, 2)
    with pytest.raises(ValueError, match=r"b_dec has shape \(5,\), expected \[6\]"):
        saefast.topk_encode(x, W, bd[:5], 2)
    with pytest.raises(ValueError, match=r"b_enc has shape"):
        saefast.topk_encode(x, W, bd, 2, b_enc=be[:3])
    with pytest.raises(ValueError, match=r"mode='dense' must be one of"):
        saefast.topk_encode(x, W, bd, 2, mode="dense")
    with pytest.raises(TypeError, match=r"k must be an int"):
        saefast.topk_encode(x, W, bd, 2.5)
    with pytest.raises(ValueError, match=r"dead_mask must be a bool tensor of shape \[10\]"):
        saefast.auxk_encode(x, W, bd, torch.ones(10), 2)
    with pytest.raises(ValueError, match=r"threshold has shape"):
        saefast.threshold_encode(x, W, bd, torch.ones(3))
    acts = saefast.topk_encode(x, W, bd, 2)
    with pytest.raises(ValueError, match=r"W_dec has 6 rows but the activations have d_sae=10"):
        saefast.sparse_decode(acts, W)
    with pytest.raises(TypeError, match=r"acts must be the SparseActs"):
        saefast.sparse_decode(acts.values, W.t().contiguous())
    with pytest.raises(ValueError, match=r"grad is None"):
        saefast.project_decoder_grad_(W.t().contiguous(), None)
    if not torch.cuda.is_available():
        meta = torch.empty(4, 6, device="meta")
        with pytest.raises(ValueError, match=r"x is on meta but the weights are on cpu"):
            saefast.topk_encode(meta, W, bd, 2)


def test_backend_choice(monkeypatch):
    from saefast.ops import backend_name
    monkeypatch.setenv("SAEFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SAEFAST_BACKEND='nonsense'"):
        backend_name(torch.device("cpu"))
    monkeypatch.setenv("SAEFAST_BACKEND", "torch")
    assert backend_name(torch.device("cuda")) == "torch"
    monkeypatch.delenv("SAEFAST_BACKEND")
    assert backend_name(torch.device("cpu")) == "torch"
    assert backend_name(torch.device("cuda")) == "triton"
    monkeypatch.setenv("SAEFAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="Set TRITON_INTERPRET=1"):
        backend_name(torch.device("cpu"))


def test_ops_run_in_the_autocast_dtype(backend):
    """Under torch.autocast with fp32 master weights the ops compute in bf16 and the weights get
    fp32 gradients equal to those of an explicit bf16 run."""
    B, d_in, d_sae, k = 19, 24, 70, 4
    x, W, bd, _ = _problem(B, d_in, d_sae, torch.float32, seed=41)
    W_dec = W.t().contiguous()
    grads = []
    for use_autocast in (True, False):
        leaves = [t.clone().requires_grad_() for t in (W, bd, W_dec)]
        W_, bd_, Wd_ = leaves
        if use_autocast:
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                acts = saefast.topk_encode(x, W_, bd_, k)
                recon = saefast.sparse_decode(acts, Wd_, bd_)
        else:
            acts = saefast.topk_encode(x.bfloat16(), W_.bfloat16(), bd_.bfloat16(), k)
            recon = saefast.sparse_decode(acts, Wd_.bfloat16(), bd_.bfloat16())
        assert recon.dtype == torch.bfloat16
        (recon.float() - x).square().sum().backward()
        assert all(t.grad.dtype == torch.float32 for t in leaves)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_with_aux_and_stacked_decode_equal_separate_ops(backend, mode, dtype):
    """The fused main + aux-K encode and the stacked decode give the separate ops' outputs and
    gradients (including latents that are both dead-listed and active in the main codes)."""
    B, d_in, d_sae, k, k_aux = 23, 18, 75, 4, 6
    x, W, bd, be = _problem(B, d_in, d_sae, dtype, seed=51)
    W_dec = W.t().contiguous()
    dead = (torch.arange(d_sae) % 3 == 0).to(DEVICE)
    target = torch.randn(2 * B, d_in, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, W, bd, be, W_dec)]
        x_, W_, bd_, be_, Wd_ = leaves
        if fused:
            main, aux = saefast.ops.topk_encode_with_aux(x_, W_, bd_, k, dead, k_aux, b_enc=be_, mode=mode)
            out = saefast.sparse_decode(saefast.ops.stack_rows(main, aux), Wd_)
        else:
            main = saefast.topk_encode(x_, W_, bd_, k, b_enc=be_, mode=mode)
            aux = saefast.auxk_encode(x_, W_, bd_, dead, k_aux, b_enc=be_)
            out = torch.cat([saefast.sparse_decode(main, Wd_), saefast.sparse_decode(aux, Wd_)])
        assert bool(torch.isin(aux.indices, main.indices).any()), "some latent must be in both sets"
        ((out.float() - target.float()).square().sum() + main.values.float().sum()).backward()
        results.append((main, aux, out.detach(), [t.grad for t in leaves]))
    (m1, a1, o1, g1), (m2, a2, o2, g2) = results
    for f in ("values", "indices", "row_ids", "offsets", "kept_min"):
        assert torch.equal(getattr(m1, f), getattr(m2, f)) and torch.equal(getattr(a1, f), getattr(a2, f)), f
    assert_close(o1, o2, dtype, scale=4)
    for name, a, b in zip(["x", "W_enc", "b_dec", "b_enc", "W_dec"], g1, g2):
        assert_close(a, b, dtype, scale=8 * (1 + b.abs().max().item()), msg=name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_ops_reject_non_finite_inputs(backend, bad):
    B, d_in, d_sae = 6, 8, 30
    x, W, bd, be = _problem(B, d_in, d_sae, torch.float32, seed=5)
    x[3, 2] = bad
    dead = torch.zeros(d_sae, dtype=torch.bool, device=DEVICE)
    dead[::3] = True
    calls = [lambda: saefast.topk_encode(x, W, bd, 2, b_enc=be),
             lambda: saefast.topk_encode(x, W, bd, 2, mode="row"),
             lambda: saefast.threshold_encode(x, W, bd, 0.1, b_enc=be),
             lambda: saefast.auxk_encode(x, W, bd, dead, 3),
             lambda: saefast.ops.topk_encode_with_aux(x, W, bd, 2, dead, 3)]
    for call in calls:
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            call()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_thresholds_compare_widened_values_on_every_backend(backend, dtype):
    """A float32 threshold is compared with the dtype-rounded pre-activation widened to float32,
    never rounded to the dtype itself: thresholds one float32 ulp below, at and above a value."""
    values = torch.tensor([1.0, 0.75, 3.0, 0.0078125, 40.0], dtype=dtype)  # exact in bf16 and fp16
    d_sae = values.numel() * 3
    W = torch.zeros(1, d_sae, dtype=dtype)
    W[0] = values.repeat_interleave(3)
    x = torch.ones(1, 1, dtype=dtype)
    v32 = values.float().repeat_interleave(3)
    below = torch.nextafter(v32, torch.tensor(-1.0))
    above = torch.nextafter(v32, torch.tensor(1e9))
    threshold = torch.stack([below[0::3], v32[1::3], above[2::3]], 1).flatten()
    assert bool((threshold.to(dtype).float() == v32).all()), "each threshold rounds to its value in the dtype"
    acts = saefast.threshold_encode(x.to(DEVICE), W.to(DEVICE), torch.zeros(1, dtype=dtype, device=DEVICE),
                                    threshold.to(DEVICE))
    kept = sorted(acts.indices.tolist())
    assert kept == list(range(0, d_sae, 3)), f"only the entries above a threshold one ulp below them pass, got {kept}"
    # the scalar form follows the same rule
    one = saefast.threshold_encode(x.to(DEVICE), W.to(DEVICE), torch.zeros(1, dtype=dtype, device=DEVICE),
                                   float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))))
    assert 0 in one.indices.tolist() and 3 not in one.indices.tolist()


def test_stack_rows_kept_min_ignores_empty_parts(backend):
    x, W, bd, _ = _problem(9, 10, 40, torch.float32, seed=11)
    main = saefast.topk_encode(x, W, bd, 3)
    nothing = saefast.auxk_encode(x, W, bd, torch.zeros(40, dtype=torch.bool, device=DEVICE), 4)
    assert main.nnz and nothing.nnz == 0
    for parts in ((main, nothing), (nothing, main)):
        stacked = saefast.ops.stack_rows(*parts)
        assert float(stacked.kept_min) == float(main.values.min()) > 0
    assert float(saefast.ops.stack_rows(nothing, nothing).kept_min) == 0.0


@pytest.mark.parametrize("fused", [False, True], ids=["auxk_encode", "topk_encode_with_aux"])
def test_aux_codes_without_dead_latents_still_backpropagate(backend, fused):
    x, W, bd, be = _problem(7, 12, 50, torch.float32, seed=13)
    W_dec = torch.randn(50, 12, device=DEVICE)
    for t in (W, bd, be, W_dec):
        t.requires_grad_(True)
    no_dead = torch.zeros(50, dtype=torch.bool, device=DEVICE)
    if fused:
        main, aux = saefast.ops.topk_encode_with_aux(x, W, bd, 3, no_dead, 5, b_enc=be)
    else:
        aux = saefast.auxk_encode(x, W, bd, no_dead, 5, b_enc=be)
    assert aux.nnz == 0 and aux.values.requires_grad
    loss = saefast.sparse_decode(aux, W_dec).pow(2).mean()
    loss.backward()
    for name, t in (("W_enc", W), ("b_dec", bd), ("b_enc", be)):
        assert t.grad is not None and t.grad.shape == t.shape and not bool(t.grad.any()), name
