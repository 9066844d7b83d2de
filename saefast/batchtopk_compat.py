"""The BatchTopK reference code's API on saefast's SAE classes (an adapter).

``BatchTopKSAE(cfg_dict)`` (likewise ``TopKSAE`` and ``VanillaSAE``) with that code's dict config
(keys act_size, dict_size, top_k, top_k_aux, aux_penalty, n_batches_to_dead, input_unit_norm,
l1_coeff, seed, dtype, device, plus its training keys) builds the saefast class mixed with
:class:`DictAPI`, which gives that code's behaviour:

* weights initialised with its steps (global ``torch.manual_seed(seed)``, a kaiming draw for
  W_enc and a second one for W_dec that is then overwritten by W_enc.T with unit rows), so its
  weights are reproduced exactly;
* its TopK variants have no encoder bias in their maths;
* ``forward(x)`` returns its loss dict (sae_out, feature_acts, num_dead_features, loss, l1_loss,
  l2_loss, l0_norm, l1_norm, aux_loss) and updates the dead-latent counters itself; the dense
  ``feature_acts`` is built only when read;
* ``make_decoder_weights_and_grad_unit_norm()`` (every saefast SAE has it).

It also converts that code's state dicts and checkpoint folders (``config.json`` + ``sae.pt``)
both ways. The SAE classes stay native: ``isinstance(sae, BatchTopKSAE)`` holds, and
``sae.reference_mode`` tells the two APIs apart.
"""
from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import SAEConfig, dtype_name, parse_dtype, variant_class, variant_classes
from .utils import LazyDict, fill_weights, load_torch_weights, read_json, without_rng

__all__ = ["DictAPI", "dict_api_class", "config_from_dict", "from_reference_state_dict", "to_reference_state_dict",
           "load_reference_checkpoint", "is_reference_checkpoint", "REFERENCE_CFG_FILENAME",
           "REFERENCE_WEIGHTS_FILENAME"]

logger = logging.getLogger(__name__)

REFERENCE_CFG_FILENAME = "config.json"
REFERENCE_WEIGHTS_FILENAME = "sae.pt"

_REQUIRED_KEYS = ("act_size", "dict_size", "aux_penalty", "n_batches_to_dead", "l1_coeff", "seed", "dtype", "device")
_TOPK_KEYS = ("top_k", "top_k_aux")
# Every other key the reference code's config dict holds (training, data and logging options that
# the SAE ignores); any key outside these is a typo or a foreign option.
_OTHER_KEYS = (
    "input_unit_norm", "hook_point", "layer", "site", "model_name", "dataset_path", "seq_len", "sae_type",
    "batch_size", "lr", "num_tokens", "beta1", "beta2", "max_grad_norm", "model_batch_size",
    "num_batches_in_buffer", "wandb_project", "perf_log_freq", "checkpoint_freq", "bandwidth", "name",
)


def _check_keys(cfg: Dict[str, Any]) -> None:
    """Name unknown keys that look like misspellings of known ones (they would otherwise be ignored
    silently, e.g. ``input_unit_nrom``); other unknown keys are logged and ignored."""
    known = _REQUIRED_KEYS + _TOPK_KEYS + _OTHER_KEYS
    for key in sorted((k for k in cfg if k not in known), key=str):
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
        if close:
            raise ValueError(f"the reference config dict has an unknown key {key!r}; did you mean {close[0]!r}? "
                             "(rename it: unknown keys are not used)")
        logger.warning("the reference config dict's key %r is not an SAE option; it is ignored", key)


def config_from_dict(cfg: Dict[str, Any], architecture: str) -> SAEConfig:
    """The BatchTopK reference code's dict config -> the SAEConfig with the same semantics."""
    _check_keys(cfg)
    uses_k = bool(getattr(variant_class(architecture), "needs_top_k", False))
    required = _REQUIRED_KEYS + (_TOPK_KEYS if uses_k else ())
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
        top_k=cfg.get("top_k") if uses_k else None, top_k_aux=top_k_aux if uses_k else None,
        n_batches_to_dead=cfg["n_batches_to_dead"], aux_penalty=float(cfg["aux_penalty"]),
        architecture=architecture, input_unit_norm=bool(cfg.get("input_unit_norm", False)),
        seed=cfg["seed"], hook_layer=cfg.get("layer", 9),
        hook_name=f"hook_{cfg['site']}" if "site" in cfg else "hook_resid_post",
        hook_spec=hook_spec if isinstance(hook_spec, str) else None,
        model_name=cfg.get("model_name"), dataset_path=cfg.get("dataset_path"),
        context_size=cfg.get("seq_len"))


