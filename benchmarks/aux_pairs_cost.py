"""What the aux-K pairs cost the two sparse-gradient CPU kernels (``decode_backward``: value
gradients and grad W_dec; ``encode_backward_weight``: grad W_enc and the per-latent sums), and how
much of it is where the gradient rows live in the cache.

    python benchmarks/aux_pairs_cost.py [--rounds 15] [--rows-in-cache 256]

Shapes default to the CPU benchmark profile (d_in 512, d_sae 65536, batch 1024, k 32, k_aux 512
among a quarter of the latents, fp32). Three sets of pairs, timed interleaved round by round:
``main`` (k random latents per row), ``main+aux`` (and k_aux dead latents per row: in rows of
their own for the decode, as the stacked decode has them, on the same input rows for the encoder), and ``main+aux, aux rows in cache`` (the same number of
aux pairs, but their rows folded onto ``--rows-in-cache`` rows, whose gradient rows fit in L2: the
most that ordering the walk for cache reuse could save). Prints the median (min) wall-clock and
CPU time per call, in milliseconds, and the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable, Dict, Tuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning threads would count as CPU time

import torch  # noqa: E402

from saefast import cpu_kernels  # noqa: E402

import sae_steps  # noqa: E402

Pairs = Tuple[torch.Tensor, torch.Tensor]  # (latents int32, rows int32), sorted by (row, latent)


def _per_row(n_rows: int, pool: torch.Tensor, per_row: int, row0: int, gen: torch.Generator) -> Pairs:
    """per_row distinct latents of pool for each row, rows row0..row0 + n_rows - 1."""
    scores = torch.rand(n_rows, pool.numel(), generator=gen)
    lat = pool[scores.topk(per_row, dim=1).indices].sort(dim=1).values
    rows = torch.arange(row0, row0 + n_rows).repeat_interleave(per_row)
    return lat.flatten().int(), rows.int()


def _sorted(lat: torch.Tensor, rows: torch.Tensor, d_sae: int) -> Pairs:
    key = torch.unique(rows.long() * d_sae + lat.long())  # sorted; a folded row's repeats merge
    return (key % d_sae).int(), (key // d_sae).int()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    sae_steps.add_problem_args(ap)
    ap.add_argument("--rows-in-cache", type=int, default=256)
    args = ap.parse_args()
    kernels = cpu_kernels.kernels()
    if kernels is None:
        sys.exit("aux_pairs_cost.py: the CPU kernels did not build (see the warning above); "
                 "they need a C++ compiler and ninja")
    B, d_in, d_sae = args.batch, args.d_in, args.d_sae
    gen = torch.Generator().manual_seed(0)
    dead = torch.randperm(d_sae, generator=gen)[:max(1, int(d_sae * args.dead_fraction))].sort().values
    main_lat, main_rows = _per_row(B, torch.arange(d_sae), args.k, 0, gen)
    aux_lat, aux_rows = _per_row(B, dead, min(args.k_aux, dead.numel()), B, gen)
    folded = B + (aux_rows - B) % args.rows_in_cache
    sets: Dict[str, Pairs] = {
        "main": (main_lat, main_rows),
        "main+aux": (torch.cat([main_lat, aux_lat]), torch.cat([main_rows, aux_rows])),
        "main+aux, aux rows in cache": _sorted(torch.cat([main_lat, aux_lat]), torch.cat([main_rows, folded.int()]),
                                               d_sae),
    }
    grad_out = torch.randn(2 * B, d_in, generator=gen)  # main rows, then the aux codes' rows
    xc = torch.randn(B, d_in, generator=gen)  # the encoder's input: main and aux pairs share its rows
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    grad_W_dec = torch.empty_like(W_dec)
    grad_W_enc = torch.empty(d_in, d_sae)
    calls: Dict[str, Callable[[], object]] = {}
    for name, (lat, rows) in sets.items():
        values = torch.rand(lat.numel(), generator=gen)
        g_values = torch.randn(lat.numel(), generator=gen)
        x_rows = (rows % B).int()  # an aux code's row of the stacked decode is row - B of the input
        calls[f"decode_backward {name}"] = (lambda v=values, i=lat, r=rows: kernels.decode_backward(
            grad_out, v, i, r, W_dec, True, grad_W_dec))
        calls[f"encode_backward_weight {name}"] = (lambda g=g_values, i=lat, r=x_rows: kernels.encode_backward_weight(
            g, xc, i, r, d_sae, grad_W_enc))
    names = list(calls)
    load_start = os.getloadavg()[0]
    wall_s, cpu_s = sae_steps.interleaved_rounds(calls, args.rounds)
    wall = {n: [1e3 * t for t in ts] for n, ts in wall_s.items()}
    cpu = {n: [1e3 * t for t in ts] for n, ts in cpu_s.items()}
    print(f"d_in {d_in}, d_sae {d_sae}, batch {B}, k {args.k}, k_aux {args.k_aux} among {dead.numel()} dead; "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds; ms per call, median (min)")
    for name in names:
        pairs = sets[name.split(" ", 1)[1]][0].numel()
        print(f"{name:52s} {pairs:7d} pairs  wall {statistics.median(wall[name]):6.1f} ({min(wall[name]):.1f})"
              f"  cpu {statistics.median(cpu[name]):6.1f} ({min(cpu[name]):.1f})")
    print(f"\nload average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
