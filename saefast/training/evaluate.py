"""Evaluating a trained SAE: reconstruction metrics on held-out activations, planted-feature
recovery for synthetic sources, and the CE / KL evals with the SAE spliced into the model.

:func:`evaluate_sae` is what the trainer runs (during training and at the end);
:func:`evaluate_run` is ``saefast eval``: the same metrics for a finished run folder, on exactly
the batches its trainer held out.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import Tensor, nn

from ..evals.metrics import feature_recovery, reconstruction_metrics
from ..utils import eval_mode
from .config import TrainConfig
from .distributed import DistInfo, resolve_device
from .run_folder import EVAL_FILENAME, SAE_DIRNAME, RunFolder, read_run_config

__all__ = ["evaluate_sae", "evaluate_run", "model_eval_means"]


def model_eval_means(model: nn.Module, sae: nn.Module, eval_tokens: Tensor, cfg: TrainConfig,
                     eval_kwargs: Dict[str, Any]) -> Dict[str, float]:
    """CE loss clean / spliced / zero-ablated, CE loss recovered and KL with ``sae`` spliced in
    (a transcoder at its target hook, a crosscoder at every layer it reads)."""
    from ..evals.model_evals import spliced_ce_eval
    hook = cfg.hook if not cfg.is_crosscoder else None  # a crosscoder names its layers itself
    return spliced_ce_eval(model, sae, eval_tokens, hook, target_hook=cfg.target_hook,
                           batch_size=cfg.model_batch_size, **eval_kwargs)


def evaluate_sae(sae: nn.Module, heldout: List[Tensor], cfg: TrainConfig, source: Any,
                 model: Optional[nn.Module] = None, eval_tokens: Optional[Tensor] = None,
                 model_eval_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """Reconstruction metrics of ``sae`` (in eval mode, raw activations) on ``heldout``, the
    planted-feature recovery when ``source`` has planted features, and the CE/KL evals when a
    model and eval tokens are given."""
    with eval_mode(sae):
        metrics = reconstruction_metrics(sae, heldout, dense_threshold=cfg.dense_threshold)
        planted = getattr(source, "true_features", None)
        if planted is not None:
            metrics["feature_recovery"] = feature_recovery(sae.W_dec, planted)
        if model is not None and eval_tokens is not None and eval_tokens.numel():
            metrics.update(model_eval_means(model, sae, eval_tokens, cfg, model_eval_kwargs or {}))
    return metrics


def _trained_position(run: Path) -> Dict[str, Any]:
    """``{"step", "tokens"}`` of the run's final SAE, from eval.json or metrics.jsonl ({} if neither has them)."""
    from ..utils import read_json
    from .metrics_log import METRICS_FILENAME

    eval_file = run / EVAL_FILENAME
    if eval_file.is_file():
        try:
            previous = read_json(eval_file)
        except ValueError:
            previous = {}
        found = {k: previous[k] for k in ("step", "tokens") if k in previous}
        if found:
            return found
    metrics_file = run / METRICS_FILENAME
    if metrics_file.is_file():
        for line in reversed(metrics_file.read_text().splitlines()):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("kind") == "eval" and "tokens" in row:
                return {"step": row["step"], "tokens": row["tokens"]}
    return {}


def evaluate_run(run_dir: str, device: Optional[str] = None, n_batches: Optional[int] = None,
                 output: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate ``<run_dir>/sae`` on the run's held-out activations (the first ``eval_batches``
    batches of a freshly built source, exactly those the trainer held out), plus planted-feature
    recovery (synthetic runs) and the CE/KL evals (model runs). Writes ``eval.json`` (or ``output``),
    keeping the ``step`` and ``tokens`` of the trained SAE that training recorded there (or, when
    eval.json is missing, in the last eval row of metrics.jsonl). A run of several hooks evaluates
    each member run and returns {member: metrics}."""
    from ..io import load_sae
    from .build import build_inputs

    run = Path(run_dir)
    cfg = TrainConfig.from_dict(read_run_config(run))
    if cfg.is_multi:
        members = sorted(p for p in run.iterdir() if p.is_dir() and (p / "config.json").is_file())
        if not members:
            raise ValueError(f"{run} trains several hooks but holds no member run yet; train it first")
        gathered = {p.name: evaluate_run(str(p), device=device, n_batches=n_batches) for p in members}
        from ..utils import write_atomic, write_json
        write_atomic(Path(output) if output is not None else run / "eval.json", lambda p: write_json(gathered, p))
        return gathered
    if not (run / SAE_DIRNAME / "cfg.json").is_file():
        raise ValueError(f"{run}/{SAE_DIRNAME} holds no trained SAE yet (training has not finished); "
                         f"resume it with saefast train --resume {run}")
    if n_batches is not None:
        if n_batches < 1:
            raise ValueError(f"n_batches={n_batches} must be positive")
        cfg.eval_batches = n_batches
    dev = resolve_device(device if device is not None else cfg.device, DistInfo())
    inputs = build_inputs(cfg, dev, DistInfo())
    sae = load_sae(str(run / SAE_DIRNAME), device=str(dev))
    try:
        it = iter(inputs.source)
        heldout = [next(it) for _ in range(cfg.eval_batches)]
    finally:
        inputs.close()
    metrics = evaluate_sae(sae, heldout, cfg, inputs.source, inputs.model, inputs.eval_tokens,
                           inputs.model_eval_kwargs)
    metrics.update(_trained_position(run))
    if output is not None:
        from ..utils import write_atomic, write_json
        write_atomic(Path(output), lambda p: write_json(metrics, p))
    else:
        RunFolder(run, cfg, resume=True).write_eval(metrics)
    return metrics