class DictAPI:
    """Mixed in before a saefast SAE class: the BatchTopK reference code's behaviour (see the
    module docstring). ``self.cfg`` is the dict; ``self.config`` its SAEConfig."""

    reference_mode = True

    def _config_from(self, cfg: Any) -> SAEConfig:
        if not isinstance(cfg, dict):
            raise TypeError(f"{type(self).__name__} in the reference code's API takes its dict config, got "
                            f"{type(cfg).__name__}")
        return config_from_dict(cfg, self.architecture)

    def _initial_weights(self) -> Tuple[Tensor, Tensor]:
        c = self.config
        torch.manual_seed(c.seed)
        W_enc = nn.init.kaiming_uniform_(torch.empty(c.d_in, c.d_sae))
        nn.init.kaiming_uniform_(torch.empty(c.d_sae, c.d_in))  # drawn, then overwritten, as that code does
        W_dec = W_enc.t().contiguous()
        return W_enc, W_dec / W_dec.norm(dim=-1, keepdim=True)

    def _b_enc_in(self) -> Optional[Tensor]:
        # The reference code's TopK variants have no encoder bias in their maths.
        return None if self.needs_top_k else self.b_enc

    def forward(self, x: Tensor) -> Dict[str, Any]:
        """The reference code's loss dict for x [batch, d_in] or [batch, seq, d_in]."""
        c = self.config
        x2, lead = self._flatten_input(x)
        self._check_not_empty(x2, "forward")
        x_in, mean, std = self._standardize(x2)
        acts, x_hat, aux_recon = self._reference_codes(x_in)
        self.update_inactive_features(acts)
        if self.training:
            self.update_threshold(acts.kept_min)
        n_rows = max(x2.shape[0], 1)
        l2_loss = F.mse_loss(x_hat.float(), x_in.float())
        l1_norm = acts.values.float().abs().sum() / n_rows
        l1_loss = c.l1_coefficient * l1_norm
        l0_norm = torch.tensor(acts.nnz / n_rows, device=x2.device)
        # The dense [B, d_sae] feature_acts is built only when read; "acts" holds them sparsely.
        out = LazyDict(lazy={"feature_acts": lambda: acts.to_dense().reshape(*lead, acts.d_sae)})
        out["sae_out"] = self._unstandardize(x_hat, mean, std).reshape(*lead, self.d_in)
        out["num_dead_features"] = (self.num_batches_not_active > c.n_batches_to_dead).sum()
        if self.needs_top_k:
            dead = self.num_batches_not_active >= c.n_batches_to_dead
            if bool(dead.any()):
                # Not detached: the reference code lets the aux loss reach the main reconstruction.
                residual = x_in.float() - x_hat.float()
                aux_loss = (self._aux_loss(x_in, residual, dead) if aux_recon is None
                            else self._aux_penalty(aux_recon, residual))
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


    def _reference_codes(self, x_in: Tensor) -> Tuple[Any, Tensor, Optional[Tensor]]:
        """(codes, x_hat, aux reconstruction or None) of normalised input x_in [N, d_in].

        The aux-K latents are those dead after this batch's firing is counted: one batch short of
        dead now and inactive in this batch. While training with some latent one batch short, the
        main and aux codes come from one encode (``exclude_fired``) and one decode, so W_enc and
        W_dec get one gradient each; otherwise the aux codes, if any, come later (``_aux_loss``)."""
        c = self.config
        near_dead = self.num_batches_not_active >= c.n_batches_to_dead - 1
        if not (self._trains_aux_k() and bool(near_dead.any())):
            acts = self._codes(x_in).acts
            return acts, self._decode(acts), None
        # With n_batches_to_dead = 0 every latent counts as dead, fired or not.
        acts, aux_acts = ops.topk_encode_with_aux(x_in, self.W_enc, self._b_dec_in(), c.top_k, near_dead, c.top_k_aux,
                                                  b_enc=self._b_enc_in(), mode=self.topk_mode,
                                                  exclude_fired=c.n_batches_to_dead > 0)
        both = ops.sparse_decode(ops.stack_rows(acts, aux_acts), self.W_dec)
        n = x_in.shape[0]
        main, aux_recon = both.split(n)  # one gradient buffer for both parts (see BaseSAE)
        return acts, main + self.b_dec.to(both.dtype), aux_recon


_DICT_CLASSES: Dict[type, type] = {}


