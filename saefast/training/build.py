"""Build everything a run needs from a TrainConfig: the SAE, the activation source (synthetic
default, transformer-lens model + dataset, or an activation cache), and for model runs the model,
the CE-eval tokens and the end-to-end token stream.

A transcoder's source yields (input, target) pairs and a crosscoder's the hooks concatenated,
both read in one model pass (or one cache read). With several hooks (``hooks``), :func:`build_members`
builds one member run per hook (or per input/target pair), all reading the same model pass through
views of one shared source (:mod:`saefast.data.views`).

Every check that can fail (unknown hook, d_in that does not match the hook, context size larger
than the model's, empty dataset, bad option) runs here, before any training work. Under
torchrun each process gets its own slice of the data: documents and cache reads are split by
rank, and the synthetic stream of each rank is an independent stream over the same dictionary.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .config import SYNTHETIC_D_IN, TrainConfig
from .distributed import DistInfo, dist_info

__all__ = ["RunInputs", "build_sae", "build_inputs", "build_members", "build_model_source", "synthetic_source",
           "member_name", "TokenBatches", "SYNTHETIC_D_IN"]

log = logging.getLogger(__name__)

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
    d_out: Optional[int] = None                 # a transcoder's target width
    layer_hooks: Optional[List[str]] = None     # a crosscoder's layers (model / cache runs)
    n_layers: Optional[int] = None              # a crosscoder's layer count (synthetic runs)

    def sae_shape(self) -> Dict[str, Any]:
        """What :func:`build_sae` needs besides d_in: d_out, layer_hooks, n_layers."""
        return {"d_out": self.d_out, "layer_hooks": self.layer_hooks, "n_layers": self.n_layers}

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


def build_sae(cfg: TrainConfig, d_in: int, device: torch.device, *, d_out: Optional[int] = None,
              layer_hooks: Optional[List[str]] = None, n_layers: Optional[int] = None) -> nn.Module:
    """A freshly initialised SAE (seeded by ``cfg.seed``) for ``d_in``-wide activations on
    ``device``; a transcoder writing ``d_out``-wide targets; a crosscoder over ``layer_hooks``
    (or ``n_layers`` unnamed layers). ``RunInputs.sae_shape()`` gives those three."""
    from ..sae import create_sae

    metadata: Dict[str, Any] = {}
    if cfg.model is not None:
        metadata = dict(model_name=cfg.model, dataset_path=cfg.dataset, context_size=cfg.context_size,
                        prepend_bos=cfg.prepend_bos)
    sae_cfg = cfg.sae_config(d_in, device, d_out=d_out, layer_hooks=layer_hooks, n_layers=n_layers, **metadata)
    torch.manual_seed(cfg.seed)
    return create_sae(sae_cfg).to(device)


def build_inputs(cfg: TrainConfig, device: torch.device, info: Optional[DistInfo] = None) -> RunInputs:
    """The activation source (and model-side inputs) of a run training one SAE (a transcoder and
    a crosscoder included); checks everything before work. Several SAEs: :func:`build_members`."""
    members = build_members(cfg, device, info)
    if len(members) != 1:
        for _, inputs in members:
            inputs.close()
        raise ValueError(f"hooks={cfg.hooks!r} trains {len(members)} SAEs; build them with build_members")
    return members[0][1]


def member_name(hook: str, target_hook: Optional[str] = None) -> str:
    """The sub-folder of a member run: its hook, or ``<hook>-to-<target hook>`` for a transcoder."""
    return hook if target_hook is None else f"{hook}-to-{target_hook}"


def build_members(cfg: TrainConfig, device: torch.device,
                  info: Optional[DistInfo] = None) -> List[Tuple[TrainConfig, RunInputs]]:
    """``[(member config, its inputs)]``: one entry for a run training one SAE (the config is
    ``cfg``), one per hook (or input/target pair) when ``cfg.hooks`` trains several; then each
    member config is ``cfg`` for that hook alone with run folder ``<out_dir>/<run_name>/<hook>``,
    and every member's source is a view of one shared source (one model pass per batch)."""
    info = info or dist_info()
    kind = cfg.source_kind
    if kind == "synthetic":
        return [(cfg, _build_synthetic_inputs(cfg, device, info))]
    model = None
    if kind == "model":
        from ..data import models
        model = models.load_model(cfg.model, device=device, dtype=_torch_dtype(cfg.model_dtype))
    plan = _member_plan(cfg, model)
    reads = list(dict.fromkeys(h for hooks, target in plan for h in hooks + ([target] if target else [])))
    if kind == "cache":
        source, widths = _cache_source(cfg, device, info, reads)
        shared_kwargs: Dict[str, Any] = {}
        where = f"the cache {cfg.cache_dir}"
    else:
        source, widths, shared_kwargs = _build_model_source(cfg, model, device, info, reads)
        where = f"hook {reads[0]} of {cfg.model}"
    if len(reads) <= 1:  # one SAE on one hook: the source's own batches
        d_in = next(iter(widths.values()))
        _check_source_d_in(cfg, d_in, where)
        layers = {"layer_hooks": reads} if cfg.is_crosscoder else {}
        return [(cfg, RunInputs(source, d_in, **layers, **shared_kwargs))]
    from ..data.views import SharedSource, pick_concat, pick_hook, pick_pair
    shared = SharedSource(source)
    members = []
    for hooks, target in plan:
        if cfg.is_crosscoder:
            if len(set(widths[h] for h in hooks)) != 1:
                raise ValueError(f"a crosscoder's layers must have one width; hooks {hooks} have widths "
                                 f"{[widths[h] for h in hooks]}")
            d_in = sum(widths[h] for h in hooks)
            view = shared.view(pick_concat(hooks), d_in, name="+".join(hooks))
            inputs = RunInputs(view, d_in, layer_hooks=list(hooks), **shared_kwargs)
        elif target is not None:
            d_in, d_out = widths[hooks[0]], widths[target]
            if cfg.d_out is not None and cfg.d_out != d_out:
                raise ValueError(f"d_out={cfg.d_out} does not match target hook {target}, whose activations have "
                                 f"width {d_out}; drop d_out or set it to {d_out}")
            view = shared.view(pick_pair(hooks[0], target), d_in, d_out, name=member_name(hooks[0], target))
            inputs = RunInputs(view, d_in, d_out=d_out, **shared_kwargs)
        else:
            view = shared.view(pick_hook(hooks[0]), widths[hooks[0]], name=hooks[0])
            inputs = RunInputs(view, widths[hooks[0]], **shared_kwargs)
        _check_source_d_in(cfg, inputs.d_in, f"hook(s) {', '.join(hooks)}")
        members.append((_member_config(cfg, hooks, target), inputs))
    return members


