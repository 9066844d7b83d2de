"""Whole Matryoshka BatchTopK training step (BatchTopK encode, every nested prefix's reconstruction
and the mean of their MSEs, aux-K, backward, decoder projection, Adam, renormalisation):

* ``saefast``: ``MatryoshkaBatchTopKSAE.training_forward`` (the active pairs regrouped by prefix,
  one sparse decode for every prefix and the aux-K codes; nothing [B, d_sae]);
* ``saefast-batchtopk``: ``BatchTopKSAE.training_forward`` on the same problem (what the nested
  prefixes cost on top of plain BatchTopK);
* ``dense``: plain PyTorch of the same maths as the reference implementations compute it: dense
  pre-activations, flat top-k, scatter, and each prefix's reconstruction accumulated group by group
  (``x_hat += acts[:, lo:hi] @ W_dec[lo:hi]``), dense aux-K.

Prefixes: d_sae/64, d_sae/16, d_sae/4, d_sae (four groups, each prefix four times the one before).
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
from torch import Tensor

import sae_steps
from conftest import SIZES, dtype_name, problem, run_contender
from sae_steps import AUX_PENALTY, Problem, Step, adam_kind, dense_decoder_update, make_adam, sae_training_step

IMPLS = ("dense", "saefast-batchtopk", "saefast")
CASES = [pytest.param(impl, dtype, id=f"{impl}-{dtype_name(dtype)}") for dtype in SIZES.dtypes for impl in IMPLS]


def prefixes(d_sae: int) -> Tuple[int, ...]:
    return (d_sae // 64, d_sae // 16, d_sae // 4, d_sae)


def _weights(inputs: Dict[str, Tensor]) -> torch.nn.Module:
    """W_enc, W_dec, b_dec as the parameters of a module (the step owns the input tensors)."""
    module = torch.nn.Module()
    for name in ("W_enc", "W_dec", "b_dec"):
        setattr(module, name, torch.nn.Parameter(inputs.pop(name)))
    return module


def dense_matryoshka_step(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    module = _weights(inputs)
    W_enc, W_dec, b_dec = module.W_enc, module.W_dec, module.b_dec
    x, dead = inputs["x"], inputs["dead_mask"]
    k_aux = min(p.k_aux, p.n_dead)
    bounds = (0,) + prefixes(p.d_sae)
    opt = make_adam([W_enc, W_dec, b_dec])

    def run() -> None:
        pre = torch.relu((x - b_dec) @ W_enc)
        flat = pre.flatten()
        top = flat.topk(p.batch * p.k, sorted=False)
        acts = torch.zeros_like(flat).scatter(-1, top.indices, top.values).view_as(pre)
        x_hat = b_dec.expand_as(x)
        prefix_mse = []
        for lo, hi in zip(bounds, bounds[1:]):
            x_hat = x_hat + acts[:, lo:hi] @ W_dec[lo:hi]
            prefix_mse.append((x_hat.float() - x.float()).pow(2).mean())
        residual = (x - x_hat).detach()
        pre_dead = pre[:, dead]
        top_aux = pre_dead.topk(k_aux, dim=-1)
        acts_aux = torch.zeros_like(pre_dead).scatter(-1, top_aux.indices, top_aux.values)
        aux = AUX_PENALTY * ((acts_aux @ W_dec[dead]).float() - residual.float()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        (torch.stack(prefix_mse).mean() + aux).backward()
        dense_decoder_update(W_dec, opt)

    return Step("dense", run, f"plain PyTorch, prefixes accumulated group by group, {adam_kind(opt)}",
                module=module)


def saefast_step(p: Problem, inputs: Dict[str, Tensor], architecture: str) -> Step:
    from saefast import SAEConfig, create_sae
    extra = {"matryoshka_prefixes": list(prefixes(p.d_sae))} if architecture == "matryoshka_batchtopk" else {}
    cfg = SAEConfig(d_in=p.d_in, d_sae=p.d_sae, top_k=p.k, top_k_aux=p.k_aux, aux_penalty=AUX_PENALTY,
                    n_batches_to_dead=1 << 40, dtype=dtype_name(p.dtype), device=p.device, seed=0,
                    architecture=architecture, **extra)
    sae = create_sae(cfg)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(inputs.pop(name))
    dead_idx = inputs["dead_mask"].nonzero().flatten()
    x = inputs["x"]
    opt = make_adam([q for q in sae.parameters() if q.requires_grad])

    def pin_dead() -> None:
        sae.num_batches_not_active[dead_idx] = 1 << 40  # the same latents stay dead every step

    run = sae_training_step(sae, opt, x, before=pin_dead)

    return Step("saefast", run, f"saefast.{type(sae).__name__}.training_forward, {adam_kind(opt)}", module=sae)


def make_step(impl: str, p: Problem, inputs=None) -> Step:
    inputs = sae_steps.make_inputs(p) if inputs is None else inputs
    if impl == "dense":
        return dense_matryoshka_step(p, inputs)
    return saefast_step(p, inputs, "batchtopk" if impl == "saefast-batchtopk" else "matryoshka_batchtopk")


@pytest.mark.parametrize("impl,dtype", CASES)
def test_matryoshka_step(benchmark, record, impl, dtype):
    p = problem(SIZES.d_sae_main, dtype=dtype)
    params = {**p.params(), "prefixes": "/".join(map(str, prefixes(p.d_sae)))}
    run_contender(benchmark, record, group="matryoshka_step", impl=impl, params=params,
                  build=lambda: make_step(impl, p), call=lambda step: step.run, notes=lambda step: step.notes,
                  memory=True)


def test_contenders_compute_the_same_step():
    """saefast and the dense baseline are the same maths: after three steps from the same weights
    their parameters agree (fp32, toy size)."""
    p = Problem(d_in=48, d_sae=640, batch=64, k=6, k_aux=20, dead_fraction=0.1, device=problem().device)
    weights = {}
    for impl in ("saefast", "dense"):
        step = make_step(impl, p)
        for _ in range(3):
            step.run()
        weights[impl] = {name: getattr(step.module, name).detach() for name in ("W_enc", "W_dec", "b_dec")}
    for name in ("W_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(weights["saefast"][name], weights["dense"][name], rtol=1e-4, atol=1e-6, msg=name)
