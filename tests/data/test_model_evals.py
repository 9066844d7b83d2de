"""saefast.evals.model_evals: spliced CE / CE recovered / KL on known cases and against a direct
computation, and differentiable end-to-end losses with gradients into the SAE only."""
import pytest

pytest.importorskip("transformer_lens")  # absent on the lent GPU machine

import math

import torch
import torch.nn.functional as F

from data_helpers import BOS, PAD, TINY_CFG, LinearSAE, block_call_counter, make_model
from saefast.evals.model_evals import e2e_losses, spliced_ce_eval

HOOK = "blocks.1.hook_resid_pre"
D = TINY_CFG["d_model"]


def make_tokens(batch=4, seq=9, seed=0):
    tokens = torch.randint(3, TINY_CFG["d_vocab"], (batch, seq), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = BOS
    return tokens


def replace_with(sae):
    def hook(act, hook=None):
        return sae(act)[0]
    return hook


def direct_ce_and_kl(model, tokens, sae):
    """Plain computation: F.cross_entropy over all predictions, F.kl_div per token."""
    with torch.no_grad():
        clean = model(tokens)
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, replace_with(sae))])
    V = clean.shape[-1]
    ce = lambda logits: F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1)).item()
    kl = F.kl_div(spliced.log_softmax(-1).reshape(-1, V), clean.log_softmax(-1).reshape(-1, V),
                  log_target=True, reduction="batchmean").item()
    return ce(clean), ce(spliced), kl


def test_identity_sae_recovers_everything():
    model = make_model()
    out = spliced_ce_eval(model, LinearSAE(D, "identity"), make_tokens(), HOOK, batch_size=3)
    assert out["ce_spliced"] == pytest.approx(out["ce_clean"], abs=1e-6)
    assert out["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(out["ce_zero_ablation"] - out["ce_clean"]) > 1e-2  # ablation matters (random model: either way)
    assert out["kl_zero_ablation"] > 0
    assert out["n_tokens"] == 4 * 8


def test_zero_sae_recovers_nothing():
    model = make_model()
    out = spliced_ce_eval(model, LinearSAE(D, "zero"), make_tokens(), HOOK)
    assert out["ce_spliced"] == pytest.approx(out["ce_zero_ablation"], abs=1e-6)
    assert out["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert out["kl"] == pytest.approx(out["kl_zero_ablation"], rel=1e-5)


def test_random_sae_matches_direct_computation():
    model = make_model()
    tokens = make_tokens(seed=1)
    sae = LinearSAE(D, "random", seed=2)
    out = spliced_ce_eval(model, sae, tokens, HOOK, batch_size=3)
    ce_clean, ce_spliced, kl = direct_ce_and_kl(model, tokens, sae)
    assert out["ce_clean"] == pytest.approx(ce_clean, rel=1e-5)
    assert out["ce_spliced"] == pytest.approx(ce_spliced, rel=1e-5)
    assert out["kl"] == pytest.approx(kl, rel=1e-4)
    assert out["ce_delta"] == pytest.approx(ce_spliced - ce_clean, rel=1e-4, abs=1e-6)
    gap = out["ce_zero_ablation"] - ce_clean
    assert out["ce_loss_recovered"] == pytest.approx((out["ce_zero_ablation"] - ce_spliced) / gap, rel=1e-4)
    # An iterable of batches gives the same numbers.
    again = spliced_ce_eval(model, sae, iter(tokens.split(2)), HOOK)
    assert again["ce_spliced"] == pytest.approx(out["ce_spliced"], rel=1e-6)


def test_padding_is_ignored_and_excluded_tokens_keep_clean_activations():
    model = make_model()
    tokens = make_tokens(seed=3, seq=6)
    padded = torch.cat([tokens, torch.full((4, 3), PAD)], dim=1)
    sae = LinearSAE(D, "random", seed=4)
    short = spliced_ce_eval(model, sae, tokens, HOOK)
    long = spliced_ce_eval(model, sae, padded, HOOK, pad_token_id=PAD)
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "kl"):
        assert long[key] == pytest.approx(short[key], rel=1e-5), key  # causal: padding changes nothing
    keep_all = spliced_ce_eval(model, LinearSAE(D, "zero"), tokens, HOOK,
                               exclude_token_ids=set(range(TINY_CFG["d_vocab"])))
    assert keep_all["kl"] == pytest.approx(0.0, abs=1e-7) and math.isnan(keep_all["ce_loss_recovered"])
    only_bos_kept = spliced_ce_eval(model, LinearSAE(D, "zero"), tokens, HOOK, exclude_token_ids={BOS})
    assert only_bos_kept["ce_spliced"] != pytest.approx(spliced_ce_eval(model, LinearSAE(D, "zero"), tokens,
                                                                        HOOK)["ce_spliced"], rel=1e-6)


def test_eval_restores_sae_mode_and_checks_input():
    model = make_model()
    sae = LinearSAE(D, "identity").train()
    spliced_ce_eval(model, sae, make_tokens(), HOOK)
    assert sae.training
    with pytest.raises(ValueError, match="unknown hook"):
        spliced_ce_eval(model, sae, make_tokens(), "blocks.1.hook_resid_pree")
    with pytest.raises(ValueError, match="model's context is 32"):
        spliced_ce_eval(model, sae, make_tokens(seq=40), HOOK)
    with pytest.raises(ValueError, match="at least 2"):
        spliced_ce_eval(model, sae, make_tokens(seq=1), HOOK)
    with pytest.raises(ValueError, match="all padding"):
        spliced_ce_eval(model, sae, torch.full((2, 5), PAD), HOOK, pad_token_id=PAD)


def test_real_saefast_sae_is_spliced_through_the_sparse_path():
    sae_mod = pytest.importorskip("saefast.sae")
    from saefast.config import SAEConfig

    model = make_model()
    sae = sae_mod.create_sae(SAEConfig(d_in=D, d_sae=64, top_k=4, architecture="topk", device="cpu", seed=0))
    tokens = make_tokens(seed=5)
    out = spliced_ce_eval(model, sae, tokens, HOOK)
    ce_clean, ce_spliced, kl = direct_ce_and_kl(model, tokens, sae)  # the user's dense forward
    assert out["ce_spliced"] == pytest.approx(ce_spliced, rel=1e-5)
    assert out["kl"] == pytest.approx(kl, rel=1e-4)
    losses = e2e_losses(model, sae, tokens, HOOK, kl=True)
    losses["kl_loss"].backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


DOWNSTREAM = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


def direct_e2e(model, tokens, sae):
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(tokens, names_filter=DOWNSTREAM)
    captured = {}

    def grab(name):
        def hook(act, hook=None):
            captured[name] = act
        return hook

    patched_logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, replace_with(sae))] +
                                          [(h, grab(h)) for h in DOWNSTREAM])
    V = clean_logits.shape[-1]
    kl = F.kl_div(patched_logits.log_softmax(-1).reshape(-1, V), clean_logits.log_softmax(-1).reshape(-1, V),
                  log_target=True, reduction="batchmean")
    mse = torch.stack([F.mse_loss(captured[h], clean[h]) for h in DOWNSTREAM]).mean()
    return kl, mse


