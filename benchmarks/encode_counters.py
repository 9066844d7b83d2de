"""The Triton encode's extra passes in the benchmark output.

The Triton encode keeps the entries above an estimated threshold in one kernel pass; when the
estimate misses it runs the kernel again or sends rows to the PyTorch backend
(``saefast.triton_backend.encode_counters``). On a GPU each of those is a slow path, so:

* :func:`counting` wraps a contender's timing and records, for the Triton backend, the events per
  encode call next to its time (``bench_topk_encode.py``, ``bench_auxk.py``);
* :func:`emulated_candidates` is the kernel's candidate pass in PyTorch (the same comparisons on
  the same dtype-rounded values), so ``bench_encode_fallbacks.py`` can measure the rates of the
  threshold estimate at the benchmark shapes on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from conftest import DEVICE
from saefast.ops import backend_name

EVENTS = ("capacity_reruns", "threshold_reruns", "fallback_calls", "fallback_rows")


def per_call(counters: Dict[str, int]) -> Dict[str, float]:
    """Events per encode call and fallback rows per encoded row, over every mode counted."""
    calls = sum(counters[f"{m}_calls"] for m in ("batch", "row", "threshold"))
    rows = sum(counters[f"{m}_rows"] for m in ("batch", "row", "threshold"))
    out = {"encode_calls": calls}
    for event in EVENTS:
        total = sum(counters[f"{m}_{event}"] for m in ("batch", "row", "threshold"))
        out[f"{event}_per_call"] = total / calls if calls else 0.0
    out["fallback_row_fraction"] = (sum(counters[f"{m}_fallback_rows"] for m in ("batch", "row", "threshold"))
                                    / rows if rows else 0.0)
    return out


@contextlib.contextmanager
def counting(record, *, group: str, impl: str, params: Dict[str, object]) -> Iterator[None]:
    """Count the Triton encode's reruns and fallbacks over the block (warm-up and timed calls) and
    record them per call as one figure, when ``impl`` runs saefast on the Triton backend."""
    triton = impl == "saefast" and backend_name(torch.device(DEVICE)) == "triton"
    if triton:
        from saefast import triton_backend
        triton_backend.reset_encode_counters()
    yield
    if triton:
        rates = per_call(triton_backend.encode_counters())
        record.figure(group=group, impl=impl, params=params, metric="encode_fallback_rows",
                      value=rates["fallback_row_fraction"], unit="fraction",
                      notes="rows the Triton encode sent to the PyTorch backend; reruns per call beside it",
                      **rates)


def emulated_candidates(xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], row_thr: Optional[Tensor],
                        col_thr: Optional[Tensor], capacity: int,
                        chunk_elements: int = 1 << 24) -> Tuple[Tensor, Tensor, Tensor, int, Tensor, Tensor]:
    """``saefast.kernels.topk_encode.encode_candidates`` in PyTorch: pre = xc @ W_enc (+ b_enc)
    accumulated in fp32 and rounded to the dtype; entries with pre > 0, pre >= row_thr[r] and
    pre > col_thr[l] are candidates; the first ``capacity`` are written, all are counted."""
    B, d_sae = xc.shape[0], W_enc.shape[1]
    capacity = max(int(capacity), 1)
    values = torch.empty(capacity, dtype=xc.dtype, device=xc.device)
    latents = torch.empty(capacity, dtype=torch.int32, device=xc.device)
    rows = torch.empty(capacity, dtype=torch.int32, device=xc.device)
    row_count = torch.zeros(B, dtype=torch.int32, device=xc.device)
    row_pos = torch.zeros(B, dtype=torch.int32, device=xc.device)
    W32 = W_enc.float()
    total = 0
    step = max(1, chunk_elements // max(d_sae, 1))
    for s in range(0, B, step):
        e = min(B, s + step)
        pre = xc[s:e].float() @ W32
        if b_enc is not None:
            pre += b_enc.float()
        vf = pre.to(xc.dtype).float()
        positive = vf > 0
        keep = positive.clone()
        if row_thr is not None:
            keep &= vf >= row_thr[s:e, None]
        if col_thr is not None:
            keep &= vf > col_thr[None, :]
        row_count[s:e] = keep.sum(1).int()
        row_pos[s:e] = positive.sum(1).int()
        where = keep.nonzero()
        n = min(where.shape[0], max(capacity - total, 0))
        if n:
            values[total:total + n] = vf[keep][:n].to(xc.dtype)
            latents[total:total + n] = where[:n, 1].int()
            rows[total:total + n] = (where[:n, 0] + s).int()
        total += where.shape[0]
    return values, latents, rows, total, row_count, row_pos
