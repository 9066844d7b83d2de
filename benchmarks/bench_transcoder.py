"""Whole training step of a BatchTopK skip transcoder (sparse encode and decode, the linear skip,
aux-K, backward, decoder-gradient projection, Adam, renormalisation) against dense PyTorch of the
same maths, with peak memory; see variant_steps.py."""
from __future__ import annotations

import pytest
import torch

import variant_steps
from conftest import SIZES, dtype_name, problem, run_contender

CASES = [pytest.param(impl, dtype, id=f"{impl}-{dtype_name(dtype)}") for dtype in SIZES.dtypes
         for impl in ("dense", "saefast")]


@pytest.mark.parametrize("impl,dtype", CASES)
def test_transcoder_step(benchmark, record, impl, dtype):
    p = problem(SIZES.d_sae_main, dtype=dtype)
    params = {**p.params(), "d_out": p.d_in, "skip_connection": True}
    run_contender(benchmark, record, group="transcoder_step", impl=impl, params=params,
                  build=lambda: variant_steps.make_step("transcoder", impl, p), call=lambda step: step.run,
                  notes=lambda step: step.notes, memory=True)


def test_transcoder_contenders_compute_the_same_step():
    """saefast's transcoder step and the dense one are the same maths: after three steps from the
    same weights every parameter agrees (fp32, toy size)."""
    p = variant_steps.toy_problem(problem().device)
    weights = {}
    for impl in ("saefast", "dense"):
        step = variant_steps.make_step("transcoder", impl, p)
        for _ in range(3):
            step.run()
        weights[impl] = variant_steps.step_weights(step)
    for name, value in weights["dense"].items():
        torch.testing.assert_close(weights["saefast"][name], value, rtol=1e-4, atol=1e-6, msg=name)
