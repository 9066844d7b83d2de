"""saefast: Triton kernels and a trainer for sparse autoencoders.

``import saefast`` never touches a GPU driver: the Triton backend is imported on first use.
"""
from .config import SAEConfig
from .io import load_sae
from .ops import (
    SparseActs,
    auxk_encode,
    normalize_decoder_,
    normalize_decoder_and_project_grad_,
    project_decoder_grad_,
    sparse_decode,
    threshold_encode,
    topk_encode,
)
from .sae import SAE, BatchTopKSAE, CrosscoderSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE, TopKSAE, VanillaSAE, create_sae
from .version import __version__


__all__ = [
    "SparseActs", "topk_encode", "threshold_encode", "auxk_encode", "sparse_decode",
    "normalize_decoder_", "project_decoder_grad_", "normalize_decoder_and_project_grad_",
    "SAEConfig", "SAE", "BatchTopKSAE", "TopKSAE", "VanillaSAE", "JumpReLUSAE", "MatryoshkaBatchTopKSAE",
    "CrosscoderSAE", "load_sae", "create_sae", "__version__",
]
