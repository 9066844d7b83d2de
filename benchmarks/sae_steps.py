"""The problems the benchmarks time, built the same way for saefast and every baseline.

A :class:`Problem` fixes the shapes (B tokens of width d_in, d_sae latents, k active per token),
the dtype and device, and the aux-K setting (``k_aux`` per row among a fixed set of dead
latents). :func:`make_step` builds one contender's whole BatchTopK training step on it:

* ``saefast``: the ops directly (topk_encode_with_aux -> one sparse_decode of the stacked main
  and aux codes -> MSE + aux MSE, backward, project_decoder_grad_, Adam, normalize_decoder_; where
  the backend has the fused decoder kernel, ``saefast.optim.SAEAdam`` does the last three in one
  pass over W_dec).
* ``saefast-sae``: the same step through ``BatchTopKSAE(SAEConfig).training_forward`` (the native
  loop: ``out["loss"].backward()``, ``project_decoder_gradients()``, Adam, ``normalize_decoder()``).
* ``saefast-classic``: the classic SAE API: ``x_recon, features = sae(x)``, MSE +
  ``get_auxiliary_loss(x, x_recon)``, backward, projection, Adam, renormalisation,
  ``update_inactive_features(features)``.
* ``saefast-dict``: ``BatchTopKSAE(cfg_dict)`` stepped like the BatchTopK reference code:
  ``forward(x)["loss"].backward()``, ``make_decoder_weights_and_grad_unit_norm()``, Adam (its aux
  loss lets the gradient reach the main reconstruction, as that code does).
* ``dense``: plain PyTorch with the maths of SAELens / the BatchTopK reference code: dense
  pre-activations, a flat ``torch.topk`` over the batch, scatter, dense decode, dense aux-K.
* ``sparsify``, ``sae-lens``, ``dictionary-learning``: the peers themselves, when installed,
  configured as close to the same problem as each allows; :attr:`Step.notes` says how not.

Every contender gets the same inputs, the same dead latents and the same optimizer
(:func:`make_adam`; ``saefast`` on a backend with the fused decoder kernel: ``SAEAdam``, the same
update), so the figures differ only by how the SAE maths is computed.
No function here measures time except :func:`interleaved_rounds`, for the scripts run outside
pytest (aux_cost.py, aux_pairs_cost.py); under pytest ``conftest.py`` does.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import saefast
from saefast import normalize_decoder_, project_decoder_grad_, sparse_decode, topk_encode
from saefast import ops
from saefast.ops import stack_rows, topk_encode_with_aux
from saefast.optim import SAEAdam

AUX_PENALTY = 1 / 32
LEARNING_RATE = 1e-4


@dataclasses.dataclass(frozen=True)
class Problem:
    """Shapes of one benchmark point. ``dead_fraction`` of the latents count as dead (a
    mid-training state), so the aux-K loss does real work."""

    d_in: int
    d_sae: int
    batch: int
    k: int
    k_aux: int = 512
    dead_fraction: float = 0.05
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @property
    def n_dead(self) -> int:
        return 0 if self.dead_fraction <= 0 else max(1, int(self.d_sae * self.dead_fraction))

    def params(self) -> Dict[str, object]:
        """The shape figures recorded beside every result."""
        return {"d_in": self.d_in, "d_sae": self.d_sae, "batch": self.batch, "k": self.k,
                "k_aux": self.k_aux, "dead_fraction": self.dead_fraction,
                "dtype": str(self.dtype).replace("torch.", ""), "device": self.device}

    def weight_state_bytes(self) -> int:
        """Bytes of weights + gradients + both Adam moments: the floor any trainer needs."""
        n_params = 2 * self.d_in * self.d_sae + self.d_in
        return 4 * n_params * torch.empty((), dtype=self.dtype).element_size()


def add_problem_args(ap: argparse.ArgumentParser) -> None:
    """The shape options of the scripts that study one CPU benchmark point (aux_cost, aux_pairs_cost,
    profile_step), defaulting to the CPU benchmark profile with a quarter of the latents dead."""
    ap.add_argument("--dead-fraction", type=float, default=0.25)
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--d-sae", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--k-aux", type=int, default=512)


def problem_from_args(args: argparse.Namespace, dead_fraction: Optional[float] = None) -> Problem:
    """The Problem of ``add_problem_args``'s options (``dead_fraction`` overrides the option's)."""
    return Problem(d_in=args.d_in, d_sae=args.d_sae, batch=args.batch, k=args.k, k_aux=args.k_aux,
                   dead_fraction=args.dead_fraction if dead_fraction is None else dead_fraction)


def make_inputs(p: Problem, seed: int = 0) -> Dict[str, Tensor]:
    """x [B, d_in], W_enc [d_in, d_sae], W_dec = W_enc.T with unit rows, b_dec [d_in] and a
    dead_mask [d_sae] with ``p.n_dead`` dead latents, drawn on ``p.device`` from a fixed seed.

    A step built from these takes ownership of the tensors (no copies, so a memory search
    measures the step alone): build each contender from its own ``make_inputs`` call.
    """
    gen = torch.Generator(device=p.device).manual_seed(seed)
    x = torch.randn(p.batch, p.d_in, generator=gen, device=p.device)
    W_enc = torch.randn(p.d_in, p.d_sae, generator=gen, device=p.device).div_(p.d_in ** 0.5)
    dead = torch.zeros(p.d_sae, dtype=torch.bool, device=p.device)
    dead[torch.randperm(p.d_sae, generator=gen, device=p.device)[:p.n_dead]] = True
    b_dec = 0.01 * torch.randn(p.d_in, generator=gen, device=p.device)
    out = {"x": x.to(p.dtype), "W_enc": W_enc.to(p.dtype), "b_dec": b_dec.to(p.dtype), "dead_mask": dead}
    del W_enc
    W_dec = out["W_enc"].t().contiguous()
    normalize_decoder_(W_dec)
    out["W_dec"] = W_dec
    return out


def make_adam(params) -> torch.optim.Optimizer:
    """The optimizer every contender uses: Adam, fused where this torch supports it for these
    parameters (CUDA and, since torch 2.4, CPU), else the multi-tensor one."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=LEARNING_RATE, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=LEARNING_RATE, foreach=True)