def build_model_source(cfg: TrainConfig, device: torch.device,
                       info: Optional[DistInfo] = None) -> Tuple[Any, List[str]]:
    """(the model source reading every hook of ``cfg`` in one pass, those hooks): what
    ``saefast cache`` writes. One hook: plain batches; several: ``{hook: rows}``."""
    from ..data import models
    if cfg.source_kind != "model":
        raise ValueError("a model source needs model, hook and dataset")
    info = info or dist_info()
    model = models.load_model(cfg.model, device=device, dtype=_torch_dtype(cfg.model_dtype))
    plan = _member_plan(cfg, model)
    reads = list(dict.fromkeys(h for hooks, target in plan for h in hooks + ([target] if target else [])))
    source, _, _ = _build_model_source(dataclasses.replace(cfg, eval_ce_batches=0), model, device, info, reads)
    return source, reads


def _member_plan(cfg: TrainConfig, model: Optional[nn.Module]) -> List[Tuple[List[str], Optional[str]]]:
    """[(hooks a member reads, its target hook or None)], with 'all-resid' resolved."""
    hooks = cfg.hook_list
    if hooks == ["all-resid"]:
        if model is None:
            raise ValueError("hooks='all-resid' names a model's residual hooks; a cache run names its hooks: "
                             "--hook ... --hook ...")
        hooks = [f"blocks.{i}.hook_resid_post" for i in range(int(model.cfg.n_layers))]
    if cfg.is_crosscoder:
        if not hooks:
            raise ValueError("a crosscoder reads several layers: name their hooks (--hook A --hook B ..., or "
                             "--hooks all-resid)")
        return [(hooks, None)]
    targets = [cfg.target_hook] if cfg.target_hook is not None else (list(cfg.target_hooks) or [None] * len(hooks))
    return [([h], t) for h, t in zip(hooks, targets)]


def _member_config(cfg: TrainConfig, hooks: List[str], target: Optional[str]) -> TrainConfig:
    """The config of one member: ``cfg`` itself for a single-SAE run, else ``cfg`` for that hook
    alone in the sub-folder ``<run_name>/<hook>``."""
    if not cfg.is_multi:
        return cfg
    from pathlib import Path
    return dataclasses.replace(cfg, hook=hooks[0], hooks=[], target_hook=target, target_hooks=[],
                               out_dir=str(Path(cfg.out_dir) / cfg.run_name), run_name=member_name(hooks[0], target))


