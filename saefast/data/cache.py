"""Activation caching: write activations to safetensors shards once, train from them many times.

Layout of a cache folder::

    manifest.json              format, d_in, dtype, n_tokens, shard list, columns, source position
    shard_00000.safetensors    "activations" [rows, d_in] (+ "token_ids", "window_ids", "positions"
    shard_00001.safetensors     when the source yields ActivationBatch)
    source_state.pt            only when the source's state is not JSON (e.g. holds RNG tensors)

A source reading several hooks in one model pass (it yields ``{hook: tensor}``) is cached with one
column per hook, named by the hook (``"blocks.4.hook_resid_post"`` [rows, d_hook]), rows aligned
(row i of every column is the same token); the manifest then lists ``hooks`` and their ``d_ins``
(``d_in`` is null). Reading such a cache picks the hooks a run needs (one hook: plain batches).

:func:`cache_activations` holds one shard in memory at a time, writes into a temporary folder and
renames it into place at the end, so an interrupted run never leaves a half cache behind; it
replaces an existing folder only when asked and only when that folder is a cache saefast wrote. The manifest records the source's
``state_dict()`` after the last batch drawn (the dataset position), so a later run can continue
the data stream where the cache ends (rows of that last batch beyond ``n_tokens`` are skipped).

:class:`CachedActivationSource` streams the shards back with bounded memory (``read_tokens`` rows
per read plus one shuffle block): shard order is permuted per epoch from the seed, rows are
shuffled within blocks of ``buffer_tokens`` by a :class:`~saefast.data.buffer.ShuffleBuffer`, and
``state_dict()`` gives exact resume.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..utils import load_torch, output_folder, reporting_disk_full, save_torch
from .buffer import ShuffleBuffer
from .source import ActivationBatch

__all__ = ["cache_activations", "CachedActivationSource", "read_manifest", "read_cache_rows"]

logger = logging.getLogger(__name__)

FORMAT = "saefast.activations"
_MANIFEST = "manifest.json"
_STATE_FILE = "source_state.pt"
_SEED_STRIDE = 1_000_003
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_META_COLUMNS = ("token_ids", "window_ids", "positions")


def _columns_of(batch: Any) -> Dict[str, Tensor]:
    if isinstance(batch, ActivationBatch):
        return {"activations": batch.acts, "token_ids": batch.token_ids, "window_ids": batch.window_ids,
                "positions": batch.positions}
    if isinstance(batch, Tensor):
        return {"activations": batch}
    if isinstance(batch, dict) and batch and all(isinstance(v, Tensor) for v in batch.values()):
        return dict(batch)
    raise TypeError(f"the source yielded {type(batch).__name__}; expected a [batch, d_in] tensor, an "
                    "ActivationBatch or {hook: tensor}")


def cache_activations(source: Any, out_dir: Union[str, os.PathLike], n_tokens: int, shard_tokens: int, *,
                      dtype: Union[str, torch.dtype] = "float32", overwrite: bool = False,
                      metadata: Optional[Dict[str, Any]] = None, progress: bool = True) -> Path:
    """Write the first ``n_tokens`` activation rows of ``source`` to ``out_dir`` as shards.

    Args:
        source: an activation source (iterator of [batch, d_in] tensors or ActivationBatch, with
            ``.d_in`` and optionally ``state_dict()``; or of ``{hook: tensor}`` with ``.d_ins``
            {hook: width}, written one column per hook).
        out_dir: the cache folder (created; must not exist unless ``overwrite``).
        n_tokens: rows to cache (fewer if the source ends first, with a warning).
        shard_tokens: rows per shard file.
        dtype: storage dtype: "float32", "bfloat16" or "float16".
        overwrite: replace an activation cache that saefast wrote to ``out_dir`` (a folder holding
            anything else is never replaced).
        metadata: JSON-safe extra information for the manifest (model, hook, dataset, ...).
        progress: show a tqdm progress bar.

    Returns the cache folder.
    """
    for name, value in (("n_tokens", n_tokens), ("shard_tokens", shard_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    store_dtype = _DTYPES.get(dtype if isinstance(dtype, str) else str(dtype).replace("torch.", ""))
    if store_dtype is None:
        raise ValueError(f"dtype={dtype!r} must be one of {list(_DTYPES)}")
    d_in = getattr(source, "d_in", None)
    d_ins = getattr(source, "d_ins", None) if d_in is None else None
    if not isinstance(d_in, int) and not (isinstance(d_ins, dict) and len(d_ins) > 1):
        raise TypeError(f"source must have an integer .d_in (an activation source), or .d_ins {{hook: width}} "
                        f"for several hooks; got {type(source).__name__}")
    widths = {"activations": d_in} if d_in is not None else dict(d_ins)
    out = Path(out_dir)
    if metadata is not None:
        json.dumps(metadata)  # fails early, with the offending value, before any work

    from safetensors.torch import save_file

    shards: List[Dict[str, Any]] = []
    pending: Dict[str, List[Tensor]] = {}
    pending_rows = 0
    written = 0
    column_names: Optional[List[str]] = None

    def flush(rows: int) -> None:
        nonlocal pending_rows
        joined = {k: torch.cat(v) for k, v in pending.items()}
        part = {k: v[:rows].contiguous() for k, v in joined.items()}
        name = f"shard_{len(shards):05d}.safetensors"
        with reporting_disk_full(out / name):
            save_file(part, str(tmp / name))
        shards.append({"file": name, "n_tokens": rows})
        for k, v in joined.items():
            pending[k] = [v[rows:]] if v.shape[0] > rows else []
        pending_rows -= rows

    with output_folder(out, "activation cache", overwrite, argument="out_dir") as tmp:
        bar = tqdm(total=n_tokens, desc="caching activations", unit="tok", disable=not progress)
        iterator = iter(source)
        while written + pending_rows < n_tokens:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            columns = _columns_of(batch)
            for name, width in widths.items():
                acts = columns.get(name)
                if acts is None or acts.dim() != 2 or acts.shape[1] != width:
                    got = tuple(acts.shape) if acts is not None else "nothing"
                    raise ValueError(f"the source yielded {got} for {name!r}, expected [batch, {width}]")
                if not bool(torch.isfinite(acts).all()):
                    raise ValueError(f"the source yielded non-finite activations ({name}) after "
                                     f"{written + pending_rows} cached rows; check the model and its dtype")
            if column_names is None:
                column_names = list(columns)
            take = min(acts.shape[0], n_tokens - written - pending_rows)
            for k, v in columns.items():
                v = v[:take].detach().to("cpu")
                pending.setdefault(k, []).append(v.to(store_dtype) if k in widths else v.long())
            pending_rows += take
            bar.update(take)
            while pending_rows >= shard_tokens:
                flush(shard_tokens)
                written += shard_tokens
        if pending_rows:
            rows = pending_rows
            flush(rows)
            written += rows
        bar.close()
        if written == 0:
            raise ValueError("the source yielded no activations; nothing to cache")
        if written < n_tokens:
            logger.warning("the source ended after %d of the %d tokens asked for; the cache holds %d",
                           written, n_tokens, written)
        manifest: Dict[str, Any] = {
            "format": FORMAT, "version": 1, "d_in": d_in, "dtype": str(store_dtype).replace("torch.", ""),
            "n_tokens": written, "shard_tokens": shard_tokens, "columns": column_names, "shards": shards,
            "source_state": None, "metadata": metadata or {},
        }
        if d_in is None:
            manifest.update(hooks=list(widths), d_ins=widths)
        state = source.state_dict() if hasattr(source, "state_dict") else None
        if state is not None:
            try:
                manifest["source_state"] = json.loads(json.dumps(state))
            except TypeError:
                save_torch(state, tmp / _STATE_FILE, out / _STATE_FILE)
                manifest["source_state_file"] = _STATE_FILE
        with reporting_disk_full(out / _MANIFEST):
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def read_manifest(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The manifest of a cache folder, checked; ``source_state`` is filled from ``source_state.pt``
    when the state was not JSON."""
    folder = Path(path)
    file = folder / _MANIFEST
    if not file.is_file():
        raise ValueError(f"{folder} is not an activation cache: it has no {_MANIFEST}; write one with "
                         "saefast.data.cache.cache_activations")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file} is not a saefast activation cache manifest (format={manifest.get('format')!r})")
    missing = [s["file"] for s in manifest["shards"] if not (folder / s["file"]).is_file()]
    if missing:
        raise ValueError(f"the cache {folder} is incomplete: shard files {missing} are missing")
    if manifest.get("source_state_file"):
        manifest["source_state"] = load_torch(folder / manifest["source_state_file"], "write the cache again")
    return manifest


