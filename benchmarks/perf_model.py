"""Analytic model of one BatchTopK training step on a GPU: FLOPs and bytes of every phase, and the
time each takes at a device's ceilings. Every figure it prints is a PREDICTION, not a measurement.

    python benchmarks/perf_model.py                          # headline shape, H200 and H100
    python benchmarks/perf_model.py --d-sae 1048576 --json out.json

The step is the one ``bench_train_step.py`` times: encode with BatchTopK (k per token on average),
aux-K among ``dead_fraction`` dead latents (k_aux per token), decode of both, MSE + aux MSE,
backward, decoder-gradient projection, Adam, decoder renormalisation. Three contenders:

* ``saefast``: the phases of the Triton path as written (``saefast/triton_backend.py`` and the
  kernels), including its sorts, dtype casts and extra passes over weight-sized tensors;
* ``dense``: plain PyTorch with the SAELens maths (dense pre-activations, topk, scatter, dense
  decode and its dense backward);
* ``sparsify``: dense encoder with a per-row topk and its dense backward, sparse Triton decode.

Each phase costs max(FLOPs / matrix or FMA rate, bytes / memory rate). Bytes that come from L2
(data reused by many programs while it fits in L2) are charged at ``l2_bytes_per_s``, an
assumption (no L2 figure was measured); everything else at the measured device-copy rate.
Host work is charged as ``launch_s`` per kernel launch and ``sync_s`` per host synchronisation,
also assumptions. Precision modes: ``fp32`` (fp32 weights, "highest" matmul precision: FMA units),
``bf16-autocast`` (fp32 master weights, bf16 compute under torch.autocast) and ``bf16`` (bf16
weights and Adam state, what the benchmark's bf16 rows run).

The floor is the encoder GEMM at the mode's matrix rate plus one fused Adam pass over the weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from readme_blocks import fill_block

GB = 1e9
GiB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    bf16_flops: float  # dense bf16/fp16 tensor-core rate
    tf32_flops: float
    fp32_flops: float  # FMA units, no tensor cores
    hbm_bytes_per_s: float
    l2_bytes_per_s: float
    l2_bytes: float
    memory_bytes: float
    launch_s: float = 4e-6
    sync_s: float = 15e-6
    source: str = ""


DEVICES = {
    "H200": Device("H200 (measured ceilings)", bf16_flops=790e12, tf32_flops=395e12, fp32_flops=67e12,
                   hbm_bytes_per_s=4.3e12, l2_bytes_per_s=8.0e12, l2_bytes=50e6, memory_bytes=141e9,
                   source="bf16 matrix product 790 TFLOP/s and device copy 4.3 TB/s measured on an H200; fp32 "
                          "67 TFLOP/s datasheet; tf32 taken as half the measured bf16 rate (datasheet ratio); L2 "
                          "8 TB/s, launch 4 us and sync 15 us assumed"),
    "H100": Device("H100 SXM (datasheet)", bf16_flops=989e12, tf32_flops=494e12, fp32_flops=67e12,
                   hbm_bytes_per_s=3.35e12, l2_bytes_per_s=8.0e12, l2_bytes=50e6, memory_bytes=80e9,
                   source="datasheet dense rates and HBM3 bandwidth; L2 8 TB/s, launch 4 us and sync 15 us assumed"),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    d_in: int = 2304
    d_sae: int = 1 << 17
    batch: int = 4096
    k: int = 64
    k_aux: int = 512
    dead_fraction: float = 0.05
    mode: str = "bf16-autocast"  # fp32 | bf16-autocast | bf16

    @property
    def n_dead(self) -> int:
        return max(1, int(self.d_sae * self.dead_fraction))

    @property
    def weights(self) -> int:
        return self.d_in * self.d_sae  # elements of one of W_enc, W_dec

    @property
    def compute_bytes(self) -> int:  # element size the products run in
        return 4 if self.mode == "fp32" else 2

    @property
    def master_bytes(self) -> int:  # element size of parameters, gradients and Adam state
        return 2 if self.mode == "bf16" else 4


@dataclasses.dataclass
class Phase:
    name: str
    flops: float = 0.0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    launches: int = 0
    syncs: int = 0
    unit: str = "mm"  # which rate the FLOPs run at: mm (the mode's matrix rate), fma, hmma
    note: str = ""

    def seconds(self, dev: Device, shape: Shape) -> float:
        rate = {"mm": _mm_rate(dev, shape), "fma": dev.fp32_flops,
                "hmma": dev.bf16_flops if shape.mode != "fp32" else dev.fp32_flops}[self.unit]
        busy = max(self.flops / rate if self.flops else 0.0, self.hbm_bytes / dev.hbm_bytes_per_s
                   + self.l2_bytes / dev.l2_bytes_per_s)
        return busy + self.launches * dev.launch_s + self.syncs * dev.sync_s


def _mm_rate(dev: Device, shape: Shape, precision: str = "highest") -> float:
    if shape.mode == "fp32":
        return dev.tf32_flops if precision == "high" else dev.fp32_flops
    return dev.bf16_flops


def sort_bytes(n: float, key_bytes: int) -> float:
    """A radix sort of n keys with int64 payloads: one histogram pass, then one read and one write
    of keys and payloads per 8-bit digit."""
    return (1 + 2 * key_bytes) * (key_bytes + 8) * n


def _gather_bytes(pairs: float, row_bytes: float, working_set: float, dev: Device,
                  hbm_bytes: float = 0.0, l2_bytes: float = 0.0) -> Dict[str, float]:
    """Per-pair row gathers added to the given traffic: from L2 when the rows gathered fit in it,
    else from memory."""
    total = pairs * row_bytes
    if working_set <= dev.l2_bytes:
        return {"hbm_bytes": hbm_bytes, "l2_bytes": l2_bytes + total}
    return {"hbm_bytes": hbm_bytes + total, "l2_bytes": l2_bytes}


# ----------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------

def floor(s: Shape, dev: Device) -> List[Phase]:
    gemm = 2.0 * s.batch * s.d_in * s.d_sae
    return [Phase("encoder GEMM", flops=gemm, hbm_bytes=s.weights * s.compute_bytes),
            Phase("Adam (fused), one pass", hbm_bytes=2 * s.weights * s.master_bytes * 7, launches=1)]


# The Triton backend's rule for aux-K as a dense block (saefast/triton_backend.py: AUX_DENSE_RATIO,
# DENSE_BLOCK_BYTES, aux_dense_pays); tests/test_perf_model.py checks these copies stay equal.
AUX_DENSE_RATIO = {"16bit": 100.0, "tf32": 100.0, "ieee": 24.0}
DENSE_BLOCK_BYTES = 1 << 28


def aux_dense(s: Shape) -> bool:
    """Whether the Triton backend computes this shape's aux-K as a dense block over the dead columns."""
    k_eff = min(s.k_aux, s.n_dead)
    if s.batch * s.n_dead * 4 > DENSE_BLOCK_BYTES:
        return False
    return s.n_dead <= AUX_DENSE_RATIO["ieee" if s.mode == "fp32" else "16bit"] * k_eff


