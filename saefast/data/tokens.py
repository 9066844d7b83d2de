"""Token windows from a Hugging Face ``datasets`` dataset: text tokenised on the fly, or pre-tokenised.

:class:`TokenWindows` turns documents into windows of exactly ``context_size`` token ids.

* ``pack=True`` (default): documents are concatenated into one stream and cut into windows, so no
  token is wasted on padding. With ``prepend_bos`` every document starts with BOS in the stream and
  every window starts with BOS (a document's own BOS doubles as the window's when it falls first).
* ``pack=False``: each document is cut on its own; its last window is padded.

Only the very last window of the data (or of a document, with ``pack=False``) holds padding; it
sits at the tail, so under causal attention it never changes the real tokens' activations.
:meth:`TokenWindows.next_with_length` reports how many leading positions are real; activation
sources drop the rest, and also every BOS position.

The position in the dataset (epoch, document index, offset into that document) is in
:meth:`TokenWindows.state_dict`; :meth:`load_state_dict` resumes exactly where it stopped by
re-tokenising that one document (tokenisers are deterministic).
"""
from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["TokenWindows", "load_dataset_any"]

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                  ".parquet": "parquet", ".arrow": "arrow"}


def load_dataset_any(path_or_name: Union[str, os.PathLike], split: str = "train", *,
                     streaming: bool = False, **kwargs: Any) -> Any:
    """Load a dataset from a local file, a local folder, or the Hugging Face hub.

    * a file ``.txt`` (one document per line), ``.json``/``.jsonl``, ``.csv``, ``.parquet``, ``.arrow``;
    * a folder written by ``Dataset.save_to_disk`` (``split`` picks from a ``DatasetDict``), or a
      folder of data files;
    * anything else is a hub name, passed to ``datasets.load_dataset(name, split=split)``.

    Local paths need no network. Raises ValueError when the result is empty.
    """
    import datasets

    if not isinstance(path_or_name, (str, os.PathLike)) or not str(path_or_name):
        raise ValueError(f"path_or_name={path_or_name!r} must be a local path or a hub dataset name")
    path = Path(path_or_name).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"cannot read {path}: unknown file type {path.suffix!r}; use one of "
                             f"{sorted(_FILE_BUILDERS)} or a folder written by Dataset.save_to_disk")
        if path.stat().st_size == 0:
            raise ValueError(f"dataset file {path} is empty")
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming,
                                       **kwargs)
        except ValueError as err:
            if "no data" in str(err):
                raise ValueError(f"dataset file {path} is empty (it has no rows)") from err
            raise
    elif path.is_dir():
        if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"split={split!r} is not in {path}; it has splits {list(ds)}")
                ds = ds[split]
            if streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(str(path), split=split, streaming=streaming, **kwargs)
    else:
        ds = datasets.load_dataset(str(path_or_name), split=split, streaming=streaming, **kwargs)
    if hasattr(ds, "__len__") and len(ds) == 0:
        raise ValueError(f"dataset {str(path_or_name)!r} (split {split!r}) is empty")
    return ds


class _Segment:
    """A document's tokens in the stream (BOS first when prepend_bos) and how many are consumed."""

    __slots__ = ("epoch", "doc", "tokens", "pos")

    def __init__(self, epoch: int, doc: int, tokens: List[int], pos: int = 0) -> None:
        self.epoch, self.doc, self.tokens, self.pos = epoch, doc, tokens, pos

    def left(self) -> int:
        return len(self.tokens) - self.pos


