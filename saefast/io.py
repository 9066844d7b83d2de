"""Saving, loading and converting SAEs. Weights go through safetensors only (never pickle).

Native folder (the SAELens v6 layout, so SAELens and tools built on it load saefast SAEs):

* ``cfg.json``: SAELens fields ``architecture`` (``"jumprelu"`` for BatchTopK, Matryoshka
  BatchTopK and JumpReLU, ``"topk"``, ``"standard"`` for ReLU), ``d_in``, ``d_sae``, ``dtype``, ``device``,
  ``apply_b_dec_to_input``, ``normalize_activations`` (``"layer_norm"`` for input_unit_norm, else
  ``"none"``), ``reshape_activations`` (``"none"``), ``k`` and ``rescale_acts_by_decoder_norm``
  (topk only), ``metadata`` (``sae_lens_version`` "6.0.0" marking the format, ``model_name``,
  ``hook_name`` = the full hook, ``hook_head_index``, ``prepend_bos``, ``context_size``,
  ``dataset_path``, ``saefast_version``), plus a ``saefast`` section (the full SAEConfig and
  BatchTopK's fp32 ``topk_threshold``) that SAELens ignores.
* ``sae_weights.safetensors``: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
  ``b_dec [d_in]``, and ``threshold [d_sae]`` for BatchTopK (its global threshold, repeated; so
  SAELens runs it as a JumpReLU SAE) and JumpReLU.
* Transcoders (``d_out`` set) follow SAELens's transcoder layout: ``d_out``, ``metadata.hook_name_out``,
  ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, ``W_skip`` stored ``[d_out, d_in]`` (the transpose of
  saefast's), architecture ``"transcoder"`` / ``"skip_transcoder"`` / ``"jumprelu_transcoder"`` where
  SAELens has the combination, else saefast's extension ``<architecture>_[skip_]transcoder``
  (:func:`transcoder_architecture`).
* ``saefast_state.safetensors``: dead-latent counters (and JumpReLU's fp32 threshold), read back
  by saefast only. ``history.json`` when a history is given, ``sparsity.safetensors`` (key
  "sparsity": log10 firing frequency per latent, as SAELens writes it) when given.

What differs between variants (BatchTopK's global threshold, TopK's ``k``, JumpReLU's fp32
threshold) each SAE class declares itself (``saelens_export`` / ``saelens_import``); this module
never imports the SAE classes: it finds them through the variant registry of ``saefast.config``.

Converters: SAELens folders (v6 nested ``metadata`` and pre-6 flat configs; inference folders and
training checkpoints, with ``rescale_acts_by_decoder_norm`` folded into unit decoder rows), sparsify folders
(``cfg.json`` + ``sae.safetensors`` with ``encoder.weight [d_sae, d_in]``, ``encoder.bias``,
``W_dec [d_sae, d_in]``, ``b_dec``), the BatchTopK reference code's state dict + config dict
(or its checkpoint folder, ``config.json`` + ``sae.pt``; see ``saefast.batchtopk_compat``),
the classic SAE API's checkpoints (``weights.pt`` + ``config.json`` + ``history.json``) and
dictionary_learning's (``ae.pt`` + ``config.json``; see ``saefast.dictionary_learning_compat``).
``.pt`` files are read with ``torch.load(weights_only=True)``, which refuses anything but tensors
and plain containers.

Saving never replaces an existing SAE unless ``overwrite=True``, and writes into a temporary
folder first, then renames (the whole folder when the target is new, file by file otherwise); a
full disk raises ``saefast.utils.DiskFullError`` naming the file, the temporary folder removed.
A truncated or damaged weights file raises ``saefast.utils.CorruptFileError`` naming it.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .batchtopk_compat import (REFERENCE_CFG_FILENAME, REFERENCE_WEIGHTS_FILENAME, from_reference_state_dict,
                               is_reference_checkpoint, load_reference_checkpoint, to_reference_state_dict)
from .config import SAEConfig, dtype_name, parse_dtype, variant_class, variant_classes
from .dictionary_learning_compat import (DL_CFG_FILENAME, DL_WEIGHTS_FILENAME, dictionary_learning_folder,
                                         load_dictionary_learning)
from .utils import (check_finite, fill_weights, load_safetensors, load_torch_weights, parse_hook, read_json,
                    reporting_disk_full, without_rng, write_json)
from .version import __version__

__all__ = [
    "save_sae", "load_sae", "load_saelens", "load_sparsify", "save_sparsify", "from_reference_state_dict",
    "to_reference_state_dict", "load_reference_checkpoint", "load_classic_checkpoint", "load_dictionary_learning",
    "sae_folder_kind", "read_history", "read_log_sparsity", "transcoder_architecture", "CFG_FILENAME",
    "WEIGHTS_FILENAME", "STATE_FILENAME", "HISTORY_FILENAME",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
STATE_FILENAME = "saefast_state.safetensors"
HISTORY_FILENAME = "history.json"
SPARSITY_FILENAME = "sparsity.safetensors"
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"
CLASSIC_WEIGHTS_FILENAME = "weights.pt"
CLASSIC_CFG_FILENAME = "config.json"
SAELENS_FORMAT_VERSION = "6.0.0"
_SHARED_WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")
_COUNTERS = ("num_batches_not_active", "ever_fired")
_NATIVE_FILES = (CFG_FILENAME, WEIGHTS_FILENAME, STATE_FILENAME, HISTORY_FILENAME)
_RESAVE = "save the SAE again, or restore the folder from a copy"


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous()


def _is_sae(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and isinstance(getattr(obj, "config", None), SAEConfig) \
        and callable(getattr(obj, "saelens_export", None))


def _atomic_folder(path: PathLike, writers: Dict[str, Callable[[Path], None]], guarded: Tuple[str, ...],
                   stale: Tuple[str, ...], overwrite: bool) -> Path:
    """Write ``writers`` (file name -> writer) into a temporary sibling folder, then rename.

    Refuses (FileExistsError) when ``path`` already holds one of ``guarded`` and not overwrite.
    A new folder is renamed into place whole; an existing one gets each file by os.replace (other
    files there are left alone), and the ``stale`` files this save does not write are removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another path")
    present = [name for name in guarded if (path / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{path} already holds an SAE ({', '.join(present)}); pass overwrite=True to "
                              "replace it, or save somewhere else")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)
        for name, write in writers.items():
            with reporting_disk_full(path / name):
                write(tmp / name)
            os.chmod(tmp / name, 0o644)
        if not path.exists():
            os.rename(tmp, path)
            return path
        for name in writers:
            os.replace(tmp / name, path / name)
        for name in stale:
            if name not in writers:
                (path / name).unlink(missing_ok=True)
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fill(sae: nn.Module, weights: Dict[str, Tensor], where: str) -> None:
    out = f", d_out={sae.d_out}" if sae.config.is_transcoder else ""
    fill_weights(sae, weights, sae.weight_shapes(), where, f"d_in={sae.d_in}{out}, d_sae={sae.d_sae}")


