"""Shuffle buffer: mixes activation rows from many sequences before batches are drawn.

The buffer works in *blocks*. A block is filled with ``capacity`` rows read from a chunk stream
(for a model source: the kept tokens of ``capacity / context_size`` or more sequences), shuffled
with a permutation drawn from ``(seed, block index)``, and served as ``capacity / batch_size``
batches. The next block is produced in a background thread while the current one is served, so
the model runs while the trainer trains (at most two blocks are held at once).

Determinism: rows are read from the stream in order by a single producer, and every block's
permutation depends only on the seed and the block index, so the batches are the same with or
without the background thread. ``state_dict()`` is small and JSON-safe: the block index, the
stream position where the block starts (a chunk position plus the rows of that chunk to skip) and
how many of its batches were served. Resuming re-reads that one block and skips the served
batches, so a resumed run sees exactly the batches of an uninterrupted one.

``capacity`` is rounded up to a multiple of ``batch_size``; only at the very end of the stream
can a block be shorter, and its last ``< batch_size`` rows are then dropped. Rows are not mixed
across blocks: choose ``capacity`` large enough to cover many sequences.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Dict, Iterator, List, Optional, Protocol, Tuple, Union

import torch
from torch import Tensor

__all__ = ["ChunkStream", "ShuffleBuffer"]

logger = logging.getLogger(__name__)

Columns = Tuple[Tensor, ...]
_SEED_STRIDE = 1_000_003


class ChunkStream(Protocol):
    """What the buffer reads: chunks of aligned rows, with a resumable position.

    ``next_chunk()`` returns a tuple of tensors with the same first dimension (the first one is the
    activations [n, d_in]), or None at the end. ``position()`` is a JSON-safe description of where
    the next chunk starts; ``seek(position)`` goes back there.
    """

    def position(self) -> Any: ...

    def seek(self, position: Any) -> None: ...

    def next_chunk(self) -> Optional[Columns]: ...


class _Block:
    __slots__ = ("index", "columns", "n", "start", "next_start")

    def __init__(self, index: int, columns: Optional[Columns], n: int, start: Dict[str, Any],
                 next_start: Optional[Dict[str, Any]]) -> None:
        self.index, self.columns, self.n, self.start, self.next_start = index, columns, n, start, next_start


def _blocks(stream: ChunkStream, capacity: int, device: Optional[torch.device], start: Dict[str, Any],
            index: int, stop: Optional[threading.Event] = None) -> Iterator[_Block]:
    """Read the stream from ``start`` and cut it into blocks of ``capacity`` rows.

    A chunk that straddles two blocks is not read twice: its remaining rows are carried into the
    next block, whose recorded start is (that chunk's position, rows already used).
    """
    stream.seek(start["stream"])
    skip = int(start["skip"])
    carry: Optional[Tuple[Columns, Any, int]] = None  # (rows, chunk position, rows of it used before)
    block_start = start
    while True:
        store: Optional[List[Tensor]] = None
        n = 0
        next_start: Optional[Dict[str, Any]] = None
        while True:
            if stop is not None and stop.is_set():
                return
            if carry is not None:
                rows, chunk_pos, base = carry
                carry = None
            else:
                chunk_pos = stream.position()
                chunk = stream.next_chunk()
                if chunk is None:
                    break
                base, skip = skip, 0
                rows = tuple(c[base:] for c in chunk)
            count = rows[0].shape[0]
            if store is None and count:
                store = [torch.empty((capacity,) + c.shape[1:], dtype=c.dtype,
                                     device=device if device is not None else c.device) for c in rows]
            take = min(capacity - n, count)
            if take:
                for dst, src in zip(store, rows):  # type: ignore[arg-type]
                    dst[n:n + take].copy_(src[:take])
                n += take
            if take < count:
                carry = (tuple(c[take:] for c in rows), chunk_pos, base + take)
                next_start = {"stream": chunk_pos, "skip": base + take}
                break
            if n == capacity:
                next_start = {"stream": stream.position(), "skip": 0}
                break
        columns = tuple(c[:n] for c in store) if store is not None else None
        yield _Block(index, columns, n, block_start, next_start)
        if next_start is None:
            return
        block_start, index = next_start, index + 1


class _Background:
    """Runs a block generator in a daemon thread, at most ``ahead`` blocks in front of the consumer."""

    def __init__(self, blocks: Iterator[_Block], stop: threading.Event, ahead: int = 1) -> None:
        self._queue: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self._slots = threading.Semaphore(ahead + 1)
        self.stop = stop
        self._thread = threading.Thread(target=self._run, args=(blocks,), daemon=True,
                                        name="saefast-shuffle-buffer")
        self._thread.start()

    def _run(self, blocks: Iterator[_Block]) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                while True:
                    while not self._slots.acquire(timeout=0.1):
                        if self.stop.is_set():
                            return
                    if self.stop.is_set():
                        return
                    block = next(blocks, None)
                    if block is None:
                        self._queue.put(("end", None))
                        return
                    self._queue.put(("block", block))
        except BaseException as err:  # handed to the consumer, which re-raises it
            self._queue.put(("error", err))

    def get(self) -> Optional[_Block]:
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        return value if kind == "block" else None

    def release(self) -> None:
        self._slots.release()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=30)


class ShuffleBuffer:
    """Iterator of shuffled batches drawn from a :class:`ChunkStream` (see the module docstring).

    Args:
        stream: the rows to serve.
        capacity: rows per block (rounded up to a multiple of ``batch_size``).
        batch_size: rows per batch.
        seed: seed of the block permutations.
        shuffle: False serves rows in stream order (no permutation).
        device: where blocks are stored and batches returned (default: where chunks come from).
        background: produce the next block in a background thread.
        out_dtype: dtype of the activation columns in the batches.
        float_columns: how many leading columns hold activations (one per hook of the stream).

    Yields tuples of tensors, one per stream column; the first is ``[batch_size, d_in]``.
    """

    def __init__(self, stream: ChunkStream, capacity: int, batch_size: int, seed: int = 0, *,
                 shuffle: bool = True, device: Optional[Union[str, torch.device]] = None,
                 background: bool = True, out_dtype: Optional[torch.dtype] = torch.float32,
                 float_columns: int = 1) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} (buffer_tokens) must be a positive integer")
        self.stream = stream
        self.batch_size = batch_size
        self.capacity = -(-capacity // batch_size) * batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.device = torch.device(device) if device is not None else None
        self.background = background
        self.out_dtype = out_dtype
        self.float_columns = float_columns

        self._block_index = 0
        self._block_start: Optional[Dict[str, Any]] = {"stream": stream.position(), "skip": 0}
        self._batches_done = 0
        self._current: Optional[_Block] = None
        self._order: Optional[Tensor] = None
        self._producer: Optional[Iterator[_Block]] = None
        self._background: Optional[_Background] = None
        self._warned_tail = False

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        """JSON-safe position: block index, block start, batches served from it, and the settings
        that must not change on resume."""
        return {"block": self._block_index, "start": self._block_start, "batches_done": self._batches_done,
                "capacity": self.capacity, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the settings must match this buffer's."""
        for key in ("capacity", "batch_size", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved buffer has {key}={state[key]!r} but this one "
                                 f"has {key}={getattr(self, key)!r}; use the settings of the saved run")
        self.close()
        self._block_index = int(state["block"])
        self._block_start = state["start"]
        self._batches_done = int(state["batches_done"])
        self._current = None
        self._order = None

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> "ShuffleBuffer":
        return self

    def __next__(self) -> Columns:
        while self._current is None:
            if self._block_start is None:
                raise StopIteration
            block = self._next_block()
            if block is None or block.n < self.batch_size:
                self._finish(dropped=block.n if block is not None else 0)
                raise StopIteration
            self._current = block
            self._order = self._permutation(block)
            if self._batches_done >= block.n // self.batch_size:  # resumed at a block's end
                self._advance()
        block, order = self._current, self._order
        assert block is not None and order is not None and block.columns is not None
        lo = self._batches_done * self.batch_size
        idx = order[lo:lo + self.batch_size]
        batch = tuple(c.index_select(0, idx) for c in block.columns)
        if self.out_dtype is not None:
            n = self.float_columns
            batch = tuple(c.to(self.out_dtype) for c in batch[:n]) + batch[n:]
        self._batches_done += 1
        if self._batches_done == block.n // self.batch_size:
            self._advance()
        return batch

    def _permutation(self, block: _Block) -> Tensor:
        device = block.columns[0].device if block.columns is not None else torch.device("cpu")
        if not self.shuffle:
            return torch.arange(block.n, device=device)
        g = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + block.index)
        return torch.randperm(block.n, generator=g).to(device)

    def _advance(self) -> None:
        block = self._current
        assert block is not None
        tail = block.n % self.batch_size
        if block.next_start is None and tail:
            self._log_tail(tail)
        self._block_index += 1
        self._block_start = block.next_start
        self._batches_done = 0
        self._current = None
        self._order = None
        if self._background is not None:
            self._background.release()

    def _finish(self, dropped: int) -> None:
        if dropped:
            self._log_tail(dropped)
        self._block_start = None
        self._batches_done = 0
        self.close()

    def _log_tail(self, rows: int) -> None:
        if not self._warned_tail:
            logger.info("end of the activation stream: the last %d rows (< batch_size=%d) are dropped",
                        rows, self.batch_size)
            self._warned_tail = True

    def _next_block(self) -> Optional[_Block]:
        if self._producer is None and self._background is None:
            assert self._block_start is not None
            if self.background:
                stop = threading.Event()
                blocks = _blocks(self.stream, self.capacity, self.device, self._block_start,
                                 self._block_index, stop)
                self._background = _Background(blocks, stop)
            else:
                self._producer = _blocks(self.stream, self.capacity, self.device, self._block_start,
                                         self._block_index)
        if self._background is not None:
            try:
                return self._background.get()
            except BaseException:
                self.close()  # the producer thread has ended; the next call restarts it
                raise
        assert self._producer is not None
        with torch.no_grad():
            return next(self._producer, None)

    def close(self) -> None:
        """Stop the background producer (it restarts on the next batch)."""
        if self._background is not None:
            self._background.close()
            self._background = None
        self._producer = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
