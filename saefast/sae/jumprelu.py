"""The JumpReLU SAE: a learned threshold per latent, trained through a straight-through estimator.

Notation: N tokens, ``h = (x - b_dec) @ W_enc + b_enc`` the pre-activations, ``theta [d_sae]``
the thresholds (clamped at 0 before each training forward), ``a = h * (h > theta)`` the
activations, ``n_i = ||W_dec[i]||`` (1 for saefast's unit decoder rows; not differentiated),
``eps`` the bandwidth. Training loss::

    loss = mse_loss + sparsity_loss + aux_loss
    S = mean_tokens sum_i [a_i > 0]                      (jumprelu_sparsity_loss="step": the L0)
      = mean_tokens sum_i tanh(c * a_i * n_i)            ("tanh", c = jumprelu_tanh_scale)
    sparsity_loss = l1_coefficient * S                   (no jumprelu_target_l0)
                  = price * (S / target - 1)             (jumprelu_target_l0=target, price adapts)
    aux_loss = jumprelu_pre_act_coefficient * mean_tokens sum_i relu(theta_i - h_i) * n_i

Thresholds learn through the straight-through estimators of Rajamanoharan et al. (2024), with a
rectangle kernel of width eps: ``d a / d theta = -(theta / eps) * rect((h - theta) / eps)`` and
``d [a > 0] / d theta = -(1 / eps) * rect((h - theta) / eps)``; the activations pass gradients to
h where ``h > theta``. The tanh measure (a smooth count whose gradient also shrinks the
activations) and the pre-activation loss (which pulls latents that rarely fire up to their
thresholds, so fewer die) are those of Anthropic's January 2025 JumpReLU update.

**L0 target.** With ``jumprelu_target_l0`` the penalty's price adapts instead of being fixed: it
starts at l1_coefficient and is a trained scalar (``l0_price``, price = exp(10 * l0_price)) whose
gradient points uphill, so it rises while the L0 (the mean number of active latents per token,
whichever measure S is) is above the target and falls while it is below: dual ascent on the
constraint L0 = target. Adam moves l0_price by about lr per step: log(price) by about 10 * lr.
The reached L0 follows the target when the target is below what reconstruction alone would use; a
target above that is not forced (the price falls towards 0). ``sparsity_loss`` is negative while
S is below the target.

Sparse throughout: only entries with ``h > theta - eps/2`` (and h > 0) can get an estimator
gradient, so only those are gathered (``threshold_encode`` at the lowered threshold). The
pre-activation loss sums relu(theta - h) over every (token, latent) pair as, per latent,
``N * theta_i - sum_r h_ri + sum over its active pairs of (h - theta_i)``: one [d_in] x [d_in, d_sae]
product for the column sums plus the active pairs, never a [N, d_sae] tensor (its W_enc gradient
is one dense rank-one [d_in, d_sae] term, an extra W_enc-sized buffer while it is enabled).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..config import SAEConfig, option
from ..ops import SparseActs
from ..utils import check_finite
from .base import BaseSAE, Codes, SavedExtras

__all__ = ["JumpReLUSAE", "JumpReLUConfig", "SPARSITY_LOSSES"]

SPARSITY_LOSSES = ("step", "tanh")


@dataclass
class JumpReLUConfig(SAEConfig):
    """SAEConfig with JumpReLU's own options."""

    jumprelu_init_threshold: float = option(1e-3, "JumpReLU: initial per-latent threshold (>= 0).")
    jumprelu_bandwidth: float = option(1e-3, "JumpReLU: width of the straight-through rectangle kernel (> 0); "
                                             "thresholds get gradients from pre-activations within half of it.")
    jumprelu_sparsity_loss: str = option(
        "step", "JumpReLU: the per-token sparsity measure S penalised: 'step' (the number of active latents, L0) "
                "or 'tanh' (sum of tanh(jumprelu_tanh_scale * activation * decoder norm), a smooth count whose "
                "gradient also shrinks the activations).")
    jumprelu_tanh_scale: float = option(4.0, "JumpReLU: c in the 'tanh' sparsity measure tanh(c * a * ||W_dec row||).")
    jumprelu_target_l0: Optional[float] = option(
        None, "JumpReLU: aim at this mean number of active latents per token (L0): the penalty becomes price * "
              "(S / target - 1), its price starting at l1_coefficient and rising while the L0 is above the target, "
              "falling while below. None: the fixed penalty l1_coefficient * S.")
    jumprelu_pre_act_coefficient: float = option(
        0.0, "JumpReLU: weight of the pre-activation loss mean_tokens sum_latents relu(threshold - pre) * ||W_dec row|| "
             "(the aux_loss), which pulls latents that rarely fire up to their thresholds; 0 disables it.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_number("jumprelu_bandwidth", above=0.0)
        self._check_number("jumprelu_init_threshold", minimum=0.0)
        self._check_number("jumprelu_tanh_scale", above=0.0)
        self._check_number("jumprelu_pre_act_coefficient", minimum=0.0)
        if self.jumprelu_sparsity_loss not in SPARSITY_LOSSES:
            raise ValueError(f"jumprelu_sparsity_loss={self.jumprelu_sparsity_loss!r} must be one of {SPARSITY_LOSSES}")
        if self.jumprelu_target_l0 is not None:
            self._check_number("jumprelu_target_l0", above=0.0, at_most=float(self.d_sae))
            if not self.l1_coefficient > 0:
                raise ValueError(f"jumprelu_target_l0={self.jumprelu_target_l0} starts its adaptive price at "
                                 f"l1_coefficient, which is {self.l1_coefficient}; set l1_coefficient > 0 (e.g. 1e-3)")


# The L0 target's price is exp(PRICE_RATE * u) for the trained scalar u = l0_price: Adam moves u by
# about lr per step, so log(price) moves by about PRICE_RATE * lr (3% a step at lr 3e-3).
PRICE_RATE = 10.0
# u's gradient is -PRICE_GRAD_SCALE * sign(L0 - target) (times the weight of the loss, so that
# accumulated micro-batches and DDP processes average). The sign alone steers the price: gaps that
# shrink by orders while the price settles would otherwise leave Adam's second moment dominated by
# the first steps. The small scale keeps it out of the gradient norm that clipping looks at (Adam's
# step does not depend on it).
PRICE_GRAD_SCALE = 1e-3


class _PricedGap(torch.autograd.Function):
    """``exp(PRICE_RATE * u) * gap``. The gradient of gap is the usual one; that of u points
    uphill on ``excess`` (the price rises while excess > 0): dual ascent on the constraint
    excess = 0, whatever measure gap penalises."""

    @staticmethod
    def forward(ctx, u: Tensor, gap: Tensor, excess: Tensor) -> Tensor:
        price = torch.exp(PRICE_RATE * u)
        ctx.save_for_backward(price, excess)
        return price * gap

    @staticmethod
    def backward(ctx, g: Tensor):
        price, excess = ctx.saved_tensors
        return -PRICE_GRAD_SCALE * excess.sign() * g, price * g, None


class JumpReLUSAE(BaseSAE):
    """JumpReLU SAE (Rajamanoharan et al. 2024): keeps ``pre > threshold`` per latent.

    ``threshold`` [d_sae] is an fp32 parameter (SAELens' layout), clamped at 0 before each
    training forward; the losses and their straight-through gradients are in the module
    docstring (L0 or tanh sparsity measure, optional L0 target, optional pre-activation loss).
    With ``jumprelu_target_l0`` the SAE also has the fp32 scalar parameter ``l0_price`` (see the
    module docstring), kept in ``saefast_state.safetensors`` when saved.
    """

    architecture = "jumprelu"
    config_class = JumpReLUConfig
    extra_parameters = {"threshold": ("d_sae",)}
    fp32_state = ("threshold", "l0_price")
    saelens_architecture = "jumprelu"
    reads_saelens = ("jumprelu",)
    summary = "a learned threshold per latent (JumpReLU) with an L0 penalty"

    def _init_variant(self, device: torch.device) -> None:
        self.threshold = nn.Parameter(torch.full((self.d_sae,), float(self.config.jumprelu_init_threshold),
                                                 dtype=torch.float32, device=device))
        if self.config.jumprelu_target_l0 is not None:
            self.l0_price = nn.Parameter(torch.full((), math.log(self.config.l1_coefficient) / PRICE_RATE,
                                                    dtype=torch.float32, device=device))

    def _encode(self, x_in: Tensor) -> SparseActs:
        return ops.threshold_encode(x_in, self.W_enc, self._b_dec_in(), self.threshold, b_enc=self._b_enc_in())

    def _decoder_norms(self) -> Tensor:
        """fp32 [d_sae] norms of the decoder rows, without a gradient."""
        return torch.linalg.vector_norm(self.W_dec.detach(), dim=1, dtype=torch.float32)

    def _penalty(self, s: Tensor, l0: float) -> Tensor:
        """The sparsity loss of the per-token sparsity measure ``s`` (fp32 scalar); ``l0``: the
        mean number of active latents per token, which steers the price of an L0 target."""
        c = self.config
        if c.jumprelu_target_l0 is None:
            return c.l1_coefficient * s
        excess = torch.tensor(l0 - c.jumprelu_target_l0, dtype=torch.float32, device=s.device)
        return _PricedGap.apply(self.l0_price, s / c.jumprelu_target_l0 - 1.0, excess)

    def _tanh_measure(self, values: Tensor, indices: Tensor, n_rows: int) -> Tensor:
        scale = self.config.jumprelu_tanh_scale * self._decoder_norms()[indices.long()]
        return torch.tanh(scale * values.float()).sum() / max(n_rows, 1)

    def _sparsity_loss(self, acts: SparseActs) -> Tensor:
        if self.config.jumprelu_sparsity_loss == "tanh":
            s = self._tanh_measure(acts.values, acts.indices, acts.n_rows)
        else:
            s = torch.tensor(acts.nnz / max(acts.n_rows, 1), dtype=torch.float32, device=self.device)
        return self._penalty(s, acts.nnz / max(acts.n_rows, 1))

    def _encode_train(self, x_in: Tensor) -> Codes:
        eps = self.config.jumprelu_bandwidth
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)
        band = ops.threshold_encode(x_in, self.W_enc, self._b_dec_in(), self.threshold.detach() - eps / 2,
                                    b_enc=self._b_enc_in())
        theta = self.threshold[band.indices.long()]
        values = ops.jumprelu(band.values, theta, eps)
        if self.config.jumprelu_sparsity_loss == "tanh":
            s = self._tanh_measure(values, band.indices, band.n_rows)
        else:
            s = ops.jumprelu_step(band.values.detach(), theta, eps).sum() / max(band.n_rows, 1)
        # acts keeps the raw pre-activations (same numbers as the decoded values, but no estimator
        # gradient to the thresholds), so losses built on them see only their own gradients.
        acts = band.select(ops.above_threshold(band.values, theta.detach()))
        return Codes(band._replace(values=values), acts, self._penalty(s, acts.nnz / max(acts.n_rows, 1)))

    def _training_losses(self, x_in: Tensor, y_in: Tensor, dead: Tensor) -> Tuple[Codes, Tensor, Dict[str, Tensor]]:
        codes, x_hat, terms = super()._training_losses(x_in, y_in, dead)
        if self.config.jumprelu_pre_act_coefficient > 0:
            terms["aux_loss"] = terms["aux_loss"] + self._pre_act_loss(x_in, codes.acts)
        return codes, x_hat, terms

    def _pre_act_loss(self, x_in: Tensor, acts: SparseActs) -> Tensor:
        """coefficient * mean_tokens sum_i relu(theta_i - h_i) * n_i from the column sums of h and
        the active pairs (h > theta): per latent, relu(theta - h) summed over tokens is
        N * theta - sum_r h_r + sum over the active tokens of (h - theta)."""
        n = x_in.shape[0]
        b_dec_in, b_enc = self._b_dec_in(), self._b_enc_in()
        col = x_in.float().sum(0) - n * b_dec_in.float()
        h_sum = torch.mv(self.W_enc.t(), col.to(self.W_enc.dtype)).float()
        if b_enc is not None:
            h_sum = h_sum + n * b_enc.float()
        idx = acts.indices.long()
        above = torch.zeros(self.d_sae, dtype=torch.float32, device=x_in.device).index_add(
            0, idx, acts.values.float() - self.threshold[idx])
        per_latent = n * self.threshold - h_sum + above
        return self.config.jumprelu_pre_act_coefficient * (self._decoder_norms() * per_latent).sum() / n

    def _fold_threshold(self, scale: float) -> None:
        self.threshold.div_(scale)

    def saelens_export(self) -> SavedExtras:
        # SAELens holds the threshold in the weights' dtype; the fp32 value goes to saefast's state.
        threshold = self.threshold.detach().to("cpu")
        state = {"threshold": threshold}
        if hasattr(self, "l0_price"):
            state["l0_price"] = self.l0_price.detach().to("cpu")
        return SavedExtras(weights={"threshold": threshold.to(self.dtype)}, state=state)

    def saelens_import(self, weights: Dict[str, Tensor], state: Dict[str, Tensor], section: Dict[str, Any],
                       where: str) -> None:
        if "threshold" in state:  # the fp32 threshold, where the weights file holds it rounded
            threshold = state["threshold"]
            if tuple(threshold.shape) != (self.d_sae,):
                raise ValueError(f"{where}: threshold has shape {tuple(threshold.shape)}, expected [{self.d_sae}]")
            check_finite(where, "threshold", threshold)
            with torch.no_grad():
                self.threshold.copy_(threshold.float())
        if "l0_price" in state and hasattr(self, "l0_price"):
            check_finite(where, "l0_price", state["l0_price"])
            with torch.no_grad():
                self.l0_price.copy_(state["l0_price"].float().reshape(()))
