"""The static kernel gate: every kernel compiles for sm_80 and sm_90a, the hot kernels do not spill,
and the 16-bit and tf32 GEMMs (and segment_outer's one-hot product on 16-bit operands) issue
tensor-core instructions. ``benchmarks/kernel_report.py`` compiles for GPU targets, which needs
TRITON_INTERPRET unset, so it runs in a subprocess (compiled kernels are cached by triton, so a
second run of the suite takes seconds)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "benchmarks" / "kernel_report.py"
sys.path.insert(0, str(REPORT.parent))
import kernel_report  # noqa: E402  (pure Python until run; compiling happens in the subprocess)

REQUIRED = ("sm_80", "sm_90a")


def _compile_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _run_python(code_or_args, tmp_path: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    cmd = [sys.executable] + code_or_args
    proc = subprocess.run(cmd, cwd=ROOT, env=_compile_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gate") / "static.json"
    _run_python([str(REPORT), "--arch", ",".join(REQUIRED), "--json", str(out)], out.parent)
    return json.loads(out.read_text())


def test_every_kernel_and_dtype_path_is_compiled_for_each_required_arch(report):
    seen = {(r["kernel"], dt, r["arch"]) for r in report["rows"] for dt in r["dtypes"]}
    for kernel in kernel_report.HOT_KERNELS:
        for label, _, _ in kernel_report.DTYPE_PATHS:
            for arch in REQUIRED:
                assert (kernel, label, arch) in seen, f"{kernel} was never compiled for {label} on {arch}"
    assert report["d_in"] == list(kernel_report.HEADLINE_D_IN)


def test_static_gate_passes(report):
    assert report["violations"] == [], "\n".join(report["violations"])
    assert kernel_report.violations(report["rows"]) == []
    # The same facts, read directly, so a bug in violations() cannot hide them.
    for r in report["rows"]:
        assert r["compiled"], f"{r['kernel']} [{r['variant']}] does not compile for {r['arch']}: {r.get('error')}"
        if r["hot"]:
            assert r["ldl"] == 0 and r["stl"] == 0, f"{r['kernel']} [{r['variant']}] spills on {r['arch']}"
        if r["tensor_core_expected"]:
            assert r["mma"], f"{r['kernel']} [{r['variant']}] has no tensor-core instruction on {r['arch']}"
    encode = [r for r in report["rows"] if r["kernel"] == "_encode_candidates_kernel"]
    expected = {dt for r in encode if r["tensor_core_expected"] for dt in r["dtypes"]}
    assert expected == {"tf32", "bf16", "fp16"}, "the gate must require tensor cores for these encode paths"
    assert all(not r["mma"] and r["ffma"] for r in encode if r["dtypes"] == ["fp32"]), \
        "fp32 under 'highest' precision must stay on the exact FMA path"


def test_violations_flag_each_broken_rule(report):
    rows = copy.deepcopy(report["rows"])
    hot = next(r for r in rows if r["hot"] and r["arch"] == "sm_90a")
    hot["stl"] = 3
    tc = next(r for r in rows if r["tensor_core_expected"] and r["arch"] == "sm_80")
    tc["mma"] = {}
    broken = next(r for r in rows if r["arch"] == "sm_90a" and r is not hot)
    broken.update(compiled=False, error="ptxas fatal")
    found = kernel_report.violations(rows)
    assert len(found) == 3, found
    assert any("spills" in v and hot["kernel"] in v for v in found)
    assert any("no tensor-core" in v and tc["kernel"] in v for v in found)
    assert any("does not compile" in v for v in found)
    optional = copy.deepcopy(report["rows"][:2])
    optional[0].update(arch="sm_100a", compiled=False, error="unsupported")
    optional[1].update(arch="sm_100a", stl=5, ldl=5, hot=True)
    assert kernel_report.violations(optional) == [], "an optional architecture is reported, not gated"


DRIVER = """
import json, sys
sys.path.insert(0, "benchmarks")
import kernel_report
from saefast.kernels import topk_encode
# A whole-tile epilogue on a 128 x 512 tile with 4 warps cannot fit in registers.
topk_encode.GEMM_CONFIGS[(90, "16bit")] = topk_encode.GemmConfig(128, 512, 64, 4, 3)
doc = kernel_report.run(["sm_90a"], [2304], workers=1, dtypes=["bf16", "fp32"], kernel="encode")
print(json.dumps({"violations": doc["violations"], "rows": doc["rows"]}))
"""


def test_gate_reads_spills_and_missing_tensor_cores_from_real_cubins(tmp_path):
    proc = _run_python(["-c", DRIVER], tmp_path)
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    spilling = [r for r in doc["rows"] if "bf16" in r["dtypes"]]
    assert spilling and all(r["ldl"] + r["stl"] > 0 for r in spilling)
    assert len([v for v in doc["violations"] if "spills" in v and "bf16" in v]) == len(spilling)
    exact = [r for r in doc["rows"] if r["dtypes"] == ["fp32"]]
    assert exact and all(not r["mma"] and r["ffma"] > 0 for r in exact), "fp32 'highest' must read as FFMA"
