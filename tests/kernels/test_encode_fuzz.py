"""Randomised encode cases on both backends against a dense float64 oracle.

Every run draws ``N_CASES`` small cases from one seed: ``SAEFAST_FUZZ_SEED`` (an integer, or
``date`` for today's YYYYMMDD), else a fixed default so that CI is reproducible. Each case is
reproducible alone: its parameters come from ``random.Random(f"{seed}/{index}")``, and a failure
names the seed, the case and its parameters (rerun with ``SAEFAST_FUZZ_SEED=<seed> pytest
tests/kernels/test_encode_fuzz.py -k 'case<index>'``).

Cases cover BatchTopK and TopK (``topk_encode``), thresholds (``threshold_encode``, per latent
and scalar) and aux-K (``auxk_encode``); shapes that are not multiples of the kernels' blocks
(B, d_in, d_sae from 1 up), k from 1 to d_sae, k beyond the positive entries (a negative
b_enc), exact ties (small integers, exact in every dtype), magnitudes from 1e-20 to 1e20,
float32 / bfloat16 / float16, with and without b_enc, and the backward pass on a third of them.

What is checked, per backend: the codes' structure; every kept value within the bound below of
the exact pre-activation; the kept set is an answer the mode allows for some values within those
bounds (ties and rounding at the cut may go either way); on exact data the set is exactly the
documented one (ties to the lower flat index) on both backends; kept_min; and gradients against
dense float64 autograd on the kept entries.

Bound on a kept value: the fp32 accumulation of d_in products and the bias (gamma_{d_in+1} times
the sum of their magnitudes), then the rounding to the dtype: half an ulp, or one whole ulp for the
Triton kernels under the interpreter (TRITON_INTERPRET=1), which truncates fp32 -> 16-bit
conversions instead of rounding to nearest. On a GPU the kernels must round to nearest.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import random
from typing import Optional

import pytest
import torch

import saefast
from kernel_utils import DEVICE, TOL, check_csr

N_CASES = 216
DEFAULT_SEED = 14


def _seed() -> int:
    value = os.environ.get("SAEFAST_FUZZ_SEED", "").strip()
    if value == "date":
        return int(datetime.date.today().strftime("%Y%m%d"))
    return int(value) if value else DEFAULT_SEED


SEED = _seed()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ulp(1) and the smallest positive (subnormal) value of each dtype
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
TINY = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}


@dataclasses.dataclass
class Case:
    index: int
    mode: str          # batch, row, threshold, aux
    B: int
    d_in: int
    d_sae: int
    k: int             # k (batch, row) or k_aux (aux); unused for threshold
    dtype: str
    data: str          # gauss, ties, scaled
    scale: float
    b_enc: bool
    shift: float       # subtracted from b_enc: fewer positive entries than k
    dead: float        # aux: fraction of dead latents
    scalar_threshold: bool
    backward: bool

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self).items() if k != "index")
        return f"SAEFAST_FUZZ_SEED={SEED} case{self.index:03d} ({fields})"


def _case(index: int) -> Case:
    rng = random.Random(f"{SEED}/{index}")
    mode = rng.choice(["batch", "batch", "row", "row", "threshold", "aux", "aux"])
    B = rng.choice([1, rng.randint(2, 70), rng.randint(2, 70), rng.randint(2, 70), rng.randint(70, 150)])
    d_in = rng.choice([1, 2, rng.randint(3, 40), rng.randint(3, 40), rng.randint(40, 80)])
    d_sae = rng.choice([1, rng.randint(2, 140), rng.randint(2, 140), rng.randint(2, 140), rng.randint(140, 300)])
    k = min(d_sae, rng.choice([1, 2, rng.randint(1, 8), rng.randint(1, d_sae), d_sae]))
    data = rng.choice(["gauss", "gauss", "gauss", "ties", "ties", "scaled"])
    dtype = rng.choice(["float32", "float32", "bfloat16", "float16"])
    if data == "scaled" and dtype == "float16":
        dtype = "bfloat16"  # float16 cannot hold 1e20
    scale = 10.0 ** rng.choice([-20, -6, 6, 20]) if data == "scaled" else 1.0
    b_enc = rng.random() < 0.5
    shift = rng.choice([0.0, 0.0, 0.0, 1.0, 3.0]) if b_enc and data != "ties" else 0.0
    return Case(index, mode, B, d_in, d_sae, k, dtype, data, scale, b_enc, shift,
                dead=rng.choice([0.0, 0.1, 0.5, 1.0, rng.random()]), scalar_threshold=rng.random() < 0.3,
                backward=rng.random() < 1 / 3)


CASES = [_case(i) for i in range(N_CASES)]


def _inputs(case: Case):
    """x, W_enc, b_dec, b_enc (or None), threshold (or None), dead mask (or None), on the CPU."""
    g = torch.Generator().manual_seed(hash((SEED, case.index)) % 2 ** 31)
    dt = DTYPES[case.dtype]
    B, d_in, d_sae = case.B, case.d_in, case.d_sae
    if case.data == "ties":
        # small integers: every product and sum is exact in every dtype, so ties are exact too
        x = torch.randint(-2, 3, (B, d_in), generator=g).to(dt)
        W = torch.randint(-1, 2, (d_in, d_sae), generator=g).to(dt)
        bd = torch.zeros(d_in, dtype=dt)
        be = torch.randint(-1, 2, (d_sae,), generator=g).to(dt) if case.b_enc else None
    else:
        x = (torch.randn(B, d_in, generator=g) * case.scale).to(dt)
        W = (torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5).to(dt)
        bd = (0.1 * case.scale * torch.randn(d_in, generator=g)).to(dt)
        be = ((0.3 * torch.randn(d_sae, generator=g) - case.shift) * case.scale).to(dt) if case.b_enc else None
    threshold = dead = None
    if case.mode == "threshold":
        pre = _exact(x - bd, W, be)
        top = float(pre.max()) if pre.numel() else 1.0
        if case.data == "ties":
            # integer thresholds equal to values: the comparison is strict
            threshold = torch.randint(-1, 3, (d_sae,), generator=g).float()
        else:
            threshold = (torch.rand(d_sae, generator=g) * max(top, 0.0)).float()
        if case.scalar_threshold:
            threshold = threshold[:1]
    if case.mode == "aux":
        dead = torch.rand(d_sae, generator=g) < case.dead
    return x, W, bd, be, threshold, dead


def _exact(xc: torch.Tensor, W: torch.Tensor, be: Optional[torch.Tensor]) -> torch.Tensor:
    pre = xc.double() @ W.double()
    return pre + be.double() if be is not None else pre


def _bound(xc, W, be, exact, dtype, truncates: bool) -> torch.Tensor:
    """Largest |value - exact| a backend may produce for each entry (see the module docstring)."""
    n = xc.shape[1] + 1
    u = 2.0 ** -24
    magnitude = xc.double().abs() @ W.double().abs()
    if be is not None:
        magnitude = magnitude + be.double().abs()
    acc = n * u / (1 - n * u) * magnitude
    if dtype == torch.float32:
        return acc + TINY[dtype]
    return acc + (1.0 if truncates else 0.5) * (EPS[dtype] * (exact.abs() + acc) + TINY[dtype])


def _expected_exact(exact: torch.Tensor, mode: str, k: int, threshold) -> torch.Tensor:
    """Sorted flat keys of the documented answer on exact data (ties to the lower flat index)."""
    B, d_sae = exact.shape
    flat = exact.flatten()
    if mode == "batch":
        order = torch.sort(flat, descending=True, stable=True).indices
        return torch.sort(order[: min(B * k, int((flat > 0).sum()))]).values
    if mode == "row":
        order = torch.sort(exact, dim=1, descending=True, stable=True).indices[:, :k]
        keys = order + torch.arange(B)[:, None] * d_sae
        return torch.sort(keys[torch.gather(exact, 1, order) > 0]).values
    return ((exact > threshold.double()) & (exact > 0)).flatten().nonzero().flatten()


def _check_choice(where: str, exact, bound, kept: torch.Tensor, mode: str, k: int, threshold) -> None:
    """The kept mask [B, d_sae] is a valid answer for some values within ``bound`` of ``exact``."""
    lo, hi = exact - bound, exact + bound
    maybe_positive = hi > 0
    if mode == "threshold":
        thr = threshold.double()
        assert bool((hi[kept] > thr.expand_as(exact)[kept]).all()), f"{where}: kept an entry at or below its threshold"
        missed = ~kept & (lo > thr) & (lo > 0)
        assert not bool(missed.any()), f"{where}: left out entries above their threshold: {missed.nonzero()[:5].tolist()}"
        return
    groups = [(kept.flatten(), lo.flatten(), hi.flatten(), maybe_positive.flatten(), k * exact.shape[0])] \
        if mode == "batch" else [(kept[r], lo[r], hi[r], maybe_positive[r], k) for r in range(exact.shape[0])]
    for i, (chosen, lo_g, hi_g, maybe, want) in enumerate(groups):
        n = int(chosen.sum())
        n_lo, n_hi = int((lo_g > 0).sum()), int(maybe.sum())
        assert min(want, n_lo) <= n <= min(want, n_hi), \
            f"{where}: group {i} kept {n} entries, expected min(k={want}, positives in [{n_lo}, {n_hi}])"
        assert bool(maybe[chosen].all()), f"{where}: group {i} kept an entry that cannot be positive"
        left = ~chosen & (lo_g > 0)
        if not bool(left.any()):
            continue
        assert n == want, f"{where}: group {i} kept {n} < k={want} entries but left out positive ones"
        assert float(lo_g[left].max()) <= float(hi_g[chosen].min()), \
            f"{where}: group {i} left out an entry larger than one it kept"


def _run_op(case: Case, x, W, bd, be, threshold, dead):
    """The case's op on the current backend; returns its codes and the input leaves (which
    require grad when the case checks the backward pass)."""
    leaves = [t.detach().clone().to(DEVICE).requires_grad_(case.backward) if t is not None else None
              for t in (x, W, bd, be)]
    x_, W_, bd_, be_ = leaves
    if case.mode in ("batch", "row"):
        acts = saefast.topk_encode(x_, W_, bd_, case.k, b_enc=be_, mode=case.mode)
    elif case.mode == "threshold":
        thr = float(threshold) if case.scalar_threshold else threshold.to(DEVICE)
        acts = saefast.threshold_encode(x_, W_, bd_, thr, b_enc=be_)
    else:
        acts = saefast.auxk_encode(x_, W_, bd_, dead.to(DEVICE), case.k, b_enc=be_)
    return acts, leaves


@pytest.fixture
def one_rounding():
    """cuBLAS may otherwise round 16-bit partial sums (split-K) before the final rounding; the
    contract is one rounding of an fp32 accumulation."""
    matmul = torch.backends.cuda.matmul
    names = ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")
    before = [getattr(matmul, name) for name in names]
    for name in names:
        setattr(matmul, name, False)
    yield
    for name, value in zip(names, before):
        setattr(matmul, name, value)


@pytest.mark.parametrize("case", CASES, ids=[f"case{c.index:03d}-{c.mode}-{c.dtype}" for c in CASES])
def test_encode_fuzz(monkeypatch, one_rounding, case: Case):
    x, W, bd, be, threshold, dead = _inputs(case)
    dt = DTYPES[case.dtype]
    xc = x - bd  # the ops subtract b_dec in the dtype, as here
    exact = _exact(xc, W, be)
    mode, k = case.mode, case.k
    thr_full = None
    if mode == "threshold":
        thr_full = threshold.expand(case.d_sae) if case.scalar_threshold else threshold
    if mode == "aux":
        exact_sel = exact.masked_fill(~dead, float("-inf"))  # only dead latents may be chosen
        k = min(case.k, int(dead.sum()))
        mode_sel = "row"
    else:
        exact_sel, mode_sel = exact, mode
    exact_data = case.data == "ties"
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SAEFAST_BACKEND", backend)
        where = f"{case.describe()} [{backend}]"
        acts, leaves = _run_op(case, x, W, bd, be, threshold, dead)
        values, indices, rows = acts.values.detach().cpu(), acts.indices.cpu(), acts.row_ids.cpu()
        check_csr(values, indices, rows, acts.offsets.cpu(), case.B, case.d_sae)
        keys = rows.long() * case.d_sae + indices.long()
        truncates = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        bound = _bound(xc, W, be, exact, dt, truncates)
        err = (values.double() - exact.flatten()[keys]).abs()
        assert bool((err <= bound.flatten()[keys]).all()), \
            f"{where}: kept values differ from the exact pre-activations by {float((err - bound.flatten()[keys]).max()):.3g} beyond the bound"
        kept = torch.zeros(case.B * case.d_sae, dtype=torch.bool)
        kept[keys] = True
        kept = kept.view(case.B, case.d_sae)
        if mode == "aux":
            assert bool(dead[indices.long()].all()), f"{where}: aux-K kept a latent that is not dead"
        if k > 0:
            _check_choice(where, exact_sel, bound, kept, mode_sel, k, thr_full)
        else:
            assert keys.numel() == 0, f"{where}: kept entries with no dead latent"
        if exact_data and k > 0:
            expected = _expected_exact(exact_sel, mode_sel, k, thr_full)
            assert torch.equal(keys, expected), f"{where}: on exact data the kept set must be the documented one"
        want_min = float(values.float().min()) if values.numel() else 0.0
        assert float(acts.kept_min) == want_min, f"{where}: kept_min is not the smallest kept value"
        results[backend] = keys
        if case.backward:
            _check_backward(where, case, acts, leaves, keys, dt)
    if exact_data:
        assert torch.equal(results["torch"], results["triton"]), f"{case.describe()}: backends chose different sets"


def _check_backward(where: str, case: Case, acts, leaves, keys, dt) -> None:
    """Gradients of sum(values * g) + sum(sparse_decode(acts, W_dec, b_dec) * g_out) against dense
    float64 autograd on the kept entries, each within a few roundings of the dtype (and fp32
    accumulation) of the sum of the magnitudes of its terms."""
    g = torch.Generator().manual_seed(case.index)
    W_dec = torch.randn(case.d_sae, case.d_in, generator=g).to(dt)
    g_vals = torch.randn(acts.nnz, generator=g)
    g_out = torch.randn(case.B, case.d_in, generator=g)
    W_dec_leaf = W_dec.clone().to(DEVICE).requires_grad_()
    recon = saefast.sparse_decode(acts, W_dec_leaf, leaves[2])
    loss = (acts.values.float() * g_vals.to(DEVICE)).sum() + (recon.float() * g_out.to(DEVICE)).sum()
    loss.backward()
    x, W, bd, be = [t.detach().cpu() if t is not None else None for t in leaves]
    expected = _dense_grads(x, W, bd, be, keys, g_vals, W_dec, g_out)
    magnitude = _grad_magnitudes(x - bd, W, be, keys, g_vals, W_dec, g_out)
    n_terms = case.B + case.d_sae + case.d_in
    rtol = 4 * TOL[dt][0] + n_terms * 2.0 ** -23
    got = [leaves[0].grad, leaves[1].grad, leaves[2].grad, leaves[3].grad if be is not None else None,
           W_dec_leaf.grad]
    for name, a, e, m in zip(["x", "W_enc", "b_dec", "b_enc", "W_dec"], got, expected, magnitude):
        if name == "b_enc" and be is None:
            continue
        excess = float(((a.detach().cpu().double() - e).abs() - (rtol * m + TINY[dt])).max())
        assert excess <= 0, f"{where}: gradient of {name} off by {excess:.3g} beyond tolerance"


def _dense_grads(x, W, bd, be, keys, g_vals, W_dec, g_out):
    """Float64 autograd of the same loss through the dense computation, on the kept entries (all
    positive, so ReLU passes them): gradients of x, W_enc, b_dec, b_enc (zeros without it), W_dec.
    ``x - b_dec`` takes the value the ops compute in the dtype, with the gradient of the subtraction."""
    d_sae = W.shape[1]
    leaves = [t.detach().double().requires_grad_() for t in (x, W, bd, be if be is not None else torch.zeros(d_sae), W_dec)]
    x_, W_, bd_, be_, Wd_ = leaves
    xc_ = x_ - bd_
    xc_ = xc_ + ((x - bd).double() - xc_).detach()
    values = (xc_ @ W_ + be_).flatten()[keys]
    dense = torch.zeros(x.shape[0] * d_sae, dtype=torch.float64).index_put((keys,), values).view(x.shape[0], d_sae)
    loss = (values * g_vals.double()).sum() + ((dense @ Wd_ + bd_) * g_out.double()).sum()
    loss.backward()
    return [t.grad for t in leaves]


def _grad_magnitudes(xc, W, be, keys, g_vals, W_dec, g_out):
    """For each gradient of :func:`_check_backward`'s loss, the sum of the magnitudes of the terms
    that make it up (x, W_enc, b_dec, b_enc, W_dec): what its rounding errors scale with."""
    B, d_sae = xc.shape[0], W.shape[1]
    rows, lats = keys // d_sae, keys % d_sae
    xc, W, W_dec, g_out = xc.double().abs(), W.double().abs(), W_dec.double().abs(), g_out.double().abs()
    h = g_vals.double().abs() + (W_dec[lats] * g_out[rows]).sum(1)  # |d loss / d value|
    H = torch.zeros(B, d_sae, dtype=torch.float64)
    H[rows, lats] = h
    values = (xc[rows] * W[:, lats].t()).sum(1) + (be.double().abs()[lats] if be is not None else 0)
    V = torch.zeros(B, d_sae, dtype=torch.float64)
    V[rows, lats] = values
    grad_x = H @ W.t()
    return [grad_x, xc.t() @ H, g_out.sum(0) + grad_x.sum(0), H.sum(0), V.t() @ g_out]
