"""saefast ops: autograd Functions over the kernels, and the one dispatch rule.

Public ops (all take fp32, bf16 or fp16 tensors, accumulate in fp32; fp64 on the torch path):

* ``topk_encode(x, W_enc, b_dec, k, b_enc=None, mode="batch")`` -> :class:`SparseActs`
  ``pre = relu((x - b_dec) @ W_enc + b_enc)``; ``mode="batch"`` keeps the B*k largest positive
  entries of the whole batch (BatchTopK), ``mode="row"`` the k largest positives of each row (TopK).
* ``threshold_encode(x, W_enc, b_dec, threshold, b_enc=None)``: keep ``pre > threshold`` (a scalar
  or one threshold per latent); used for BatchTopK inference and JumpReLU.
* ``auxk_encode(x, W_enc, b_dec, dead_mask, k_aux, b_enc=None)``: each row's top ``k_aux``
  positive entries among the dead latents (the aux-K loss), without any dense [B, d_sae] tensor.
* ``sparse_decode(acts, W_dec, b_dec=None)`` -> ``x_hat [B, d_in]``.
* ``normalize_decoder_(W_dec)``, ``project_decoder_grad_(W_dec, grad)`` and
  ``normalize_decoder_and_project_grad_(W_dec, grad)``: in-place decoder-norm maintenance.

Gradients flow to x, W_enc, b_enc, b_dec (encode) and to the values, W_dec, b_dec (decode);
every backward touches only the active (row, latent) pairs.

Dispatch (the only place it happens): ``SAEFAST_BACKEND=torch`` forces the PyTorch backend,
``SAEFAST_BACKEND=triton`` forces the Triton kernels (on a CPU this needs ``TRITON_INTERPRET=1``
set before triton is imported), and the default ``auto`` uses Triton for CUDA tensors and the
PyTorch backend for everything else. What a backend provides is written in ``saefast.backend``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from types import ModuleType
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from torch.utils.weak import WeakTensorKeyDictionary

from . import torch_backend
from .backend import DenseBlock, acc_dtype, aux_codes_by_copy, matvec_acc, unfired
from .selection import csr_offsets

__all__ = [
    "SparseActs", "backend_name", "topk_encode", "threshold_encode", "auxk_encode", "topk_encode_with_aux",
    "stack_rows", "sparse_decode",
    "normalize_decoder_", "project_decoder_grad_", "normalize_decoder_and_project_grad_",
    "above_threshold", "jumprelu", "jumprelu_step",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MODES = ("batch", "row")


class SparseActs(NamedTuple):
    """Sparse latent activations of B rows, sorted by (row, latent), in CSR form.

    values [nnz] (differentiable), indices [nnz] int32 latent ids, row_ids [nnz] int32,
    offsets [B + 1] int64 (row r owns ``values[offsets[r]:offsets[r + 1]]``), kept_min: fp32
    scalar, the smallest kept value (0 when nothing is kept; BatchTopK's threshold estimate).
    """

    values: Tensor
    indices: Tensor
    row_ids: Tensor
    offsets: Tensor
    kept_min: Tensor
    d_sae: int

    @property
    def n_rows(self) -> int:
        return self.offsets.numel() - 1

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def to_dense(self) -> Tensor:
        """The [B, d_sae] matrix (differentiable w.r.t. values). Only for callers that need it."""
        dense = self.values.new_zeros((self.n_rows, self.d_sae))
        return dense.index_put((self.row_ids.long(), self.indices.long()), self.values)

    def fired(self) -> Tensor:
        """Bool [d_sae]: which latents are active in at least one row."""
        mask = torch.zeros(self.d_sae, dtype=torch.bool, device=self.values.device)
        mask[self.indices.long()] = True
        return mask

    def counts(self) -> Tensor:
        """Int64 [d_sae]: in how many rows each latent is active."""
        return torch.bincount(self.indices.long(), minlength=self.d_sae)

    def l0(self) -> Tensor:
        """Mean number of active latents per row (fp32 scalar)."""
        return torch.tensor(self.nnz / max(self.n_rows, 1), dtype=torch.float32)

    def select(self, keep: Tensor) -> "SparseActs":
        """The entries where ``keep`` [nnz] (bool) is True, order kept, offsets and kept_min rebuilt
        (differentiable in the values)."""
        row_ids = self.row_ids[keep]
        values = self.values[keep]
        kept_min = values.detach().float().min() if values.numel() else torch.zeros((), device=values.device)
        return SparseActs(values, self.indices[keep], row_ids, csr_offsets(row_ids, self.n_rows), kept_min,
                          self.d_sae)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

def backend_name(device: torch.device) -> str:
    """"triton" or "torch": which implementation runs for tensors on ``device``."""
    choice = os.environ.get("SAEFAST_BACKEND", "auto").strip().lower()
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"SAEFAST_BACKEND={choice!r} is not one of 'auto', 'torch', 'triton'")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"SAEFAST_BACKEND=triton was asked for tensors on {device}, but Triton kernels only run on "
            "CUDA devices. Set TRITON_INTERPRET=1 before importing triton to run them (slowly) on the "
            "CPU, or unset SAEFAST_BACKEND to use the PyTorch backend.")
    return choice


def _backend(device: torch.device) -> ModuleType:
    if backend_name(device) == "torch":
        return torch_backend
    from . import triton_backend  # imported lazily: importing saefast never touches a GPU driver
    return triton_backend


_AUTOCAST_DEVICES = tuple(d for d in ("cpu", "cuda") if torch.amp.is_autocast_available(d))


def _autocast_off(fn):
    """Run an autograd Function's forward or backward with torch.autocast switched off. The ops
    cast their inputs to the autocast dtype themselves (:func:`_autocast`); nothing inside may be
    recast, also when a caller runs ``backward()`` within an autocast region (which would turn the
    fp32 sums of a backward into bf16 ones, or ask for a bf16 sparse CSR product that does not
    exist)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in _AUTOCAST_DEVICES:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------
# Argument checks (public boundary; kernels trust them)
# ----------------------------------------------------------------------------------------------

def _check_tensor(name: str, t: Tensor, ndim: int, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if dtype is None:
        if t.dtype not in _FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"{name} has dtype {t.dtype}; use float32, bfloat16 or float16")
    elif t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the weights' {dtype}; "
                        f"cast it with .to({dtype})")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the weights are on {device}; move it with .to('{device}')")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; pass {name}.contiguous()")


