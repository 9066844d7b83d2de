"""Decoder-norm maintenance: remove from W_dec.grad each row's component along its row, then
rescale the rows to unit norm. ``saefast`` calls project_decoder_grad_ then normalize_decoder_,
``saefast-fused`` the one-pass normalize_decoder_and_project_grad_, ``dense`` the plain PyTorch
of SAELens / the BatchTopK reference code (unit rows, row dot products, subtract, rescale)."""
from __future__ import annotations

import pytest
import torch

import sae_steps
from conftest import SIZES, dtype_name, problem, run_contender
from op_cases import grad_like, op_params, use_impl
from saefast import normalize_decoder_, normalize_decoder_and_project_grad_, project_decoder_grad_

IMPLS = ("dense", "saefast-torch", "saefast-fused", "saefast")
CASES = [pytest.param(impl, dtype, id=f"{impl}-{dtype_name(dtype)}") for dtype in SIZES.dtypes for impl in IMPLS]


@torch.no_grad()
def _dense_project_and_normalize(W_dec: torch.Tensor, grad: torch.Tensor) -> None:
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    grad -= (grad * unit).sum(-1, keepdim=True) * unit
    W_dec.copy_(unit)


@pytest.mark.parametrize("impl,dtype", CASES)
def test_decoder_norm(benchmark, record, monkeypatch, impl, dtype):
    use_impl(impl, monkeypatch)
    p = problem(SIZES.d_sae_main, dtype=dtype)

    def build():
        W_dec = sae_steps.make_inputs(p)["W_dec"]
        grad = grad_like(W_dec)
        if impl == "dense":
            return lambda: _dense_project_and_normalize(W_dec, grad)
        if impl == "saefast-fused":
            return lambda: normalize_decoder_and_project_grad_(W_dec, grad)

        def two_passes():
            project_decoder_grad_(W_dec, grad)
            normalize_decoder_(W_dec)
        return two_passes

    run_contender(benchmark, record, group="decoder_norm", impl=impl, params=op_params(p), build=build,
                  call=lambda fn: fn)
