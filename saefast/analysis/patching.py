"""Feature patching inside a model forward pass, and the ablation study.

Patching encodes the activation at the SAE's hook, edits chosen features and writes back

    x' = x + (decode(edited codes) - decode(codes))           (keep_error=True, the default)
    x' = decode(edited codes)                                  (keep_error=False)

at the patched positions, so with the error term kept only the edited features' contributions
change (``sum_f (a'_f - a_f) * W_dec[f]``), and with it dropped the activation is replaced by the
SAE's edited reconstruction. A transcoder encodes its input hook and writes the same difference
(or its edited output) at its target hook. A crosscoder reads layers after some of those it
writes, so its features are patched by :func:`ablation_study`, which encodes the clean
activations first, and not by :func:`patch_features`. Edits: ``ablate`` (a_f -> 0), ``scale`` (a_f -> factor * a_f, e.g.
amplify), ``set_values`` (a_f -> value on every patched position, also where f did not fire).

* :func:`edit_acts`: the edit on a :class:`~saefast.ops.SparseActs` (sparse in, sparse out).
* :func:`feature_patch_hook`: a transformer-lens hook function doing the patch.
* :func:`patch_features`: a context manager that installs it on a model (``with
  patch_features(model, sae, ablate=[12]): logits = model(tokens)``).
* :func:`ablation_study`: CE loss clean / SAE spliced / zero-ablated and CE loss recovered
  (:func:`saefast.evals.model_evals.spliced_ce_eval`), plus the CE increase when each of a list
  of features is ablated.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Collection, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops import SparseActs
from ..selection import csr_offsets
from ..utils import eval_mode

__all__ = ["edit_acts", "feature_patch_hook", "patch_features", "ablation_study"]

Positions = Optional[Union[int, Sequence[int], Tensor]]


def _feature_ids(name: str, features: Any, d_sae: int) -> List[int]:
    out = []
    for f in features:
        if isinstance(f, Tensor) and f.numel() == 1:
            f = int(f)
        if isinstance(f, bool) or not isinstance(f, int):
            raise TypeError(f"{name} must hold int feature ids, got {type(f).__name__}")
        if not 0 <= f < d_sae:
            raise ValueError(f"{name}: feature {f} is not in [0, d_sae={d_sae})")
        out.append(f)
    return out


def _check_edits(d_sae: int, ablate: Optional[Collection[int]], scale: Optional[Mapping[int, float]],
                 set_values: Optional[Mapping[int, float]]) -> tuple:
    ablate_ids = _feature_ids("ablate", ablate or (), d_sae)
    for name, mapping in (("scale", scale), ("set_values", set_values)):
        if mapping is not None and not isinstance(mapping, Mapping):
            raise TypeError(f"{name} must be a dict {{feature id: value}}, got {type(mapping).__name__}")
    scale = dict(zip(_feature_ids("scale", (scale or {}).keys(), d_sae), (scale or {}).values()))
    set_values = dict(zip(_feature_ids("set_values", (set_values or {}).keys(), d_sae), (set_values or {}).values()))
    for name, mapping in (("scale", scale), ("set_values", set_values)):
        for f, v in mapping.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}[{f}] must be a number, got {type(v).__name__}")
    seen: Dict[int, str] = {}
    for name, ids in (("ablate", ablate_ids), ("scale", list(scale)), ("set_values", list(set_values))):
        for f in ids:
            if f in seen and seen[f] != name:
                raise ValueError(f"feature {f} is in both {seen[f]} and {name}; give each feature one edit")
            seen[f] = name
    if not seen:
        raise ValueError("nothing to patch: give ablate=[...], scale={feature: factor} or set_values={feature: value}")
    return ablate_ids, scale, set_values


def edit_acts(acts: SparseActs, *, ablate: Optional[Collection[int]] = None,
              scale: Optional[Mapping[int, float]] = None, set_values: Optional[Mapping[int, float]] = None,
              rows: Optional[Tensor] = None) -> SparseActs:
    """``acts`` with features edited on the selected rows (bool ``rows`` [B]; None: every row).

    ablate: features set to 0 (their entries are removed); scale: {feature: factor};
    set_values: {feature: value}, on every selected row whether or not the feature fired there
    (an entry is added where it did not). Entries stay sorted by (row, latent); values keep their
    dtype and stay differentiable.
    """
    if not isinstance(acts, SparseActs):
        raise TypeError(f"acts must be a SparseActs, got {type(acts).__name__}")
    ablate_ids, scale, set_values = _check_edits(acts.d_sae, ablate, scale, set_values)
    device = acts.values.device
    B, d_sae = acts.n_rows, acts.d_sae
    if rows is None:
        rows = torch.ones(B, dtype=torch.bool, device=device)
    elif not isinstance(rows, Tensor) or rows.dtype != torch.bool or rows.shape != (B,):
        raise ValueError(f"rows must be a bool tensor [{B}] (one flag per row), got "
                         f"{tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__}")
    rows = rows.to(device)
    idx = acts.indices.long()
    selected = rows[acts.row_ids.long()]
    factor = torch.ones(d_sae, dtype=acts.values.dtype, device=device)
    for f, v in scale.items():
        factor[f] = v
    drop = torch.zeros(d_sae, dtype=torch.bool, device=device)
    drop[ablate_ids + list(set_values)] = True
    values = torch.where(selected, acts.values * factor[idx], acts.values)
    keep = ~(selected & drop[idx])
    values, idx, row_ids = values[keep], idx[keep], acts.row_ids.long()[keep]
    if set_values:
        sel_rows = torch.nonzero(rows).flatten()
        feats = torch.tensor(list(set_values), dtype=torch.long, device=device)
        new_vals = torch.tensor(list(set_values.values()), dtype=acts.values.dtype, device=device)
        values = torch.cat([values, new_vals.repeat(sel_rows.numel())])
        idx = torch.cat([idx, feats.repeat(sel_rows.numel())])
        row_ids = torch.cat([row_ids, sel_rows.repeat_interleave(feats.numel())])
        order = torch.argsort(row_ids * d_sae + idx)
        values, idx, row_ids = values[order], idx[order], row_ids[order]
    return SparseActs(values, idx.to(acts.indices.dtype), row_ids.to(acts.row_ids.dtype), csr_offsets(row_ids, B),
                      acts.kept_min, d_sae)


def _position_mask(positions: Positions, batch: int, seq: int, device: torch.device) -> Tensor:
    """bool [batch, seq] of the positions to patch."""
    if positions is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.shape == (seq,):
            return positions.to(device)[None, :].expand(batch, seq)
        if positions.shape == (batch, seq):
            return positions.to(device)
        raise ValueError(f"a bool positions mask must be [seq={seq}] or [batch={batch}, seq={seq}], got "
                         f"{tuple(positions.shape)}")
    ids = torch.as_tensor([positions] if isinstance(positions, int) else positions).reshape(-1).long()
    if ids.numel() and (int(ids.min()) < -seq or int(ids.max()) >= seq):
        raise ValueError(f"positions {ids.tolist()} are outside the sequence of length {seq}")
    mask = torch.zeros(seq, dtype=torch.bool)
    mask[ids] = True
    return mask.to(device)[None, :].expand(batch, seq)


def feature_patch_hook(sae: nn.Module, *, ablate: Optional[Collection[int]] = None,
                       scale: Optional[Mapping[int, float]] = None,
                       set_values: Optional[Mapping[int, float]] = None, positions: Positions = None,
                       keep_error: bool = True) -> Callable[..., Tensor]:
    """A transformer-lens forward hook ``fn(activation, hook) -> activation`` patching features of
    an SAE that reads and writes the hooked activation (a transcoder: :func:`patch_features`).

    positions: which sequence positions to patch: None (all), an int or a list of ints, or a bool
    mask [seq] or [batch, seq]. The SAE encodes in its current mode (use eval mode; see
    :func:`patch_features`, which sets it). Per-head activations [batch, seq, heads, d_head] are
    flattened for the SAE and reshaped back.
    """
    if not hasattr(sae, "encode_sparse") or not hasattr(sae, "decode_sparse"):
        raise TypeError(f"sae must be a saefast SAE (encode_sparse/decode_sparse), got {type(sae).__name__}")
    _check_edits(sae.d_sae, ablate, scale, set_values)

    def hook_fn(act: Tensor, hook: Any = None) -> Tensor:
        return _patch(sae, act, act, ablate, scale, set_values, positions, keep_error)

    return hook_fn


def _patch(sae: nn.Module, source: Tensor, act: Tensor, ablate: Any, scale: Any, set_values: Any,
           positions: Positions, keep_error: bool) -> Tensor:
    """``act`` [batch, seq, ...] (what the SAE writes) with the features of ``source`` (what it
    reads, same batch and seq) edited at the patched positions."""
    param = next(sae.parameters())
    for name, t in (("source", source), ("act", act)):
        if t.dim() < 3:
            raise ValueError(f"the hooked activation has shape {tuple(t.shape)}, not [batch, seq, ...]")
    batch, seq = act.shape[:2]
    x = source.reshape(batch * seq, -1)
    flat = act.reshape(batch * seq, -1)
    if x.shape[1] != sae.d_in:
        raise ValueError(f"the hooked activation has width {x.shape[1]} but the SAE has d_in={sae.d_in}")
    if flat.shape[1] != sae.d_out:
        raise ValueError(f"the target activation has width {flat.shape[1]} but the SAE has d_out={sae.d_out}")
    mask = _position_mask(positions, batch, seq, act.device).reshape(-1)
    x = x.to(device=param.device, dtype=param.dtype).contiguous()
    codes = sae.encode_sparse(x)
    edited = edit_acts(codes, ablate=ablate, scale=scale, set_values=set_values, rows=mask.to(param.device))
    new = sae.decode_sparse(edited, x)
    if keep_error:
        new = flat.to(new) + (new - sae.decode_sparse(codes, x))
    new = new.to(device=act.device, dtype=act.dtype)
    out = torch.where(mask[:, None], new, flat)
    return out.reshape(act.shape)


@contextlib.contextmanager
def patch_features(model: nn.Module, sae: nn.Module, hook_name: Optional[str] = None, *,
                   ablate: Optional[Collection[int]] = None, scale: Optional[Mapping[int, float]] = None,
                   set_values: Optional[Mapping[int, float]] = None, positions: Positions = None,
                   keep_error: bool = True) -> Iterator[nn.Module]:
    """Inside the block, every forward pass of ``model`` has the features patched at ``hook_name``
    (default: ``sae.config.hook_spec``; a transcoder reads there and writes its target hook
    ``sae.config.hook_spec_out``); see the module docstring and :func:`feature_patch_hook`.

    The SAE is in eval mode inside the block (BatchTopK then encodes with its learned threshold)
    and the model's saefast lock is held, so a background activation source does not run the
    model with the patch installed. The hook is removed and the SAE's mode restored on exit.
    Yields the model.
    """
    from ..data.models import check_hook, hook_layer, model_lock
    from ..evals.model_evals import sae_hooks

    reads, writes = sae_hooks(sae, hook_name)
    for hook in reads + writes:
        check_hook(model, hook)
    if len(reads) > 1:
        raise ValueError("a crosscoder reads layers that come after some of those it writes, so its features cannot "
                         "be patched inside one forward pass; ablation_study encodes the clean activations first")
    if reads == writes:
        fwd_hooks = [(reads[0], feature_patch_hook(sae, ablate=ablate, scale=scale, set_values=set_values,
                                                   positions=positions, keep_error=keep_error))]
    else:
        _check_edits(sae.d_sae, ablate, scale, set_values)
        here, there = hook_layer(reads[0]), hook_layer(writes[0])
        if here is not None and there is not None and there < here:
            raise ValueError(f"the transcoder writes {writes[0]!r}, which comes before the hook it reads "
                             f"({reads[0]!r}); it cannot be patched inside one forward pass")
        seen: List[Tensor] = []

        def read(act: Tensor, hook: Any = None) -> Tensor:
            seen[:] = [act]
            return act

        def write(act: Tensor, hook: Any = None) -> Tensor:
            if not seen:
                raise ValueError(f"{writes[0]!r} ran before {reads[0]!r}: the transcoder's input is not there yet")
            return _patch(sae, seen[0], act, ablate, scale, set_values, positions, keep_error)

        fwd_hooks = [(reads[0], read), (writes[0], write)]
    with eval_mode(sae), model_lock(model), model.hooks(fwd_hooks=fwd_hooks):
        yield model


def _ce_sum(logits: Tensor, tokens: Tensor, real: Tensor) -> float:
    """Sum of next-token CE over the predictions whose two tokens are both real (not padding)."""
    logp = logits[:, :-1].float().log_softmax(-1)
    ce = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return float((ce * (real[:, :-1] & real[:, 1:]).float()).sum())


@torch.no_grad()
def ablation_study(model: nn.Module, sae: nn.Module, tokens: Tensor,
                   hook_name: Optional[Union[str, Sequence[str]]] = None, *, target_hook: Optional[str] = None,
                   features: Sequence[int] = (), batch_size: int = 8,
                   exclude_token_ids: Optional[Collection[int]] = None,
                   pad_token_id: Optional[int] = None) -> Dict[str, Any]:
    """How much of the model's loss the SAE keeps, and what each feature is worth.

    Each window's clean activations at the hook(s) the SAE reads are encoded once; ablating a
    feature then adds ``decode(codes without f) - decode(codes)`` at the hook(s) it writes (a
    transcoder: its target hook; a crosscoder: every layer).

    Args:
        model: transformer-lens model; sae: saefast SAE; tokens: [N, seq] token ids.
        hook_name, target_hook: where the SAE reads and writes (default: its own hooks, see
            :func:`saefast.evals.model_evals.sae_hooks`).
        features: features to ablate one at a time (with the error term kept).
        batch_size: windows per forward pass.
        exclude_token_ids: tokens never patched (e.g. {BOS}); pad_token_id: padding, left out of
            every average.

    Returns ``{"spliced": spliced_ce_eval(...)}`` (ce_clean, ce_spliced, ce_zero_ablation,
    ce_loss_recovered, kl, ...) and ``"features"``: one ``{"feature", "ce", "ce_delta"}`` per
    feature, the CE loss with that feature ablated and its increase over the clean CE loss.
    """
    from ..data.models import check_hook, model_device, model_lock
    from ..evals.model_evals import output_widths, sae_hooks, sae_input_rows, splice_hooks, spliced_ce_eval

    reads, writes = sae_hooks(sae, hook_name, target_hook)
    for hook in dict.fromkeys(reads + writes):
        check_hook(model, hook)
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError("tokens must be a [n_windows, seq >= 2] tensor of token ids")
    features = _feature_ids("features", features, sae.d_sae)
    spliced = spliced_ce_eval(model, sae, tokens, reads if len(reads) > 1 else reads[0], target_hook=target_hook,
                              batch_size=batch_size, exclude_token_ids=exclude_token_ids, pad_token_id=pad_token_id)
    device = model_device(model)
    param = next(sae.parameters())
    excluded = torch.tensor(sorted(exclude_token_ids or ()), dtype=torch.long, device=device)
    sums = [0.0] * len(features)
    n_pred = 0
    for batch in (tokens.split(batch_size) if features else ()):
        batch = batch.to(device)
        real = torch.ones_like(batch, dtype=torch.bool) if pad_token_id is None else batch != pad_token_id
        patchable = real & ~torch.isin(batch, excluded) if excluded.numel() else real
        with eval_mode(sae), model_lock(model):
            _, cache = model.run_with_cache(batch, names_filter=list(dict.fromkeys(reads)))
            widths = output_widths(sae, reads, writes, cache)
            x = sae_input_rows(cache, reads)[patchable].to(device=param.device, dtype=param.dtype).contiguous()
            del cache
            codes = sae.encode_sparse(x)
            base = sae.decode_sparse(codes, x)
            for i, f in enumerate(features):
                delta = sae.decode_sparse(edit_acts(codes, ablate=[f]), x) - base
                hooks = splice_hooks(writes, widths, delta.to(device), patchable, add=True)
                sums[i] += _ce_sum(model.run_with_hooks(batch, fwd_hooks=hooks), batch, real)
        n_pred += int((real[:, :-1] & real[:, 1:]).sum())
    per_feature = [{"feature": f, "ce": s / max(n_pred, 1), "ce_delta": s / max(n_pred, 1) - spliced["ce_clean"]}
                   for f, s in zip(features, sums)]
    return {"spliced": spliced, "features": per_feature}