def _hook_fields(hook_spec: Optional[str], hook_layer: Any = None) -> Dict[str, Any]:
    if not hook_spec:
        return {}
    layer, name = parse_hook(hook_spec)
    out: Dict[str, Any] = {"hook_name": name, "hook_spec": hook_spec}
    if hook_layer is not None or layer is not None:
        out["hook_layer"] = layer if hook_layer is None else hook_layer
    return out


# ----------------------------------------------------------------------------------------------
# Native (SAELens layout) save / load
# ----------------------------------------------------------------------------------------------

def transcoder_architecture(saelens_architecture: str, skip: bool) -> str:
    """The SAELens ``architecture`` of a transcoder whose SAE would be ``saelens_architecture``:
    ``"transcoder"`` / ``"skip_transcoder"`` (ReLU) and ``"jumprelu_transcoder"`` are SAELens's
    own; the other combinations (``"topk_transcoder"``, ``"jumprelu_skip_transcoder"``, ...) are
    saefast's extension of that naming, which SAELens does not load."""
    prefix = "" if saelens_architecture == "standard" else saelens_architecture + "_"
    return f"{prefix}{'skip_' if skip else ''}transcoder"


def _split_transcoder_architecture(name: Any) -> Optional[Tuple[str, bool]]:
    """Inverse of :func:`transcoder_architecture`: (SAE architecture, skip), or None for an SAE."""
    head = str(name)
    if not head.endswith("transcoder"):
        return None
    head = head[:-len("transcoder")]
    skip = head.endswith("skip_")
    if skip:
        head = head[:-len("skip_")]
    if not head:
        return "standard", skip
    return (head[:-1], skip) if head.endswith("_") and len(head) > 1 else None


