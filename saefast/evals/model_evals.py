"""Model-based SAE evals and end-to-end losses: the SAE spliced into a transformer-lens model.

Splicing replaces the activation at ``hook_name`` by the SAE's reconstruction, through a forward
hook, and runs the rest of the model on it. A transcoder reads its input hook and is spliced in
place of its target hook (``target_hook``, default ``sae.config.hook_spec_out``); a crosscoder
reads its layers' hooks (concatenated) and is spliced in place of every one of them. In every
case the SAE reads the clean activations (:func:`sae_hooks` says which hooks it reads and
writes).

* :func:`spliced_ce_eval` (no gradients): next-token cross-entropy of the clean model, of the model
  with the SAE spliced in, and with the activation zero-ablated; CE loss recovered
  ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (1 = as good as the clean model, 0 = as bad as
  zero ablation); and KL(clean || spliced) of the next-token distributions, averaged per token.
* :func:`e2e_losses` (differentiable): KL(clean || patched) of the logits and the MSE of later-layer
  activations (the "block MSE"), for end-to-end SAE training. Gradients reach the SAE's
  parameters only: the model's parameters are frozen during the forward pass and restored after.

The SAE is called through ``sae.reconstruct`` (saefast SAEs: the sparse path, never a dense
``[tokens, d_sae]`` tensor), else ``sae.decode_sparse(sae.encode_sparse(x))``, else ``sae(x)``
returning ``x_recon`` or ``(x_recon, ...)``. :func:`spliced_ce_eval` puts the SAE in eval mode
while it runs (BatchTopK then encodes with its learned threshold); :func:`e2e_losses` uses the
mode the SAE is in.
``input_scale`` is for an SAE trained on ``x * input_scale`` whose scale is not folded in yet:
the reconstruction is then ``sae(x * input_scale) / input_scale``.

Positions holding a token in ``exclude_token_ids`` (e.g. BOS, which the activation sources drop
from training) keep their clean activation; ``pad_token_id`` positions are also left out of every
average.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Collection, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..data.models import check_hook, hook_layer, model_device, model_lock, stop_layer_for
from ..utils import eval_mode

__all__ = ["sae_reconstruct", "sae_hooks", "sae_input_rows", "splice_hooks", "output_widths", "spliced_ce_eval",
           "e2e_losses"]


def sae_reconstruct(sae: nn.Module, x: Tensor, input_scale: float = 1.0) -> Tensor:
    """The SAE's reconstruction of ``x`` [N, d_in] in ``x``'s dtype (differentiable in the SAE)."""
    param = next(sae.parameters(), None)
    dtype = param.dtype if param is not None else x.dtype
    device = param.device if param is not None else x.device
    inp = x.to(device=device, dtype=dtype)
    if input_scale != 1.0:
        inp = inp * input_scale
    if hasattr(sae, "reconstruct"):
        recon = sae.reconstruct(inp)
    elif hasattr(sae, "encode_sparse") and hasattr(sae, "decode_sparse"):
        recon = sae.decode_sparse(sae.encode_sparse(inp))
    else:
        out = sae(inp)
        recon = out[0] if isinstance(out, (tuple, list)) else out
    if input_scale != 1.0:
        recon = recon / input_scale
    return recon.to(device=x.device, dtype=x.dtype)


def sae_hooks(sae: nn.Module, hook_name: Optional[Union[str, Sequence[str]]] = None,
              target_hook: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """(hooks the SAE reads, hooks it writes), in order.

    An SAE reads and writes ``hook_name`` (default ``sae.config.hook_spec``); a transcoder reads
    it and writes ``target_hook`` (default ``sae.config.hook_spec_out``); a crosscoder reads and
    writes its layers' hooks (``hook_name`` as a list, default ``sae.config.crosscoder_hooks``),
    its input being their activations concatenated.
    """
    c = getattr(sae, "config", None)
    layer_hooks = getattr(c, "crosscoder_hooks", None)
    if isinstance(hook_name, (list, tuple)):
        reads = list(hook_name)
    elif hook_name is not None:
        reads = [hook_name]
    elif layer_hooks:
        reads = list(layer_hooks)
    else:
        reads = [getattr(c, "hook_spec", None)]
    if not reads or any(not isinstance(h, str) for h in reads):
        raise ValueError("the SAE does not name the hook it reads; pass hook_name=")
    if getattr(c, "is_transcoder", False):
        out = target_hook if target_hook is not None else getattr(c, "hook_spec_out", None)
        if out is None:
            raise ValueError("this transcoder does not name the hook it writes; pass target_hook=")
        return reads, [out]
    if target_hook is not None:
        raise ValueError("target_hook= is the hook a transcoder writes; this SAE writes the hook it reads")
    return reads, reads


def _flat(act: Tensor) -> Tensor:
    """[B, S, ...] -> [B, S, d] (per-head activations flattened)."""
    return act.flatten(2) if act.dim() > 3 else act


def sae_input_rows(cache: Any, reads: Sequence[str]) -> Tensor:
    """The SAE's input [B, S, d_in] from a run's cache: the read hooks' activations concatenated."""
    return torch.cat([_flat(cache[h]) for h in reads], dim=-1)