def adam_kind(opt: torch.optim.Optimizer) -> str:
    if opt.defaults.get("fused"):
        return "Adam(fused)"
    return "Adam(foreach)" if opt.defaults.get("foreach") else "Adam"


def dense_decoder_update(W_dec: Tensor, opt: torch.optim.Optimizer) -> None:
    """After backward, in plain PyTorch: the decoder gradient projected off each row's direction,
    the Adam step, the rows renormalised (what the dense contenders do in place of saefast's
    ``project_decoder_grad_`` / ``normalize_decoder_``)."""
    with torch.no_grad():
        unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
        W_dec.grad -= (W_dec.grad * unit).sum(-1, keepdim=True) * unit
    opt.step()
    with torch.no_grad():
        W_dec.div_(W_dec.norm(dim=-1, keepdim=True))


def sae_training_step(sae: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor,
                      before: Optional[Callable[[], None]] = None, **forward_kwargs) -> Callable[[], None]:
    """A saefast SAE's native step: ``before()`` (e.g. pinning the dead latents),
    ``training_forward(x, **forward_kwargs)``, backward, ``project_decoder_gradients``, Adam,
    ``normalize_decoder``."""
    def run() -> None:
        if before is not None:
            before()
        out = sae.training_forward(x, **forward_kwargs)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        sae.project_decoder_gradients()
        opt.step()
        sae.normalize_decoder()

    return run


