"""Whole training step of a BatchTopK skip transcoder (sparse encode and decode, the linear skip,
aux-K, backward, decoder-gradient projection, Adam, renormalisation) against dense PyTorch of the
same maths, with peak memory; see variant_steps.py."""
from __future__ import annotations

import pytest

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
    variant_steps.assert_contenders_agree("transcoder", problem().device)
