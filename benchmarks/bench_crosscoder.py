"""Whole training step of an acausal crosscoder (4 layers concatenated; sparse ReLU encode and
decode, L1 weighted by per-layer decoder norms, backward, Adam) against dense PyTorch of the same
maths, with peak memory; see variant_steps.py."""
from __future__ import annotations

import pytest
import torch

import variant_steps
from conftest import SIZES, dtype_name, problem, run_contender

CASES = [pytest.param(impl, dtype, id=f"{impl}-{dtype_name(dtype)}") for dtype in SIZES.dtypes
         for impl in ("dense", "saefast")]


@pytest.mark.parametrize("impl,dtype", CASES)
def test_crosscoder_step(benchmark, record, impl, dtype):
    p = problem(SIZES.d_sae_main, dtype=dtype)
    params = {**p.params(), "n_layers": variant_steps.N_LAYERS, "l1_coefficient": variant_steps.L1_COEFFICIENT}
    run_contender(benchmark, record, group="crosscoder_step", impl=impl, params=params,
                  build=lambda: variant_steps.make_step("crosscoder", impl, p), call=lambda step: step.run,
                  notes=lambda step: step.notes, memory=True)


def test_crosscoder_contenders_compute_the_same_step():
    """saefast's crosscoder step and the dense one are the same maths: after three steps from the
    same weights every parameter agrees (fp32, toy size)."""
    p = variant_steps.toy_problem(problem().device)
    weights = {}
    for impl in ("saefast", "dense"):
        step = variant_steps.make_step("crosscoder", impl, p)
        for _ in range(3):
            step.run()
        weights[impl] = variant_steps.step_weights(step)
    for name, value in weights["dense"].items():
        torch.testing.assert_close(weights["saefast"][name], value, rtol=1e-4, atol=1e-6, msg=name)
