"""Where one contender's whole training step spends its time: the PyTorch profiler's self time
per op, per step, grouped into the step's parts.

    python benchmarks/profile_step.py [--impl saefast-sae] [--dead-fraction 0.25] [--steps 3]
    SAEFAST_CPU_KERNELS=0 python benchmarks/profile_step.py   # the pure-PyTorch path

Shapes default to the CPU benchmark profile (d_in 512, d_sae 65536, batch 1024, k 32, k_aux
512, fp32). The contender is warmed up twice (optimizer state, gradient buffers, kernel build),
then ``--steps`` steps are profiled; the table gives milliseconds per step. Figures on a shared
machine move with its load (printed at the end): read the shares, and compare paths in one run.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the benchmarks' conftest does

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sae_steps  # noqa: E402

# The step's parts: an op counts for the first part whose scope (an autograd node, the
# optimizer) encloses it, else by its own name; the rest is "other".
ENCODE_FORWARD = ("_EncodeWithAux", "_Encode", "_AuxEncode")
ENCODE_BACKWARD = ("_EncodeWithAuxBackward", "_EncodeBackward", "_AuxEncodeBackward")
GEMM = ("aten::mm", "aten::addmm")
BY_NAME = (
    ("decoder projection + renormalisation", ("saefast_cpu::decoder_norm_", "aten::linalg_vector_norm", "aten::bmm",
                                              "aten::addcmul_", "aten::div_", "aten::einsum")),
    ("gradient buffers: zeroing, copies, freeing", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::clone",
                                                    "torch::autograd::AccumulateGrad")),
)


def part_of(name: str, scopes) -> str:
    if any(n.startswith("Optimizer.step") for n in scopes):
        return "Adam"
    if any(n.startswith("Optimizer.zero_grad") for n in scopes):
        return "gradient buffers: zeroing, copies, freeing"
    if any(n in ENCODE_BACKWARD for n in scopes):
        return "encode backward (W_enc, b_dec)"
    if "_DecodeBackward" in scopes:
        return "decode backward (values, W_dec)"
    if any(n in ENCODE_FORWARD for n in scopes):
        return "encode GEMM" if name in GEMM else "encode selection (main + aux-K)"
    if "_Decode" in scopes:
        return "decode forward"
    for part, names in BY_NAME:
        if any(name.startswith(n) for n in names):
            return part
    return "other (losses, glue, autograd)"


def _scopes(event) -> list:
    names, e = [], event
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", default="saefast-sae", choices=sorted(sae_steps.BUILDERS))
    ap.add_argument("--steps", type=int, default=3)
    sae_steps.add_problem_args(ap)
    ap.add_argument("--ops", action="store_true", help="also list the ops above 1 %% of the step")
    args = ap.parse_args()
    p = sae_steps.problem_from_args(args)
    step = sae_steps.make_step(args.impl, p)
    for _ in range(2):
        step.run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step.run()
    events = prof.events()
    total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
    parts = defaultdict(float)
    by_op = defaultdict(float)
    for e in events:
        part = part_of(e.name, _scopes(e))
        parts[part] += e.self_cpu_time_total / args.steps / 1e3
        by_op[(e.name, part)] += e.self_cpu_time_total / args.steps / 1e3
    from saefast import cpu_kernels
    print(f"{args.impl}, {p.dead_fraction:.0%} dead, d_in {p.d_in}, d_sae {p.d_sae}, batch {p.batch}, k {p.k}, "
          f"k_aux {p.k_aux}; CPU kernels {'on' if cpu_kernels.available() else 'off'}; "
          f"{torch.get_num_threads()} threads; ms per step (profiler self time)")
    print("| part | ms | share |\n|---|---|---|")
    for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {ms:.1f} | {100 * ms / total:.0f} % |")
    print(f"| total | {total:.1f} | |")
    if args.ops:
        print("\nops above 1 % (ms per step):")
        for (name, part), ms in sorted(by_op.items(), key=lambda kv: -kv[1]):
            if ms >= 0.01 * total:
                print(f"  {name:45s} {ms:8.1f}  ({part})")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
