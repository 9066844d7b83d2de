"""Atomic, resumable training checkpoints.

Layout of ``<run>/checkpoints/``::

    step_00001000/
        sae.safetensors     SAE state_dict (weights + dead-latent counters + running threshold)
        trainer.pt          optimizer, scheduler, step, tokens seen, normalisation, config
        rank0.pt, rank1.pt  per process: torch / CUDA / numpy / python RNG states, data positions
    latest                  name of the newest complete checkpoint folder

A checkpoint is written into ``.tmp-step_...``, every file is fsynced, then the folder is renamed
into place and ``latest`` is replaced atomically; the previous checkpoint is deleted only after
that, so a crash at any moment leaves the last complete checkpoint as ``latest``. A failed write
(a full disk is a ``DiskFullError`` naming the file) removes the temporary folder; one left by a
killed process is removed by :meth:`CheckpointManager.clean`.
The ``.pt`` files hold only tensors and plain Python values and are read with
``torch.load(weights_only=True)``; SAE weights go through safetensors.

:meth:`CheckpointManager.load_newest_readable` resumes from ``latest`` or, when one of its files is
truncated or damaged, from the newest older checkpoint that reads, saying which.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

from ..utils import CorruptFileError, fsync_path, load_safetensors, load_torch, reporting_disk_full, save_torch

__all__ = ["CheckpointManager", "capture_rng_state", "restore_rng_state"]

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
# What save() leaves behind when killed: the folder being written, a replaced one, the pointer.
_LEFTOVER = re.compile(r"^(\.tmp-step_\d+|\.stale-step_\d+|\.latest\.tmp)$")


def capture_rng_state() -> Dict[str, Any]:
    """Every global RNG state, as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Writes and finds checkpoints under ``<run_dir>/checkpoints``.

    In a distributed run every process calls :meth:`save` (each writes its own ``rank<r>.pt``)
    with ``barrier`` synchronising them; rank 0 writes the shared files and renames.
    """

    def __init__(self, run_dir: Path, keep: int = 2, rank: int = 0,
                 barrier: Callable[[], None] = lambda: None) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep, self.rank, self._barrier = keep, rank, barrier

    # ------------------------------------------------------------------------------------------
    def save(self, step: int, sae_state: Dict[str, torch.Tensor], trainer_state: Dict[str, Any],
             rank_state: Dict[str, Any], prune: bool = True) -> Path:
        """Write checkpoint ``step`` atomically and make it ``latest``; returns its folder. A full
        disk raises DiskFullError naming the file; the half-written folder is removed. With
        ``prune=False`` older checkpoints stay until :meth:`prune` (several runs that must keep a
        common step prune only once all of them have saved)."""
        name = f"step_{step:08d}"
        tmp = self.dir / f".tmp-{name}"
        final = self.dir / name
        try:
            self._write(tmp, name, sae_state, trainer_state, rank_state)
        except BaseException:  # a full disk above all: free what this checkpoint took
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._barrier()
        if self.rank == 0:
            fsync_path(tmp)
            if final.exists():  # left by a killed run past the checkpoint we resumed from
                stale = self.dir / f".stale-{name}"
                shutil.rmtree(stale, ignore_errors=True)
                final.rename(stale)
                shutil.rmtree(stale)
            tmp.rename(final)
            fsync_path(self.dir)
            pointer = self.dir / ".latest.tmp"
            with reporting_disk_full(self.dir / "latest"):
                pointer.write_text(name + "\n")
                fsync_path(pointer)
            os.replace(pointer, self.dir / "latest")
            fsync_path(self.dir)
            if prune:
                self._prune(keep_name=name)
        self._barrier()
        return final

    def prune(self) -> None:
        """Delete all but the ``keep`` newest complete checkpoints (main process)."""
        if self.rank == 0:
            latest = self.latest()
            self._prune(keep_name=latest.name if latest is not None else "")
        self._barrier()

    def _write(self, tmp: Path, name: str, sae_state: Dict[str, torch.Tensor], trainer_state: Dict[str, Any],
               rank_state: Dict[str, Any]) -> None:
        final = self.dir / name  # what an error names: the temporary folder becomes this
        if self.rank == 0:
            with reporting_disk_full(final):
                self.dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
        self._barrier()
        rank_file = f"rank{self.rank}.pt"
        save_torch(rank_state, tmp / rank_file, final / rank_file)
        fsync_path(tmp / rank_file)
        if self.rank == 0:
            with reporting_disk_full(final / "sae.safetensors"):
                save_file({k: v.detach().cpu().contiguous() for k, v in sae_state.items()}, str(tmp / "sae.safetensors"))
            save_torch(trainer_state, tmp / "trainer.pt", final / "trainer.pt")
            for f in ("sae.safetensors", "trainer.pt"):
                fsync_path(tmp / f)

    def clean(self) -> List[str]:
        """Remove what a killed :meth:`save` left (a half-written ``.tmp-step_*`` folder, a
        replaced ``.stale-step_*`` one, the pointer's temporary file); returns their names. Call
        it only when no process is writing checkpoints here."""
        if not self.dir.is_dir():
            return []
        removed = []
        for path in self.dir.iterdir():
            if _LEFTOVER.match(path.name):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path.name)
        return sorted(removed)

    def _prune(self, keep_name: str) -> None:
        steps = sorted(self.complete())
        for path in steps[:-self.keep]:
            if path.name != keep_name:
                shutil.rmtree(path, ignore_errors=True)

    def at_step(self, step: int) -> Optional[Path]:
        """The complete checkpoint of ``step``, or None."""
        path = self.dir / f"step_{step:08d}"
        return path if path.is_dir() else None

    # ------------------------------------------------------------------------------------------
    def complete(self) -> List[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint (the ``latest`` pointer, else the highest step)."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if path.is_dir():
                return path
        found = self.complete()
        return found[-1] if found else None

    def load(self, path: Path) -> Dict[str, Any]:
        """{"sae": state_dict, "trainer": ..., "rank": this process's state} of checkpoint ``path``.
        A missing or unreadable file raises CorruptFileError naming it."""
        rank_file = path / f"rank{self.rank}.pt"
        if self.rank > 0 and not rank_file.is_file() and (path / "rank0.pt").is_file():
            raise ValueError(f"checkpoint {path} has no state for rank {self.rank}: it was written by a run "
                             "with fewer processes; resume with the same number of processes")
        try:
            return {
                "sae": load_safetensors(path / "sae.safetensors"),
                "trainer": load_torch(path / "trainer.pt"),
                "rank": load_torch(rank_file),
            }
        except FileNotFoundError as err:
            raise CorruptFileError(err.filename, "the file is missing") from None

    def load_newest_readable(self, agree: Callable[[bool], bool] = lambda ok: ok, at_most: Optional[int] = None
                             ) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """(folder, :meth:`load` of it) for ``latest`` (with ``at_most``: the newest checkpoint of
        at most that step), or for the newest older checkpoint when that one has a truncated,
        damaged or missing file (a warning names both); None when there is no checkpoint. ``agree(ok)`` is True when every process read the candidate
        (processes decide together under DDP). Checkpoints passed over are renamed
        ``damaged-step_*`` (kept, never read or pruned again). When none can be read, a ValueError
        lists why."""
        latest = self.latest()
        if at_most is not None:
            older = [p for p in self.complete() if int(_STEP_DIR.match(p.name).group(1)) <= at_most]
            latest = older[-1] if older else None
        if latest is None:
            return None
        step = int(_STEP_DIR.match(latest.name).group(1))
        candidates = [latest] + [p for p in reversed(self.complete())
                                 if int(_STEP_DIR.match(p.name).group(1)) < step]
        unreadable: List[str] = []
        for path in candidates:
            try:
                state, ok = self.load(path), True
            except CorruptFileError as err:
                state, ok, reason = None, False, str(err)
            if agree(ok):
                if unreadable:
                    skipped = candidates[:len(unreadable)]
                    log.warning("checkpoint %s cannot be read: %s; resuming from %s instead (the unreadable "
                                "checkpoint is kept as %s)", candidates[0], unreadable[0], path,
                                ", ".join(f"damaged-{p.name}" for p in skipped))
                    if self.rank == 0:
                        for bad in skipped:
                            bad.rename(bad.with_name(f"damaged-{bad.name}"))
                    self._barrier()
                return path, state
            unreadable.append(reason if not ok else f"another process could not read {path.name}")
        raise ValueError(f"no checkpoint in {self.dir} can be read ({'; '.join(unreadable)}); move the "
                         "checkpoints folder away and resume again to restart the run from step 0")
