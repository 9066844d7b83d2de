"""What aux-K adds to a whole training step: one contender with no dead latents against the same
contender with a fraction of its latents dead, interleaved round by round in one process, with
the floor (encoder GEMM + one Adam pass) timed in the same rounds.

    python benchmarks/aux_cost.py [--impl saefast-sae] [--dead-fraction 0.25] [--rounds 9]

Shapes default to the CPU benchmark profile (d_in 512, d_sae 65536, batch 1024, k 32, k_aux 512,
fp32). Each round runs every timed call once, starting one further along the list each time.
Prints, per contender, the median (min-max) step time and multiple of the floor, and the ratio
dead / no dead per round, in wall-clock time and in the process's CPU time (which other work on a
shared machine inflates less), with the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the benchmarks' conftest does

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sae_steps  # noqa: E402


def _spread(values: List[float]) -> Tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", action="append", choices=sorted(sae_steps.BUILDERS),
                    help="contender (repeat for several; default saefast-sae)")
    ap.add_argument("--rounds", type=int, default=9)
    sae_steps.add_problem_args(ap)
    args = ap.parse_args()
    impls = args.impl or ["saefast-sae"]

    calls: Dict[str, Callable[[], object]] = {}
    for impl in impls:
        for dead in (0.0, args.dead_fraction):
            calls[f"{impl} {dead:.0%} dead"] = sae_steps.make_step(impl, sae_steps.problem_from_args(args, dead)).run
    none = sae_steps.problem_from_args(args, 0.0)
    calls["floor-gemm"] = sae_steps.encoder_gemm(none, sae_steps.make_inputs(none))
    calls["floor-adam"] = sae_steps.adam_pass(none, sae_steps.make_inputs(none))
    names = list(calls)
    load_start = os.getloadavg()[0]
    wall, cpu = sae_steps.interleaved_rounds(calls, args.rounds, warmup=2)
    print(f"d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}, k {args.k}, k_aux {args.k_aux}; "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds; median (min-max)")
    for clock, times in (("wall", wall), ("cpu", cpu)):
        floor = [a + b for a, b in zip(times["floor-gemm"], times["floor-adam"])]
        print(f"\n{clock} time | step (ms) | x floor")
        for name in names:
            med, lo, hi = _spread([1e3 * t for t in times[name]])
            multiple = "" if name.startswith("floor") else \
                "%.2f (%.2f-%.2f)" % _spread([t / f for t, f in zip(times[name], floor)])
            print(f"{name:32s} {med:7.1f} ({lo:.1f}-{hi:.1f}) {multiple}")
        for impl in impls:
            ratio = [d / z for z, d in zip(times[f"{impl} 0% dead"], times[f"{impl} {args.dead_fraction:.0%} dead"])]
            med, lo, hi = _spread(ratio)
            print(f"{impl}: {args.dead_fraction:.0%} dead / no dead, per round: {med:.3f} ({lo:.3f}-{hi:.3f})")
    print(f"\nload average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
