"""Whole BatchTopK training step (forward, aux-K, backward, decoder projection, Adam step,
renormalisation): saefast against dense PyTorch with SAELens' maths, the peers where they are
installed, and the floor (the encoder GEMM alone and one Adam pass over the same weights).

Each contender's figure carries its configuration differences in ``notes``; the results file
adds each step's speed-up over the others and its multiple of the floor.
"""
from __future__ import annotations

import pytest
import torch

import sae_steps
from conftest import SIZES, dtype_name, problem, run_contender

# saefast last, so its extra_info can hold its speed-up over everything timed before it.
IMPLS = ("floor-gemm", "floor-adam", "dense", *sae_steps.PEERS, "saefast-sae", "saefast")
CASES = [pytest.param(impl, dtype, id=f"{impl}-{dtype_name(dtype)}") for dtype in SIZES.dtypes for impl in IMPLS]


def _floor(impl: str, p: sae_steps.Problem):
    inputs = sae_steps.make_inputs(p)
    if impl == "floor-gemm":
        return sae_steps.encoder_gemm(p, inputs), "torch.mm(x, W_enc) alone"
    return sae_steps.adam_pass(p, inputs), "one Adam step over W_enc, W_dec, b_dec (gradients given)"


@pytest.mark.parametrize("impl,dtype", CASES)
def test_train_step(benchmark, record, impl, dtype):
    p = problem(SIZES.d_sae_main, dtype=dtype)
    if impl in sae_steps.PEERS:
        pytest.importorskip(sae_steps.PEERS[impl][0], reason=f"{impl} is not installed")
    if impl == "saefast-sae" and not sae_steps.saefast_sae_available():
        pytest.skip("saefast.BatchTopKSAE is not available in this checkout")
    if impl.startswith("floor"):
        run_contender(benchmark, record, group="train_step", impl=impl, params=p.params(),
                      build=lambda: _floor(impl, p), call=lambda built: built[0], notes=lambda built: built[1])
        return
    run_contender(benchmark, record, group="train_step", impl=impl, params=p.params(),
                  build=lambda: sae_steps.make_step(impl, p), call=lambda step: step.run,
                  notes=lambda step: step.notes, memory=True)


def test_contenders_compute_the_same_step():
    """The saefast step, the SAE class and the dense baseline are the same maths: after three
    steps from the same weights their parameters agree (fp32, toy size, any device)."""
    p = sae_steps.Problem(d_in=48, d_sae=600, batch=64, k=6, k_aux=20, dead_fraction=0.1,
                          device=problem().device)
    params = {}
    for impl in ("saefast", "dense"):
        inputs = sae_steps.make_inputs(p)
        weights = (inputs["W_enc"], inputs["W_dec"], inputs["b_dec"])  # the step owns and updates these
        step = sae_steps.make_step(impl, p, inputs)
        for _ in range(3):
            step.run()
        params[impl] = weights
    for name, a, b in zip(("W_enc", "W_dec", "b_dec"), params["saefast"], params["dense"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{name} differs between saefast and dense")
    if sae_steps.saefast_sae_available():
        step = sae_steps.make_step("saefast-sae", p)
        for _ in range(3):
            step.run()
        torch.testing.assert_close(step.module.W_enc.detach(), params["saefast"][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(step.module.W_dec.detach(), params["saefast"][1], rtol=1e-4, atol=1e-6)
