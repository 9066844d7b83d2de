"""dictionary_learning's SAE checkpoints, loaded as saefast SAEs that encode identically.

dictionary_learning's ``trainSAE`` writes one folder per trainer, ``trainer_N/``, holding
``ae.pt`` (the dictionary's state dict, ``torch.save``) and ``config.json``
(``{"trainer": {"dict_class", "trainer_class", "activation_dim", "dict_size", "k", "layer",
"lm_name", "submodule_name", ...}, "buffer": {"ctx_len", ...}}``). Its dictionaries and what they
load as (``x`` [N, d_in]; ``pre = (x - b_dec) @ W_enc + b_enc``):

=====================  ==================================================  ==========================
dict_class             encode                                              saefast class
=====================  ==================================================  ==========================
AutoEncoder            ``relu(pre)``                                       VanillaSAE
AutoEncoderTopK        the k largest of ``relu(pre)`` in each row          TopKSAE (b_enc trained)
BatchTopKSAE           ``relu(pre)`` where ``> threshold`` (a scalar)      BatchTopKSAE (b_enc
                                                                           trained), eval() mode
JumpReluAutoEncoder    ``relu(x @ W_enc + b_enc)`` where ``> threshold``   JumpReLUSAE,
                       (per latent; b_dec not subtracted)                  apply_b_dec_to_input=False
MatryoshkaBatchTopKSAE ``relu(pre)`` where ``> threshold`` (a scalar)      MatryoshkaBatchTopKSAE
                                                                           (prefixes: the cumulative
                                                                           group sizes), eval() mode
=====================  ==================================================  ==========================

The first three store ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``decoder.weight
[d_in, d_sae]`` and ``bias`` (AutoEncoder) or ``b_dec``; the TopK ones also ``k`` and
``threshold``. JumpReluAutoEncoder and MatryoshkaBatchTopKSAE store ``W_enc [d_in, d_sae]``,
``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec`` and ``threshold`` ([d_sae] for JumpReLU, a scalar
for Matryoshka, which also stores ``k`` and ``group_sizes``). A BatchTopK threshold still at its initial
-1 (training stopped before it was estimated) keeps every positive activation there, so it loads
as threshold 0, which does the same. Thresholds are compared in float32 (see docs/sae.md); for
float32 checkpoints every encode is identical. Decoder rows are loaded as they are (not
renormalised), so encodes stay identical also when training left them away from unit norm.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from .config import SAEConfig, dtype_name, parse_dtype, variant_class
from .utils import PathLike, fill_weights, load_torch_weights, read_json, without_rng

__all__ = ["load_dictionary_learning", "from_dictionary_learning_state_dict", "dictionary_learning_folder",
           "DICT_CLASSES", "DL_CFG_FILENAME", "DL_WEIGHTS_FILENAME"]

logger = logging.getLogger(__name__)

DL_CFG_FILENAME = "config.json"
DL_WEIGHTS_FILENAME = "ae.pt"

# dict_class -> saefast architecture
DICT_CLASSES: Dict[str, str] = {
    "AutoEncoder": "relu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "JumpReluAutoEncoder": "jumprelu",
    "MatryoshkaBatchTopKSAE": "matryoshka_batchtopk",
}
_PARAMETER_STYLE = ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE")  # W_enc/b_enc/W_dec/b_dec, not nn.Linear
_TRAINER_CLASSES = {
    "StandardTrainer": "AutoEncoder", "StandardTrainerAprilUpdate": "AutoEncoder", "TopKTrainer": "AutoEncoderTopK",
    "BatchTopKTrainer": "BatchTopKSAE", "JumpReluTrainer": "JumpReluAutoEncoder",
    "MatryoshkaBatchTopKTrainer": "MatryoshkaBatchTopKSAE",
}
_LINEAR_KEYS = {"encoder.weight", "encoder.bias", "decoder.weight"}
_SUBMODULE_RE = re.compile(r"^(?P<site>[a-z_]+?)_layer_(?P<layer>\d+)$")


def dictionary_learning_folder(path: PathLike) -> Optional[Path]:
    """The trainer folder (``config.json`` + ``ae.pt``) that ``path`` is or holds as its only
    ``trainer_*`` subfolder; None when there is none. A folder with several trainers raises a
    ValueError listing them (pass one)."""
    path = Path(path)
    if (path / DL_CFG_FILENAME).is_file() and (path / DL_WEIGHTS_FILENAME).is_file():
        return path
    if not path.is_dir():
        return None
    trainers = sorted(p for p in path.glob("trainer_*") if (p / DL_WEIGHTS_FILENAME).is_file())
    if len(trainers) > 1:
        names = ", ".join(p.name for p in trainers[:6]) + (", ..." if len(trainers) > 6 else "")
        raise ValueError(f"{path} holds {len(trainers)} dictionary_learning trainers ({names}); pass one of "
                         f"them, e.g. {trainers[0]}")
    return trainers[0] if trainers else None


def _dict_class(trainer: Dict[str, Any], state: Dict[str, Tensor], where: str) -> str:
    name = trainer.get("dict_class") or _TRAINER_CLASSES.get(str(trainer.get("trainer_class")))
    if name is None:
        # configs without the class: the state dict tells, except TopK from BatchTopK (same keys)
        if "bias" in state and _LINEAR_KEYS <= set(state):
            name = "AutoEncoder"
        elif {"W_enc", "threshold"} <= set(state) and state["threshold"].dim() == 1:
            name = "JumpReluAutoEncoder"
        elif {"W_enc", "group_sizes"} <= set(state):
            name = "MatryoshkaBatchTopKSAE"
        else:
            raise ValueError(f"{where}: the config names no dict_class or trainer_class and the state dict does not "
                             f"tell which dictionary it is; add trainer.dict_class (one of {sorted(DICT_CLASSES)})")
    canonical = {key.lower(): key for key in DICT_CLASSES}
    if str(name).lower() not in canonical:
        raise ValueError(f"{where}: dict_class {name!r} is not supported; saefast loads {sorted(DICT_CLASSES)}")
    return canonical[str(name).lower()]


def _tensor(state: Dict[str, Tensor], key: str, where: str, dict_class: str) -> Tensor:
    if key not in state:
        raise ValueError(f"{where}: the state dict lacks {key!r}, which a {dict_class} holds; found {sorted(state)}")
    return state[key]


def from_dictionary_learning_state_dict(state: Dict[str, Tensor], trainer: Dict[str, Any],
                                        metadata: Optional[Dict[str, Any]] = None,
                                        dtype: Optional[Union[str, torch.dtype]] = None,
                                        where: str = "dictionary_learning state dict") -> nn.Module:
    """The saefast SAE encoding like the dictionary_learning dictionary ``state`` (its
    ``state_dict()``) built as ``trainer`` (config.json's ``"trainer"`` section) says; in eval()
    mode. ``metadata``: SAEConfig metadata (model_name, hook_layer, hook_name, context_size)."""
    dict_class = _dict_class(trainer, state, where)
    arch = DICT_CLASSES[dict_class]
    if dict_class == "JumpReluAutoEncoder":
        weights = {k: _tensor(state, k, where, dict_class) for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    elif dict_class in _PARAMETER_STYLE:
        weights = {k: _tensor(state, k, where, dict_class) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    else:
        weights = {"W_enc": _tensor(state, "encoder.weight", where, dict_class).t(),
                   "b_enc": _tensor(state, "encoder.bias", where, dict_class),
                   "W_dec": _tensor(state, "decoder.weight", where, dict_class).t(),
                   "b_dec": _tensor(state, "bias" if dict_class == "AutoEncoder" else "b_dec", where, dict_class)}
    d_in, d_sae = weights["W_enc"].shape
    for key, value in (("activation_dim", d_in), ("dict_size", d_sae)):
        if key in trainer and trainer[key] != value:
            raise ValueError(f"{where}: the config says {key}={trainer[key]} but the weights have {value}")
    values: Dict[str, Any] = dict(metadata or {})
    values.update(d_in=int(d_in), d_sae=int(d_sae), architecture=arch, device="cpu", train_b_enc=True,
                  dtype=dtype_name(parse_dtype(dtype) if dtype is not None else weights["W_enc"].dtype))
    if variant_class(arch).needs_top_k:
        k = _tensor(state, "k", where, dict_class)
        values["top_k"] = int(k.item() if isinstance(k, Tensor) else k)
    if dict_class == "JumpReluAutoEncoder":
        values["apply_b_dec_to_input"] = False  # its encode uses x as it is
    if dict_class == "MatryoshkaBatchTopKSAE":
        sizes = _tensor(state, "group_sizes", where, dict_class).reshape(-1).tolist()
        values["matryoshka_prefixes"] = [int(sum(sizes[:i + 1])) for i in range(len(sizes))]
    unknown = sorted(set(state) - _LINEAR_KEYS - {"bias", "b_dec", "k", "threshold", "W_enc", "b_enc", "W_dec",
                                                  "group_sizes"})
    if unknown:
        raise ValueError(f"{where}: unexpected tensors {unknown} for a {dict_class}")
    try:
        config = SAEConfig(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    sae = without_rng(lambda: variant_class(arch)(config))
    shapes = sae.weight_shapes()
    fill_weights(sae, weights, {k: shapes[k] for k in weights}, where, f"d_in={d_in}, d_sae={d_sae}")
    if hasattr(sae, "topk_threshold"):  # BatchTopK and Matryoshka: the global inference threshold
        threshold = float(_tensor(state, "threshold", where, dict_class).float().reshape(()))
        if threshold < 0:
            logger.warning("%s: the BatchTopK threshold was never estimated (%g), so dictionary_learning keeps every "
                           "positive activation; loaded with threshold 0, which does the same", where, threshold)
            threshold = 0.0
        sae.topk_threshold.fill_(threshold)
    return sae.eval()


def load_dictionary_learning(path: PathLike, device: str = "cpu",
                             dtype: Optional[Union[str, torch.dtype]] = None) -> nn.Module:
    """Load a dictionary_learning trainer folder (``trainer_N/`` with ``ae.pt`` + ``config.json``,
    or a folder holding exactly one) as the saefast SAE that encodes identically (see the module
    docstring), in eval() mode, on ``device``. ``ae.pt`` is read with
    ``torch.load(weights_only=True)``."""
    folder = dictionary_learning_folder(path)
    if folder is None:
        raise ValueError(f"{path} is not a dictionary_learning trainer folder: it needs {DL_CFG_FILENAME} + "
                         f"{DL_WEIGHTS_FILENAME} (or one trainer_N subfolder holding them)")
    cfg = read_json(folder / DL_CFG_FILENAME)
    trainer = cfg.get("trainer")
    if not isinstance(trainer, dict):
        raise ValueError(f"{folder / DL_CFG_FILENAME} has no 'trainer' section; is this a dictionary_learning "
                         "trainer folder?")
    state = load_torch_weights(folder / DL_WEIGHTS_FILENAME)
    metadata: Dict[str, Any] = {}
    if trainer.get("lm_name"):
        metadata["model_name"] = str(trainer["lm_name"])
    if isinstance(trainer.get("layer"), int):
        metadata["hook_layer"] = trainer["layer"]
        match = _SUBMODULE_RE.match(str(trainer.get("submodule_name") or ""))
        if match and int(match.group("layer")) == trainer["layer"]:
            metadata["hook_name"] = f"hook_{match.group('site')}"
    buffer = cfg.get("buffer") if isinstance(cfg.get("buffer"), dict) else {}
    if isinstance(buffer.get("ctx_len"), int):
        metadata["context_size"] = buffer["ctx_len"]
    sae = from_dictionary_learning_state_dict(state, trainer, metadata, dtype, where=str(folder / DL_WEIGHTS_FILENAME))
    return sae.to(device)
