"""Largest d_sae whose whole training step runs, for one contender.

    python benchmarks/memory_probe.py --impl saefast --device cpu --d-in 512 --batch 1024 \
        --k 32 --budget-bytes 2147483648

Doubles d_sae from ``--start`` until a step fails for lack of memory, then bisects to within
1/32. Each trial runs in a fresh process (this script with ``--trial D``): what one trial leaves
behind (a grown malloc heap, a raised mmap threshold, a fragmented CUDA cache) must not shrink
the next one's room, or the answer would depend on the order of the search. A trial warms up at
a toy size, takes its budget, builds the contender at D and runs two steps. On CUDA the budget
is the device's free memory after the warm-up; on a CPU the process's address space is capped
at its size after the warm-up plus ``--budget-bytes`` (RLIMIT_AS), so allocation fails cleanly
instead of waking the OOM killer. Prints one JSON line per trial, flushed, then a summary line,
so a parent that loses the search midway still knows the largest size that ran.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import subprocess
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


def _take_budget(args) -> int:
    """Warm up at a toy size (thread pools, BLAS buffers, CUDA context and kernels), then fix
    the budget: free device memory on CUDA, else cap the address space."""
    sae_steps.make_step(args.impl, sae_steps.Problem(d_in=args.d_in, d_sae=1024, batch=min(args.batch, 256),
                                                     k=min(args.k, 8), k_aux=8, device=args.device)).run()
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(torch.device(args.device))[0]
    limit = _vm_size_bytes() + args.budget_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return args.budget_bytes


def _run_trial(args) -> None:
    """Child process: one trial at ``args.trial``; prints {"d_sae", "ok", "budget_bytes", ...}."""
    d_sae = args.trial
    budget = _take_budget(args)
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
    _emit(d_sae=d_sae, ok=ok, seconds=round(time.perf_counter() - t0, 3), budget_bytes=budget, error=error)


def _trial(args, d_sae: int) -> dict:
    """Parent: run one trial in a fresh process and pass its line on."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trial", str(d_sae)] + [
        arg for name, value in vars(args).items() if name != "trial" and value is not None
        for arg in (f"--{name.replace('_', '-')}", str(value))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    fatal = next((line for line in lines if line.get("fatal")), None)
    result = next((line for line in lines if "ok" in line), None)
    if fatal or result is None:
        # No verdict: a crash that is not lack of memory (a bug, not a figure), or a process
        # killed from outside (the OOM killer, on a device whose budget is not capped).
        error = fatal["error"] if fatal else f"trial process exited {proc.returncode}: {proc.stderr[-300:]}"
        _emit(d_sae=d_sae, error=error, fatal=True)
        raise SystemExit(1)
    _emit(**result)
    return result


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
    ap.add_argument("--trial", type=int, default=None, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if not args.device.startswith("cuda") and args.budget_bytes is None:
        ap.error("--budget-bytes is required on a CPU")
    if args.trial is not None:
        _run_trial(args)
        return

    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    head = {}

    def trial(d_sae: int) -> bool:
        result = _trial(args, d_sae)
        if not head:  # the first trial tells the budget (the parent never touches the device)
            head.update(budget_bytes=result["budget_bytes"],
                        bound_d_sae=result["budget_bytes"] // (4 * elem * (2 * args.d_in)))  # weights + grads + 2 Adam moments
            _emit(**head)
        return result["ok"]

    good, bad, d_sae = 0, None, args.start
    while bad is None and d_sae <= args.max_d_sae:
        if trial(d_sae):
            good, d_sae = d_sae, d_sae * 2
        else:
            bad = d_sae
    while bad is not None and good == 0 and bad > 256:  # even the start failed: look below it
        ok = trial(bad // 2)
        good, bad = (bad // 2, bad) if ok else (0, bad // 2)
    while bad is not None and good and bad - good > max(256, good // 32):
        mid = (good + bad) // 2 // 256 * 256
        if trial(mid):
            good = mid
        else:
            bad = mid
    _emit(done=True, max_d_sae=good, first_failure=bad, **head)


if __name__ == "__main__":
    main()