class _ShardChunks:
    """Chunk stream over the shards: ``read_tokens`` rows per read, shard order permuted per epoch."""

    def __init__(self, folder: Path, manifest: Dict[str, Any], columns: List[str], shuffle: bool, seed: int,
                 repeat: bool, read_tokens: int, rank: int, world_size: int) -> None:
        self.folder, self.columns = folder, columns
        self.shards = manifest["shards"]
        self.shuffle, self.seed, self.repeat = shuffle, seed, repeat
        self.read_tokens, self.rank, self.world_size = read_tokens, rank, world_size
        self._pos = {"epoch": 0, "shard": 0, "row": 0}
        self._order = self._order_for(0)
        self._handle: Optional[Tuple[str, Any]] = None

    def _order_for(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(len(self.shards)))
        g = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + epoch)
        return torch.randperm(len(self.shards), generator=g).tolist()

    def position(self) -> Dict[str, int]:
        return dict(self._pos)

    def seek(self, position: Dict[str, int]) -> None:
        self._pos = {k: int(position[k]) for k in ("epoch", "shard", "row")}
        self._order = self._order_for(self._pos["epoch"])

    def _open(self, name: str) -> Any:
        from safetensors import safe_open

        if self._handle is None or self._handle[0] != name:
            self._handle = (name, safe_open(str(self.folder / name), framework="pt", device="cpu"))
        return self._handle[1]

    def next_chunk(self) -> Optional[Tuple[Tensor, ...]]:
        pos = self._pos
        if pos["shard"] >= len(self.shards):
            if not self.repeat:
                return None
            self.seek({"epoch": pos["epoch"] + 1, "shard": 0, "row": 0})
            pos = self._pos
        shard = self.shards[self._order[pos["shard"]]]
        lo = pos["row"]
        hi = min(lo + self.read_tokens, shard["n_tokens"])
        if hi >= shard["n_tokens"]:
            self._pos = {"epoch": pos["epoch"], "shard": pos["shard"] + 1, "row": 0}
        else:
            self._pos = {"epoch": pos["epoch"], "shard": pos["shard"], "row": hi}
        # Data parallel: each rank reads its own contiguous part of every chunk.
        a = lo + (hi - lo) * self.rank // self.world_size
        b = lo + (hi - lo) * (self.rank + 1) // self.world_size
        handle = self._open(shard["file"])
        return tuple(handle.get_slice(c)[a:b] for c in self.columns)


