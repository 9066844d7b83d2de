"""Several SAEs trained from one model pass: one per hook (or per input/target pair).

``saefast train --hook A --hook B ...`` (or ``--hooks all-resid``) builds one :class:`Trainer`
per hook (:func:`saefast.training.build.build_members`), each with its own SAE, Adam state,
scheduler, metrics log and run folder ``<run>/<hook>/`` (a complete run folder: ``saefast eval``,
``saefast analyze`` and ``--resume`` work on it alone). Their activation sources are views of one
shared source, so the model runs once per batch of windows, up to the deepest hook's block, for
all of them (:mod:`saefast.data.views`).

:class:`MultiTrainer` takes the trainers' steps in turn (step 1 of each, then step 2, ...). They
checkpoint at the same steps; older checkpoints are pruned only after every trainer has written
the new one, so after a crash there is always a step that all of them hold, and ``--resume``
restarts every trainer from the newest such step.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

from ..utils import DiskFullError, write_atomic, write_json
from .run_folder import RunFolder
from .trainer import Trainer

__all__ = ["MultiTrainer", "common_resume_step"]

log = logging.getLogger(__name__)


def common_resume_step(trainers: Sequence[Trainer]) -> int:
    """The newest step at which every trainer has a complete checkpoint; 0 (start again, with a
    warning) when they have none in common, as a run killed before its first checkpoint does."""
    common: Optional[set] = None
    for t in trainers:
        steps = {int(p.name.split("_")[1]) for p in t.checkpoints.complete()}
        common = steps if common is None else common & steps
    if not common:
        log.warning("the member runs (%s) have no checkpoint step in common: starting them again from step 0",
                    ", ".join(str(t.run_dir) for t in trainers))
        return 0
    return max(common)


class MultiTrainer:
    """Train several :class:`Trainer`\\ s in lockstep (see the module docstring).

    Args:
        trainers: one per SAE, built on views of one shared source, with the same number of
            steps and the same checkpoint cadence.
        parent: the run folder holding the members' folders (its config.json names every hook);
            ``eval.json`` there gathers every member's final metrics.
        resume: the trainers were built with ``resume=True``: each restarts from the newest step
            all of them hold.
    """

    def __init__(self, trainers: Sequence[Trainer], parent: RunFolder, resume: bool = False) -> None:
        if not trainers:
            raise ValueError("MultiTrainer needs at least one trainer")
        self.trainers: List[Trainer] = list(trainers)
        self.parent = parent
        steps = {t.total_steps for t in self.trainers}
        cadence = {t.cfg.checkpoint_every for t in self.trainers}
        if len(steps) != 1 or len(cadence) != 1:
            raise ValueError("the trainers of one model pass need the same number of steps and checkpoint cadence")
        for t in self.trainers:
            t.defer_prune = True
        if resume:
            step = common_resume_step(self.trainers)
            for t in self.trainers:
                t.resume_at_most(step)
            log.info("resuming %d runs at step %d", len(self.trainers), step)
        self.final_metrics: Dict[str, Dict[str, Any]] = {}

    def _prune(self) -> None:
        for t in self.trainers:
            t.checkpoints.prune()

    def train(self) -> Dict[str, Dict[str, Any]]:
        """Run every trainer to its last step; returns {member run name: final metrics}."""
        if self.trainers[0].dist.is_main:
            self.parent.start()
        every = self.trainers[0].cfg.checkpoint_every
        try:
            return self._train(every)
        except DiskFullError as err:
            raise err.with_note("; ".join(f"{t.cfg.run_name}: {t.last_checkpoint_note()}"
                                          for t in self.trainers)) from None

    def _train(self, every: int) -> Dict[str, Dict[str, Any]]:
        try:
            for t in self.trainers:
                t.begin()
            steps = {t.cfg.run_name: t.step for t in self.trainers}
            if len(set(steps.values())) > 1:  # a damaged checkpoint made one fall back further
                raise ValueError(f"--resume: the member runs restarted at different steps ({steps}); every member "
                                 "needs a readable checkpoint at the same step: move the newer checkpoints of the "
                                 "others aside, or start a new run")
            while not all(t.done for t in self.trainers):
                for t in self.trainers:
                    t.advance()
                if every and self.trainers[0].step % every == 0:
                    self._prune()
            for t in self.trainers:
                t.end()
            self._prune()
        finally:
            for t in self.trainers:
                t.close()
        self.final_metrics = {t.cfg.run_name: t.final_metrics for t in self.trainers}
        if self.trainers[0].dist.is_main:
            write_atomic(self.parent.eval_path, lambda p: write_json(self.final_metrics, p))
        return self.final_metrics