def _native_files(sae: nn.Module) -> Tuple[Dict[str, Any], Dict[str, Tensor], Dict[str, Tensor]]:
    """(cfg.json, sae_weights.safetensors, saefast_state.safetensors) of ``sae``."""
    c = dataclasses.replace(sae.config, dtype=dtype_name(sae.dtype), device=str(sae.device))
    extras = sae.saelens_export()
    architecture = sae.saelens_architecture
    if c.is_transcoder:
        architecture = transcoder_architecture(architecture, c.skip_connection)
    cfg: Dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        **({"d_out": c.d_out} if c.is_transcoder else {}),
        "d_sae": sae.d_sae,
        "dtype": c.dtype,
        "device": c.device,
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "layer_norm" if c.input_unit_norm else "none",
        "reshape_activations": "none",
        **extras.cfg,
    }
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": c.model_name,
        "hook_name": c.hook_spec,
        "hook_head_index": None,
        **({"hook_name_out": c.hook_spec_out, "hook_head_index_out": None} if c.is_transcoder else {}),
        "prepend_bos": c.prepend_bos,
        "context_size": c.context_size,
        "dataset_path": c.dataset_path,
        "saefast_version": __version__,
    }
    cfg["saefast"] = {"format_version": 1, "config": c.to_dict(), **extras.section}
    weights = {name: _cpu(getattr(sae, name)) for name in _SHARED_WEIGHTS}
    if c.skip_connection:
        weights["W_skip"] = _cpu(sae.W_skip.t())  # SAELens holds W_skip as [d_out, d_in]
    weights.update({name: _cpu(t) for name, t in extras.weights.items()})
    state = {name: _cpu(getattr(sae, name)) for name in _COUNTERS}
    state.update({name: _cpu(t) for name, t in extras.state.items()})
    return cfg, weights, state


def save_sae(sae: nn.Module, path: PathLike, history: Optional[Dict[str, Any]] = None,
             overwrite: bool = False, log_sparsity: Optional[Tensor] = None) -> Path:
    """Save ``sae`` to the folder ``path`` (see the module docstring for the files).

    ``log_sparsity`` [d_sae] (log10 of each latent's firing frequency) is written to
    ``sparsity.safetensors`` under the key "sparsity", as SAELens does.
    Decoder rows are saved with unit norm, as SAEBench and tools built on SAELens expect: rows
    further from 1 than 1e-5 (1e-2 in 16-bit) are folded into the encoder in the saved copy
    (``sae.fold_decoder_norms()``, reconstructions unchanged, those latents' activations scaled
    by their norm); ``sae`` itself is not modified. A TopK variant cannot fold its norms and is
    saved as it is, with a warning. A variant whose decoder norms are part of the model
    (``unit_norm_decoder`` False: the crosscoder's per-layer norms) is saved as it is.
    Raises FileExistsError if ``path`` already holds an SAE and ``overwrite`` is False.
    """
    if not _is_sae(sae):
        raise TypeError(f"sae must be a saefast SAE, got {type(sae).__name__}")
    if history is not None and not isinstance(history, dict):
        raise TypeError(f"history must be a dict (e.g. {{'loss': [...]}}) or None, got {type(history).__name__}")
    if log_sparsity is not None and (not isinstance(log_sparsity, Tensor) or log_sparsity.shape != (sae.d_sae,)):
        raise ValueError(f"log_sparsity must be a tensor of shape [{sae.d_sae}] (d_sae)")
    if sae.unit_norm_decoder and not sae.decoder_norms_are_unit():
        if sae.folds_decoder_norms:
            sae = copy.deepcopy(sae).fold_decoder_norms()
            logger.info("%s: decoder rows were not unit norm; folded into the encoder in the saved copy", path)
        else:
            logger.warning("%s: the decoder rows are not unit norm and a %s cannot fold them; saved as they are "
                           "(SAEBench expects unit-norm decoder rows)", path, type(sae).__name__)
    cfg, weights, state = _native_files(sae)
    writers: Dict[str, Callable[[Path], None]] = {
        WEIGHTS_FILENAME: lambda p: save_file(weights, str(p)),
        STATE_FILENAME: lambda p: save_file(state, str(p)),
    }
    if history is not None:
        writers[HISTORY_FILENAME] = lambda p: write_json(history, p)
    if log_sparsity is not None:
        sparsity = {"sparsity": _cpu(log_sparsity).float()}
        writers[SPARSITY_FILENAME] = lambda p: save_file(sparsity, str(p))
    writers[CFG_FILENAME] = lambda p: write_json(cfg, p)
    return _atomic_folder(path, writers, guarded=(CFG_FILENAME, WEIGHTS_FILENAME),
                          stale=_NATIVE_FILES + (SPARSITY_FILENAME,), overwrite=overwrite)


