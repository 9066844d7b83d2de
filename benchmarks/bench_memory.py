"""Largest d_sae that trains: the whole BatchTopK step at the profile's d_in, k and batch,
searched upward until it runs out of memory, for saefast and for dense PyTorch, each in a fresh
process (benchmarks/memory_probe.py). On CUDA the budget is the GPU's free memory; on a CPU it
is an address-space cap of ``SIZES.memory_budget`` bytes, which stands in for a device's memory.

The figure is reported against the bound set by weights + gradients + Adam's two moments
(16 bytes per parameter in fp32, 2 * d_in parameters per latent). Peak memory per step at each
d_sae is recorded by bench_scaling.py (and the headline point by bench_train_step.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, IS_CUDA, SIZES, dtype_name

PROBE = Path(__file__).resolve().parent / "memory_probe.py"


def _search(impl: str, dtype: torch.dtype) -> dict:
    cmd = [sys.executable, str(PROBE), "--impl", impl, "--device", DEVICE, "--d-in", str(SIZES.d_in),
           "--batch", str(SIZES.batch), "--k", str(SIZES.k), "--k-aux", str(SIZES.k_aux),
           "--dtype", dtype_name(dtype), "--start", str(SIZES.search_start)]
    if not IS_CUDA:
        cmd += ["--budget-bytes", str(SIZES.memory_budget)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SIZES.search_timeout)
        stdout, returncode, timed_out = proc.stdout, proc.returncode, False
    except subprocess.TimeoutExpired as err:
        out = err.stdout or ""
        stdout, returncode, timed_out = out.decode() if isinstance(out, bytes) else out, None, True
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    head = next((line for line in lines if "bound_d_sae" in line and "done" not in line), {})
    trials = [line for line in lines if "ok" in line]
    passed = [t["d_sae"] for t in trials if t["ok"]]
    done = next((line for line in lines if line.get("done")), None)
    fatal = next((line for line in lines if line.get("fatal")), None)
    return {"fatal": fatal["error"] if fatal else None, "max_d_sae": max(passed) if passed else 0, "trials": trials, "bound_d_sae": head.get("bound_d_sae"),
            "budget_bytes": head.get("budget_bytes"), "complete": done is not None, "returncode": returncode,
            "timed_out": timed_out, "stderr_tail": "" if done else (proc.stderr[-500:] if not timed_out else "")}


@pytest.mark.parametrize("impl", ["dense", "saefast"])
def test_largest_d_sae(benchmark, record, impl):
    dtype = torch.float32
    found = {}
    benchmark.pedantic(lambda: found.update(_search(impl, dtype)), rounds=1, iterations=1, warmup_rounds=0)
    if found["fatal"]:  # a failure that is not lack of memory is a bug, not a figure
        pytest.fail(f"memory_probe.py --impl {impl} failed: {found['fatal']}")
    params = {"d_in": SIZES.d_in, "batch": SIZES.batch, "k": SIZES.k, "k_aux": SIZES.k_aux,
              "dtype": dtype_name(dtype), "device": DEVICE}
    bound = found["bound_d_sae"]
    fraction = found["max_d_sae"] / bound if bound else None
    notes = ("search stopped early (timeout or crash): a lower bound" if not found["complete"] else
             "largest d_sae whose step ran, searched to within 1/32, one fresh process per trial")
    record.figure(group="largest_d_sae", impl=impl, params=params, metric="max_d_sae",
                  value=found["max_d_sae"], unit="latents", notes=notes, bound_d_sae=bound,
                  fraction_of_bound=fraction, budget_bytes=found["budget_bytes"],
                  budget_kind="GPU free memory" if IS_CUDA else "address-space cap (RLIMIT_AS)",
                  trials=found["trials"], search_complete=found["complete"])
