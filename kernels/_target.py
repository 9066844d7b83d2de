"""Which GPU architecture a launch is for, so launchers can pick per-architecture tiles.

``compute_capability(device)`` is 10 * major + minor of a CUDA device (80 for A100, 90 for H100 and
H200, 100 for B200). Elsewhere (tensors on the CPU under ``TRITON_INTERPRET=1``) it is
``INTERPRETER_CAPABILITY``: the interpreter runs any configuration, and using a real architecture's
keeps the interpreter tests on the same tile shapes a GPU would run. The static kernel report
(``benchmarks/kernel_report.py``) replaces this function to ask a launcher what it would choose on
another architecture.
"""
from __future__ import annotations

import functools

import torch

INTERPRETER_CAPABILITY = 90


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def compute_capability(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_CAPABILITY
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
