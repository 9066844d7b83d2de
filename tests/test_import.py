"""``import saefast`` must work on a machine without a GPU: it may not import triton (whose
import can touch the CUDA driver); the Triton backend is imported on first use."""
import subprocess
import sys


def test_import_saefast_does_not_import_triton():
    code = "import sys, saefast; assert 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)
