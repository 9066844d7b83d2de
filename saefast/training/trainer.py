"""The training loop: Adam, warm-up + cosine LR, clipping, accumulation, bf16 autocast, aux-K,
dead-latent tracking, decoder projection/renormalisation, checkpoints, resume, DDP, logging.

One optimizer step (every process, in this order):

1. for each of ``grad_accum_steps`` micro-batches: ``out = sae.training_forward(x, update_stats=False)``
   (sparse end to end: no [B, d_sae] tensor), plus the optional end-to-end losses, then
   ``(loss / grad_accum_steps).backward()`` (DDP averages gradients over processes);
2. all-reduce of the step's statistics: which latents fired, BatchTopK's smallest kept activation,
   the loss terms and a non-finite flag. A NaN/inf loss on any process stops training here,
   before the weights change, with :class:`TrainingDiverged`; the last checkpoint stays intact;
3. ``sae.update_inactive_features(fired)`` and ``sae.update_threshold(kept_min)`` (so the
   dead-latent counters count optimizer steps);
4. ``sae.project_decoder_gradients()``, gradient clipping, ``optimizer.step()``, ``scheduler.step()``,
   ``sae.normalize_decoder()``. Where the backend has the fused decoder kernel (Triton: CUDA) the
   optimizer is :class:`saefast.optim.SAEAdam`, whose step also renormalises W_dec (and, without
   clipping, projects its gradient) in the same pass: the same update.

Activation sources follow one protocol: an iterable of [batch, d_in] tensors (for a transcoder,
:class:`~saefast.data.source.ActivationPair` (x, target) batches) with ``.d_in`` and
``state_dict()/load_state_dict()``; ``iter(source)`` continues from the recorded position.
The first ``eval_batches`` batches are held out for evals and input normalisation and never trained
on. ``SAEFAST_KILL_AFTER_STEP=N`` (tests only) ends the process with ``os._exit`` right after step N
to emulate a crash.

The trainer owns its run folder (:mod:`saefast.training.run_folder`: checked once, config
written once, curves drawn at the end) and delegates the metrics log
(:mod:`saefast.training.metrics_log`) and the evals (:mod:`saefast.training.evaluate`).
``train()`` is ``begin()``, ``advance()`` until ``done``, ``end()``; :mod:`saefast.training.multi`
interleaves those of several trainers that share one model pass.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data.source import split_pair
from ..optim import SAEAdam
from ..ops import has_fused_decoder_adam
from ..sae.base import BaseSAE
from ..utils import DiskFullError
from .checkpoint import capture_rng_state, restore_rng_state
from .config import TrainConfig
from .distributed import all_reduce_sum, barrier, dist_info
from .evaluate import evaluate_sae
from .metrics_log import MetricLogger
from .run_folder import RunFolder
from .schedule import make_scheduler

__all__ = ["Trainer", "TrainingDiverged"]

log = logging.getLogger(__name__)

# Loss terms all-reduced and logged every step, in this order.
_TERMS = ("loss", "mse_loss", "aux_loss", "sparsity_loss", "l0", "e2e_kl_loss", "e2e_block_mse")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped before the weights changed."""


class _TrainingStep(nn.Module):
    """``forward`` = the SAE's training step (and end-to-end losses) so DDP can wrap it."""

    def __init__(self, sae: nn.Module, cfg: TrainConfig, model: Optional[nn.Module],
                 eval_kwargs: Dict[str, Any]) -> None:
        super().__init__()
        self.sae = sae
        self.cfg = cfg
        self.eval_kwargs = eval_kwargs
        self.input_scale = 1.0
        self._model = [model]  # a list keeps the frozen model out of this module's parameters

    def forward(self, x: Tensor, tokens: Optional[Tensor] = None, target: Optional[Tensor] = None) -> Dict[str, Any]:
        if target is None:
            out = self.sae.training_forward(x, update_stats=False)
        else:
            out = self.sae.training_forward(x, update_stats=False, target=target)
        if tokens is not None:
            from ..evals.model_evals import e2e_losses
            extra = e2e_losses(self._model[0], self.sae, tokens, self.cfg.hook, kl=self.cfg.e2e_kl_weight > 0,
                               downstream_hooks=list(self.cfg.e2e_downstream_hooks),
                               input_scale=self.input_scale, **self.eval_kwargs)
            out = dict(out)
            if self.cfg.e2e_kl_weight > 0:
                out["e2e_kl_loss"] = extra["kl_loss"]
                out["loss"] = out["loss"] + self.cfg.e2e_kl_weight * extra["kl_loss"]
            if self.cfg.e2e_block_mse_weight > 0:
                out["e2e_block_mse"] = extra["downstream_mse"]
                out["loss"] = out["loss"] + self.cfg.e2e_block_mse_weight * extra["downstream_mse"]
        return out