def _check_fp64(device: torch.device, dtype: torch.dtype) -> None:
    if dtype == torch.float64 and backend_name(device) == "triton":
        raise TypeError("float64 runs only on the PyTorch backend (SAEFAST_BACKEND=torch); "
                        "the Triton kernels take float32, bfloat16 or float16")


def _autocast(*tensors, master: Optional[Tensor] = None):
    """Under ``torch.autocast`` the ops run in the autocast dtype, like a matmul would: float
    tensors are cast to it (differentiably, so fp32 master weights get fp32 gradients). The
    weight passed as ``master`` (the op's W_enc or W_dec) stays float32 where the backend reads
    master weights (``READS_MASTER_WEIGHTS``: the Triton backend rounds each element to the
    autocast dtype as it reads it and returns the gradient in float32 with the 16-bit gradient's
    values): the same numbers without the cast copies and their passes over the weight."""
    first = next(t for t in tensors if isinstance(t, Tensor))
    device_type = first.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    keep = master is not None and _reads_master(master, dtype)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype
                 and not (keep and t is master) else t for t in tensors)


def _reads_master(W: Tensor, dtype: torch.dtype) -> bool:
    """Whether W (float32) may go to the backend as it is with activations of ``dtype``."""
    return (W.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)
            and getattr(_backend(W.device), "READS_MASTER_WEIGHTS", False))


def _compute_dtype(x: Tensor, W: Tensor) -> torch.dtype:
    """The dtype an op computes in: W's, or x's for float32 master weights with 16-bit x."""
    return x.dtype if (W.dtype != x.dtype and _reads_master(W, x.dtype)) else W.dtype


def _check_encode_args(x: Tensor, W_enc: Tensor, b_dec: Tensor, b_enc: Optional[Tensor]) -> None:
    _check_tensor("W_enc", W_enc, 2)
    d_in, d_sae = W_enc.shape
    dt, dev = (_compute_dtype(x, W_enc) if isinstance(x, Tensor) else W_enc.dtype), W_enc.device
    _check_tensor("x", x, 2, dt, dev)
    if x.shape[1] != d_in:
        raise ValueError(f"x has {x.shape[1]} features per row but W_enc expects d_in={d_in}; "
                         f"x must be [batch, {d_in}]")
    if not bool(torch.isfinite(x).all()):
        # A NaN row would silently keep nothing and hand its share of the batch's budget to others.
        raise ValueError("x contains NaN or inf; the encode ops take finite inputs only: check the activations "
                         "(or the model and dtype producing them) and drop or repair the bad rows")
    _check_tensor("b_dec", b_dec, 1, dt, dev)
    if b_dec.shape[0] != d_in:
        raise ValueError(f"b_dec has shape {tuple(b_dec.shape)}, expected [{d_in}] (d_in)")
    if b_enc is not None:
        _check_tensor("b_enc", b_enc, 1, dt, dev)
        if b_enc.shape[0] != d_sae:
            raise ValueError(f"b_enc has shape {tuple(b_enc.shape)}, expected [{d_sae}] (d_sae)")
    _check_fp64(dev, dt)