def synthetic_source(cfg: TrainConfig, batch_size: Optional[int] = None, *, stream: int = 0,
                     device: Any = "cpu") -> Any:
    """The run's synthetic activations (:class:`~saefast.data.synthetic.SyntheticActivations`):
    planted pairs for a transcoder (``d_out``), features spanning ``synthetic_layers`` layers for
    a crosscoder; ``stream`` picks an independent sample stream over the same planted dictionary."""
    from ..data.synthetic import SyntheticActivations
    d_in = cfg.d_in if cfg.d_in is not None else SYNTHETIC_D_IN
    if cfg.synthetic_active > cfg.synthetic_features:
        raise ValueError(f"synthetic_active={cfg.synthetic_active} must be at most "
                         f"synthetic_features={cfg.synthetic_features}")
    n_layers = cfg.synthetic_layers if cfg.is_crosscoder else 1
    if cfg.is_crosscoder and cfg.d_in is not None:
        if cfg.d_in % n_layers:
            raise ValueError(f"d_in={cfg.d_in} is a crosscoder's whole input, synthetic_layers={n_layers} layers "
                             "wide: make it a multiple of synthetic_layers")
        d_in = cfg.d_in // n_layers
    return SyntheticActivations(
        d_in, cfg.synthetic_features, batch_size or cfg.batch_size, mean_active=cfg.synthetic_active,
        zipf_exponent=cfg.synthetic_zipf_exponent, noise_std=cfg.synthetic_noise,
        dictionary_seed=cfg.seed, seed=cfg.seed, stream=stream, device=device, d_out=cfg.d_out,
        linear_scale=cfg.synthetic_linear, n_layers=n_layers)


def _build_synthetic_inputs(cfg: TrainConfig, device: torch.device, info: DistInfo) -> RunInputs:
    source = synthetic_source(cfg, stream=info.rank, device=device)
    return RunInputs(source, source.d_in, d_out=cfg.d_out, n_layers=source.n_layers if cfg.is_crosscoder else None)


def _cache_source(cfg: TrainConfig, device: torch.device, info: DistInfo, reads: List[str]):
    """(cache source, {hook: width}) reading ``reads`` (one hook: plain batches)."""
    from ..data.cache import CachedActivationSource, read_manifest
    manifest = read_manifest(cfg.cache_dir)
    if manifest.get("hooks") is None:
        if len(reads) > 1:
            raise ValueError(f"the cache {cfg.cache_dir} holds one hook; this run reads {reads}: cache them together "
                             "with saefast cache --hook ... --hook ...")
        source = CachedActivationSource(cfg.cache_dir, cfg.batch_size, seed=cfg.seed, repeat=True, device=device,
                                        rank=info.rank, world_size=info.world_size, hooks=reads[0] if reads else None)
        return source, {reads[0] if reads else None: source.d_in}
    if not reads:
        raise ValueError(f"the cache {cfg.cache_dir} holds hooks {manifest['hooks']}: name the one(s) to train on "
                         "with --hook")
    source = CachedActivationSource(cfg.cache_dir, cfg.batch_size, seed=cfg.seed, repeat=True, device=device,
                                    rank=info.rank, world_size=info.world_size,
                                    hooks=reads[0] if len(reads) == 1 else reads)
    return source, dict(source.d_ins)


def _check_source_d_in(cfg: TrainConfig, d_in: int, what: str) -> None:
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise ValueError(f"d_in={cfg.d_in} does not match {what}, which has width {d_in}; "
                         f"drop d_in or set it to {d_in}")


def _build_model_source(cfg: TrainConfig, model: nn.Module, device: torch.device, info: DistInfo,
                        reads: List[str]):
    """(model source reading ``reads`` in one pass, {hook: width}, RunInputs fields shared by
    every member: model, eval tokens, eval kwargs, end-to-end tokens)."""
    from ..data import models
    from ..data.source import ModelActivationSource
    from ..data.tokens import TokenWindows, load_dataset_any

    for hook in reads:
        models.check_hook(model, hook)
    widths = {hook: models.hook_d_in(model, hook) for hook in reads}
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
    source = ModelActivationSource(model, reads[0] if len(reads) == 1 else reads,
                                   windows(True, info.rank, info.world_size), batch_size=cfg.batch_size,
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
    return source, widths, dict(model=model, eval_tokens=eval_tokens, e2e_tokens=e2e_tokens,
                                model_eval_kwargs=special)


def _first_windows(windows: Any, n: int) -> Optional[Tensor]:
    rows = []
    for window in windows:
        rows.append(torch.as_tensor(window))
        if len(rows) == n:
            break
    return torch.stack(rows) if rows else None
