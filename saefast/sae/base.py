"""BaseSAE: the machinery every saefast SAE variant shares, on top of ``saefast.ops``.

Notation: B tokens, d_in input width, d_sae latents, k active latents per token.
Parameters (SAELens layout): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` (+ a variant's own, e.g. JumpReLU's ``threshold [d_sae]``). Encoding is
``pre = relu((x - b_dec) @ W_enc + b_enc)`` followed by the variant's selection; decoding is
the sparse ``sum values * W_dec[latent] + b_dec``. No dense [B, d_sae] tensor is built unless a
caller asks for dense features.

A variant is one subclass that declares what differs (see "Declaring a variant" below, and
docs/sae.md "Adding a variant"); nothing else in saefast compares architecture names.

The classic SAE API: ``forward(x) -> (x_recon, features)`` (dense features), ``encode`` /
``decode``, ``training_forward(x) -> dict`` (sparse), ``get_auxiliary_loss``,
``project_decoder_gradients``, ``normalize_decoder``, ``update_inactive_features``,
``count_dead_features``, ``dead_feature_percentage``, ``save`` / ``load``. Passing the BatchTopK
reference code's dict config instead of an SAEConfig gives that code's API
(``saefast.batchtopk_compat``).
"""
from __future__ import annotations

import logging
import math
import weakref
from typing import Any, ClassVar, Dict, NamedTuple, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import batchtopk_compat, io, ops
from ..config import SAEConfig, dtype_name, register_variant, variant_class
from ..dense_features import DenseFeatures
from ..ops import SparseActs
from ..utils import LazyDict

__all__ = ["BaseSAE", "Codes", "SavedExtras"]

logger = logging.getLogger(__name__)

STD_EPS = 1e-5  # input_unit_norm: x / (std + STD_EPS), as in the BatchTopK reference code
# Bookkeeping state that state dicts from other code (SAELens, the reference code) lack.
_OPTIONAL_STATE = ("num_batches_not_active", "ever_fired", "topk_threshold")


