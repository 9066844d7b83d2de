"""Whole training step of an acausal crosscoder (4 layers concatenated; sparse ReLU encode and
decode, L1 weighted by per-layer decoder norms, backward, Adam) against dense PyTorch of the same
maths, with peak memory; see variant_steps.py."""
from __future__ import annotations

import pytest

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
    variant_steps.assert_contenders_agree("crosscoder", problem().device)
