"""Adam with the SAE decoder's unit-norm maintenance in the same pass.

:class:`SAEAdam` is ``torch.optim.Adam`` (same arguments, state and ``state_dict``, so a
checkpoint moves between the two) that also knows which parameter is the decoder ``W_dec``
[d_sae, d_in]. One ``step()`` does, for the decoder,

    project_decoder_grad_  ->  Adam  ->  normalize_decoder_

(each switchable: ``project_decoder_grad`` and ``normalize_decoder``) and plain Adam for every
other parameter. Where the backend has the fused kernel (``saefast.kernels.adam``: the Triton
backend, i.e. CUDA tensors) the decoder's three parts are one read of W_dec, its gradient and
both moments and one write of W_dec and the moments; elsewhere they run one after the other.
Both give ``torch.optim.Adam``'s update of the projected gradient followed by the
renormalisation, up to fp32 rounding. Unlike ``project_decoder_grad_`` the step leaves
``W_dec.grad`` as backward wrote it (the projection is applied on the fly, or to a copy).

Example::

    opt = SAEAdam(sae.parameters(), lr=4e-4, decoder=sae.W_dec, fused=True)
    loss.backward()
    opt.step()          # projection, Adam, renormalisation
    opt.zero_grad()
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from . import ops

__all__ = ["SAEAdam"]


class SAEAdam(torch.optim.Adam):
    """``torch.optim.Adam`` that keeps the decoder's rows at unit norm (see the module docstring).

    Args:
        params, lr, betas, eps, **kwargs: as ``torch.optim.Adam`` (``fused=True`` is used for the
            other parameters where torch supports it).
        decoder: the decoder weight W_dec [d_sae, d_in]; it must be one of ``params``.
        project_decoder_grad: remove from the decoder's gradient its component along each row
            before the update (the SAE's ``project_decoder_gradients``). Set it to False for a step
            whose gradient was projected already (e.g. before gradient clipping).
        normalize_decoder: rescale the decoder's rows to unit norm after the update.

    The fused kernel takes groups with ``weight_decay=0``, ``amsgrad``, ``maximize``,
    ``capturable`` and ``differentiable`` off and a float ``lr``; any other setting, or a backend
    without the kernel, runs the three parts one after the other with the same results. The
    decoder's ``step`` count is kept on the CPU (bias corrections are computed on the host in
    float64, as torch's single-tensor Adam does).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, *,
                 decoder: Tensor, project_decoder_grad: bool = True, normalize_decoder: bool = True, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, **kwargs)
        if not isinstance(decoder, Tensor) or decoder.dim() != 2:
            raise ValueError("decoder must be the SAE's W_dec, a [d_sae, d_in] parameter")
        if not any(p is decoder for group in self.param_groups for p in group["params"]):
            raise ValueError("decoder must be one of the parameters this optimizer updates (pass sae.W_dec "
                             "among params)")
        self.decoder = decoder
        self.project_decoder_grad = project_decoder_grad
        self.normalize_decoder = normalize_decoder

    def _decoder_group(self) -> dict:
        return next(g for g in self.param_groups if any(p is self.decoder for p in g["params"]))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        dec = self.decoder
        grad = dec.grad
        if grad is None or not (self.project_decoder_grad or self.normalize_decoder):
            super().step()
            return loss
        dec.grad = None  # torch's Adam skips parameters without a gradient
        try:
            super().step()
        finally:
            dec.grad = grad
        if not self._fused_decoder_step(grad):
            self._decoder_step_in_parts(grad)
        return loss

    def _fused_decoder_step(self, grad: Tensor) -> bool:
        group = self._decoder_group()
        if (group["weight_decay"] != 0 or group["amsgrad"] or group["maximize"] or group["capturable"]
                or group["differentiable"] or isinstance(group["lr"], Tensor) or grad.is_sparse
                or grad.dtype != self.decoder.dtype or not grad.is_contiguous() or not self.decoder.is_contiguous()
                or not ops.has_fused_decoder_adam(self.decoder)):
            return False
        state = self.state[self.decoder]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(self.decoder, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(self.decoder, memory_format=torch.preserve_format)
        if state["step"].device.type != "cpu":  # moved to the device by load_state_dict for a fused group
            state["step"] = state["step"].cpu()
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        ops.decoder_adam_(self.decoder, grad, state["exp_avg"], state["exp_avg_sq"],
                          step_size=group["lr"] / bias_correction1, beta1=beta1, beta2=beta2, eps=group["eps"],
                          bias_correction2_sqrt=bias_correction2 ** 0.5, project=self.project_decoder_grad,
                          normalize=self.normalize_decoder)
        return True

    def _decoder_step_in_parts(self, grad: Tensor) -> None:
        """project_decoder_grad_ on a copy, torch's Adam on the decoder alone, normalize_decoder_."""
        dec = self.decoder
        g = grad
        if self.project_decoder_grad:
            g = grad.clone()
            ops.project_decoder_grad_(dec, g)
        others = [(p, p.grad) for group in self.param_groups for p in group["params"] if p is not dec]
        for p, _ in others:
            p.grad = None
        dec.grad = g
        state = self.state.get(dec)
        group = self._decoder_group()
        if state and (group["fused"] or group["capturable"]) and state["step"].device != dec.device:
            state["step"] = state["step"].to(dec.device)  # as torch's Adam keeps it for such groups
        try:
            super().step()
        finally:
            dec.grad = grad
            for p, pg in others:
                p.grad = pg
        if self.normalize_decoder:
            ops.normalize_decoder_(dec)