def _drop_optional_missing(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict hook: state dicts without the bookkeeping buffers still load strictly;
    those buffers keep their current values."""
    for key in list(incompatible_keys.missing_keys):
        if key.rsplit(".", 1)[-1] in _OPTIONAL_STATE:
            incompatible_keys.missing_keys.remove(key)


class SavedExtras(NamedTuple):
    """What a variant adds to a folder in the SAELens layout (see ``saefast.io``)."""

    cfg: Dict[str, Any] = {}          # fields of cfg.json that SAELens reads (TopK's k)
    weights: Dict[str, Tensor] = {}   # tensors of sae_weights.safetensors beyond the four shared ones
    state: Dict[str, Tensor] = {}     # tensors of saefast_state.safetensors (saefast reads them back)
    section: Dict[str, Any] = {}      # JSON values of cfg.json's "saefast" section


class Codes(NamedTuple):
    """What a variant's encode returns to the shared machinery."""

    decode_acts: SparseActs   # what the decoder sees (JumpReLU in training: also the zeroed in-band entries)
    acts: SparseActs          # the active latents
    sparsity_loss: Tensor     # fp32 scalar, already weighted


class _ClassicForward:
    """What the last classic ``forward`` of an SAE left for ``get_auxiliary_loss``: its input and
    output (by identity and version), the dead latents and weight versions it saw, and, when it
    computed them in its own encode and decode, the aux-K codes' decode.

    ``fuse``: whether the next training forward computes the aux-K codes. It stops when a fused
    forward's aux-K decode was never asked for (a loop without ``get_auxiliary_loss``, whose
    forward would only pay for them) and starts again when ``get_auxiliary_loss`` is called with
    the last forward's output."""

    def __init__(self) -> None:
        self.fuse = True
        self.key: Optional[Tuple[Any, ...]] = None
        self.dead: Optional[Tensor] = None
        self.aux_recon: Optional[Tensor] = None

    @staticmethod
    def _versions(sae: "BaseSAE", x: Tensor, x_recon: Tensor) -> Optional[Tuple[int, ...]]:
        tensors = (x, x_recon, sae.W_enc, sae.W_dec, sae.b_dec)
        if any(t.is_inference() for t in tensors):  # no version counter, and nothing to reuse
            return None
        return tuple(t._version for t in tensors)

    def start(self) -> bool:
        """At the start of a forward: whether it should compute the aux-K codes."""
        if self.aux_recon is not None:  # the previous forward's aux-K decode went unused
            self.fuse = False
        self.key = self.dead = self.aux_recon = None
        return self.fuse

    def remember(self, sae: "BaseSAE", x: Tensor, x_recon: Tensor, dead: Optional[Tensor],
                 aux_recon: Optional[Tensor]) -> None:
        self.key = (weakref.ref(x), weakref.ref(x_recon), self._versions(sae, x, x_recon))
        self.dead = dead
        self.aux_recon = aux_recon

    def take(self, sae: "BaseSAE", x: Tensor, x_recon: Tensor, dead: Tensor) -> Optional[Tensor]:
        """The last forward's aux-K decode if (x, x_recon) are its input and output, unchanged,
        with the same dead latents and weights; else None. Either way it is handed out once."""
        key, aux_recon, seen_dead = self.key, self.aux_recon, self.dead
        self.key = self.dead = self.aux_recon = None
        if (key is None or key[0]() is not x or key[1]() is not x_recon or key[2] is None
                or key[2] != self._versions(sae, x, x_recon)):
            return None
        self.fuse = True
        if aux_recon is None or not torch.is_grad_enabled() or not torch.equal(seen_dead, dead):
            return None
        return aux_recon


# Per SAE, outside its __dict__ (so copying or pickling an SAE carries none of it).
_CLASSIC_FORWARDS: "weakref.WeakKeyDictionary[nn.Module, _ClassicForward]" = weakref.WeakKeyDictionary()


def _classic_state(sae: nn.Module) -> _ClassicForward:
    state = _CLASSIC_FORWARDS.get(sae)
    if state is None:
        state = _CLASSIC_FORWARDS[sae] = _ClassicForward()
    return state


class BaseSAE(nn.Module):
    """Shared machinery of every saefast SAE.

    ``cfg`` is an :class:`SAEConfig` (or, for variants the BatchTopK reference code has, that
    code's dict config). ``self.cfg`` is what was passed; ``self.config`` is always the SAEConfig.
    Buffers: ``num_batches_not_active`` int64 [d_sae] (batches since each latent last fired),
    ``ever_fired`` bool [d_sae]; both are in ``state_dict()``.

    Declaring a variant (class attributes; behaviour through the ``_encode`` / ``_encode_train`` /
    ``_sparsity_loss`` / ``_training_losses`` / ``_init_variant`` hooks):

    * ``architecture``: its name (``SAEConfig.architecture``, ``saefast train --architecture``,
      the ``saefast`` section of cfg.json); ``aliases``: other accepted spellings.
    * ``config_class``: the SAEConfig subclass holding its own options (default SAEConfig).
    * ``needs_top_k``: it selects by ``top_k`` (top_k required; the aux-K loss applies).
    * ``multi_layer``: its input is several layers' activations concatenated (a crosscoder; its
      config has ``crosscoder_layers``); ``saefast train`` then feeds it all the hooks at once.
    * ``unit_norm_decoder``: W_dec rows are kept at unit norm (gradient projection before each
      optimizer step, renormalisation after); False leaves their norms to the loss.
    * ``trains_b_enc``: whether b_enc is trained unless ``train_b_enc`` says otherwise.
    * ``extra_parameters``: its parameters beyond W_enc, b_enc, W_dec, b_dec, with their shapes
      in units of d_sae / d_in (e.g. ``{"threshold": ("d_sae",)}``); ``fp32_state``: tensors
      that stay float32 whatever the weights' dtype.
    * ``saelens_architecture``: the ``architecture`` written to cfg.json for SAELens;
      ``saelens_weights``: tensors it writes to sae_weights.safetensors beyond its parameters;
      ``reads_saelens``: the SAELens architectures loaded as this variant. What else differs in
      a saved folder goes through ``saelens_export`` / ``saelens_import``.
    * ``reference_name``: its ``sae_type`` in the BatchTopK reference code (None: not there).
    * ``folds_decoder_norms``: scaling a latent's pre-activation by a positive number scales its
      activation and keeps the selection (true for ReLU and per-latent thresholds, false for the
      TopK variants, whose selection compares latents), so :meth:`fold_decoder_norms` is exact.
    * ``saebench_architecture``: the ``architecture`` label SAEBench gets (default:
      ``saelens_architecture``).
    * ``summary``: one line for help texts.
    """

    architecture: ClassVar[str] = ""
    aliases: ClassVar[Tuple[str, ...]] = ()
    config_class: ClassVar[Type[SAEConfig]] = SAEConfig
    needs_top_k: ClassVar[bool] = False
    multi_layer: ClassVar[bool] = False
    unit_norm_decoder: ClassVar[bool] = True
    trains_b_enc: ClassVar[bool] = True
    extra_parameters: ClassVar[Dict[str, Tuple[str, ...]]] = {}
    fp32_state: ClassVar[Tuple[str, ...]] = ()
    saelens_architecture: ClassVar[str] = "standard"
    saelens_weights: ClassVar[Tuple[str, ...]] = ()
    reads_saelens: ClassVar[Tuple[str, ...]] = ()
    reference_name: ClassVar[Optional[str]] = None
    folds_decoder_norms: ClassVar[bool] = True
    saebench_architecture: ClassVar[Optional[str]] = None
    summary: ClassVar[str] = ""
    reference_mode: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.architecture and not issubclass(cls, batchtopk_compat.DictAPI):
            register_variant(cls)

    def __new__(cls, cfg: Any = None, *args: Any, **kwargs: Any):
        if cls is BaseSAE and isinstance(cfg, SAEConfig):
            # saefast.SAE(cfg), the classic base class's name: the variant cfg.architecture names.
            cls = variant_class(cfg.architecture)
        if isinstance(cfg, dict) and not issubclass(cls, batchtopk_compat.DictAPI):
            cls = batchtopk_compat.dict_api_class(cls)
        return super().__new__(cls)

    def __init__(self, cfg: Union[SAEConfig, Dict[str, Any]]):
        super().__init__()
        if not self.architecture:
            raise TypeError("BaseSAE (saefast.SAE) builds the variant an SAEConfig names: pass an SAEConfig, or use "
                            "a variant class such as BatchTopKSAE")
        self.cfg = cfg
        self.config = self._config_from(cfg)
        c = self.config
        self.d_in, self.d_sae, self.d_out = c.d_in, c.d_sae, c.output_width
        self.use_error_term = c.use_error_term
        self.hook_spec = c.hook_spec
        self.hook_spec_out = c.hook_spec_out
        device, dtype = torch.device(c.device), c.torch_dtype()
        W_enc, W_dec = self._initial_weights()
        self.W_enc = nn.Parameter(W_enc.to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(c.d_sae, device=device, dtype=dtype),
                                  requires_grad=c.b_enc_trained)
        self.W_dec = nn.Parameter(W_dec.to(device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, device=device, dtype=dtype))
        if c.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(c.d_in, self.d_out, device=device, dtype=dtype))
        self.register_buffer("num_batches_not_active", torch.zeros(c.d_sae, dtype=torch.long, device=device))
        self.register_buffer("ever_fired", torch.zeros(c.d_sae, dtype=torch.bool, device=device))
        self._init_variant(device)
        self.register_load_state_dict_post_hook(_drop_optional_missing)

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    def _config_from(self, cfg: Any) -> SAEConfig:
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"cfg must be an SAEConfig or the reference code's dict, got {type(cfg).__name__}")
        if cfg.architecture != self.architecture:
            raise ValueError(f"{type(self).__name__} needs cfg.architecture={self.architecture!r}, got "
                             f"{cfg.architecture!r}; use saefast.create_sae(cfg) to pick the class")
        return cfg

    def _initial_weights(self) -> Tuple[Tensor, Tensor]:
        """W_enc kaiming-uniform [d_in, d_sae] (fp32, CPU; seeded by ``config.seed`` when set);
        W_dec = W_enc.T with unit rows. A transcoder's decoder writes another space, so its W_dec
        [d_sae, d_out] is drawn independently (kaiming-uniform, then unit rows)."""
        c = self.config
        gen = torch.Generator().manual_seed(c.seed) if c.seed is not None else None
        W_enc = nn.init.kaiming_uniform_(torch.empty(c.d_in, c.d_sae), generator=gen)
        if c.is_transcoder:
            W_dec = nn.init.kaiming_uniform_(torch.empty(c.d_out, c.d_sae), generator=gen).t().contiguous()
        else:
            W_dec = W_enc.t().contiguous()
        return W_enc, W_dec / W_dec.norm(dim=-1, keepdim=True)

    def _init_variant(self, device: torch.device) -> None:
        """Variant-specific parameters and buffers."""

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """(Re)draw the weights as at construction, in place: W_enc kaiming-uniform (seeded by
        ``config.seed`` when set), W_dec = W_enc.T with unit rows, b_enc and b_dec zero. Other
        state (dead-latent counters, thresholds) is left as it is."""
        W_enc, W_dec = self._initial_weights()
        self.W_enc.copy_(W_enc)
        self.W_dec.copy_(W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def weight_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Every saved parameter's name and shape: W_enc, b_enc, W_dec, b_dec and the variant's."""
        dims = {"d_in": self.d_in, "d_sae": self.d_sae, "d_out": self.d_out}
        shapes = {"W_enc": (self.d_in, self.d_sae), "b_enc": (self.d_sae,), "W_dec": (self.d_sae, self.d_out),
                  "b_dec": (self.d_out,)}
        if self.config.skip_connection:
            shapes["W_skip"] = (self.d_in, self.d_out)
        shapes.update({name: tuple(dims[d] for d in dim_names) for name, dim_names in self.extra_parameters.items()})
        return shapes

    def _apply(self, fn, recurse=True):
        # fp32_state stays float32 whatever the weights' dtype (Adam-sized steps vanish in bf16).
        saved = {name: getattr(self, name).detach() for name in self.fp32_state if hasattr(self, name)}
        super()._apply(fn, recurse)
        for name, original in saved.items():
            current = getattr(self, name)
            if current.dtype != torch.float32:
                restored = original.to(device=current.device, dtype=torch.float32)
                if isinstance(current, nn.Parameter):
                    current.data = restored
                else:
                    self._buffers[name] = restored
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        c = self.config
        k = f", top_k={c.top_k}" if self.needs_top_k else ""
        out = f", d_out={self.d_out}" + (", skip_connection=True" if c.skip_connection else "") \
            if c.is_transcoder else ""
        return f"d_in={self.d_in}{out}, d_sae={self.d_sae}{k}, dtype={dtype_name(self.dtype)}"

    def get_hook_spec(self) -> str:
        return self.hook_spec

    # ------------------------------------------------------------------------------------------
    # Input checks and normalisation
    # ------------------------------------------------------------------------------------------

    def _flatten_input(self, x: Tensor, name: str = "x", width: str = "d_in") -> Tuple[Tensor, Tuple[int, ...]]:
        """Check x [..., d_in] (or [..., d_out] with ``width="d_out"``) and return it as a
        contiguous [N, width] plus its leading shape."""
        d = getattr(self, width)
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != d:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [batch, {d}] or "
                             f"[batch, seq, {d}] ({width}={d})")
        if x.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the SAE's weights are {self.dtype}; cast it with "
                            f"{name}.to({self.dtype}) or build the SAE with dtype='{dtype_name(x.dtype)}'")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the SAE is on {self.device}; "
                             f"move it with {name}.to('{self.device}')")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf values; check the activations (or the model "
                             "producing them) before training on them")
        return x.reshape(-1, d).contiguous(), tuple(x.shape[:-1])

    def _target_rows(self, target: Optional[Tensor], x_in: Tensor) -> Tensor:
        """What the SAE must reproduce, as [N, d_out] rows: its (normalised) input, or for a
        transcoder the ``target`` activations, row for row with the input."""
        if not self.config.is_transcoder:
            if target is not None:
                raise ValueError("target= is for transcoders (an SAE with d_out set); this SAE reconstructs its own "
                                 "input")
            return x_in
        if target is None:
            raise ValueError(f"this transcoder writes {self.hook_spec_out or 'its target'} [..., d_out={self.d_out}]: "
                             "pass target=<those activations>, row for row with x")
        y2, _ = self._flatten_input(target, "target", "d_out")
        if y2.shape[0] != x_in.shape[0]:
            raise ValueError(f"target has {y2.shape[0]} rows but x has {x_in.shape[0]}; each input row needs the "
                             "target row of the same token")
        return y2

    @staticmethod
    def _check_not_empty(x2: Tensor, what: str) -> None:
        if x2.shape[0] == 0:
            raise ValueError(f"x has no rows: {what} computes losses averaged over tokens, which an empty batch "
                             "does not have; skip empty batches before calling it")

    def _standardize(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """input_unit_norm: (x - mean) / (std + 1e-5) per token; returns (x_in, mean, std)."""
        if not self.config.input_unit_norm:
            return x, None, None
        mean = x.mean(dim=-1, keepdim=True)
        x = x - mean
        std = x.std(dim=-1, keepdim=True)
        return x / (std + STD_EPS), mean, std

    @staticmethod
    def _unstandardize(y: Tensor, mean: Optional[Tensor], std: Optional[Tensor]) -> Tensor:
        return y if mean is None else y * std + mean

    def _decode_inputs(self, x: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """(x_in, mean, std) that decoding needs from the encoded input: the standardisation to
        undo (input_unit_norm) and the input of the skip connection; Nones when neither applies."""
        c = self.config
        if not (c.input_unit_norm or c.skip_connection):
            return None, None, None
        if x is None:
            if c.skip_connection:
                raise ValueError("this transcoder has a skip connection (x @ W_skip is added to its output), so "
                                 "decoding needs its input: pass x=<the tensor that was encoded>")
            raise ValueError("this SAE standardises its input (input_unit_norm=True), so decoding needs the "
                             "raw input to undo it: pass x=<the tensor that was encoded>")
        x2, _ = self._flatten_input(x)
        return self._standardize(x2)

    # ------------------------------------------------------------------------------------------
    # Encoding (variant hooks) and decoding
    # ------------------------------------------------------------------------------------------

    def _b_dec_in(self) -> Tensor:
        """The bias subtracted before encoding (zeros when apply_b_dec_to_input is False)."""
        return self.b_dec if self.config.apply_b_dec_to_input else self.b_dec.new_zeros(self.d_in)

    def _b_enc_in(self) -> Optional[Tensor]:
        return self.b_enc

    def _encode(self, x_in: Tensor) -> SparseActs:
        """Sparse codes of normalised input [N, d_in] (the variant's selection)."""
        raise NotImplementedError

    def _encode_train(self, x_in: Tensor) -> Codes:
        """The codes of a training forward (with gradients); default: ``_encode``."""
        acts = self._encode(x_in)
        return Codes(acts, acts, self._sparsity_loss(acts))

    def _sparsity_loss(self, acts: SparseActs) -> Tensor:
        return torch.zeros((), device=self.device)

    def _codes(self, x_in: Tensor) -> Codes:
        if self.training and torch.is_grad_enabled():
            return self._encode_train(x_in)
        acts = self._encode(x_in)
        return Codes(acts, acts, self._sparsity_loss(acts))

    def _decode(self, acts: SparseActs, x_in: Optional[Tensor] = None) -> Tensor:
        """``sum values * W_dec[latent] + b_dec`` (+ ``x_in @ W_skip`` with a skip connection)."""
        out = ops.sparse_decode(acts, self.W_dec, self.b_dec)
        return self._add_skip(out, x_in)

    def _add_skip(self, out: Tensor, x_in: Optional[Tensor]) -> Tensor:
        if not self.config.skip_connection:
            return out
        skip = x_in @ self.W_skip
        return out + skip.to(out.dtype)

    # ------------------------------------------------------------------------------------------
    # The classic SAE API
    # ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, *, return_losses: bool = False, update_stats: bool = True,
                target: Optional[Tensor] = None):
        """``(x_recon, features)`` for x [batch, d_in] or [batch, seq, d_in]; features are the dense
        activations, shaped like x with d_sae last, as a :class:`~saefast.dense_features.DenseFeatures`:
        it behaves as that tensor (differentiable) but is built only when something reads it, and
        ``update_inactive_features(features)`` never builds it.

        In a training forward of a variant with the aux-K loss, the aux-K codes of the dead
        latents come out of the same encode and decode, for ``get_auxiliary_loss(x, x_recon)`` to
        use. In training mode BatchTopK's running inference threshold is updated here; the
        dead-latent counters are not (call ``update_inactive_features(features)``).
        ``return_losses=True`` returns ``training_forward(x, update_stats, target=target)`` instead
        (sparse), so a DistributedDataParallel wrapper can run the training step through its own
        forward. A transcoder returns its output [..., d_out] in place of x_recon.
        """
        if return_losses:
            return self.training_forward(x, update_stats=update_stats, target=target)
        x2, lead = self._flatten_input(x)
        x_in, mean, std = self._standardize(x2)
        classic = _classic_state(self)
        dead = self.dead_mask() if classic.start() and self._trains_aux_k() else None
        aux_recon = None
        if dead is not None and bool(dead.any()):
            codes, x_hat, aux_recon = self._train_codes_and_aux_recon(x_in, dead)
        else:
            codes = self._codes(x_in)
            x_hat = self._decode(codes.decode_acts, x_in)
        if self.training:
            self.update_threshold(codes.acts.kept_min)
        x_recon = self._unstandardize(x_hat, mean, std).reshape(*lead, self.d_out)
        classic.remember(self, x, x_recon, dead, aux_recon)
        return x_recon, DenseFeatures(codes.acts, lead)

    def encode_sparse(self, x: Tensor) -> SparseActs:
        """Sparse codes of x [..., d_in] (rows = flattened leading dims). eval() mode uses the
        inference encoding (BatchTopK: the learned threshold)."""
        x2, _ = self._flatten_input(x)
        x_in, _, _ = self._standardize(x2)
        return self._codes(x_in).acts

    def decode_sparse(self, acts: SparseActs, x: Optional[Tensor] = None) -> Tensor:
        """[B, d_out] reconstruction of sparse codes (d_out = d_in for an autoencoder). With
        input_unit_norm or a skip connection pass the input x that was encoded: the
        standardisation is undone with its statistics, and the skip connection reads it."""
        if not isinstance(acts, SparseActs):
            raise TypeError(f"acts must be a SparseActs (from encode_sparse), got {type(acts).__name__}")
        if acts.d_sae != self.d_sae:
            raise ValueError(f"acts have d_sae={acts.d_sae} but this SAE has d_sae={self.d_sae}")
        x_in, mean, std = self._decode_inputs(x)
        return self._unstandardize(self._decode(acts, x_in), mean, std)

    def encode(self, x: Tensor) -> Tensor:
        """Dense features [..., d_sae] of x [..., d_in] (b_dec subtracted first). Only for callers
        that want the dense matrix; ``encode_sparse`` is the cheap path."""
        x2, lead = self._flatten_input(x)
        x_in, _, _ = self._standardize(x2)
        return self._codes(x_in).acts.to_dense().reshape(*lead, self.d_sae)

    def decode(self, features: Tensor, x: Optional[Tensor] = None) -> Tensor:
        """``features @ W_dec + b_dec`` (+ ``x @ W_skip``) for dense features [..., d_sae], shaped
        [..., d_out] (see decode_sparse for x)."""
        if not isinstance(features, Tensor) or features.dim() < 1 or features.shape[-1] != self.d_sae:
            raise ValueError(f"features must be a tensor [..., {self.d_sae}] (d_sae), got "
                             f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
        lead = features.shape[:-1]
        x_in, mean, std = self._decode_inputs(x)
        out = self._add_skip(features.reshape(-1, self.d_sae) @ self.W_dec + self.b_dec, x_in)
        return self._unstandardize(out, mean, std).reshape(*lead, self.d_out)

    def reconstruct(self, x: Tensor) -> Tensor:
        """The SAE's output for x [..., d_in] through the sparse path (no dense features), shaped
        [..., d_out]: x's reconstruction, or a transcoder's prediction of its target."""
        x2, lead = self._flatten_input(x)
        x_in, mean, std = self._standardize(x2)
        x_hat = self._decode(self._codes(x_in).decode_acts, x_in)
        return self._unstandardize(x_hat, mean, std).reshape(*lead, self.d_out)

    def training_forward(self, x: Tensor, update_stats: bool = True, *,
                         target: Optional[Tensor] = None) -> Dict[str, Any]:
        """Sparse training step: no dense [B, d_sae] tensor is built.

        x: [..., d_in]; target: a transcoder's target [..., d_out], row for row with x (only
        transcoders take one; an SAE reproduces x).

        Returns ``loss`` (= recon_loss + sparsity_loss + aux_loss), ``recon_loss`` (the
        reconstruction term: mse_loss, or a variant's own such as Matryoshka's nested prefix
        losses), ``mse_loss`` (mean over all elements of (output - target)^2, in the normalised
        space when input_unit_norm), ``sparsity_loss`` (L1 for relu, L0 for jumprelu, times
        l1_coefficient; 0 for the TopK variants), ``aux_loss`` (TopK variants: aux_penalty * MSE of
        the top_k_aux dead latents' reconstruction of the detached residual, latents dead before
        this batch; jumprelu: its optional pre-activation loss), ``l0`` (mean active latents per
        token), ``x_recon`` (the output, [..., d_out]), ``acts`` (SparseActs),
        ``num_dead_features``, and any terms a variant adds (see its class). ``features`` (the
        dense [..., d_sae] activations, differentiable, for classic loops that pass them to
        ``update_inactive_features``) is built only when read; iterating over the dict or copying
        it does not build it.

        With ``update_stats`` (and in training mode) the dead-latent counters and BatchTopK's
        running threshold are updated; otherwise the caller does it (after an all-reduce) with
        ``update_inactive_features(acts)`` and ``update_threshold(acts.kept_min)``.
        """
        x2, lead = self._flatten_input(x)
        self._check_not_empty(x2, "training_forward")
        x_in, mean, std = self._standardize(x2)
        y_in = self._target_rows(target, x_in)
        codes, x_hat, terms = self._training_losses(x_in, y_in, self.dead_mask())
        loss = terms["recon_loss"] + codes.sparsity_loss + terms["aux_loss"]
        if update_stats and self.training:
            self.update_inactive_features(codes.acts)
            self.update_threshold(codes.acts.kept_min)
        x_recon = self._unstandardize(x_hat, mean, std).reshape(*lead, self.d_out)
        acts = codes.acts
        return LazyDict({"loss": loss, **terms, "sparsity_loss": codes.sparsity_loss, "l0": acts.l0(),
                         "x_recon": x_recon, "acts": acts, "num_dead_features": self.dead_mask().sum()},
                        lazy={"features": lambda: acts.to_dense().reshape(*lead, self.d_sae)})

    def _training_losses(self, x_in: Tensor, y_in: Tensor, dead: Tensor) -> Tuple[Codes, Tensor, Dict[str, Tensor]]:
        """The codes, the output x_hat [N, d_out] and the loss terms of a training forward on
        normalised input x_in [N, d_in] whose target is y_in [N, d_out] (x_in itself for an
        autoencoder): ``recon_loss`` (the reconstruction term of the loss), ``mse_loss``,
        ``aux_loss`` and any terms of the variant's own. ``dead``: bool [d_sae]."""
        if self._trains_aux_k() and bool(dead.any()):
            codes, x_hat, aux_loss = self._train_codes_with_aux(x_in, y_in, dead)
        else:
            codes = self._codes(x_in)
            x_hat = self._decode(codes.decode_acts, x_in)
            aux_loss = self._aux_loss(x_in, (y_in - x_hat).detach(), dead)
        mse_loss = F.mse_loss(x_hat.float(), y_in.float())
        return codes, x_hat, {"recon_loss": mse_loss, "mse_loss": mse_loss, "aux_loss": aux_loss}

    def _train_codes_with_aux(self, x_in: Tensor, y_in: Tensor, dead: Tensor) -> Tuple[Codes, Tensor, Tensor]:
        """A TopK variant's training step with aux-K: main and aux codes from one fused encode,
        both decoded by one sparse decode, so W_enc and W_dec each get one gradient buffer.
        Same numbers as ``_codes`` + ``_decode`` + ``_aux_loss`` (y_in: the rows to reproduce)."""
        codes, x_hat, aux_recon = self._train_codes_and_aux_recon(x_in, dead)
        return codes, x_hat, self._aux_penalty(aux_recon, (y_in - x_hat).detach())

    def _trains_aux_k(self) -> bool:
        """Whether a forward now is a training forward of a variant with the aux-K loss."""
        return self.needs_top_k and self.training and torch.is_grad_enabled()

    def _train_codes_and_aux_recon(self, x_in: Tensor, dead: Tensor) -> Tuple[Codes, Tensor, Tensor]:
        """(codes, x_hat [N, d_out], the aux-K codes' decode [N, d_out]) of a training forward with
        some latent dead: one fused encode and one sparse decode (see ``_train_codes_with_aux``).
        x_hat includes b_dec and the skip connection; the aux decode is the dead latents' alone."""
        c = self.config
        acts, aux_acts = ops.topk_encode_with_aux(x_in, self.W_enc, self._b_dec_in(), c.top_k, dead, c.top_k_aux,
                                                  b_enc=self._b_enc_in(), mode=self.topk_mode)
        both = ops.sparse_decode(ops.stack_rows(acts, aux_acts), self.W_dec)
        n = x_in.shape[0]
        # split, not two slices: its backward writes the two gradients into one buffer (a slice's
        # backward zero-fills a whole-size buffer each, then autograd adds them).
        main, aux_recon = both.split(n)
        x_hat = self._add_skip(main + self.b_dec.to(both.dtype), x_in)
        return Codes(acts, acts, self._sparsity_loss(acts)), x_hat, aux_recon

    def _aux_penalty(self, aux_recon: Tensor, residual: Tensor) -> Tensor:
        return self.config.aux_penalty * F.mse_loss(aux_recon.float(), residual.float())

    def _aux_loss(self, x_in: Tensor, residual: Tensor, dead: Tensor) -> Tensor:
        """aux_penalty * mean((decode of each row's top_k_aux dead latents - residual)^2); zero for
        variants without aux-K or when no latent is dead."""
        c = self.config
        if not self.needs_top_k or not bool(dead.any()):
            return torch.zeros((), device=self.device)
        aux_acts = ops.auxk_encode(x_in, self.W_enc, self._b_dec_in(), dead, c.top_k_aux, b_enc=self._b_enc_in())
        aux_recon = ops.sparse_decode(aux_acts, self.W_dec)
        return self._aux_penalty(aux_recon, residual)

    def get_auxiliary_loss(self, x: Tensor, x_recon: Tensor, target: Optional[Tensor] = None) -> Tensor:
        """Aux-K loss of x and its reconstruction from ``forward`` (0 for variants without aux-K or
        when no latent is dead); a transcoder also takes its ``target``. The residual is detached,
        as in the TopK papers.

        Called with the very x and x_recon of the last training ``forward`` (same dead latents,
        weights unchanged), it reuses that forward's aux-K codes and their decode, which came out
        of the forward's own encode and decode (one gradient buffer per weight); otherwise the
        aux-K codes are computed here. The loss is the same either way."""
        x2, lead = self._flatten_input(x)
        if not isinstance(x_recon, Tensor) or x_recon.numel() != x2.shape[0] * self.d_out:
            raise ValueError(f"x_recon must be the output of forward(x), [..., d_out={self.d_out}] for x "
                             f"{tuple(x.shape)}; got "
                             f"{tuple(x_recon.shape) if isinstance(x_recon, Tensor) else type(x_recon).__name__}")
        x_in, mean, std = self._standardize(x2)
        y_in = self._target_rows(target, x_in)
        x_hat = x_recon.reshape(-1, self.d_out)
        if mean is not None:
            x_hat = (x_hat - mean) / std
        dead = self.dead_mask()
        aux_recon = _classic_state(self).take(self, x, x_recon, dead)
        if aux_recon is not None:
            return self._aux_penalty(aux_recon, (y_in - x_hat).detach())
        return self._aux_loss(x_in, (y_in - x_hat).detach(), dead)

    # ------------------------------------------------------------------------------------------
    # Decoder maintenance (through the fused ops)
    # ------------------------------------------------------------------------------------------

    def project_decoder_gradients(self) -> None:
        """Remove from W_dec.grad the part parallel to each decoder row (after backward, before
        the optimizer step), so steps rotate decoder rows rather than rescale them. A no-op for
        variants whose decoder norms are free (``unit_norm_decoder`` False)."""
        if not self.unit_norm_decoder:
            return
        if self.W_dec.grad is None:
            raise ValueError("W_dec has no gradient; call loss.backward() before project_decoder_gradients()")
        ops.project_decoder_grad_(self.W_dec, self.W_dec.grad)

    def normalize_decoder(self) -> None:
        """Rows of W_dec to unit norm, in place (after the optimizer step); a no-op when
        ``unit_norm_decoder`` is False."""
        if self.unit_norm_decoder:
            ops.normalize_decoder_(self.W_dec)

    def make_decoder_weights_and_grad_unit_norm(self) -> None:
        """Between backward and the optimizer step: W_dec rows to unit norm, then W_dec.grad made
        orthogonal to them, in one fused pass (the BatchTopK reference code's name); a no-op when
        ``unit_norm_decoder`` is False."""
        if not self.unit_norm_decoder:
            return
        if self.W_dec.grad is None:
            raise ValueError("W_dec has no gradient; call loss.backward() before "
                             "make_decoder_weights_and_grad_unit_norm()")
        ops.normalize_decoder_and_project_grad_(self.W_dec, self.W_dec.grad)

    # ------------------------------------------------------------------------------------------
    # Dead latents and the inference threshold
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_inactive_features(self, features: Union[Tensor, SparseActs]) -> None:
        """Count one more batch for every latent that did not fire and reset those that did.

        features: a bool mask [d_sae] of latents that fired, a SparseActs, or dense features
        [..., d_sae] (a latent fired if any entry is nonzero; ``forward``'s features are read
        through their sparse codes unless they were built).
        """
        if isinstance(features, DenseFeatures) and not features.is_materialized:
            features = features.acts
        if isinstance(features, SparseActs):
            fired = features.fired()
        elif isinstance(features, Tensor):
            if features.dtype == torch.bool and features.shape == (self.d_sae,):
                fired = features
            elif features.dim() >= 1 and features.shape[-1] == self.d_sae:
                fired = (features.detach().reshape(-1, self.d_sae) != 0).any(0)
            else:
                raise ValueError(f"features must be a bool mask [{self.d_sae}], a SparseActs or dense "
                                 f"features [..., {self.d_sae}]; got shape {tuple(features.shape)}")
        else:
            raise TypeError(f"features must be a Tensor or SparseActs, got {type(features).__name__}")
        fired = fired.to(self.num_batches_not_active.device)
        self.ever_fired |= fired
        self.num_batches_not_active.copy_(
            torch.where(fired, torch.zeros_like(self.num_batches_not_active), self.num_batches_not_active + 1))

    def dead_mask(self) -> Tensor:
        """Bool [d_sae]: latents that have not fired for n_batches_to_dead batches."""
        return self.num_batches_not_active >= self.config.n_batches_to_dead

    def count_dead_features(self) -> int:
        """Number of dead latents (see dead_mask)."""
        return int(self.dead_mask().sum())

    def count_never_fired(self) -> int:
        """Number of latents that never fired since the counters were created or loaded."""
        return int((~self.ever_fired).sum())

    def dead_feature_percentage(self) -> float:
        """Dead latents as a percentage (0-100) of d_sae."""
        return 100.0 * self.count_dead_features() / self.d_sae

    def update_threshold(self, kept_min: Tensor) -> None:
        """BatchTopK: fold one batch's smallest kept activation into the inference threshold.
        No-op for the other variants."""

    def fold_input_scale(self, scale: float, target_scale: Optional[float] = None) -> None:
        """The SAE was trained on ``x * scale`` (a transcoder: to predict ``y * target_scale``);
        rewrite it in place to take raw x and return raw-scale outputs. Activations scale by
        1/target_scale (b_enc and thresholds are divided by it, W_enc and W_skip multiplied by
        scale/target_scale, b_dec divided by target_scale); the unit-norm W_dec is unchanged.
        ``target_scale`` defaults to ``scale`` (an autoencoder's target is its input). With
        input_unit_norm the standardisation already removes any global scale, so nothing changes."""
        scale = self._check_scale("scale", scale)
        out_scale = scale if target_scale is None else self._check_scale("target_scale", target_scale)
        if not self.config.is_transcoder and out_scale != scale:
            raise ValueError(f"target_scale={target_scale} differs from scale={scale}, but this SAE reconstructs "
                             "its own input; only a transcoder has a separate target scale")
        if self.config.input_unit_norm:
            logger.info("fold_input_scale: input_unit_norm standardises each token, nothing to fold")
            return
        with torch.no_grad():
            if out_scale != scale:
                self.W_enc.mul_(scale / out_scale)
            if self.config.skip_connection:
                self.W_skip.mul_(scale / out_scale)
            self.b_enc.div_(out_scale)
            self.b_dec.div_(out_scale)
            self._fold_threshold(out_scale)

    @staticmethod
    def _check_scale(name: str, scale: Any) -> float:
        if isinstance(scale, Tensor):
            scale = float(scale)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"{name}={scale!r} must be a finite number > 0")
        return float(scale)

    def _fold_threshold(self, scale: Union[float, Tensor]) -> None:
        """Divide the variant's thresholds by scale (a float, or a [d_sae] tensor of one scale per
        latent)."""

    def decoder_norms_are_unit(self) -> bool:
        """Whether every W_dec row has norm 1 within 1e-5 (1e-2 for 16-bit weights): the check
        SAEBench applies to custom SAEs."""
        tol = 1e-2 if self.dtype in (torch.bfloat16, torch.float16) else 1e-5
        return bool(((self.W_dec.detach().float().norm(dim=1) - 1).abs() <= tol).all())

    @torch.no_grad()
    def fold_decoder_norms(self) -> "BaseSAE":
        """Give every W_dec row norm 1 without changing the reconstruction, in place: latent i's
        decoder norm n_i moves into the encoder (W_enc[:, i], b_enc[i] and its threshold times
        n_i), so its activation scales by n_i and ``activation * W_dec[i]`` is unchanged.
        Exact for variants with ``folds_decoder_norms``; a TopK variant (whose selection compares
        latents, so scaling them would change which are kept) raises a ValueError unless its
        rows are already unit norm. Returns self."""
        norms = self.W_dec.detach().float().norm(dim=1)
        if self.decoder_norms_are_unit():
            return self
        if not self.folds_decoder_norms:
            raise ValueError(f"{type(self).__name__} selects latents by comparing their activations, so moving its "
                             f"decoder norms (from {float(norms.min()):.4g} to {float(norms.max()):.4g}) into the "
                             "encoder would change which latents are kept; renormalise with sae.normalize_decoder() "
                             "and fine-tune, or evaluate it as it is")
        if not bool((norms > 0).all()):
            raise ValueError(f"W_dec has {int((norms == 0).sum())} all-zero row(s): their norm cannot be folded")
        scale = norms.to(self.dtype)
        self.W_enc.mul_(scale)
        self.b_enc.mul_(scale)
        self.W_dec.div_(scale[:, None])
        self._fold_threshold(1.0 / norms)
        return self

    # ------------------------------------------------------------------------------------------
    # The SAELens layout (saefast.io writes and reads the files; the variant says what differs)
    # ------------------------------------------------------------------------------------------

    def saelens_export(self) -> SavedExtras:
        """What this variant adds to a saved folder beyond W_enc, b_enc, W_dec, b_dec and the
        dead-latent counters."""
        return SavedExtras()

    def saelens_import(self, weights: Dict[str, Tensor], state: Dict[str, Tensor], section: Dict[str, Any],
                       where: str) -> None:
        """Restore what :meth:`saelens_export` wrote. ``weights`` holds every declared parameter
        (already copied in); ``state`` and ``section`` are empty for a foreign SAELens folder."""

    @classmethod
    def saelens_config_values(cls, cfg: Dict[str, Any], where: str) -> Dict[str, Any]:
        """SAEConfig values this variant reads from a foreign SAELens cfg.json (e.g. TopK's k)."""
        return {}

    # ------------------------------------------------------------------------------------------
    # Files
    # ------------------------------------------------------------------------------------------

    def save(self, path, history: Optional[Dict[str, Any]] = None, overwrite: bool = False,
             log_sparsity: Optional[Tensor] = None):
        """Write ``path/cfg.json`` + ``sae_weights.safetensors`` (SAELens layout; + history.json,
        sparsity.safetensors); see :func:`saefast.io.save_sae`. Returns the folder as a Path."""
        return io.save_sae(self, path, history=history, overwrite=overwrite, log_sparsity=log_sparsity)

    @classmethod
    def load(cls, path, device: str = "cpu", load_history: bool = False):
        """Load a folder written by :meth:`save` or by the classic SAE API (``weights.pt`` +
        ``config.json`` + ``history.json``; its config names no architecture, so this class's is
        used), or any folder :func:`saefast.io.load_sae` reads. Returns the SAE, or
        ``(sae, history)`` with load_history=True (history None when the folder has none)."""
        if cls is not BaseSAE and io.sae_folder_kind(path) == "classic":
            sae = io.load_classic_checkpoint(path, device=device, architecture=cls.architecture)
        else:
            sae = io.load_sae(path, device=device)
        if cls is not BaseSAE and not isinstance(sae, cls):
            raise ValueError(f"{path} holds a {type(sae).__name__} (architecture={sae.architecture!r}), not a "
                             f"{cls.__name__}; load it with saefast.load_sae(path)")
        if load_history:
            return sae, io.read_history(path)
        return sae
