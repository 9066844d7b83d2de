"""SAE configuration: the user's ``SAEConfig`` plus the fields saefast's variants need.

``SAEConfig`` keeps the user's field names (``d_in``, ``d_sae``, ``l1_coefficient``, ``dtype``,
``device``, ``use_error_term``, ``hook_layer``, ``hook_name``, ``hook_spec``, ``top_k``,
``top_k_aux``, ``n_batches_to_dead``, ``aux_penalty``) and adds ``architecture`` and the options of
the other variants. Every value is checked in ``__post_init__``; a bad one raises ``ValueError``
or ``TypeError`` naming the field and the fix.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import torch

__all__ = ["SAEConfig", "ARCHITECTURES", "parse_dtype", "dtype_name"]

ARCHITECTURES = ("batchtopk", "topk", "relu", "jumprelu")
_ARCH_ALIASES = {"vanilla": "relu", "standard": "relu", "batch_topk": "batchtopk"}

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
}


def parse_dtype(dtype: Union[str, torch.dtype], name: str = "dtype") -> torch.dtype:
    """``"float32"``, ``"torch.bfloat16"``, ``torch.float16`` ... -> a floating torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise TypeError(f"{name}={dtype} is not a floating-point dtype; use float32 or bfloat16")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"{name}={dtype!r} is not a known dtype; use one of "
                     "'float32', 'bfloat16', 'float16', 'float64'")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32" (the spelling written to cfg.json)."""
    return str(dtype).removeprefix("torch.")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class SAEConfig:
    """Shape, sparsity and bookkeeping of one SAE.

    User fields: ``d_in`` (input width), ``d_sae`` (number of latents), ``l1_coefficient`` (the
    sparsity coefficient: L1 for ``"relu"``, L0 for ``"jumprelu"``, ignored by the TopK variants),
    ``dtype`` (weights' dtype, a string such as ``"float32"``), ``device``, ``use_error_term``
    (kept for SAELens parity, unused in training), ``hook_layer``, ``hook_name``, ``hook_spec``
    (defaults to ``f"blocks.{hook_layer}.{hook_name}"``), ``top_k``, ``top_k_aux`` (defaults to
    ``max(1, top_k // 2)``), ``n_batches_to_dead`` (a latent that has not fired for this many
    batches is dead and gets the aux-K loss), ``aux_penalty``.

    saefast fields: ``architecture`` (``"batchtopk"``, ``"topk"``, ``"relu"``, ``"jumprelu"``),
    ``input_unit_norm`` (standardise each token: subtract its mean, divide by its std + 1e-5,
    undone on the output), ``apply_b_dec_to_input`` (subtract b_dec before encoding),
    ``train_b_enc`` (None: trained for relu/jumprelu, frozen at zero for the TopK variants),
    ``topk_threshold_lr`` (BatchTopK: rate of the running inference-threshold estimate),
    ``jumprelu_init_threshold`` and ``jumprelu_bandwidth`` (JumpReLU), ``seed`` (weight init),
    and metadata written to cfg.json (``model_name``, ``dataset_path``, ``context_size``,
    ``prepend_bos``).
    """

    d_in: int
    d_sae: int
    l1_coefficient: float = 0.0
    dtype: str = "float32"
    device: str = field(default_factory=_default_device)
    use_error_term: bool = False
    hook_layer: Union[int, str] = 9
    hook_name: str = "hook_resid_post"
    hook_spec: Optional[str] = None
    top_k: Optional[int] = None
    top_k_aux: Optional[int] = None
    n_batches_to_dead: int = 200
    aux_penalty: float = 1 / 32
    architecture: str = "batchtopk"
    input_unit_norm: bool = False
    apply_b_dec_to_input: bool = True
    train_b_enc: Optional[bool] = None
    topk_threshold_lr: float = 0.01
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    seed: Optional[int] = None
    model_name: Optional[str] = None
    dataset_path: Optional[str] = None
    context_size: Optional[int] = None
    prepend_bos: bool = True

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if isinstance(self.dtype, torch.dtype):
            self.dtype = dtype_name(parse_dtype(self.dtype))
        else:
            parse_dtype(self.dtype)
        if not isinstance(self.device, (str, torch.device)):
            raise TypeError(f"device={self.device!r} must be a string such as 'cpu' or 'cuda'")
        try:
            self.device = str(torch.device(self.device))
        except RuntimeError as err:
            raise ValueError(f"device={self.device!r} is not a valid torch device: {err}") from None
        arch = str(self.architecture).lower()
        arch = _ARCH_ALIASES.get(arch, arch)
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} must be one of {ARCHITECTURES}")
        self.architecture = arch
        if self.hook_spec is None:
            self.hook_spec = f"blocks.{self.hook_layer}.{self.hook_name}"
        if arch in ("batchtopk", "topk"):
            if self.top_k is None:
                raise ValueError(f"architecture={arch!r} needs top_k (active latents per token)")
        self._check_k("top_k", self.top_k)
        if self.top_k_aux is None and self.top_k is not None:
            self.top_k_aux = max(1, self.top_k // 2)
        self._check_k("top_k_aux", self.top_k_aux)
        if isinstance(self.n_batches_to_dead, bool) or not isinstance(self.n_batches_to_dead, int) \
                or self.n_batches_to_dead < 0:
            raise ValueError(f"n_batches_to_dead={self.n_batches_to_dead!r} must be an int >= 0")
        for name in ("l1_coefficient", "aux_penalty", "topk_threshold_lr", "jumprelu_init_threshold",
                     "jumprelu_bandwidth"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
        for name in ("l1_coefficient", "aux_penalty"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a number >= 0")
        if not 0 < self.topk_threshold_lr <= 1:
            raise ValueError(f"topk_threshold_lr={self.topk_threshold_lr!r} must be in (0, 1]")
        if not self.jumprelu_bandwidth > 0:
            raise ValueError(f"jumprelu_bandwidth={self.jumprelu_bandwidth!r} must be > 0")
        if not self.jumprelu_init_threshold >= 0:
            raise ValueError(f"jumprelu_init_threshold={self.jumprelu_init_threshold!r} must be >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed={self.seed!r} must be an int or None")

    def _check_k(self, name: str, k: Optional[int]) -> None:
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"{name}={k!r} must be an int")
        if not 1 <= k <= self.d_sae:
            raise ValueError(f"{name}={k} must be between 1 and d_sae={self.d_sae}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch.dtype."""
        return parse_dtype(self.dtype)

    @property
    def b_enc_trained(self) -> bool:
        """Whether b_enc is a trained parameter (``train_b_enc``, or the architecture's default)."""
        if self.train_b_enc is not None:
            return bool(self.train_b_enc)
        return self.architecture in ("relu", "jumprelu")

    def to_dict(self) -> Dict[str, Any]:
        """Every field, JSON-serialisable."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any]) -> "SAEConfig":
        """Inverse of :meth:`to_dict`. Unknown keys and missing required keys raise ValueError."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"config_dict must be a dict, got {type(config_dict).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config_dict) - names)
        if unknown:
            raise ValueError(f"unknown SAEConfig keys {unknown}; valid keys are {sorted(names)}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in config_dict]
        if missing:
            raise ValueError(f"SAEConfig dict is missing required keys {missing}")
        return cls(**config_dict)