def interleaved_rounds(calls: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1
                       ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Wall-clock and CPU seconds of every call, per round, outside pytest: each round runs every
    call once, starting one further along the list than the round before (as conftest's
    ``time_interleaved``), so drift on a shared machine hits all alike; ``warmup`` untimed runs of
    each call first (optimizer state, gradient buffers, kernel builds)."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    wall: Dict[str, List[float]] = {n: [] for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            w0, c0 = time.perf_counter(), time.process_time()
            calls[name]()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


@dataclasses.dataclass
class Step:
    """One contender's training step: call ``run()`` once per step."""

    name: str
    run: Callable[[], None]
    notes: str
    module: Optional[torch.nn.Module] = None
    extra: Dict[str, object] = dataclasses.field(default_factory=dict)


def _parameters(inputs: Dict[str, Tensor]) -> List[torch.nn.Parameter]:
    return [torch.nn.Parameter(inputs[name]) for name in ("W_enc", "W_dec", "b_dec")]


def _release_weights(inputs: Dict[str, Tensor]) -> None:
    """Drop the input weights once a module holds its own copy (they are the step's now)."""
    for name in ("W_enc", "W_dec", "b_dec"):
        inputs.pop(name, None)


def saefast_ops_step(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    """The BatchTopK step written on saefast's ops: nothing [B, d_sae] is ever built."""
    W_enc, W_dec, b_dec = _parameters(inputs)
    x, dead = inputs["x"], inputs["dead_mask"]
    # Where the backend has the fused decoder kernel (Triton: CUDA), SAEAdam does the projection,
    # Adam and the renormalisation of W_dec in one pass; elsewhere the three ops one after the other.
    fused_decoder = ops.has_fused_decoder_adam(W_dec)
    if fused_decoder:
        opt = SAEAdam([W_enc, W_dec, b_dec], lr=LEARNING_RATE, fused=True, decoder=W_dec)
    else:
        opt = make_adam([W_enc, W_dec, b_dec])

    def run() -> None:
        if p.n_dead == 0:
            x_hat = sparse_decode(topk_encode(x, W_enc, b_dec, p.k, mode="batch"), W_dec, b_dec)
            loss = (x_hat.float() - x.float()).pow(2).mean()
        else:
            # One encode node and one decode for the main and aux codes: one gradient buffer each
            # for W_enc and W_dec.
            acts, aux_acts = topk_encode_with_aux(x, W_enc, b_dec, p.k, dead, p.k_aux, mode="batch")
            both = sparse_decode(stack_rows(acts, aux_acts), W_dec)
            x_hat = both[: x.shape[0]] + b_dec
            residual = (x - x_hat).detach()
            loss = ((x_hat.float() - x.float()).pow(2).mean()
                    + AUX_PENALTY * (both[x.shape[0]:].float() - residual.float()).pow(2).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if fused_decoder:
            opt.step()
            return
        project_decoder_grad_(W_dec, W_dec.grad)
        opt.step()
        normalize_decoder_(W_dec)

    kind = "SAEAdam(fused decoder pass)" if fused_decoder else adam_kind(opt)
    return Step("saefast", run, f"saefast ops, {kind}", extra={"optimizer": kind})


def _saefast_sae_class():
    cls = getattr(saefast, "BatchTopKSAE", None)
    if cls is None:
        try:
            cls = importlib.import_module("saefast.sae").BatchTopKSAE
        except (ImportError, AttributeError):
            return None
    return cls


def saefast_sae_available() -> bool:
    return _saefast_sae_class() is not None


# The dead-latent counters are pinned: dead latents read this many batches without firing, and
# n_batches_to_dead is as large, so exactly the problem's dead latents are dead on every step.
_NEVER = 1 << 40


def _saefast_sae(p: Problem, inputs: Dict[str, Tensor], dict_config: bool = False):
    """A BatchTopKSAE holding the problem's weights (SAEConfig, or the reference code's dict)."""
    cls = _saefast_sae_class()
    dtype = str(p.dtype).replace("torch.", "")
    if dict_config:
        cfg = {"act_size": p.d_in, "dict_size": p.d_sae, "top_k": p.k, "top_k_aux": p.k_aux,
               "aux_penalty": AUX_PENALTY, "n_batches_to_dead": _NEVER, "input_unit_norm": False,
               "l1_coeff": 0.0, "seed": 0, "dtype": dtype, "device": p.device}
    else:
        from saefast.config import SAEConfig
        cfg = SAEConfig(d_in=p.d_in, d_sae=p.d_sae, top_k=p.k, top_k_aux=p.k_aux, aux_penalty=AUX_PENALTY,
                        n_batches_to_dead=_NEVER, dtype=dtype, device=p.device, seed=0)
    sae = cls(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(inputs["W_enc"])
        sae.W_dec.copy_(inputs["W_dec"])
        sae.b_dec.copy_(inputs["b_dec"])
    dead_idx = inputs["dead_mask"].nonzero().flatten()
    _release_weights(inputs)

    def pin_dead() -> None:
        sae.num_batches_not_active[dead_idx] = _NEVER

    return sae, pin_dead, make_adam([q for q in sae.parameters() if q.requires_grad])


def saefast_sae_step(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    """The same step through ``BatchTopKSAE.training_forward`` and its decoder methods."""
    sae, pin_dead, opt = _saefast_sae(p, inputs)
    x = inputs["x"]

    run = sae_training_step(sae, opt, x, before=pin_dead)
    return Step("saefast-sae", run, f"saefast.BatchTopKSAE.training_forward, {adam_kind(opt)}", module=sae,
                extra={"optimizer": adam_kind(opt)})


def saefast_classic_step(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    """The classic SAE API's loop: ``sae(x)``, MSE + ``get_auxiliary_loss``, backward, decoder
    projection, Adam, renormalisation, ``update_inactive_features(features)``."""
    sae, pin_dead, opt = _saefast_sae(p, inputs)
    x = inputs["x"]

    def run() -> None:
        pin_dead()
        x_recon, features = sae(x)
        loss = (x_recon.float() - x.float()).pow(2).mean() + sae.get_auxiliary_loss(x, x_recon)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_gradients()
        opt.step()
        sae.normalize_decoder()
        sae.update_inactive_features(features)

    return Step("saefast-classic", run, f"saefast.BatchTopKSAE, classic API (sae(x), get_auxiliary_loss), "
                f"{adam_kind(opt)}", module=sae, extra={"optimizer": adam_kind(opt)})


def saefast_dict_step(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    """``BatchTopKSAE(cfg_dict)`` stepped like the BatchTopK reference code's training loop."""
    sae, pin_dead, opt = _saefast_sae(p, inputs, dict_config=True)
    x = inputs["x"]

    def run() -> None:
        pin_dead()
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        sae.make_decoder_weights_and_grad_unit_norm()
        opt.step()

    return Step("saefast-dict", run, f"saefast.BatchTopKSAE(cfg_dict), the reference code's loop (aux residual "
                f"not detached, as there), {adam_kind(opt)}", module=sae, extra={"optimizer": adam_kind(opt)})


def dense_step(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    """BatchTopK in plain PyTorch, the way SAELens and the BatchTopK reference code compute it:
    dense pre-activations, flat topk over the batch, scatter, dense matmul decode, and the
    aux-K loss on the dense dead columns."""
    W_enc, W_dec, b_dec = _parameters(inputs)
    x, dead = inputs["x"], inputs["dead_mask"]
    k_aux = min(p.k_aux, p.n_dead)
    opt = make_adam([W_enc, W_dec, b_dec])

    def run() -> None:
        pre = torch.relu((x - b_dec) @ W_enc)
        flat = pre.flatten()
        top = flat.topk(p.batch * p.k, sorted=False)
        acts = torch.zeros_like(flat).scatter(-1, top.indices, top.values).view_as(pre)
        x_hat = acts @ W_dec + b_dec
        loss = (x_hat.float() - x.float()).pow(2).mean()
        if k_aux:
            residual = (x - x_hat).detach()
            pre_dead = pre[:, dead]
            top_aux = pre_dead.topk(k_aux, dim=-1)
            acts_aux = torch.zeros_like(pre_dead).scatter(-1, top_aux.indices, top_aux.values)
            loss = loss + AUX_PENALTY * ((acts_aux @ W_dec[dead]).float() - residual.float()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dense_decoder_update(W_dec, opt)

    return Step("dense", run, f"plain PyTorch, SAELens maths, {adam_kind(opt)}",
                extra={"optimizer": adam_kind(opt)})


# ----------------------------------------------------------------------------------------------
# Peers: each import raises ImportError when the package is missing (tests importorskip first)
# ----------------------------------------------------------------------------------------------

def sparsify_step(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    """EleutherAI sparsify's SparseCoder: TopK per row (it has no BatchTopK), FVU loss."""
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify import sparse_coder, utils

    if not p.device.startswith("cuda"):
        # sparsify picks its Triton decoder whenever triton imports, even for CPU tensors;
        # its eager embedding_bag decoder is what runs on a CPU.
        sparse_coder.decoder_impl = utils.eager_decode
    sae = SparseCoder(p.d_in, SparseCoderConfig(num_latents=p.d_sae, k=p.k), device=p.device, dtype=p.dtype)
    with torch.no_grad():
        sae.encoder.weight.copy_(inputs["W_enc"].t())
        sae.W_dec.copy_(inputs["W_dec"])
        sae.b_dec.copy_(inputs["b_dec"])
    x, dead = inputs["x"], inputs["dead_mask"]
    _release_weights(inputs)
    opt = make_adam(sae.parameters())

    def run() -> None:
        out = sae(x, dead_mask=dead)
        opt.zero_grad(set_to_none=True)
        (out.fvu + AUX_PENALTY * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    autocast = " forward under its bf16 autocast;" if p.device.startswith("cuda") else ""
    notes = (f"sparsify {_version('eai-sparsify')}: TopK per row (no BatchTopK); FVU loss; trained encoder "
             f"bias; k_aux = d_in/2 = {p.d_in // 2} (its fixed rule);{autocast} {adam_kind(opt)}")
    return Step("sparsify", run, notes, module=sae, extra={"optimizer": adam_kind(opt)})


def sae_lens_step(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    """SAELens' BatchTopKTrainingSAE.training_forward_pass + backward + Adam (as its trainer)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = BatchTopKTrainingSAEConfig(d_in=p.d_in, d_sae=p.d_sae, k=p.k, aux_loss_coefficient=AUX_PENALTY,
                                     dtype=str(p.dtype).replace("torch.", ""), device=p.device)
    sae = BatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(inputs["W_enc"])
        sae.W_dec.copy_(inputs["W_dec"])
        sae.b_dec.copy_(inputs["b_dec"])
    x, dead = inputs["x"], inputs["dead_mask"]
    _release_weights(inputs)
    opt = make_adam(sae.parameters())

    def run() -> None:
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    notes = (f"sae-lens {_version('sae-lens')}: BatchTopKTrainingSAE; dense [B, d_sae] activations; keeps "
             f"decoder norms in the activations (rescale_acts_by_decoder_norm) instead of projecting and "
             f"renormalising; trained b_enc; its own aux-K rule; {adam_kind(opt)}")
    return Step("sae-lens", run, notes, module=sae, extra={"optimizer": adam_kind(opt)})


def dictionary_learning_step(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    """dictionary_learning's BatchTopKTrainer.update (one whole step of its trainer)."""
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer

    trainer = BatchTopKTrainer(steps=1 << 30, activation_dim=p.d_in, dict_size=p.d_sae, k=p.k, layer=0,
                               lm_name="benchmark", auxk_alpha=AUX_PENALTY, device=p.device, seed=0)
    ae = trainer.ae.to(p.dtype)
    with torch.no_grad():
        ae.encoder.weight.copy_(inputs["W_enc"].t())
        ae.decoder.weight.copy_(inputs["W_dec"].t())
        ae.b_dec.copy_(inputs["b_dec"])
    _release_weights(inputs)
    trainer.optimizer = make_adam(ae.parameters())
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    dead = inputs["dead_mask"]
    x = inputs["x"]

    def run() -> None:
        trainer.num_tokens_since_fired[dead] = trainer.dead_feature_threshold
        # step 1: past its geometric-median init (step 0), before its threshold updates start
        trainer.update(1, x)

    notes = (f"dictionary-learning {_version('dictionary-learning')}: BatchTopKTrainer.update, which also "
             f"clips the gradient norm, steps an LR scheduler and syncs with .item(); dense [B, d_sae] "
             f"activations; trained encoder bias; k_aux = d_in/2 = {p.d_in // 2}; {adam_kind(trainer.optimizer)}")
    return Step("dictionary-learning", run, notes, module=ae, extra={"optimizer": adam_kind(trainer.optimizer)})


def _version(dist: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# Import name each peer needs (for pytest.importorskip) and its builder.
PEERS = {
    "sparsify": ("sparsify", sparsify_step),
    "sae-lens": ("sae_lens.saes.batchtopk_sae", sae_lens_step),
    "dictionary-learning": ("dictionary_learning.trainers.batch_top_k", dictionary_learning_step),
}

BUILDERS = {"saefast": saefast_ops_step, "saefast-sae": saefast_sae_step, "saefast-classic": saefast_classic_step,
            "saefast-dict": saefast_dict_step, "dense": dense_step,
            **{name: builder for name, (_, builder) in PEERS.items()}}


def make_step(impl: str, p: Problem, inputs: Optional[Dict[str, Tensor]] = None) -> Step:
    """Build contender ``impl`` (a key of BUILDERS) on problem ``p``."""
    if impl not in BUILDERS:
        raise ValueError(f"impl={impl!r} is not one of {sorted(BUILDERS)}")
    return BUILDERS[impl](p, inputs if inputs is not None else make_inputs(p))


# ----------------------------------------------------------------------------------------------
# The floor: what any trainer of this shape must spend
# ----------------------------------------------------------------------------------------------

def encoder_gemm(p: Problem, inputs: Dict[str, Tensor]) -> Callable[[], Tensor]:
    """The encoder GEMM alone, [B, d_in] @ [d_in, d_sae], into an output allocated once: on a CPU
    a fresh [B, d_sae] result costs the OS's zeroing of its pages on every call (about 0.1 s of
    0.8 s at the CPU headline shape), which no trainer has to pay."""
    x, W_enc = inputs["x"], inputs["W_enc"]
    out = torch.empty(x.shape[0], W_enc.shape[1], dtype=x.dtype, device=x.device)
    return lambda: torch.mm(x, W_enc, out=out)


def adam_pass(p: Problem, inputs: Dict[str, Tensor]) -> Callable[[], None]:
    """One optimizer step over the SAE's weights (gradients already there)."""
    params = _parameters(inputs)
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    opt = make_adam(params)
    return opt.step