def splice_hooks(writes: Sequence[str], widths: Sequence[int], outputs: Tensor, splice: Tensor,
                 add: bool = False) -> List[Tuple[str, Any]]:
    """Forward hooks that put ``outputs`` [n_splice, sum widths] (split by ``widths``) at the
    spliced positions of ``writes``: in place of the activation, or added to it."""
    hooks = []
    for name, part in zip(writes, outputs.split(list(widths), dim=-1)):
        def fn(act: Tensor, hook: Any = None, part: Tensor = part) -> Tensor:
            flat = _flat(act)
            value = part.to(flat.dtype)
            if add:
                value = flat[splice] + value
            return flat.index_put((splice,), value).view_as(act)
        hooks.append((name, fn))
    return hooks


def output_widths(sae: nn.Module, reads: Sequence[str], writes: Sequence[str], cache: Any) -> List[int]:
    if list(writes) == list(reads):
        return [_flat(cache[h]).shape[-1] for h in reads]
    return [int(sae.d_out)]


def _position_masks(tokens: Tensor, exclude_token_ids: Optional[Collection[int]],
                    pad_token_id: Optional[int]) -> tuple:
    """(splice [B, S]: positions to replace, real [B, S]: positions that count in averages)."""
    real = torch.ones_like(tokens, dtype=torch.bool)
    if pad_token_id is not None:
        real &= tokens != pad_token_id
    splice = real.clone()
    if exclude_token_ids:
        splice &= ~torch.isin(tokens, torch.tensor(sorted(exclude_token_ids), device=tokens.device))
    return splice, real


def _patched(act: Tensor, splice: Tensor, sae: nn.Module, input_scale: float) -> Tensor:
    """``act`` [B, S, ...] with the spliced positions replaced by the SAE reconstruction."""
    flat = act.flatten(2) if act.dim() > 3 else act
    recon = sae_reconstruct(sae, flat[splice], input_scale)
    out = flat.index_put((splice,), recon)
    return out.view_as(act)


def _batches(tokens: Union[Tensor, Iterable[Tensor]], batch_size: int) -> Iterator[Tensor]:
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq] token ids, got shape {tuple(tokens.shape)}")
        yield from tokens.split(batch_size)
        return
    for t in tokens:
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError("tokens must be a [batch, seq] tensor or an iterable of such tensors")
        yield t


def _check_tokens_fit(model: nn.Module, tokens: Tensor) -> None:
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens have {tokens.shape[1]} position(s); next-token losses need at least 2")
    n_ctx = int(model.cfg.n_ctx)
    if tokens.shape[1] > n_ctx:
        raise ValueError(f"tokens have {tokens.shape[1]} positions but the model's context is {n_ctx}")