def read_cache_rows(path: Union[str, os.PathLike], columns: Tuple[str, ...] = ("activations",),
                    chunk_rows: int = 8192, n_tokens: Optional[int] = None) -> Iterator[Tuple[Tensor, ...]]:
    """The cache's rows in stored order (shard 0 first, every row), ``chunk_rows`` at a time, as
    one tensor per column (activations as float32; a cache of several hooks names its activation
    columns by hook); stops after ``n_tokens`` rows when given."""
    from safetensors import safe_open

    folder = Path(path)
    manifest = read_manifest(folder)
    missing = [c for c in columns if c not in manifest["columns"]]
    if missing:
        raise ValueError(f"the cache {folder} has no {missing} column(s); it holds {manifest['columns']}")
    left = manifest["n_tokens"] if n_tokens is None else n_tokens
    for shard in manifest["shards"]:
        with safe_open(str(folder / shard["file"]), framework="pt", device="cpu") as f:
            for lo in range(0, min(shard["n_tokens"], left), chunk_rows):
                hi = min(lo + chunk_rows, shard["n_tokens"], left)
                yield tuple(f.get_slice(c)[lo:hi] if c in _META_COLUMNS else f.get_slice(c)[lo:hi].float()
                            for c in columns)
        left -= min(shard["n_tokens"], left)
        if left <= 0:
            return


