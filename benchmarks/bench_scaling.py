"""How the whole BatchTopK step scales: with d_sae at fixed k (the encoder GEMM grows with d_sae
for everyone; dense code's top-k, scatter and decode grow with it too, saefast's sparse parts do
not) and with k at fixed d_sae (saefast's sparse parts grow with k; dense code barely notices).
Each point also records the step's peak memory; ``floor-gemm`` is the encoder GEMM alone."""
from __future__ import annotations

import pytest

import sae_steps
from conftest import IS_CUDA, SIZES, dtype_name, problem, run_contender

D_SAE_IMPLS = ("floor-gemm", "dense", "sparsify", "saefast")
K_IMPLS = ("floor-gemm", "dense", "saefast")


def _cases(values, impls, ends_only=()):
    """Params (value, impl, dtype); impls in ``ends_only`` run at the sweep's two ends only."""
    ends = (values[0], values[-1])
    return [pytest.param(v, impl, dtype, id=f"{v}-{impl}-{dtype_name(dtype)}")
            for dtype in SIZES.dtypes for v in values for impl in impls if impl not in ends_only or v in ends]


def _run(benchmark, record, group: str, impl: str, p: sae_steps.Problem) -> None:
    if impl in sae_steps.PEERS:
        pytest.importorskip(sae_steps.PEERS[impl][0], reason=f"{impl} is not installed")
    if impl == "floor-gemm":
        run_contender(benchmark, record, group=group, impl=impl, params=p.params(),
                      build=lambda: sae_steps.encoder_gemm(p, sae_steps.make_inputs(p)), call=lambda fn: fn,
                      notes=lambda fn: "torch.mm(x, W_enc) alone")
        return
    run_contender(benchmark, record, group=group, impl=impl, params=p.params(),
                  build=lambda: sae_steps.make_step(impl, p), call=lambda step: step.run,
                  notes=lambda step: step.notes, memory=True)


@pytest.mark.parametrize("d_sae,impl,dtype", _cases(SIZES.d_sae_sweep, D_SAE_IMPLS))
def test_step_vs_d_sae(benchmark, record, d_sae, impl, dtype):
    _run(benchmark, record, "scaling_d_sae", impl, problem(d_sae, dtype=dtype))


# dense code's step hardly depends on k, and on a CPU each of its steps costs seconds
@pytest.mark.parametrize("k,impl,dtype", _cases(SIZES.k_sweep, K_IMPLS, ends_only=() if IS_CUDA else ("dense",)))
def test_step_vs_k(benchmark, record, k, impl, dtype):
    _run(benchmark, record, "scaling_k", impl, problem(SIZES.k_sweep_d_sae, k=k, dtype=dtype))