def _ce_per_token(logits: Tensor, tokens: Tensor) -> Tensor:
    """[B, S-1] next-token cross-entropy (fp32)."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _kl_per_token(clean_logits: Tensor, other_logits: Tensor) -> Tensor:
    """[B, S] KL(clean || other) of the next-token distributions (fp32)."""
    lp = clean_logits.float().log_softmax(-1)
    lq = other_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@torch.no_grad()
def spliced_ce_eval(model: nn.Module, sae: nn.Module, tokens: Union[Tensor, Iterable[Tensor]],
                    hook_name: Optional[Union[str, Sequence[str]]] = None, *, target_hook: Optional[str] = None,
                    batch_size: int = 8, input_scale: float = 1.0,
                    exclude_token_ids: Optional[Collection[int]] = None,
                    pad_token_id: Optional[int] = None) -> Dict[str, float]:
    """CE loss with the SAE spliced in at the hook(s) it writes, versus clean and zero ablation
    of those hooks, and KL.

    Args:
        model: transformer-lens model (left unchanged).
        sae: the SAE (any module, see the module docstring).
        tokens: [N, seq] token ids, or an iterable of [batch, seq] tensors.
        hook_name: where the SAE reads (and, unless it is a transcoder, writes), e.g.
            ``"blocks.8.hook_resid_pre"``; a crosscoder's list of layer hooks. Default: the
            SAE's own (see :func:`sae_hooks`).
        target_hook: where a transcoder writes (default ``sae.config.hook_spec_out``).
        batch_size: sequences per forward pass when ``tokens`` is one tensor.
        input_scale: see the module docstring.
        exclude_token_ids: tokens whose positions keep the clean activation (e.g. {BOS}).
        pad_token_id: padding, excluded from every average.

    Returns a dict of floats: ``ce_clean``, ``ce_spliced``, ``ce_zero_ablation``,
    ``ce_loss_recovered`` (NaN when zero ablation does not change the loss), ``ce_delta``
    (spliced - clean), ``kl`` (mean KL(clean || spliced) per token), ``kl_zero_ablation`` and
    ``n_tokens`` (predictions counted).
    """
    reads, writes = sae_hooks(sae, hook_name, target_hook)
    for hook in dict.fromkeys(reads + writes):
        check_hook(model, hook)
    with eval_mode(sae):
        return _spliced_ce_eval(model, sae, tokens, reads, writes, batch_size, input_scale, exclude_token_ids,
                                pad_token_id)


def _spliced_ce_eval(model: nn.Module, sae: nn.Module, tokens: Union[Tensor, Iterable[Tensor]], reads: List[str],
                     writes: List[str], batch_size: int, input_scale: float,
                     exclude_token_ids: Optional[Collection[int]], pad_token_id: Optional[int]) -> Dict[str, float]:
    device = model_device(model)
    sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero_ablation": 0.0, "kl": 0.0, "kl_zero_ablation": 0.0}
    n_pred = 0
    n_kl = 0
    for batch in _batches(tokens, batch_size):
        batch = batch.to(device)
        _check_tokens_fit(model, batch)
        splice, real = _position_masks(batch, exclude_token_ids, pad_token_id)

        def zero_hook(act: Tensor, hook: Any = None) -> Tensor:
            return act.masked_fill(splice.view(splice.shape + (1,) * (act.dim() - 2)), 0.0)

        with model_lock(model):
            clean, cache = model.run_with_cache(batch, names_filter=list(dict.fromkeys(reads)))
            recon = sae_reconstruct(sae, sae_input_rows(cache, reads)[splice], input_scale)
            fwd_hooks = splice_hooks(writes, output_widths(sae, reads, writes, cache), recon, splice)
            del cache
            spliced = model.run_with_hooks(batch, fwd_hooks=fwd_hooks)
            zero = model.run_with_hooks(batch, fwd_hooks=[(h, zero_hook) for h in writes])
        pred_mask = (real[:, :-1] & real[:, 1:]).float()
        kl_mask = real.float()
        for key, logits in (("ce_clean", clean), ("ce_spliced", spliced), ("ce_zero_ablation", zero)):
            sums[key] += float((_ce_per_token(logits, batch) * pred_mask).sum())
        sums["kl"] += float((_kl_per_token(clean, spliced) * kl_mask).sum())
        sums["kl_zero_ablation"] += float((_kl_per_token(clean, zero) * kl_mask).sum())
        n_pred += int(pred_mask.sum())
        n_kl += int(kl_mask.sum())
    if n_pred == 0:
        raise ValueError("no next-token predictions to evaluate: tokens are empty or all padding")
    out = {k: v / (n_pred if k.startswith("ce") else n_kl) for k, v in sums.items()}
    gap = out["ce_zero_ablation"] - out["ce_clean"]
    recovered = (out["ce_zero_ablation"] - out["ce_spliced"]) / gap if abs(gap) > 1e-12 else math.nan
    out["ce_loss_recovered"] = recovered
    out["ce_delta"] = out["ce_spliced"] - out["ce_clean"]
    out["n_tokens"] = float(n_pred)
    return out


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Autograd records no path into the model's parameters inside this block."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def e2e_losses(model: nn.Module, sae: nn.Module, tokens: Tensor, hook_name: str, kl: bool = True,
               downstream_hooks: Sequence[str] = (), *, input_scale: float = 1.0,
               exclude_token_ids: Optional[Collection[int]] = None,
               pad_token_id: Optional[int] = None) -> Dict[str, Tensor]:
    """Differentiable end-to-end losses of the SAE spliced into ``model`` at ``hook_name``.

    Runs the clean model once without gradients (caching the downstream activations and, when
    ``kl``, the logits), then the patched model with gradients flowing into the SAE only. With
    ``kl=False`` both runs stop after the last downstream hook's block.

    Args:
        tokens: [batch, seq] token ids.
        kl: compute ``kl_loss``: mean over real tokens of KL(clean || patched) next-token distributions.
        downstream_hooks: hooks after ``hook_name`` whose activations enter ``downstream_mse``: the
            mean over hooks of the mean squared error (over real tokens and features) between patched
            and clean activations.
        input_scale, exclude_token_ids, pad_token_id: see :func:`spliced_ce_eval`.

    Returns ``{"kl_loss": 0-d, "downstream_mse": 0-d, "recon_mse": 0-d}`` (``recon_mse``: MSE at the
    hook itself over spliced positions). A loss not asked for is a constant 0.
    """
    check_hook(model, hook_name)
    downstream = list(downstream_hooks)
    for h in downstream:
        check_hook(model, h)
        here, there = hook_layer(hook_name), hook_layer(h)
        if here is not None and (there is not None and there < here):
            raise ValueError(f"downstream hook {h!r} comes before {hook_name!r}; the SAE cannot change it")
    if not kl and not downstream:
        raise ValueError("nothing to compute: pass kl=True and/or downstream_hooks")
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError("tokens must be a [batch, seq] tensor of token ids")
    device = model_device(model)
    tokens = tokens.to(device)
    _check_tokens_fit(model, tokens)
    splice, real = _position_masks(tokens, exclude_token_ids, pad_token_id)
    stop = None if kl else stop_layer_for([hook_name] + downstream)

    with torch.no_grad(), model_lock(model):
        clean_out, cache = model.run_with_cache(tokens, names_filter=[hook_name] + downstream, stop_at_layer=stop)
    clean_act = cache[hook_name]

    captured: Dict[str, Tensor] = {}
    recon_holder: List[Tensor] = []

    def splice_hook(act: Tensor, hook: Any = None) -> Tensor:
        patched = _patched(act.detach(), splice, sae, input_scale)
        recon_holder.append(patched)
        return patched

    def capture(name: str):
        def hook_fn(act: Tensor, hook: Any = None) -> Tensor:
            captured[name] = act
            return act
        return hook_fn

    fwd_hooks = [(hook_name, splice_hook)] + [(h, capture(h)) for h in downstream]
    with torch.enable_grad(), model_lock(model), _frozen(model):
        patched_out = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, stop_at_layer=stop)

    zero = patched_out.new_zeros((), dtype=torch.float32)
    losses: Dict[str, Tensor] = {"kl_loss": zero, "downstream_mse": zero}
    real_f = real.float()
    if kl:
        per_token = _kl_per_token(clean_out, patched_out)
        losses["kl_loss"] = (per_token * real_f).sum() / real_f.sum().clamp_min(1)
    if downstream:
        terms = []
        for h in downstream:
            diff = (captured[h].float() - cache[h].float()).pow(2)
            diff = diff.flatten(2) if diff.dim() > 3 else diff
            terms.append((diff.mean(-1) * real_f).sum() / real_f.sum().clamp_min(1))
        losses["downstream_mse"] = torch.stack(terms).mean()
    patched_act = recon_holder[0]
    sq = (patched_act.float() - clean_act.float()).pow(2)
    sq = sq.flatten(2) if sq.dim() > 3 else sq
    splice_f = splice.float()
    losses["recon_mse"] = (sq.mean(-1) * splice_f).sum() / splice_f.sum().clamp_min(1)
    return losses