def _check_dead(dead_mask: Tensor, d_sae: int, device: torch.device) -> Tensor:
    """Indices (increasing) of the dead latents."""
    if not isinstance(dead_mask, Tensor) or dead_mask.dtype != torch.bool or dead_mask.shape != (d_sae,):
        raise ValueError(f"dead_mask must be a bool tensor of shape [{d_sae}] (d_sae)")
    return dead_mask.to(device).nonzero().flatten()


def _check_k(name: str, k: int, d_sae: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        if isinstance(k, Tensor) and k.numel() == 1:
            k = int(k)
        else:
            raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= d_sae:
        raise ValueError(f"{name}={k} must be between 1 and d_sae={d_sae}")
    return k


# ----------------------------------------------------------------------------------------------
# Autograd Functions (no maths of their own: they call the backend)
# ----------------------------------------------------------------------------------------------

def _save_codes(ctx, xc, W_enc, b_enc, codes):
    """Keep what the backward of an encode needs; codes = (values, indices, row_ids, offsets, kept_min)."""
    ctx.save_for_backward(xc, W_enc, codes[1], codes[2])
    ctx.has_b_enc = b_enc is not None
    ctx.mark_non_differentiable(*codes[1:])
    return codes


def _codes_backward(ctx, grad_values):
    xc, W_enc, indices, row_ids = ctx.saved_tensors
    return _encode_input_grads(ctx, grad_values, xc, W_enc, indices, row_ids)


class _Encode(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, x, W_enc, b_dec, b_enc, mode, k, threshold):
        xc = x - b_dec
        codes = _backend(x.device).encode_forward(xc, W_enc, b_enc, mode=mode, k=k, threshold=threshold)
        return _save_codes(ctx, xc, W_enc, b_enc, tuple(codes))

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_values, *_):
        return _codes_backward(ctx, grad_values) + (None, None, None)


def _encode_input_grads(ctx, grad_values, xc, W_enc, indices, row_ids, block: Optional[DenseBlock] = None):
    """Gradients for (x, W_enc, b_dec, b_enc) from the gradients of the kept values (those of the
    entries in ``block``, if any, computed as a dense block by the backend)."""
    impl = _backend(xc.device)
    need_x, need_W, need_b_dec, need_b_enc = ctx.needs_input_grad[:4]
    if block is not None:
        grad_xc, grad_W, lat_sum = impl.encode_backward_with_block(
            grad_values.contiguous(), xc, W_enc, indices, row_ids, need_x, need_W, block)
    else:
        grad_xc, grad_W, lat_sum = impl.encode_backward(
            grad_values.contiguous(), xc, W_enc, indices, row_ids, need_x, need_W)
    acc = acc_dtype(xc.dtype)
    grad_b_dec = None
    if need_b_dec:
        # d/db_dec = -sum_r d/dxc[r]; without grad_xc, -W_enc @ (per-latent sums) is one
        # pass over W_enc instead of a gather of nnz columns.
        if grad_xc is not None:
            grad_b_dec = -(grad_xc.sum(0, dtype=acc))
        elif hasattr(impl, "weight_matvec"):
            grad_b_dec = -impl.weight_matvec(W_enc, lat_sum, xc.dtype)
        else:
            grad_b_dec = -matvec_acc(W_enc, lat_sum)
        grad_b_dec = grad_b_dec.to(xc.dtype)
    grad_b_enc = lat_sum.to(xc.dtype) if (need_b_enc and ctx.has_b_enc) else None
    return grad_xc, grad_W, grad_b_dec, grad_b_enc


@functools.lru_cache(maxsize=None)
def _takes_exclude_fired(fused) -> bool:
    """Whether a backend's ``encode_forward_with_aux`` takes ``exclude_fired`` (optional)."""
    return "exclude_fired" in inspect.signature(fused).parameters


def _aux_forward(impl, xc, W_enc, b_enc, dead, k_aux):
    """Row top-k among the dead columns only (see ``backend.aux_codes_by_copy``)."""
    return aux_codes_by_copy(impl.encode_forward, xc, W_enc, b_enc, dead, k_aux)


def _block_outputs(block: Optional[DenseBlock], device: torch.device) -> Tuple[Tensor, Tensor]:
    """A dense block's (cols, slots) as extra outputs of an encode node (empty without a block)."""
    if block is None:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty.int()
    return block.cols, block.slots


