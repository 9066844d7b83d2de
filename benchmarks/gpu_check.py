"""The GPU check: stages in order of value under one deadline, each recorded as soon as it ends.

    python benchmarks/gpu_check.py --out DIR [--deadline 450] [--profile cuda|quick]
    python benchmarks/gpu_check.py --summarize DIR/check.json      # measured beside predicted

Run through ``benchmarks/gpu_check.sh`` (which installs the checkout without network first).
Stages, most valuable first; a stage that would start with too little time left is recorded as
skipped, and one that overruns is stopped with what it printed kept:

1. ``env``: device, driver, versions, commit.
2. ``tests``: the native kernel tests on a fast subset (``TESTS``).
3. ``step``: the whole BatchTopK training step at the headline shape in fp32 and in bf16 autocast
   (fp32 master weights): saefast, dense PyTorch, sparsify (when installed) and the floor (the
   encoder GEMM alone and one Adam pass), median step time and tokens/s, beside the analytic
   model's prediction for this device (``perf_model.py``).
4. ``memory``: the largest d_sae whose step runs (``memory_probe.py``), saefast then dense, each
   with a time bound.
5. ``ops``: the single-op benchmarks (pytest-benchmark suite) with their own results file.

Files written to DIR: ``check.json`` (every stage's figures, rewritten after each stage),
``check.log``, ``tests.log``, ``memory.log``, ``ops.json`` and ``ops.log``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
TESTS = ["tests/kernels/test_gpu_step_paths.py", "tests/kernels/test_adam.py", "tests/kernels/test_kernel_tiles.py",
         "tests/kernels/test_triton_sae_training.py"]
PROFILES = {
    # The memory search starts near the model's prediction (perf_model.py) so that a few trials,
    # each a fresh process, bracket the answer within the stage's time.
    "cuda": dict(d_in=2304, d_sae=1 << 17, batch=4096, k=64, k_aux=512, steps=10,
                 memory_start={"saefast": 1 << 20, "dense": 1 << 19}),
    "quick": dict(d_in=64, d_sae=2048, batch=128, k=8, k_aux=32, steps=3,
                  memory_start={"saefast": 4096, "dense": 2048}),
}
# Seconds each stage may take at most (less when the deadline is nearer).
STAGE_CAPS = {"tests": 120, "step": 180, "memory": 100, "ops": 240}
MIN_START = {"tests": 20, "step": 40, "memory": 30, "ops": 30}


class Check:
    def __init__(self, out: Path, deadline_s: float, profile: str):
        self.out, self.t0, self.deadline, self.profile = out, time.monotonic(), deadline_s, profile
        self.doc: Dict[str, object] = {"schema": 1, "kind": "saefast-gpu-check", "profile": profile,
                                       "shape": PROFILES[profile], "started": _now(), "stages": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "check.log", "a", encoding="utf-8")

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.doc["updated"] = _now()
        self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "check.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n", encoding="utf-8")
        tmp.replace(self.out / "check.json")

    def stage(self, name: str, fn: Callable[[float], dict]) -> None:
        budget = min(STAGE_CAPS.get(name, 60), self.left())
        if budget < MIN_START.get(name, 5):
            self.doc["stages"][name] = {"status": "skipped", "reason": f"{self.left():.0f} s left"}
            self.log(f"{name}: skipped ({self.left():.0f} s left)")
            self.save()
            return
        self.log(f"{name}: start (up to {budget:.0f} s)")
        t = time.monotonic()
        try:
            result = fn(budget)
            result.setdefault("status", "ok")
        except Exception as err:  # noqa: BLE001 - a failed stage is recorded, the next one still runs
            result = {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000]}
        result["seconds"] = round(time.monotonic() - t, 1)
        self.doc["stages"][name] = result
        self.log(f"{name}: {result['status']} in {result['seconds']} s")
        self.save()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _run(cmd: List[str], timeout: float, log: Path, env: Optional[dict] = None) -> dict:
    """Run a command, its output to ``log``; stop it at ``timeout`` keeping what it printed."""
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            rc, timed_out = proc.wait(), True
    tail = log.read_text(encoding="utf-8", errors="replace")[-1500:]
    return {"returncode": rc, "timed_out": timed_out, "log": log.name, "tail": tail,
            "status": "ok" if rc == 0 and not timed_out else ("timeout" if timed_out else "failed")}


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------

def stage_env(check: Check, commit: Optional[str]) -> Callable[[float], dict]:
    def run(_: float) -> dict:
        import torch
        import triton
        info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                "commit": commit or _git_commit()}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                        memory_bytes=props.total_memory, sms=props.multi_processor_count)
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                info["nvidia_smi"] = subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv"],
                    capture_output=True, text=True, timeout=20).stdout.strip()
        else:
            info["device"] = "cpu (dry run)"
        for dist in ("eai-sparsify",):
            with contextlib.suppress(Exception):
                from importlib import metadata
                info[dist] = metadata.version(dist)
        check.doc["env"] = info
        return {"device": info["device"]}
    return run


def _git_commit() -> Optional[str]:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    return None


def stage_tests(check: Check) -> Callable[[float], dict]:
    def run(budget: float) -> dict:
        cmd = [sys.executable, "-m", "pytest", *TESTS, "-q", "-x", "-p", "no:cacheprovider", "-rs"]
        return _run(cmd, budget, check.out / "tests.log")
    return run


def _time_cuda(fn: Callable[[], object], steps: int, device: str) -> List[float]:
    import torch
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def stage_step(check: Check, device: str) -> Callable[[float], dict]:
    def run(budget: float) -> dict:
        import torch
        sys.path.insert(0, str(BENCH_DIR))
        import perf_model
        import sae_steps

        shape = PROFILES[check.profile]
        t_end = time.monotonic() + budget - 5
        rows = []
        result = {"rows": rows}
        check.doc["stages"]["step"] = result  # partial figures survive a stop
        for mode in ("fp32", "bf16-autocast"):
            p = sae_steps.Problem(d_in=shape["d_in"], d_sae=shape["d_sae"], batch=shape["batch"], k=shape["k"],
                                  k_aux=shape["k_aux"], dtype=torch.float32, device=device)
            for impl in ("floor-gemm", "floor-adam", "saefast", "dense", "sparsify"):
                if time.monotonic() > t_end:
                    rows.append({"mode": mode, "impl": impl, "status": "skipped", "reason": "stage time used up"})
                    continue
                rows.append(_time_contender(sae_steps, p, impl, mode, shape["steps"], device))
                check.log(f"step {mode} {impl}: {rows[-1].get('median_ms', rows[-1].get('status'))}")
                check.save()
                _free(device)
        result["prediction"] = _prediction(perf_model, shape, check.doc.get("env", {}).get("device", ""))
        return result
    return run


def _free(device: str) -> None:
    import gc
    import torch
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _time_contender(sae_steps, p, impl: str, mode: str, steps: int, device: str) -> dict:
    import torch
    row = {"mode": mode, "impl": impl}
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if mode == "bf16-autocast"
                else contextlib.nullcontext())
    try:
        if impl in sae_steps.PEERS:
            __import__(sae_steps.PEERS[impl][0])
        inputs = sae_steps.make_inputs(p)
        if impl == "floor-gemm":
            x, W = inputs["x"], inputs["W_enc"]
            if mode == "bf16-autocast":  # the floor's GEMM on bf16 operands made once
                x, W = x.bfloat16(), W.bfloat16()
            fn = lambda: torch.mm(x, W)  # noqa: E731
        elif impl == "floor-adam":
            fn = sae_steps.adam_pass(p, inputs)  # fp32 master weights in both modes
        else:
            step = sae_steps.make_step(impl, p, inputs)

            def fn():
                with autocast:
                    step.run()
            row["notes"] = step.notes
        if impl == "saefast":
            _reset_counters()
        warm = _time_cuda(fn, 2, device)
        times = _time_cuda(fn, steps, device)
        if impl == "saefast":
            row["paths"] = _saefast_paths(p, mode, step, device)
        med = statistics.median(times)
        row.update(status="ok", median_ms=round(med * 1e3, 3), min_ms=round(min(times) * 1e3, 3),
                   first_call_s=round(warm[0], 2), steps=steps, tokens_per_s=round(p.batch / med))
        if device == "cuda":
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
    except ImportError as err:
        row.update(status="not installed", error=str(err)[:200])
    except Exception as err:  # noqa: BLE001
        oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)
        row.update(status="out of memory" if oom else "error", error=f"{type(err).__name__}: {err}"[:500])
    return row


def _reset_counters() -> None:
    with contextlib.suppress(ImportError):
        from saefast import triton_backend
        triton_backend.reset_encode_counters()


def _saefast_paths(p, mode: str, step, device: str) -> dict:
    """Which paths the saefast step took: backend, optimizer, aux-K as a dense block or sparse,
    fp32 master weights read under autocast, and the encode's slow-path counters."""
    import torch
    from saefast.ops import backend_name
    name = backend_name(torch.device(device))
    info = {"backend": name, "optimizer": step.extra.get("optimizer")}
    if name == "triton":
        from saefast import triton_backend as tb
        dtype = torch.bfloat16 if mode == "bf16-autocast" else torch.float32
        info["aux"] = "dense block" if tb.aux_dense_pays(p.batch, p.n_dead, p.k_aux, dtype) else "sparse"
        info["fp32_master_weights_read"] = mode == "bf16-autocast" and tb.READS_MASTER_WEIGHTS
        info["encode_counters"] = {k: v for k, v in tb.encode_counters().items() if v}  # slow paths: *_reruns, *_fallback_*
    return info


