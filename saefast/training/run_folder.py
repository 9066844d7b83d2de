"""The run folder of ``saefast train``: one place decides what may be written where.

Layout of ``<out_dir>/<run_name>/``: ``config.json`` (the run's options), ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/`` (see :mod:`saefast.training.checkpoint`), and at the end
``sae/`` (the trained SAE, SAELens layout), ``eval.json`` and ``training_curves.png``.

:meth:`RunFolder.prepare` runs once per run, before any work: ``out_dir`` must be a folder (or
not exist yet); a new run must not reuse a non-empty folder; a resumed run needs the same options
(up to logging and checkpoint cadence), and one killed before its first checkpoint starts again
from step 0 (saying so). Its ``config.json`` is read once (:func:`read_run_config`).
:meth:`RunFolder.start` removes what an interrupted run left half-written (temporary files and
folders of the atomic writers, half-written checkpoints).
"""
from __future__ import annotations

import logging
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ..utils import is_temporary_name, read_json, write_atomic, write_json
from .checkpoint import CheckpointManager
from .config import TrainConfig
from .distributed import barrier, broadcast_object

__all__ = ["RunFolder", "read_run_config", "CONFIG_FILENAME"]

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.json"
EVAL_FILENAME = "eval.json"
CURVES_FILENAME = "training_curves.png"
SAE_DIRNAME = "sae"


def _check_out_dir(out_dir: Union[str, Path]) -> None:
    """``out_dir`` (or its nearest existing parent) must be a folder."""
    for folder in (Path(out_dir), *Path(out_dir).parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is a file" if folder == Path(out_dir) else f"is inside {folder}, which is a file"
                raise ValueError(f"out_dir={str(out_dir)!r} (--out-dir) {what}, not a folder; run folders go inside "
                                 "out_dir: choose another --out-dir")
            return


def read_run_config(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """The options a run folder was started with (its config.json), as a dict."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILENAME
    if not path.is_file():
        why = "the folder does not exist" if not run_dir.exists() else "it is not a saefast run folder"
        raise ValueError(f"{run_dir} has no {CONFIG_FILENAME} ({why}); pass a folder written by saefast train")
    return read_json(path)


class RunFolder:
    """A checked run folder (use :meth:`prepare`) and what is written into it."""

    def __init__(self, path: Path, cfg: TrainConfig, resume: bool) -> None:
        self.path, self.cfg, self.resume = Path(path), cfg, resume

    @classmethod
    def prepare(cls, cfg: TrainConfig, resume: bool, saved: Optional[Dict[str, Any]] = None) -> "RunFolder":
        """Check the run folder of ``cfg`` before any work and return it. Sets ``cfg.run_name``
        when unset (the same on every process). ``saved``: the run's config.json when the caller
        has read it already (resume)."""
        cfg.check_trainable()
        _check_out_dir(cfg.out_dir)
        if cfg.run_name is None:
            if resume:
                raise ValueError("resume needs run_name (the run folder to continue)")
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg.run_name = broadcast_object(f"{cfg.source_kind}-{cfg.architecture}-{stamp}")
        path = Path(cfg.out_dir) / cfg.run_name
        if resume:
            if not path.is_dir():
                raise ValueError(f"--resume: run folder {path} does not exist")
            try:
                saved = saved if saved is not None else read_run_config(path)
            except ValueError as err:
                raise ValueError(f"--resume: {err}") from None
            diff = TrainConfig.from_dict(saved).differences(cfg)
            if diff:
                lines = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                raise ValueError(f"--resume: {path} was trained with a different config ({lines}). "
                                 "Resume with the run's own config, or start a new run_name.")
            # a run of several hooks keeps its checkpoints in its members' folders
            if not cfg.is_multi and CheckpointManager(path).latest() is None:
                log.warning("%s has no checkpoint yet (the run stopped before its first one): starting it again "
                            "from step 0 with its own config", path)
        else:
            cfg.check_no_ignored_options()
            if path.exists() and any(not is_temporary_name(p.name) for p in path.iterdir()):
                raise ValueError(f"run folder {path} already exists and is not empty; pick another run_name, "
                                 f"or pass --resume {path} to continue it")
        if cfg.wandb:
            try:
                import wandb  # noqa: F401
            except ImportError as e:
                raise ValueError("wandb=True but wandb is not installed: pip install wandb, or drop --wandb") from e
        return cls(path, cfg, resume)

    # ------------------------------------------------------------------------------------------
    @property
    def sae_dir(self) -> Path:
        return self.path / SAE_DIRNAME

    @property
    def eval_path(self) -> Path:
        return self.path / EVAL_FILENAME

    @property
    def curves_path(self) -> Path:
        return self.path / CURVES_FILENAME

    def checkpoints(self, keep: int, rank: int) -> CheckpointManager:
        return CheckpointManager(self.path, keep=keep, rank=rank, barrier=barrier)

    def start(self, d_in: Optional[int] = None, d_sae: Optional[int] = None) -> None:
        """Create the folder, remove what an interrupted run left half-written, and (for a new
        run) write its config.json, with ``d_in`` / ``d_sae`` filled in where the options left them
        to be derived (the hook's width, expansion_factor * d_in); main process only."""
        self.path.mkdir(parents=True, exist_ok=True)
        removed = [p.name for p in self.path.iterdir() if is_temporary_name(p.name)]
        for name in removed:
            leftover = self.path / name
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        removed += [f"checkpoints/{name}" for name in CheckpointManager(self.path).clean()]
        if removed:
            log.info("removed what an interrupted run left half-written in %s: %s", self.path, ", ".join(sorted(removed)))
        if not self.resume:
            values = self.cfg.to_dict()
            for name, resolved in (("d_in", d_in), ("d_sae", d_sae)):
                if values.get(name) is None:
                    values[name] = resolved
            write_atomic(self.path / CONFIG_FILENAME, lambda p: write_json(values, p))

    def write_eval(self, metrics: Dict[str, Any]) -> None:
        write_atomic(self.eval_path, lambda p: write_json(metrics, p))

    def draw_curves(self) -> Optional[Path]:
        """training_curves.png from metrics.jsonl, or None when there is nothing to draw or it
        could not be drawn (a warning says why: the picture is never worth failing a run for)."""
        from ..analysis.plots import plot_training_curves
        try:
            return plot_training_curves(self.path, self.curves_path)
        except Exception as err:  # noqa: BLE001 - a full disk, a plotting backend, a damaged log
            log.warning("could not draw %s (%s); the run itself is complete", self.curves_path,
                        " ".join(str(err).split()) or type(err).__name__)
            return None