class TokenWindows:
    """Iterator of token-id windows ``[context_size]`` (int64) over a dataset.

    Args:
        dataset: a ``datasets.Dataset`` / ``IterableDataset``, or a list of strings, of dicts, or
            (with ``tokens_column``) of dicts holding token-id lists.
        tokenizer: a Hugging Face tokenizer; may be None for pre-tokenised data when
            ``bos_token_id`` is given or ``prepend_bos=False``.
        context_size: tokens per window (the model's sequence length for training).
        prepend_bos: start every window with the BOS token.
        text_column: the column holding text.
        tokens_column: the column holding token ids (pre-tokenised data); overrides text_column.
        pack: concatenate documents into one stream (True) or window each on its own (False).
        repeat: start over at the end of the dataset instead of stopping (``epoch`` counts passes).
        bos_token_id, pad_token_id: override the tokenizer's ids. Padding defaults to the
            tokenizer's pad id, else its BOS/EOS id, else 0 (padded positions are always dropped).
        rank, world_size: read only documents ``i`` with ``i % world_size == rank`` (data parallel).
        tokenize_batch_size: documents tokenised per tokenizer call.
    """

    def __init__(self, dataset: Any, tokenizer: Any, context_size: int, prepend_bos: bool = True,
                 text_column: str = "text", tokens_column: Optional[str] = None, *, pack: bool = True,
                 repeat: bool = False, bos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, rank: int = 0, world_size: int = 1,
                 tokenize_batch_size: int = 64) -> None:
        if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
            raise ValueError(f"context_size={context_size!r} must be a positive integer")
        if prepend_bos and context_size < 2:
            raise ValueError(f"context_size={context_size} leaves no room for tokens after BOS; use "
                             "context_size >= 2 or prepend_bos=False")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
                and 0 <= rank < world_size):
            raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size!r})")
        if tokenize_batch_size < 1:
            raise ValueError(f"tokenize_batch_size={tokenize_batch_size} must be >= 1")
        if dataset is None:
            raise ValueError("dataset is None; pass a datasets.Dataset, an IterableDataset or a list")
        if type(dataset).__name__ == "DatasetDict":
            raise ValueError(f"dataset is a DatasetDict with splits {list(dataset)}; pass one split, "
                             "e.g. dataset['train']")
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError("dataset is empty: it has no documents to make token windows from")
        column = tokens_column if tokens_column is not None else text_column
        columns = getattr(dataset, "column_names", None)
        if columns is not None and column not in columns:
            kind = "tokens_column" if tokens_column is not None else "text_column"
            raise ValueError(f"{kind}={column!r} is not a column of the dataset; its columns are "
                             f"{list(columns)}")
        if tokens_column is None and tokenizer is None:
            raise ValueError("a text dataset needs a tokenizer; pass tokenizer=..., or tokens_column= "
                             "for pre-tokenised data")

        def tok_id(name: str) -> Optional[int]:
            value = getattr(tokenizer, name, None) if tokenizer is not None else None
            return int(value) if value is not None else None

        self.bos_token_id = bos_token_id if bos_token_id is not None else tok_id("bos_token_id")
        if prepend_bos and self.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token; pass bos_token_id=... "
                             "or prepend_bos=False")
        fallback = [pad_token_id, tok_id("pad_token_id"), self.bos_token_id, tok_id("eos_token_id"), 0]
        self.pad_token_id: int = next(int(v) for v in fallback if v is not None)

        self.dataset = dataset
        self.tokenizer = tokenizer
        self.context_size = context_size
        self.prepend_bos = prepend_bos
        self.text_column = text_column
        self.tokens_column = tokens_column
        self.pack = pack
        self.repeat = repeat
        self.rank, self.world_size = rank, world_size
        self.tokenize_batch_size = tokenize_batch_size
        self._map_style = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")

        self._pending: Deque[_Segment] = deque()
        self._next = (0, 0)  # (epoch, doc) of the next document to load
        self._resume_offset = 0
        self._docs: Optional[Iterator[Tuple[int, int, List[int]]]] = None
        self.windows_yielded = 0

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, int]:
        """Position in the dataset: ``epoch``, ``doc`` (index of the next unconsumed document),
        ``offset`` (its stream tokens already consumed) and ``windows`` (yielded so far)."""
        if self._pending:
            head = self._pending[0]
            epoch, doc, offset = head.epoch, head.doc, head.pos
        else:
            (epoch, doc), offset = self._next, self._resume_offset
        return {"epoch": epoch, "doc": doc, "offset": offset, "windows": self.windows_yielded}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue from a position returned by :meth:`state_dict`."""
        try:
            epoch, doc, offset, windows = (int(state[k]) for k in ("epoch", "doc", "offset", "windows"))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"state {state!r} is not a TokenWindows state_dict (needs epoch, doc, "
                             "offset and windows)") from err
        self._pending.clear()
        self._next = (epoch, doc)
        self._resume_offset = offset
        self._docs = None
        self.windows_yielded = windows

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> "TokenWindows":
        return self

    def __next__(self) -> Tensor:
        return self.next_with_length()[0]

    def next_with_length(self) -> Tuple[Tensor, int]:
        """The next window ``[context_size]`` and how many of its leading positions are real tokens
        (the rest is padding). Raises StopIteration at the end of the data."""
        while True:
            window = self._cut(final=False)
            if window is None and not self._load_doc():
                window = self._cut(final=True)
                if window is None:
                    raise StopIteration
            if window is not None:
                self.windows_yielded += 1
                tokens, n_real = window
                return torch.tensor(tokens, dtype=torch.long), n_real

    def _available(self) -> int:
        return sum(s.left() for s in self._pending)

    def _cut(self, final: bool) -> Optional[Tuple[List[int], int]]:
        """Cut one window from the pending stream, or None when more documents are needed."""
        if not self._pending:
            return None
        head = self._pending[0]
        skip = 1 if self.prepend_bos and head.tokens[head.pos] == self.bos_token_id else 0
        need = self.context_size - (1 if self.prepend_bos else 0)
        # Without packing the pending stream is one whole document: always cut it.
        if self.pack and not final and self._available() - skip < need:
            return None
        head.pos += skip
        window = [self.bos_token_id] if self.prepend_bos else []
        while need > 0 and self._pending:
            seg = self._pending[0]
            take = min(need, seg.left())
            window.extend(seg.tokens[seg.pos:seg.pos + take])
            seg.pos += take
            need -= take
            if seg.left() == 0:
                self._pending.popleft()
        n_real = len(window)
        if n_real == (1 if self.prepend_bos else 0):
            return None  # only a BOS was left: nothing worth a window
        window.extend([self.pad_token_id] * (self.context_size - n_real))
        return window, n_real

    def _load_doc(self) -> bool:
        """Append the next non-empty document to the pending stream; False at the end of the data."""
        if self._docs is None:
            self._docs = self._iter_docs(*self._next)
        for epoch, doc, ids in self._docs:
            self._next = (epoch, doc + 1)
            if self.prepend_bos:
                if ids and ids[0] == self.bos_token_id:
                    ids = ids[1:]
                if not ids:
                    continue
                ids = [self.bos_token_id] + ids
            elif not ids:
                continue
            offset, self._resume_offset = self._resume_offset, 0
            if offset >= len(ids):
                continue
            self._pending.append(_Segment(epoch, doc, ids, offset))
            return True
        return False

    def _iter_docs(self, epoch: int, start: int) -> Iterator[Tuple[int, int, List[int]]]:
        """(epoch, document index, token ids) from ``start`` on, tokenised in batches."""
        while True:
            produced = False
            batch: List[Tuple[int, Any]] = []
            for idx, row in self._iter_rows(start):
                batch.append((idx, row))
                if len(batch) == self.tokenize_batch_size:
                    for idx_, ids in self._tokenize(batch):
                        produced = produced or bool(ids)
                        yield epoch, idx_, ids
                    batch = []
            for idx_, ids in self._tokenize(batch):
                produced = produced or bool(ids)
                yield epoch, idx_, ids
            if not self.repeat:
                return
            if not produced and start == 0:
                raise ValueError("the dataset yielded no tokens in a whole pass (every document is "
                                 "empty); check text_column/tokens_column")
            epoch, start = epoch + 1, 0

    def _iter_rows(self, start: int) -> Iterator[Tuple[int, Any]]:
        first = start + (self.rank - start) % self.world_size
        if self._map_style:
            for idx in range(first, len(self.dataset), self.world_size):
                yield idx, self.dataset[idx]
            return
        # Streaming datasets skip ahead themselves; other iterables are read from the start.
        skips = start > 0 and hasattr(self.dataset, "skip")
        rows = self.dataset.skip(start) if skips else self.dataset
        for idx, row in enumerate(rows, start=start if skips else 0):
            if idx >= start and idx % self.world_size == self.rank:
                yield idx, row

    def _tokenize(self, batch: Sequence[Tuple[int, Any]]) -> List[Tuple[int, List[int]]]:
        if not batch:
            return []
        if self.tokens_column is not None:
            out = []
            for idx, row in batch:
                ids = row[self.tokens_column]
                ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
                out.append((idx, [int(t) for t in ids]))
            return out
        texts = [row if isinstance(row, str) else row[self.text_column] for _, row in batch]
        for (idx, _), text in zip(batch, texts):
            if not isinstance(text, str):
                raise ValueError(f"document {idx} has {type(text).__name__} in text_column="
                                 f"{self.text_column!r}, not text; for token ids use tokens_column=")
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [(idx, list(ids)) for (idx, _), ids in zip(batch, encoded)]