def read_history(path: PathLike) -> Optional[Dict[str, Any]]:
    """The folder's history.json as a dict, or None when it has none."""
    file = Path(path) / HISTORY_FILENAME
    return read_json(file) if file.exists() else None


def read_log_sparsity(path: PathLike) -> Optional[Tensor]:
    """The folder's sparsity.safetensors ("sparsity" [d_sae], log10 firing frequency), or None."""
    file = Path(path) / SPARSITY_FILENAME
    return load_safetensors(file, _RESAVE)["sparsity"] if file.exists() else None


def sae_folder_kind(path: PathLike) -> Optional[str]:
    """Which SAE layout the folder ``path`` holds: ``"saelens"`` (saefast's own folders too),
    ``"sparsify"``, ``"reference"`` (the BatchTopK reference code), ``"classic"`` (the classic
    SAE API), ``"dictionary_learning"`` (a ``trainer_N`` folder, or a folder holding exactly one),
    or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / CFG_FILENAME).is_file() and (path / WEIGHTS_FILENAME).is_file():
        return "saelens"
    if (path / CFG_FILENAME).is_file() and (path / SPARSIFY_WEIGHTS_FILENAME).is_file():
        return "sparsify"
    if is_reference_checkpoint(path):
        return "reference"
    if (path / CLASSIC_CFG_FILENAME).is_file() and (path / CLASSIC_WEIGHTS_FILENAME).is_file():
        return "classic"
    if dictionary_learning_folder(path) is not None:
        return "dictionary_learning"
    return None


def load_sae(path: PathLike, device: str = "cpu", dtype: Optional[Union[str, torch.dtype]] = None) -> nn.Module:
    """Load any SAE folder saefast understands, returning the right class:
    saefast / SAELens (``cfg.json`` + ``sae_weights.safetensors``), sparsify (``cfg.json`` +
    ``sae.safetensors``), the BatchTopK reference code's checkpoint (``config.json`` + ``sae.pt``),
    the classic SAE API's (``config.json`` + ``weights.pt``) or dictionary_learning's
    (``trainer_N/`` with ``config.json`` + ``ae.pt``). ``dtype`` overrides the stored one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder; an SAE is saved as a folder holding cfg.json and "
                         f"{WEIGHTS_FILENAME}")
    kind = sae_folder_kind(path)
    if kind == "saelens":
        return load_saelens(path, device=device, dtype=dtype)
    if kind == "sparsify":
        return load_sparsify(path, device=device, dtype=dtype)
    if kind == "reference":
        sae = load_reference_checkpoint(path, device=device)
        return sae if dtype is None else sae.to(parse_dtype(dtype))
    if kind == "classic":
        return load_classic_checkpoint(path, device=device, dtype=dtype)
    if kind == "dictionary_learning":
        return load_dictionary_learning(path, device=device, dtype=dtype)
    found = sorted(p.name for p in path.iterdir())[:10]
    raise ValueError(f"{path} is not an SAE folder: expected {CFG_FILENAME} + {WEIGHTS_FILENAME} (saefast / "
                     f"SAELens), {CFG_FILENAME} + {SPARSIFY_WEIGHTS_FILENAME} (sparsify), {REFERENCE_CFG_FILENAME} "
                     f"+ {REFERENCE_WEIGHTS_FILENAME} (BatchTopK reference code), {CLASSIC_CFG_FILENAME} + "
                     f"{CLASSIC_WEIGHTS_FILENAME} (the classic SAE API) or {DL_CFG_FILENAME} + {DL_WEIGHTS_FILENAME} "
                     f"(dictionary_learning); found {found}")