def saefast(s: Shape, dev: Device) -> List[Phase]:
    """The step as the Triton backend runs it (``saefast/triton_backend.py``, ``saefast.optim.SAEAdam``):

    * BatchTopK's threshold is carried from the previous step's (no sample GEMM, no host sync);
    * under autocast the ops hand the fp32 master weights to the backend, which makes one bf16 copy
      of each per forward, reuses it in the backward and writes the weight gradients in fp32
      directly (no cast of the gradients);
    * aux-K, where :func:`aux_dense` holds, is a dense block: the encode kernel writes the dead
      columns' pre-activations, torch.topk picks each row's k_aux, and the aux decode, its backward
      and the aux share of the encoder backward are cuBLAS products over the dead columns; the
      sparse kernels see the main pairs only and the main and aux value gradients need no merge;
    * the decoder backward's segment_outer also forms the value gradients (each W_dec row read once);
    * the b_dec gradient is one Triton matvec over the bf16 copy of W_enc;
    * SAEAdam: torch's fused Adam for W_enc and the biases, one Triton pass for the decoder's
      projection + Adam + renormalisation.
    """
    B, d, D, e, w = s.batch, s.d_in, s.d_sae, s.compute_bytes, s.master_bytes
    N, nd = s.weights, s.n_dead
    nm, na = B * s.k, B * min(s.k_aux, nd)
    gw = 4 if s.mode != "bf16" else 2  # weight gradients: fp32 for fp32 masters, else the weights' dtype
    sample = 64
    cand_main, cand_aux = 2 * nm, 2 * na  # CANDIDATE_MARGIN
    row = d * e
    autocast = s.mode == "bf16-autocast"
    dense_aux = aux_dense(s)
    Bn = B * nd  # elements of the dense aux block
    ph: List[Phase] = []
    if autocast:
        ph.append(Phase("autocast: bf16 copies of W_enc, W_dec (forward; reused by the backward)",
                        hbm_bytes=2 * N * (4 + 2), launches=2))
    ph.append(Phase("xc = x - b_dec", hbm_bytes=3 * B * d * e, launches=1))
    ph.append(Phase("encode: threshold carried from the previous step", launches=8,
                    note="a few scalar ops on the device; the first step samples 64 rows instead"))
    ph.append(Phase("encode: fused GEMM + candidates (Triton)" + (" + dead columns' block" if dense_aux else ""),
                    flops=2.0 * B * d * D, hbm_bytes=N * e + cand_main * (e + 8) + (Bn * e if dense_aux else 0),
                    l2_bytes=(D / 128) * B * row, launches=4, syncs=1,
                    note="assumes the fused kernel reaches the matrix rate of torch.mm"))
    ph.append(Phase("encode: exact selection among candidates (sorts)",
                    hbm_bytes=sort_bytes(cand_main, 8) + sort_bytes(cand_main, 4) + sort_bytes(nm, 8),
                    launches=25, syncs=1))
    dead_set = nd * row
    if dense_aux:
        ph.append(Phase("aux: per-row top-k_aux of the [B, n_dead] block (torch.topk, tie check, nonzero)",
                        hbm_bytes=Bn * (5 * e + 3), launches=15, syncs=2))
    else:
        ph.append(Phase("aux: copy dead columns of W_enc", hbm_bytes=d * nd * (32 + e), launches=2, syncs=1,
                        note="index_select of scattered columns: one 32-byte sector per element read"))
        ph.append(Phase("aux: sample + fused GEMM over dead columns", flops=2.0 * (B + sample) * d * nd,
                        hbm_bytes=2 * d * nd * e + cand_aux * (e + 8), launches=12, syncs=3))
        ph.append(Phase("aux: per-row selection (sorts)", hbm_bytes=2 * sort_bytes(cand_aux, 8)
                        + sort_bytes(cand_aux, 4) + sort_bytes(na, 8), launches=30, syncs=1))
    ph.append(Phase("decode: gather W_dec rows (main)", hbm_bytes=nm * row + B * d * e, launches=3))
    if dense_aux:
        ph.append(Phase("aux decode: dense block @ W_dec[dead] (cuBLAS)", flops=2.0 * B * nd * d,
                        hbm_bytes=2 * Bn * e + 3 * nd * row + B * d * (4 * 3 + e), launches=8,
                        note="the block laid out densely, the dead rows copied, fp32 output, bias, cast"))
    else:
        ph.append(Phase("decode: gather W_dec rows (aux)", **_gather_bytes(na, row, dead_set, dev), launches=1,
                        note="k_aux rows per token among the dead latents"))
    ph.append(Phase("losses, residual, their backward", hbm_bytes=14 * 2 * B * d * 4, launches=25))
    pairs = nm if dense_aux else nm + na
    ph.append(Phase("sort pairs by latent (decode bwd, encode bwd)", hbm_bytes=2 * sort_bytes(pairs, 4),
                    launches=16))
    if dense_aux:
        ph.append(Phase("aux decode bwd: G @ W_dec[dead].T at the entries, block.T @ G (cuBLAS)",
                        flops=2 * 2.0 * B * nd * d, hbm_bytes=3 * Bn * e + 2 * nd * row + 3 * nd * d * 4,
                        launches=10))
    n_blocks = math.ceil(d / 64)
    ph.append(Phase("decode bwd: grad W_dec and grad values (segment_outer)", flops=2.0 * pairs * 16 * d, unit="hmma",
                    hbm_bytes=N * e + N * gw + 2 * n_blocks * pairs * 4 + (nd * d * 4 if dense_aux else 0),
                    l2_bytes=pairs * row, launches=4,
                    note="writes every element; reads each W_dec row once for the value gradients"))
    if dense_aux:
        ph.append(Phase("aux encode bwd: block.T @ xc (cuBLAS) + latent sums", flops=2.0 * B * nd * d,
                        hbm_bytes=Bn * (2 * e + 4) + 3 * nd * d * 4, launches=8))
    else:
        ph.append(Phase("encode bwd: merge main and aux value grads (unique)", hbm_bytes=sort_bytes(pairs, 8),
                        launches=12, syncs=1))
    ph.append(Phase("encode bwd: grad W_enc (segment_outer)", flops=2.0 * pairs * 16 * d, unit="hmma",
                    hbm_bytes=N * gw + (nd * d * 4 if dense_aux else 0), l2_bytes=pairs * row, launches=1))
    ph.append(Phase("encode bwd: b_dec grad (-W_enc @ latent sums, Triton matvec)", hbm_bytes=N * e, launches=2))
    ph.append(Phase("Adam (torch fused) for W_enc and biases", hbm_bytes=N * w * 7, launches=1))
    ph.append(Phase("SAEAdam decoder pass: projection + Adam + renormalisation", hbm_bytes=N * w * 7, launches=1))
    return ph