def _prediction(perf_model, shape: dict, device_name: str) -> dict:
    key = "H200" if "H200" in device_name else "H100" if "H100" in device_name else None
    if key is None:
        return {"note": f"no ceilings for {device_name!r} in perf_model.DEVICES"}
    out = {"device_preset": key}
    for mode in ("fp32", "bf16-autocast"):
        s = perf_model.Shape(d_in=shape["d_in"], d_sae=shape["d_sae"], batch=shape["batch"], k=shape["k"],
                             k_aux=shape["k_aux"], mode=mode)
        pred = perf_model.predict(s, perf_model.DEVICES[key])
        out[mode] = {"floor_ms": pred["floor"]["seconds"] * 1e3,
                     **{f"{c}_ms": v["seconds"] * 1e3 for c, v in pred["contenders"].items()}}
    return out


def stage_memory(check: Check, device: str) -> Callable[[float], dict]:
    def run(budget: float) -> dict:
        shape = PROFILES[check.profile]
        out = {}
        for impl, share in (("saefast", 0.6), ("dense", 1.0)):
            left = budget - sum(v.get("seconds", 0) for v in out.values())
            cmd = [sys.executable, str(BENCH_DIR / "memory_probe.py"), "--impl", impl, "--device", device,
                   "--d-in", str(shape["d_in"]), "--batch", str(shape["batch"]), "--k", str(shape["k"]),
                   "--k-aux", str(shape["k_aux"]), "--start", str(shape["memory_start"][impl])]
            if device != "cuda":
                cmd += ["--budget-bytes", str(256 << 20)]
            t = time.monotonic()
            res = _run(cmd, max(5.0, left * share), check.out / "memory.log" if impl == "saefast"
                       else check.out / "memory-dense.log")
            log_lines = [json.loads(line) for line in (check.out / res["log"]).read_text().splitlines()
                         if line.startswith("{")]
            passed = [line["d_sae"] for line in log_lines if line.get("ok")]
            done = next((line for line in log_lines if line.get("done")), None)
            out[impl] = {"max_d_sae": max(passed) if passed else 0, "complete": done is not None,
                         "trials": [line for line in log_lines if "ok" in line], "status": res["status"],
                         "seconds": round(time.monotonic() - t, 1)}
            check.doc["stages"]["memory"] = out
            check.save()
        # both probes log into files; keep one file: append the dense log to memory.log
        dense_log = check.out / "memory-dense.log"
        if dense_log.exists():
            with open(check.out / "memory.log", "a", encoding="utf-8") as f:
                f.write("\n--- dense ---\n" + dense_log.read_text(encoding="utf-8", errors="replace"))
            dense_log.unlink()
        return out
    return run


