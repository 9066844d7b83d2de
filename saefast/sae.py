"""SAE classes on top of saefast.ops: BatchTopK, TopK, ReLU (L1) and JumpReLU, one shared base.

Notation: B tokens, d_in input width, d_sae latents, k active latents per token.
Parameters (SAELens layout): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` (+ ``threshold [d_sae]`` fp32 for JumpReLU). Encoding is
``pre = relu((x - b_dec) @ W_enc + b_enc)`` followed by the variant's selection:

* ``BatchTopKSAE``: training keeps the B*k largest entries of the whole batch; ``eval()`` keeps
  ``pre > topk_threshold``, a running (fp32) estimate of the smallest kept value during training,
  so a token's code does not depend on its batch. b_enc is frozen at zero (no encoder bias).
* ``TopKSAE``: the k largest entries of each token. b_enc frozen at zero.
* ``VanillaSAE``: every positive entry (ReLU) with an L1 penalty.
* ``JumpReLUSAE``: ``pre > threshold`` per latent; the threshold learns through a
  straight-through estimator (rectangle kernel of width ``jumprelu_bandwidth``) and an L0 penalty.

Two ways in, both running on the sparse ops (no dense [B, d_sae] tensor unless asked for):

1. ``BatchTopKSAE(cfg: SAEConfig)``, the user's API: ``forward(x) -> (x_recon, features)`` with
   dense features, ``training_forward(x) -> dict`` (sparse), ``encode``/``decode``,
   ``get_auxiliary_loss``, ``project_decoder_gradients``, ``normalize_decoder``,
   ``update_inactive_features``, ``count_dead_features``, ``save``/``load``.
2. ``BatchTopKSAE(cfg: dict)``, the BatchTopK reference code's API (keys act_size, dict_size,
   top_k, top_k_aux, aux_penalty, n_batches_to_dead, input_unit_norm, l1_coeff, seed, dtype,
   device): ``forward(x) -> dict`` with that code's keys and maths, counters updated inside
   forward, ``make_decoder_weights_and_grad_unit_norm()``.
"""
from __future__ import annotations

import difflib
import logging
import math
from typing import Any, ClassVar, Dict, NamedTuple, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from . import ops
from .config import SAEConfig, dtype_name, parse_dtype
from .ops import SparseActs

__all__ = ["BaseSAE", "BatchTopKSAE", "TopKSAE", "VanillaSAE", "JumpReLUSAE", "create_sae",
           "SAE_CLASSES"]

logger = logging.getLogger(__name__)

STD_EPS = 1e-5  # input_unit_norm: x / (std + STD_EPS), as in the BatchTopK reference code
_OPTIONAL_STATE = ("num_batches_not_active", "ever_fired", "topk_threshold")
_REFERENCE_KEYS = ("act_size", "dict_size", "aux_penalty", "n_batches_to_dead", "l1_coeff", "seed",
                   "dtype", "device")
_REFERENCE_TOPK_KEYS = ("top_k", "top_k_aux")
# Every other key the reference code's config dict holds (training, data and logging options that
# the SAE ignores); any key outside these is a typo or a foreign option.
_REFERENCE_OTHER_KEYS = (
    "input_unit_norm", "hook_point", "layer", "site", "model_name", "dataset_path", "seq_len", "sae_type",
    "batch_size", "lr", "num_tokens", "beta1", "beta2", "max_grad_norm", "model_batch_size",
    "num_batches_in_buffer", "wandb_project", "perf_log_freq", "checkpoint_freq", "bandwidth", "name",
)


def _check_reference_keys(cfg: Dict[str, Any]) -> None:
    """Name unknown keys that look like misspellings of known ones (they would otherwise be ignored
    silently, e.g. ``input_unit_nrom``); other unknown keys are logged and ignored."""
    known = _REFERENCE_KEYS + _REFERENCE_TOPK_KEYS + _REFERENCE_OTHER_KEYS
    for key in sorted(k for k in cfg if k not in known):
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
        if close:
            raise ValueError(f"the reference config dict has an unknown key {key!r}; did you mean {close[0]!r}? "
                             "(rename it: unknown keys are not used)")
        logger.warning("the reference config dict's key %r is not an SAE option; it is ignored", key)