def dict_api_class(cls: type) -> type:
    """``cls`` (a saefast SAE class) with :class:`DictAPI` mixed in, one class per ``cls``."""
    if getattr(cls, "reference_name", None) is None:
        supported = [c.__name__ for c in variant_classes() if getattr(c, "reference_name", None)]
        raise TypeError(f"{cls.__name__} takes an SAEConfig; the reference code's dict config is supported by "
                        f"{', '.join(supported)}")
    if cls not in _DICT_CLASSES:
        sub = type(cls.__name__, (DictAPI, cls), {"__module__": __name__, "__doc__": cls.__doc__,
                                                  "__qualname__": f"_dict_api.{cls.__name__}"})
        _DICT_CLASSES[cls] = sub
    return _DICT_CLASSES[cls]


# ----------------------------------------------------------------------------------------------
# State dicts and checkpoint folders
# ----------------------------------------------------------------------------------------------

def _reference_types() -> Dict[str, type]:
    return {c.reference_name: c for c in variant_classes() if getattr(c, "reference_name", None)}


def from_reference_state_dict(state_dict: Dict[str, Tensor], cfg: Dict[str, Any]) -> nn.Module:
    """Build the SAE the reference code would (its dict config, ``cfg["sae_type"]`` in
    batchtopk / topk / vanilla, default batchtopk) holding ``state_dict`` (W_enc, b_enc, W_dec,
    b_dec). The result runs in the reference code's API; the global RNG is left alone."""
    if not isinstance(cfg, dict):
        raise TypeError(f"cfg must be the reference code's config dict, got {type(cfg).__name__}")
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    sae_type = cfg.get("sae_type", "batchtopk")
    types = _reference_types()
    if sae_type not in types:
        raise ValueError(f"sae_type={sae_type!r} is not supported; saefast converts {sorted(types)}")
    cls = types[sae_type]
    sae = without_rng(lambda: cls(dict(cfg)))
    unknown = sorted(set(state_dict) - {"W_enc", "b_enc", "W_dec", "b_dec", "num_batches_not_active"})
    if unknown:
        raise ValueError(f"unexpected tensors {unknown} in the reference state dict")
    fill_weights(sae, state_dict, sae.weight_shapes(), "reference state dict", f"d_in={sae.d_in}, d_sae={sae.d_sae}")
    return sae


def to_reference_state_dict(sae: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """``(state_dict, cfg)`` in the reference code's format for a BatchTopK, TopK or ReLU SAE."""
    name = getattr(sae, "reference_name", None)
    if name is None:
        raise ValueError(f"the reference code has no {type(sae).__name__} in a convertible form")
    c = sae.config
    if not c.apply_b_dec_to_input:
        raise ValueError("the reference code always subtracts b_dec before encoding; this SAE does not")
    if sae.needs_top_k and bool(sae.b_enc.detach().ne(0).any()):
        raise ValueError("the reference code's TopK variants ignore b_enc, but this SAE's b_enc is nonzero")
    state_dict = {key: getattr(sae, key).detach().clone() for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.reference_mode:
        return state_dict, dict(sae.cfg)
    cfg = {"act_size": c.d_in, "dict_size": c.d_sae, "top_k": c.top_k, "top_k_aux": c.top_k_aux,
           "aux_penalty": c.aux_penalty, "n_batches_to_dead": c.n_batches_to_dead,
           "input_unit_norm": c.input_unit_norm, "l1_coeff": c.l1_coefficient,
           "seed": c.seed if c.seed is not None else 0, "dtype": sae.dtype, "device": str(sae.device),
           "sae_type": name, "hook_point": c.hook_spec}
    return state_dict, cfg


def is_reference_checkpoint(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a folder holding the reference code's ``config.json`` + ``sae.pt``."""
    path = Path(path)
    return (path / REFERENCE_CFG_FILENAME).is_file() and (path / REFERENCE_WEIGHTS_FILENAME).is_file()


def load_reference_checkpoint(path: Union[str, os.PathLike], device: Optional[str] = None) -> nn.Module:
    """Load a reference-code checkpoint folder (``config.json`` + ``sae.pt``). ``sae.pt`` is read
    with ``torch.load(weights_only=True)``, which refuses anything but tensors."""
    path = Path(path)
    for name in (REFERENCE_CFG_FILENAME, REFERENCE_WEIGHTS_FILENAME):
        if not (path / name).exists():
            raise ValueError(f"{path} is not a reference-code checkpoint: {name} is missing")
    cfg = read_json(path / REFERENCE_CFG_FILENAME)
    if device is not None:
        cfg["device"] = device
    state_dict = load_torch_weights(path / REFERENCE_WEIGHTS_FILENAME, "save the checkpoint again, or restore it from a copy")
    return from_reference_state_dict(state_dict, cfg)
