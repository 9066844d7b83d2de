"""Peak memory of one contender's whole training step, measured in a fresh process.

    python benchmarks/step_peak.py --impl saefast --device cpu --d-in 512 --d-sae 65536 \
        --batch 1024 --k 32 --k-aux 512 --dead-fraction 0.25

Prints one JSON line: ``{"impl", "peak_bytes", "base_bytes"}``. The process warms up at a toy
size (thread pools, allocator), notes what is in use, builds the contender, runs one step (the
optimizer allocates its state), resets the peak and runs one more step: ``peak_bytes`` is the peak
of that step beyond what was in use before the contender was built (weights, gradients, optimizer
state, temporaries). CUDA: the allocator's peak; CPU: the peak resident set (Linux,
``/proc/self/clear_refs``). A process of its own per contender, so that no other contender's
freed heap or cached blocks hide part of the peak, and the order of measurement does not matter.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sae_steps  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _in_use(cuda: bool) -> int:
    return torch.cuda.memory_allocated() if cuda else _status_kib("VmRSS") * 1024


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def _peak(cuda: bool) -> int:
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def measure(impl: str, p: sae_steps.Problem) -> dict:
    cuda = p.device.startswith("cuda")
    toy = sae_steps.Problem(d_in=p.d_in, d_sae=1024, batch=min(p.batch, 256), k=min(p.k, 8), k_aux=8,
                            dead_fraction=p.dead_fraction, dtype=p.dtype, device=p.device)
    sae_steps.make_step(impl, toy).run()
    gc.collect()
    base = _in_use(cuda)
    step = sae_steps.make_step(impl, p)
    step.run()
    gc.collect()
    _reset_peak(cuda)
    step.run()
    return {"impl": impl, "peak_bytes": _peak(cuda) - base, "base_bytes": base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", required=True, choices=sorted(sae_steps.BUILDERS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-in", type=int, required=True)
    ap.add_argument("--d-sae", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--k-aux", type=int, default=512)
    ap.add_argument("--dead-fraction", type=float, default=0.05)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    p = sae_steps.Problem(d_in=args.d_in, d_sae=args.d_sae, batch=args.batch, k=args.k, k_aux=args.k_aux,
                          dead_fraction=args.dead_fraction, dtype=getattr(torch, args.dtype), device=args.device)
    print(json.dumps(measure(args.impl, p)), flush=True)


if __name__ == "__main__":
    main()
