"""The acausal crosscoder: against a dense PyTorch oracle of its maths on both backends (encoder
summed over layers, decoder writing every layer, L1 weighted by per-layer decoder norms), sparse
end to end, planted features that span layers, the saved layout, bad configs."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from saefast import CrosscoderSAE, SAEConfig, SparseActs, create_sae, load_sae
from saefast.data.synthetic import SyntheticActivations
from saefast.evals.metrics import feature_recovery

TOL = dict(rtol=2e-4, atol=2e-5)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SAEFAST_BACKEND", request.param)
    return request.param


def make_crosscoder(L, d, d_sae, l1=0.05, seed=0, **extra):
    cfg = SAEConfig(d_in=L * d, d_sae=d_sae, architecture="crosscoder", crosscoder_layers=L, l1_coefficient=l1,
                    device="cpu", seed=seed, **extra)
    sae = create_sae(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.05 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(L * d, generator=g))
        sae.W_dec.mul_(1 + torch.rand(d_sae, L * d, generator=g))  # per-layer norms that differ
    return sae


def dense_crosscoder(p, x, L, l1):
    """Per layer: pre = relu(sum_l (x_l - b_dec_l) @ W_enc_l + b_enc); x_hat_l = a @ W_dec[:, l] + b_dec_l;
    L1 weighted by sum_l ||W_dec[i, l]||."""
    B = x.shape[0]
    d = x.shape[1] // L
    xl = (x - p["b_dec"]).view(B, L, d)
    W_enc = p["W_enc"].view(L, d, -1)
    pre = F.relu(sum(xl[:, layer] @ W_enc[layer] for layer in range(L)) + p["b_enc"])
    W_dec = p["W_dec"].view(-1, L, d)
    out = torch.stack([pre @ W_dec[:, layer] for layer in range(L)], dim=1).flatten(1) + p["b_dec"]
    weight = W_dec.norm(dim=-1).sum(-1)
    sparsity = l1 * (pre * weight).sum(-1).mean()
    mse = (out - x).pow(2).mean()
    return {"loss": mse + sparsity, "mse_loss": mse, "sparsity_loss": sparsity, "x_recon": out, "features": pre}


@pytest.mark.parametrize("L,d,d_sae,B", [(3, 8, 40, 17), (2, 5, 33, 1), (4, 6, 64, 30)])
def test_crosscoder_matches_dense_oracle_forward_and_backward(backend, L, d, d_sae, B):
    sae = make_crosscoder(L, d, d_sae)
    x = torch.randn(B, L * d, generator=torch.Generator().manual_seed(2))
    out = sae.training_forward(x)
    out["loss"].backward()
    p = {n: t.detach().clone().requires_grad_() for n, t in sae.named_parameters()}
    want = dense_crosscoder(p, x, L, sae.config.l1_coefficient)
    want["loss"].backward()
    for key in ("loss", "mse_loss", "sparsity_loss", "x_recon"):
        torch.testing.assert_close(out[key].float(), want[key].float(), **TOL, msg=key)
    assert float(want["sparsity_loss"].detach()) > 0
    torch.testing.assert_close(out["acts"].to_dense(), want["features"], **TOL)
    for name, param in sae.named_parameters():
        torch.testing.assert_close(param.grad, p[name].grad, **TOL, msg=f"grad {name}")
    torch.testing.assert_close(sae.decoder_norms(), p["W_dec"].detach().view(d_sae, L, d).norm(dim=-1))


def test_crosscoder_keeps_decoder_norms_free_and_stays_sparse(monkeypatch):
    monkeypatch.setattr(SparseActs, "to_dense", lambda self: pytest.fail("the training path went dense"))
    sae = make_crosscoder(3, 8, 40)
    x = torch.randn(12, 24)
    out = sae.training_forward(x)
    out["loss"].backward()
    W, grad = sae.W_dec.detach().clone(), sae.W_dec.grad.clone()
    sae.project_decoder_gradients()
    sae.normalize_decoder()
    assert torch.equal(sae.W_dec, W) and torch.equal(sae.W_dec.grad, grad)
    assert sae.layer_view(x).shape == (12, 3, 8)


def test_crosscoder_initial_decoder_has_norm_one_over_L_per_layer():
    sae = create_sae(SAEConfig(d_in=30, d_sae=20, architecture="crosscoder", crosscoder_layers=3, device="cpu", seed=4))
    torch.testing.assert_close(sae.decoder_norms(), torch.full((20, 3), 1 / 3))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())


def test_crosscoder_recovers_features_that_span_layers():
    torch.manual_seed(0)
    src = SyntheticActivations(16, 32, 256, mean_active=3.0, n_layers=3, seed=2)
    assert src.d_in == 48 and src.layer_spans.sum(1).min() >= 1
    assert (src.layer_spans.sum(1) > 1).any() and (src.layer_spans.sum(1) < 3).any()
    sae = create_sae(SAEConfig(d_in=48, d_sae=64, architecture="crosscoder", crosscoder_layers=3,
                               l1_coefficient=1e-3, device="cpu", seed=0))
    opt = torch.optim.Adam(sae.parameters(), lr=5e-3)
    for _ in range(600):
        out = sae.training_forward(next(src))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert feature_recovery(sae.W_dec, src.true_features) > 0.9
    # each planted feature's best latent writes (almost only) the layers the feature lives in
    best = (src.true_features @ F.normalize(sae.W_dec.detach(), dim=1).T).argmax(1)
    norms = sae.decoder_norms()[best].detach()
    outside = (norms * ~src.layer_spans).sum(1) / norms.sum(1)
    assert float(outside.mean()) < 0.05


def test_crosscoder_saves_as_a_saelens_standard_sae_over_the_concatenation(tmp_path):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    sae = make_crosscoder(3, 6, 25, crosscoder_hooks=hooks, hook_spec=hooks[-1])
    folder = sae.save(tmp_path / "cc")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["d_in"] == 18
    assert cfg["saefast"]["config"]["crosscoder_hooks"] == hooks
    w = load_file(str(folder / "sae_weights.safetensors"))
    x = torch.randn(7, 18)
    acts = F.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # SAELens's StandardSAE maths
    torch.testing.assert_close(sae.reconstruct(x), acts @ w["W_dec"] + w["b_dec"], **TOL)
    back = load_sae(folder)
    assert isinstance(back, CrosscoderSAE) and back.n_layers == 3 and back.config.crosscoder_hooks == hooks
    for key, value in sae.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_crosscoder_bad_configs_name_the_fix():
    with pytest.raises(ValueError, match="d_in=10 must be crosscoder_layers=3 times"):
        SAEConfig(d_in=10, d_sae=20, architecture="crosscoder", crosscoder_layers=3)
    with pytest.raises(ValueError, match="must name 2 hooks"):
        SAEConfig(d_in=10, d_sae=20, architecture="crosscoder", crosscoder_layers=2, crosscoder_hooks=["a"])
    with pytest.raises(ValueError, match="d_out .* does not apply"):
        SAEConfig(d_in=10, d_sae=20, architecture="crosscoder", crosscoder_layers=2, d_out=5)
