"""The backend contract: what ``saefast.ops`` asks of a backend.

Two backends implement it, as modules with these seven functions:

* ``saefast.torch_backend``: PyTorch, every device; the semantics of record and the CPU path.
* ``saefast.triton_backend``: the Triton kernels of ``saefast.kernels``; CUDA tensors (or the
  CPU under ``TRITON_INTERPRET=1``), float32/bfloat16/float16.

``saefast.ops`` picks one per call (``ops.backend_name``: CUDA -> Triton, anything else ->
PyTorch, ``SAEFAST_BACKEND=torch|triton`` forces one), checks every argument at the public
boundary and owns the autograd Functions. A backend computes values and gradients with plain
tensors (no autograd graph, arguments already checked and contiguous) and uses only this module,
``saefast.selection`` and its own code: no backend calls into another's private functions.

Notation: B rows (tokens), d_in input width, d_sae latents, nnz kept (row, latent) pairs.
Floating inputs of one call share a dtype (float32, bfloat16, float16; float64 on the PyTorch
backend only); sums accumulate in :func:`acc_dtype`.

**Codes** (:data:`EncodeOut`): ``(values [nnz] dtype, indices [nnz] int32 latent ids,
row_ids [nnz] int32, offsets [B + 1] int64 CSR row offsets, kept_min fp32 0-d)``, sorted by
(row, latent) without repeats, every value > 0; ``kept_min`` is the smallest kept value (0 when
nothing is kept). :func:`saefast.selection.finish_codes` builds them from unsorted entries.

Functions (every backend, same signatures):

``encode_forward(xc, W_enc, b_enc, *, mode, k=0, threshold=None) -> EncodeOut``
    ``pre = xc @ W_enc (+ b_enc)`` with xc [B, d_in] (``x - b_dec``), W_enc [d_in, d_sae],
    b_enc [d_sae] or None, rounded to the dtype; keeps positive entries of ``pre``:
    ``mode="batch"`` the B*k largest of the whole batch, ``"row"`` the k largest of each row,
    ``"threshold"`` those with ``pre`` widened to fp32 (fp64 for fp64) ``> threshold`` (fp32
    [d_sae]). Exact: the selected set is that of the dense matrix, ties going to the lower flat
    index ``row * d_sae + latent`` (``saefast.selection``), so both backends select the same
    set; values agree up to the GEMM's summation order. Never holds the whole [B, d_sae] matrix.

``encode_backward(grad_values, xc, W_enc, indices, row_ids, need_xc, need_W) -> (grad_xc, grad_W_enc, lat_sum)``
    With S [B, d_sae] the sparse matrix of ``grad_values`` at the kept pairs: ``grad_xc = S @
    W_enc.T`` [B, d_in] (None unless ``need_xc``), ``grad_W_enc = xc.T @ S`` [d_in, d_sae]
    (None unless ``need_W``), and ``lat_sum`` [d_sae] in acc_dtype, the per-latent sum of
    ``grad_values`` (b_enc's gradient). O(nnz * d_in) work; deterministic. A pair may appear
    more than once (its gradients add up); with ``need_xc`` the pairs are sorted by row, else
    they come in any order.

``decode_forward(values, indices, offsets, row_ids, W_dec, b_dec) -> x_hat``
    ``x_hat[r] = sum over row r's pairs of values * W_dec[latent] (+ b_dec)``, [B, d_in] in
    W_dec's dtype; W_dec [d_sae, d_in], b_dec [d_in] or None.

``decode_backward(grad_out, values, indices, row_ids, W_dec, need_values, need_W) -> (grad_values, grad_W_dec)``
    ``grad_values[j] = grad_out[row_j] . W_dec[latent_j]`` [nnz] and ``grad_W_dec = S.T @
    grad_out`` [d_sae, d_in] (S the sparse matrix of values), each None unless asked for.

``normalize_decoder_(W_dec)``, ``project_decoder_grad_(W_dec, grad)``, ``normalize_decoder_and_project_grad_(W_dec, grad)``
    In place, per row of W_dec [d_sae, d_in]: scale to unit norm (norms at least
    :data:`NORM_EPS`; a zero row stays zero); remove from ``grad`` its component along the row
    (``grad -= (grad . W) / |W|^2 * W``, using the row before normalisation).

Optional functions (``saefast.ops`` uses each where a backend has it, and otherwise the
seven above):

``encode_forward_with_aux(xc, W_enc, b_enc, *, mode, k, dead, k_aux, exclude_fired=False) -> (EncodeOut, EncodeOut)``
    The main codes (``encode_forward``, mode "batch" or "row") and the aux-K codes: each row's
    ``min(k_aux, n_dead)`` largest positive entries among the latents ``dead`` (int64,
    increasing), indices into the whole dictionary; same results as the two separate calls.
    With ``exclude_fired`` the aux codes are chosen among ``unfired(dead, main indices)``: the
    dead latents that no row of the main codes uses (the dead set after counting this batch's
    firing, when ``dead`` holds the latents one batch short of dead). The parameter is optional:
    ``saefast.ops`` asks a backend whose function lacks it for the main codes alone and selects
    the aux codes among the unfired dead latents with ``aux_codes_by_copy``.

    A backend may also return a third element, a :class:`DenseBlock` for the aux codes (all of
    them, rows 0..B-1): ``saefast.ops`` then hands it to the ``*_with_block`` functions below
    whenever those codes (alone, or stacked with ``stack_rows``) are decoded or backpropagated.

``decode_forward_with_block(values, indices, offsets, row_ids, W_dec, b_dec, block)``,
``decode_backward_with_block(grad_out, values, indices, row_ids, W_dec, need_values, need_W, block)``,
``encode_backward_with_block(grad_values, xc, W_enc, indices, row_ids, need_xc, need_W, block)``
    The same results as the functions without ``block``, for codes some of whose entries form a
    :class:`DenseBlock` (which the backend may compute as dense products over its columns).

``weight_matvec(W, v, dtype) -> [R] fp32``
    ``W @ v`` for W [R, C], v [C] fp32, each element of W rounded to ``dtype`` first (the b_dec
    gradient ``-W_enc @ lat_sum`` with fp32 master weights under autocast); without it ``ops``
    uses :func:`matvec_acc`.

``decoder_adam_(W_dec, grad, exp_avg, exp_avg_sq, *, step_size, beta1, beta2, eps, bias_correction2_sqrt, project, normalize)``
    One Adam step of the decoder in place, fused with the projection of ``grad`` off each row
    (before) and the renormalisation of the rows (after); ``grad`` is left unchanged
    (``saefast.kernels.adam`` states the update). ``saefast.optim.SAEAdam`` uses it where present
    and otherwise runs the projection, torch's Adam and the renormalisation one after the other.

Master weights: a backend with ``READS_MASTER_WEIGHTS = True`` (the Triton backend) also takes
float32 W_enc / W_dec with 16-bit activations (xc, values, grad_out): the arguments
``saefast.ops`` passes under ``torch.autocast`` with fp32 parameters. Each weight element is
rounded to the activations' dtype as it is read, results are in the activations' dtype, and weight
gradients are float32 tensors holding the values of the 16-bit gradients: the numbers of 16-bit
copies of the weights, without making the copies.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Tuple

import torch
from torch import Tensor

__all__ = ["Backend", "BACKEND_FUNCTIONS", "DenseBlock", "EncodeOut", "NORM_EPS", "acc_dtype", "aux_codes_by_copy",
           "matvec_acc", "unfired"]

NORM_EPS = 1e-12
BACKEND_FUNCTIONS = ("encode_forward", "encode_backward", "decode_forward", "decode_backward",
                     "normalize_decoder_", "project_decoder_grad_", "normalize_decoder_and_project_grad_")

EncodeOut = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


class DenseBlock(NamedTuple):
    """Entries ``entry0 .. entry1 - 1`` of a set of codes lie in rows ``row0 .. row1 - 1`` and in
    the columns ``cols`` (int64 [n_cols], increasing); ``slots`` (int32 [entry1 - entry0]) is each
    entry's position in ``cols``. Made for the aux-K codes (k_aux per row among the dead latents:
    dense enough that products over all dead columns beat per-entry gathers). When a decode is
    handed a block, rows row0 .. row1 - 1 hold no other entries."""

    entry0: int
    entry1: int
    row0: int
    row1: int
    cols: Tensor
    slots: Tensor

    def shifted(self, rows: int, entries: int) -> "DenseBlock":
        """The same block in codes with ``rows`` rows and ``entries`` entries placed before it."""
        return self._replace(entry0=self.entry0 + entries, entry1=self.entry1 + entries,
                             row0=self.row0 + rows, row1=self.row1 + rows)


class Backend(Protocol):
    """The seven functions of the contract (see the module docstring)."""

    def encode_forward(self, xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], *, mode: str, k: int = 0,
                       threshold: Optional[Tensor] = None) -> EncodeOut: ...

    def encode_backward(self, grad_values: Tensor, xc: Tensor, W_enc: Tensor, indices: Tensor, row_ids: Tensor,
                        need_xc: bool, need_W: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]: ...

    def decode_forward(self, values: Tensor, indices: Tensor, offsets: Tensor, row_ids: Tensor, W_dec: Tensor,
                       b_dec: Optional[Tensor]) -> Tensor: ...

    def decode_backward(self, grad_out: Tensor, values: Tensor, indices: Tensor, row_ids: Tensor, W_dec: Tensor,
                        need_values: bool, need_W: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]: ...

    def normalize_decoder_(self, W_dec: Tensor) -> None: ...

    def project_decoder_grad_(self, W_dec: Tensor, grad: Tensor) -> None: ...

    def normalize_decoder_and_project_grad_(self, W_dec: Tensor, grad: Tensor) -> None: ...


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matvec_acc(W: Tensor, v: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """``W @ v`` for W [n, m] accumulated in :func:`acc_dtype`, over column chunks so that no
    full-precision copy of W is made."""
    acc = acc_dtype(W.dtype)
    out = torch.zeros(W.shape[0], dtype=acc, device=W.device)
    v = v.to(acc)
    step = max(1, chunk_elements // max(W.shape[0], 1))
    for s in range(0, W.shape[1], step):
        out += W[:, s:s + step].to(acc) @ v[s:s + step]
    return out


def aux_codes_by_copy(encode_forward, xc: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], dead: Tensor,
                      k_aux: int) -> EncodeOut:
    """The aux-K codes through a backend's ``encode_forward``: a row encode of a forward-only copy
    of the dead columns (so its GEMM costs n_dead / d_sae of the full one), indices mapped back to
    the whole dictionary. dead: int64 [n_dead], increasing (empty: no codes)."""
    if dead.numel() == 0:
        dev = xc.device
        no_int = torch.empty(0, dtype=torch.int32, device=dev)
        return (torch.empty(0, dtype=xc.dtype, device=dev), no_int, no_int.clone(),
                torch.zeros(xc.shape[0] + 1, dtype=torch.long, device=dev), torch.zeros((), device=dev))
    W_dead = W_enc.index_select(1, dead)
    b_dead = b_enc.index_select(0, dead) if b_enc is not None else None
    values, indices, row_ids, offsets, kept_min = encode_forward(xc, W_dead, b_dead, mode="row",
                                                                 k=min(k_aux, dead.numel()))
    # dead is increasing, so mapping indices keeps the (row, latent) order.
    return values, dead[indices.long()].to(torch.int32), row_ids, offsets, kept_min


def unfired(dead: Tensor, fired_indices: Tensor) -> Tensor:
    """The entries of ``dead`` (int64 latent ids, increasing) that are not in ``fired_indices``
    (the latent ids of some codes), order kept."""
    if dead.numel() == 0 or fired_indices.numel() == 0:
        return dead
    return dead[~torch.isin(dead, fired_indices.long())]
