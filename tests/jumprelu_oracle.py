"""Dense JumpReLU with the straight-through estimators, in plain PyTorch on [B, d_sae] tensors:
the oracle the JumpReLU, transcoder and training tests compare saefast's sparse path against.

``DenseJumpReLU.apply(z, threshold, bandwidth)`` is ``z * (z > threshold)``; its threshold gradient
is the rectangle-kernel estimate ``-(threshold / bandwidth) * rect((z - threshold) / bandwidth)``.
``DenseStep.apply(z, threshold, bandwidth)`` is the L0 indicator ``z > threshold`` with the
gradient ``-(1 / bandwidth) * rect(...)`` to the threshold only."""
import torch


def rect(u: torch.Tensor) -> torch.Tensor:
    """1 on (-1/2, 1/2), else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u)


class DenseJumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, g):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return (z > threshold) * g, (-(threshold / eps) * rect((z - threshold) / eps) * g).sum(0), None


class DenseStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z)

    @staticmethod
    def backward(ctx, g):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, (-(1.0 / eps) * rect((z - threshold) / eps) * g).sum(0), None
