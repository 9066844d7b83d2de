"""The benchmarks' contenders compute the same step: each benchmark file's same-maths check (a few
steps of saefast and of its dense PyTorch baseline from the same weights, at toy sizes) runs with
the test suite, so a benchmark never times two different computations."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_contender_pair_computes_the_same_step():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider",
                           "-k", "compute_the_same_step"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "skipped" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 6, summary  # BatchTopK, Matryoshka, JumpReLU x2, ...