# ----------------------------------------------------------------------------------------------
# The classic SAE API's checkpoints (weights.pt + config.json + history.json)
# ----------------------------------------------------------------------------------------------

_CLASSIC_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _classic_architecture(cfg: Dict[str, Any], state: Dict[str, Tensor], hint: Optional[str]) -> str:
    """The classic config names no architecture: the loading class says it, else a BatchTopK
    (its config has top_k and its state a num_batches_not_active counter) or the ReLU base SAE."""
    if cfg.get("architecture") is not None:
        return str(cfg["architecture"])
    if hint is not None:
        return hint
    return "batchtopk" if cfg.get("top_k") is not None or "num_batches_not_active" in state else "relu"


def load_classic_checkpoint(path: PathLike, device: str = "cpu", dtype: Optional[Union[str, torch.dtype]] = None,
                            architecture: Optional[str] = None) -> nn.Module:
    """Load a checkpoint folder of the classic SAE API: ``weights.pt`` (state dict: W_enc
    [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, and the buffers ``ever_fired`` /
    ``num_batches_not_active``, any float or int dtype) and ``config.json`` (its
    ``SAEConfig.to_dict()``); ``history.json`` is read by :func:`read_history`.

    ``architecture`` names the class to build when the config does not (``BatchTopKSAE.load``
    passes its own); otherwise a config with ``top_k`` (or a state with the BatchTopK counter) is a
    BatchTopK SAE and the rest the ReLU base SAE. The classic BatchTopK encode has no encoder
    bias, so a nonzero ``b_enc`` there is dropped with a warning. Keys of the config that SAEConfig
    does not have are ignored with a warning.
    """
    path = Path(path)
    for name in (CLASSIC_CFG_FILENAME, CLASSIC_WEIGHTS_FILENAME):
        if not (path / name).is_file():
            raise ValueError(f"{path} is not a classic SAE checkpoint: {name} is missing")
    cfg = read_json(path / CLASSIC_CFG_FILENAME)
    wfile = path / CLASSIC_WEIGHTS_FILENAME
    state = load_torch_weights(wfile, _RESAVE)
    arch = _classic_architecture(cfg, state, architecture)
    cls = variant_class(arch)
    names = {f.name for f in dataclasses.fields(getattr(cls, "config_class", SAEConfig))}
    ignored = sorted(k for k in cfg if k not in names)
    if ignored:
        logger.warning("%s: keys %s are not SAEConfig options; they are ignored", path / CLASSIC_CFG_FILENAME, ignored)
    values = {k: v for k, v in cfg.items() if k in names}
    values.update(architecture=cls.architecture, device="cpu")
    if "hook_spec" not in values and "hook_layer" in values and "hook_name" in values:
        values["hook_spec"] = f"blocks.{values['hook_layer']}.{values['hook_name']}"
    if dtype is not None:
        values["dtype"] = dtype_name(parse_dtype(dtype))
    elif "dtype" in values:
        values["dtype"] = dtype_name(parse_dtype(values["dtype"], f"{path / CLASSIC_CFG_FILENAME}: dtype"))
    try:
        config = SAEConfig(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path / CLASSIC_CFG_FILENAME}: {err}") from None
    unknown = sorted(set(state) - set(_CLASSIC_TENSORS) - set(_COUNTERS) - set(cls.extra_parameters))
    if unknown:
        raise ValueError(f"{wfile}: unexpected tensors {unknown}; a classic checkpoint holds "
                         f"{list(_CLASSIC_TENSORS) + list(_COUNTERS)}")
    weights = {k: v for k, v in state.items() if k not in _COUNTERS}
    if "b_enc" not in weights:
        weights["b_enc"] = torch.zeros(config.d_sae)
    if not config.b_enc_trained and bool(weights["b_enc"].ne(0).any()):
        logger.warning("%s: b_enc is nonzero but a %s encodes without an encoder bias; it is dropped", wfile,
                       cls.__name__)
        weights["b_enc"] = torch.zeros_like(weights["b_enc"])
    sae = without_rng(lambda: cls(config))
    _fill(sae, weights, str(wfile))
    with torch.no_grad():
        for name in _COUNTERS:
            if name not in state:
                continue
            value = state[name]
            if tuple(value.shape) != (sae.d_sae,):
                raise ValueError(f"{wfile}: {name} has shape {tuple(value.shape)}, expected [{sae.d_sae}] (d_sae)")
            if name == "num_batches_not_active":
                if not bool(torch.isfinite(value.double()).all()) or bool((value < 0).any()) \
                        or not torch.equal(value.double(), value.double().round()):
                    raise ValueError(f"{wfile}: num_batches_not_active must hold whole numbers >= 0")
                value = value.long()
            else:
                value = value.bool()
            getattr(sae, name).copy_(value)
    return sae.to(device)


