"""Reconstruction metrics and feature recovery on known cases and against dense PyTorch."""
import pytest
import torch

from saefast.config import SAEConfig
from saefast.evals.metrics import feature_recovery, reconstruction_metrics
from saefast.sae import create_sae


def _relu_sae(d_in, d_sae, seed=0):
    torch.manual_seed(seed)
    return create_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu", device="cpu")).eval()


def test_perfect_reconstruction():
    d_in = 6
    sae = _relu_sae(d_in, 2 * d_in)
    eye = torch.eye(d_in)
    with torch.no_grad():  # x = relu(x) - relu(-x)
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    batches = [torch.randn(50, d_in), torch.randn(7, d_in)]
    m = reconstruction_metrics(sae, batches)
    assert m["mse"] == pytest.approx(0, abs=1e-12) and m["relative_mse"] == pytest.approx(0, abs=1e-12)
    assert m["explained_variance"] == pytest.approx(1.0) and m["cosine_similarity"] == pytest.approx(1.0)
    x = torch.cat(batches)
    assert m["l0"] == pytest.approx(d_in) and m["l1"] == pytest.approx(x.abs().sum(1).mean().item(), rel=1e-6)
    assert m["inactive_fraction"] == 0 and m["dense_fraction"] == 1.0 and m["n_rows"] == 57
    assert "dead_fraction" not in m  # a fresh SAE has no training counters to count dead latents with


def test_predicting_the_mean_explains_nothing():
    sae = _relu_sae(5, 20)
    batches = [torch.randn(30, 5) + 2, torch.randn(10, 5) - 1]
    x = torch.cat(batches)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(x.mean(0))
    m = reconstruction_metrics(sae, batches)
    assert m["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert m["mse"] == pytest.approx((x - x.mean(0)).pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_matches_dense_pytorch(architecture):
    torch.manual_seed(3)
    cfg = SAEConfig(d_in=8, d_sae=40, top_k=3, architecture=architecture, device="cpu")
    sae = create_sae(cfg).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    batches = [torch.randn(64, 8), torch.randn(33, 8) * 2]
    m = reconstruction_metrics(sae, batches, dense_threshold=0.2)
    x = torch.cat(batches).double()
    feats = torch.cat([sae.encode(b) for b in batches]).double()
    x_hat = feats @ sae.W_dec.double() + sae.b_dec.double()
    err = (x - x_hat).pow(2)
    freq = (feats > 0).float().mean(0)
    want = {
        "mse": err.mean().item(),
        "explained_variance": 1 - err.sum().item() / (x - x.mean(0)).pow(2).sum().item(),
        "cosine_similarity": torch.nn.functional.cosine_similarity(x, x_hat, dim=1).mean().item(),
        "relative_mse": err.sum().item() / x.pow(2).sum().item(),
        "l0": (feats > 0).sum(1).double().mean().item(),
        "l1": feats.abs().sum(1).mean().item(),
        "inactive_fraction": (freq == 0).float().mean().item(),
        "dense_fraction": (freq > 0.2).float().mean().item(),
        "n_rows": 97,
    }
    assert m == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert 0 < m["inactive_fraction"] < 1 or architecture == "relu"


def test_dead_fraction_is_the_sae_training_counter_not_the_sample():
    """One meaning of dead everywhere: not fired in the last n_batches_to_dead training steps."""
    torch.manual_seed(4)
    sae = create_sae(SAEConfig(d_in=8, d_sae=40, top_k=2, architecture="topk", device="cpu", n_batches_to_dead=3))
    fired = torch.zeros(40, dtype=torch.bool)
    fired[:10] = True
    for _ in range(3):
        sae.update_inactive_features(fired)
    fired[:10] = False
    fired[10:14] = True
    sae.update_inactive_features(fired)  # latents 0-9 fired one step ago, 10-13 now, 14-39 never: 26 dead
    m = reconstruction_metrics(sae.eval(), [torch.randn(64, 8)])
    assert m["dead_fraction"] == pytest.approx(26 / 40) == pytest.approx(sae.dead_feature_percentage() / 100)
    feats = sae.encode(torch.randn(64, 8))
    assert m["inactive_fraction"] != m["dead_fraction"] or bool((feats > 0).any(0)[:14].all())


def test_feature_recovery_known_cases():
    g = torch.Generator().manual_seed(0)
    planted = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    learned = torch.cat([planted[torch.randperm(10, generator=g)] * 3.0, torch.randn(5, 16, generator=g)])
    assert feature_recovery(learned, planted) == pytest.approx(1.0)
    assert feature_recovery(torch.eye(4)[2:], torch.eye(4)[:2]) == pytest.approx(0.0)
    half = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tilted = torch.tensor([[1.0, 1.0]])  # cos 45 degrees to both
    assert feature_recovery(tilted, half) == pytest.approx(2 ** -0.5)
    assert feature_recovery(learned, planted, chunk=3) == pytest.approx(feature_recovery(learned, planted))


def test_bad_input():
    sae = _relu_sae(4, 8)
    with pytest.raises(ValueError, match="no rows"):
        reconstruction_metrics(sae, [])
    with pytest.raises(ValueError, match=r"\[batch, d_in\]"):
        reconstruction_metrics(sae, [torch.randn(4)])
    with pytest.raises(ValueError, match="dense_threshold"):
        reconstruction_metrics(sae, [torch.randn(2, 4)], dense_threshold=0)
    with pytest.raises(ValueError, match="d_in"):
        feature_recovery(torch.randn(3, 5), torch.randn(3, 4))
