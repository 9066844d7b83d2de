"""Transformer-lens models as activation producers: one adapter for TL 3.x and TL 4.x.

TransformerLens 3.x builds ``HookedTransformer`` models; 4.x removed it in favour of
``TransformerBridge``. Both expose the same surface saefast needs (``hook_dict``,
``run_with_cache(names_filter=..., stop_at_layer=...)``, ``run_with_hooks``, ``cfg.n_ctx``), so
everything here works on either; the installed version is detected by import.

Hook names follow transformer-lens: ``blocks.{layer}.hook_resid_pre``, ``blocks.{layer}.hook_mlp_out``,
``blocks.{layer}.attn.hook_z``, ``hook_embed``, ... The bridge also accepts its own canonical names
(``blocks.{layer}.hook_in``) and lists both. Activations come back as ``[batch, seq, d_in]``; per-head
hooks (``[batch, seq, n_heads, d_head]``) are flattened to ``d_in = n_heads * d_head``.

A hook inside block ``L`` is computed with ``stop_at_layer=L + 1``: blocks after it never run.
"""
from __future__ import annotations

import difflib
import re
import threading
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..utils import parse_hook

__all__ = [
    "tl_has_hooked_transformer", "load_model", "tiny_model", "model_device", "model_tokenizer",
    "hook_names", "check_hook", "hook_layer", "stop_layer_for", "run_to_hook", "run_to_hooks", "hook_d_in",
    "check_d_in", "context_limit", "check_context_size", "model_lock",
]

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
# Hooks that fire before block 0: stop_at_layer=0 runs only the embedding.
_EMBED_HOOK_PREFIXES = ("hook_embed", "hook_pos_embed", "embed.", "pos_embed.", "hook_tokens")
# Attention maps are [batch, head, query, key]: not one vector per token.
_NOT_PER_TOKEN_SUFFIXES = ("hook_pattern", "hook_attn_scores")

DeviceLike = Union[str, torch.device]

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock every saefast forward pass through ``model`` holds.

    transformer-lens hooks live on the model, not on the call, so two threads running the same
    model at once would see each other's hooks (a background activation source caching while an
    eval splices). Hold ``with model_lock(model):`` around any other hooked run of a model that a
    background :class:`~saefast.data.source.ModelActivationSource` is using.
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def tl_has_hooked_transformer() -> bool:
    """True when the installed transformer-lens still ships ``HookedTransformer`` (3.x and older)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def load_model(name: str, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32,
               **kwargs: Any) -> nn.Module:
    """Load a pretrained model by hub name (or, on TL 4.x, a local Hugging Face folder).

    TL 3.x: ``HookedTransformer.from_pretrained_no_processing`` (raw weights: no LayerNorm folding
    or centring, so activations equal those of the Hugging Face model). TL 4.x:
    ``TransformerBridge.boot_transformers`` without compatibility-mode weight processing, for the
    same reason. Extra keyword arguments go to that loader. The model is put in eval mode.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} must be a model name such as 'gpt2' or a local model folder")
    _check_local_model(name)
    try:
        if tl_has_hooked_transformer():
            from transformer_lens import HookedTransformer

            model = HookedTransformer.from_pretrained_no_processing(name, device=str(device), dtype=dtype,
                                                                   **kwargs)
        else:
            from transformer_lens import TransformerBridge

            model = TransformerBridge.boot_transformers(name, device=device, dtype=dtype, **kwargs)
    except OSError as err:  # not on the hub, no network and not cached, a damaged download
        raise ValueError(f"model {name!r} (--model) could not be loaded: {' '.join(str(err).split())[:300]} Check "
                         "the name (or pass a local model folder), and the network if it comes from the hub") from None
    model.eval()
    return model


def _check_local_model(name: str) -> None:
    """A name written as a path (``./m``, ``../m``, ``/m``, ``~/m``, ``a/b/c``) must be a folder
    that exists: otherwise the loaders would look it up on the hub and fail obscurely."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model {name!r} (--model) is a file; pass a folder holding a Hugging Face model "
                             "(config.json and weights) or a hub name such as 'gpt2'")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ValueError(f"model folder {name} (--model) does not exist; pass an existing folder holding a Hugging "
                         "Face model, or a hub name such as 'gpt2'")


def tiny_model(cfg: Dict[str, Any], device: DeviceLike = "cpu", tokenizer: Any = None) -> nn.Module:
    """A randomly initialised transformer-lens model built from a config dict, without any download.

    ``cfg`` takes HookedTransformerConfig / TransformerBridgeConfig fields, e.g.
    ``dict(d_model=16, d_head=4, n_heads=4, n_layers=3, n_ctx=32, d_vocab=50, seed=0)``;
    ``act_fn`` defaults to "gelu" and ``d_mlp`` to ``4 * d_model``. Returns a HookedTransformer on
    TL 3.x and a ``TransformerBridge.boot_native`` model on TL 4.x, in eval mode.
    """
    if not isinstance(cfg, dict):
        raise TypeError(f"cfg must be a dict of model config fields, got {type(cfg).__name__}")
    missing = [k for k in ("d_model", "d_head", "n_layers", "n_ctx", "d_vocab") if k not in cfg]
    if missing:
        raise ValueError(f"cfg is missing {missing}; tiny_model needs d_model, d_head, n_layers, n_ctx "
                         "and d_vocab")
    full = {"act_fn": "gelu", "d_mlp": 4 * cfg["d_model"], **cfg}
    if tl_has_hooked_transformer():
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        full.setdefault("device", str(device))
        model = HookedTransformer(HookedTransformerConfig(**full), tokenizer=tokenizer)
        if model_device(model) != torch.device(device):
            model.to(device)
    else:
        from transformer_lens import TransformerBridge, TransformerBridgeConfig

        model = TransformerBridge.boot_native(TransformerBridgeConfig(**full), tokenizer=tokenizer,
                                              device=device)
    model.eval()
    return model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_tokenizer(model: nn.Module) -> Any:
    """The model's Hugging Face tokenizer, or None when it has none (e.g. a ``tiny_model``)."""
    return getattr(model, "tokenizer", None)


