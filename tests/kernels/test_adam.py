"""SAEAdam (saefast.optim) and the fused decoder Adam kernel: the decoder's projection, Adam update
and renormalisation in one step equal torch.optim.Adam between the separate ops, on every backend
(the fused kernel on Triton, the parts one after the other elsewhere), for several steps on fresh
gradients, with the state_dict interchangeable with torch's Adam."""
import pytest
import torch

import saefast
from saefast import ops
from saefast.kernels import adam as adam_kernel
from saefast.optim import SAEAdam
from kernel_utils import DEVICE, assert_close

STEPS = 4


def _params(d_sae, d_in, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=gen).to(dtype).to(DEVICE)
    W_dec = torch.randn(d_sae, d_in, generator=gen).to(dtype).to(DEVICE)
    W_dec[0] = 0  # the projection's zero-norm guard
    saefast.normalize_decoder_(W_dec)
    b_dec = torch.randn(d_in, generator=gen).to(dtype).to(DEVICE)
    return [torch.nn.Parameter(t) for t in (W_enc, W_dec, b_dec)], gen


def _grads(params, gen):
    return [(torch.randn(p.shape, generator=gen) * 10 ** float(torch.randint(-3, 2, (), generator=gen))).to(p)
            for p in params]


def _reference_steps(params, grads_per_step, lr, betas, project, normalize):
    """torch.optim.Adam (single-tensor) on fp32 copies, with the projection and renormalisation as
    separate dense PyTorch ops around it."""
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opt = torch.optim.Adam(ref, lr=lr, betas=betas, foreach=False)
    for grads in grads_per_step:
        for p, g in zip(ref, grads):
            p.grad = g.float().clone()
        W, G = ref[1].data, ref[1].grad
        if project:
            unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
            G -= (G * unit).sum(1, keepdim=True) * unit
        opt.step()
        if normalize:
            W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return ref


@pytest.mark.parametrize("d_sae,d_in", [(1, 5), (37, 19), (70, 300)])
@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True)], ids=["both", "project", "normalize"])
def test_sae_adam_equals_torch_adam_between_the_ops(backend, d_sae, d_in, flags):
    project, normalize = flags
    params, gen = _params(d_sae, d_in, torch.float32, seed=d_sae + d_in)
    lr, betas = 3e-3, (0.9, 0.99)
    opt = SAEAdam(params, lr=lr, betas=betas, decoder=params[1], project_decoder_grad=project,
                  normalize_decoder=normalize)
    grads_per_step = [_grads(params, gen) for _ in range(STEPS)]
    expected = _reference_steps(params, grads_per_step, lr, betas, project, normalize)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g), "the step must leave the gradients as backward wrote them"
    for name, p, e in zip(("W_enc", "W_dec", "b_dec"), params, expected):
        torch.testing.assert_close(p.detach().cpu(), e.detach().cpu(), rtol=2e-6, atol=1e-7, msg=name)
    assert float(opt.state[params[1]]["step"]) == STEPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_tile_max", [4096, 64], ids=["one-tile", "wide-rows"])
def test_fused_kernel_against_float64(dtype, one_tile_max, monkeypatch):
    """One step of the kernel from a random state against the formula in float64, on both of its
    paths (rows in registers, and rows wider than MAX_ONE_TILE_D in three sweeps)."""
    monkeypatch.setattr(adam_kernel, "MAX_ONE_TILE_D", one_tile_max)
    gen = torch.Generator().manual_seed(7)
    R, D = 45, 300
    W = torch.randn(R, D, generator=gen).to(dtype).to(DEVICE)
    G = torch.randn(R, D, generator=gen).to(dtype).to(DEVICE)
    M = (0.1 * torch.randn(R, D, generator=gen)).to(dtype).to(DEVICE)
    V = (0.01 * torch.rand(R, D, generator=gen)).to(dtype).to(DEVICE)
    Wd, Gd, Md, Vd = (t.cpu().double() for t in (W, G, M, V))
    b1, b2, eps, lr, step = 0.9, 0.999, 1e-8, 1e-2, 3
    step_size, bc2 = lr / (1 - b1 ** step), (1 - b2 ** step) ** 0.5
    unit = Wd / Wd.norm(dim=1, keepdim=True)
    g = Gd - (Gd * unit).sum(1, keepdim=True) * unit
    Md = Md + (1 - b1) * (g - Md)
    Vd = b2 * Vd + (1 - b2) * g * g
    Wd = Wd - step_size * Md / (Vd.sqrt() / bc2 + eps)
    Wd = Wd / Wd.norm(dim=1, keepdim=True)
    G0 = G.clone()
    adam_kernel.decoder_adam_(W, G, M, V, step_size=step_size, beta1=b1, beta2=b2, eps=eps,
                              bias_correction2_sqrt=bc2, project=True, normalize=True)
    assert torch.equal(G, G0)
    assert_close(M.cpu(), Md, dtype)
    assert_close(V.cpu(), Vd, dtype)
    assert_close(W.cpu(), Wd, dtype)


def test_state_dict_moves_between_sae_adam_and_torch_adam(backend):
    params, gen = _params(33, 24, torch.float32, seed=3)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = SAEAdam(params, lr=1e-2, decoder=params[1])
    theirs = SAEAdam(twin, lr=1e-2, decoder=twin[1])
    first = _grads(params, gen)
    for ps, opt in ((params, ours), (twin, theirs)):
        for p, g in zip(ps, first):
            p.grad = g.clone()
        opt.step()
    plain = torch.optim.Adam(twin, lr=1e-2)
    plain.load_state_dict(theirs.state_dict())  # SAEAdam -> torch.optim.Adam -> SAEAdam
    back = SAEAdam(twin, lr=1e-2, decoder=twin[1])
    back.load_state_dict(plain.state_dict())
    second = _grads(params, gen)
    for ps, opt in ((params, ours), (twin, back)):
        for p, g in zip(ps, second):
            p.grad = g.clone()
        opt.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def test_sae_adam_rejects_a_decoder_it_does_not_update():
    params, _ = _params(5, 4, torch.float32, seed=1)
    with pytest.raises(ValueError, match="decoder must be one of the parameters"):
        SAEAdam(params[:1], decoder=params[1])
    with pytest.raises(ValueError, match=r"decoder must be the SAE's W_dec"):
        SAEAdam(params, decoder=params[2])


def test_fused_decoder_adam_is_the_triton_backend_s(monkeypatch):
    W = torch.randn(4, 3, device=DEVICE)
    monkeypatch.setenv("SAEFAST_BACKEND", "triton")
    assert ops.has_fused_decoder_adam(W)
    monkeypatch.setenv("SAEFAST_BACKEND", "torch")
    assert not ops.has_fused_decoder_adam(W)
    with pytest.raises(RuntimeError, match="runs the parts one after the other"):
        ops.decoder_adam_(W, W.clone(), W.clone(), W.clone(), step_size=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                          bias_correction2_sqrt=1.0)
