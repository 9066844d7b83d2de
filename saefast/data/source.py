"""Activations from a transformer-lens model run on token windows, shuffled across sequences.

:class:`ModelActivationSource` reads ``model_batch_size`` windows at a time from a
:class:`~saefast.data.tokens.TokenWindows`, runs the model up to the hook only (names filter +
``stop_at_layer``), drops padding and BOS positions, and feeds the remaining token activations to
a :class:`~saefast.data.buffer.ShuffleBuffer`, which serves shuffled fp32 batches
``[batch_size, d_in]``. Given several hooks it reads them all in the same model pass (which
stops after the deepest hook's block) and serves ``{hook: [batch_size, d_hook]}``, every hook's
rows coming from the same tokens (see :mod:`saefast.data.views` for turning those into one SAE's,
a transcoder's or a crosscoder's batches). It follows the activation-source protocol of the trainer: an iterator of
batches, ``.d_in``, and ``state_dict()/load_state_dict()`` (JSON-safe; it holds the dataset
position, so a resumed run gets exactly the batches an uninterrupted one would).

Exact resume re-runs the model on the windows of one buffer block; on a GPU the model's own
kernels may then differ from the first run in the last bits, on a CPU results are identical.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .buffer import ShuffleBuffer
from .models import (_flatten_per_token, check_context_size, check_d_in, check_hook, hook_d_in,
                     model_device, model_lock, stop_layer_for)
from .tokens import TokenWindows

__all__ = ["ActivationBatch", "ActivationPair", "ModelActivationSource", "estimate_norm_scaling_factor",
           "split_pair"]


class ActivationBatch(NamedTuple):
    """A batch with where each row came from (``with_tokens=True``).

    acts [B, d_in] fp32; token_ids [B] int64; window_ids [B] int64 (index of the window in the
    order the windows were read); positions [B] int64 (position inside that window).
    """

    acts: Tensor
    token_ids: Tensor
    window_ids: Tensor
    positions: Tensor


class ActivationPair(NamedTuple):
    """A transcoder's batch: its input rows and, row for row (the same tokens), its target rows.

    x [B, d_in] fp32 (the input hook); target [B, d_out] fp32 (the target hook).
    """

    x: Tensor
    target: Tensor


def split_pair(batch: Any) -> Tuple[Tensor, Optional[Tensor]]:
    """(input rows, target rows or None) of a batch from any activation source: a tensor, an
    :class:`ActivationPair` or an :class:`ActivationBatch`."""
    if isinstance(batch, ActivationPair):
        return batch.x, batch.target
    if isinstance(batch, ActivationBatch):
        return batch.acts, None
    return batch, None


class _ModelChunks:
    """Chunk stream for the buffer: kept-token activations of ``model_batch_size`` windows."""

    def __init__(self, model: nn.Module, hook_names: List[str], windows: TokenWindows, model_batch_size: int,
                 with_tokens: bool) -> None:
        self.model, self.hook_names, self.windows = model, hook_names, windows
        self.model_batch_size, self.with_tokens = model_batch_size, with_tokens
        self.stop_at_layer = stop_layer_for(hook_names)
        self.d_vocab = int(getattr(model.cfg, "d_vocab", 0) or 0)

    def position(self) -> Dict[str, int]:
        return self.windows.state_dict()

    def seek(self, position: Dict[str, int]) -> None:
        self.windows.load_state_dict(position)

    def next_chunk(self) -> Optional[tuple]:
        first_window = self.windows.windows_yielded
        rows, lengths = [], []
        for _ in range(self.model_batch_size):
            try:
                tokens, n_real = self.windows.next_with_length()
            except StopIteration:
                break
            rows.append(tokens)
            lengths.append(n_real)
        if not rows:
            return None
        tokens = torch.stack(rows)
        if self.d_vocab and int(tokens.max()) >= self.d_vocab:
            raise ValueError(f"token id {int(tokens.max())} is outside the model's vocabulary of "
                             f"{self.d_vocab}; the tokenizer does not match the model")
        device = model_device(self.model)
        tokens = tokens.to(device)
        with torch.no_grad(), model_lock(self.model):
            _, cache = self.model.run_with_cache(tokens, names_filter=list(self.hook_names),
                                                 stop_at_layer=self.stop_at_layer)
        positions = torch.arange(tokens.shape[1], device=device)
        keep = positions[None, :] < torch.tensor(lengths, device=device)[:, None]
        if self.windows.bos_token_id is not None:
            keep &= tokens != self.windows.bos_token_id
        kept = tuple(_flatten_per_token(cache[h], h, tokens.shape[1])[keep] for h in self.hook_names)
        if not self.with_tokens:
            return kept
        window_ids = torch.arange(first_window, first_window + len(rows), device=device)
        return kept + (tokens[keep], window_ids[:, None].expand_as(tokens)[keep],
                       positions[None, :].expand_as(tokens)[keep])


class ModelActivationSource:
    """Shuffled fp32 batches ``[batch_size, d_in]`` of a model's activations at ``hook_name``, or
    ``{hook: [batch_size, d_hook]}`` for several hooks read in one model pass.

    Args:
        model: a transformer-lens model (HookedTransformer or TransformerBridge), left unchanged.
        hook_name: e.g. ``"blocks.8.hook_resid_pre"``, or a list of distinct hooks (the model
            then runs up to the deepest one's block, once per batch of windows).
        windows: the token windows to run the model on.
        batch_size: rows per batch served.
        model_batch_size: windows per model forward pass.
        buffer_tokens: rows per shuffle block (mixes ``buffer_tokens / context_size`` sequences or more).
        seed: seed of the shuffling.
        device: where batches are returned (default: the model's device).
        d_in: when given, checked against the hook's width before any work (one hook only).
        background: run the model in a background thread while batches are consumed.
        with_tokens: yield :class:`ActivationBatch` (activations plus their token ids and
            positions) instead of bare tensors (one hook only).

    Raises ValueError before any work for an unknown hook (listing valid names), a ``d_in`` that
    does not match the hook, or a context size larger than the model's. ``d_ins`` maps each hook
    to its width; ``d_in`` is the width of a single hook (None with several).
    """

    def __init__(self, model: nn.Module, hook_name: Union[str, Sequence[str]], windows: TokenWindows,
                 batch_size: int, model_batch_size: int = 8, buffer_tokens: int = 2 ** 16, seed: int = 0,
                 device: Optional[Union[str, torch.device]] = None, *, d_in: Optional[int] = None,
                 background: bool = True, with_tokens: bool = False) -> None:
        hooks = [hook_name] if isinstance(hook_name, str) else list(hook_name)
        if not hooks or len(set(hooks)) != len(hooks):
            raise ValueError(f"hook_name={hook_name!r} must be a hook or a list of distinct hooks")
        for hook in hooks:
            check_hook(model, hook)
        if len(hooks) > 1 and (with_tokens or d_in is not None):
            raise ValueError("with_tokens and d_in are for a source reading one hook; this one reads "
                             f"{len(hooks)}")
        if not isinstance(windows, TokenWindows):
            raise TypeError(f"windows must be a saefast.data.tokens.TokenWindows, got {type(windows).__name__}")
        check_context_size(model, windows.context_size)
        if isinstance(model_batch_size, bool) or not isinstance(model_batch_size, int) or model_batch_size < 1:
            raise ValueError(f"model_batch_size={model_batch_size!r} must be a positive integer")
        if d_in is not None:
            check_d_in(model, hooks[0], d_in)
        self.d_ins: Dict[str, int] = {h: hook_d_in(model, h) for h in hooks}
        self.d_in: Optional[int] = self.d_ins[hooks[0]] if len(hooks) == 1 else None
        self.model = model
        self.hook_names = hooks
        self.hook_name = hook_name if isinstance(hook_name, str) else hooks
        self.windows = windows
        self.batch_size = batch_size
        self.with_tokens = with_tokens
        self._chunks = _ModelChunks(model, hooks, windows, model_batch_size, with_tokens)
        self.buffer = ShuffleBuffer(self._chunks, buffer_tokens, batch_size, seed,
                                    device=device if device is not None else model_device(model),
                                    background=background, float_columns=len(hooks))
        self._fresh = True

    def __iter__(self) -> "ModelActivationSource":
        return self

    def __next__(self) -> Union[Tensor, ActivationBatch, Dict[str, Tensor]]:
        try:
            batch = next(self.buffer)
        except StopIteration:
            if self._fresh:
                raise ValueError(f"the dataset gave fewer than batch_size={self.batch_size} tokens after "
                                 "dropping padding and BOS; it is empty or too small") from None
            raise
        self._fresh = False
        if self.with_tokens:
            return ActivationBatch(*batch)
        if len(self.hook_names) > 1:
            return dict(zip(self.hook_names, batch))
        return batch[0]

    @property
    def _widths(self) -> Any:
        """What a saved state records of the width: d_in, or {hook: width} for several hooks."""
        return self.d_in if self.d_in is not None else self.d_ins

    def state_dict(self) -> Dict[str, Any]:
        """JSON-safe: hook, d_in and the buffer position (which holds the dataset position)."""
        return {"kind": "model", "hook_name": self.hook_name, "d_in": self._widths,
                "context_size": self.windows.context_size, "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state saved with another hook or width."""
        if state.get("kind") != "model":
            raise ValueError(f"cannot resume a ModelActivationSource from a {state.get('kind')!r} source state")
        for key, mine in (("hook_name", self.hook_name), ("d_in", self._widths),
                          ("context_size", self.windows.context_size)):
            if state.get(key) != mine:
                raise ValueError(f"cannot resume: the saved source has {key}={state.get(key)!r} but this one "
                                 f"has {key}={mine!r}; use the settings of the saved run")
        self.buffer.load_state_dict(state["buffer"])
        self._fresh = False

    def close(self) -> None:
        """Stop the background producer thread."""
        self.buffer.close()


def estimate_norm_scaling_factor(batches: Iterable[Tensor], n_batches: int) -> float:
    """``sqrt(d_in / mean ||x||^2)`` over ``n_batches`` batches: multiplying activations by it makes
    their mean squared norm ``d_in`` (the dataset-wide normalisation; fold it into the SAE with
    ``sae.fold_input_scale`` when saving). Takes batches from ``batches``, so use a separate source."""
    if n_batches < 1:
        raise ValueError(f"n_batches={n_batches} must be >= 1")
    total, count, d_in = 0.0, 0, None
    iterator = iter(batches)
    for _ in range(n_batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        x = batch.acts if isinstance(batch, ActivationBatch) else batch
        d_in = x.shape[-1]
        total += float(x.float().pow(2).sum())
        count += x.shape[0]
    if count == 0 or d_in is None:
        raise ValueError("no batches to estimate the normalisation factor from; the source is empty")
    if total == 0.0:
        raise ValueError("every activation is zero; the normalisation factor is undefined")
    return (d_in * count / total) ** 0.5
