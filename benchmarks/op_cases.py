"""Shared pieces of the per-op benchmarks: contenders, inputs and the backend switch.

Each op is timed three ways on the same inputs: ``saefast`` (the public op with its default
dispatch: Triton on CUDA, the PyTorch backend elsewhere), ``saefast-torch`` (the same op forced
onto saefast's PyTorch backend with ``SAEFAST_BACKEND=torch``; only where that differs from
the default, i.e. on CUDA) and ``dense`` (what plain PyTorch code does: dense matmul, dense
``torch.topk``, scatter, dense decode).
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch

from conftest import DEVICE, SIZES, dtype_name
from saefast.ops import backend_name

IMPLS = ("dense", "saefast-torch", "saefast")  # saefast last: its extra_info gets the speed-ups


def cases(*axes: Tuple[str, Tuple]) -> list:
    """pytest params over (axis values..., impl, dtype), impl innermost so each point's
    baselines run before saefast."""
    combos = [()]
    for _, values in axes:
        combos = [c + (v,) for c in combos for v in values]
    out = []
    for dtype in SIZES.dtypes:
        for combo in combos:
            for impl in IMPLS:
                ident = "-".join([str(v) for v in combo] + [impl, dtype_name(dtype)])
                out.append(pytest.param(*combo, impl, dtype, id=ident))
    return out


def use_impl(impl: str, monkeypatch) -> None:
    """Point saefast's dispatch at the contender (skips ``saefast-torch`` where it is the default)."""
    if impl != "saefast-torch":
        return
    if backend_name(torch.device(DEVICE)) == "torch":
        pytest.skip("saefast already runs its PyTorch backend on this device (same code as 'saefast')")
    monkeypatch.setenv("SAEFAST_BACKEND", "torch")


def grad_like(t: torch.Tensor, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator(device=t.device).manual_seed(seed)
    return torch.randn(t.shape, generator=gen, device=t.device).to(t.dtype)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def clear_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None


def op_params(p, **extra) -> Dict[str, object]:
    out = p.params()
    out.update(extra)
    return out
