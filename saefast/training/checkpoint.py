"""Atomic, resumable training checkpoints.

Layout of ``<run>/checkpoints/``::

    step_00001000/
        sae.safetensors     SAE state_dict (weights + dead-latent counters + running threshold)
        trainer.pt          optimizer, scheduler, step, tokens seen, normalisation, config
        rank0.pt, rank1.pt  per process: torch / CUDA / numpy / python RNG states, data positions
    latest                  name of the newest complete checkpoint folder

A checkpoint is written into ``.tmp-step_...``, every file is fsynced, then the folder is renamed
into place and ``latest`` is replaced atomically; the previous checkpoint is deleted only after
that, so a crash at any moment leaves the last complete checkpoint as ``latest``. The ``.pt``
files hold only tensors and plain Python values and are read with ``torch.load(weights_only=True)``;
SAE weights go through safetensors.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..utils import fsync_path

__all__ = ["CheckpointManager", "capture_rng_state", "restore_rng_state"]

_STEP_DIR = re.compile(r"^step_(\d+)$")


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
             rank_state: Dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically and make it ``latest``; returns its folder."""
        name = f"step_{step:08d}"
        tmp = self.dir / f".tmp-{name}"
        final = self.dir / name
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self._barrier()
        rank_file = tmp / f"rank{self.rank}.pt"
        torch.save(rank_state, rank_file)
        fsync_path(rank_file)
        if self.rank == 0:
            save_file({k: v.detach().cpu().contiguous() for k, v in sae_state.items()}, str(tmp / "sae.safetensors"))
            torch.save(trainer_state, tmp / "trainer.pt")
            for f in ("sae.safetensors", "trainer.pt"):
                fsync_path(tmp / f)
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
            pointer.write_text(name + "\n")
            fsync_path(pointer)
            os.replace(pointer, self.dir / "latest")
            fsync_path(self.dir)
            self._prune(keep_name=name)
        self._barrier()
        return final

    def _prune(self, keep_name: str) -> None:
        steps = sorted(self.complete())
        for path in steps[:-self.keep]:
            if path.name != keep_name:
                shutil.rmtree(path, ignore_errors=True)

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
        """{"sae": state_dict, "trainer": ..., "rank": this process's state} of checkpoint ``path``."""
        rank_file = path / f"rank{self.rank}.pt"
        if not rank_file.is_file():
            raise ValueError(f"checkpoint {path} has no state for rank {self.rank}: it was written by a run "
                             "with fewer processes; resume with the same number of processes")
        return {
            "sae": load_file(str(path / "sae.safetensors")),
            "trainer": torch.load(path / "trainer.pt", weights_only=True, map_location="cpu"),
            "rank": torch.load(rank_file, weights_only=True, map_location="cpu"),
        }
