"""Largest d_sae whose whole training step runs, for one contender, in a fresh process.

    python benchmarks/memory_probe.py --impl saefast --device cpu --d-in 512 --batch 1024 \
        --k 32 --budget-bytes 2147483648

Doubles d_sae from ``--start`` until a step fails for lack of memory, then bisects to within
1/16. Each trial builds the contender and runs two steps. On CUDA the budget is the device's
free memory; on a CPU the process's address space is capped at its current size plus
``--budget-bytes`` (RLIMIT_AS), so allocation fails cleanly instead of waking the OOM killer.
Prints one JSON line per trial, flushed, then a summary line, so a parent that loses the
process midway still knows the largest size that ran.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sae_steps  # noqa: E402


def _emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _vm_size_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or bool(
        re.search(r"out of memory|can't allocate memory|bad_alloc|Cannot allocate memory", str(err)))


def _trial(args, d_sae: int) -> tuple:
    p = sae_steps.Problem(d_in=args.d_in, d_sae=d_sae, batch=args.batch, k=args.k, k_aux=args.k_aux,
                          dtype=getattr(torch, args.dtype), device=args.device)
    t0 = time.perf_counter()
    try:
        step = sae_steps.make_step(args.impl, p)
        for _ in range(2):
            step.run()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        ok, error = True, ""
    except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not _is_out_of_memory(err):
            _emit(d_sae=d_sae, error=f"{type(err).__name__}: {str(err)[:500]}", fatal=True)
            raise
        ok, error = False, f"{type(err).__name__}: {str(err)[:200]}"
    step = None
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    _emit(d_sae=d_sae, ok=ok, seconds=round(time.perf_counter() - t0, 3), error=error)
    return ok, error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", required=True, choices=sorted(sae_steps.BUILDERS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-in", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--k-aux", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--budget-bytes", type=int, default=None, help="CPU only: memory the search may use")
    ap.add_argument("--start", type=int, default=4096)
    ap.add_argument("--max-d-sae", type=int, default=1 << 24)
    args = ap.parse_args()

    # Warm up at a toy size first: thread pools, BLAS buffers and (CUDA) kernels and context.
    sae_steps.make_step(args.impl, sae_steps.Problem(d_in=args.d_in, d_sae=1024, batch=min(args.batch, 256),
                                                     k=min(args.k, 8), k_aux=8, device=args.device)).run()
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        budget = torch.cuda.mem_get_info(torch.device(args.device))[0]
    else:
        if args.budget_bytes is None:
            ap.error("--budget-bytes is required on a CPU")
        budget = args.budget_bytes
        limit = _vm_size_bytes() + budget
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    bound = budget // (4 * elem * (2 * args.d_in))  # weights + grads + two Adam moments per latent
    _emit(budget_bytes=budget, bound_d_sae=bound)

    good, bad, d_sae = 0, None, args.start
    while bad is None and d_sae <= args.max_d_sae:
        ok, _ = _trial(args, d_sae)
        if ok:
            good, d_sae = d_sae, d_sae * 2
        else:
            bad = d_sae
    while bad is not None and good == 0 and bad > 256:  # even the start failed: look below it
        ok, _ = _trial(args, bad // 2)
        good, bad = (bad // 2, bad) if ok else (0, bad // 2)
    while bad is not None and good and bad - good > max(256, good // 16):
        mid = (good + bad) // 2 // 256 * 256
        ok, _ = _trial(args, mid)
        good, bad = (mid, bad) if ok else (good, mid)
    _emit(done=True, max_d_sae=good, first_failure=bad, budget_bytes=budget, bound_d_sae=bound)


if __name__ == "__main__":
    main()
