"""Pictures: the feature-density histogram and a run's training curves (PNG, matplotlib).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
backend switch), so they work on headless machines and inside other programs.

* :func:`plot_feature_density`: histogram of log10 firing frequency of the features that fire,
  with the count of features that never fire in the title.
* :func:`read_metrics`: a run's ``metrics.jsonl`` as ``{"train": {key: (steps, values)}, "eval": ...}``.
* :func:`plot_training_curves`: one panel per logged quantity (loss terms, L0, dead fraction,
  learning rate, ... and the eval metrics) against the optimizer step.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor

__all__ = ["plot_feature_density", "read_metrics", "plot_training_curves", "TRAIN_CURVE_KEYS", "EVAL_CURVE_KEYS"]

PathLike = Union[str, os.PathLike]

# panels drawn when present, in this order
TRAIN_CURVE_KEYS = ("loss", "mse_loss", "aux_loss", "sparsity_loss", "l0", "dead_fraction", "lr", "grad_norm",
                    "e2e_kl_loss", "e2e_block_mse", "tokens_per_s")
EVAL_CURVE_KEYS = ("explained_variance", "mse", "l0", "dead_fraction", "feature_recovery", "ce_loss_recovered", "kl")
# loss-like quantities are drawn on a log axis
_LOG_KEYS = ("loss", "mse_loss", "aux_loss", "sparsity_loss", "e2e_kl_loss", "e2e_block_mse", "mse", "grad_norm")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path


def plot_feature_density(log10_density: Tensor, path: PathLike, bins: int = 50,
                         title: str = "Feature density") -> Path:
    """Histogram of log10 firing frequency.

    log10_density: [d_sae] log10 of each feature's firing frequency (from
    :func:`saefast.analysis.features.feature_stats`, or SAELens' ``sparsity.safetensors``); values
    below -9.5 (or -inf) count as features that never fire and are reported in the title instead.
    Returns the PNG path.
    """
    if not isinstance(log10_density, Tensor) or log10_density.dim() != 1:
        raise ValueError("log10_density must be a 1-D tensor [d_sae]")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins={bins!r} must be a positive integer")
    values = log10_density.detach().double().cpu()
    dead = ~(values > -9.5)
    live = values[~dead].tolist()
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    if live:
        ax.hist(live, bins=bins, color="#3b6ea5", edgecolor="white", linewidth=0.5)
    else:
        ax.text(0.5, 0.5, "no feature fires", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("log10(firing frequency)")
    ax.set_ylabel("features")
    ax.set_title(f"{title}: {len(live)} firing, {int(dead.sum())} never fire (of {values.numel()})")
    return _save(fig, path)


def read_metrics(path: PathLike) -> Dict[str, Dict[str, Tuple[List[int], List[float]]]]:
    """A run's metrics: ``{"train": {key: (steps, values)}, "eval": {key: (steps, values)}}``.

    ``path`` is a run folder or its ``metrics.jsonl`` (one JSON object per logged step, with
    ``kind`` "train" or "eval" and ``step``). Non-numeric and non-finite values are skipped.
    """
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no metrics file at {file}; pass a run folder written by saefast train")
    out: Dict[str, Dict[str, Tuple[List[int], List[float]]]] = {"train": {}, "eval": {}}
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} line {n} is not JSON: {err}") from err
        kind, step = row.get("kind", "train"), row.get("step")
        if kind not in out or not isinstance(step, int):
            continue
        for key, value in row.items():
            if key in ("kind", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                steps, values = out[kind].setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    return out


def plot_training_curves(metrics: Union[PathLike, Dict], path: PathLike,
                         keys: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Training curves of a run (a run folder, its metrics.jsonl, or :func:`read_metrics`' result).

    One panel per key of ``keys`` (default: :data:`TRAIN_CURVE_KEYS` present in the run, then the
    eval metrics of :data:`EVAL_CURVE_KEYS` logged at two or more steps); loss-like quantities on a
    log axis when positive. Returns the PNG path, or None when there is nothing to draw.
    """
    data = metrics if isinstance(metrics, dict) else read_metrics(metrics)
    train, evals = data.get("train", {}), data.get("eval", {})
    panels: List[Tuple[str, str, Tuple[List[int], List[float]]]] = []
    if keys is not None:
        for key in keys:
            if key in train:
                panels.append((key, "train", train[key]))
            elif key in evals:
                panels.append((key, "eval", evals[key]))
            else:
                raise ValueError(f"key {key!r} is not in the metrics; logged keys: {sorted(set(train) | set(evals))}")
    else:
        panels = [(k, "train", train[k]) for k in TRAIN_CURVE_KEYS if k in train]
        panels += [(k, "eval", evals[k]) for k in EVAL_CURVE_KEYS if k in evals and len(evals[k][0]) >= 2]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.2 * cols, 2.8 * rows)
    for n, (key, kind, (steps, values)) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3,
                color="#3b6ea5" if kind == "train" else "#c0504d")
        if key in _LOG_KEYS and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(key if kind == "train" else f"{key} (eval)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, path)