def dense(s: Shape, dev: Device) -> List[Phase]:
    B, d, D, e, w = s.batch, s.d_in, s.d_sae, s.compute_bytes, s.master_bytes
    N, nd = s.weights, s.n_dead
    BD = B * D
    gemm = 2.0 * B * d * D
    autocast = s.mode == "bf16-autocast"
    ph: List[Phase] = []
    if autocast:
        ph.append(Phase("autocast: W_enc, W_dec to bf16", hbm_bytes=2 * N * (4 + 2), launches=4))
    ph += [
        Phase("encoder GEMM (dense pre-activations)", flops=gemm, hbm_bytes=N * e + BD * e, launches=2),
        Phase("ReLU, flat topk over B x d_sae, scatter", hbm_bytes=BD * e * 9, launches=12, syncs=1),
        Phase("decode GEMM (dense acts @ W_dec)", flops=gemm, hbm_bytes=N * e + BD * e, launches=2),
        Phase("aux: dead columns, topk, dense decode", flops=2.0 * B * nd * d * 3, hbm_bytes=B * nd * e * 8,
              launches=20, syncs=2),
        Phase("losses, residual, their backward", hbm_bytes=14 * 2 * B * d * 4, launches=25),
        Phase("decode bwd: grad acts and grad W_dec (2 GEMMs)", flops=2 * gemm, hbm_bytes=2 * N * e + 2 * BD * e,
              launches=4),
        Phase("topk/ReLU bwd (dense masks)", hbm_bytes=BD * e * 4, launches=6),
        Phase("encode bwd: grad W_enc and grad xc (2 GEMMs)", flops=2 * gemm, hbm_bytes=2 * N * e + 2 * BD * e,
              launches=4),
    ]
    if autocast:
        ph.append(Phase("autocast bwd: bf16 weight grads to fp32", hbm_bytes=2 * N * (2 + 4), launches=2))
    ph += [Phase("decoder-gradient projection (3 ops)", hbm_bytes=6 * N * w, launches=4),
           Phase("Adam (fused)", hbm_bytes=2 * N * w * 7, launches=1),
           Phase("decoder renormalisation (2 ops)", hbm_bytes=3 * N * w, launches=2)]
    return ph


