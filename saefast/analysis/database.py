"""Activation database: the sparse token x feature matrix of an SAE over a corpus, with token metadata.

An :class:`ActivationDatabase` holds, for ``n_tokens`` tokens and ``d_sae`` features:

* entries (COO, sorted by token, then feature): ``values [nnz]`` fp32, ``feature_ids [nnz]``
  int32, ``token_index [nnz]`` int64 (row of the token in the database);
* token metadata, one row per token: ``token_ids`` (-1 when unknown, e.g. synthetic
  activations), ``window_ids`` (which token window the token came from, -1 when unknown) and
  ``positions`` (its position in that window, -1 when unknown), all int64 ``[n_tokens]``;
* contexts (optional): ``context_window_ids [n_windows]`` (sorted) and ``context_tokens
  [n_windows, context_size]`` int64, the full token windows (-1 where a token is unknown), so the
  text around any token can be shown;
* ``metadata``: a JSON-safe dict (SAE, hook, model, dataset, ...).

Nothing dense ``[n_tokens, d_sae]`` is ever built: a database costs 16 bytes per active
(token, feature) pair plus 24 bytes per token. Per-feature queries go through a feature-major
index (one sort of the entries, built on first use).

Builders:

* :func:`build_database`: run a transformer-lens model up to the SAE's hook (a crosscoder's hooks,
  concatenated) over token windows
  (a ``[N, seq]`` tensor or a :class:`~saefast.data.tokens.TokenWindows`) and encode every real,
  non-BOS token;
* :func:`build_database_from_activations`: encode activation batches you already have (tensors,
  or :class:`~saefast.data.source.ActivationBatch` with token ids, window ids and positions);
* :func:`build_database_from_cache`: the same over an activation cache written by
  ``saefast cache`` (token metadata and contexts when the cache holds them).

On disk a database is one safetensors file (``save``/``load``; no pickle), with its metadata in
the safetensors header.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Collection, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..selection import csr_offsets
from ..utils import eval_mode, write_atomic

__all__ = ["ActivationDatabase", "build_database", "build_database_from_activations",
           "build_database_from_cache", "DB_FORMAT"]

logger = logging.getLogger(__name__)

DB_FORMAT = "saefast.activation_db"
_DB_VERSION = "1"
PathLike = Union[str, os.PathLike]


def _long(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.long).contiguous()



def _check_index(value, name: str, what: str, limit: int, limit_name: str) -> int:
    """``value`` as an int in [0, limit) (a one-element tensor is accepted), else a TypeError /
    ValueError naming the argument and the range."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int {what}, got {type(value).__name__}")
    if not 0 <= value < limit:
        raise ValueError(f"{name}={value} must be in [0, {limit_name}={limit})")
    return value

