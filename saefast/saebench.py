"""A saefast SAE as SAEBench evaluates custom SAEs.

SAEBench takes any ``nn.Module`` with ``encode`` / ``decode`` / ``forward`` (dense
``[..., d_sae]`` features; ``forward`` returns the reconstruction), parameters ``W_enc
[d_in, d_sae]``, ``W_dec [d_sae, d_in]`` with unit-norm rows, ``b_enc``, ``b_dec``, attributes
``dtype`` and ``device``, and a ``cfg`` with ``model_name``, ``hook_name`` (the full hook,
``blocks.<layer>.<name>``), ``hook_layer`` (an int: the model runs up to that layer),
``d_in``, ``d_sae``, ``architecture``, ``context_size``, ``hook_head_index``, ``prepend_bos``,
``dtype``, ``device`` and ``to_dict()``. :func:`to_saebench` gives a saefast SAE that shape::

    from saefast.saebench import to_saebench
    custom = to_saebench(sae, model_name="gpt2")           # then pass `custom` to SAEBench's evals

The adapter encodes in inference mode (BatchTopK with its learned threshold, so one token's code
does not depend on its batch), shares the SAE's weights (``.to(device, dtype)`` moves them), and
casts inputs to the SAE's dtype. Decoder rows that are not unit norm are folded into the encoder
of a copy first (:meth:`saefast.sae.BaseSAE.fold_decoder_norms`: reconstructions unchanged);
SAEs that SAEBench cannot evaluate faithfully (a BatchTopK SAE without a learned threshold,
per-token input standardisation, non-unit TopK decoders) are refused with the reason.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from .config import dtype_name
from .utils import eval_mode, parse_hook

__all__ = ["SAEBenchConfig", "SAEBenchSAE", "to_saebench"]


@dataclass
class SAEBenchConfig:
    """The config fields SAEBench reads from a custom SAE (its custom-SAE config's names)."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: Optional[int] = None
    hook_head_index: Optional[int] = None
    architecture: str = ""
    apply_b_dec_to_input: bool = True
    finetuning_scaling_factor: bool = False
    activation_fn_str: str = "relu"
    activation_fn_kwargs: Dict[str, Any] = field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    model_from_pretrained_kwargs: Dict[str, Any] = field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    seqpos_slice: tuple = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: Optional[str] = None
    neuronpedia_id: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """Every field (attributes SAEBench adds later, such as ``metadata``, are left out)."""
        return dataclasses.asdict(self)


class SAEBenchSAE(nn.Module):
    """``sae`` (a saefast SAE) with the interface SAEBench evaluates; build it with
    :func:`to_saebench`. ``encode``: x [..., d_in] -> dense features [..., d_sae];
    ``decode``: features -> [..., d_in]; ``forward(x) = decode(encode(x))``."""

    def __init__(self, sae: nn.Module, cfg: SAEBenchConfig) -> None:
        super().__init__()
        self.sae = sae
        self.cfg = cfg

    @property
    def W_enc(self) -> nn.Parameter:
        return self.sae.W_enc

    @property
    def W_dec(self) -> nn.Parameter:
        return self.sae.W_dec

    @property
    def b_enc(self) -> nn.Parameter:
        return self.sae.b_enc

    @property
    def b_dec(self) -> nn.Parameter:
        return self.sae.b_dec

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.dtype

    @property
    def device(self) -> torch.device:
        return self.sae.device

    def encode(self, x: Tensor) -> Tensor:
        """Dense features [..., d_sae] of x [..., d_in] (inference encoding)."""
        with eval_mode(self.sae):
            return self.sae.encode(x.to(self.dtype))

    def decode(self, feature_acts: Tensor) -> Tensor:
        """``feature_acts @ W_dec + b_dec`` for dense features [..., d_sae]."""
        return self.sae.decode(feature_acts.to(self.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of x [..., d_in]."""
        return self.decode(self.encode(x))

    def to(self, *args: Any, **kwargs: Any) -> "SAEBenchSAE":
        super().to(*args, **kwargs)
        self.cfg.dtype = dtype_name(self.dtype)
        self.cfg.device = str(self.device)
        return self


def to_saebench(sae: nn.Module, model_name: Optional[str] = None, hook_name: Optional[str] = None,
                hook_layer: Optional[int] = None, context_size: Optional[int] = None) -> SAEBenchSAE:
    """``sae`` with the interface SAEBench evaluates (see the module docstring).

    Args:
        sae: a saefast SAE (e.g. from ``saefast.load_sae``).
        model_name: the transformer-lens model SAEBench loads (default: ``sae.config.model_name``).
        hook_name: the full hook (default: ``sae.config.hook_spec``).
        hook_layer: the layer the hook is in (default: parsed from the hook name).
        context_size: tokens per window (default: ``sae.config.context_size``).

    Raises ValueError, naming the fix, when the model or layer is unknown or the SAE cannot be
    evaluated faithfully.
    """
    c = getattr(sae, "config", None)
    if c is None or not callable(getattr(sae, "fold_decoder_norms", None)):
        raise TypeError(f"sae must be a saefast SAE, got {type(sae).__name__}")
    model_name = model_name or c.model_name
    if not model_name:
        raise ValueError("SAEBench loads the model the SAE reads by name, and this SAE's config names none: pass "
                         "model_name= (e.g. 'gpt2')")
    hook_name = hook_name or c.hook_spec
    if hook_layer is None:
        hook_layer = parse_hook(hook_name)[0]
    if isinstance(hook_layer, bool) or not isinstance(hook_layer, int):
        raise ValueError(f"hook {hook_name!r} is not inside a block, so its layer is unknown: pass hook_layer= "
                         "(SAEBench runs the model up to that layer)")
    if c.input_unit_norm:
        raise ValueError("this SAE standardises each token (input_unit_norm=True) and needs the input to decode, "
                         "which SAEBench does not pass to decode(); train it with normalize='dataset_scale' instead")
    if getattr(sae, "inference_threshold", 0.0) is None:
        raise ValueError(f"this {type(sae).__name__} has no learned inference threshold yet (never trained), so its "
                         "encoding depends on the batch; train it, or load a trained one, before evaluating")
    if not sae.decoder_norms_are_unit():
        sae = copy.deepcopy(sae).fold_decoder_norms()  # raises for the TopK variants
    top_k = c.top_k if sae.saelens_architecture == "topk" else None
    cfg = SAEBenchConfig(
        model_name=str(model_name), d_in=sae.d_in, d_sae=sae.d_sae, hook_layer=hook_layer, hook_name=hook_name,
        context_size=context_size if context_size is not None else c.context_size,
        architecture=sae.saebench_architecture or sae.saelens_architecture,
        apply_b_dec_to_input=bool(c.apply_b_dec_to_input), activation_fn_str="topk" if top_k else "relu",
        activation_fn_kwargs={"k": top_k} if top_k else {}, prepend_bos=bool(c.prepend_bos),
        dtype=dtype_name(sae.dtype), device=str(sae.device), dataset_path=c.dataset_path or "")
    return SAEBenchSAE(sae, cfg)
