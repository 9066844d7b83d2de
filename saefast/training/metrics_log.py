"""The training metrics log: ``metrics.jsonl`` in the run folder, TensorBoard, wandb.

One JSON object per line: ``{"kind": "train" | "eval", "step": ..., <metric>: <value>, ...}``.
On resume, rows a killed run logged after the checkpoint being resumed are dropped first, so no
step is logged twice. Only the main process writes; the others keep the history empty.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import TrainConfig

__all__ = ["MetricLogger", "METRICS_FILENAME"]

METRICS_FILENAME = "metrics.jsonl"


class MetricLogger:
    """metrics.jsonl (+ TensorBoard, + wandb) on the main process; keeps a history for sae.save."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, enabled: bool, resume_step: Optional[int]) -> None:
        self.enabled = enabled
        self.history: Dict[str, List[float]] = {}
        self.path = Path(run_dir) / METRICS_FILENAME
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.path.is_file():
            # Drop what a killed run logged after the checkpoint we resume from.
            rows = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for r in rows:
            if r.get("kind") == "train":
                self._remember(r)
        self._file = self.path.open("a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step)
        if cfg.wandb:
            import wandb
            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, id=cfg.run_name, resume="allow",
                                     config=cfg.to_dict(), dir=str(run_dir))

    def _remember(self, row: Dict[str, Any]) -> None:
        for k, v in row.items():
            if k != "kind" and isinstance(v, (int, float)):
                self.history.setdefault(k, []).append(v)

    def _write(self, kind: str, step: int, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, **{k: v for k, v in values.items() if k != "step"}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"
                   and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if kind == "train":
            self._remember(row)

    def log_train(self, step: int, values: Dict[str, Any]) -> None:
        self._write("train", step, values)

    def log_eval(self, step: int, values: Dict[str, Any]) -> None:
        self._write("eval", step, values)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
