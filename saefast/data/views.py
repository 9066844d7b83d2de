"""One activation source read by several consumers in lockstep: each batch is drawn once.

A source reading several hooks in one model pass (``ModelActivationSource(model, [hook_a,
hook_b], ...)``, or a cache holding several hooks) yields ``{hook: [B, d] tensor}`` per batch, the
rows of every hook coming from the same tokens. :class:`SharedSource` hands each batch to several
:class:`SourceView`\\ s, and each view turns it into what its consumer trains on:

* :func:`pick_hook` -> ``[B, d]`` (an SAE on one hook),
* :func:`pick_pair` -> :class:`~saefast.data.source.ActivationPair` (a transcoder: input hook,
  target hook),
* :func:`pick_concat` -> ``[B, sum d]`` (a crosscoder: the hooks concatenated).

A view is itself an activation source (iterator, ``.d_in``, ``state_dict()/load_state_dict()``),
so a trainer cannot tell it from a plain one. The first view to ask for batch n draws it from the
source and queues it for the others; consumers that take turns (one batch each) keep at most one
batch queued per view. ``view.state_dict()`` is the source's state right after the batch the view
last returned (a snapshot taken when that batch was drawn), so each consumer's checkpoint
resumes exactly where that consumer stopped; ``load_state_dict`` rewinds the shared source and
empties every queue.
"""
from __future__ import annotations

import copy
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .source import ActivationPair

__all__ = ["SharedSource", "SourceView", "pick_hook", "pick_pair", "pick_concat"]

Pick = Callable[[Any], Any]


def _check_hooks(batch: Any, hooks: Sequence[str]) -> Dict[str, Tensor]:
    if not isinstance(batch, dict):
        raise TypeError(f"the shared source yielded {type(batch).__name__}; a view that picks hooks needs a source "
                        "reading several hooks, which yields {hook: tensor}")
    missing = [h for h in hooks if h not in batch]
    if missing:
        raise KeyError(f"the source does not read hook(s) {missing}; it reads {list(batch)}")
    return batch


def pick_hook(hook: str) -> Pick:
    """A view's pick: the ``[B, d]`` rows of one hook."""
    return lambda batch: _check_hooks(batch, [hook])[hook]


def pick_pair(input_hook: str, target_hook: str) -> Pick:
    """A view's pick: ``ActivationPair(x, target)`` from an input hook and a target hook."""
    def pick(batch: Any) -> ActivationPair:
        b = _check_hooks(batch, [input_hook, target_hook])
        return ActivationPair(b[input_hook], b[target_hook])
    return pick


def pick_concat(hooks: Sequence[str]) -> Pick:
    """A view's pick: the hooks' rows concatenated along the last axis, ``[B, sum d]``."""
    hooks = list(hooks)
    return lambda batch: torch.cat([_check_hooks(batch, hooks)[h] for h in hooks], dim=-1)


class SharedSource:
    """Draws batches from ``source`` once and queues them for every view (see the module
    docstring). ``source`` is any activation source with ``state_dict()/load_state_dict()``."""

    def __init__(self, source: Any) -> None:
        for name in ("state_dict", "load_state_dict"):
            if not callable(getattr(source, name, None)):
                raise TypeError(f"source must follow the activation-source protocol (missing {name}())")
        self.source = source
        self._views: List["SourceView"] = []
        self._start = copy.deepcopy(source.state_dict())
        self._iter = iter(source)

    def view(self, pick: Pick, d_in: int, d_out: Optional[int] = None, name: Optional[str] = None) -> "SourceView":
        """A new consumer: ``pick(batch)`` is what it gets; ``d_in`` (and ``d_out`` for pairs)
        its widths. Views created after batches were drawn start at the source's position then."""
        v = SourceView(self, pick, d_in, d_out, name, copy.deepcopy(self._start))
        self._views.append(v)
        return v

    def _draw(self) -> None:
        batch = next(self._iter)
        state = copy.deepcopy(self.source.state_dict())
        self._start = state
        for v in self._views:
            v._queue.append((batch, state))

    def _rewind(self, state: Any) -> None:
        self.source.load_state_dict(copy.deepcopy(state))
        self._iter = iter(self.source)
        self._start = copy.deepcopy(state)
        for v in self._views:
            v._queue.clear()
            v._state = copy.deepcopy(state)

    def close(self) -> None:
        if hasattr(self.source, "close"):
            self.source.close()


class SourceView:
    """One consumer's activation source over a :class:`SharedSource` (build it with
    :meth:`SharedSource.view`). Attributes it does not have (``true_features``, ``hook_names``,
    ...) are the shared source's."""

    def __init__(self, shared: SharedSource, pick: Pick, d_in: int, d_out: Optional[int], name: Optional[str],
                 state: Any) -> None:
        self._shared, self._pick = shared, pick
        self.d_in, self.d_out, self.name = d_in, d_out, name
        self._queue: Deque[Tuple[Any, Any]] = deque()
        self._state = state

    def __iter__(self) -> "SourceView":
        return self

    def __next__(self) -> Any:
        if not self._queue:
            self._shared._draw()
        batch, state = self._queue.popleft()
        self._state = state
        return self._pick(batch)

    def state_dict(self) -> Any:
        """The shared source's state right after the last batch this view returned."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: Any) -> None:
        """Rewind the shared source to ``state``; every view's queue is emptied."""
        self._shared._rewind(state)

    def close(self) -> None:
        self._shared.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._shared.source, name)
