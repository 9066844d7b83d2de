"""Static kernel gate: compile every saefast kernel for GPU targets on any machine and read the cubins.

    python benchmarks/kernel_report.py                      # table on stdout
    python benchmarks/kernel_report.py --save --readme      # + benchmarks/results/static-<date>.json, README block
    python benchmarks/kernel_report.py --check              # exit 1 when a gate rule fails

No GPU is needed. For every headline shape (d_in 768, 2304, 4096), every dtype path (fp32 under
torch's "highest" and "high" matmul precision, bf16, fp16) and every architecture (sm_80, sm_90a,
and sm_100a where the bundled ptxas accepts it), the launchers in ``saefast.kernels`` are driven
through ``saefast.triton_backend`` on small CPU tensors with every kernel replaced by a recorder, and
with ``kernels._target.compute_capability`` answering the architecture asked for. Each recorded
launch is specialised the way Triton specialises a real launch (its own binder: dtypes, integer
divisibility, constexprs, num_warps, num_stages), compiled with ``triton.compile`` for that
``GPUTarget``, and its cubin read with the ``cuobjdump`` that ships in the triton wheel:
registers, stack, shared memory, local loads/stores (LDL/STL: spills), matrix instructions
(HGMMA on sm_90a, HMMA on sm_80, UTC*MMA on sm_100a) and FFMA, and the occupancy that follows.

The gate (:func:`violations`), on sm_80 and sm_90a: every kernel compiles; the hot kernels (encode,
sparse products and matvec, decoder norm, the decoder Adam pass) have no LDL/STL; every 16-bit or
tf32 encode GEMM issues tensor-core instructions, and so does the one-hot product of ``segment_outer`` on 16-bit operands. Other
architectures are reported, not gated (triton 3.6 cannot compile the encode kernel's tensor-core
variants for sm_100a: its OptimizeTMemLayouts pass fails; triton 3.9 can).

Compiling needs ``TRITON_INTERPRET`` unset (the interpreter replaces ``triton.jit`` functions); this
module refuses to run otherwise, and the test suite runs it in a subprocess.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from readme_blocks import fill_block

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
START, END = "<!-- static-table:start -->", "<!-- static-table:end -->"

HEADLINE_D_IN = (768, 2304, 4096)
# (label, torch dtype name, torch.get_float32_matmul_precision while launching)
DTYPE_PATHS = (("fp32", "float32", "highest"), ("tf32", "float32", "high"), ("bf16", "bfloat16", "highest"),
               ("fp16", "float16", "highest"))
ARCHS = {"sm_80": 80, "sm_90a": 90, "sm_100a": 100}
REQUIRED_ARCHS = ("sm_80", "sm_90a")
KERNEL_MODULES = ("saefast.kernels.topk_encode", "saefast.kernels.sparse_decode", "saefast.kernels.decoder_norm",
                  "saefast.kernels.adam")
# Every kernel of these families is hot: it runs once or more in every training step.
HOT_KERNELS = ("_encode_candidates_kernel", "_csr_gather_sum_kernel", "_pair_dot_kernel", "_segment_outer_kernel",
               "_matvec_kernel", "_decoder_norm_kernel", "_decoder_adam_kernel")


@dataclasses.dataclass(frozen=True)
class SM:
    """Per-SM limits that set occupancy (CUDA occupancy rules, per compute capability)."""

    registers: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    shared_bytes: int = 233472  # usable shared memory per SM
    reserved_shared: int = 1024  # the driver's per-block reservation


SM_LIMITS = {80: SM(shared_bytes=167936), 90: SM(), 100: SM()}
MMA_OPS = re.compile(r"^(HGMMA|HMMA|IMMA|UTC[A-Z]*MMA)$")


# ----------------------------------------------------------------------------------------------
# Recording the launches the launchers make
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    kernel: str
    module: str
    args: tuple
    kwargs: dict
    grid: tuple
    context: Dict[str, object]


class _Recorder:
    """Stands in for a ``triton.jit`` function: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn, module: str, sink: List[Launch], context: Dict[str, object]):
        self.fn, self.module, self.sink, self.context = fn, module, sink, context

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.fn.__name__, self.module, args, dict(kwargs), tuple(grid), dict(self.context)))
        return launch