def sparsify(s: Shape, dev: Device) -> List[Phase]:
    """sparsify's SparseCoder step: dense encoder GEMM, per-row topk over [B, d_sae], sparse Triton
    decode; the encoder's backward is dense (its topk backward scatters into [B, d_sae]); aux-K with
    k_aux = d_in / 2 among dead latents, from the dense pre-activations."""
    B, d, D, e, w = s.batch, s.d_in, s.d_sae, s.compute_bytes, s.master_bytes
    N, nd = s.weights, s.n_dead
    BD = B * D
    gemm = 2.0 * B * d * D
    k_aux = min(d // 2, nd)
    nnz = B * (s.k + k_aux)
    row = d * e
    ph = [
        Phase("encoder GEMM (dense pre-activations)", flops=gemm, hbm_bytes=N * e + BD * e, launches=3),
        Phase("ReLU, per-row topk, aux masks over B x d_sae", hbm_bytes=BD * e * 6, launches=15, syncs=1),
        Phase("decode (Triton gather of W_dec rows)",
              **_gather_bytes(B * k_aux, row, nd * row, dev, hbm_bytes=B * s.k * row), launches=4),
        Phase("losses (FVU), their backward", hbm_bytes=12 * 2 * B * d * 4, launches=25),
        Phase("decode bwd: grad values and grad W_dec (Triton)", hbm_bytes=N * e, l2_bytes=3 * nnz * row, launches=6),
        Phase("topk bwd: scatter into dense [B, d_sae]", hbm_bytes=BD * e * 3, launches=4),
        Phase("encode bwd: grad W_enc and grad x (2 GEMMs)", flops=2 * gemm, hbm_bytes=2 * N * e + 2 * BD * e,
              launches=4),
        Phase("autocast bwd and master-weight casts", hbm_bytes=(4 * N * (4 + 2)) if s.mode != "fp32" else 0,
              launches=6),
        Phase("decoder-gradient projection", hbm_bytes=4 * N * w, launches=3),
        Phase("Adam (fused)", hbm_bytes=2 * N * w * 7, launches=1),
        Phase("decoder renormalisation", hbm_bytes=3 * N * w, launches=2),
    ]
    return ph


CONTENDERS = {"saefast": saefast, "dense": dense, "sparsify": sparsify}

# Changes to saefast the model can price before they are built (each replaces the named phases).
WHAT_IF = {
    "encode kernel reads fp32 W_enc itself (no W_enc copy under autocast)": (
        ("autocast: bf16 copies of W_enc, W_dec (forward; reused by the backward)",),
        lambda s, dev: [Phase("autocast: bf16 copy of W_dec", hbm_bytes=s.weights * (4 + 2), launches=1)],
        "the GEMM reads fp32 tiles (twice the bytes, still under its FLOP time)"),
    "one sort of the main pairs by latent for both backwards": (
        ("sort pairs by latent (decode bwd, encode bwd)",),
        lambda s, dev: [Phase("sort main pairs by latent (once)", hbm_bytes=sort_bytes(s.batch * s.k, 4),
                              launches=8)], ""),
}


def _apply_what_if(phases: List[Phase], s: Shape, dev: Device, name: str) -> List[Phase]:
    drop, extra, _ = WHAT_IF[name]
    if not any(p.name in drop for p in phases):
        return phases  # this mode or shape has no such phase
    return [p for p in phases if p.name not in drop] + extra(s, dev)


# ----------------------------------------------------------------------------------------------
# Memory: the largest d_sae that fits
# ----------------------------------------------------------------------------------------------

def bytes_per_latent(s: Shape, contender: str) -> float:
    """Device bytes that grow with d_sae, per latent, at the step's peak."""
    d, e, w, B = s.d_in, s.compute_bytes, s.master_bytes, s.batch
    state = 2 * d * w * 4  # W_enc, W_dec: weights, gradients, two Adam moments
    copies = 2 * d * 2 * 2 if s.mode == "bf16-autocast" else 0  # bf16 copies and their bf16 grads
    if contender == "saefast":
        # bf16 copies only (the gradients are written in fp32 directly); the first step's threshold
        # sample [64, d_sae] fp32 and its topk
        return state + copies / 2 + 64 * 4 * 2
    if contender == "dense":
        return state + copies + B * e * 5  # pre, acts, their grads, masks/topk scratch
    return state + copies + B * e * 4


def largest_d_sae(s: Shape, contender: str, memory_bytes: float, reserve: float = 2 * GiB) -> int:
    fixed = s.batch * s.d_in * 4 * 12 + reserve  # activations, losses, CUDA context and allocator slack
    return int((memory_bytes - fixed) // bytes_per_latent(s, contender)) // 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def predict(s: Shape, dev: Device) -> dict:
    out = {"shape": dataclasses.asdict(s), "device": dataclasses.asdict(dev), "contenders": {}}
    fl = floor(s, dev)
    floor_s = sum(p.seconds(dev, s) for p in fl)
    out["floor"] = {"seconds": floor_s, "phases": [_row(p, dev, s) for p in fl]}
    for name, fn in CONTENDERS.items():
        phases = fn(s, dev)
        total = sum(p.seconds(dev, s) for p in phases)
        out["contenders"][name] = {"seconds": total, "ratio_to_floor": total / floor_s,
                                   "tokens_per_s": s.batch / total, "phases": [_row(p, dev, s) for p in phases]}
    base = saefast(s, dev)
    cumulative = base
    whatifs = []
    for name in WHAT_IF:
        alone = sum(p.seconds(dev, s) for p in _apply_what_if(base, s, dev, name))
        cumulative = _apply_what_if(cumulative, s, dev, name)
        whatifs.append({"change": name, "seconds_alone": alone, "ratio_alone": alone / floor_s,
                        "seconds_with_all_above": sum(p.seconds(dev, s) for p in cumulative)})
    out["saefast_what_if"] = whatifs
    out["largest_d_sae"] = {c: largest_d_sae(s, c, dev.memory_bytes) for c in CONTENDERS}
    return out


def _row(p: Phase, dev: Device, s: Shape) -> dict:
    return {"phase": p.name, "seconds": p.seconds(dev, s), "gflop": p.flops / 1e9, "hbm_gb": p.hbm_bytes / GB,
            "l2_gb": p.l2_bytes / GB, "launches": p.launches, "syncs": p.syncs, "note": p.note}


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def text(pred: dict, phases: bool = True) -> str:
    s, dev = pred["shape"], pred["device"]
    lines = [f"PREDICTION (analytic model, not a measurement): {dev['name']}, d_in {s['d_in']}, d_sae {s['d_sae']}, "
             f"batch {s['batch']}, k {s['k']}, k_aux {s['k_aux']}, {s['mode']}",
             f"  floor (encoder GEMM + one Adam pass): {fmt_ms(pred['floor']['seconds'])}"]
    for name, c in pred["contenders"].items():
        lines.append(f"  {name:9s} step {fmt_ms(c['seconds']):>10s}  = {c['ratio_to_floor']:.2f}x floor, "
                     f"{c['tokens_per_s'] / 1e3:,.0f}k tokens/s")
    if phases:
        lines.append("  saefast phases (ms; GFLOP, GB from memory, GB from L2):")
        for r in pred["contenders"]["saefast"]["phases"]:
            lines.append(f"    {r['seconds'] * 1e3:7.3f}  {r['phase']}  ({r['gflop']:.0f}, {r['hbm_gb']:.2f}, "
                         f"{r['l2_gb']:.2f})")
    lines.append("  saefast if (cumulative):")
    for wi in pred["saefast_what_if"]:
        lines.append(f"    {fmt_ms(wi['seconds_with_all_above']):>10s} = "
                     f"{wi['seconds_with_all_above'] / pred['floor']['seconds']:.2f}x floor  + {wi['change']}")
    lines.append("  largest d_sae in memory: " + ", ".join(f"{c} {n:,}" for c, n in pred["largest_d_sae"].items()))
    return "\n".join(lines)


def headline(d_sae_values: Sequence[int] = (1 << 17, 1 << 20),
             modes: Sequence[str] = ("fp32", "bf16-autocast", "bf16")) -> List[dict]:
    return [predict(Shape(d_sae=D, mode=m), dev) for dev in DEVICES.values() for D in d_sae_values for m in modes]


def markdown(preds: List[dict]) -> str:
    lines = ["| device | d_sae | mode | floor | saefast | × floor | dense | sparsify | largest d_sae (saefast / dense) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in preds:
        c = p["contenders"]
        lines.append(f"| {p['device']['name']} | {p['shape']['d_sae']:,} | {p['shape']['mode']} | "
                     f"{fmt_ms(p['floor']['seconds'])} | {fmt_ms(c['saefast']['seconds'])} | "
                     f"{c['saefast']['ratio_to_floor']:.2f}× | {fmt_ms(c['dense']['seconds'])} | "
                     f"{fmt_ms(c['sparsify']['seconds'])} | {p['largest_d_sae']['saefast']:,} / "
                     f"{p['largest_d_sae']['dense']:,} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=sorted(DEVICES), action="append", help="default: all")
    ap.add_argument("--d-sae", type=int, action="append", help="default: 2^17 and 2^20")
    ap.add_argument("--mode", choices=("fp32", "bf16-autocast", "bf16"), action="append", help="default: all")
    for f in ("d_in", "batch", "k", "k_aux"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(Shape, f))
    ap.add_argument("--json", type=Path, default=None, help="write every prediction here")
    ap.add_argument("--markdown", action="store_true", help="print the summary table only")
    ap.add_argument("--readme", action="store_true", help="rewrite the README's perf-model block")
    args = ap.parse_args(argv)
    preds = [predict(Shape(d_in=args.d_in, d_sae=D, batch=args.batch, k=args.k, k_aux=args.k_aux, mode=m),
                     DEVICES[name])
             for name in (args.device or list(DEVICES)) for D in (args.d_sae or [1 << 17, 1 << 20])
             for m in (args.mode or ["fp32", "bf16-autocast", "bf16"])]
    if args.markdown:
        print(markdown(preds))
    else:
        print("\n\n".join(text(p) for p in preds))
    if args.json:
        args.json.write_text(json.dumps({"kind": "perf-model-prediction", "predictions": preds}, indent=1) + "\n")
    if args.readme:
        write_readme(Path(__file__).resolve().parent.parent / "README.md", readme_block(preds))
        print("wrote README.md perf-model block")
    return 0


START, END = "<!-- perf-model:start -->", "<!-- perf-model:end -->"


def readme_block(preds: List[dict]) -> str:
    head = next((p for p in preds if p["shape"]["d_sae"] == 1 << 17 and p["shape"]["mode"] == "bf16-autocast"), preds[0])
    top = sorted(head["contenders"]["saefast"]["phases"], key=lambda r: -r["seconds"])[:5]
    rest = ", ".join(f"{r['phase']} {fmt_ms(r['seconds'])}" for r in top)
    return "\n".join([
        "PREDICTIONS of the analytic model (`python benchmarks/perf_model.py --readme`), not measurements: "
        "d_in 2304, batch 4096, k 64, k_aux 512 among 5 % dead latents. Ceilings: " + DEVICES["H200"].source + ". "
        "The floor is the encoder GEMM plus one Adam pass.", "", markdown(preds), "",
        f"Where the saefast step goes beyond the floor ({head['device']['name']}, d_sae {head['shape']['d_sae']:,}, "
        f"{head['shape']['mode']}), largest phases: {rest}. The model prices the next changes "
        "(`perf_model.py` prints them): "
        + "; ".join(f"{w['change']}: {w['seconds_with_all_above'] / head['floor']['seconds']:.2f}× floor"
                    for w in head["saefast_what_if"]) + " (cumulative)."])


def write_readme(readme: Path, text: str) -> None:
    fill_block(readme, START, END, text)


if __name__ == "__main__":
    sys.exit(main())