def hook_names(model: nn.Module) -> List[str]:
    """Every hook name the model accepts, in the model's order (aliases included on TL 4.x)."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise TypeError(f"model must be a transformer-lens HookedTransformer or TransformerBridge, "
                        f"got {type(model).__name__} (it has no hook_dict)")
    return list(hook_dict.keys())


def _summarise_names(names: Sequence[str]) -> str:
    """Fold ``blocks.<i>.`` names into ``blocks.{0..L-1}.`` patterns so the list stays readable."""
    layers = sorted({int(m.group(1)) for n in names if (m := _BLOCK_RE.match(n))})
    span = f"{{{layers[0]}..{layers[-1]}}}" if layers else ""
    seen: Dict[str, None] = {}
    for n in names:
        seen[_BLOCK_RE.sub(f"blocks.{span}.", n)] = None
    return ", ".join(seen)


def check_hook(model: nn.Module, hook_name: str) -> None:
    """Raise ValueError, listing the valid names, when ``hook_name`` is not one of the model's hooks."""
    if not isinstance(hook_name, str):
        raise TypeError(f"hook_name must be a string such as 'blocks.0.hook_resid_pre', "
                        f"got {type(hook_name).__name__}")
    names = hook_names(model)
    if hook_name in names:
        if hook_name.endswith(_NOT_PER_TOKEN_SUFFIXES):
            raise ValueError(f"hook {hook_name!r} holds attention maps [batch, head, query, key], not one "
                             "vector per token; pick a residual, MLP or attention-output hook")
        return
    close = difflib.get_close_matches(hook_name, names, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown hook {hook_name!r} for this model.{hint} Valid hook names: "
                     f"{_summarise_names(names)}")


def hook_layer(hook_name: str) -> Optional[int]:
    """The block index of a ``blocks.<i>.`` hook; -1 for embedding hooks; None for hooks after the
    last block (``ln_final``, ``unembed``)."""
    layer, _ = parse_hook(hook_name)
    if layer is not None:
        return layer
    if hook_name.startswith(_EMBED_HOOK_PREFIXES):
        return -1
    return None


def stop_layer_for(hook_names_: Sequence[str]) -> Optional[int]:
    """The ``stop_at_layer`` that still fires every hook in ``hook_names_`` (None: run everything)."""
    layers = [hook_layer(h) for h in hook_names_]
    if not layers or any(layer is None for layer in layers):
        return None
    return max(layers) + 1  # type: ignore[type-var]


def _flatten_per_token(act: Tensor, hook_name: str, seq_len: int) -> Tensor:
    if act.dim() < 3 or act.shape[1] != seq_len:
        raise ValueError(f"hook {hook_name!r} gives shape {tuple(act.shape)}, not [batch, seq, ...]; "
                         "pick a hook with one activation vector per token")
    return act.flatten(2) if act.dim() > 3 else act


def run_to_hook(model: nn.Module, tokens: Tensor, hook_name: str) -> Tensor:
    """Activations at ``hook_name`` for ``tokens`` [batch, seq] -> [batch, seq, d_in].

    Runs with ``names_filter=[hook_name]`` and ``stop_at_layer`` just past the hook's block, so only
    that activation is cached and later blocks are skipped. No gradient is recorded.
    """
    return run_to_hooks(model, tokens, [hook_name])[hook_name]


def run_to_hooks(model: nn.Module, tokens: Tensor, hook_names: Sequence[str]) -> Dict[str, Tensor]:
    """``{hook: [batch, seq, d_hook]}`` for ``tokens`` [batch, seq], every hook from one forward
    pass that stops after the deepest hook's block (see :func:`run_to_hook`)."""
    hooks = list(dict.fromkeys(hook_names))
    for hook in hooks:
        check_hook(model, hook)
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a [batch, seq] integer tensor, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    tokens = tokens.to(model_device(model))
    with torch.no_grad(), model_lock(model):
        _, cache = model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=stop_layer_for(hooks))
    return {h: _flatten_per_token(cache[h], h, tokens.shape[1]) for h in hooks}


def hook_d_in(model: nn.Module, hook_name: str) -> int:
    """Width of the activation at ``hook_name`` (found with a two-token forward pass)."""
    probe = torch.zeros(1, 2, dtype=torch.long)
    return int(run_to_hook(model, probe, hook_name).shape[-1])


def check_d_in(model: nn.Module, hook_name: str, d_in: int) -> None:
    """Raise ValueError when an SAE's ``d_in`` does not match the width of ``hook_name``."""
    actual = hook_d_in(model, hook_name)
    if d_in != actual:
        raise ValueError(f"d_in={d_in} does not match hook {hook_name!r}, whose activations have width "
                         f"{actual}; set the SAE's d_in to {actual} or pick another hook")


def context_limit(model: nn.Module) -> int:
    """The longest sequence the model takes (``cfg.n_ctx``)."""
    return int(model.cfg.n_ctx)


def check_context_size(model: nn.Module, context_size: int) -> None:
    """Raise ValueError when ``context_size`` exceeds the model's ``n_ctx``."""
    limit = context_limit(model)
    if context_size > limit:
        raise ValueError(f"context_size={context_size} is larger than the model's context of {limit} "
                         f"tokens; use context_size <= {limit}")
