"""The training metrics log: ``metrics.jsonl`` in the run folder, TensorBoard, wandb.

One JSON object per line: ``{"kind": "train" | "eval", "step": ..., <metric>: <value>, ...}``.
Each checkpoint records how many rows the log held when it was written (:attr:`MetricLogger.rows`);
on resume the log is cut back to that many rows (checkpoints without the count: to the rows of
steps up to the checkpoint's), so nothing a killed run logged after its checkpoint, such as the
final eval, is written twice. A line cut short by a full disk is dropped. Only the main process
writes; the others keep the history empty. A full disk raises ``DiskFullError`` naming the file.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..utils import reporting_disk_full, write_atomic
from .config import TrainConfig

__all__ = ["MetricLogger", "METRICS_FILENAME"]

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"


class MetricLogger:
    """metrics.jsonl (+ TensorBoard, + wandb) on the main process; keeps a history for sae.save."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, enabled: bool, resume_step: Optional[int],
                 resume_rows: Optional[int] = None) -> None:
        """``resume_step``: the step being resumed from (None for a new run); ``resume_rows``:
        the row count its checkpoint recorded (None when it recorded none)."""
        self.enabled = enabled
        self.history: Dict[str, List[float]] = {}
        self.path = Path(run_dir) / METRICS_FILENAME
        self.rows = 0  # rows in the log: what a checkpoint records
        self._tb = None
        self._tb_dir = Path(run_dir) / "tensorboard"
        self._wandb = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.path.is_file():
            # Drop what a killed run logged after the checkpoint we resume from.
            rows = self._read_rows()
            rows = rows[:resume_rows] if resume_rows is not None else [r for r in rows if r["step"] <= resume_step]
            write_atomic(self.path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
        self.rows = len(rows)
        for r in rows:
            if r.get("kind") == "train":
                self._remember(r)
        self._file = self.path.open("a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(self._tb_dir), purge_step=resume_step)
        if cfg.wandb:
            import wandb
            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, id=cfg.run_name, resume="allow",
                                     config=cfg.to_dict(), dir=str(run_dir))

    def _read_rows(self) -> List[Dict[str, Any]]:
        rows = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: line %d is cut short (a full disk or a crash while writing); dropped", self.path,
                            number)
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
        return rows

    def _remember(self, row: Dict[str, Any]) -> None:
        for k, v in row.items():
            if k != "kind" and isinstance(v, (int, float)):
                self.history.setdefault(k, []).append(v)

    def _write(self, kind: str, step: int, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, **{k: v for k, v in values.items() if k != "step"}}
        with reporting_disk_full(self.path):
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        self.rows += 1
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"
                   and math.isfinite(v)}
        if self._tb is not None:
            with reporting_disk_full(self._tb_dir):
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
        """Close the log; TensorBoard and wandb failing to flush at this point (a full disk) only
        warn: every row is already in metrics.jsonl."""
        if not self.enabled:
            return
        self._file.close()
        for name, closer in (("TensorBoard", self._tb and self._tb.close), ("wandb", self._wandb and self._wandb.finish)):
            if closer:
                try:
                    closer()
                except Exception as err:  # noqa: BLE001 - a side log must not fail a finished run
                    log.warning("%s could not be closed cleanly: %s", name, " ".join(str(err).split()))