class _AuxEncode(torch.autograd.Function):
    """aux-K codes; the backward scatters straight into a W_enc-shaped gradient (no gradient of
    the dead-column copy to expand afterwards). Outputs the codes and the (cols, slots) of their
    dense block (empty when the backend made none)."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, W_enc, b_dec, b_enc, dead, k_aux):
        impl = _backend(x.device)
        xc = x - b_dec
        dense = getattr(impl, "aux_forward_dense", None)  # optional in the backend contract
        out = dense(xc, W_enc, b_enc, dead, k_aux) if dense is not None else None
        codes, block = out if out is not None else (_aux_forward(impl, xc, W_enc, b_enc, dead, k_aux), None)
        ctx.block = block
        cols, slots = _block_outputs(block, x.device)
        ctx.mark_non_differentiable(cols, slots)
        return _save_codes(ctx, xc, W_enc, b_enc, tuple(codes)) + (cols, slots)

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_values, *_):
        xc, W_enc, indices, row_ids = ctx.saved_tensors
        return _encode_input_grads(ctx, grad_values, xc, W_enc, indices, row_ids, ctx.block) + (None, None)


class _EncodeWithAux(torch.autograd.Function):
    """The main encode and the aux-K encode in one node, so that the backward scatters both sets
    of pairs into a single W_enc gradient (no second [d_in, d_sae] buffer). Outputs both codes and
    the (cols, slots) of the aux codes' dense block (empty when the backend made none)."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, W_enc, b_dec, b_enc, mode, k, dead, k_aux, exclude_fired):
        impl = _backend(x.device)
        xc = x - b_dec
        fused = getattr(impl, "encode_forward_with_aux", None)  # optional in the backend contract
        if fused is not None and exclude_fired and not _takes_exclude_fired(fused):
            fused = None  # this backend's fused encode cannot leave out the fired latents
        if fused is not None:
            extra = {"exclude_fired": True} if exclude_fired else {}
            out = fused(xc, W_enc, b_enc, mode=mode, k=k, dead=dead, k_aux=k_aux, **extra)
        else:
            main = impl.encode_forward(xc, W_enc, b_enc, mode=mode, k=k)
            out = (main, _aux_forward(impl, xc, W_enc, b_enc, unfired(dead, main[1]) if exclude_fired else dead,
                                      k_aux))
        main, aux = out[0], out[1]
        ctx.block = out[2] if len(out) > 2 else None
        ctx.save_for_backward(xc, W_enc, main[1], main[2], aux[1], aux[2])
        ctx.has_b_enc = b_enc is not None
        cols, slots = _block_outputs(ctx.block, x.device)
        ctx.mark_non_differentiable(*main[1:], *aux[1:], cols, slots)
        return (*main, *aux, cols, slots)

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_main, _i, _r, _o, _m, grad_aux, *_):
        xc, W_enc, main_idx, main_rows, aux_idx, aux_rows = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        acc = acc_dtype(xc.dtype)
        # A latent can be in both sets for a row (a dead latent firing again); its pre-activation
        # is the same entry, so the two value gradients add up. Without a gradient for x the
        # backend takes the pairs as they are (repeats add up); grad_xc needs them sorted by row,
        # which the main pairs are on their own (the aux pairs of a dense block go apart).
        if not ctx.needs_input_grad[0] or ctx.block is not None:
            block = ctx.block.shifted(0, main_idx.numel()) if ctx.block is not None else None
            grads_in = _encode_input_grads(ctx, torch.cat([grad_main, grad_aux.to(grad_main.dtype)]), xc, W_enc,
                                           torch.cat([main_idx, aux_idx]), torch.cat([main_rows, aux_rows]), block)
            return grads_in + (None, None, None, None, None)
        keys = torch.cat([main_rows.long() * d_sae + main_idx.long(), aux_rows.long() * d_sae + aux_idx.long()])
        grads = torch.cat([grad_main.to(acc), grad_aux.to(acc)])
        pairs, where = torch.unique(keys, sorted=True, return_inverse=True)
        grad_values = torch.zeros(pairs.numel(), dtype=acc, device=xc.device).index_add_(0, where, grads)
        rows, indices = (pairs // d_sae).to(torch.int32), (pairs % d_sae).to(torch.int32)
        grads_in = _encode_input_grads(ctx, grad_values.to(xc.dtype), xc, W_enc, indices, rows)
        return grads_in + (None, None, None, None, None)


# Dense blocks of codes (``saefast.backend.DenseBlock``), by the codes' values tensor: set by the
# aux-K encodes of a backend that makes them, carried by stack_rows, read by sparse_decode. Codes
# built any other way (select, _replace with new values...) simply have none.
_DENSE_BLOCKS = WeakTensorKeyDictionary()


def _with_block(acts: "SparseActs", cols: Tensor, slots: Tensor) -> "SparseActs":
    if cols.numel():
        _DENSE_BLOCKS[acts.values] = DenseBlock(0, acts.nnz, 0, acts.n_rows, cols, slots)
    return acts


class _Decode(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, values, indices, row_ids, offsets, W_dec, b_dec, block):
        impl = _backend(W_dec.device)
        ctx.save_for_backward(values, indices, row_ids, W_dec)
        ctx.has_b_dec = b_dec is not None
        ctx.block = block
        if block is not None:
            return impl.decode_forward_with_block(values, indices, offsets, row_ids, W_dec, b_dec, block)
        return impl.decode_forward(values, indices, offsets, row_ids, W_dec, b_dec)

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_out):
        values, indices, row_ids, W_dec = ctx.saved_tensors
        impl = _backend(W_dec.device)
        grad_out = grad_out.contiguous()
        need_values, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        if ctx.block is not None:
            grad_values, grad_W = impl.decode_backward_with_block(grad_out, values, indices, row_ids, W_dec,
                                                                  need_values, need_W, ctx.block)
        else:
            grad_values, grad_W = impl.decode_backward(grad_out, values, indices, row_ids, W_dec, need_values, need_W)
        grad_b = None
        if ctx.has_b_dec and ctx.needs_input_grad[5]:
            grad_b = grad_out.sum(0, dtype=acc_dtype(grad_out.dtype)).to(grad_out.dtype)
        return grad_values, None, None, None, grad_W, grad_b, None