def _saelens_variants() -> Dict[str, type]:
    """SAELens architecture name -> the SAE class that reads it."""
    return {name: cls for cls in variant_classes() for name in cls.reads_saelens}


def _saelens_to_config(cfg: Dict[str, Any], where: Path) -> SAEConfig:
    """A foreign SAELens cfg.json (v6 with nested metadata, or a pre-6 flat one) -> SAEConfig."""
    missing = [key for key in ("d_in", "d_sae") if key not in cfg]
    if missing:
        raise ValueError(f"{where}: cfg.json is missing {missing}")
    meta = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else cfg
    arch = cfg.get("architecture", "standard")
    transcoder = _split_transcoder_architecture(arch)
    if transcoder is not None:
        arch = transcoder[0]
        if not isinstance(cfg.get("d_out"), int):
            raise ValueError(f"{where}: a {cfg['architecture']!r} cfg.json needs d_out (the target's width)")
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if activation == "topk":
        arch = "topk"
    if arch == "standard" and activation not in ("relu", None):
        raise ValueError(f"{where}: SAELens activation_fn={activation!r} is not supported; saefast reads ReLU, "
                         "TopK and JumpReLU SAEs")
    readers = _saelens_variants()
    if arch not in readers:
        raise ValueError(f"{where}: SAELens architecture {arch!r} is not supported; saefast reads "
                         f"{', '.join(repr(a) for a in readers)} folders")
    norm = cfg.get("normalize_activations", "none")
    if isinstance(norm, bool) or norm is None:
        norm = "expected_average_only_in" if norm else "none"
    if norm == "expected_average_only_in":
        logger.warning("%s: normalize_activations='expected_average_only_in' has no effect at inference (the "
                       "scaling factor is not stored in the folder); loading as 'none'", where)
    elif norm not in ("none", "layer_norm"):
        raise ValueError(f"{where}: normalize_activations={norm!r} is not supported; saefast reads 'none' and "
                         "'layer_norm'")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"{where}: reshape_activations={cfg['reshape_activations']!r} is not supported; "
                         "saefast SAEs take flat [..., d_in] inputs")
    cls = readers[arch]
    hook_spec = meta.get("hook_name") or cfg.get("hook_point")
    hook_layer = cfg.get("hook_layer", cfg.get("hook_point_layer"))
    out_fields: Dict[str, Any] = {}
    if transcoder is not None:
        out_fields = dict(d_out=cfg["d_out"], skip_connection=transcoder[1], hook_spec_out=meta.get("hook_name_out"))
    return SAEConfig(
        d_in=cfg["d_in"], d_sae=cfg["d_sae"], dtype=dtype_name(parse_dtype(cfg.get("dtype", "float32"))),
        device="cpu", architecture=cls.architecture, input_unit_norm=norm == "layer_norm",
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), train_b_enc=True, **out_fields,
        model_name=meta.get("model_name"), dataset_path=meta.get("dataset_path"),
        context_size=meta.get("context_size"), prepend_bos=bool(meta.get("prepend_bos", True)),
        **cls.saelens_config_values(cfg, str(where)), **_hook_fields(hook_spec, hook_layer))


