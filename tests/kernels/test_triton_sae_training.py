"""The SAE classes train identically on the Triton kernels and on the PyTorch backend: a short
Adam loop with aux-K active (dead latents from the first batches), decoder projection and
renormalisation, compared weight by weight."""
import pytest
import torch

from saefast import SAEConfig, create_sae

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _train(backend, architecture, monkeypatch, steps=6):
    monkeypatch.setenv("SAEFAST_BACKEND", backend)
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=24, d_sae=70, top_k=4, top_k_aux=8, n_batches_to_dead=1, aux_penalty=0.5,
                    architecture=architecture, device=DEVICE, seed=0)
    sae = create_sae(cfg)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    aux = []
    for _ in range(steps):
        x = torch.randn(33, 24, generator=gen).to(DEVICE)
        out = sae.training_forward(x)
        out["loss"].backward()
        sae.project_decoder_gradients()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
        aux.append(float(out["aux_loss"].detach()))
    return sae.state_dict(), aux


@pytest.mark.parametrize("architecture", ["batchtopk", "topk"])
def test_sae_training_matches_across_backends(monkeypatch, architecture):
    triton_state, triton_aux = _train("triton", architecture, monkeypatch)
    torch_state, torch_aux = _train("torch", architecture, monkeypatch)
    assert sum(a > 0 for a in torch_aux) >= 3, "the aux-K loss must be exercised"
    torch.testing.assert_close(triton_aux, torch_aux, rtol=1e-4, atol=1e-6)
    assert triton_state.keys() == torch_state.keys()
    for name in torch_state:
        torch.testing.assert_close(triton_state[name], torch_state[name], rtol=1e-4, atol=1e-5, msg=name)
