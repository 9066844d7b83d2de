"""``saefast analyze``: the whole analysis of a trained SAE in one call, written to a folder.

:func:`analyze` takes a run folder (``saefast train``'s output) or an SAE folder, finds
activations (the flags' model + dataset or cache, else the run's own source: its model and dataset,
its cache, or its synthetic planted-dictionary stream), and writes::

    activations.safetensors   the activation database (sparse token x feature matrix + metadata)
    summary.json              sparsity and dead-feature report, reconstruction metrics, CE loss
                              recovered and per-feature ablation (model sources), decoder-similarity
                              summary, the run's final eval
    similarity.csv            for every feature its nearest features by decoder cosine
                              (synthetic sources: also which planted feature each latent recovers,
                              on the pages and in summary.json's "planted")
    density.png               feature-density histogram (log10 firing frequency)
    training_curves.png       loss, L0, dead fraction, ... against the step (run folders)
    index.html, features/     the HTML report (pages for ``n_features`` features)

Without any source (an SAE folder and no flags) the report is built from the weights alone
(similarity, and the density of SAELens' ``sparsity.safetensors`` when present).
The folder is written under a temporary name and renamed at the end. An existing non-empty
folder is replaced only with ``overwrite=True``, and only when it is an analysis that saefast
wrote and holds nothing else (see :func:`saefast.utils.output_folder`): a regular file or a folder
with other files is refused and left untouched.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from ..utils import output_folder
from . import plots
from .database import ActivationDatabase, build_database, build_database_from_activations, build_database_from_cache
from .features import feature_stats, sparsity_report
from .patching import ablation_study
from .report import write_html_report
from .similarity import decoder_neighbours

__all__ = ["analyze", "select_features", "SELECTIONS"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
SELECTIONS = ("spread", "frequent", "random")
_ANALYSIS_STREAM = 1_000  # synthetic sample stream of the analysis: same dictionary, unseen rows
_METRIC_ROWS = 8192       # activation rows used for the reconstruction metrics
_NEAR_DUPLICATE = 0.9     # decoder cosine above which two features count as near duplicates
_PLANTED_MATCH = 0.9      # decoder cosine above which a latent counts as recovering a planted feature
_LAYER_SHARE = 0.1        # a crosscoder feature "writes" a layer holding this share of its decoder norm


def select_features(frequency: Tensor, n: int, how: str = "spread", seed: int = 0) -> List[int]:
    """Pick ``n`` features for the report among those that fire (``frequency`` [d_sae] > 0: firing
    counts or densities).

    how: ``"spread"`` (evenly spaced over the firing features ranked by frequency, from the most
    frequent to the rarest, so the report shows the whole range), ``"frequent"`` (the n most
    frequent) or ``"random"`` (a seeded random sample). Returned sorted by id. When no feature
    fires, the first n ids.
    """
    if how not in SELECTIONS:
        raise ValueError(f"how={how!r} must be one of {SELECTIONS}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative integer")
    if not isinstance(frequency, Tensor) or frequency.dim() != 1:
        raise ValueError("frequency must be a 1-D tensor [d_sae] of firing counts or densities")
    live = torch.nonzero(frequency > 0).flatten()
    if not live.numel():
        return list(range(min(n, frequency.numel())))
    ranked = live[torch.sort(frequency[live], descending=True, stable=True).indices]
    n = min(n, ranked.numel())
    if n == 0:
        return []
    if how == "frequent":
        chosen = ranked[:n]
    elif how == "random":
        chosen = ranked[torch.randperm(ranked.numel(), generator=torch.Generator().manual_seed(seed))[:n]]
    else:
        chosen = ranked[torch.linspace(0, ranked.numel() - 1, n).round().long().unique()]
    return sorted(int(f) for f in chosen)


@dataclass
class _Inputs:
    """Where the activations come from, resolved from the flags, the run and the SAE."""

    kind: str                      # "model", "cache", "synthetic" or "none"
    model_name: Optional[str] = None
    hook: Optional[str] = None
    dataset: Optional[str] = None
    dataset_split: str = "train"
    text_column: str = "text"
    tokens_column: Optional[str] = None
    context_size: Optional[int] = None
    prepend_bos: bool = True
    cache_dir: Optional[str] = None
    train_cfg: Any = None


def _resolve_inputs(sae: nn.Module, train_cfg: Any, model: Optional[str], dataset: Optional[str],
                    hook: Optional[str], cache_dir: Optional[str], context_size: Optional[int]) -> _Inputs:
    flags_model = model is not None or dataset is not None or hook is not None
    if flags_model and cache_dir is not None:
        raise ValueError("give either --cache-dir or --model/--dataset/--hook, not both")
    sae_cfg = getattr(sae, "config", None)
    if cache_dir is not None:
        return _Inputs("cache", cache_dir=cache_dir)
    if flags_model or (train_cfg is not None and train_cfg.source_kind == "model"):
        base = train_cfg if (train_cfg is not None and train_cfg.source_kind == "model") else None
        inputs = _Inputs(
            "model",
            model_name=model or (base.model if base else getattr(sae_cfg, "model_name", None)),
            hook=hook,  # None: the hook(s) the SAE names (saefast.evals.model_evals.sae_hooks)
            dataset=dataset or (base.dataset if base else getattr(sae_cfg, "dataset_path", None)),
            context_size=context_size or (base.context_size if base else getattr(sae_cfg, "context_size", None)),
            prepend_bos=base.prepend_bos if base else bool(getattr(sae_cfg, "prepend_bos", True)))
        if base is not None:
            inputs.dataset_split, inputs.text_column, inputs.tokens_column = (
                base.dataset_split, base.text_column, base.tokens_column)
        missing = [name for name, v in (("--model", inputs.model_name), ("--dataset", inputs.dataset)) if v is None]
        if missing:
            raise ValueError(f"analysing on a model needs {', '.join(missing)} (the SAE's folder does not name "
                             "them); pass them, or --cache-dir")
        return inputs
    if train_cfg is not None and train_cfg.source_kind == "cache":
        return _Inputs("cache", cache_dir=train_cfg.cache_dir)
    if train_cfg is not None:
        return _Inputs("synthetic", train_cfg=train_cfg)
    return _Inputs("none")


def _load_tokenizer_offline(name: Optional[str]) -> Any:
    """The Hugging Face tokenizer of ``name`` from the local cache only (None when unavailable)."""
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure just means "show token ids"
        log.warning("no local tokenizer for %r (%s); contexts show token ids", name, err)
        return None


def _cache_rows(sae: nn.Module, cache_dir: str, n: int) -> List[Any]:
    """The first n rows of what the SAE reads from a cache, in stored order (a transcoder:
    (input, target) pairs, or nothing when the cache lacks its target hook)."""
    from ..data.cache import read_cache_rows, read_manifest
    from ..data.source import ActivationPair
    from ..evals.model_evals import sae_hooks
    from .database import cache_input_columns

    manifest = read_manifest(cache_dir)
    columns = cache_input_columns(sae, manifest, cache_dir)
    target = None
    if getattr(sae.config, "is_transcoder", False):
        target = sae_hooks(sae)[1][0]
        if target not in (manifest.get("hooks") or []):
            log.info("the cache %s lacks the transcoder's target hook %s: no reconstruction metrics", cache_dir, target)
            return []
    out: List[Any] = []
    for parts in read_cache_rows(cache_dir, tuple(columns) + ((target,) if target else ()), n_tokens=n):
        x = torch.cat(parts[:len(columns)], dim=-1)
        out.append(ActivationPair(x, parts[-1]) if target else x)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def analyze(path: PathLike, out: Optional[PathLike] = None, *, model: Optional[str] = None,
            dataset: Optional[str] = None, hook: Optional[str] = None, cache_dir: Optional[str] = None,
            n_tokens: int = 32768, n_features: int = 50, selection: str = "spread",
            device: Optional[str] = None, context_size: Optional[int] = None, batch_size: int = 8,
            ablation_windows: int = 8, n_examples: int = 20, overwrite: bool = False,
            progress: bool = True) -> Dict[str, Any]:
    """Analyse the SAE of a run folder or an SAE folder and write the results to ``out``.

    Args:
        path: a ``saefast train`` run folder (``config.json`` + ``sae/``) or an SAE folder.
        out: output folder (default: ``<path>/analysis``).
        model, dataset, hook: analyse on this transformer-lens model, dataset and hook (each
            defaults to the run's or the SAE's own, when it names one).
        cache_dir: analyse on an activation cache instead.
        n_tokens: tokens in the activation database.
        n_features: features that get an HTML page; selection: how they are chosen
            (see :func:`select_features`).
        device: device for the SAE and the model (default: CUDA when available).
        context_size: tokens per window for a model source (default: the run's / SAE's, else 128
            capped by the model's context).
        batch_size: windows per model forward pass.
        ablation_windows: windows used for the CE-loss-recovered and per-feature ablation study.
        n_examples: max-activating examples per feature page.
        overwrite: replace an earlier analysis that saefast wrote to ``out`` (nothing else is ever
            replaced).
        progress: tqdm progress bars.

    Returns the summary dict (also written to ``summary.json``) with ``"out_dir"`` added.
    """
    from ..io import load_sae, sae_folder_kind
    from ..training.config import TrainConfig

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; pass a run folder (saefast train) or an SAE folder")
    is_run = (root / "config.json").is_file() and (root / "sae").is_dir()
    if (root / "config.json").is_file() and not is_run and sae_folder_kind(root) is None:
        raise ValueError(f"{root} is a run folder without a trained SAE (no {root / 'sae'}); finish or resume "
                         "the run first")
    for name, value in (("n_tokens", n_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    for name, value in (("n_features", n_features), ("ablation_windows", ablation_windows), ("n_examples", n_examples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an integer >= 0")
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} must be one of {SELECTIONS}")
    sae_dir = root / "sae" if is_run else root
    train_cfg = TrainConfig.from_dict(json.loads((root / "config.json").read_text())) if is_run else None
    sae = load_sae(str(sae_dir), device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sae.eval()
    inputs = _resolve_inputs(sae, train_cfg, model, dataset, hook, cache_dir, context_size)
    _check_no_ignored_options(inputs.kind, context_size=context_size, batch_size=batch_size, n_tokens=n_tokens)
    out_dir = Path(out) if out is not None else root / "analysis"
    with output_folder(out_dir, "analysis", overwrite, argument="--out") as tmp:
        summary = _analyze_into(tmp, sae, sae_dir, root if is_run else None, inputs, n_tokens=n_tokens,
                                n_features=n_features, selection=selection, batch_size=batch_size,
                                ablation_windows=ablation_windows, n_examples=n_examples, progress=progress)
    summary["out_dir"] = str(out_dir)
    return summary


def _check_no_ignored_options(kind: str, **given: Any) -> None:
    """Refuse an option that would have no effect on this source: --context-size and --batch-size
    act on a model only, --n-tokens on any source of activations."""
    defaults = {"context_size": None, "batch_size": 8, "n_tokens": 32768}
    acts_on = {"context_size": ("model",), "batch_size": ("model",), "n_tokens": ("model", "cache", "synthetic")}
    for name, value in given.items():
        if value != defaults[name] and kind not in acts_on[name]:
            where = {"none": "there are no activations (an SAE folder and no --model/--dataset/--hook or "
                             "--cache-dir)", "cache": "the activations come from a cache",
                     "synthetic": "the activations are the run's synthetic data"}[kind]
            raise ValueError(f"--{name.replace('_', '-')} {value} has no effect here: {where}; drop it"
                             + (", or give a source of activations" if kind == "none" else ""))


@dataclass
class _Activations:
    """What a source gives the analysis: the database, and what else it makes possible."""

    db: ActivationDatabase
    metric_rows: List[Tensor]                   # raw activation rows for the reconstruction metrics
    info: Dict[str, Any]                        # summary entries describing the source
    tokenizer: Any = None
    model: Optional[nn.Module] = None
    ablation_tokens: Optional[Tensor] = None    # [windows, seq] for the ablation study
    ablation_kwargs: Dict[str, Any] = field(default_factory=dict)
    planted: Optional[Tensor] = None            # [n_planted, d_in] planted directions (synthetic data)


def _from_model(sae: nn.Module, inputs: _Inputs, n_tokens: int, batch_size: int, ablation_windows: int,
                progress: bool) -> _Activations:
    from ..data import models
    from ..data.source import ActivationPair
    from ..data.tokens import TokenWindows, load_dataset_any
    from ..evals.model_evals import sae_hooks

    model = models.load_model(inputs.model_name, device=sae.device, dtype=torch.float32)
    reads, writes = sae_hooks(sae, inputs.hook)
    for hook in dict.fromkeys(reads + writes):
        models.check_hook(model, hook)
    if len(reads) == 1:
        models.check_d_in(model, reads[0], sae.d_in)
    elif sum(models.hook_d_in(model, h) for h in reads) != sae.d_in:
        raise ValueError(f"the hooks {reads} are {sum(models.hook_d_in(model, h) for h in reads)} wide together but "
                         f"the crosscoder has d_in={sae.d_in}")
    if writes != reads and models.hook_d_in(model, writes[0]) != sae.d_out:
        raise ValueError(f"the target hook {writes[0]!r} has width {models.hook_d_in(model, writes[0])} but the "
                         f"transcoder has d_out={sae.d_out}")
    tokenizer = models.model_tokenizer(model)
    ctx = inputs.context_size or min(128, models.context_limit(model))
    models.check_context_size(model, ctx)
    ds = load_dataset_any(inputs.dataset, split=inputs.dataset_split)

    def windows() -> TokenWindows:
        return TokenWindows(ds, tokenizer, ctx, prepend_bos=inputs.prepend_bos, text_column=inputs.text_column,
                            tokens_column=inputs.tokens_column)

    info = {"model": inputs.model_name, "hook": reads[0] if len(reads) == 1 else reads, "dataset": inputs.dataset,
            "context_size": ctx}
    if writes != reads:
        info["target_hook"] = writes[0]
    db = build_database(sae, model, windows(), reads if len(reads) > 1 else reads[0], n_tokens=n_tokens,
                        batch_size=batch_size, progress=progress, metadata=info)
    # the first windows of the data serve the ablation study and the reconstruction metrics
    first = windows()
    rows = []
    for _ in range(max(ablation_windows, 1)):
        try:
            rows.append(first.next_with_length())
        except StopIteration:
            break
    tokens = torch.stack([r[0] for r in rows])
    keep = torch.arange(tokens.shape[1])[None, :] < torch.tensor([r[1] for r in rows])[:, None]
    if inputs.prepend_bos:
        keep &= tokens != first.bos_token_id
    acts = models.run_to_hooks(model, tokens, reads + writes)
    keep = keep.to(acts[reads[0]].device)
    x = torch.cat([acts[h] for h in reads], dim=-1)[keep]
    metric_rows = ActivationPair(x, acts[writes[0]][keep]) if writes != reads else x
    return _Activations(db, [metric_rows], info, tokenizer, model,
                        tokens if ablation_windows > 0 else None,
                        {"exclude_token_ids": {first.bos_token_id} if inputs.prepend_bos else None,
                         "pad_token_id": first.pad_token_id})


def _from_cache(sae: nn.Module, cache_dir: str, n_tokens: int, progress: bool) -> _Activations:
    from ..data.cache import read_manifest

    meta = read_manifest(cache_dir).get("metadata", {})
    db = build_database_from_cache(sae, cache_dir, n_tokens=n_tokens, progress=progress)
    tokenizer = _load_tokenizer_offline(meta.get("model")) if db.has_token_ids else None
    info = {"cache_dir": str(cache_dir), **{k: meta[k] for k in ("model", "hook", "hooks", "dataset") if k in meta}}
    return _Activations(db, _cache_rows(sae, cache_dir, min(n_tokens, _METRIC_ROWS)), info, tokenizer)


def _from_synthetic(sae: nn.Module, cfg: Any, n_tokens: int, progress: bool) -> _Activations:
    from ..data.source import split_pair
    from ..evals.metrics import feature_recovery
    from ..training.build import synthetic_source

    synth = synthetic_source(cfg, min(n_tokens, 4096), stream=_ANALYSIS_STREAM)
    batches: List[Any] = []
    while sum(split_pair(b)[0].shape[0] for b in batches) < n_tokens:
        batches.append(next(synth))
    db = build_database_from_activations(sae, [split_pair(b)[0] for b in batches], n_tokens=n_tokens,
                                         progress=progress, metadata={"synthetic_features": cfg.synthetic_features})
    planted = synth.true_features
    cos = (torch.nn.functional.normalize(sae.W_dec.detach().float().cpu(), dim=1) @ planted.T)
    info = {"feature_recovery": feature_recovery(sae.W_dec, planted),
            "planted": {"n_planted": planted.shape[0], "match_threshold": _PLANTED_MATCH,
                        "planted_recovered": int((cos.max(dim=0).values > _PLANTED_MATCH).sum()),
                        "latents_matching_a_planted_feature": int((cos.max(dim=1).values > _PLANTED_MATCH).sum())}}
    return _Activations(db, batches, info, planted=planted)


def _write_similarity_csv(path: Path, neighbours: Any) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["feature", "rank", "neighbour", "cosine"])
        for f, (vals, ids) in enumerate(zip(neighbours[0].tolist(), neighbours[1].tolist())):
            writer.writerows([f, r + 1, i, f"{v:.6f}"] for r, (v, i) in enumerate(zip(vals, ids)))


def _analyze_into(out: Path, sae: nn.Module, sae_dir: Path, run_dir: Optional[Path], inputs: _Inputs, *,
                  n_tokens: int, n_features: int, selection: str, batch_size: int, ablation_windows: int,
                  n_examples: int, progress: bool) -> Dict[str, Any]:
    from ..data.source import split_pair
    from ..evals.metrics import reconstruction_metrics
    from ..io import read_log_sparsity

    summary: Dict[str, Any] = {"sae_dir": str(sae_dir), "source": inputs.kind, "d_in": sae.d_in, "d_sae": sae.d_sae,
                               "architecture": getattr(sae, "architecture", None)}
    found: Optional[_Activations] = None
    if inputs.kind == "model":
        found = _from_model(sae, inputs, n_tokens, batch_size, ablation_windows, progress)
    elif inputs.kind == "cache":
        found = _from_cache(sae, inputs.cache_dir, n_tokens, progress)
    elif inputs.kind == "synthetic":
        found = _from_synthetic(sae, inputs.train_cfg, n_tokens, progress)

    # ---- database, sparsity report, reconstruction metrics; the features that get a page
    if found is not None:
        summary.update(found.info)
        rows_needed, kept = _METRIC_ROWS, []
        for b in found.metric_rows:
            if rows_needed <= 0:
                break
            kept.append(type(b)(*(t[:rows_needed] for t in b)) if isinstance(b, tuple) else b[:rows_needed])
            rows_needed -= split_pair(kept[-1])[0].shape[0]
        if kept:
            summary["reconstruction"] = reconstruction_metrics(sae, kept)
        db = found.db
        db.metadata.update(sae_dir=str(sae_dir))
        db.save(out / "activations.safetensors")
        stats = feature_stats(db)
        log10_density = stats.log10_density
        summary["sparsity"] = sparsity_report(db, sae=sae)
        features = select_features(stats.counts, n_features, selection)
    else:
        db = None
        log10_density = read_log_sparsity(sae_dir)  # SAELens' training-time density, when saved
        if log10_density is not None:
            density = torch.where(log10_density > -9.5, 10.0 ** log10_density.double(),
                                  torch.zeros((), dtype=torch.float64))
            features = select_features(density, n_features, selection)
        else:
            features = list(range(min(n_features, sae.d_sae)))

    # ---- which layers a crosscoder's features write
    if getattr(sae, "multi_layer", False):
        share = sae.decoder_norms().detach().cpu()
        share = share / share.sum(1, keepdim=True).clamp_min(1e-12)
        writes = (share > _LAYER_SHARE).sum(1)
        summary["crosscoder"] = {
            "hooks": getattr(sae.config, "crosscoder_hooks", None),
            "mean_decoder_norm_share": [round(float(v), 6) for v in share.mean(0)],
            f"n_features_writing_k_layers_above_{_LAYER_SHARE}": {
                str(k): int((writes == k).sum()) for k in range(1, share.shape[1] + 1)}}

    # ---- decoder similarity
    neighbours = decoder_neighbours(sae.W_dec, min(10, sae.d_sae - 1)) if sae.d_sae > 1 else None
    if neighbours is not None:
        best = neighbours[0][:, 0]
        summary["decoder_similarity"] = {
            "mean_max_cosine": float(best.mean()), "max_cosine": float(best.max()),
            f"n_with_neighbour_above_{_NEAR_DUPLICATE}": int((best > _NEAR_DUPLICATE).sum())}
        _write_similarity_csv(out / "similarity.csv", neighbours)

    # ---- ablation study (model sources)
    ablation: Dict[int, float] = {}
    if found is not None and found.model is not None and found.ablation_tokens is not None \
            and found.ablation_tokens.shape[1] >= 2:
        study = ablation_study(found.model, sae, found.ablation_tokens, inputs.hook, features=features,
                               batch_size=batch_size, **found.ablation_kwargs)
        summary["ablation"] = study["spliced"]
        summary["feature_ablation"] = study["features"]
        ablation = {r["feature"]: r["ce_delta"] for r in study["features"]}

    # ---- pictures and the report
    images = []
    if log10_density is not None:
        plots.plot_feature_density(log10_density, out / "density.png")
        images.append(("Feature density", "density.png"))
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        if plots.plot_training_curves(run_dir, out / "training_curves.png") is not None:
            images.append(("Training curves", "training_curves.png"))
    if run_dir is not None and (run_dir / "eval.json").is_file():
        summary["final_eval"] = json.loads((run_dir / "eval.json").read_text())
    write_html_report(out, features, db=db, W_dec=sae.W_dec, tokenizer=found.tokenizer if found else None,
                      summary=_headline(summary), images=images, neighbours=neighbours, ablation=ablation,
                      n_examples=n_examples, title=f"SAE analysis: {sae_dir}", log10_density=log10_density,
                      planted=found.planted if found is not None else None)
    summary["report_features"] = features
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    return summary


def _headline(summary: Dict[str, Any]) -> Dict[str, Any]:
    """The flat metrics shown at the top of the index page."""
    head: Dict[str, Any] = {k: summary[k] for k in ("source", "model", "hook", "dataset", "cache_dir", "d_in", "d_sae",
                                                     "architecture", "feature_recovery") if summary.get(k) is not None}
    sp = summary.get("sparsity", {})
    for k in ("n_tokens", "l0_mean", "l0_median", "l1_mean", "n_dead", "dead_fraction", "n_inactive",
              "inactive_fraction", "n_dense", "dense_fraction", "n_rare"):
        if sp.get(k) is not None:
            head[k] = sp[k]
    for k in ("explained_variance", "mse", "cosine_similarity"):
        if k in summary.get("reconstruction", {}):
            head[k] = summary["reconstruction"][k]
    for k in ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_loss_recovered", "kl"):
        if k in summary.get("ablation", {}):
            head[k] = summary["ablation"][k]
    planted = summary.get("planted")
    if planted:
        cut = planted["match_threshold"]
        head[f"planted features recovered (cos > {cut})"] = f"{planted['planted_recovered']} of {planted['n_planted']}"
        head[f"latents matching a planted feature (cos > {cut})"] = planted["latents_matching_a_planted_feature"]
    for k, v in summary.get("decoder_similarity", {}).items():
        head[f"decoder {k}"] = v
    return head
