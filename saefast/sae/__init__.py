"""saefast's SAE classes, one per variant, on a shared base (:class:`BaseSAE`).

* :class:`BatchTopKSAE` (``"batchtopk"``): the B*k largest activations of the batch; a learned
  global threshold at inference.
* :class:`TopKSAE` (``"topk"``): the k largest activations of each token.
* :class:`VanillaSAE` (``"relu"``): every positive activation, L1 penalty.
* :class:`JumpReLUSAE` (``"jumprelu"``): learned per-latent thresholds, L0 penalty.
* :class:`MatryoshkaBatchTopKSAE` (``"matryoshka_batchtopk"``): BatchTopK whose nested prefixes of
  latents each reconstruct the input.
* :class:`CrosscoderSAE` (``"crosscoder"``): one ReLU dictionary over several layers at once.

Every variant except the crosscoder is also a transcoder when its config sets ``d_out`` (it then
reads one hook and writes another, optionally with a linear skip ``W_skip``).

Each class registers itself under its ``architecture`` when defined; :func:`create_sae` builds
the class an SAEConfig names, and so does ``SAE(cfg)`` (``SAE`` is :class:`BaseSAE` under the
classic SAE API's name). See :class:`BaseSAE` for what a variant declares.
"""
from __future__ import annotations

from typing import Dict

from ..config import SAEConfig, variant_class
from .base import BaseSAE, Codes, SavedExtras
# Import order is registration order, which help texts and error messages list.
from .topk import BatchTopKConfig, BatchTopKSAE, TopKSAE  # isort: skip
from .relu import VanillaSAE  # isort: skip
from .jumprelu import JumpReLUConfig, JumpReLUSAE  # isort: skip
from .matryoshka import MatryoshkaBatchTopKConfig, MatryoshkaBatchTopKSAE  # isort: skip
from .crosscoder import CrosscoderConfig, CrosscoderSAE  # isort: skip

__all__ = ["BaseSAE", "SAE", "Codes", "SavedExtras", "BatchTopKSAE", "TopKSAE", "VanillaSAE", "JumpReLUSAE",
           "MatryoshkaBatchTopKSAE", "CrosscoderSAE", "BatchTopKConfig", "JumpReLUConfig", "MatryoshkaBatchTopKConfig",
           "CrosscoderConfig", "create_sae", "SAE_CLASSES"]

SAE = BaseSAE  # the classic SAE API's name for the base class

# Registration order: also the order of the architectures in help texts.
SAE_CLASSES: Dict[str, type] = {cls.architecture: cls for cls in (BatchTopKSAE, TopKSAE, VanillaSAE, JumpReLUSAE,
                                                                    MatryoshkaBatchTopKSAE, CrosscoderSAE)}


def create_sae(cfg: SAEConfig) -> BaseSAE:
    """The SAE class named by ``cfg.architecture``, built from cfg."""
    if not isinstance(cfg, SAEConfig):
        raise TypeError(f"cfg must be an SAEConfig, got {type(cfg).__name__}")
    return variant_class(cfg.architecture)(cfg)