class CachedActivationSource:
    """Shuffled fp32 batches ``[batch_size, d_in]`` streamed from a cache folder (or
    ``{hook: [batch_size, d_hook]}`` from a cache of several hooks).

    Args:
        path: folder written by :func:`cache_activations`.
        hooks: for a cache of several hooks, the hook (plain batches) or hooks (``{hook: rows}``)
            to read; default all of them. A one-hook cache takes None or its own hook.
        batch_size: rows per batch.
        seed: seed of the shard order and the row shuffling.
        shuffle: False serves rows in the cached order (shard 0 first).
        buffer_tokens: rows per shuffle block (default ``min(n_tokens, 65536)``).
        device: where batches are returned.
        repeat: loop over the cache forever (a new shard order each epoch) instead of stopping.
        read_tokens: rows per read from a shard (bounds memory with the buffer).
        rank, world_size: each rank reads its own part of every read (data parallel).
        with_tokens: yield :class:`~saefast.data.source.ActivationBatch` (needs a cache written from
            a source with ``with_tokens=True``).
        background: read the next block in a background thread.
    """

    def __init__(self, path: Union[str, os.PathLike], batch_size: int, seed: int = 0, shuffle: bool = True, *,
                 buffer_tokens: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                 repeat: bool = False, read_tokens: int = 8192, rank: int = 0, world_size: int = 1,
                 with_tokens: bool = False, background: bool = True,
                 hooks: Optional[Union[str, List[str]]] = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.n_tokens: int = int(self.manifest["n_tokens"])
        act_columns = self._hook_columns(hooks)
        self.hook_names: List[str] = act_columns if act_columns != ["activations"] else \
            [self.manifest.get("metadata", {}).get("hook") or "activations"]
        self._multi = len(act_columns) > 1
        widths = self.manifest.get("d_ins") or {"activations": self.manifest["d_in"]}
        self.d_ins: Dict[str, int] = {h: int(widths[c]) for h, c in zip(self.hook_names, act_columns)}
        self.d_in: Optional[int] = None if self._multi else self.d_ins[self.hook_names[0]]
        self.batch_size = batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size!r})")
        if read_tokens < 1:
            raise ValueError(f"read_tokens={read_tokens} must be >= 1")
        columns = list(act_columns)
        if with_tokens and self._multi:
            raise ValueError("with_tokens=True reads one hook; pass hooks=<one hook>")
        if with_tokens:
            absent = [c for c in _META_COLUMNS if c not in self.manifest["columns"]]
            if absent:
                raise ValueError(f"with_tokens=True but the cache {self.path} has no {absent} columns; "
                                 "cache from a source built with with_tokens=True")
            columns += list(_META_COLUMNS)
        self.with_tokens = with_tokens
        if buffer_tokens is None:
            buffer_tokens = max(batch_size, min(self.n_tokens // world_size, 2 ** 16))
        self._chunks = _ShardChunks(self.path, self.manifest, columns, shuffle, seed, repeat, read_tokens,
                                    rank, world_size)
        self.buffer = ShuffleBuffer(self._chunks, buffer_tokens, batch_size, seed, shuffle=shuffle,
                                    device=device, background=background, float_columns=len(act_columns))

    def _hook_columns(self, hooks: Optional[Union[str, List[str]]]) -> List[str]:
        """The activation columns to read for ``hooks`` (see the class docstring)."""
        stored = self.manifest.get("hooks")
        if stored is None:
            own = self.manifest.get("metadata", {}).get("hook")
            asked = [hooks] if isinstance(hooks, str) else (list(hooks) if hooks is not None else None)
            if asked is not None and own is not None and asked != [own]:
                raise ValueError(f"the cache {self.path} holds one hook ({own!r}), not {hooks!r}")
            return ["activations"]
        wanted = list(stored) if hooks is None else ([hooks] if isinstance(hooks, str) else list(hooks))
        missing = [h for h in wanted if h not in stored]
        if missing or not wanted:
            raise ValueError(f"the cache {self.path} holds hooks {stored}, not {missing or wanted}; cache them "
                             "with saefast cache --hook ...")
        return wanted

    @property
    def source_state(self) -> Any:
        """The state of the source the cache was written from, after its last cached batch."""
        return self.manifest["source_state"]

    def __iter__(self) -> "CachedActivationSource":
        return self

    def __next__(self) -> Union[Tensor, ActivationBatch, Dict[str, Tensor]]:
        batch = next(self.buffer)
        if self.with_tokens:
            return ActivationBatch(*batch)
        if self._multi:
            return dict(zip(self.hook_names, batch))
        return batch[0]

    def state_dict(self) -> Dict[str, Any]:
        """JSON-safe position (epoch, shard, row of the current block, batches served)."""
        return {"kind": "cache", "d_in": self.d_in if self.d_in is not None else self.d_ins, "n_tokens": self.n_tokens,
                "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state saved on another cache."""
        if state.get("kind") != "cache":
            raise ValueError(f"cannot resume a CachedActivationSource from a {state.get('kind')!r} source state")
        widths = self.d_in if self.d_in is not None else self.d_ins
        for key, mine in (("d_in", widths), ("n_tokens", self.n_tokens)):
            if state.get(key) != mine:
                raise ValueError(f"cannot resume: the saved source read a cache with {key}={state.get(key)!r} "
                                 f"but {self.path} has {key}={mine!r}")
        self.buffer.load_state_dict(state["buffer"])

    def close(self) -> None:
        """Stop the background reader thread."""
        self.buffer.close()

    def iter_shards(self) -> Iterator[Tensor]:
        """Every cached activation row, shard by shard in stored order ([rows, d_in] each)."""
        from safetensors.torch import load_file

        for shard in self.manifest["shards"]:
            yield load_file(str(self.path / shard["file"]))["activations"]
