"""Matryoshka BatchTopK: one BatchTopK dictionary whose nested prefixes each reconstruct on their own.

Notation: B tokens, d_sae latents, G prefixes ``p_1 < p_2 < ... < p_G = d_sae`` (prefix g holds
latents ``0 .. p_g - 1``). One BatchTopK encode over all latents gives the active pairs, sorted by
(row, latent); the reconstruction of prefix g is ``b_dec + sum of value * W_dec[latent]`` over the
row's pairs with ``latent < p_g``. The training loss is

    recon_loss = mean over g of mean((x_hat_g - x)^2)        (each MSE as BaseSAE's mse_loss)

so the loss keeps the scale of a BatchTopK SAE's whatever G is (a learning rate or aux_penalty
tuned for BatchTopK carries over); SAELens's ``matryoshka_batchtopk`` instead adds the prefix
losses up, each summed over d_in. The aux-K loss is BatchTopK's (the top_k_aux dead latents
reconstruct the residual of the whole dictionary). At inference it is a BatchTopK SAE: the
learned global threshold, saved for SAELens as a JumpReLU SAE.

Sparse end to end: the active pairs are split by prefix group (latents ``p_{g-1} .. p_g - 1``)
into G stacked blocks of B rows, one ``sparse_decode`` decodes all of them (and the aux-K codes)
with a single W_dec gradient, and a cumulative sum over groups gives the G nested
reconstructions. Cost beyond BatchTopK: G * B * d_in for the partial reconstructions, never a
[B, d_sae] tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from ..config import option
from ..ops import SparseActs
from ..selection import csr_offsets
from .base import Codes
from .topk import BatchTopKConfig, BatchTopKSAE

__all__ = ["MatryoshkaBatchTopKSAE", "MatryoshkaBatchTopKConfig", "default_prefixes"]

DEFAULT_GROUPS = 4


def default_prefixes(d_sae: int, groups: Optional[int] = None) -> Tuple[int, ...]:
    """G nested prefix sizes, each twice the one before and the last d_sae:
    ``d_sae // 2**(G-1), ..., d_sae // 2, d_sae``. ``groups=None``: G = 4, or fewer when d_sae
    is too small for four distinct sizes."""
    if groups is None:
        groups = min(DEFAULT_GROUPS, 1 + int(math.log2(d_sae)))
    return tuple(d_sae // 2 ** (groups - 1 - g) for g in range(groups))


@dataclass
class MatryoshkaBatchTopKConfig(BatchTopKConfig):
    """BatchTopKConfig with the nested prefixes of a Matryoshka SAE."""

    matryoshka_prefixes: List[int] = option(
        lambda: [], "Matryoshka: nested prefix sizes, strictly increasing, the last = d_sae (e.g. 128 512 2048 "
                    "8192); prefix p holds latents 0..p-1 and reconstructs on its own. Empty: see matryoshka_groups.")
    matryoshka_groups: Optional[int] = option(
        None, "Matryoshka: with no matryoshka_prefixes, this many prefixes, each twice the one before, the last "
              "d_sae (d_sae/2^(G-1), ..., d_sae/2, d_sae). Default: 4 (fewer when d_sae < 8).")

    def __post_init__(self) -> None:
        super().__post_init__()
        prefixes, groups = self.matryoshka_prefixes, self.matryoshka_groups
        if isinstance(prefixes, tuple):
            self.matryoshka_prefixes = prefixes = list(prefixes)
        if not isinstance(prefixes, list) or any(isinstance(p, bool) or not isinstance(p, int) for p in prefixes):
            raise TypeError(f"matryoshka_prefixes={prefixes!r} must be a list of ints (prefix sizes)")
        if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int)):
            raise TypeError(f"matryoshka_groups={groups!r} must be an int or None")
        if prefixes and groups is not None:
            raise ValueError(f"give matryoshka_prefixes={prefixes} or matryoshka_groups={groups}, not both")
        if prefixes:
            if prefixes[0] < 1 or any(b <= a for a, b in zip(prefixes, prefixes[1:])):
                raise ValueError(f"matryoshka_prefixes={prefixes} must be positive and strictly increasing (each "
                                 "prefix adds latents to the one before)")
            if prefixes[-1] != self.d_sae:
                raise ValueError(f"matryoshka_prefixes={prefixes} must end with d_sae={self.d_sae} (the whole "
                                 f"dictionary is the last prefix); append {self.d_sae}")
        elif groups is not None:
            if groups < 1:
                raise ValueError(f"matryoshka_groups={groups} must be >= 1")
            if self.d_sae < 2 ** (groups - 1):
                raise ValueError(f"matryoshka_groups={groups} halves d_sae={self.d_sae} {groups - 1} times, which "
                                 f"leaves an empty first prefix; use at most {1 + int(math.log2(self.d_sae))} groups "
                                 "or give matryoshka_prefixes")

    @property
    def prefix_sizes(self) -> Tuple[int, ...]:
        """The nested prefix sizes in use (``matryoshka_prefixes``, or those of ``matryoshka_groups``)."""
        if self.matryoshka_prefixes:
            return tuple(self.matryoshka_prefixes)
        return default_prefixes(self.d_sae, self.matryoshka_groups)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025): BatchTopK whose prefixes of latents
    (``config.prefix_sizes``) each reconstruct the input; the loss is the mean of their MSEs
    (see the module docstring). Early latents learn general features, later ones refine them.

    ``training_forward`` adds ``prefix_mse`` (fp32 [G], the MSE of each prefix's reconstruction;
    ``recon_loss`` is its mean and ``mse_loss`` its last entry, the whole dictionary's).
    ``decode_prefixes(acts)`` gives every prefix's reconstruction. Inference, saving and loading
    are BatchTopK's (a JumpReLU SAE with the global threshold for SAELens); SAELens training
    checkpoints (``architecture: "matryoshka_batchtopk"``) load too.
    """

    architecture = "matryoshka_batchtopk"
    aliases = ("matryoshka",)
    config_class = MatryoshkaBatchTopKConfig
    reads_saelens = ("matryoshka_batchtopk",)
    reference_name = None
    saebench_architecture = "matryoshka_batch_topk"
    summary = "BatchTopK whose nested prefixes of latents each reconstruct the input (Matryoshka)"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prefixes={list(self.config.prefix_sizes)}"

    # ------------------------------------------------------------------------------------------
    # Nested reconstructions from the sparse pairs
    # ------------------------------------------------------------------------------------------

    def _group_blocks(self, acts: SparseActs) -> SparseActs:
        """The pairs of ``acts`` (B rows) regrouped as G blocks of B rows: block g row r holds row
        r's pairs with latents in ``[p_{g-1}, p_g)``, in latent order (differentiable in the values)."""
        prefixes = self.config.prefix_sizes
        n = acts.n_rows
        bounds = torch.tensor(prefixes[:-1], dtype=acts.indices.dtype, device=acts.indices.device)
        group = torch.bucketize(acts.indices, bounds, right=True)
        # Pairs are sorted by (row, latent) and groups are latent ranges: a stable sort by group
        # gives (group, row, latent) order.
        group, order = torch.sort(group, stable=True)
        row_ids = (group * n + acts.row_ids[order].long()).to(torch.int32)
        return SparseActs(acts.values[order], acts.indices[order], row_ids, csr_offsets(row_ids, n * len(prefixes)),
                          acts.kept_min, acts.d_sae)

    def _nested(self, group_recon: Tensor, n: int, x_in: Optional[Tensor] = None) -> Tensor:
        """[G, n, d_out] prefix reconstructions (fp32, b_dec added, and a transcoder's skip
        connection ``x_in @ W_skip``) from the G stacked group decodes (d_out = d_in for an SAE)."""
        partial = group_recon.float().reshape(len(self.config.prefix_sizes), n, self.d_out)
        nested = partial.cumsum(0) + self.b_dec.float()
        if self.config.skip_connection:
            nested = nested + (x_in @ self.W_skip).float()
        return nested

    def decode_prefixes(self, acts: SparseActs, x: Optional[Tensor] = None) -> Tensor:
        """[G, B, d_out]: entry g is the reconstruction (a transcoder: the output) from prefix g
        alone (latents below ``prefix_sizes[g]``), in the SAE's dtype; the last is
        ``decode_sparse(acts, x)``. With input_unit_norm or a skip connection pass the input x
        that was encoded."""
        if not isinstance(acts, SparseActs):
            raise TypeError(f"acts must be a SparseActs (from encode_sparse), got {type(acts).__name__}")
        if acts.d_sae != self.d_sae:
            raise ValueError(f"acts have d_sae={acts.d_sae} but this SAE has d_sae={self.d_sae}")
        x_in, mean, std = self._decode_inputs(x)
        nested = self._nested(ops.sparse_decode(self._group_blocks(acts), self.W_dec), acts.n_rows, x_in)
        return self._unstandardize(nested.to(self.dtype), mean, std)

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    def _training_losses(self, x_in: Tensor, y_in: Tensor, dead: Tensor) -> Tuple[Codes, Tensor, Dict[str, Tensor]]:
        c = self.config
        n = x_in.shape[0]
        aux_acts = None
        if self._trains_aux_k() and bool(dead.any()):
            acts, aux_acts = ops.topk_encode_with_aux(x_in, self.W_enc, self._b_dec_in(), c.top_k, dead, c.top_k_aux,
                                                      b_enc=self._b_enc_in(), mode="batch")
            codes = Codes(acts, acts, self._sparsity_loss(acts))
        else:
            codes = self._codes(x_in)
        blocks = self._group_blocks(codes.decode_acts)
        # One decode for every group (and the aux-K codes): one W_dec gradient buffer.
        decoded = ops.sparse_decode(blocks if aux_acts is None else ops.stack_rows(blocks, aux_acts), self.W_dec)
        n_groups = len(c.prefix_sizes)
        nested = self._nested(decoded[:n_groups * n], n, x_in)
        prefix_mse = (nested - y_in.float()).pow(2).mean(dim=(1, 2))
        x_hat = nested[-1].to(x_in.dtype)
        residual = (y_in - x_hat).detach()
        if aux_acts is not None:
            aux_loss = self._aux_penalty(decoded[n_groups * n:], residual)
        else:
            aux_loss = self._aux_loss(x_in, residual, dead)
        return codes, x_hat, {"recon_loss": prefix_mse.mean(), "mse_loss": prefix_mse[-1], "aux_loss": aux_loss,
                              "prefix_mse": prefix_mse}

    # ------------------------------------------------------------------------------------------
    # SAELens training checkpoints
    # ------------------------------------------------------------------------------------------

    @classmethod
    def saelens_config_values(cls, cfg: Dict[str, Any], where: str) -> Dict[str, Any]:
        values = super().saelens_config_values(cfg, where)
        widths = cfg.get("matryoshka_widths")
        if not isinstance(widths, list) or not widths:
            raise ValueError(f"{where}: a matryoshka_batchtopk cfg.json needs matryoshka_widths (the prefix sizes)")
        if widths[-1] != cfg["d_sae"]:
            widths = widths + [cfg["d_sae"]]  # SAELens adds the whole dictionary as the last level
        values["matryoshka_prefixes"] = list(widths)
        return values
