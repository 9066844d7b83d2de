"""Sparse decode ``x_hat = sum values * W_dec[indices] + b_dec``, forward and forward +
backward (gradients of the values and of W_dec), against the dense decode of the same codes
(``acts_dense @ W_dec + b_dec``) and saefast's PyTorch backend."""
from __future__ import annotations

import pytest

import sae_steps
from conftest import SIZES, problem, run_contender
from op_cases import cases, clear_grads, grad_like, leaf, op_params, use_impl
from saefast import sparse_decode, topk_encode


@pytest.mark.parametrize("pass_,impl,dtype", cases(("pass", ("forward", "forward+backward"))))
def test_sparse_decode(benchmark, record, monkeypatch, pass_, impl, dtype):
    use_impl(impl, monkeypatch)
    p = problem(SIZES.d_sae_main, dtype=dtype)

    def build():
        inputs = sae_steps.make_inputs(p)
        codes = topk_encode(inputs["x"], inputs["W_enc"], inputs["b_dec"], p.k, mode="batch")
        W_dec, b_dec = leaf(inputs["W_dec"]), leaf(inputs["b_dec"])
        del inputs
        if impl == "dense":
            acts = leaf(codes.to_dense())
            decode = lambda: acts @ W_dec + b_dec  # noqa: E731
            grads_of = (acts, W_dec, b_dec)
        else:
            acts = codes._replace(values=leaf(codes.values))
            decode = lambda: sparse_decode(acts, W_dec, b_dec)  # noqa: E731
            grads_of = (acts.values, W_dec, b_dec)
        out_grad = grad_like(decode())
        if pass_ == "forward":
            return lambda: decode().detach()

        def forward_backward():
            clear_grads(*grads_of)
            decode().backward(out_grad)
        return forward_backward

    run_contender(benchmark, record, group="sparse_decode", impl=impl, params=op_params(p, **{"pass": pass_}),
                  build=build, call=lambda fn: fn)
