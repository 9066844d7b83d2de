"""Whole JumpReLU training step (threshold encode, straight-through estimators, sparsity penalty,
backward, decoder projection, Adam, renormalisation), for two losses: ``l0`` (the L0 penalty) and
``tanh+pre_act`` (the tanh sparsity measure plus the pre-activation loss):

* ``saefast``: ``JumpReLUSAE.training_forward`` (only pre-activations near or above a threshold
  are gathered; the pre-activation loss from column sums; nothing [B, d_sae]);
* ``dense``: plain PyTorch of the same maths: dense pre-activations, the estimators as autograd
  Functions over [B, d_sae], dense decode.

Thresholds start where about k latents per token fire (pre-activations are standard normal here).
"""
from __future__ import annotations

from typing import Dict

import pytest
import torch
from torch import Tensor

import sae_steps
from conftest import SIZES, dtype_name, problem, run_contender
from sae_steps import Problem, Step, adam_kind, dense_decoder_update, make_adam, sae_training_step

IMPLS = ("dense", "saefast")
LOSSES = {"l0": {}, "tanh+pre_act": {"jumprelu_sparsity_loss": "tanh", "jumprelu_pre_act_coefficient": 3e-4}}
CASES = [pytest.param(impl, loss, dtype, id=f"{impl}-{loss}-{dtype_name(dtype)}")
         for dtype in SIZES.dtypes for loss in LOSSES for impl in IMPLS]
BANDWIDTH = 0.05
L0_COEFFICIENT = 1e-3
TANH_SCALE = 4.0


def _threshold(p: Problem) -> float:
    """The standard normal quantile above which k of d_sae entries lie."""
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - p.k / p.d_sae)))


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u)


class _DenseJumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta):
        ctx.save_for_backward(z, theta)
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        grad_theta = (-(theta / BANDWIDTH) * _rect((z - theta) / BANDWIDTH) * g).sum(0)
        return (z > theta) * g, grad_theta


class _DenseStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta):
        ctx.save_for_backward(z, theta)
        return (z > theta).to(z)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        return None, (-(1.0 / BANDWIDTH) * _rect((z - theta) / BANDWIDTH) * g).sum(0)


def _module(inputs: Dict[str, Tensor], p: Problem) -> torch.nn.Module:
    module = torch.nn.Module()
    for name in ("W_enc", "W_dec", "b_dec"):
        setattr(module, name, torch.nn.Parameter(inputs.pop(name)))
    module.b_enc = torch.nn.Parameter(torch.zeros(p.d_sae, dtype=p.dtype, device=p.device))
    module.threshold = torch.nn.Parameter(torch.full((p.d_sae,), _threshold(p), device=p.device))
    return module


def dense_step(p: Problem, inputs: Dict[str, Tensor], loss: str) -> Step:
    m = _module(inputs, p)
    x = inputs["x"]
    opt = make_adam(m.parameters())
    options = LOSSES[loss]

    def run() -> None:
        h = (x - m.b_dec) @ m.W_enc + m.b_enc
        pre = torch.relu(h)
        theta = m.threshold.clamp(min=0)
        feats = _DenseJumpReLU.apply(pre, theta)
        x_hat = feats @ m.W_dec + m.b_dec
        mse = (x_hat.float() - x.float()).pow(2).mean()
        norms = m.W_dec.detach().norm(dim=1)
        if options:
            s = torch.tanh(TANH_SCALE * feats.float() * norms).sum(-1).mean()
            aux = options["jumprelu_pre_act_coefficient"] * (torch.relu(theta - h.float()) * norms).sum(-1).mean()
        else:
            s = _DenseStep.apply(pre, theta).sum(-1).mean()
            aux = 0.0
        opt.zero_grad(set_to_none=True)
        (mse + L0_COEFFICIENT * s + aux).backward()
        dense_decoder_update(m.W_dec, opt)

    return Step("dense", run, f"plain PyTorch, dense straight-through estimators, {adam_kind(opt)}", module=m)


def saefast_step(p: Problem, inputs: Dict[str, Tensor], loss: str) -> Step:
    from saefast import SAEConfig, create_sae
    cfg = SAEConfig(d_in=p.d_in, d_sae=p.d_sae, architecture="jumprelu", l1_coefficient=L0_COEFFICIENT,
                    jumprelu_bandwidth=BANDWIDTH, jumprelu_tanh_scale=TANH_SCALE, dtype=dtype_name(p.dtype),
                    device=p.device, seed=0, **LOSSES[loss])
    sae = create_sae(cfg)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(inputs.pop(name))
        sae.threshold.fill_(_threshold(p))
    x = inputs["x"]
    opt = make_adam([q for q in sae.parameters() if q.requires_grad])

    run = sae_training_step(sae, opt, x)
    return Step("saefast", run, f"saefast.JumpReLUSAE.training_forward, {adam_kind(opt)}", module=sae)


def make_step(impl: str, p: Problem, loss: str) -> Step:
    inputs = sae_steps.make_inputs(p)
    return (dense_step if impl == "dense" else saefast_step)(p, inputs, loss)


@pytest.mark.parametrize("impl,loss,dtype", CASES)
def test_jumprelu_step(benchmark, record, impl, loss, dtype):
    p = problem(SIZES.d_sae_main, dtype=dtype)
    params = {**p.params(), "loss": loss, "bandwidth": BANDWIDTH}
    run_contender(benchmark, record, group="jumprelu_step", impl=impl, params=params,
                  build=lambda: make_step(impl, p, loss), call=lambda step: step.run,
                  notes=lambda step: step.notes, memory=True)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_contenders_compute_the_same_step(loss):
    """saefast and the dense baseline are the same maths: after three steps from the same weights
    their parameters agree (fp32, toy size)."""
    p = Problem(d_in=48, d_sae=640, batch=64, k=6, device=problem().device)
    weights = {}
    for impl in IMPLS:
        step = make_step(impl, p, loss)
        for _ in range(3):
            step.run()
        weights[impl] = {name: getattr(step.module, name).detach()
                         for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    moved = (weights["saefast"]["threshold"] - _threshold(p)).abs().max()
    assert moved > 0, "the thresholds must get gradients"
    for name, value in weights["saefast"].items():
        torch.testing.assert_close(value, weights["dense"][name], rtol=1e-4, atol=1e-6, msg=name)
