"""Training steps of the transcoder and crosscoder benchmarks, built the same way for saefast and
for a dense PyTorch implementation of the same maths (cf. sae_steps.py for BatchTopK).

* Transcoder (``transcoder_step``): a BatchTopK skip transcoder, ``y_hat = BatchTopK(relu(x @
  W_enc)) @ W_dec + b_dec + x @ W_skip``, MSE against a target ``y`` [B, d_out], aux-K among 5 %
  dead latents against the detached residual, decoder-gradient projection, Adam, renormalisation.
  saefast runs ``BatchTopKSAE(d_out=..., skip_connection=True).training_forward(x, target=y)``.
* Crosscoder (``crosscoder_step``): L layers of width d_in / L concatenated; ``pre = relu((x -
  b_dec) @ W_enc + b_enc)``, ``x_hat = pre @ W_dec + b_dec``, MSE plus L1 weighted by each latent's
  summed per-layer decoder norms, Adam (decoder norms are free). ``b_enc`` is set so that about k
  latents fire per token, as in a trained crosscoder (a random ReLU dictionary would fire half of
  them). saefast runs ``CrosscoderSAE.training_forward``.

Both contenders start from the same weights (:func:`transcoder_inputs`, :func:`crosscoder_inputs`)
and use sae_steps.make_adam. No function here measures time; conftest.py does.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

import torch
from torch import Tensor

from saefast import SAEConfig, create_sae, normalize_decoder_
from sae_steps import AUX_PENALTY, Problem, Step, adam_kind, dense_decoder_update, make_adam, sae_training_step

L1_COEFFICIENT = 1e-3
N_LAYERS = 4


def _weights(p: Problem, d_out: int, gen: torch.Generator) -> Dict[str, Tensor]:
    W_enc = torch.randn(p.d_in, p.d_sae, generator=gen, device=p.device).div_(p.d_in ** 0.5)
    W_dec = torch.randn(p.d_sae, d_out, generator=gen, device=p.device)
    normalize_decoder_(W_dec)
    return {"W_enc": W_enc.to(p.dtype), "W_dec": W_dec.to(p.dtype)}


def transcoder_inputs(p: Problem, seed: int = 0) -> Dict[str, Tensor]:
    """x [B, d_in], target y [B, d_out = d_in] (x through a fixed map, plus noise), W_enc, W_dec
    [d_sae, d_out] with unit rows, b_dec, W_skip [d_in, d_out] and ``p.n_dead`` dead latents."""
    gen = torch.Generator(device=p.device).manual_seed(seed)
    d = p.d_in
    x = torch.randn(p.batch, d, generator=gen, device=p.device)
    y = torch.tanh(x @ torch.randn(d, d, generator=gen, device=p.device).div_(d ** 0.5))
    dead = torch.zeros(p.d_sae, dtype=torch.bool, device=p.device)
    dead[torch.randperm(p.d_sae, generator=gen, device=p.device)[:p.n_dead]] = True
    out = {"x": x.to(p.dtype), "y": y.to(p.dtype), "dead_mask": dead, **_weights(p, d, gen)}
    out["b_dec"] = (0.01 * torch.randn(d, generator=gen, device=p.device)).to(p.dtype)
    out["W_skip"] = (0.01 * torch.randn(d, d, generator=gen, device=p.device)).to(p.dtype)
    return out


def crosscoder_inputs(p: Problem, seed: int = 0) -> Dict[str, Tensor]:
    """x [B, d_in] (N_LAYERS layers of d_in / N_LAYERS concatenated), W_enc, W_dec = W_enc.T with
    per-layer slices of norm 1/L, b_dec, and b_enc placing about k active latents per token."""
    gen = torch.Generator(device=p.device).manual_seed(seed)
    x = torch.randn(p.batch, p.d_in, generator=gen, device=p.device)
    W_dec = torch.randn(p.d_sae, N_LAYERS, p.d_in // N_LAYERS, generator=gen, device=p.device)
    W_dec = (W_dec / (W_dec.norm(dim=-1, keepdim=True) * N_LAYERS)).flatten(1)
    W_enc = W_dec.t().contiguous()
    b_dec = 0.01 * torch.randn(p.d_in, generator=gen, device=p.device)
    rows = min(p.batch, 256)
    pre = (x[:rows] - b_dec) @ W_enc
    b_enc = -torch.quantile(pre.flatten().float(), 1 - p.k / p.d_sae)  # about k of d_sae above it
    return {"x": x.to(p.dtype), "W_enc": W_enc.to(p.dtype), "W_dec": W_dec.to(p.dtype), "b_dec": b_dec.to(p.dtype),
            "b_enc": torch.full((p.d_sae,), float(b_enc), device=p.device).to(p.dtype)}


def _dtype_name(p: Problem) -> str:
    return str(p.dtype).replace("torch.", "")


def saefast_transcoder(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    cfg = SAEConfig(d_in=p.d_in, d_out=p.d_in, d_sae=p.d_sae, top_k=p.k, top_k_aux=p.k_aux, aux_penalty=AUX_PENALTY,
                    skip_connection=True, n_batches_to_dead=1 << 40, dtype=_dtype_name(p), device=p.device, seed=0)
    sae = create_sae(cfg)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_dec", "W_skip"):
            getattr(sae, name).copy_(inputs.pop(name))
    dead_idx = inputs["dead_mask"].nonzero().flatten()
    x, y = inputs["x"], inputs["y"]
    opt = make_adam([q for q in sae.parameters() if q.requires_grad])

    def pin_dead() -> None:
        sae.num_batches_not_active[dead_idx] = 1 << 40  # the same latents stay dead every step

    run = sae_training_step(sae, opt, x, before=pin_dead, target=y)

    return Step("saefast", run, f"saefast BatchTopKSAE skip transcoder (sparse ops), {adam_kind(opt)}", module=sae)


def dense_transcoder(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    params = {n: torch.nn.Parameter(inputs.pop(n)) for n in ("W_enc", "W_dec", "b_dec", "W_skip")}
    W_enc, W_dec, b_dec, W_skip = params.values()
    x, y, dead = inputs["x"], inputs["y"], inputs["dead_mask"]
    k_aux = min(p.k_aux, p.n_dead)
    opt = make_adam(params.values())

    def run() -> None:
        pre = torch.relu(x @ W_enc)  # a transcoder never subtracts b_dec (it lives in the output space)
        top = pre.flatten().topk(p.batch * p.k, sorted=False)
        acts = torch.zeros_like(pre.flatten()).scatter(-1, top.indices, top.values).view_as(pre)
        y_hat = acts @ W_dec + b_dec + x @ W_skip
        mse = (y_hat.float() - y.float()).pow(2).mean()
        residual = (y - y_hat).detach()
        pre_dead = pre[:, dead]
        top_aux = pre_dead.topk(k_aux, dim=-1)
        acts_aux = torch.zeros_like(pre_dead).scatter(-1, top_aux.indices, top_aux.values)
        aux = AUX_PENALTY * ((acts_aux @ W_dec[dead]).float() - residual.float()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        (mse + aux).backward()
        dense_decoder_update(W_dec, opt)

    step = Step("dense", run, f"plain PyTorch, the same maths on dense [B, d_sae] activations, {adam_kind(opt)}")
    step.extra["params"] = params
    return step


def saefast_crosscoder(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    cfg = SAEConfig(d_in=p.d_in, d_sae=p.d_sae, architecture="crosscoder", crosscoder_layers=N_LAYERS,
                    l1_coefficient=L1_COEFFICIENT, dtype=_dtype_name(p), device=p.device, seed=0)
    sae = create_sae(cfg)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_dec", "b_enc"):
            getattr(sae, name).copy_(inputs.pop(name))
    x = inputs["x"]
    opt = make_adam(sae.parameters())

    def run() -> None:
        out = sae.training_forward(x)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    return Step("saefast", run, f"saefast CrosscoderSAE, {N_LAYERS} layers of {p.d_in // N_LAYERS} (sparse ops), "
                                f"{adam_kind(opt)}", module=sae)


def dense_crosscoder(p: Problem, inputs: Dict[str, Tensor]) -> Step:
    params = {n: torch.nn.Parameter(inputs.pop(n)) for n in ("W_enc", "W_dec", "b_dec", "b_enc")}
    W_enc, W_dec, b_dec, b_enc = params.values()
    x = inputs["x"]
    opt = make_adam(params.values())

    def run() -> None:
        pre = torch.relu((x - b_dec) @ W_enc + b_enc)
        x_hat = pre @ W_dec + b_dec
        norms = W_dec.view(p.d_sae, N_LAYERS, -1).float().norm(dim=-1).sum(-1)
        loss = (x_hat.float() - x.float()).pow(2).mean() + L1_COEFFICIENT * (pre.float() * norms).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step = Step("dense", run, f"plain PyTorch, the same maths on dense [B, d_sae] activations, {adam_kind(opt)}")
    step.extra["params"] = params
    return step


BUILDERS = {
    ("transcoder", "saefast"): (transcoder_inputs, saefast_transcoder),
    ("transcoder", "dense"): (transcoder_inputs, dense_transcoder),
    ("crosscoder", "saefast"): (crosscoder_inputs, saefast_crosscoder),
    ("crosscoder", "dense"): (crosscoder_inputs, dense_crosscoder),
}


def make_step(variant: str, impl: str, p: Problem) -> Step:
    """Contender ``impl`` ("saefast" or "dense") of ``variant`` ("transcoder" or "crosscoder")."""
    inputs_of, build = BUILDERS[(variant, impl)]
    return build(p, inputs_of(p))


def step_weights(step: Step) -> Dict[str, Tensor]:
    """The weights a step trains, by name (for the same-maths checks)."""
    if step.module is not None:
        return {n: t.detach() for n, t in step.module.named_parameters()}
    return {n: t.detach() for n, t in step.extra["params"].items()}


def toy_problem(device: str) -> Problem:
    """A small problem for checking that the contenders compute the same step."""
    return dataclasses.replace(Problem(d_in=48, d_sae=600, batch=64, k=6, k_aux=20, dead_fraction=0.1), device=device)


def assert_contenders_agree(variant: str, device: str, steps: int = 3) -> None:
    """saefast's and the dense step of ``variant`` are the same maths: after ``steps`` steps from
    the same weights on :func:`toy_problem` every parameter agrees (fp32)."""
    p = toy_problem(device)
    weights = {}
    for impl in ("saefast", "dense"):
        step = make_step(variant, impl, p)
        for _ in range(steps):
            step.run()
        weights[impl] = step_weights(step)
    for name, value in weights["dense"].items():
        torch.testing.assert_close(weights["saefast"][name], value, rtol=1e-4, atol=1e-6, msg=name)
