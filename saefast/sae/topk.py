"""The TopK variants: BatchTopK (the B*k largest activations of the batch) and TopK (the k
largest of each token), both with the aux-K loss on dead latents and b_enc frozen at zero."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .. import ops
from ..config import SAEConfig, option
from ..ops import SparseActs
from ..utils import check_finite
from .base import BaseSAE, SavedExtras

__all__ = ["BatchTopKSAE", "TopKSAE", "BatchTopKConfig"]

logger = logging.getLogger(__name__)


@dataclass
class BatchTopKConfig(SAEConfig):
    """SAEConfig with BatchTopK's own option."""

    topk_threshold_lr: float = option(0.01, "BatchTopK: rate of the running estimate of the inference threshold "
                                            "(the smallest kept activation), in (0, 1].")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_number("topk_threshold_lr", above=0.0, at_most=1.0)


class BatchTopKSAE(BaseSAE):
    """BatchTopK SAE (Bussmann et al. 2024): the B*k largest activations of the batch in training,
    ``pre > topk_threshold`` in eval mode. Extra buffer: ``topk_threshold`` fp32 scalar (-1 until
    the first training batch). Saved for SAELens as a JumpReLU SAE with that global threshold;
    SAELens training checkpoints (``architecture: "batchtopk"``, ``k``, ``topk_threshold``) load."""

    architecture = "batchtopk"
    aliases = ("batch_topk",)
    config_class = BatchTopKConfig
    needs_top_k = True
    trains_b_enc = False
    fp32_state = ("topk_threshold",)
    saelens_architecture = "jumprelu"
    saelens_weights = ("threshold", "topk_threshold")
    reads_saelens = ("batchtopk",)
    reference_name = "batchtopk"
    folds_decoder_norms = False
    saebench_architecture = "batch_topk"
    topk_mode = "batch"
    summary = "the B*k largest activations of the batch (BatchTopK); a learned global threshold at inference"

    def _init_variant(self, device: torch.device) -> None:
        self.register_buffer("topk_threshold", torch.full((), -1.0, dtype=torch.float32, device=device))

    @property
    def inference_threshold(self) -> Optional[float]:
        """The learned global threshold, or None before any training batch."""
        value = float(self.topk_threshold)
        return value if value >= 0 else None

    def _encode(self, x_in: Tensor) -> SparseActs:
        if not self.training:
            threshold = self.inference_threshold
            if threshold is not None:
                return ops.threshold_encode(x_in, self.W_enc, self._b_dec_in(), threshold, b_enc=self._b_enc_in())
            logger.warning("BatchTopKSAE in eval mode has no learned threshold yet (never trained); "
                           "falling back to batch-dependent BatchTopK")
        return ops.topk_encode(x_in, self.W_enc, self._b_dec_in(), self.config.top_k,
                               b_enc=self._b_enc_in(), mode="batch")

    @torch.no_grad()
    def update_threshold(self, kept_min: Tensor) -> None:
        """``t <- (1 - lr) * t + lr * kept_min`` (the first batch sets t); batches that kept
        nothing (kept_min == 0) are skipped. Runs on the device, without a sync."""
        km = torch.as_tensor(kept_min, dtype=torch.float32).to(self.topk_threshold.device).reshape(())
        lr = self.config.topk_threshold_lr
        old = self.topk_threshold
        new = torch.where(old < 0, km, (1 - lr) * old + lr * km)
        self.topk_threshold.copy_(torch.where(km > 0, new, old))

    def _fold_threshold(self, scale: float) -> None:
        if self.topk_threshold >= 0:
            self.topk_threshold.div_(scale)

    def saelens_export(self) -> SavedExtras:
        # SAELens runs the saved folder as a JumpReLU SAE with the global threshold on every latent.
        threshold = self.inference_threshold
        if threshold is None:
            logger.warning("saving a BatchTopKSAE that was never trained: its threshold is unset, so SAELens "
                           "will run it as a plain ReLU SAE (threshold 0)")
            threshold = 0.0
        weights = {"threshold": torch.full((self.d_sae,), threshold, dtype=torch.float32).to(self.dtype)}
        return SavedExtras(weights=weights, section={"topk_threshold": float(self.topk_threshold)})

    def saelens_import(self, weights: Dict[str, Tensor], state: Dict[str, Tensor], section: Dict[str, Any],
                       where: str) -> None:
        if not section and "topk_threshold" in weights:  # a SAELens training checkpoint
            tensor = weights["topk_threshold"]
            if tensor.numel() != 1:
                raise ValueError(f"{where}: topk_threshold has shape {tuple(tensor.shape)}; expected a scalar")
            check_finite(where, "topk_threshold", tensor)
            self.topk_threshold.fill_(float(tensor))
            return
        threshold = section.get("topk_threshold", -1.0)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"{where}: saefast.topk_threshold={threshold!r} must be a finite number")
        self.topk_threshold.fill_(float(threshold))

    @classmethod
    def saelens_config_values(cls, cfg: Dict[str, Any], where: str) -> Dict[str, Any]:
        k = cfg.get("k")
        if isinstance(k, float) and k.is_integer():
            k = int(k)  # SAELens stores BatchTopK's k as a float
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"{where}: a {cfg.get('architecture')} cfg.json needs k, a whole number of active "
                             f"latents per token; got k={cfg.get('k')!r}")
        values: Dict[str, Any] = {"top_k": k}
        if "topk_threshold_lr" in cfg:
            values["topk_threshold_lr"] = cfg["topk_threshold_lr"]
        return values


class TopKSAE(BaseSAE):
    """TopK SAE (Gao et al. 2024): the k largest activations of each token."""

    architecture = "topk"
    needs_top_k = True
    trains_b_enc = False
    saelens_architecture = "topk"
    reads_saelens = ("topk",)
    reference_name = "topk"
    folds_decoder_norms = False
    topk_mode = "row"
    summary = "the k largest activations of each token (TopK)"

    def _encode(self, x_in: Tensor) -> SparseActs:
        return ops.topk_encode(x_in, self.W_enc, self._b_dec_in(), self.config.top_k,
                               b_enc=self._b_enc_in(), mode="row")

    def saelens_export(self) -> SavedExtras:
        return SavedExtras(cfg={"k": self.config.top_k, "rescale_acts_by_decoder_norm": False})

    @classmethod
    def saelens_config_values(cls, cfg: Dict[str, Any], where: str) -> Dict[str, Any]:
        k = (cfg.get("activation_fn_kwargs") or {}).get("k", cfg.get("k"))
        if k is None:
            raise ValueError(f"{where}: a topk cfg.json needs 'k' (or activation_fn_kwargs.k)")
        return {"top_k": k}
