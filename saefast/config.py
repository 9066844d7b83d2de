"""SAE configuration, and the registry of SAE variants.

:class:`SAEConfig` holds the classic SAE API's fields (``d_in``, ``d_sae``, ``l1_coefficient``,
``dtype``, ``device``, ``use_error_term``, ``hook_layer``, ``hook_name``, ``hook_spec``,
``top_k``, ``top_k_aux``, ``n_batches_to_dead``, ``aux_penalty``) and saefast's shared ones. Each
field is declared once, with its default and its help text (``metadata["help"]``); fields marked
``metadata["train"]`` are also options of ``saefast train`` (``saefast.training.TrainConfig`` is
built from them, so a default is never declared twice).

A variant with options of its own declares them in a dataclass subclass of SAEConfig (its
``config_class``, e.g. ``JumpReLUConfig``); ``SAEConfig(..., architecture="jumprelu")`` returns
that subclass, so ``SAEConfig`` stays the one entry point. Every value is checked on creation; a
bad one raises ``ValueError`` or ``TypeError`` naming the field and the fix.

The registry maps each architecture name (and its aliases) to its SAE class; SAE classes register
themselves when they are defined (``saefast.sae.BaseSAE.__init_subclass__``).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch

__all__ = ["SAEConfig", "parse_dtype", "dtype_name", "register_variant", "variant_class", "architectures",
           "variant_classes", "option"]

logger = logging.getLogger(__name__)

DEFAULT_ARCHITECTURE = "batchtopk"

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


def option(default: Any, help: str, train: bool = True, **kwargs: Any) -> Any:
    """A config field with its help text; ``train`` makes it an option of ``saefast train``."""
    meta = {"help": help, "train": train}
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata=meta, **kwargs)
    return field(default=default, metadata=meta, **kwargs)


# ----------------------------------------------------------------------------------------------
# The variant registry
# ----------------------------------------------------------------------------------------------

_VARIANTS: Dict[str, type] = {}
_ALIASES: Dict[str, str] = {}


def register_variant(cls: type) -> None:
    """Register an SAE class under ``cls.architecture`` (and ``cls.aliases``)."""
    name = cls.architecture
    for key in (name, *cls.aliases):
        owner = _ALIASES.get(key)
        if owner is not None and owner != name:
            raise ValueError(f"architecture name {key!r} is already used by {owner!r}")
    _VARIANTS[name] = cls
    for key in (name, *cls.aliases):
        _ALIASES[key] = name


def architectures() -> Tuple[str, ...]:
    """The registered architecture names, in registration order."""
    return tuple(_VARIANTS)


def variant_classes() -> Tuple[type, ...]:
    """The registered SAE classes, in registration order."""
    return tuple(_VARIANTS.values())


def canonical_architecture(name: Any) -> str:
    """The registered name for ``name`` or one of its aliases (case-insensitive)."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"architecture={name!r} must be one of {architectures()}")
    return _ALIASES[key]


def variant_class(name: Any) -> type:
    """The SAE class registered for architecture ``name`` (or an alias)."""
    return _VARIANTS[canonical_architecture(name)]


def _config_class(name: Any) -> type:
    return getattr(variant_class(name), "config_class", SAEConfig)


def _field_names(cls: type) -> set:
    return {f.name for f in dataclasses.fields(cls)}


# ----------------------------------------------------------------------------------------------
# SAEConfig
# ----------------------------------------------------------------------------------------------

class _ConfigDispatch(type):
    """``SAEConfig(...)`` builds the config class of the architecture it names."""

    def __call__(cls, *args: Any, **kwargs: Any):
        if cls is not SAEConfig:
            return super().__call__(*args, **kwargs)
        bound = _INIT_SIGNATURE.bind_partial(None, *args[:_N_BASE_FIELDS], **{
            k: v for k, v in kwargs.items() if k in _BASE_FIELDS})
        arch = bound.arguments.get("architecture", DEFAULT_ARCHITECTURE)
        target = _config_class(arch)
        names = _field_names(target)
        for key in sorted(set(kwargs) - names):
            owner = _option_owner(key)
            if owner is None:
                raise TypeError(f"SAEConfig got an unknown option {key!r}; valid options are {sorted(names)}")
            logger.warning("%s is an option of architecture=%r; it has no effect on architecture=%r and is "
                           "ignored", key, owner[0], arch)
            del kwargs[key]
        return super(_ConfigDispatch, target).__call__(*args, **kwargs)