@contextlib.contextmanager
def recording(capability: int, context: Dict[str, object]) -> Iterator[List[Launch]]:
    """Replace every kernel of the kernel modules by a recorder and answer ``capability``."""
    import triton
    from saefast.kernels import _target

    sink: List[Launch] = []
    saved = []
    for name in KERNEL_MODULES:
        mod = importlib.import_module(name)
        for attr, value in list(vars(mod).items()):
            if isinstance(value, triton.runtime.jit.JITFunction):
                saved.append((mod, attr, value))
                setattr(mod, attr, _Recorder(value, name, sink, context))
    saved.append((_target, "compute_capability", _target.compute_capability))
    _target.compute_capability = lambda device: capability
    try:
        yield sink
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


def drive_backend(d_in: int, dtype_name: str, precision: str, seed: int = 0) -> None:
    """Run every Triton-backend op the library uses, in every argument pattern it uses, at width
    d_in on small CPU tensors (the kernels are recorders, so their outputs are never read as
    results)."""
    import torch
    from saefast import torch_backend
    from saefast import triton_backend as tb
    from saefast.backend import DenseBlock

    dtype = getattr(torch, dtype_name)
    B, d_sae, k = 64, 1024, 8
    gen = torch.Generator().manual_seed(seed)
    xc = torch.randn(B, d_in, generator=gen).to(dtype)
    W_enc = (torch.randn(d_in, d_sae, generator=gen) / d_in ** 0.5).to(dtype)
    b_enc = (0.1 * torch.randn(d_sae, generator=gen)).to(dtype)
    b_dec = (0.1 * torch.randn(d_in, generator=gen)).to(dtype)
    W_dec = W_enc.t().contiguous()
    threshold = torch.full((d_sae,), 0.1)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        for bias in (None, b_enc):
            for mode in ("batch", "row"):
                tb.encode_forward(xc, W_enc, bias, mode=mode, k=k)
            tb.encode_forward(xc, W_enc, bias, mode="threshold", threshold=threshold)
        values, indices, row_ids, offsets, _ = torch_backend.encode_forward(xc, W_enc, None, mode="batch", k=k)
        grad_values = torch.randn(values.shape, generator=gen).to(dtype)
        for need_xc, need_W in ((True, True), (False, True), (False, False)):
            tb.encode_backward(grad_values, xc, W_enc, indices, row_ids, need_xc, need_W)
        for bias in (None, b_dec):
            tb.decode_forward(values, indices, offsets, row_ids, W_dec, bias)
        grad_out = torch.randn(B, d_in, generator=gen).to(dtype)
        for need_values, need_W in ((True, True), (True, False), (False, True)):
            tb.decode_backward(grad_out, values, indices, row_ids, W_dec, need_values, need_W)
        grad = torch.randn(W_dec.shape, generator=gen).to(dtype)
        tb.normalize_decoder_(W_dec.clone())
        tb.project_decoder_grad_(W_dec.clone(), grad.clone())
        tb.normalize_decoder_and_project_grad_(W_dec.clone(), grad.clone())
        for project, normalize in ((True, True), (False, True), (True, False)):
            tb.decoder_adam_(W_dec.clone(), grad, torch.zeros_like(grad), torch.zeros_like(grad), step_size=1e-3,
                             beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2_sqrt=0.03, project=project,
                             normalize=normalize)
        if d_in == max(HEADLINE_D_IN):  # rows wider than one tile take the kernel's three-sweep variant
            from saefast.kernels.adam import MAX_ONE_TILE_D
            wide = torch.randn(16, 2 * MAX_ONE_TILE_D + 8, generator=gen).to(dtype)
            tb.decoder_adam_(wide.clone(), wide, torch.zeros_like(wide), torch.zeros_like(wide), step_size=1e-3,
                             beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2_sqrt=0.03, project=True,
                             normalize=True)
        # The aux-K dense block (dead columns' pre-activations written by the encode kernel, the
        # dense-block backwards adding their rows in segment_outer) and the b_dec gradient's matvec.
        dead = torch.arange(0, d_sae, 16)
        for mode in ("batch", "row"):
            tb.encode_forward_with_aux(xc, W_enc, b_enc, mode=mode, k=k, dead=dead, k_aux=8)
        pre = (xc.float() @ W_enc.float().index_select(1, dead)).to(dtype)
        aux, slots = tb._select_rows_dense(pre, dead, 8)
        block = DenseBlock(0, aux[0].numel(), 0, B, dead, slots)
        aux_grads = torch.randn(aux[0].shape, generator=gen).to(dtype)
        for need_xc, need_W in ((True, True), (False, True)):
            tb.encode_backward_with_block(aux_grads, xc, W_enc, aux[1], aux[2], need_xc, need_W, block)
        tb.decode_forward_with_block(aux[0], aux[1], aux[3], aux[2], W_dec, b_dec, block)
        for need_values, need_W in ((True, True), (False, True)):
            tb.decode_backward_with_block(grad_out, aux[0], aux[1], aux[2], W_dec, need_values, need_W, block)
        tb.weight_matvec(W_enc, torch.randn(d_sae, generator=gen), dtype)
        if dtype != torch.float32:
            # fp32 master weights with 16-bit activations (torch.autocast): the same kernels, with
            # a fp32 gradient output.
            tb.encode_backward(grad_values, xc, W_enc.float(), indices, row_ids, False, True)
            tb.decode_backward(grad_out, values, indices, row_ids, W_dec.float(), True, True)
            tb.weight_matvec(W_enc.float(), torch.randn(d_sae, generator=gen), dtype)
    finally:
        torch.set_float32_matmul_precision(old)


