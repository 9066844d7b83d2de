"""How often the Triton encode needs more than its one kernel pass, on the benchmark inputs
(random data, ``sae_steps.make_inputs``) at the profile's shapes, over several seeds: rows that
fall back to the PyTorch backend, kernel reruns (candidate buffer overflow; BatchTopK threshold
set too high) and candidates written per kept entry, for BatchTopK, TopK and aux-K (top k_aux
among the dead latents).

On CUDA the kernels run. Elsewhere the kernel's candidate pass is emulated in PyTorch with the
same comparisons (``encode_counters.emulated_candidates``), so the figures are those of the
threshold estimate itself and exist on any machine; the time recorded is the measurement's.
"""
from __future__ import annotations

import pytest
import torch

import sae_steps
from conftest import IS_CUDA, SIZES, dtype_name, problem
from encode_counters import emulated_candidates, per_call

SEEDS = (0, 1, 2)


@pytest.mark.parametrize("mode", ["batch", "row", "aux"])
@pytest.mark.parametrize("dtype", SIZES.dtypes, ids=dtype_name)
def test_encode_fallbacks(benchmark, record, monkeypatch, mode, dtype):
    from saefast import triton_backend as tb

    if not IS_CUDA:
        monkeypatch.setattr(tb._encode_k, "encode_candidates", emulated_candidates)
    written = []
    kernel = tb._encode_k.encode_candidates

    def counted(*args):
        out = kernel(*args)
        written.append(out[3])
        return out

    monkeypatch.setattr(tb._encode_k, "encode_candidates", counted)
    found = {}
    benchmark.pedantic(lambda: found.update(_run(tb, mode, dtype)), rounds=1, iterations=1, warmup_rounds=0)
    p = problem(SIZES.d_sae_main, dtype=dtype)
    params = {**p.params(), "mode": mode, "seeds": len(SEEDS)}
    rates = per_call(found["counters"])
    record.figure(group="encode_fallbacks", impl="saefast", params=params, metric="fallback_rows",
                  value=rates["fallback_row_fraction"], unit="fraction",
                  notes="Triton kernels" if IS_CUDA else "kernel candidate pass emulated in PyTorch",
                  candidates_per_kept=sum(written) / max(found["kept"], 1), **rates,
                  **{k: v for k, v in found["counters"].items() if v})


def _run(tb, mode: str, dtype: torch.dtype) -> dict:
    """Encode the benchmark inputs of every seed; the counters and the entries kept."""
    p = problem(SIZES.d_sae_main, dtype=dtype)
    tb.reset_encode_counters()
    kept = 0
    for seed in SEEDS:
        inputs = sae_steps.make_inputs(p, seed=seed)
        xc = (inputs["x"] - inputs["b_dec"]).contiguous()
        W_enc, k = inputs["W_enc"], p.k
        if mode == "aux":
            W_enc = W_enc[:, inputs["dead_mask"]].contiguous()
            k = min(p.k_aux, p.n_dead)
        del inputs
        codes = tb.encode_forward(xc, W_enc, None, mode="batch" if mode == "batch" else "row", k=k)
        kept += codes[0].numel()
    return {"counters": tb.encode_counters(), "kept": kept}