def _config_from_reference(cfg: Dict[str, Any], architecture: str) -> SAEConfig:
    """The BatchTopK reference code's dict config -> SAEConfig (same semantics)."""
    _check_reference_keys(cfg)
    required = _REFERENCE_KEYS + (_REFERENCE_TOPK_KEYS if architecture in ("batchtopk", "topk") else ())
    missing = [key for key in required if key not in cfg]
    if missing:
        raise ValueError(f"the reference config dict is missing keys {missing}; it needs {list(required)} "
                         "(and optionally input_unit_norm)")
    d_sae = cfg["dict_size"]
    top_k_aux = cfg.get("top_k_aux")
    if isinstance(top_k_aux, int) and isinstance(d_sae, int):
        # The reference code uses min(top_k_aux, n_dead) <= dict_size, so clamping changes nothing.
        top_k_aux = min(top_k_aux, d_sae)
    hook_spec = cfg.get("hook_point")
    return SAEConfig(
        d_in=cfg["act_size"], d_sae=d_sae, l1_coefficient=float(cfg["l1_coeff"]),
        dtype=dtype_name(parse_dtype(cfg["dtype"], "cfg['dtype']")), device=str(cfg["device"]),
        top_k=cfg.get("top_k") if architecture in ("batchtopk", "topk") else None,
        top_k_aux=top_k_aux if architecture in ("batchtopk", "topk") else None,
        n_batches_to_dead=cfg["n_batches_to_dead"], aux_penalty=float(cfg["aux_penalty"]),
        architecture=architecture, input_unit_norm=bool(cfg.get("input_unit_norm", False)),
        seed=cfg["seed"], hook_layer=cfg.get("layer", 9),
        hook_name=f"hook_{cfg['site']}" if "site" in cfg else "hook_resid_post",
        hook_spec=hook_spec if isinstance(hook_spec, str) else None,
        model_name=cfg.get("model_name"), dataset_path=cfg.get("dataset_path"),
        context_size=cfg.get("seq_len"))


