"""Whole BatchTopK training step (forward, aux-K, backward, decoder projection, Adam step,
renormalisation): every public way of stepping saefast's BatchTopK SAE against dense PyTorch with
SAELens' maths, the peers where they are installed, and the floor (the encoder GEMM alone and one
Adam pass over the same weights).

Contenders are timed interleaved, round by round in one process (``time_interleaved``), at each of
the profile's fractions of dead latents (the same latents dead for every contender). The results
file keeps every round's time, each contender's min / median / max, its multiple of the floor and
each saefast way's speed-up over every baseline as per-round ratios (min / median / max); a
speed-up counts as a win ("faster") only when its range across rounds excludes 1. Peak memory is
measured per contender in a fresh process (``step_peak.py``).
"""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch

import sae_steps
from conftest import (SIZES, dtype_name, problem, spread, step_peak_memory, time_interleaved, verdict)
from encode_counters import counting

SAEFAST_WAYS = ("saefast", "saefast-sae", "saefast-classic", "saefast-dict")
FLOOR = ("floor-gemm", "floor-adam")
CASES = [pytest.param(dead, dtype, id=f"dead{round(100 * dead)}-{dtype_name(dtype)}")
         for dtype in SIZES.dtypes for dead in SIZES.step_dead_fractions]


def _contenders(p: sae_steps.Problem) -> List[str]:
    names = list(FLOOR) + list(SAEFAST_WAYS)
    names += [name for name, (module, _) in sae_steps.PEERS.items() if _importable(module)]
    if p.dead_fraction in SIZES.step_dense_dead_fractions:
        names.append("dense")
    return names


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _build(impl: str, p: sae_steps.Problem):
    """(callable running one step, notes)."""
    if impl == "floor-gemm":
        return sae_steps.encoder_gemm(p, sae_steps.make_inputs(p)), "torch.mm(x, W_enc, out=...) alone"
    if impl == "floor-adam":
        return (sae_steps.adam_pass(p, sae_steps.make_inputs(p)),
                "one Adam step over W_enc, W_dec, b_dec (gradients given)")
    step = sae_steps.make_step(impl, p)
    return step.run, step.notes


@pytest.mark.parametrize("dead,dtype", CASES)
def test_train_step(benchmark, record, dead, dtype):
    p = problem(SIZES.d_sae_main, dtype=dtype, dead_fraction=dead)
    names = _contenders(p)
    built = {name: _build(name, p) for name in names}
    # On the Triton backend: the encode's reruns and fallbacks over every saefast way's steps.
    with counting(record, group="train_step", impl="saefast", params=p.params()):
        times = time_interleaved(benchmark, {name: fn for name, (fn, _) in built.items()}, SIZES.step_rounds)
    notes = {name: text for name, (_, text) in built.items()}
    built = None  # drop every contender (weights, optimizer state) before the memory runs
    params = p.params()
    n_rounds = min(len(t) for t in times.values())
    floor = [times["floor-gemm"][i] + times["floor-adam"][i] for i in range(n_rounds)]
    common = {"group": "train_step", "params": params, "interleaved": True, "extra_info": False}
    summary: Dict[str, Dict[str, float]] = {}
    for name in names:
        s = spread(times[name])
        summary[name] = s
        record.figure(impl=name, metric="time", value=s["median"], unit="s", notes=notes[name],
                      min=s["min"], max=s["max"], rounds=len(times[name]), times=times[name], **common)
        if name in FLOOR:
            continue
        multiple = spread([times[name][i] / floor[i] for i in range(n_rounds)])
        record.figure(impl=name, metric="multiple_of_floor", value=multiple["median"], unit="x",
                      min=multiple["min"], max=multiple["max"],
                      notes="step time / (encoder GEMM + one Adam pass), per round", **common)
    for mine in SAEFAST_WAYS:
        for other in names:
            if other in FLOOR or other in SAEFAST_WAYS:
                continue
            ratio = spread([times[other][i] / times[mine][i] for i in range(n_rounds)])
            record.figure(impl=other, metric="saefast_speedup", value=ratio["median"], unit="x",
                          min=ratio["min"], max=ratio["max"], saefast_impl=mine, verdict=verdict(ratio),
                          notes=f"time of {other} / time of {mine}, per round", **common)
            benchmark.extra_info[f"{mine}_speedup_vs_{other}"] = [round(ratio[key], 3) for key in
                                                                 ("min", "median", "max")]
    benchmark.extra_info.update(group="train_step", **params)
    benchmark.extra_info["median_s"] = {name: round(s["median"], 4) for name, s in summary.items()}
    if dead in SIZES.step_memory_dead_fractions:
        for name in names:
            if name in FLOOR:
                continue
            peak = step_peak_memory(name, p)
            if peak is not None:
                record.figure(impl=name, metric="peak_memory", value=peak, unit="bytes",
                              notes="peak in one step beyond what was in use before the contender was built, "
                              "measured in a fresh process", **common)


def test_contenders_compute_the_same_step():
    """saefast's ops, its SAE class (native loop and classic API) and the dense baseline are the
    same maths: after three steps from the same weights their parameters agree (fp32, toy size,
    any device). The dict API follows the reference code (its aux residual is not detached), so
    it is checked to train, not to match."""
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
    if not sae_steps.saefast_sae_available():
        return
    for impl in ("saefast-sae", "saefast-classic"):
        step = sae_steps.make_step(impl, p)
        for _ in range(3):
            step.run()
        torch.testing.assert_close(step.module.W_enc.detach(), params["saefast"][0], rtol=1e-4, atol=1e-6,
                                   msg=f"W_enc differs between {impl} and saefast")
        torch.testing.assert_close(step.module.W_dec.detach(), params["saefast"][1], rtol=1e-4, atol=1e-6,
                                   msg=f"W_dec differs between {impl} and saefast")
    step = sae_steps.make_step("saefast-dict", p)
    before = step.module.W_enc.detach().clone()
    for _ in range(3):
        step.run()
    assert torch.isfinite(step.module.W_enc).all() and not torch.equal(before, step.module.W_enc.detach())