def test_e2e_losses_match_direct_computation_and_train_only_the_sae():
    model = make_model()
    tokens = make_tokens(seed=6)
    sae = LinearSAE(D, "random", seed=7)
    losses = e2e_losses(model, sae, tokens, HOOK, kl=True, downstream_hooks=DOWNSTREAM)
    kl, mse = direct_e2e(model, tokens, sae)
    assert losses["kl_loss"].item() == pytest.approx(kl.item(), rel=1e-4)
    assert losses["downstream_mse"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert losses["kl_loss"].requires_grad and losses["downstream_mse"].requires_grad
    (losses["kl_loss"] + losses["downstream_mse"]).backward()
    assert sae.W.grad is not None and sae.W.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the model gets no gradient ...
    assert all(p.requires_grad for p in model.parameters())  # ... and is left as it was
    expected = torch.autograd.grad(kl + mse, [sae.W])[0]
    torch.testing.assert_close(sae.W.grad, expected, rtol=1e-4, atol=1e-7)


def test_e2e_identity_sae_gives_zero_losses_and_recon_mse():
    model = make_model()
    tokens = make_tokens(seed=8)
    losses = e2e_losses(model, LinearSAE(D, "identity"), tokens, HOOK, kl=True, downstream_hooks=DOWNSTREAM)
    assert losses["kl_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["downstream_mse"].item() == pytest.approx(0.0, abs=1e-10)
    assert losses["recon_mse"].item() == pytest.approx(0.0, abs=1e-10)
    sae = LinearSAE(D, "random", seed=9)
    losses = e2e_losses(model, sae, tokens, HOOK, kl=True, exclude_token_ids={BOS})
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK][:, 1:]  # BOS (position 0) is not spliced
    assert losses["recon_mse"].item() == pytest.approx(F.mse_loss(sae(x)[0], x).item(), rel=1e-5)


def test_e2e_without_kl_stops_after_the_last_downstream_block():
    model = make_model()
    with block_call_counter(model) as calls:
        losses = e2e_losses(model, LinearSAE(D, "random"), make_tokens(), HOOK, kl=False,
                            downstream_hooks=["blocks.1.hook_resid_post"])
    assert set(calls) == {0, 1}
    assert losses["kl_loss"].item() == 0.0 and losses["downstream_mse"].item() > 0


def test_e2e_bad_input():
    model = make_model()
    sae = LinearSAE(D)
    with pytest.raises(ValueError, match="downstream hook 'blocks.0.hook_resid_post' comes before"):
        e2e_losses(model, sae, make_tokens(), HOOK, downstream_hooks=["blocks.0.hook_resid_post"])
    with pytest.raises(ValueError, match="nothing to compute"):
        e2e_losses(model, sae, make_tokens(), HOOK, kl=False)
    with pytest.raises(ValueError, match="unknown hook 'blocks.7.hook_resid_post'"):
        e2e_losses(model, sae, make_tokens(), HOOK, downstream_hooks=["blocks.7.hook_resid_post"])