def _drop_optional_missing(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict hook: state dicts without the bookkeeping buffers (the reference code's,
    SAELens') still load strictly; those buffers keep their current values."""
    for key in list(incompatible_keys.missing_keys):
        if key.rsplit(".", 1)[-1] in _OPTIONAL_STATE:
            incompatible_keys.missing_keys.remove(key)


def _filter_acts(acts: SparseActs, keep: Tensor) -> SparseActs:
    """The entries of ``acts`` where ``keep`` [nnz] is True, CSR offsets rebuilt."""
    row_ids = acts.row_ids[keep]
    counts = torch.bincount(row_ids.long(), minlength=acts.n_rows)
    offsets = torch.zeros_like(acts.offsets)
    offsets[1:] = torch.cumsum(counts, 0)
    values = acts.values[keep]
    kept_min = values.detach().float().min() if values.numel() else torch.zeros((), device=values.device)
    return SparseActs(values, acts.indices[keep], row_ids, offsets, kept_min, acts.d_sae)


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).float()


def _above(z: Tensor, theta: Tensor) -> Tensor:
    """``z > theta`` with the ops' threshold rule: z (any float dtype) widened exactly to float32
    (float64 for float64) against the float32 threshold, never the threshold rounded to z's dtype."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    return z.to(acc) > theta.to(acc)


class _JumpReLUSTE(torch.autograd.Function):
    """``z * (z > theta)`` over sparse entries; z, theta [nnz] (theta: each entry's latent threshold).

    Backward: dz = (z > theta) * g; dtheta = -(theta / eps) * rect((z - theta) / eps) * g, the
    straight-through estimator of Rajamanoharan et al. (2024).
    """

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * _above(z, theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        grad_z = g * _above(z, theta)
        grad_theta = -(theta / ctx.eps) * _rectangle((z.float() - theta) / ctx.eps) * g.float()
        return grad_z, grad_theta, None


class _StepSTE(torch.autograd.Function):
    """``(z > theta)`` as float; backward only to theta: -(1 / eps) * rect((z - theta) / eps) * g."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return _above(z, theta).float()

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        grad_theta = -(1.0 / ctx.eps) * _rectangle((z.float() - theta) / ctx.eps) * g.float()
        return None, grad_theta, None


class _Codes(NamedTuple):
    decode_acts: SparseActs   # what the decoder sees (JumpReLU: includes zeroed in-band entries)
    acts: SparseActs          # the active latents
    sparsity_loss: Tensor     # fp32 scalar


class _ReferenceOutput(dict):
    """The reference code's forward() dict. ``feature_acts`` (dense [B, d_sae]) is built on first
    access only; ``acts`` holds the same activations sparsely."""

    def __missing__(self, key):
        if key == "feature_acts":
            acts, lead = dict.__getitem__(self, "acts"), self._lead
            dense = acts.to_dense().reshape(*lead, acts.d_sae)
            self[key] = dense
            return dense
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        return key == "feature_acts" or dict.__contains__(self, key)

    def get(self, key, default=None):
        return self[key] if key in self else default


class BaseSAE(nn.Module):
    """Shared machinery of every saefast SAE (see the module docstring for the two APIs).

    ``cfg`` is an :class:`SAEConfig` (the user's API) or the BatchTopK reference code's dict.
    ``self.cfg`` is what was passed; ``self.config`` is always the SAEConfig.
    Buffers: ``num_batches_not_active`` int64 [d_sae] (batches since each latent last fired),
    ``ever_fired`` bool [d_sae]; both are in ``state_dict()``.
    """

    architecture: ClassVar[str] = ""
    _FP32_STATE: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, cfg: Union[SAEConfig, Dict[str, Any]]):
        super().__init__()
        if type(self) is BaseSAE:
            raise TypeError("BaseSAE is abstract; use create_sae(cfg) or one of BatchTopKSAE, TopKSAE, "
                            "VanillaSAE, JumpReLUSAE")
        if isinstance(cfg, dict):
            if self.architecture == "jumprelu":
                raise TypeError("JumpReLUSAE takes an SAEConfig; the reference code's dict config is "
                                "supported by BatchTopKSAE, TopKSAE and VanillaSAE")
            self.reference_mode = True
            self.config = _config_from_reference(cfg, self.architecture)
        elif isinstance(cfg, SAEConfig):
            if cfg.architecture != self.architecture:
                raise ValueError(f"{type(self).__name__} needs cfg.architecture={self.architecture!r}, got "
                                 f"{cfg.architecture!r}; use saefast.create_sae(cfg) to pick the class")
            self.reference_mode = False
            self.config = cfg
        else:
            raise TypeError(f"cfg must be an SAEConfig or the reference code's dict, got {type(cfg).__name__}")
        self.cfg = cfg
        c = self.config
        self.d_in, self.d_sae = c.d_in, c.d_sae
        self.use_error_term = c.use_error_term
        self.hook_spec = c.hook_spec
        device, dtype = torch.device(c.device), c.torch_dtype
        W_enc, W_dec = self._initial_weights()
        self.W_enc = nn.Parameter(W_enc.to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(c.d_sae, device=device, dtype=dtype),
                                  requires_grad=c.b_enc_trained)
        self.W_dec = nn.Parameter(W_dec.to(device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(c.d_in, device=device, dtype=dtype))
        self.register_buffer("num_batches_not_active", torch.zeros(c.d_sae, dtype=torch.long, device=device))
        self.register_buffer("ever_fired", torch.zeros(c.d_sae, dtype=torch.bool, device=device))
        self._init_variant(device)
        self.register_load_state_dict_post_hook(_drop_optional_missing)

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    def _initial_weights(self) -> Tuple[Tensor, Tensor]:
        """W_enc kaiming-uniform [d_in, d_sae] (fp32, CPU); W_dec = W_enc.T with unit rows.

        Reference mode repeats the reference code's steps exactly (global seed, and a second
        kaiming draw for W_dec that is then overwritten) so that its weights are reproduced.
        """
        c = self.config
        if self.reference_mode:
            torch.manual_seed(c.seed)
            W_enc = nn.init.kaiming_uniform_(torch.empty(c.d_in, c.d_sae))
            nn.init.kaiming_uniform_(torch.empty(c.d_sae, c.d_in))
        else:
            gen = torch.Generator().manual_seed(c.seed) if c.seed is not None else None
            W_enc = nn.init.kaiming_uniform_(torch.empty(c.d_in, c.d_sae), generator=gen)
        W_dec = W_enc.t().contiguous()
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        return W_enc, W_dec

    def _init_variant(self, device: torch.device) -> None:
        """Variant-specific parameters and buffers."""

    def _apply(self, fn, recurse=True):
        # Thresholds stay fp32 whatever the weights' dtype (Adam-sized steps vanish in bf16).
        saved = {name: getattr(self, name).detach() for name in self._FP32_STATE if hasattr(self, name)}
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
        k = f", top_k={c.top_k}" if c.top_k is not None and self.architecture in ("batchtopk", "topk") else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}{k}, dtype={dtype_name(self.dtype)}"

    def get_hook_spec(self) -> str:
        return self.hook_spec

    # ------------------------------------------------------------------------------------------
    # Input checks and normalisation
    # ------------------------------------------------------------------------------------------

    def _flatten_input(self, x: Tensor, name: str = "x") -> Tuple[Tensor, Tuple[int, ...]]:
        """Check x [..., d_in] and return it as a contiguous [N, d_in] plus its leading shape."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != self.d_in:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [batch, {self.d_in}] or "
                             f"[batch, seq, {self.d_in}] (d_in={self.d_in})")
        if x.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the SAE's weights are {self.dtype}; cast it with "
                            f"{name}.to({self.dtype}) or build the SAE with dtype='{dtype_name(x.dtype)}'")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the SAE is on {self.device}; "
                             f"move it with {name}.to('{self.device}')")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf values; check the activations (or the model "
                             "producing them) before training on them")
        return x.reshape(-1, self.d_in).contiguous(), tuple(x.shape[:-1])

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

    def _input_stats(self, x: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        if not self.config.input_unit_norm:
            return None, None
        if x is None:
            raise ValueError("this SAE standardises its input (input_unit_norm=True), so decoding needs the "
                             "raw input to undo it: pass x=<the tensor that was encoded>")
        x2, _ = self._flatten_input(x)
        _, mean, std = self._standardize(x2)
        return mean, std

    # ------------------------------------------------------------------------------------------
    # Encoding (variant hooks) and decoding
    # ------------------------------------------------------------------------------------------

    def _b_dec_in(self) -> Tensor:
        """The bias subtracted before encoding (zeros when apply_b_dec_to_input is False)."""
        return self.b_dec if self.config.apply_b_dec_to_input else torch.zeros_like(self.b_dec)

    def _b_enc_in(self) -> Optional[Tensor]:
        # The reference code's TopK variants have no encoder bias in their maths.
        if self.reference_mode and self.architecture in ("batchtopk", "topk"):
            return None
        return self.b_enc

    def _encode(self, x_in: Tensor) -> SparseActs:
        """Sparse codes of normalised input [N, d_in] (selection per the variant and mode)."""
        raise NotImplementedError

    def _encode_train(self, x_in: Tensor) -> _Codes:
        acts = self._encode(x_in)
        return _Codes(acts, acts, self._sparsity_loss(acts))

    def _sparsity_loss(self, acts: SparseActs) -> Tensor:
        return torch.zeros((), device=self.device)

    def _codes(self, x_in: Tensor) -> _Codes:
        if self.training and torch.is_grad_enabled():
            return self._encode_train(x_in)
        acts = self._encode(x_in)
        return _Codes(acts, acts, self._sparsity_loss(acts))

    def _decode(self, acts: SparseActs) -> Tensor:
        return ops.sparse_decode(acts, self.W_dec, self.b_dec)

    # ------------------------------------------------------------------------------------------
    # The user's API
    # ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, *, return_losses: bool = False, update_stats: bool = True):
        """User API: ``(x_recon, features)`` for x [batch, d_in] or [batch, seq, d_in]; features
        are dense, shaped like x with d_sae last. Reference mode: the reference code's dict.

        In training mode BatchTopK's running inference threshold is updated here; the
        dead-latent counters are not (call ``update_inactive_features(features)``).
        ``return_losses=True`` returns ``training_forward(x, update_stats)`` instead (sparse), so
        a DistributedDataParallel wrapper can run the training step through its own forward.
        """
        if return_losses:
            return self.training_forward(x, update_stats=update_stats)
        if self.reference_mode:
            return self._reference_forward(x)
        x2, lead = self._flatten_input(x)
        x_in, mean, std = self._standardize(x2)
        codes = self._codes(x_in)
        if self.training:
            self.update_threshold(codes.acts.kept_min)
        x_recon = self._unstandardize(self._decode(codes.decode_acts), mean, std)
        features = codes.acts.to_dense().reshape(*lead, self.d_sae)
        return x_recon.reshape(*lead, self.d_in), features

    def encode_sparse(self, x: Tensor) -> SparseActs:
        """Sparse codes of x [..., d_in] (rows = flattened leading dims). eval() mode uses the
        inference encoding (BatchTopK: the learned threshold)."""
        x2, _ = self._flatten_input(x)
        x_in, _, _ = self._standardize(x2)
        return self._codes(x_in).acts

    def decode_sparse(self, acts: SparseActs, x: Optional[Tensor] = None) -> Tensor:
        """[B, d_in] reconstruction of sparse codes. With input_unit_norm pass the raw input x
        that was encoded, to undo the standardisation."""
        if not isinstance(acts, SparseActs):
            raise TypeError(f"acts must be a SparseActs (from encode_sparse), got {type(acts).__name__}")
        if acts.d_sae != self.d_sae:
            raise ValueError(f"acts have d_sae={acts.d_sae} but this SAE has d_sae={self.d_sae}")
        mean, std = self._input_stats(x)
        return self._unstandardize(self._decode(acts), mean, std)

    def encode(self, x: Tensor) -> Tensor:
        """Dense features [..., d_sae] of x [..., d_in] (b_dec subtracted first). Only for callers
        that want the dense matrix; ``encode_sparse`` is the cheap path."""
        x2, lead = self._flatten_input(x)
        x_in, _, _ = self._standardize(x2)
        return self._codes(x_in).acts.to_dense().reshape(*lead, self.d_sae)

    def decode(self, features: Tensor, x: Optional[Tensor] = None) -> Tensor:
        """``features @ W_dec + b_dec`` for dense features [..., d_sae] (see decode_sparse for x)."""
        if not isinstance(features, Tensor) or features.dim() < 1 or features.shape[-1] != self.d_sae:
            raise ValueError(f"features must be a tensor [..., {self.d_sae}] (d_sae), got "
                             f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
        lead = features.shape[:-1]
        mean, std = self._input_stats(x)
        out = features.reshape(-1, self.d_sae) @ self.W_dec + self.b_dec
        return self._unstandardize(out, mean, std).reshape(*lead, self.d_in)

    def reconstruct(self, x: Tensor) -> Tensor:
        """x_recon shaped like x through the sparse path (no dense features)."""
        x2, lead = self._flatten_input(x)
        x_in, mean, std = self._standardize(x2)
        x_hat = self._decode(self._codes(x_in).decode_acts)
        return self._unstandardize(x_hat, mean, std).reshape(*lead, self.d_in)

    def training_forward(self, x: Tensor, update_stats: bool = True) -> Dict[str, Any]:
        """Sparse training step: no dense [B, d_sae] tensor is built.

        Returns ``loss`` (= mse_loss + sparsity_loss + aux_loss), ``mse_loss`` (mean over all
        elements, in the normalised space when input_unit_norm), ``sparsity_loss`` (L1 for relu, L0
        for jumprelu, times l1_coefficient; 0 for the TopK variants), ``aux_loss`` (TopK variants:
        aux_penalty * MSE of the top_k_aux dead latents' reconstruction of the detached residual;
        latents dead before this batch), ``l0`` (mean active latents per token), ``x_recon``
        (shaped like x), ``acts`` (SparseActs) and ``num_dead_features``.

        With ``update_stats`` (and in training mode) the dead-latent counters and BatchTopK's
        running threshold are updated; otherwise the caller does it (after an all-reduce) with
        ``update_inactive_features(acts)`` and ``update_threshold(acts.kept_min)``.
        """
        x2, lead = self._flatten_input(x)
        self._check_not_empty(x2, "training_forward")
        x_in, mean, std = self._standardize(x2)
        dead = self.dead_mask()
        if self.architecture in ("batchtopk", "topk") and self.training and torch.is_grad_enabled() \
                and bool(dead.any()):
            codes, x_hat, aux_loss = self._train_codes_with_aux(x_in, dead)
        else:
            codes = self._codes(x_in)
            x_hat = self._decode(codes.decode_acts)
            aux_loss = self._aux_loss(x_in, (x_in - x_hat).detach(), dead)
        mse_loss = (x_hat.float() - x_in.float()).pow(2).mean()
        loss = mse_loss + codes.sparsity_loss + aux_loss
        if update_stats and self.training:
            self.update_inactive_features(codes.acts)
            self.update_threshold(codes.acts.kept_min)
        x_recon = self._unstandardize(x_hat, mean, std).reshape(*lead, self.d_in)
        return {"loss": loss, "mse_loss": mse_loss, "sparsity_loss": codes.sparsity_loss,
                "aux_loss": aux_loss, "l0": codes.acts.l0(), "x_recon": x_recon, "acts": codes.acts,
                "num_dead_features": self.dead_mask().sum()}

    def _train_codes_with_aux(self, x_in: Tensor, dead: Tensor) -> Tuple[_Codes, Tensor, Tensor]:
        """The TopK variants' training step with aux-K: main and aux codes from one fused encode,
        both decoded by one sparse decode, so W_enc and W_dec each get one gradient buffer.
        Same numbers as ``_codes`` + ``_decode`` + ``_aux_loss``."""
        c = self.config
        mode = "batch" if self.architecture == "batchtopk" else "row"
        acts, aux_acts = ops.topk_encode_with_aux(x_in, self.W_enc, self._b_dec_in(), c.top_k, dead, c.top_k_aux,
                                                  b_enc=self._b_enc_in(), mode=mode)
        both = ops.sparse_decode(ops.stack_rows(acts, aux_acts), self.W_dec)
        n = x_in.shape[0]
        x_hat = both[:n] + self.b_dec.to(both.dtype)
        residual = (x_in - x_hat).detach()
        return _Codes(acts, acts, self._sparsity_loss(acts)), x_hat, self._aux_penalty(both[n:], residual)

    def _aux_penalty(self, aux_recon: Tensor, residual: Tensor) -> Tensor:
        return self.config.aux_penalty * (aux_recon.float() - residual.float()).pow(2).mean()

    def _aux_loss(self, x_in: Tensor, residual: Tensor, dead: Tensor) -> Tensor:
        """aux_penalty * mean((decode of each row's top_k_aux dead latents - residual)^2)."""
        c = self.config
        if self.architecture not in ("batchtopk", "topk") or not bool(dead.any()):
            return torch.zeros((), device=self.device)
        aux_acts = ops.auxk_encode(x_in, self.W_enc, self._b_dec_in(), dead, c.top_k_aux, b_enc=self._b_enc_in())
        aux_recon = ops.sparse_decode(aux_acts, self.W_dec)
        return self._aux_penalty(aux_recon, residual)

    def get_auxiliary_loss(self, x: Tensor, x_recon: Tensor) -> Tensor:
        """User API: aux-K loss of x and its reconstruction from ``forward`` (0 for ReLU/JumpReLU
        or when no latent is dead). The residual is detached, as in the TopK papers."""
        x2, lead = self._flatten_input(x)
        if not isinstance(x_recon, Tensor) or x_recon.numel() != x2.numel():
            raise ValueError(f"x_recon must have the shape of x {tuple(x.shape)}, got "
                             f"{tuple(x_recon.shape) if isinstance(x_recon, Tensor) else type(x_recon).__name__}")
        x_in, mean, std = self._standardize(x2)
        x_hat = x_recon.reshape(-1, self.d_in)
        if mean is not None:
            x_hat = (x_hat - mean) / std
        return self._aux_loss(x_in, (x_in - x_hat).detach(), self.dead_mask())

    # ------------------------------------------------------------------------------------------
    # Decoder maintenance (through the fused ops)
    # ------------------------------------------------------------------------------------------

    def project_decoder_gradients(self) -> None:
        """Remove from W_dec.grad the part parallel to each decoder row (after backward, before
        the optimizer step), so steps rotate decoder rows rather than rescale them."""
        if self.W_dec.grad is None:
            raise ValueError("W_dec has no gradient; call loss.backward() before project_decoder_gradients()")
        ops.project_decoder_grad_(self.W_dec, self.W_dec.grad)

    def normalize_decoder(self) -> None:
        """Rows of W_dec to unit norm, in place (after the optimizer step)."""
        ops.normalize_decoder_(self.W_dec)

    def make_decoder_weights_and_grad_unit_norm(self) -> None:
        """Reference-code API (between backward and the optimizer step): W_dec rows to unit norm,
        then W_dec.grad made orthogonal to them, in one fused pass."""
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
        [..., d_sae] (a latent fired if any entry is nonzero).
        """
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

    def fold_input_scale(self, scale: float) -> None:
        """The SAE was trained on ``x * scale``; rewrite it in place to take raw x and return
        raw-scale reconstructions. Activations scale by 1/scale (b_enc, b_dec and thresholds are
        divided by scale); W_enc and the unit-norm W_dec are unchanged. With input_unit_norm the
        standardisation already removes any global scale, so nothing changes."""
        if isinstance(scale, Tensor):
            scale = float(scale)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale={scale!r} must be a finite number > 0")
        if self.config.input_unit_norm:
            logger.info("fold_input_scale: input_unit_norm standardises each token, nothing to fold")
            return
        with torch.no_grad():
            self.b_enc.div_(scale)
            self.b_dec.div_(scale)
            self._fold_threshold(scale)

    def _fold_threshold(self, scale: float) -> None:
        """Divide the variant's thresholds by scale."""

    # ------------------------------------------------------------------------------------------
    # The reference code's forward
    # ------------------------------------------------------------------------------------------

    def _reference_forward(self, x: Tensor) -> Dict[str, Any]:
        c = self.config
        x2, lead = self._flatten_input(x)
        self._check_not_empty(x2, "forward")
        x_in, mean, std = self._standardize(x2)
        acts = self._codes(x_in).acts
        x_hat = self._decode(acts)
        self.update_inactive_features(acts)
        if self.training:
            self.update_threshold(acts.kept_min)
        n_rows = max(x2.shape[0], 1)
        l2_loss = (x_hat.float() - x_in.float()).pow(2).mean()
        l1_norm = acts.values.float().abs().sum() / n_rows
        l1_loss = c.l1_coefficient * l1_norm
        l0_norm = torch.tensor(acts.nnz / n_rows, device=x2.device)
        out = _ReferenceOutput()
        out._lead = lead
        out["sae_out"] = self._unstandardize(x_hat, mean, std).reshape(*lead, self.d_in)
        out["num_dead_features"] = (self.num_batches_not_active > c.n_batches_to_dead).sum()
        if self.architecture in ("batchtopk", "topk"):
            dead = self.num_batches_not_active >= c.n_batches_to_dead
            if bool(dead.any()):
                # Not detached: the reference code lets the aux loss reach the main reconstruction.
                aux_loss = self._aux_loss(x_in, x_in.float() - x_hat.float(), dead)
            else:
                aux_loss = torch.tensor(0, dtype=x2.dtype, device=x2.device)
            out["loss"] = l2_loss + l1_loss + aux_loss
        else:
            aux_loss = None
            out["loss"] = l2_loss + l1_loss
        out.update(l1_loss=l1_loss, l2_loss=l2_loss, l0_norm=l0_norm, l1_norm=l1_norm)
        if aux_loss is not None:
            out["aux_loss"] = aux_loss
        out["acts"] = acts
        return out

    # ------------------------------------------------------------------------------------------
    # Files
    # ------------------------------------------------------------------------------------------

    def save(self, path, history: Optional[Dict[str, Any]] = None, overwrite: bool = False,
             log_sparsity: Optional[Tensor] = None):
        """Write ``path/cfg.json`` + ``sae_weights.safetensors`` (SAELens layout; + history.json,
        sparsity.safetensors); see :func:`saefast.io.save_sae`. Returns the folder as a Path."""
        from .io import save_sae
        return save_sae(self, path, history=history, overwrite=overwrite, log_sparsity=log_sparsity)

    @classmethod
    def load(cls, path, device: str = "cpu", load_history: bool = False):
        """Load a folder written by :meth:`save` (or any folder :func:`saefast.io.load_sae` reads).
        Returns the SAE, or ``(sae, history)`` with load_history=True."""
        from .io import load_sae, read_history
        sae = load_sae(path, device=device)
        if cls is not BaseSAE and not isinstance(sae, cls):
            raise ValueError(f"{path} holds a {type(sae).__name__} (architecture={sae.architecture!r}), not a "
                             f"{cls.__name__}; load it with saefast.load_sae(path)")
        if load_history:
            return sae, read_history(path)
        return sae


class BatchTopKSAE(BaseSAE):
    """BatchTopK SAE (Bussmann et al. 2024): the B*k largest activations of the batch in training,
    ``pre > topk_threshold`` in eval mode. Extra buffer: ``topk_threshold`` fp32 scalar (-1 until
    the first training batch)."""

    architecture = "batchtopk"
    _FP32_STATE = ("topk_threshold",)

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


class TopKSAE(BaseSAE):
    """TopK SAE (Gao et al. 2024): the k largest activations of each token."""

    architecture = "topk"

    def _encode(self, x_in: Tensor) -> SparseActs:
        return ops.topk_encode(x_in, self.W_enc, self._b_dec_in(), self.config.top_k,
                               b_enc=self._b_enc_in(), mode="row")


class VanillaSAE(BaseSAE):
    """ReLU SAE with an L1 penalty: l1_coefficient * mean over tokens of sum |activations|."""

    architecture = "relu"

    def _encode(self, x_in: Tensor) -> SparseActs:
        return ops.threshold_encode(x_in, self.W_enc, self._b_dec_in(), 0.0, b_enc=self._b_enc_in())

    def _sparsity_loss(self, acts: SparseActs) -> Tensor:
        return self.config.l1_coefficient * acts.values.float().abs().sum() / max(acts.n_rows, 1)


class JumpReLUSAE(BaseSAE):
    """JumpReLU SAE (Rajamanoharan et al. 2024): keeps ``pre > threshold`` per latent.

    ``threshold`` [d_sae] is an fp32 parameter (SAELens' layout), clamped at 0 before each
    training forward. Its gradient comes from a straight-through estimator with a rectangle kernel
    of width ``jumprelu_bandwidth``, both through the reconstruction and through the L0 penalty
    ``l1_coefficient * mean over tokens of #active``. Only entries with pre > threshold - bandwidth/2
    (and pre > 0) can get an estimator gradient, so only those are gathered: sparse throughout.
    """

    architecture = "jumprelu"
    _FP32_STATE = ("threshold",)

    def _init_variant(self, device: torch.device) -> None:
        self.threshold = nn.Parameter(torch.full((self.d_sae,), float(self.config.jumprelu_init_threshold),
                                                 dtype=torch.float32, device=device))

    def _encode(self, x_in: Tensor) -> SparseActs:
        return ops.threshold_encode(x_in, self.W_enc, self._b_dec_in(), self.threshold, b_enc=self._b_enc_in())

    def _sparsity_loss(self, acts: SparseActs) -> Tensor:
        return torch.tensor(self.config.l1_coefficient * acts.nnz / max(acts.n_rows, 1), device=self.device)

    def _encode_train(self, x_in: Tensor) -> _Codes:
        eps = self.config.jumprelu_bandwidth
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)
        band = ops.threshold_encode(x_in, self.W_enc, self._b_dec_in(), self.threshold.detach() - eps / 2,
                                    b_enc=self._b_enc_in())
        theta = self.threshold[band.indices.long()]
        values = _JumpReLUSTE.apply(band.values, theta, eps)
        l0 = _StepSTE.apply(band.values.detach(), theta, eps).sum() / max(band.n_rows, 1)
        decode_acts = band._replace(values=values)
        acts = _filter_acts(decode_acts, _above(band.values, theta.detach()))
        return _Codes(decode_acts, acts, self.config.l1_coefficient * l0)

    def _fold_threshold(self, scale: float) -> None:
        self.threshold.div_(scale)


SAE_CLASSES: Dict[str, Type[BaseSAE]] = {
    "batchtopk": BatchTopKSAE, "topk": TopKSAE, "relu": VanillaSAE, "jumprelu": JumpReLUSAE,
}


def create_sae(cfg: SAEConfig) -> BaseSAE:
    """The SAE class named by ``cfg.architecture``, built from cfg."""
    if not isinstance(cfg, SAEConfig):
        raise TypeError(f"cfg must be an SAEConfig, got {type(cfg).__name__}")
    return SAE_CLASSES[cfg.architecture](cfg)