def stage_ops(check: Check) -> Callable[[float], dict]:
    def run(budget: float) -> dict:
        env = dict(os.environ)
        if check.profile == "quick":
            env["SAEFAST_BENCH_PROFILE"] = "quick"
        cmd = [sys.executable, "-m", "pytest", "benchmarks/bench_topk_encode.py", "benchmarks/bench_sparse_decode.py",
               "benchmarks/bench_decoder_norm.py", "benchmarks/bench_auxk.py", "--benchmark-only", "-q",
               "-p", "no:cacheprovider", "--results-path", str(check.out / "ops.json")]
        res = _run(cmd, budget, check.out / "ops.log", env=env)
        res["results"] = "ops.json" if (check.out / "ops.json").exists() else None
        return res
    return run


# ----------------------------------------------------------------------------------------------
# Summary: measured beside predicted
# ----------------------------------------------------------------------------------------------

def summarize(doc: dict) -> str:
    env = doc.get("env", {})
    lines = [f"GPU check of commit {str(env.get('commit'))[:10]} on {env.get('device')} (torch {env.get('torch')}, "
             f"triton {env.get('triton')}), profile {doc.get('profile')}, {doc.get('elapsed_s')} s"]
    for name, st in doc.get("stages", {}).items():
        lines.append(f"  {name}: {st.get('status')}" + (f" ({st.get('reason') or st.get('error', '')})"
                                                          if st.get("status") not in ("ok", None) else ""))
    step = doc.get("stages", {}).get("step", {})
    pred = step.get("prediction", {})
    if step.get("rows"):
        lines += ["", "| mode | contender | measured | tokens/s | predicted (model) |", "|---|---|---|---|---|"]
        for r in step["rows"]:
            key = {"floor-gemm": None, "floor-adam": None}.get(r["impl"], f"{r['impl']}_ms")
            p = pred.get(r["mode"], {}).get(key) if key else None
            meas = f"{r['median_ms']:.2f} ms" if "median_ms" in r else r.get("status", "")
            lines.append(f"| {r['mode']} | {r['impl']} | {meas} | {r.get('tokens_per_s', '–')} | "
                         f"{'–' if p is None else f'{p:.2f} ms (prediction)'} |")
        for r in step["rows"]:
            if r.get("paths"):
                lines.append(f"  saefast {r['mode']} paths: " + ", ".join(f"{k} {v}" for k, v in r["paths"].items()))
        for mode in ("fp32", "bf16-autocast"):
            got = {r["impl"]: r.get("median_ms") for r in step["rows"] if r["mode"] == mode}
            if got.get("floor-gemm") and got.get("floor-adam") and got.get("saefast"):
                floor = got["floor-gemm"] + got["floor-adam"]
                predicted = pred.get(mode, {})
                lines.append(f"  {mode}: measured floor {floor:.2f} ms, saefast {got['saefast'] / floor:.2f}x floor"
                             + (f"; predicted floor {predicted['floor_ms']:.2f} ms, saefast "
                                f"{predicted['saefast_ms'] / predicted['floor_ms']:.2f}x (prediction)"
                                if predicted else ""))
    mem = doc.get("stages", {}).get("memory", {})
    for impl in ("saefast", "dense"):
        if isinstance(mem.get(impl), dict):
            lines.append(f"  largest d_sae {impl}: {mem[impl]['max_d_sae']:,}"
                         + ("" if mem[impl].get("complete") else " (search cut short: a lower bound)"))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for the results (the device tool's $OUT)")
    ap.add_argument("--deadline", type=float, default=450.0, help="seconds for all stages together")
    ap.add_argument("--profile", choices=sorted(PROFILES), default=None,
                    help="shapes: cuda (headline) or quick (a CPU dry run); default by device")
    ap.add_argument("--commit", default=os.environ.get("SAEFAST_COMMIT"), help="commit being checked")
    ap.add_argument("--stages", default="env,tests,step,memory,ops")
    ap.add_argument("--summarize", type=Path, default=None, help="print a check.json's figures and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(json.loads(args.summarize.read_text(encoding="utf-8"))))
        return 0
    if args.out is None:
        ap.error("--out is required")
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check = Check(args.out, args.deadline, args.profile or ("cuda" if device == "cuda" else "quick"))
    stages = {"env": stage_env(check, args.commit), "tests": stage_tests(check), "step": stage_step(check, device),
              "memory": stage_memory(check, device), "ops": stage_ops(check)}
    for name in args.stages.split(","):
        check.stage(name, stages[name])
    check.doc["finished"] = _now()
    check.save()
    print(summarize(check.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