def _encode(x, W_enc, b_dec, b_enc, mode, k, threshold) -> SparseActs:
    values, indices, row_ids, offsets, kept_min = _Encode.apply(x, W_enc, b_dec, b_enc, mode, k, threshold)
    return SparseActs(values, indices, row_ids, offsets, kept_min, W_enc.shape[1])


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------

def topk_encode(x: Tensor, W_enc: Tensor, b_dec: Tensor, k: int, *, b_enc: Optional[Tensor] = None,
                mode: str = "batch") -> SparseActs:
    """Sparse ``relu((x - b_dec) @ W_enc + b_enc)`` keeping the top entries chosen by ``mode``.

    x: [B, d_in]; W_enc: [d_in, d_sae]; b_dec: [d_in]; b_enc: [d_sae] or None; k in 1..d_sae.
    ``mode="batch"``: the B*k largest positive values of the whole batch (fewer if fewer are
    positive). ``mode="row"``: each row's k largest positive values. Ties go to the lower
    (row, latent) index (see ``saefast.selection``); zeros after the ReLU are never kept.
    """
    x, W_enc, b_dec, b_enc = _autocast(x, W_enc, b_dec, b_enc, master=W_enc)
    _check_encode_args(x, W_enc, b_dec, b_enc)
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} must be one of {_MODES}")
    k = _check_k("k", k, W_enc.shape[1])
    return _encode(x, W_enc, b_dec, b_enc, mode, k, None)


def threshold_encode(x: Tensor, W_enc: Tensor, b_dec: Tensor, threshold: Union[float, Tensor], *,
                     b_enc: Optional[Tensor] = None) -> SparseActs:
    """Sparse ``pre * (pre > threshold)`` with ``pre = relu((x - b_dec) @ W_enc + b_enc)``.

    threshold: a float, a 0-d tensor, or a [d_sae] tensor of per-latent thresholds (JumpReLU),
    held in float32. Each pre-activation, rounded to the weights' dtype, is widened exactly to
    float32 (float64 for float64 weights) and compared with the float32 threshold: a bf16/fp16
    threshold is never rounded first, so a bf16 entry equal to 1.0 passes a threshold of
    0.99999994 on every backend. Entries <= 0 are never kept.
    """
    x, W_enc, b_dec, b_enc = _autocast(x, W_enc, b_dec, b_enc, master=W_enc)
    _check_encode_args(x, W_enc, b_dec, b_enc)
    d_sae = W_enc.shape[1]
    if not isinstance(threshold, Tensor):
        threshold = torch.tensor(float(threshold))
    if threshold.dim() == 0:
        threshold = threshold.reshape(1).expand(d_sae)
    if threshold.shape != (d_sae,):
        raise ValueError(f"threshold has shape {tuple(threshold.shape)}; use a scalar or a [{d_sae}] tensor")
    if not torch.isfinite(threshold).all():
        raise ValueError("threshold contains NaN or inf")
    threshold = threshold.detach().to(device=W_enc.device, dtype=torch.float32).contiguous()
    return _encode(x, W_enc, b_dec, b_enc, "threshold", 0, threshold)