@torch.no_grad()
def _fold_decoder_norms(sae: nn.Module) -> None:
    """A SAELens SAE with ``rescale_acts_by_decoder_norm`` multiplies each pre-activation by its
    decoder row's norm and divides the activation by it before decoding. Folding the norms (W_enc
    columns and b_enc times the norm, W_dec rows divided by it) gives the same pre-activations,
    selection and reconstruction with unit decoder rows; zero rows stay as they are."""
    norms = sae.W_dec.float().norm(dim=1)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    sae.W_dec.copy_(sae.W_dec.float() / norms[:, None])
    sae.W_enc.copy_(sae.W_enc.float() * norms)
    sae.b_enc.copy_(sae.b_enc.float() * norms)


def load_saelens(path: PathLike, device: str = "cpu", dtype: Optional[Union[str, torch.dtype]] = None) -> nn.Module:
    """Load a saefast folder, or a SAELens folder (v6 or pre-6 config; the architectures the
    SAE classes read), onto ``device``."""
    path = Path(path)
    for name in (CFG_FILENAME, WEIGHTS_FILENAME):
        if not (path / name).exists():
            raise ValueError(f"{path} is not a saefast/SAELens SAE folder: {name} is missing")
    cfg = read_json(path / CFG_FILENAME)
    native = isinstance(cfg.get("saefast"), dict)
    if native:
        if "config" not in cfg["saefast"]:
            raise ValueError(f"{path / CFG_FILENAME}: the 'saefast' section lacks 'config'")
        config = SAEConfig.from_dict(cfg["saefast"]["config"])
    else:
        config = _saelens_to_config(cfg, path / CFG_FILENAME)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype_name(parse_dtype(dtype)))
    config = dataclasses.replace(config, device="cpu")
    weights = load_safetensors(path / WEIGHTS_FILENAME, _RESAVE)
    where = str(path / WEIGHTS_FILENAME)
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in weights:
            if not torch.all(weights[name] == 1):
                raise ValueError(f"{where}: a fine-tuning scaling factor that is not 1 is not supported")
            del weights[name]
    if "log_threshold" in weights and "threshold" not in weights:
        weights["threshold"] = weights.pop("log_threshold").float().exp()
    if "W_skip" in weights and config.skip_connection:
        skip = weights["W_skip"]  # stored [d_out, d_in], as SAELens holds it
        if tuple(skip.shape) != (config.output_width, config.d_in):
            raise ValueError(f"{where}: W_skip has shape {tuple(skip.shape)} but the config says d_in={config.d_in}, "
                             f"d_out={config.output_width}, so it must be [{config.output_width}, {config.d_in}] "
                             "([d_out, d_in], as SAELens stores it)")
        weights["W_skip"] = skip.t()
    cls = variant_class(config.architecture)
    sae = without_rng(lambda: cls(config))
    allowed = set(sae.weight_shapes()) | set(cls.saelens_weights)
    unknown = sorted(set(weights) - allowed)
    if unknown:
        raise ValueError(f"{where}: unexpected tensors {unknown} for architecture {config.architecture!r}")
    if "b_enc" not in weights:
        weights["b_enc"] = torch.zeros(config.d_sae)
    _fill(sae, weights, where)
    if not native and cfg.get("rescale_acts_by_decoder_norm"):
        _fold_decoder_norms(sae)
    state: Dict[str, Tensor] = {}
    state_file = path / STATE_FILENAME
    if native and state_file.exists():
        state = load_safetensors(state_file, _RESAVE)
        with torch.no_grad():
            for name in _COUNTERS:
                if name in state:
                    if tuple(state[name].shape) != (sae.d_sae,):
                        raise ValueError(f"{state_file}: {name} has shape {tuple(state[name].shape)}, expected "
                                         f"[{sae.d_sae}] (d_sae)")
                    getattr(sae, name).copy_(state[name])
    section = cfg["saefast"] if native else {}
    sae.saelens_import(weights, state, section, str(path / (STATE_FILENAME if native else WEIGHTS_FILENAME)))
    return sae.to(device)


# ----------------------------------------------------------------------------------------------
# sparsify (per-token TopK SAEs)
# ----------------------------------------------------------------------------------------------

