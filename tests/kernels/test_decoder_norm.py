"""Decoder-norm ops (normalise, project, both in one pass) on every backend against dense
PyTorch, and the Triton kernel's one-tile and two-pass paths."""
import pytest
import torch

import saefast
from saefast import torch_backend
from saefast.kernels import decoder_norm
from kernel_utils import DEVICE, DTYPES, assert_close


@pytest.mark.parametrize("d_sae,d_in", [(1, 5), (37, 19), (130, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_norm_ops(backend, d_sae, d_in, dtype):
    gen = torch.Generator().manual_seed(d_sae)
    W = (3 * torch.randn(d_sae, d_in, generator=gen)).to(dtype).to(DEVICE)
    W[0] = 0  # a zero row stays zero instead of becoming NaN
    G = torch.randn(d_sae, d_in, generator=gen).to(dtype).to(DEVICE)
    Wd, Gd = W.cpu().double(), G.cpu().double()
    unit = Wd / Wd.norm(dim=1, keepdim=True).clamp_min(1e-12)
    proj = Gd - (Gd * unit).sum(1, keepdim=True) * unit

    W1 = W.clone()
    saefast.normalize_decoder_(W1)
    assert_close(W1.cpu(), unit, dtype)
    G1 = G.clone()
    saefast.project_decoder_grad_(W, G1)
    assert_close(G1.cpu(), proj, dtype, scale=4)
    W2, G2 = W.clone(), G.clone()
    saefast.normalize_decoder_and_project_grad_(W2, G2)
    assert_close(W2.cpu(), unit, dtype)
    assert_close(G2.cpu(), proj, dtype, scale=4)
    p = torch.nn.Parameter(W.clone())
    p.grad = G.clone()
    saefast.project_decoder_grad_(p, p.grad)
    saefast.normalize_decoder_(p)
    assert_close(p.detach().cpu(), unit, dtype)



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_tile_max", [8192, 64], ids=["one-tile", "two-pass"])
def test_decoder_norm_kernel_modes(dtype, one_tile_max, monkeypatch):
    monkeypatch.setattr(decoder_norm, "MAX_ONE_TILE_D", one_tile_max)
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(77, 300, generator=gen).to(dtype).to(DEVICE)
    G = torch.randn(77, 300, generator=gen).to(dtype).to(DEVICE)
    for normalize, project in [(True, False), (False, True), (True, True)]:
        W1, G1, W2, G2 = W.clone(), G.clone(), W.clone(), G.clone()
        decoder_norm.decoder_norm_(W1, G1, normalize=normalize, project=project)
        if normalize and project:
            torch_backend.normalize_decoder_and_project_grad_(W2, G2)
        elif normalize:
            torch_backend.normalize_decoder_(W2)
        else:
            torch_backend.project_decoder_grad_(W2, G2)
        assert_close(W1, W2, dtype)
        assert_close(G1, G2, dtype, scale=4)

