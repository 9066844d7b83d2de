"""The acausal crosscoder: one dictionary read from and decoded into several layers at once.

Notation: B tokens, L layers, d per-layer width, D = L * d. The layers' activations at one token
are concatenated into one row ``x = [x_1, ..., x_L]`` of width ``d_in = D``, so

* the encoder sums over layers: ``pre = relu(sum_l (x_l - b_dec_l) @ W_enc_l + b_enc)``, which is
  ``relu((x - b_dec) @ W_enc + b_enc)`` with ``W_enc [D, d_sae]`` (the layers' encoders stacked);
* the decoder writes every layer: ``x_hat_l = sum_i a_i * W_dec[i, l] + b_dec_l``, which is the
  sparse decode with ``W_dec [d_sae, D]`` viewed as ``[d_sae, L, d]``;

so both run on the same sparse ops as every other SAE (no dense [B, d_sae] tensor). What differs
is the sparsity term and the decoder norms: each latent's L1 is weighted by the sum of its
per-layer decoder norms, ``l1_coefficient * mean_tokens sum_i a_i * sum_l ||W_dec[i, l]||``, and
the decoder rows are not renormalised (the penalty already charges for their norms), so a
feature that lives in some layers only can shrink its decoder elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..config import SAEConfig, option
from ..ops import SparseActs
from .base import BaseSAE

__all__ = ["CrosscoderSAE", "CrosscoderConfig"]


@dataclass
class CrosscoderConfig(SAEConfig):
    """SAEConfig with the crosscoder's own options."""

    crosscoder_layers: int = option(
        2, "Crosscoders: how many layers the dictionary reads and writes; their activations are concatenated, "
           "so d_in = crosscoder_layers * the per-layer width.", train=False)
    crosscoder_hooks: Optional[List[str]] = option(None, "Crosscoders: the hooks of those layers, in order.",
                                                   train=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        layers = self.crosscoder_layers
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"crosscoder_layers={layers!r} must be a positive int")
        if self.d_in % layers:
            raise ValueError(f"d_in={self.d_in} must be crosscoder_layers={layers} times the per-layer width; "
                             "concatenate the layers' activations along the last axis")
        if self.is_transcoder:
            raise ValueError("a crosscoder writes the layers it reads; d_out (a transcoder's target) does not apply")
        if self.crosscoder_hooks is not None:
            hooks = list(self.crosscoder_hooks)
            if len(hooks) != layers or not all(isinstance(h, str) for h in hooks):
                raise ValueError(f"crosscoder_hooks={self.crosscoder_hooks!r} must name {layers} hooks "
                                 f"(crosscoder_layers), one per layer, in order")
            self.crosscoder_hooks = hooks


class CrosscoderSAE(BaseSAE):
    """Acausal crosscoder (Lindsey et al. 2024): ReLU latents over the concatenated layers, L1
    weighted by each latent's summed per-layer decoder norms, decoder norms left free.

    Inputs and outputs are the layers' activations concatenated, ``[..., L * d]``;
    :meth:`layer_view` splits them into ``[..., L, d]``. Saved in the SAELens layout as a
    ``"standard"`` SAE over that concatenation (SAELens runs it unchanged on concatenated inputs);
    the ``saefast`` section keeps the layers and their hooks.
    """

    architecture = "crosscoder"
    aliases = ("acausal_crosscoder",)
    config_class = CrosscoderConfig
    multi_layer = True
    unit_norm_decoder = False
    saelens_architecture = "standard"
    summary = "one ReLU dictionary over several layers at once (acausal crosscoder), L1 weighted by decoder norms"

    @property
    def n_layers(self) -> int:
        return self.config.crosscoder_layers

    @property
    def d_layer(self) -> int:
        """Width of one layer's activations."""
        return self.d_in // self.n_layers

    def layer_view(self, t: Tensor) -> Tensor:
        """``t [..., L * d]`` (an input, an output or a W_dec row) viewed as ``[..., L, d]``."""
        return t.unflatten(-1, (self.n_layers, self.d_layer))

    def _initial_weights(self) -> Tuple[Tensor, Tensor]:
        """W_dec rows kaiming-uniform, each layer's slice scaled to norm 1/L (so the weighted L1
        starts where a unit-norm SAE's would); W_enc = W_dec.T."""
        c = self.config
        gen = torch.Generator().manual_seed(c.seed) if c.seed is not None else None
        W_dec = nn.init.kaiming_uniform_(torch.empty(c.d_sae, c.d_in), generator=gen)
        per_layer = W_dec.unflatten(1, (self.n_layers, self.d_layer))
        per_layer = per_layer / (per_layer.norm(dim=-1, keepdim=True) * self.n_layers)
        W_dec = per_layer.flatten(1)
        return W_dec.t().contiguous(), W_dec.contiguous()

    def _encode(self, x_in: Tensor) -> SparseActs:
        return ops.threshold_encode(x_in, self.W_enc, self._b_dec_in(), 0.0, b_enc=self._b_enc_in())

    def decoder_norms(self, latents: Optional[Tensor] = None) -> Tensor:
        """``||W_dec[i, l]||`` as fp32 ``[n, L]`` for the given latent ids (default: all d_sae),
        differentiable in W_dec."""
        W = self.W_dec if latents is None else self.W_dec.index_select(0, latents.long())
        return self.layer_view(W.float()).norm(dim=-1)

    def _sparsity_loss(self, acts: SparseActs) -> Tensor:
        if acts.nnz == 0:
            return torch.zeros((), device=self.device)
        # Only the active latents' decoder rows are read (and get this term's gradient).
        latents, inverse = torch.unique(acts.indices, return_inverse=True)
        weight = self.decoder_norms(latents).sum(-1)[inverse]
        return self.config.l1_coefficient * (acts.values.float() * weight).sum() / max(acts.n_rows, 1)