class ActivationDatabase:
    """Sparse token x feature activations with token metadata (see the module docstring).

    Args:
        values: [nnz] activation values (stored fp32).
        feature_ids: [nnz] feature of each entry (stored int32).
        token_index: [nnz] token (database row) of each entry.
        n_tokens: number of tokens.
        d_sae: number of features.
        token_ids, window_ids, positions: [n_tokens] token metadata (-1: unknown); None: all unknown.
        context_window_ids: [n_windows] window ids of the stored contexts (any order; sorted here).
        context_tokens: [n_windows, context_size] token ids of those windows (-1: unknown).
        metadata: JSON-safe information about how the database was made.

    Entries are sorted by (token, feature) on construction; a (token, feature) pair may appear once.
    """

    def __init__(self, values: Tensor, feature_ids: Tensor, token_index: Tensor, n_tokens: int, d_sae: int, *,
                 token_ids: Optional[Tensor] = None, window_ids: Optional[Tensor] = None,
                 positions: Optional[Tensor] = None, context_window_ids: Optional[Tensor] = None,
                 context_tokens: Optional[Tensor] = None, metadata: Optional[Dict[str, Any]] = None) -> None:
        for name, value in (("n_tokens", n_tokens), ("d_sae", d_sae)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        if d_sae < 1:
            raise ValueError(f"d_sae={d_sae} must be at least 1")
        for name, t in (("values", values), ("feature_ids", feature_ids), ("token_index", token_index)):
            if not isinstance(t, Tensor) or t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D tensor [nnz], got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        nnz = values.numel()
        if feature_ids.numel() != nnz or token_index.numel() != nnz:
            raise ValueError(f"values ({nnz}), feature_ids ({feature_ids.numel()}) and token_index "
                             f"({token_index.numel()}) must have the same length")
        values = values.detach().to(device="cpu", dtype=torch.float32)
        feature_ids, token_index = _long(feature_ids), _long(token_index)
        if nnz:
            if int(feature_ids.min()) < 0 or int(feature_ids.max()) >= d_sae:
                raise ValueError(f"feature_ids must lie in [0, d_sae={d_sae})")
            if int(token_index.min()) < 0 or int(token_index.max()) >= n_tokens:
                raise ValueError(f"token_index must lie in [0, n_tokens={n_tokens})")
        keys = token_index * d_sae + feature_ids
        if nnz > 1 and not bool((keys[1:] > keys[:-1]).all()):
            keys, order = torch.sort(keys)
            if bool((keys[1:] == keys[:-1]).any()):
                raise ValueError("a (token, feature) pair appears twice in the entries")
            values, feature_ids, token_index = values[order], feature_ids[order], token_index[order]
        self.values = values
        self.feature_ids = feature_ids.to(torch.int32)
        self.token_index = token_index
        self.n_tokens, self.d_sae = n_tokens, d_sae

        def meta(name: str, t: Optional[Tensor]) -> Tensor:
            if t is None:
                return torch.full((n_tokens,), -1, dtype=torch.long)
            if not isinstance(t, Tensor) or t.shape != (n_tokens,):
                raise ValueError(f"{name} must be a tensor [n_tokens={n_tokens}], got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            return _long(t)

        self.token_ids = meta("token_ids", token_ids)
        self.window_ids = meta("window_ids", window_ids)
        self.positions = meta("positions", positions)
        if (context_window_ids is None) != (context_tokens is None):
            raise ValueError("give both context_window_ids and context_tokens, or neither")
        if context_tokens is not None:
            if context_tokens.dim() != 2 or context_window_ids.shape != (context_tokens.shape[0],):
                raise ValueError(f"context_tokens must be [n_windows, context_size] and context_window_ids "
                                 f"[n_windows]; got {tuple(context_tokens.shape)} and "
                                 f"{tuple(context_window_ids.shape)}")
            wids, order = torch.sort(_long(context_window_ids))
            context_window_ids, context_tokens = wids, _long(context_tokens)[order]
        self.context_window_ids = context_window_ids
        self.context_tokens = context_tokens
        self.metadata: Dict[str, Any] = dict(metadata or {})
        json.dumps(self.metadata)  # fails early on values that cannot be saved
        self._by_feature: Optional[Tuple[Tensor, Tensor]] = None
        self._token_offsets: Optional[Tensor] = None
        self._token_keys: Optional[Tuple[Tensor, Tensor, int]] = None
        self._entry_keys: Optional[Tensor] = None
        self._counts: Optional[Tensor] = None

    # ------------------------------------------------------------------ sizes

    @property
    def nnz(self) -> int:
        """Number of stored (token, feature) activations."""
        return self.values.numel()

    @property
    def has_token_ids(self) -> bool:
        """True when at least one token id is known (text contexts can be shown)."""
        return bool((self.token_ids >= 0).any()) if self.n_tokens else False

    @property
    def has_contexts(self) -> bool:
        """True when the database stores the token windows around its tokens."""
        return self.context_tokens is not None and self.context_tokens.shape[0] > 0

    def __repr__(self) -> str:
        return (f"ActivationDatabase(n_tokens={self.n_tokens}, d_sae={self.d_sae}, nnz={self.nnz}, "
                f"contexts={self.has_contexts})")

    # ------------------------------------------------------------------ indices

    @property
    def token_offsets(self) -> Tensor:
        """CSR offsets [n_tokens + 1]: token t owns entries ``token_offsets[t]:token_offsets[t + 1]``."""
        if self._token_offsets is None:
            self._token_offsets = csr_offsets(self.token_index, self.n_tokens)
        return self._token_offsets

    def feature_index(self) -> Tuple[Tensor, Tensor]:
        """(order [nnz], offsets [d_sae + 1]): ``order[offsets[f]:offsets[f + 1]]`` are the entries of
        feature f, by decreasing value, ties by increasing token index."""
        if self._by_feature is None:
            # stable sorts: by value (descending), then by feature; token order breaks value ties
            by_value = torch.sort(self.values, descending=True, stable=True).indices
            by_feature = torch.sort(self.feature_ids[by_value].long(), stable=True).indices
            order = by_value[by_feature]
            self._by_feature = (order, csr_offsets(self.feature_ids[order], self.d_sae))
        return self._by_feature

    def _check_feature(self, feature: int) -> int:
        return _check_index(feature, "feature", "feature id", self.d_sae, "d_sae")

    def _check_token(self, token: int) -> int:
        return _check_index(token, "token", "token index", self.n_tokens, "n_tokens")

    # ------------------------------------------------------------------ per-feature statistics

    def feature_counts(self) -> Tensor:
        """int64 [d_sae]: on how many tokens each feature fires."""
        if self._counts is None:
            self._counts = torch.bincount(self.feature_ids.long(), minlength=self.d_sae)
        return self._counts.clone()

    def feature_density(self) -> Tensor:
        """fp64 [d_sae]: firing frequency of each feature (fraction of the database's tokens)."""
        return self.feature_counts().double() / max(self.n_tokens, 1)

    def feature_sums(self) -> Tensor:
        """fp64 [d_sae]: sum of each feature's activations."""
        return torch.zeros(self.d_sae, dtype=torch.float64).index_add_(0, self.feature_ids.long(),
                                                                       self.values.double())

    def feature_mean_activation(self) -> Tensor:
        """fp64 [d_sae]: mean activation of each feature over the tokens where it fires (0 if never)."""
        return self.feature_sums() / self.feature_counts().clamp_min(1).double()

    def feature_max_activation(self) -> Tensor:
        """fp32 [d_sae]: largest activation of each feature (0 if it never fires)."""
        out = torch.zeros(self.d_sae, dtype=torch.float32)
        return out.scatter_reduce_(0, self.feature_ids.long(), self.values, reduce="amax", include_self=True)

    def token_l0(self) -> Tensor:
        """int64 [n_tokens]: number of active features of each token."""
        return torch.bincount(self.token_index, minlength=self.n_tokens)

    # ------------------------------------------------------------------ queries

    def feature_activations(self, feature: int, top_k: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """(token_index [m], values [m]) of the tokens where ``feature`` fires, by decreasing value
        (ties: lower token index first); the ``top_k`` largest when given."""
        feature = self._check_feature(feature)
        order, offsets = self.feature_index()
        lo, hi = int(offsets[feature]), int(offsets[feature + 1])
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
                raise ValueError(f"top_k={top_k!r} must be a non-negative integer or None")
            hi = min(hi, lo + top_k)
        entries = order[lo:hi]
        return self.token_index[entries], self.values[entries]

    def token_activations(self, token: int) -> Tuple[Tensor, Tensor]:
        """(feature_ids [m] int64, values [m]) active on database row ``token``, by decreasing value."""
        token = self._check_token(token)
        lo, hi = int(self.token_offsets[token]), int(self.token_offsets[token + 1])
        values, order = torch.sort(self.values[lo:hi], descending=True, stable=True)
        return self.feature_ids[lo:hi][order].long(), values

    def values_at(self, feature: int, tokens: Tensor) -> Tensor:
        """fp32 [len(tokens)]: activation of ``feature`` on each token index (0 where it does not
        fire, and for indices < 0, which stand for tokens outside the database)."""
        feature = self._check_feature(feature)
        tokens = _long(torch.as_tensor(tokens)).reshape(-1)
        out = torch.zeros(tokens.numel(), dtype=torch.float32)
        if not self.nnz or not tokens.numel():
            return out
        if self._entry_keys is None:
            self._entry_keys = self.token_index * self.d_sae + self.feature_ids.long()  # sorted
        keys = self._entry_keys
        query = tokens.clamp_min(0) * self.d_sae + feature
        pos = torch.searchsorted(keys, query).clamp_max(self.nnz - 1)
        hit = (keys[pos] == query) & (tokens >= 0)
        out[hit] = self.values[pos[hit]]
        return out

    def lookup_tokens(self, window_ids: Tensor, positions: Tensor) -> Tensor:
        """int64: the database row of each (window id, position), or -1 when it is not in the database."""
        window_ids, positions = _long(torch.as_tensor(window_ids)), _long(torch.as_tensor(positions))
        if self._token_keys is None:
            known = (self.window_ids >= 0) & (self.positions >= 0)
            span = int(self.positions.max()) + 1 if self.n_tokens else 1
            keys = torch.where(known, self.window_ids * span + self.positions, torch.full_like(self.positions, -1))
            sorted_keys, order = torch.sort(keys)
            self._token_keys = (sorted_keys, order, span)
        sorted_keys, order, span = self._token_keys
        out = torch.full(window_ids.shape, -1, dtype=torch.long)
        valid = (window_ids >= 0) & (positions >= 0) & (positions < span)
        if not sorted_keys.numel():
            return out
        query = window_ids * span + positions
        pos = torch.searchsorted(sorted_keys, query).clamp_max(sorted_keys.numel() - 1)
        hit = valid & (sorted_keys[pos] == query)
        out[hit] = order[pos[hit]]
        return out

    def context(self, token: int, before: int = 10, after: int = 4) -> Tuple[Tensor, Tensor, int]:
        """The window around database row ``token``: (token ids [L] (-1: unknown), database rows
        [L] (-1: not in the database, e.g. BOS), index of ``token`` in them).

        Without stored contexts (or when the token's window is unknown) the context is the token alone.
        """
        token = self._check_token(token)
        if before < 0 or after < 0:
            raise ValueError(f"before={before} and after={after} must be >= 0")
        wid, pos = int(self.window_ids[token]), int(self.positions[token])
        if self.has_contexts and wid >= 0 and pos >= 0:
            row = int(torch.searchsorted(self.context_window_ids, torch.tensor(wid)))
            if row < self.context_window_ids.numel() and int(self.context_window_ids[row]) == wid:
                window = self.context_tokens[row]
                lo, hi = max(0, pos - before), min(window.numel(), pos + after + 1)
                span = torch.arange(lo, hi)
                ids = window[lo:hi].clone()
                rows = self.lookup_tokens(torch.full_like(span, wid), span)
                return ids, rows, pos - lo
        return self.token_ids[token:token + 1].clone(), torch.tensor([token]), 0

    # ------------------------------------------------------------------ files

    def _tensors(self) -> Dict[str, Tensor]:
        tensors = {"values": self.values, "feature_ids": self.feature_ids, "token_index": self.token_index,
                   "token_ids": self.token_ids, "window_ids": self.window_ids, "positions": self.positions}
        if self.context_tokens is not None:
            tensors["context_window_ids"] = self.context_window_ids
            tensors["context_tokens"] = self.context_tokens
        return {k: v.contiguous() for k, v in tensors.items()}

    def save(self, path: PathLike, overwrite: bool = False) -> Path:
        """Write the database to one safetensors file (written to a temporary name, then renamed).
        Refuses to replace an existing file unless ``overwrite``. Returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise ValueError(f"{path} already exists; pass overwrite=True to replace it or choose another path")
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": DB_FORMAT, "version": _DB_VERSION, "n_tokens": str(self.n_tokens),
                  "d_sae": str(self.d_sae), "metadata": json.dumps(self.metadata)}
        tensors = self._tensors()
        return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: PathLike) -> "ActivationDatabase":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no activation database at {path}")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if header.get("format") != DB_FORMAT:
                raise ValueError(f"{path} is not a saefast activation database (format={header.get('format')!r}); "
                                 "write one with ActivationDatabase.save")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(tensors["values"], tensors["feature_ids"], tensors["token_index"], int(header["n_tokens"]),
                   int(header["d_sae"]), token_ids=tensors["token_ids"], window_ids=tensors["window_ids"],
                   positions=tensors["positions"], context_window_ids=tensors.get("context_window_ids"),
                   context_tokens=tensors.get("context_tokens"), metadata=json.loads(header["metadata"]))


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------

class _Collector:
    """Accumulates sparse codes batch by batch (on the CPU) and builds the database."""

    def __init__(self, d_sae: int, min_activation: float) -> None:
        self.d_sae, self.min_activation = d_sae, min_activation
        self.parts: Dict[str, List[Tensor]] = {k: [] for k in ("values", "feature_ids", "token_index",
                                                              "token_ids", "window_ids", "positions")}
        self.n_tokens = 0

    def add(self, acts: Any, token_ids: Optional[Tensor], window_ids: Optional[Tensor],
            positions: Optional[Tensor]) -> None:
        n = acts.n_rows
        values = acts.values.detach().float().cpu()
        keep = values > self.min_activation
        self.parts["values"].append(values[keep])
        self.parts["feature_ids"].append(acts.indices.detach().cpu()[keep].to(torch.int32))
        self.parts["token_index"].append(acts.row_ids.detach().cpu()[keep].long() + self.n_tokens)
        for name, t in (("token_ids", token_ids), ("window_ids", window_ids), ("positions", positions)):
            self.parts[name].append(torch.full((n,), -1, dtype=torch.long) if t is None else _long(t))
        self.n_tokens += n

    def build(self, contexts_from_metadata: bool = False, **kwargs: Any) -> ActivationDatabase:
        """The database; with ``contexts_from_metadata`` the windows are rebuilt from the tokens'
        (token id, window id, position) when they are known."""
        cat = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.float32 if k == "values" else torch.long)
               for k, v in self.parts.items()}
        if contexts_from_metadata and bool(((cat["token_ids"] >= 0) & (cat["window_ids"] >= 0)).any()):
            kwargs["context_window_ids"], kwargs["context_tokens"] = _contexts_from_tokens(
                cat["token_ids"], cat["window_ids"], cat["positions"])
        return ActivationDatabase(cat["values"], cat["feature_ids"], cat["token_index"], self.n_tokens, self.d_sae,
                                  token_ids=cat["token_ids"], window_ids=cat["window_ids"],
                                  positions=cat["positions"], **kwargs)


def _sae_param(sae: nn.Module) -> Tensor:
    if not hasattr(sae, "encode_sparse") or not hasattr(sae, "d_sae"):
        raise TypeError(f"sae must be a saefast SAE (with encode_sparse and d_sae), got {type(sae).__name__}; "
                        "load one with saefast.load_sae(path)")
    return next(sae.parameters())


def _check_n_tokens(n_tokens: Optional[int]) -> None:
    if n_tokens is not None and (isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1):
        raise ValueError(f"n_tokens={n_tokens!r} must be a positive integer or None")


def _window_batches(tokens: Any, batch_size: int, pad_token_id: Optional[int]):
    """(window ids [b], tokens [b, seq], n_real [b]) batches from a tensor or a TokenWindows."""
    from ..data.tokens import TokenWindows

    if isinstance(tokens, Tensor):
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be a [n_windows, seq] integer tensor, got shape {tuple(tokens.shape)} "
                             f"and dtype {tokens.dtype}")
        for start in range(0, tokens.shape[0], batch_size):
            rows = tokens[start:start + batch_size].long()
            if pad_token_id is None:
                n_real = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.long)
            else:
                # padding sits at the tail: the real length is one past the last non-pad token
                real = (rows != pad_token_id).cpu()
                idx = torch.arange(1, rows.shape[1] + 1)
                n_real = (real * idx).max(dim=1).values
            yield torch.arange(start, start + rows.shape[0]), rows, n_real
        return
    if not isinstance(tokens, TokenWindows):
        raise TypeError(f"tokens must be a [n_windows, seq] tensor or a TokenWindows, got {type(tokens).__name__}")
    wid = 0
    while True:
        rows, lengths = [], []
        for _ in range(batch_size):
            try:
                window, n_real = tokens.next_with_length()
            except StopIteration:
                break
            rows.append(window)
            lengths.append(n_real)
        if not rows:
            return
        yield torch.arange(wid, wid + len(rows)), torch.stack(rows), torch.tensor(lengths)
        wid += len(rows)


@torch.no_grad()
def build_database(sae: nn.Module, model: nn.Module, tokens: Any,
                   hook_name: Optional[Union[str, Sequence[str]]] = None, *,
                   n_tokens: Optional[int] = None, batch_size: int = 8,
                   exclude_token_ids: Optional[Collection[int]] = None, pad_token_id: Optional[int] = None,
                   min_activation: float = 0.0, progress: bool = True,
                   metadata: Optional[Dict[str, Any]] = None) -> ActivationDatabase:
    """Encode a model's activations at ``hook_name`` over token windows into a database.

    Args:
        sae: a saefast SAE (put in eval mode while encoding: BatchTopK uses its learned threshold).
        model: a transformer-lens model.
        tokens: ``[n_windows, seq]`` token ids, or a :class:`~saefast.data.tokens.TokenWindows`
            (read until it ends or ``n_tokens`` tokens are stored).
        hook_name: the hook the SAE reads (default: ``sae.config.hook_spec``; a crosscoder: its
            layers' hooks, whose activations are concatenated).
        n_tokens: stop after this many stored tokens (None: every window).
        batch_size: windows per model forward pass.
        exclude_token_ids: tokens not stored (default: the windows' BOS id for a TokenWindows with
            prepend_bos, else none). The SAE was not trained on them; they still show in contexts.
        pad_token_id: padding id of a token tensor (trailing padding is dropped); a TokenWindows
            reports its real lengths itself.
        min_activation: store only activations above this value.
        progress: show a tqdm progress bar.
        metadata: extra JSON-safe information stored with the database.

    Every window read is stored in the contexts, so examples show their surrounding text.
    """
    from ..data.models import check_hook, run_to_hooks
    from ..data.tokens import TokenWindows
    from ..evals.model_evals import sae_hooks

    param = _sae_param(sae)
    reads, _ = sae_hooks(sae, hook_name)
    for hook in reads:
        check_hook(model, hook)
    _check_n_tokens(n_tokens)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if exclude_token_ids is None and isinstance(tokens, TokenWindows) and tokens.prepend_bos:
        exclude_token_ids = {tokens.bos_token_id}
    excluded = torch.tensor(sorted(exclude_token_ids or ()), dtype=torch.long)
    collector = _Collector(sae.d_sae, min_activation)
    window_parts: List[Tensor] = []
    wid_parts: List[Tensor] = []
    bar = tqdm(total=n_tokens, desc="activation database", unit="tok", disable=not progress)
    with eval_mode(sae):
        for wids, rows, n_real in _window_batches(tokens, batch_size, pad_token_id):
            acts = run_to_hooks(model, rows, reads)
            acts_in = torch.cat([acts[h] for h in reads], dim=-1)  # [b, seq, d_in]
            rows_cpu = rows.cpu()
            pos = torch.arange(rows.shape[1])
            keep = pos[None, :] < n_real[:, None]
            if excluded.numel():
                keep &= ~torch.isin(rows_cpu, excluded)
            if n_tokens is not None:
                # keep only the first tokens that still fit, in window order
                room = n_tokens - collector.n_tokens
                keep &= torch.cumsum(keep.flatten().long(), 0).reshape(keep.shape) <= room
            x = acts_in[keep.to(acts_in.device)].to(device=param.device, dtype=param.dtype)
            if x.shape[0]:
                codes = sae.encode_sparse(x)
                collector.add(codes, rows_cpu[keep], wids[:, None].expand_as(rows_cpu)[keep],
                              pos[None, :].expand_as(rows_cpu)[keep])
            used = keep.any(dim=1)
            window_parts.append(rows_cpu[used])
            wid_parts.append(wids[used])
            bar.update(int(keep.sum()))
            if n_tokens is not None and collector.n_tokens >= n_tokens:
                break
    bar.close()
    if collector.n_tokens == 0:
        raise ValueError("no token was stored: the windows are empty, all padding or all excluded tokens")
    info = {"source": "model", "hook_name": reads[0] if len(reads) == 1 else reads, "d_in": int(sae.d_in),
            "exclude_token_ids": excluded.tolist(), **(metadata or {})}
    return collector.build(context_window_ids=torch.cat(wid_parts), context_tokens=torch.cat(window_parts),
                           metadata=info)


def _contexts_from_tokens(token_ids: Tensor, window_ids: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor]:
    """Windows rebuilt from per-token metadata: (window ids [n], tokens [n, max position + 1]), -1
    where a position was not among the tokens (e.g. dropped BOS)."""
    known = (window_ids >= 0) & (positions >= 0) & (token_ids >= 0)
    wids, inverse = torch.unique(window_ids[known], return_inverse=True)
    width = int(positions[known].max()) + 1 if bool(known.any()) else 0
    windows = torch.full((wids.numel(), width), -1, dtype=torch.long)
    windows[inverse, positions[known]] = token_ids[known]
    return wids, windows


@torch.no_grad()
def build_database_from_activations(sae: nn.Module, batches: Iterable[Any], *, n_tokens: Optional[int] = None,
                                    min_activation: float = 0.0, progress: bool = True,
                                    metadata: Optional[Dict[str, Any]] = None) -> ActivationDatabase:
    """Encode activation batches into a database.

    Args:
        sae: a saefast SAE (in eval mode while encoding).
        batches: iterable of ``[B, d_in]`` tensors (token metadata unknown) or
            :class:`~saefast.data.source.ActivationBatch` (token ids, window ids, positions kept;
            contexts are rebuilt from them: a window's tokens that are not among the batches, such
            as a dropped BOS, show as unknown).
        n_tokens: stop after this many tokens (None: every batch).
        min_activation, progress, metadata: as in :func:`build_database`.
    """
    from ..data.source import ActivationBatch

    param = _sae_param(sae)
    _check_n_tokens(n_tokens)
    collector = _Collector(sae.d_sae, min_activation)
    bar = tqdm(total=n_tokens, desc="activation database", unit="tok", disable=not progress)
    with eval_mode(sae):
        for batch in batches:
            if isinstance(batch, ActivationBatch):
                x, meta = batch.acts, (batch.token_ids, batch.window_ids, batch.positions)
            elif isinstance(batch, Tensor):
                x, meta = batch, (None, None, None)
            else:
                raise TypeError(f"batches must yield [B, d_in] tensors or ActivationBatch, got {type(batch).__name__}")
            if x.dim() != 2 or x.shape[1] != sae.d_in:
                raise ValueError(f"a batch has shape {tuple(x.shape)}; expected [batch, d_in={sae.d_in}]")
            if n_tokens is not None:
                take = n_tokens - collector.n_tokens
                x = x[:take]
                meta = tuple(None if m is None else m[:take] for m in meta)
            codes = sae.encode_sparse(x.to(device=param.device, dtype=param.dtype))
            collector.add(codes, *meta)
            bar.update(x.shape[0])
            if n_tokens is not None and collector.n_tokens >= n_tokens:
                break
    bar.close()
    if collector.n_tokens == 0:
        raise ValueError("batches yielded no activations; nothing to store")
    return collector.build(contexts_from_metadata=True,
                           metadata={"source": "activations", "d_in": int(sae.d_in), **(metadata or {})})


def cache_input_columns(sae: nn.Module, manifest: Dict[str, Any], cache_dir: PathLike) -> List[str]:
    """The cache columns holding what ``sae`` reads, in order (concatenated, they are its input):
    ``["activations"]`` for a one-hook cache, else the hooks the SAE reads. ValueError when the
    cache lacks them or their width is not the SAE's d_in."""
    from ..evals.model_evals import sae_hooks

    if manifest.get("hooks") is None:
        columns, width = ["activations"], manifest["d_in"]
    else:
        columns, _ = sae_hooks(sae)
        missing = [h for h in columns if h not in manifest["hooks"]]
        if missing:
            raise ValueError(f"the cache {cache_dir} holds hooks {manifest['hooks']}, not {missing} that the SAE "
                             "reads; use a cache of the SAE's hook(s)")
        width = sum(manifest["d_ins"][h] for h in columns)
    if width != sae.d_in:
        raise ValueError(f"the cache {cache_dir} holds d_in={width} activations but the SAE has "
                         f"d_in={sae.d_in}; use the cache of the SAE's hook")
    return columns


def build_database_from_cache(sae: nn.Module, cache_dir: PathLike, *, n_tokens: Optional[int] = None,
                              batch_size: int = 4096, min_activation: float = 0.0, progress: bool = True,
                              metadata: Optional[Dict[str, Any]] = None) -> ActivationDatabase:
    """Encode the activations of a cache folder (``saefast cache``), in stored order.

    Token ids, window ids and positions (and so contexts) are kept when the cache has them
    (caches written from a source with ``with_tokens=True``); otherwise tokens are anonymous. A
    cache of several hooks gives the SAE the hook(s) it reads (:func:`cache_input_columns`).
    """
    from ..data.cache import read_cache_rows, read_manifest
    from ..data.source import ActivationBatch

    manifest = read_manifest(cache_dir)
    act_columns = cache_input_columns(sae, manifest, cache_dir)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    meta_columns = ("token_ids", "window_ids", "positions")
    with_tokens = all(c in manifest["columns"] for c in meta_columns)

    def batches():
        # in stored order, every row (the training reader drops a ragged tail)
        n = len(act_columns)
        columns = tuple(act_columns) + (meta_columns if with_tokens else ())
        for parts in read_cache_rows(cache_dir, columns, chunk_rows=batch_size):
            x = torch.cat(parts[:n], dim=-1) if n > 1 else parts[0]
            yield ActivationBatch(x, *parts[n:]) if with_tokens else x

    info = {"source": "cache", "cache_dir": str(cache_dir), **manifest.get("metadata", {}), **(metadata or {})}
    return build_database_from_activations(sae, batches(), n_tokens=n_tokens, min_activation=min_activation,
                                           progress=progress, metadata=info)
