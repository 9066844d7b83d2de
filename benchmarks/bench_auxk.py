"""Aux-K for dead latents: each row's top k_aux pre-activations among the dead latents, decoded
without b_dec, forward + backward of the aux loss against a residual. ``saefast`` runs
auxk_encode + sparse_decode (its encode multiplies only the dead columns of W_enc); ``dense``
is SAELens' way, starting from the dense pre-activations the main path already computed (so
its figure holds no GEMM): mask the dead columns, ``torch.topk`` per row, scatter, dense decode."""
from __future__ import annotations

import pytest
import torch

import sae_steps
from conftest import SIZES, problem, run_contender
from encode_counters import counting
from op_cases import cases, clear_grads, grad_like, leaf, op_params, use_impl
from saefast import auxk_encode, sparse_decode


@pytest.mark.parametrize("impl,dtype", cases())
def test_auxk(benchmark, record, monkeypatch, impl, dtype):
    use_impl(impl, monkeypatch)
    p = problem(SIZES.d_sae_main, dtype=dtype)
    k_aux = min(p.k_aux, p.n_dead)

    def build():
        inputs = sae_steps.make_inputs(p)
        dead = inputs["dead_mask"]
        W_dec = leaf(inputs["W_dec"])
        residual = grad_like(inputs["x"], seed=2)
        if impl == "dense":
            with torch.no_grad():
                pre = leaf(torch.relu((inputs["x"] - inputs["b_dec"]) @ inputs["W_enc"]))
            del inputs

            def dense_aux():
                clear_grads(pre, W_dec)
                pre_dead = pre[:, dead]
                top = pre_dead.topk(k_aux, dim=-1)
                acts = torch.zeros_like(pre_dead).scatter(-1, top.indices, top.values)
                ((acts @ W_dec[dead]).float() - residual.float()).pow(2).mean().backward()
            return dense_aux
        x, W_enc, b_dec = (leaf(inputs[n]) for n in ("x", "W_enc", "b_dec"))
        del inputs

        def saefast_aux():
            clear_grads(x, W_enc, b_dec, W_dec)
            acts = auxk_encode(x, W_enc, b_dec, dead, p.k_aux)
            (sparse_decode(acts, W_dec).float() - residual.float()).pow(2).mean().backward()
        return saefast_aux

    params = op_params(p, n_dead=p.n_dead)
    with counting(record, group="auxk", impl=impl, params=params):
        run_contender(benchmark, record, group="auxk", impl=impl, params=params, build=build, call=lambda fn: fn)
