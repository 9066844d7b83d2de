"""Build everything a run needs from a TrainConfig: the SAE, the activation source (synthetic
default, transformer-lens model + dataset, or an activation cache), and for model runs the model,
the CE-eval tokens and the end-to-end token stream.

Every check that can fail (unknown hook, d_in that does not match the hook, context size larger
than the model's, empty dataset, bad option) runs here, before any training work. Under
torchrun each process gets its own slice of the data: documents and cache reads are split by
rank, and the synthetic stream of each rank is an independent stream over the same dictionary.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .distributed import DistInfo, dist_info

__all__ = ["RunInputs", "build_sae", "build_inputs", "TokenBatches", "SYNTHETIC_D_IN"]

log = logging.getLogger(__name__)

SYNTHETIC_D_IN = 64
_RANK_SEED_STRIDE = 7919


@dataclass
class RunInputs:
    """What the Trainer needs besides the SAE and the config."""

    source: Any
    d_in: int
    model: Optional[nn.Module] = None
    eval_tokens: Optional[Tensor] = None
    e2e_tokens: Optional["TokenBatches"] = None
    model_eval_kwargs: Optional[Dict[str, Any]] = None

    def trainer_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :class:`saefast.training.Trainer` besides sae, source and cfg."""
        return {"model": self.model, "eval_tokens": self.eval_tokens, "e2e_tokens": self.e2e_tokens,
                "model_eval_kwargs": self.model_eval_kwargs}

    def close(self) -> None:
        """Stop background producer threads of the source, if any."""
        if hasattr(self.source, "close"):
            self.source.close()


class TokenBatches:
    """Stacks ``batch_size`` windows of a (repeating) TokenWindows into [batch_size, context]
    token batches; resumable through the windows' state."""

    def __init__(self, windows: Any, batch_size: int) -> None:
        self.windows, self.batch_size = windows, batch_size

    def __iter__(self) -> "TokenBatches":
        return self

    def __next__(self) -> Tensor:
        return torch.stack([next(self.windows) for _ in range(self.batch_size)])

    def state_dict(self) -> Dict[str, Any]:
        return self.windows.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.windows.load_state_dict(state)


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_sae(cfg: TrainConfig, d_in: int, device: torch.device) -> nn.Module:
    """A freshly initialised SAE (seeded by ``cfg.seed``) for ``d_in``-wide activations on ``device``."""
    from ..sae import create_sae

    metadata: Dict[str, Any] = {}
    if cfg.model is not None:
        metadata = dict(model_name=cfg.model, dataset_path=cfg.dataset, context_size=cfg.context_size,
                        prepend_bos=cfg.prepend_bos)
    sae_cfg = cfg.sae_config(d_in, device, **metadata)
    torch.manual_seed(cfg.seed)
    return create_sae(sae_cfg).to(device)


def build_inputs(cfg: TrainConfig, device: torch.device, info: Optional[DistInfo] = None) -> RunInputs:
    """The activation source (and model-side inputs) for ``cfg``; checks everything before work."""
    info = info or dist_info()
    kind = cfg.source_kind
    if kind == "synthetic":
        from ..data.synthetic import SyntheticActivations
        d_in = cfg.d_in if cfg.d_in is not None else SYNTHETIC_D_IN
        if cfg.synthetic_active > cfg.synthetic_features:
            raise ValueError(f"synthetic_active={cfg.synthetic_active} must be at most "
                             f"synthetic_features={cfg.synthetic_features}")
        source = SyntheticActivations(
            d_in, cfg.synthetic_features, cfg.batch_size, mean_active=cfg.synthetic_active,
            zipf_exponent=cfg.synthetic_zipf_exponent, noise_std=cfg.synthetic_noise,
            dictionary_seed=cfg.seed, seed=cfg.seed, stream=info.rank, device=device)
        return RunInputs(source, d_in)
    if kind == "cache":
        from ..data.cache import CachedActivationSource
        source = CachedActivationSource(cfg.cache_dir, cfg.batch_size, seed=cfg.seed, repeat=True, device=device,
                                        rank=info.rank, world_size=info.world_size)
        _check_source_d_in(cfg, source.d_in, f"the cache {cfg.cache_dir}")
        return RunInputs(source, source.d_in)
    return _build_model_inputs(cfg, device, info)


def _check_source_d_in(cfg: TrainConfig, d_in: int, what: str) -> None:
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise ValueError(f"d_in={cfg.d_in} does not match {what}, which has width {d_in}; "
                         f"drop d_in or set it to {d_in}")


def _build_model_inputs(cfg: TrainConfig, device: torch.device, info: DistInfo) -> RunInputs:
    from ..data import models
    from ..data.source import ModelActivationSource
    from ..data.tokens import TokenWindows, load_dataset_any

    model = models.load_model(cfg.model, device=device, dtype=_torch_dtype(cfg.model_dtype))
    models.check_hook(model, cfg.hook)
    d_in = models.hook_d_in(model, cfg.hook)
    _check_source_d_in(cfg, d_in, f"hook {cfg.hook} of {cfg.model}")
    models.check_context_size(model, cfg.context_size)
    tokenizer = models.model_tokenizer(model)
    for hook in cfg.e2e_downstream_hooks:
        models.check_hook(model, hook)

    dataset = load_dataset_any(cfg.dataset, split=cfg.dataset_split)
    if len(dataset) == 0:
        raise ValueError(f"dataset {cfg.dataset!r} (split {cfg.dataset_split!r}) is empty")

    def windows(repeat: bool, rank: int = 0, world_size: int = 1) -> Any:
        return TokenWindows(dataset, tokenizer, cfg.context_size, prepend_bos=cfg.prepend_bos,
                            text_column=cfg.text_column, tokens_column=cfg.tokens_column, repeat=repeat,
                            rank=rank, world_size=world_size)

    # Training reads this process's share of the documents, looping over the data as often as
    # the run needs; the CE evals read the first windows of the whole dataset.
    source = ModelActivationSource(model, cfg.hook, windows(True, info.rank, info.world_size),
                                   batch_size=cfg.batch_size,
                                   model_batch_size=cfg.model_batch_size, buffer_tokens=cfg.buffer_tokens,
                                   seed=cfg.seed + _RANK_SEED_STRIDE * info.rank, device=device)
    eval_tokens = None
    eval_windows = windows(False)
    if cfg.eval_ce_batches > 0:
        eval_tokens = _first_windows(eval_windows, cfg.eval_ce_batches * cfg.model_batch_size)
    # BOS positions are never trained on, so the evals keep their clean activations there
    special = {"exclude_token_ids": {eval_windows.bos_token_id} if cfg.prepend_bos else None,
               "pad_token_id": eval_windows.pad_token_id}
    e2e_tokens = (TokenBatches(windows(True, info.rank, info.world_size), cfg.e2e_batch_size)
                  if cfg.uses_e2e else None)
    return RunInputs(source, d_in, model=model, eval_tokens=eval_tokens, e2e_tokens=e2e_tokens,
                     model_eval_kwargs=special)


def _first_windows(windows: Any, n: int) -> Optional[Tensor]:
    rows = []
    for window in windows:
        rows.append(torch.as_tensor(window))
        if len(rows) == n:
            break
    return torch.stack(rows) if rows else None