@dataclass
class SAEConfig(metaclass=_ConfigDispatch):
    """Shape, sparsity and bookkeeping of one SAE (see each field's ``metadata["help"]``).

    ``SAEConfig(d_in=..., d_sae=..., architecture=...)`` returns the architecture's config class
    (a subclass adding that variant's options, e.g. ``jumprelu_bandwidth``); an option of another
    architecture is ignored with a warning.
    """

    d_in: int = field(metadata={"help": "Input width (the hooked activation's size).", "train": False})
    d_sae: int = field(metadata={"help": "Number of latents (dictionary size).", "train": False})
    l1_coefficient: float = option(
        1e-3, "Sparsity penalty weight: L1 for relu SAEs, L0 for jumprelu; unused by the TopK variants.")
    dtype: str = option("float32", "SAE parameter dtype: float32, bfloat16 or float16 (float64 on the PyTorch "
                                   "backend).")
    device: str = option(_default_device, "Device of the SAE's weights. Default: cuda if available.", train=False)
    use_error_term: bool = option(False, "Kept for the SAELens layout; unused in training.", train=False)
    hook_layer: Union[int, str] = option(9, "Layer of the hook the SAE reads.", train=False)
    hook_name: str = option("hook_resid_post", "Name of the hook inside its block.", train=False)
    hook_spec: Optional[str] = option(None, "The full hook name; default f'blocks.{hook_layer}.{hook_name}'.",
                                      train=False)
    top_k: Optional[int] = option(
        None, "Active latents per token (batchtopk: on average over the batch; topk: per token). Required by "
              "the TopK variants.")
    top_k_aux: Optional[int] = option(None, "Dead latents used by the aux-K loss per token. Default: max(1, top_k // 2).")
    n_batches_to_dead: int = option(200, "A latent that has not fired for this many batches (optimizer steps when "
                                         "training) counts as dead and gets the aux-K loss.")
    aux_penalty: float = option(1 / 32, "Weight of the aux-K loss that revives dead latents.")
    architecture: str = option(DEFAULT_ARCHITECTURE, "SAE variant (see saefast.config.architectures()).")
    input_unit_norm: bool = option(False, "Standardise each token inside the SAE (subtract its mean, divide by its "
                                          "std + 1e-5), undone on the output.")
    apply_b_dec_to_input: bool = option(True, "Subtract b_dec from the input before encoding (always False for "
                                              "transcoders, whose b_dec lives in the output space).")
    train_b_enc: Optional[bool] = option(None, "Train the encoder bias. Default: the architecture's choice (trained "
                                               "for relu/jumprelu, frozen at zero for the TopK variants).")
    seed: Optional[int] = option(None, "Seed of the weight initialisation (None: torch's global RNG).", train=False)
    model_name: Optional[str] = option(None, "Metadata for cfg.json: the model the SAE reads.", train=False)
    dataset_path: Optional[str] = option(None, "Metadata for cfg.json: the dataset it was trained on.", train=False)
    context_size: Optional[int] = option(None, "Metadata for cfg.json: tokens per window.", train=False)
    prepend_bos: bool = option(True, "Metadata for cfg.json: windows start with BOS.", train=False)
    d_out: Optional[int] = option(
        None, "Transcoders: width of the target the SAE writes (the target hook's). None: an autoencoder that "
              "reconstructs its own input.", train=False)
    hook_spec_out: Optional[str] = option(None, "Transcoders: the hook whose activations the SAE writes (its target), "
                                                "e.g. blocks.8.hook_mlp_out.", train=False)
    skip_connection: bool = option(False, "Transcoders: add a learned linear skip x @ W_skip [d_in, d_out] (starting "
                                          "at zero) to the output.")

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
        self.architecture = canonical_architecture(self.architecture)
        variant = variant_class(self.architecture)
        if type(self) is not getattr(variant, "config_class", SAEConfig):
            raise ValueError(f"architecture={self.architecture!r} needs a "
                             f"{getattr(variant, 'config_class', SAEConfig).__name__}; build a new "
                             f"SAEConfig(..., architecture={self.architecture!r}) instead of changing it")
        if self.hook_spec is None:
            self.hook_spec = f"blocks.{self.hook_layer}.{self.hook_name}"
        if getattr(variant, "needs_top_k", False) and self.top_k is None:
            raise ValueError(f"architecture={self.architecture!r} needs top_k (active latents per token)")
        self._check_k("top_k", self.top_k)
        if self.top_k_aux is None and self.top_k is not None:
            self.top_k_aux = max(1, self.top_k // 2)
        self._check_k("top_k_aux", self.top_k_aux)
        if isinstance(self.n_batches_to_dead, bool) or not isinstance(self.n_batches_to_dead, int) \
                or self.n_batches_to_dead < 0:
            raise ValueError(f"n_batches_to_dead={self.n_batches_to_dead!r} must be an int >= 0")
        for name in ("l1_coefficient", "aux_penalty"):
            self._check_number(name, minimum=0.0)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed={self.seed!r} must be an int or None")
        self._check_transcoder()

    def _check_transcoder(self) -> None:
        """A transcoder (``d_out`` set) reads one space and writes another: b_dec lives in the
        output space, so it is never subtracted from the input, and per-token standardisation,
        which is undone on the output, has no output to undo it on."""
        if self.d_out is None:
            if self.skip_connection:
                raise ValueError("skip_connection=True needs a transcoder: set d_out (the target's width), or "
                                 "drop skip_connection")
            if self.hook_spec_out is not None:
                raise ValueError(f"hook_spec_out={self.hook_spec_out!r} names a target hook, which only a transcoder "
                                 "has: set d_out too")
            return
        if isinstance(self.d_out, bool) or not isinstance(self.d_out, int) or self.d_out < 1:
            raise ValueError(f"d_out={self.d_out!r} must be a positive int (the target's width) or None")
        if not isinstance(self.skip_connection, bool):
            raise TypeError(f"skip_connection={self.skip_connection!r} must be True or False")
        if self.input_unit_norm:
            raise ValueError("input_unit_norm=True standardises each token and undoes it on the output, but a "
                             "transcoder's output is another space; drop input_unit_norm (dataset-wide "
                             "normalisation works for transcoders)")
        self.apply_b_dec_to_input = False

    @property
    def is_transcoder(self) -> bool:
        """True when the SAE writes a target other than its input (``d_out`` is set)."""
        return self.d_out is not None

    @property
    def output_width(self) -> int:
        """Width of what the SAE writes: ``d_out`` for a transcoder, else ``d_in``."""
        return self.d_out if self.d_out is not None else self.d_in

    def _check_number(self, name: str, minimum: Optional[float] = None, above: Optional[float] = None,
                      at_most: Optional[float] = None) -> None:
        """Raise unless the field is a finite number within the given bounds."""
        value = getattr(self, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite number")
        if minimum is not None and not value >= minimum:
            raise ValueError(f"{name}={value!r} must be a number >= {minimum:g}")
        if above is not None and not value > above:
            raise ValueError(f"{name}={value!r} must be > {above:g}")
        if at_most is not None and not value <= at_most:
            raise ValueError(f"{name}={value!r} must be <= {at_most:g}")

    def _check_k(self, name: str, k: Optional[int]) -> None:
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"{name}={k!r} must be an int")
        if not 1 <= k <= self.d_sae:
            raise ValueError(f"{name}={k} must be between 1 and d_sae={self.d_sae}")

    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch.dtype (a method, as in the classic SAE API: ``cfg.torch_dtype()``)."""
        return parse_dtype(self.dtype)

    @property
    def b_enc_trained(self) -> bool:
        """Whether b_enc is a trained parameter (``train_b_enc``, or the architecture's default)."""
        if self.train_b_enc is not None:
            return bool(self.train_b_enc)
        return bool(getattr(variant_class(self.architecture), "trains_b_enc", True))

    def to_dict(self) -> Dict[str, Any]:
        """Every field, JSON-serialisable."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any]) -> "SAEConfig":
        """Inverse of :meth:`to_dict`. Unknown keys and missing required keys raise ValueError.

        Options of other architectures with their default values (written by earlier versions,
        which stored every variant's options) are dropped.
        """
        if not isinstance(config_dict, dict):
            raise TypeError(f"config_dict must be a dict, got {type(config_dict).__name__}")
        target = _config_class(config_dict.get("architecture", DEFAULT_ARCHITECTURE))
        names = _field_names(target)
        values = dict(config_dict)
        for key in sorted(set(values) - names):
            owner = _option_owner(key)
            if owner is not None and values[key] == owner[1].default:
                del values[key]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown SAEConfig keys {unknown}; valid keys are {sorted(names)}")
        required = [f.name for f in dataclasses.fields(target)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(f"SAEConfig dict is missing required keys {missing}")
        return target(**values)


_BASE_FIELDS = _field_names(SAEConfig)
_N_BASE_FIELDS = len(_BASE_FIELDS)
_INIT_SIGNATURE = inspect.signature(SAEConfig.__init__)


def variant_options(cls: type) -> Tuple[dataclasses.Field, ...]:
    """The fields a variant's config class adds to SAEConfig."""
    return tuple(f for f in dataclasses.fields(getattr(cls, "config_class", SAEConfig)) if f.name not in _BASE_FIELDS)


def _option_owner(name: str) -> Optional[Tuple[str, dataclasses.Field]]:
    """(architecture, field) of the variant whose config class declares option ``name``."""
    for arch, cls in _VARIANTS.items():
        for f in variant_options(cls):
            if f.name == name:
                return arch, f
    return None