def load_sparsify(path: PathLike, device: str = "cpu", dtype: Optional[Union[str, torch.dtype]] = None) -> nn.Module:
    """Load a sparsify (EleutherAI) TopK SAE folder: ``cfg.json`` (d_in, k, num_latents or
    expansion_factor) + ``sae.safetensors`` (encoder.weight [d_sae, d_in], encoder.bias, W_dec
    [d_sae, d_in], b_dec). Returns a TopKSAE whose b_enc is trained."""
    path = Path(path)
    for name in (CFG_FILENAME, SPARSIFY_WEIGHTS_FILENAME):
        if not (path / name).exists():
            raise ValueError(f"{path} is not a sparsify SAE folder: {name} is missing")
    cfg = read_json(path / CFG_FILENAME)
    where = str(path / CFG_FILENAME)
    missing = [key for key in ("d_in", "k") if key not in cfg]
    if missing:
        raise ValueError(f"{where} is missing {missing}")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{where}: activation={cfg['activation']!r} is not supported; saefast reads TopK SAEs")
    for flag in ("skip_connection", "transcode"):
        if cfg.get(flag):
            raise ValueError(f"{where}: {flag}=True is not supported (saefast SAEs have no skip connection and "
                             "autoencode their input)")
    d_in = cfg["d_in"]
    d_sae = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)
    weights = load_safetensors(path / SPARSIFY_WEIGHTS_FILENAME, _RESAVE)
    wfile = str(path / SPARSIFY_WEIGHTS_FILENAME)
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    missing = [name for name in expected if name not in weights]
    if missing:
        raise ValueError(f"{wfile} lacks {missing}; a sparsify SAE holds {list(expected)}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{wfile}: {name} has shape {tuple(weights[name].shape)} but the config says "
                             f"d_in={d_in}, d_sae={d_sae}, so it must be {list(shape)}")
        check_finite(wfile, name, weights[name])
    weight_dtype = dtype_name(parse_dtype(dtype)) if dtype is not None else dtype_name(weights["encoder.weight"].dtype)
    match = re.search(r"layers[._](\d+)", path.name)
    hook = {"hook_layer": int(match.group(1)), "hook_name": "hook_resid_post"} if match else {}
    config = SAEConfig(d_in=d_in, d_sae=d_sae, dtype=weight_dtype, device="cpu", architecture="topk",
                       top_k=cfg["k"], train_b_enc=True, **hook)
    sae = without_rng(lambda: variant_class("topk")(config))
    _fill(sae, {"W_enc": weights["encoder.weight"].t(), "b_enc": weights["encoder.bias"],
                "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}, wfile)
    return sae.to(device)


def save_sparsify(sae: nn.Module, path: PathLike, overwrite: bool = False) -> Path:
    """Write a TopKSAE as a sparsify folder (cfg.json + sae.safetensors)."""
    if not isinstance(sae, variant_class("topk")):
        raise ValueError(f"sparsify stores per-token TopK SAEs only; got {type(sae).__name__}")
    c = sae.config
    if c.input_unit_norm or not c.apply_b_dec_to_input:
        raise ValueError("sparsify SAEs subtract b_dec and do not standardise inputs; this SAE has "
                         f"input_unit_norm={c.input_unit_norm}, apply_b_dec_to_input={c.apply_b_dec_to_input}")
    cfg = {"activation": "topk", "expansion_factor": max(1, sae.d_sae // sae.d_in), "normalize_decoder": True,
           "num_latents": sae.d_sae, "k": c.top_k, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": sae.d_in}
    weights = {"encoder.weight": _cpu(sae.W_enc.t()), "encoder.bias": _cpu(sae.b_enc),
               "W_dec": _cpu(sae.W_dec), "b_dec": _cpu(sae.b_dec)}
    writers = {SPARSIFY_WEIGHTS_FILENAME: lambda p: save_file(weights, str(p)),
               CFG_FILENAME: lambda p: write_json(cfg, p)}
    return _atomic_folder(path, writers, guarded=(CFG_FILENAME, SPARSIFY_WEIGHTS_FILENAME), stale=(),
                          overwrite=overwrite)