def _fused_decoder_maintenance(sae: nn.Module, params: List[Tensor]) -> bool:
    """Whether SAEAdam may do the SAE's decoder maintenance: a unit-norm [d_sae, d_in] decoder
    kept by BaseSAE's own projection and renormalisation, on a backend with the fused kernel."""
    W_dec = getattr(sae, "W_dec", None)
    return (isinstance(sae, BaseSAE) and bool(getattr(sae, "unit_norm_decoder", False))
            and type(sae).project_decoder_gradients is BaseSAE.project_decoder_gradients
            and type(sae).normalize_decoder is BaseSAE.normalize_decoder
            and isinstance(W_dec, Tensor) and W_dec.dim() == 2 and any(p is W_dec for p in params)
            and has_fused_decoder_adam(W_dec))

class Trainer:
    """Train ``sae`` on ``source`` as ``cfg`` says; ``train()`` runs and returns the final metrics.

    Args:
        sae: an SAE following saefast's SAE interface (``saefast.sae.create_sae``), on its device.
        source: activation source (iterable of [batch, d_in] tensors, or of ActivationPair
            (x, target) for a transcoder; ``.d_in``, ``state_dict``). Under DDP each process passes
            its own slice of the data.
        cfg: the run's options; the run folder is ``cfg.out_dir / cfg.run_name``.
        resume: continue from the newest checkpoint in the run folder that reads (a damaged
            latest one is skipped, with a warning); a run with no checkpoint yet starts again from
            step 0. The folder's config must match ``cfg`` (except logging / checkpoint cadence)
            or a ValueError is raised.
        model: transformer-lens model, for the CE/KL evals and the end-to-end losses.
        eval_tokens: [n, context] token ids for the model evals (CE, CE recovered, KL).
        e2e_tokens: iterator of [e2e_batch_size, context] token batches for the end-to-end
            losses, with ``state_dict()/load_state_dict()``.
        model_eval_kwargs: ``exclude_token_ids`` / ``pad_token_id`` for the model evals and the
            end-to-end losses (``saefast.training.build`` sets BOS and padding).
        run: the run folder when the caller has already checked it (``RunFolder.prepare``, as
            ``saefast train`` does before building the model); otherwise the trainer checks it.
    """

    def __init__(self, sae: nn.Module, source: Iterable[Tensor], cfg: TrainConfig, *, resume: bool = False,
                 model: Optional[nn.Module] = None, eval_tokens: Optional[Tensor] = None,
                 e2e_tokens: Optional[Iterator[Tensor]] = None,
                 model_eval_kwargs: Optional[Dict[str, Any]] = None, run: Optional[RunFolder] = None) -> None:
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        for name in ("training_forward", "update_inactive_features", "project_decoder_gradients",
                     "normalize_decoder", "encode_sparse", "decode_sparse", "dead_mask", "d_in", "d_sae"):
            if not hasattr(sae, name):
                raise TypeError(f"sae must be a saefast SAE (missing method {name}); build one with "
                                "saefast.sae.create_sae")
        for name in ("state_dict", "load_state_dict"):
            if not callable(getattr(source, name, None)):
                raise TypeError(f"source must follow the activation-source protocol (missing {name}())")
        d_in = getattr(source, "d_in", None)
        if d_in is not None and d_in != sae.d_in:
            raise ValueError(f"the source yields d_in={d_in} activations but the SAE has d_in={sae.d_in}")
        self.transcoder = bool(getattr(getattr(sae, "config", None), "is_transcoder", False))
        d_out = getattr(source, "d_out", None)
        if self.transcoder and d_out is not None and d_out != sae.d_out:
            raise ValueError(f"the source yields targets of width {d_out} but the transcoder has d_out={sae.d_out}")
        if cfg.uses_e2e and (model is None or e2e_tokens is None):
            raise ValueError("end-to-end losses are enabled: pass model= and e2e_tokens= to the Trainer")
        if cfg.uses_e2e and cfg.normalize == "dataset_center_scale":
            raise ValueError("end-to-end losses splice the SAE into the model with a scale only; "
                             "use normalize='none' or 'dataset_scale' with them")

        self.sae, self.source, self.cfg = sae, source, cfg
        self.model, self.eval_tokens, self.e2e_tokens = model, eval_tokens, e2e_tokens
        self.model_eval_kwargs = dict(model_eval_kwargs or {})
        self.dist = dist_info()
        self.device = next(sae.parameters()).device
        self.total_steps = cfg.steps_for(self.dist.world_size)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * self.dist.world_size
        if run is not None and (run.cfg is not cfg or run.resume != resume):
            raise ValueError("run= must be the RunFolder prepared for this cfg and resume")
        self.run = run if run is not None else RunFolder.prepare(cfg, resume)
        self.run_dir = self.run.path
        barrier()  # every process checks the folder before rank 0 writes into it
        self.checkpoints = self.run.checkpoints(cfg.keep_checkpoints, self.dist.rank)
        self._resume_from: Optional[Path] = None  # the checkpoint resumed from, once loaded
        self._resume_step: Optional[int] = None  # resume from no later than this step (resume_at_most)
        self._logger: Optional[MetricLogger] = None
        self._resume_rows: Optional[int] = None  # metrics rows the resumed checkpoint recorded

        params = [p for p in sae.parameters() if p.requires_grad]
        adam = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        # Where the backend has the fused decoder kernel (the Triton backend: CUDA), SAEAdam keeps
        # W_dec's rows at unit norm inside its Adam pass (and projects the gradient there too when
        # no clipping needs the projected gradient first): the same update, fewer passes over W_dec.
        self._decoder_in_optimizer = _fused_decoder_maintenance(sae, params)
        optimizer_class = torch.optim.Adam
        if self._decoder_in_optimizer:
            adam.update(decoder=sae.W_dec, project_decoder_grad=cfg.max_grad_norm == 0)
            optimizer_class = SAEAdam
        try:
            # One kernel per step instead of several passes over W_enc/W_dec (CPU: ~14x faster).
            self.optimizer = optimizer_class(params, fused=True, **adam)
        except (RuntimeError, ValueError, TypeError):  # a device/dtype the fused kernel lacks
            self.optimizer = optimizer_class(params, foreach=True, **adam)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_warmup_steps, self.total_steps, cfg.lr_decay_floor)
        step_module = _TrainingStep(sae, cfg, model, self.model_eval_kwargs)
        self._step_inner = step_module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers (dead-latent counters, threshold) are kept equal by all-reducing statistics.
            self._step_module: nn.Module = DistributedDataParallel(
                step_module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)
        else:
            self._step_module = step_module

        self.step = 0
        self.tokens_seen = 0
        self.norm_mean: Optional[Tensor] = None
        self.norm_scale = 1.0
        self.target_mean: Optional[Tensor] = None  # a transcoder's targets are normalised on their own
        self.target_scale = 1.0
        self.defer_prune = False  # saefast.training.multi prunes checkpoints once every trainer has saved
        self.heldout: List[Tensor] = []
        self.history: Dict[str, List[float]] = {}
        self.final_metrics: Dict[str, Any] = {}
        self.curves: Optional[Path] = None  # training_curves.png, drawn at the end

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def _take(self, it: Iterator[Tensor], n: int, what: str) -> List[Tensor]:
        out = []
        for _ in range(n):
            try:
                out.append(next(it))
            except StopIteration:
                raise ValueError(f"the activation source ran out while drawing {what}: it must yield more "
                                 "batches (larger dataset, or fewer steps / eval_batches)") from None
        return out

    def _prepare_data(self, rank_state: Optional[Dict[str, Any]]) -> None:
        if rank_state is None:
            heldout_state = copy.deepcopy(self.source.state_dict())
            self._data = iter(self.source)
            self.heldout = self._take(self._data, self.cfg.eval_batches, "the held-out batches")
            self._heldout_state = heldout_state
        else:
            self._heldout_state = rank_state["heldout_source"]
            self.source.load_state_dict(copy.deepcopy(self._heldout_state))
            self.heldout = self._take(iter(self.source), self.cfg.eval_batches, "the held-out batches")
            self.source.load_state_dict(rank_state["source"])
            self._data = iter(self.source)
            if self.e2e_tokens is not None:
                self.e2e_tokens.load_state_dict(rank_state["e2e_tokens"])
        for batch in self.heldout:
            x, y = split_pair(batch)
            if x.dim() != 2 or x.shape[1] != self.sae.d_in:
                raise ValueError(f"the source yields batches of shape {tuple(x.shape)}; the SAE needs "
                                 f"[batch, {self.sae.d_in}]")
            if self.transcoder and (y is None or y.dim() != 2 or y.shape != (x.shape[0], self.sae.d_out)):
                got = "no targets" if y is None else f"targets of shape {tuple(y.shape)}"
                raise ValueError(f"the source yields {got}; the transcoder needs (x, target) pairs with target "
                                 f"[batch, {self.sae.d_out}]")

    def _estimate_normalization(self) -> None:
        if self.cfg.normalize == "none":
            return
        pairs = [split_pair(b) for b in self.heldout]
        self.norm_mean, self.norm_scale = self._dataset_stats([x for x, _ in pairs], "input")
        if self.transcoder:
            self.target_mean, self.target_scale = self._dataset_stats([y for _, y in pairs], "target")

    def _dataset_stats(self, rows: List[Tensor], what: str):
        """(mean or None, scale) so that ``(x - mean) * scale`` has mean squared norm d (all processes)."""
        xs = torch.cat([x.double() for x in rows])
        d_in = xs.shape[1]
        stats = torch.cat([xs.sum(0), xs.pow(2).sum().reshape(1), torch.tensor([float(xs.shape[0])], dtype=torch.float64)])
        stats = all_reduce_sum(stats.to(self.device) if self.dist.enabled else stats).cpu()
        n = stats[-1].item()
        mean = stats[:d_in] / n
        mean_sq_norm = stats[d_in].item() / n
        center = None
        if self.cfg.normalize == "dataset_center_scale":
            mean_sq_norm -= mean.pow(2).sum().item()
            center = mean.float()
        if not mean_sq_norm > 0:
            raise ValueError(f"the held-out {what} activations have zero variance; input normalisation is impossible")
        return center, math.sqrt(d_in / mean_sq_norm)

    def _normalize(self, x: Tensor, mean: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
        mean, scale = (self.norm_mean, self.norm_scale) if scale is None else (mean, scale)
        x = x.to(device=self.device, dtype=next(self.sae.parameters()).dtype)
        if mean is not None:
            x = x - mean.to(x)
        if scale != 1.0:
            x = x * scale
        return x.contiguous()

    def _normalize_batch(self, batch: Any):
        """(x, target or None) of a source batch, normalised, on the SAE's device and dtype."""
        x, y = split_pair(batch)
        x = self._normalize(x)
        if self.transcoder:
            y = self._normalize(y, self.target_mean, self.target_scale)
        return x, y

    def _load_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The newest readable checkpoint's state restored (None for a new run, or a resumed one
        that has no checkpoint yet); returns this process's rank state."""
        if not self.run.resume:
            return None
        found = self.checkpoints.load_newest_readable(agree=self._all_agree, at_most=self._resume_step)
        if found is None:
            return None
        self._resume_from, ckpt = found
        t = ckpt["trainer"]
        if t["world_size"] != self.dist.world_size:
            raise ValueError(f"the checkpoint was written by {t['world_size']} process(es); resume with the "
                             f"same number (now {self.dist.world_size})")
        self.sae.load_state_dict(ckpt["sae"])
        self.optimizer.load_state_dict(t["optimizer"])
        self.scheduler.load_state_dict(t["scheduler"])
        self.step, self.tokens_seen = t["step"], t["tokens_seen"]
        self.norm_mean = t["norm_mean"]
        self.norm_scale = t["norm_scale"]
        self.target_mean = t.get("target_mean")
        self.target_scale = t.get("target_scale", 1.0)
        restore_rng_state(ckpt["rank"]["rng"])
        self._resume_rows = t.get("metrics_rows")
        log.info("resumed %s at step %d", self._resume_from, self.step)
        return ckpt["rank"]

    def _all_agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every process."""
        failed = torch.tensor([0.0 if ok else 1.0], device=self.device if self.dist.enabled else "cpu")
        return all_reduce_sum(failed).item() == 0

    def _save_checkpoint(self) -> Path:
        trainer_state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.dist.world_size,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "norm_mean": self.norm_mean, "norm_scale": self.norm_scale, "config": self.cfg.to_dict(),
            "metrics_rows": self._logger.rows if self._logger is not None else None,
            "target_mean": self.target_mean, "target_scale": self.target_scale,
        }
        rank_state = {"rng": capture_rng_state(), "source": self.source.state_dict(),
                      "heldout_source": self._heldout_state}
        if self.e2e_tokens is not None:
            rank_state["e2e_tokens"] = self.e2e_tokens.state_dict()
        return self.checkpoints.save(self.step, self.sae.state_dict(), trainer_state, rank_state,
                                     prune=not self.defer_prune)

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns global means of the loss terms."""
        cfg, sae = self.cfg, self.sae
        self.optimizer.zero_grad(set_to_none=True)
        n_terms = len(_TERMS)
        # [loss terms..., non-finite flag, kept_min sum, fired per latent]
        stats = torch.zeros(n_terms + 2 + sae.d_sae, dtype=torch.float32, device=self.device)
        for micro in range(cfg.grad_accum_steps):
            x, y = self._normalize_batch(self._take(self._data, 1, f"step {self.step + 1}")[0])
            tokens = next(self.e2e_tokens) if self.e2e_tokens is not None else None
            sync = micro == cfg.grad_accum_steps - 1
            no_sync = getattr(self._step_module, "no_sync", None)
            with (contextlib.nullcontext() if sync or no_sync is None else no_sync()):
                with self._autocast():
                    if y is not None:
                        out = self._step_module(x, target=y)
                    else:
                        out = self._step_module(x, tokens) if tokens is not None else self._step_module(x)
                loss = out["loss"]
                (loss / cfg.grad_accum_steps).backward()
            with torch.no_grad():
                for i, name in enumerate(_TERMS):
                    if name in out:
                        stats[i] += out[name].detach().float().reshape(())
                stats[n_terms] += (~torch.isfinite(loss.detach())).float().reshape(())
                stats[n_terms + 1] += out["acts"].kept_min.float().to(self.device)
                stats[n_terms + 2:].index_fill_(0, out["acts"].indices.long(), 1.0)
        all_reduce_sum(stats)
        n_micro = cfg.grad_accum_steps * self.dist.world_size
        values = (stats[:n_terms] / n_micro).tolist()
        if stats[n_terms].item() > 0:
            raise TrainingDiverged(self._diverged_message(values[0]))
        with torch.no_grad():
            sae.update_inactive_features(stats[n_terms + 2:] > 0)
            if hasattr(sae, "update_threshold"):
                sae.update_threshold(stats[n_terms + 1] / n_micro)
        if not (self._decoder_in_optimizer and cfg.max_grad_norm == 0):
            sae.project_decoder_gradients()  # the clip norm is that of the projected gradient
        grad_norm = float("nan")
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"],
                                                       cfg.max_grad_norm).item()
        self.optimizer.step()
        self.scheduler.step()
        if not self._decoder_in_optimizer:
            sae.normalize_decoder()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        result = {k: v for k, v in zip(_TERMS, values) if cfg.uses_e2e or not k.startswith("e2e_")}
        result["grad_norm"] = grad_norm
        return result

    def _diverged_message(self, loss: float) -> str:
        latest = self.checkpoints.latest()
        where = f"the last good checkpoint is {latest}" if latest else "no checkpoint had been written yet"
        return (f"loss became {loss} at step {self.step + 1}: training stopped before the weights changed; "
                f"{where}. Lower lr, enable max_grad_norm, or check the activations for NaN/inf.")

    # ------------------------------------------------------------------------------------------
    # evals
    # ------------------------------------------------------------------------------------------
    def export_sae(self) -> nn.Module:
        """The SAE for raw (unnormalised) activations: ``self.sae`` itself, or a copy with the input
        normalisation folded into its weights."""
        if self.cfg.normalize == "none":
            return self.sae
        sae = copy.deepcopy(self.sae)
        self._fold(sae)
        return sae

    def _fold(self, sae: nn.Module) -> None:
        """Rewrite ``sae`` (trained on ``(x - mean) * scale``; a transcoder: to predict
        ``(y - target_mean) * target_scale``) in place to take raw x and return raw outputs."""
        transcoder = bool(getattr(getattr(sae, "config", None), "is_transcoder", False))
        if transcoder:
            sae.fold_input_scale(self.norm_scale, target_scale=self.target_scale)
        else:
            sae.fold_input_scale(self.norm_scale)
        if self.norm_mean is not None:
            mean = self.norm_mean.to(sae.b_dec)
            out_mean = self.target_mean.to(sae.b_dec) if transcoder else mean
            with torch.no_grad():
                # encode sees x - b_dec (or x, when b_dec is not applied to the input), the skip
                # connection sees x, and decode adds b_dec: these shifts make the SAE act on
                # uncentred x and return uncentred outputs.
                if not getattr(getattr(sae, "config", None), "apply_b_dec_to_input", True):
                    sae.b_enc.sub_(mean @ sae.W_enc)
                if getattr(sae.config, "skip_connection", False):
                    sae.b_dec.sub_(mean @ sae.W_skip)
                sae.b_dec.add_(out_mean)

    def evaluate(self, sae: Optional[nn.Module] = None) -> Dict[str, float]:
        """Reconstruction metrics on the held-out batches (raw activations, SAE in eval mode), the
        planted-feature recovery for synthetic sources, and the CE/KL evals when a model is set."""
        sae = sae if sae is not None else self.export_sae()
        return evaluate_sae(sae, self.heldout, self.cfg, self.source, self.model, self.eval_tokens,
                            self.model_eval_kwargs)

    # ------------------------------------------------------------------------------------------
    # the run
    # ------------------------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        """Run to ``total_steps`` (from the checkpoint when resuming); save the SAE to
        ``<run>/sae`` (cfg.json + sae_weights.safetensors), write ``<run>/eval.json`` and return
        the final metrics. A full disk raises ``DiskFullError`` naming the file being written and
        the last complete checkpoint (what ``--resume`` continues from once there is room)."""
        try:
            self.begin()
            try:
                while not self.done:
                    self.advance()
                self.end()
            finally:
                self.close()
        except DiskFullError as err:
            raise err.with_note(self.last_checkpoint_note()) from None
        return self.final_metrics

    def last_checkpoint_note(self) -> str:
        """Where this run can be resumed from (for error messages)."""
        latest = self.checkpoints.latest()
        return f"the last complete checkpoint is {latest}" if latest is not None else \
            "no checkpoint has been written yet"

    @property
    def done(self) -> bool:
        """Every step of the run has been taken."""
        return self.step >= self.total_steps

    def resume_at_most(self, step: int) -> None:
        """Resume from the newest readable checkpoint of at most ``step`` instead of the newest
        one (before :meth:`begin`; several runs sharing one model pass resume at a common step)."""
        self._resume_step = step

    def begin(self) -> None:
        """Start the run: create the folder, load the checkpoint (resume), draw the held-out
        batches, estimate the normalisation, open the metrics log and the progress bar."""
        cfg = self.cfg
        if self.dist.is_main:
            self.run.start(d_in=self.sae.d_in, d_sae=self.sae.d_sae)
        barrier()
        rank_state = self._load_checkpoint()
        self._prepare_data(rank_state)
        if rank_state is None:
            self._estimate_normalization()
        self._step_inner.input_scale = self.norm_scale
        # A resumed run (even one restarted from step 0) cuts its log back to its checkpoint.
        self._logger = MetricLogger(self.run_dir, cfg, self.dist.is_main,
                                    resume_step=self.step if self.run.resume else None,
                                    resume_rows=self._resume_rows if rank_state is not None else 0)
        self.history = self._logger.history
        self._kill_after = int(os.environ.get("SAEFAST_KILL_AFTER_STEP", "0"))
        self._bar = tqdm(total=self.total_steps, initial=self.step,
                         disable=not (cfg.progress_bar and self.dist.is_main),
                         desc=f"saefast {self.run_dir.name}", unit="step", dynamic_ncols=True,
                         mininterval=0.1 if sys.stderr.isatty() else 5.0)
        self._last_time, self._last_tokens = time.perf_counter(), self.tokens_seen
        self._last_ckpt = self.step if rank_state else -1
        self._logs_above_bar = contextlib.ExitStack()  # log lines while the bar is shown go above it
        if not self._bar.disable:
            self._logs_above_bar.enter_context(logging_redirect_tqdm())

    def advance(self) -> None:
        """One optimizer step, then the logging, evals and checkpoint that fall on it."""
        cfg = self.cfg
        try:
            values = self.train_step()
        except TrainingDiverged as err:
            if self.dist.is_main:
                log.error("%s", err)
            raise
        if self.step < self.total_steps:
            self._bar.update(1)
        else:
            self._bar.n = self.step  # the final state is drawn once, by bar.close()
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            now = time.perf_counter()
            values.update(lr=self.scheduler.get_last_lr()[0], tokens=self.tokens_seen,
                          dead_fraction=self.sae.dead_mask().float().mean().item(),
                          tokens_per_s=(self.tokens_seen - self._last_tokens) / max(now - self._last_time, 1e-9))
            self._last_time, self._last_tokens = now, self.tokens_seen
            self._logger.log_train(self.step, values)
            self._bar.set_postfix(loss=f"{values['loss']:.4g}", l0=f"{values['l0']:.1f}",
                                  dead=f"{values['dead_fraction']:.1%}", tok_s=f"{values['tokens_per_s']:.3g}",
                                  refresh=False)  # redrawn at the bar's own pace, not once per log row
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
            if self.dist.is_main:
                self._logger.log_eval(self.step, self.evaluate())
            barrier()
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self._save_checkpoint()
            self._last_ckpt = self.step
        if self._kill_after and self.step == self._kill_after:
            os._exit(75)

    @property
    def checkpoint_pending(self) -> bool:
        """The last step has no checkpoint yet (:meth:`end` writes one)."""
        return self._last_ckpt != self.step

    def end(self) -> None:
        """After the last step: the final checkpoint, evals, the saved SAE, eval.json, curves."""
        if self.checkpoint_pending:
            self._save_checkpoint()
            self._last_ckpt = self.step
        self._logs_above_bar.close()
        self._bar.close()  # before the final log line, which then starts on a line of its own
        self._finish(self._logger)

    def close(self) -> None:
        """Close the progress bar and the metrics log (also after an error)."""
        for name in ("_logs_above_bar", "_bar", "_logger"):
            part = getattr(self, name, None)
            if part is not None:
                part.close()

    def _finish(self, logger: MetricLogger) -> None:
        if self.dist.is_main:
            if self.cfg.normalize != "none":
                self._fold(self.sae)
            metrics = self.evaluate(self.sae)
            metrics.update(step=self.step, tokens=self.tokens_seen)
            logger.log_eval(self.step, metrics)
            self.sae.save(str(self.run.sae_dir), history=logger.history, overwrite=True)
            self.run.write_eval(metrics)
            self.final_metrics = metrics
            self.curves = self.run.draw_curves()
            log.info("finished %d steps; SAE saved to %s; %s", self.step, self.run.sae_dir,
                     ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        else:
            if self.cfg.normalize != "none":
                self._fold(self.sae)
        barrier()
