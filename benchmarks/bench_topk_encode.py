"""Fused encode + top-k: ``topk_encode`` in BatchTopK ("batch") and TopK ("row") modes,
forward alone and forward + backward, against dense PyTorch (dense matmul, ReLU, ``torch.topk``
over the flattened batch or each row, scatter into a dense [B, d_sae] matrix) and against
saefast's own PyTorch backend."""
from __future__ import annotations

import pytest
import torch

import sae_steps
from conftest import SIZES, problem, run_contender
from encode_counters import counting
from op_cases import cases, clear_grads, grad_like, leaf, op_params, use_impl
from saefast import topk_encode


def _dense_encode(x, W_enc, b_dec, k: int, mode: str) -> torch.Tensor:
    pre = torch.relu((x - b_dec) @ W_enc)
    if mode == "batch":
        flat = pre.flatten()
        top = flat.topk(x.shape[0] * k, sorted=False)
        return torch.zeros_like(flat).scatter(-1, top.indices, top.values).view_as(pre)
    top = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


@pytest.mark.parametrize("mode,pass_,impl,dtype", cases(("mode", ("batch", "row")),
                                                         ("pass", ("forward", "forward+backward"))))
def test_topk_encode(benchmark, record, monkeypatch, mode, pass_, impl, dtype):
    use_impl(impl, monkeypatch)
    p = problem(SIZES.d_sae_main, dtype=dtype)

    def build():
        inputs = sae_steps.make_inputs(p)
        x, W_enc, b_dec = (leaf(inputs[n]) for n in ("x", "W_enc", "b_dec"))
        if impl == "dense":
            encode = lambda: _dense_encode(x, W_enc, b_dec, p.k, mode)  # noqa: E731
        else:
            encode = lambda: topk_encode(x, W_enc, b_dec, p.k, mode=mode).values  # noqa: E731
        if pass_ == "forward":
            return lambda: encode().detach()
        # dense: the upstream gradient of the dense codes; saefast: of the kept values
        out_grad = grad_like(encode())

        def forward_backward():
            clear_grads(x, W_enc, b_dec)
            encode().backward(out_grad)
        return forward_backward

    params = op_params(p, mode=mode, **{"pass": pass_})
    with counting(record, group="topk_encode", impl=impl, params=params):
        run_contender(benchmark, record, group="topk_encode", impl=impl, params=params, build=build,
                      call=lambda fn: fn, memory=False)