def record_launches(archs: Sequence[str], d_ins: Sequence[int], paths=DTYPE_PATHS) -> List[Launch]:
    launches = []
    for arch in archs:
        for d_in in d_ins:
            for label, dtype_name, precision in paths:
                ctx = {"arch": arch, "d_in": d_in, "dtype": label}
                with recording(ARCHS[arch], ctx) as sink:
                    drive_backend(d_in, dtype_name, precision)
                launches += sink
    return launches


# ----------------------------------------------------------------------------------------------
# Specialising and compiling a launch like Triton does
# ----------------------------------------------------------------------------------------------

def _jit_function(module: str, kernel: str):
    return getattr(importlib.import_module(module), kernel)


def specialise(launch: Launch, capability: int) -> Tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) exactly as a launch of this kernel with these
    arguments on a ``capability`` GPU would compile it (Triton's own binder and argument packing)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(launch.module, launch.kernel)
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _cuobjdump() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this triton wheel ships no cuobjdump")
    return str(path)


def read_cubin(cubin: bytes) -> dict:
    """Resource usage and instruction counts of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(
        r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    mma = {op: n for op, n in ops.items() if MMA_OPS.match(op)}
    return {"registers": int(fields.get("REG", 0)), "stack_bytes": int(fields.get("STACK", 0)),
            "local_bytes": int(fields.get("LOCAL", 0)), "static_shared_bytes": int(fields.get("SHARED", 0)),
            "ldl": ops.get("LDL", 0), "stl": ops.get("STL", 0), "mma": mma, "ffma": ops.get("FFMA", 0),
            "instructions": sum(ops.values())}


def occupancy(capability: int, registers: int, num_warps: int, shared_bytes: int) -> Tuple[int, float, str]:
    """(resident blocks per SM, fraction of the SM's warp slots, the limiting resource)."""
    sm = SM_LIMITS[capability]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    limits = {"registers": (sm.registers // regs_per_warp) // num_warps,
              "warps": sm.max_warps // num_warps, "blocks": sm.max_blocks,
              "shared memory": sm.shared_bytes // (shared_bytes + sm.reserved_shared)}
    blocks = min(limits.values())
    limiter = min(limits, key=limits.get)
    return blocks, blocks * num_warps / sm.max_warps, limiter


def compile_one(job: dict) -> dict:
    """Compile one specialised launch for its target and read the cubin (runs in a worker)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(job["module"], job["kernel"])
    capability = ARCHS[job["arch"]]
    out = {k: job[k] for k in ("kernel", "arch", "variant", "num_warps", "num_stages")}
    try:
        src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=job["options"])
    except Exception as err:  # noqa: BLE001 - a failed compile is a row of the report
        out.update(compiled=False, error=f"{type(err).__name__}: {str(err).strip()[-800:]}")
        return out
    info = read_cubin(compiled.asm["cubin"])
    shared = max(int(compiled.metadata.shared), info["static_shared_bytes"])
    blocks, occ, limiter = occupancy(capability, info["registers"], job["num_warps"], shared)
    out.update(compiled=True, shared_bytes=shared, blocks_per_sm=blocks, occupancy=round(occ, 4),
               occupancy_limiter=limiter, **info)
    return out


def _describe(constexprs: dict, fn) -> str:
    names = fn.arg_names
    parts = []
    for path, value in sorted(constexprs.items()):
        name = names[path[0]]
        if name.isupper():  # the kernel's own constexpr parameters (flags, blocks, precision)
            parts.append(f"{name}={value}")
    return " ".join(parts)


def jobs_for(launches: List[Launch]) -> List[dict]:
    """One compile job per distinct (kernel, architecture, specialisation)."""
    jobs: Dict[str, dict] = {}
    for launch in launches:
        arch = launch.context["arch"]
        signature, constexprs, attrs, options = specialise(launch, ARCHS[arch])
        fn = _jit_function(launch.module, launch.kernel)
        key = json.dumps([launch.kernel, arch, signature, sorted((list(k), repr(v)) for k, v in constexprs.items()),
                          sorted((list(k), v) for k, v in attrs.items()), options["num_warps"],
                          options["num_stages"]], default=str)
        job = jobs.get(key)
        if job is None:
            dtypes = sorted({v[1:] for v in signature.values() if v.startswith("*fp") or v.startswith("*bf")})
            job = jobs[key] = {"key": key, "kernel": launch.kernel, "module": launch.module, "arch": arch,
                               "signature": signature, "constexprs": constexprs, "attrs": attrs,
                               "options": {k: v for k, v in options.items()
                                           if k in ("num_warps", "num_stages", "num_ctas")},
                               "num_warps": options["num_warps"], "num_stages": options["num_stages"],
                               "variant": f"{'/'.join(dtypes)} {_describe(constexprs, fn)}".strip(),
                               "uses": []}
        use = {"d_in": launch.context["d_in"], "dtype": launch.context["dtype"]}
        if use not in job["uses"]:
            job["uses"].append(use)
    return list(jobs.values())


def compile_all(jobs: List[dict], workers: int) -> List[dict]:
    if workers <= 1:
        results = [compile_one(j) for j in jobs]
    else:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = list(pool.map(compile_one, jobs, chunksize=1))
    rows = []
    for job, res in zip(jobs, results):
        res["uses"] = job["uses"]
        res["dtypes"] = sorted({u["dtype"] for u in job["uses"]})
        res["hot"] = job["kernel"] in HOT_KERNELS
        res["tensor_core_expected"] = tensor_core_expected(job)
        rows.append(res)
    return rows


def tensor_core_expected(job: dict) -> bool:
    """Where the gate requires matrix instructions: the encode GEMM on 16-bit operands or under
    tf32, and the one-hot product of segment_outer on 16-bit operands."""
    names = _jit_function(job["module"], job["kernel"]).arg_names
    const = {names[path[0]]: value for path, value in job["constexprs"].items()}
    sig = job["signature"]
    if job["kernel"] == "_encode_candidates_kernel":
        return sig["xc_ptr"] in ("*bf16", "*fp16") or const.get("INPUT_PRECISION") == "tf32"
    if job["kernel"] == "_segment_outer_kernel":
        return bool(const.get("HAS_OUT")) and sig["x_ptr"] in ("*bf16", "*fp16")
    return False


# ----------------------------------------------------------------------------------------------
# The gate
# ----------------------------------------------------------------------------------------------

def violations(rows: List[dict], required_archs: Sequence[str] = REQUIRED_ARCHS) -> List[str]:
    """Every broken gate rule, one line each (empty: the gate passes)."""
    bad = []
    for r in rows:
        if r["arch"] not in required_archs:  # reported, not gated (triton 3.6 cannot build sm_100a MMA)
            continue
        where = f"{r['kernel']} [{r['variant']}] on {r['arch']} (used by {', '.join(r['dtypes'])})"
        if not r["compiled"]:
            bad.append(f"{where} does not compile: {r['error']}")
            continue
        if r["hot"] and (r["ldl"] or r["stl"]):
            bad.append(f"{where} spills: {r['stl']} STL / {r['ldl']} LDL, {r['registers']} registers, "
                       f"{r['stack_bytes']} stack bytes")
        if r["tensor_core_expected"] and not r["mma"]:
            bad.append(f"{where} has no tensor-core instruction ({r['ffma']} FFMA)")
    return bad


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _git() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
        return {"commit": head or None, "dirty": dirty}
    except OSError:
        return {"commit": None, "dirty": None}


def _mma_text(r: dict) -> str:
    if not r.get("compiled"):
        return "-"
    if r["mma"]:
        return "+".join(sorted(r["mma"]))
    return "FFMA" if r["ffma"] else "none"


def table(rows: List[dict]) -> str:
    """Every compiled variant, one line each."""
    lines = ["| kernel | variant | arch | warps | stages | registers | stack B | LDL/STL | shared KiB | "
             "matrix | occupancy | dtypes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["variant"], r["arch"])):
        if not r["compiled"]:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['arch']} | {r['num_warps']} | {r['num_stages']} | "
                         f"does not compile | | | | | | {', '.join(r['dtypes'])} |")
            continue
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['arch']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['registers']} | {r['stack_bytes']} | {r['ldl']}/{r['stl']} | {r['shared_bytes'] / 1024:.0f} | "
                     f"{_mma_text(r)} | {r['occupancy']:.0%} ({r['occupancy_limiter']}) | {', '.join(r['dtypes'])} |")
    return "\n".join(lines)


def summary(rows: List[dict], archs: Sequence[str]) -> str:
    """One line per (kernel, dtype path), the worst variant per architecture: registers,
    LDL+STL, matrix instructions, lowest occupancy."""
    groups: Dict[Tuple[str, str], Dict[str, List[dict]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        for dt in r["dtypes"]:
            groups[(r["kernel"], dt)][r["arch"]].append(r)
    order = [p[0] for p in DTYPE_PATHS]
    head = "| kernel | dtype | " + " | ".join(archs) + " |"
    lines = [head, "|---|---|" + "---|" * len(archs)]
    for (kernel, dt) in sorted(groups, key=lambda g: (g[0], order.index(g[1]) if g[1] in order else 99)):
        cells = []
        for arch in archs:
            rs = groups[(kernel, dt)].get(arch, [])
            if not rs:
                cells.append("–")
            elif not all(r["compiled"] for r in rs):
                cells.append("does not compile")
            else:
                regs = max(r["registers"] for r in rs)
                spill = sum(r["ldl"] + r["stl"] for r in rs)
                mma = sorted({_mma_text(r) for r in rs})
                occ = min(r["occupancy"] for r in rs)
                cells.append(f"{regs} regs, {spill} LDL+STL, {'/'.join(mma)}, {occ:.0%}")
        lines.append(f"| `{kernel.strip('_').replace('_kernel', '')}` | {dt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_block(doc: dict, rel_path: str) -> str:
    v = doc["versions"]
    archs = doc["archs"]
    n_bad = len(doc["violations"])
    verdict = "passes" if not n_bad else f"fails ({n_bad} rule(s) broken)"
    return "\n".join([
        f"Static kernel report (compiled for GPU targets on a CPU machine, no GPU involved): "
        f"`python benchmarks/kernel_report.py --save --readme`, triton {v['triton']}, commit "
        f"{(doc['git'].get('commit') or 'unknown')[:10]}{' (uncommitted changes)' if doc['git'].get('dirty') else ''}, "
        f"from `{rel_path}`. Each cell: the most registers and the total local loads/stores (spills) over the "
        f"kernel's launch variants for that dtype path, its matrix instructions, and the lowest occupancy "
        f"(fraction of the SM's warp slots). The gate {verdict}.",
        "", summary(doc["rows"], archs)])


def write_readme(readme: Path, text: str) -> None:
    fill_block(readme, START, END, text)


def run(archs: Sequence[str], d_ins: Sequence[int], workers: int, dtypes: Optional[Sequence[str]] = None,
        kernel: str = "") -> dict:
    """Record, compile and read every launch; ``dtypes`` (labels of DTYPE_PATHS) and ``kernel`` (a
    substring of kernel names) narrow the report while working on one kernel."""
    import torch
    import triton

    paths = [p for p in DTYPE_PATHS if dtypes is None or p[0] in dtypes]
    launches = [launch for launch in record_launches(archs, d_ins, paths) if kernel in launch.kernel]
    jobs = jobs_for(launches)
    rows = compile_all(jobs, workers)
    return {"schema": 1, "kind": "static-kernel-report",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version()},
            "git": _git(), "archs": list(archs), "d_in": list(d_ins),
            "dtype_paths": [list(p) for p in paths], "kernel_filter": kernel, "launches_recorded": len(launches),
            "rows": rows, "violations": violations(rows)}


def supported_archs(requested: Sequence[str]) -> List[str]:
    """The requested architectures this triton can target (sm_100a needs a triton that knows it)."""
    out = []
    for arch in requested:
        if arch not in ARCHS:
            raise SystemExit(f"--arch {arch!r} is not one of {sorted(ARCHS)}")
        out.append(arch)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(ARCHS), help="comma-separated, of " + ", ".join(ARCHS))
    ap.add_argument("--d-in", default=",".join(map(str, HEADLINE_D_IN)), help="comma-separated widths")
    ap.add_argument("--dtype", default=",".join(p[0] for p in DTYPE_PATHS),
                    help="comma-separated dtype paths, of " + ", ".join(p[0] for p in DTYPE_PATHS))
    ap.add_argument("--kernel", default="", help="only kernels whose name contains this")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/static-<date>.json")
    ap.add_argument("--readme", action="store_true", help="rewrite the README's static-table block")
    ap.add_argument("--full", action="store_true", help="print every variant, not the summary")
    ap.add_argument("--check", action="store_true", help="exit 1 when a gate rule fails")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 replaces triton.jit functions by the interpreter; unset it to compile "
                         "for GPU targets")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    sys.path.insert(0, str(ROOT))
    archs = supported_archs([a.strip() for a in args.arch.split(",") if a.strip()])
    d_ins = [int(d) for d in args.d_in.split(",") if d.strip()]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    unknown = sorted(set(dtypes) - {p[0] for p in DTYPE_PATHS})
    if unknown:
        raise SystemExit(f"--dtype {','.join(unknown)}: not one of {', '.join(p[0] for p in DTYPE_PATHS)}")
    doc = run(archs, d_ins, args.workers, dtypes, args.kernel)
    print(table(doc["rows"]) if args.full else summary(doc["rows"], archs))
    paths = []
    if args.json:
        paths.append(args.json)
    if args.save:
        paths.append(RESULTS_DIR / f"static-{datetime.date.today():%Y-%m-%d}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1, default=repr) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    if args.readme:
        saved = paths[-1] if paths else None
        rel = saved.resolve().relative_to(ROOT).as_posix() if saved and saved.resolve().is_relative_to(ROOT) else "-"
        write_readme(ROOT / "README.md", readme_block(doc, rel))
        print("wrote README.md static-table block")
    for line in doc["violations"]:
        print("GATE:", line)
    print(f"{len(doc['rows'])} compiled variants from {doc['launches_recorded']} recorded launches; "
          f"gate {'passes' if not doc['violations'] else 'FAILS'}")
    return 1 if (args.check and doc["violations"]) else 0


if __name__ == "__main__":
    sys.exit(main())
