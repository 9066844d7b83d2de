"""The ReLU SAE: every positive pre-activation, with an L1 penalty."""
from __future__ import annotations

from torch import Tensor

from .. import ops
from ..ops import SparseActs
from .base import BaseSAE

__all__ = ["VanillaSAE"]


class VanillaSAE(BaseSAE):
    """ReLU SAE with an L1 penalty: l1_coefficient * mean over tokens of sum |activations|."""

    architecture = "relu"
    aliases = ("vanilla", "standard")
    saelens_architecture = "standard"
    reads_saelens = ("standard",)
    reference_name = "vanilla"
    summary = "every positive activation (ReLU) with an L1 penalty"

    def _encode(self, x_in: Tensor) -> SparseActs:
        return ops.threshold_encode(x_in, self.W_enc, self._b_dec_in(), 0.0, b_enc=self._b_enc_in())

    def _sparsity_loss(self, acts: SparseActs) -> Tensor:
        return self.config.l1_coefficient * acts.values.float().abs().sum() / max(acts.n_rows, 1)