def auxk_encode(x: Tensor, W_enc: Tensor, b_dec: Tensor, dead_mask: Tensor, k_aux: int, *,
                b_enc: Optional[Tensor] = None) -> SparseActs:
    """Each row's top ``min(k_aux, n_dead)`` positive pre-activations among the latents where
    ``dead_mask`` [d_sae] (bool) is True; indices refer to the full dictionary.

    Only the dead columns of W_enc are multiplied, so the cost scales with the number of dead
    latents and no [B, d_sae] tensor is formed. With no dead latent the result is empty.
    """
    x, W_enc, b_dec, b_enc = _autocast(x, W_enc, b_dec, b_enc, master=W_enc)
    _check_encode_args(x, W_enc, b_dec, b_enc)
    d_sae = W_enc.shape[1]
    dead = _check_dead(dead_mask, d_sae, W_enc.device)
    k_aux = _check_k("k_aux", k_aux, d_sae)
    if dead.numel() == 0:
        return _empty_acts(_EmptyCodes.apply(x, W_enc, b_dec, b_enc), x.shape[0], d_sae)
    out = _AuxEncode.apply(x, W_enc, b_dec, b_enc, dead, k_aux)
    return _with_block(SparseActs(*out[:5], d_sae), *out[5:])


class _EmptyCodes(torch.autograd.Function):
    """The zero-size values of an encode that keeps nothing (no dead latent for aux-K), attached
    to the graph of (x, W_enc, b_dec, b_enc): a loss built from them backpropagates, giving zero
    gradients to the inputs that need one."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, W_enc, b_dec, b_enc):
        ctx.shapes = [(t.shape, t.dtype, t.device) if t is not None else None for t in (x, W_enc, b_dec, b_enc)]
        return W_enc.new_empty(0)

    @staticmethod
    @_autocast_off
    def backward(ctx, _grad):
        return tuple(torch.zeros(s[0], dtype=s[1], device=s[2]) if s is not None and need else None
                     for s, need in zip(ctx.shapes, ctx.needs_input_grad))


def _empty_acts(values: Tensor, n_rows: int, d_sae: int) -> SparseActs:
    """A SparseActs of ``n_rows`` rows keeping nothing, with the given zero-size ``values``."""
    dev = values.device
    return SparseActs(values, torch.empty(0, dtype=torch.int32, device=dev),
                      torch.empty(0, dtype=torch.int32, device=dev),
                      torch.zeros(n_rows + 1, dtype=torch.long, device=dev), torch.zeros((), device=dev), d_sae)


def topk_encode_with_aux(x: Tensor, W_enc: Tensor, b_dec: Tensor, k: int, dead_mask: Tensor, k_aux: int, *,
                         b_enc: Optional[Tensor] = None, mode: str = "batch",
                         exclude_fired: bool = False) -> Tuple[SparseActs, SparseActs]:
    """``(topk_encode(x, ..., k, mode=mode), auxk_encode(x, ..., dead_mask, k_aux))`` as one op.

    Same results as the two calls; the backward produces one W_enc gradient for both, which
    saves a [d_in, d_sae] buffer per step (the training path of the TopK SAEs uses this).
    ``exclude_fired=True``: the aux codes come from the latents of ``dead_mask`` that are active in
    no row of the main codes, as ``auxk_encode(x, ..., dead_mask & ~main.fired(), k_aux)`` would
    give (the dead set after counting this batch, when ``dead_mask`` holds the latents one batch
    short of dead: the BatchTopK reference code's aux-K), still from one encode pass.
    """
    x, W_enc, b_dec, b_enc = _autocast(x, W_enc, b_dec, b_enc, master=W_enc)
    _check_encode_args(x, W_enc, b_dec, b_enc)
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} must be one of {_MODES}")
    d_sae = W_enc.shape[1]
    k = _check_k("k", k, d_sae)
    dead = _check_dead(dead_mask, d_sae, W_enc.device)
    k_aux = _check_k("k_aux", k_aux, d_sae)
    if dead.numel() == 0:
        main = _encode(x, W_enc, b_dec, b_enc, mode, k, None)
        # A zero-size slice of the main values: the aux loss stays on the graph (W_enc, b_enc,
        # b_dec through the main encode) at the cost of nnz zeros in the backward.
        return main, _empty_acts(main.values[:0], x.shape[0], d_sae)
    out = _EncodeWithAux.apply(x, W_enc, b_dec, b_enc, mode, k, dead, k_aux, bool(exclude_fired))
    return SparseActs(*out[:5], d_sae), _with_block(SparseActs(*out[5:10], d_sae), *out[10:])


def stack_rows(*acts: SparseActs) -> SparseActs:
    """The rows of several SparseActs one after the other (differentiable in the values), so that
    one ``sparse_decode`` decodes them all with a single W_dec gradient."""
    if not acts or any(not isinstance(a, SparseActs) or a.d_sae != acts[0].d_sae for a in acts):
        raise ValueError("stack_rows takes SparseActs with the same d_sae")
    row_base = [0]
    for a in acts[:-1]:
        row_base.append(row_base[-1] + a.n_rows)
    offsets = [acts[0].offsets[:1]]
    nnz = 0
    for a in acts:
        offsets.append(a.offsets[1:] + nnz)
        nnz += a.nnz
    # The smallest kept value over the parts that keep something (an empty part's kept_min is 0).
    kept = [a.kept_min for a in acts if a.nnz]
    kept_min = torch.stack(kept).min() if kept else acts[0].kept_min
    out = SparseActs(
        torch.cat([a.values for a in acts]), torch.cat([a.indices for a in acts]),
        torch.cat([a.row_ids + base for a, base in zip(acts, row_base)]), torch.cat(offsets),
        kept_min, acts[0].d_sae)
    # One part's dense block, moved to where that part sits (several blocks: none is kept).
    blocks = [(i, _DENSE_BLOCKS.get(a.values)) for i, a in enumerate(acts)]
    blocks = [(i, b) for i, b in blocks if b is not None]
    if len(blocks) == 1:
        i, block = blocks[0]
        _DENSE_BLOCKS[out.values] = block.shifted(row_base[i], sum(a.nnz for a in acts[:i]))
    return out


def sparse_decode(acts: SparseActs, W_dec: Tensor, b_dec: Optional[Tensor] = None) -> Tensor:
    """``x_hat [B, d_in] = sum_j values[j] * W_dec[indices[j]] (+ b_dec)`` over each row's entries.

    W_dec: [d_sae, d_in]; b_dec: [d_in] or None. Gradients reach acts.values, W_dec and b_dec.
    """
    if not isinstance(acts, SparseActs):
        raise TypeError(f"acts must be the SparseActs returned by an encode op, got {type(acts).__name__}")
    block = _DENSE_BLOCKS.get(acts.values)
    values, W_dec, b_dec = _autocast(acts.values, W_dec, b_dec, master=W_dec)
    acts = acts._replace(values=values)
    _check_tensor("W_dec", W_dec, 2)
    if W_dec.shape[0] != acts.d_sae:
        raise ValueError(f"W_dec has {W_dec.shape[0]} rows but the activations have d_sae={acts.d_sae}; "
                         "W_dec must be [d_sae, d_in]")
    dt = _compute_dtype(acts.values, W_dec) if isinstance(acts.values, Tensor) else W_dec.dtype
    _check_tensor("acts.values", acts.values, 1, dt, W_dec.device)
    if b_dec is not None:
        _check_tensor("b_dec", b_dec, 1, dt, W_dec.device)
        if b_dec.shape[0] != W_dec.shape[1]:
            raise ValueError(f"b_dec has shape {tuple(b_dec.shape)}, expected [{W_dec.shape[1]}] (d_in)")
    _check_fp64(W_dec.device, W_dec.dtype)
    if block is not None and not hasattr(_backend(W_dec.device), "decode_forward_with_block"):
        block = None
    return _Decode.apply(acts.values, acts.indices, acts.row_ids, acts.offsets, W_dec, b_dec, block)


def _check_decoder(W_dec: Tensor, grad: Optional[Tensor], need_grad: bool) -> None:
    _check_tensor("W_dec", W_dec, 2)
    _check_fp64(W_dec.device, W_dec.dtype)
    if need_grad:
        if not isinstance(grad, Tensor):
            raise ValueError("grad is None: W_dec has no gradient yet; call loss.backward() first")
        _check_tensor("W_dec.grad", grad, 2, W_dec.dtype, W_dec.device)
        if grad.shape != W_dec.shape:
            raise ValueError(f"grad has shape {tuple(grad.shape)} but W_dec has {tuple(W_dec.shape)}")


@torch.no_grad()
def normalize_decoder_(W_dec: Tensor) -> Tensor:
    """Scale each row of W_dec [d_sae, d_in] to unit L2 norm in place; returns W_dec."""
    W = W_dec.data if isinstance(W_dec, torch.nn.Parameter) else W_dec
    _check_decoder(W, None, False)
    _backend(W.device).normalize_decoder_(W)
    return W_dec


@torch.no_grad()
def project_decoder_grad_(W_dec: Tensor, grad: Tensor) -> Tensor:
    """Remove in place from each row of ``grad`` its component along that row of W_dec."""
    W = W_dec.data if isinstance(W_dec, torch.nn.Parameter) else W_dec
    _check_decoder(W, grad, True)
    _backend(W.device).project_decoder_grad_(W, grad)
    return grad


@torch.no_grad()
def normalize_decoder_and_project_grad_(W_dec: Tensor, grad: Tensor) -> None:
    """Rows of W_dec to unit norm, then ``grad`` made orthogonal to them: one pass over both
    (the BatchTopK reference code's ``make_decoder_weights_and_grad_unit_norm``)."""
    W = W_dec.data if isinstance(W_dec, torch.nn.Parameter) else W_dec
    _check_decoder(W, grad, True)
    _backend(W.device).normalize_decoder_and_project_grad_(W, grad)


def has_fused_decoder_adam(W_dec: Tensor) -> bool:
    """Whether the backend for W_dec's device runs :func:`decoder_adam_` (optional in the
    backend contract: the Triton backend has it)."""
    return (isinstance(W_dec, Tensor) and W_dec.dtype in _FLOAT_DTYPES
            and hasattr(_backend(W_dec.device), "decoder_adam_"))


@torch.no_grad()
def decoder_adam_(W_dec: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step_size: float,
                  beta1: float, beta2: float, eps: float, bias_correction2_sqrt: float, project: bool = True,
                  normalize: bool = True) -> None:
    """One Adam step of the decoder W_dec [d_sae, d_in] in place, fused with the decoder's norm
    maintenance: ``grad`` projected off each row (``project``), Adam's update with the moments
    ``exp_avg``/``exp_avg_sq`` (updated in place; ``step_size = lr / (1 - beta1**step)``), rows
    renormalised (``normalize``). ``grad`` is not modified. Needs :func:`has_fused_decoder_adam`;
    :class:`saefast.optim.SAEAdam` calls this."""
    W = W_dec.data if isinstance(W_dec, torch.nn.Parameter) else W_dec
    _check_decoder(W, grad, True)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_tensor(name, t, 2, W.dtype, W.device)
        if t.shape != W.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but W_dec has {tuple(W.shape)}")
    impl = _backend(W.device)
    if not hasattr(impl, "decoder_adam_"):
        raise RuntimeError(f"the {backend_name(W.device)} backend has no fused decoder Adam; use "
                           "saefast.optim.SAEAdam, which runs the parts one after the other there")
    impl.decoder_adam_(W, grad, exp_avg, exp_avg_sq, step_size=step_size, beta1=beta1, beta2=beta2, eps=eps,
                       bias_correction2_sqrt=bias_correction2_sqrt, project=project, normalize=normalize)


# ----------------------------------------------------------------------------------------------
# JumpReLU: straight-through estimators over sparse entries
# ----------------------------------------------------------------------------------------------

def above_threshold(z: Tensor, theta: Tensor) -> Tensor:
    """``z > theta`` with the ops' threshold rule: z (any float dtype) widened exactly to float32
    (float64 for float64) against the float32 threshold, never the threshold rounded to z's dtype."""
    acc = acc_dtype(z.dtype)
    return z.to(acc) > theta.to(acc)


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).float()


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * above_threshold(z, theta)

    @staticmethod
    @_autocast_off
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = g * above_threshold(z, theta)
        grad_theta = -(theta / eps) * _rectangle((z.float() - theta) / eps) * g.float()
        return grad_z, grad_theta, None


class _JumpReLUStep(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return above_threshold(z, theta).float()

    @staticmethod
    @_autocast_off
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, -(1.0 / eps) * _rectangle((z.float() - theta) / eps) * g.float(), None


def jumprelu(z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """``z * (z > theta)`` over sparse entries, z and theta [nnz] (theta: each entry's latent
    threshold, float32). Backward: ``dz = (z > theta) * g`` and the straight-through estimator
    ``dtheta = -(theta / bandwidth) * rect((z - theta) / bandwidth) * g`` (rect: 1 on (-1/2, 1/2))."""
    return _JumpReLU.apply(z, theta, bandwidth)


def jumprelu_step(z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """``(z > theta)`` as float32 [nnz] (each entry's contribution to L0); gradient to theta only:
    ``-(1 / bandwidth) * rect((z - theta) / bandwidth) * g``."""
    return _JumpReLUStep.apply(z, theta, bandwidth)
