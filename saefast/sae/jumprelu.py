"""The JumpReLU SAE: a learned threshold per latent, trained through a straight-through estimator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch
from torch import Tensor, nn

from .. import ops
from ..config import SAEConfig, option
from ..ops import SparseActs
from ..utils import check_finite
from .base import BaseSAE, Codes, SavedExtras

__all__ = ["JumpReLUSAE", "JumpReLUConfig"]


@dataclass
class JumpReLUConfig(SAEConfig):
    """SAEConfig with JumpReLU's own options."""

    jumprelu_init_threshold: float = option(1e-3, "JumpReLU: initial per-latent threshold (>= 0).")
    jumprelu_bandwidth: float = option(1e-3, "JumpReLU: width of the straight-through rectangle kernel (> 0).")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_number("jumprelu_bandwidth", above=0.0)
        self._check_number("jumprelu_init_threshold", minimum=0.0)


class JumpReLUSAE(BaseSAE):
    """JumpReLU SAE (Rajamanoharan et al. 2024): keeps ``pre > threshold`` per latent.

    ``threshold`` [d_sae] is an fp32 parameter (SAELens' layout), clamped at 0 before each
    training forward. Its gradient comes from a straight-through estimator with a rectangle kernel
    of width ``jumprelu_bandwidth``, both through the reconstruction and through the L0 penalty
    ``l1_coefficient * mean over tokens of #active``. Only entries with pre > threshold - bandwidth/2
    (and pre > 0) can get an estimator gradient, so only those are gathered: sparse throughout.
    """

    architecture = "jumprelu"
    config_class = JumpReLUConfig
    extra_parameters = {"threshold": ("d_sae",)}
    fp32_state = ("threshold",)
    saelens_architecture = "jumprelu"
    reads_saelens = ("jumprelu",)
    summary = "a learned threshold per latent (JumpReLU) with an L0 penalty"

    def _init_variant(self, device: torch.device) -> None:
        self.threshold = nn.Parameter(torch.full((self.d_sae,), float(self.config.jumprelu_init_threshold),
                                                 dtype=torch.float32, device=device))

    def _encode(self, x_in: Tensor) -> SparseActs:
        return ops.threshold_encode(x_in, self.W_enc, self._b_dec_in(), self.threshold, b_enc=self._b_enc_in())

    def _sparsity_loss(self, acts: SparseActs) -> Tensor:
        return torch.tensor(self.config.l1_coefficient * acts.nnz / max(acts.n_rows, 1), device=self.device)

    def _encode_train(self, x_in: Tensor) -> Codes:
        eps = self.config.jumprelu_bandwidth
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)
        band = ops.threshold_encode(x_in, self.W_enc, self._b_dec_in(), self.threshold.detach() - eps / 2,
                                    b_enc=self._b_enc_in())
        theta = self.threshold[band.indices.long()]
        values = ops.jumprelu(band.values, theta, eps)
        l0 = ops.jumprelu_step(band.values.detach(), theta, eps).sum() / max(band.n_rows, 1)
        decode_acts = band._replace(values=values)
        acts = decode_acts.select(ops.above_threshold(band.values, theta.detach()))
        return Codes(decode_acts, acts, self.config.l1_coefficient * l0)

    def _fold_threshold(self, scale: float) -> None:
        self.threshold.div_(scale)

    def saelens_export(self) -> SavedExtras:
        # SAELens holds the threshold in the weights' dtype; the fp32 value goes to saefast's state.
        threshold = self.threshold.detach().to("cpu")
        return SavedExtras(weights={"threshold": threshold.to(self.dtype)}, state={"threshold": threshold})

    def saelens_import(self, weights: Dict[str, Tensor], state: Dict[str, Tensor], section: Dict[str, Any],
                       where: str) -> None:
        if "threshold" in state:  # the fp32 threshold, where the weights file holds it rounded
            threshold = state["threshold"]
            if tuple(threshold.shape) != (self.d_sae,):
                raise ValueError(f"{where}: threshold has shape {tuple(threshold.shape)}, expected [{self.d_sae}]")
            check_finite(where, "threshold", threshold)
            with torch.no_grad():
                self.threshold.copy_(threshold.float())
