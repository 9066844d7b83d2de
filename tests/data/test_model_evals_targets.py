"""Model evals of SAEs that write elsewhere than they read: a transcoder spliced in place of its
target hook, a crosscoder in place of every layer it reads; checked against hooks written here."""
import pytest
import torch

from data_helpers import BOS, make_model
from saefast import SAEConfig, create_sae
from saefast.evals.model_evals import sae_hooks, spliced_ce_eval

pytest.importorskip("transformer_lens")


def tokens(n=6, seq=12, seed=0):
    t = torch.randint(3, 40, (n, seq), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = BOS
    return t


def ce_with(model, batch, hooks):
    logits = model.run_with_hooks(batch, fwd_hooks=hooks) if hooks else model(batch)
    logp = logits[:, :-1].log_softmax(-1)
    return float(-logp.gather(-1, batch[:, 1:, None]).mean())


def scaling_transcoder(scale):
    """A ReLU skip transcoder whose latents never fire: its output is scale * input (W_skip = scale * I),
    read at blocks.0.hook_resid_post and written at blocks.1.hook_resid_mid."""
    sae = create_sae(SAEConfig(d_in=16, d_out=16, d_sae=32, architecture="relu", skip_connection=True, device="cpu",
                               hook_spec="blocks.0.hook_resid_post", hook_spec_out="blocks.1.hook_resid_mid"))
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
        sae.W_skip.copy_(scale * torch.eye(16))
    return sae


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_transcoder_is_spliced_in_place_of_its_target_hook(scale):
    # the transcoder puts scale * (block 1's input) in place of block 1's mid-residual
    model = make_model()
    batch = tokens()
    sae = scaling_transcoder(scale)
    assert sae_hooks(sae) == (["blocks.0.hook_resid_post"], ["blocks.1.hook_resid_mid"])
    got = spliced_ce_eval(model, sae, batch, exclude_token_ids={BOS})
    keep = (batch != BOS)[..., None]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=["blocks.1.hook_resid_pre"])
    block_input = cache["blocks.1.hook_resid_pre"]

    def scaled(act, hook=None):
        return torch.where(keep, block_input * scale, act)

    def zeroed(act, hook=None):
        return torch.where(keep, torch.zeros_like(act), act)

    with torch.no_grad():
        assert got["ce_clean"] == pytest.approx(ce_with(model, batch, []), rel=1e-5)
        assert got["ce_spliced"] == pytest.approx(ce_with(model, batch, [("blocks.1.hook_resid_mid", scaled)]),
                                                  rel=1e-5)
        assert got["ce_zero_ablation"] == pytest.approx(
            ce_with(model, batch, [("blocks.1.hook_resid_mid", zeroed)]), rel=1e-5)
    assert got["kl"] > 1e-4 and got["ce_spliced"] != pytest.approx(got["ce_clean"], rel=1e-4)


def test_crosscoder_is_spliced_in_place_of_every_layer():
    model = make_model()
    batch = tokens(seed=1)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    sae = create_sae(SAEConfig(d_in=32, d_sae=40, architecture="crosscoder", crosscoder_layers=2,
                               crosscoder_hooks=hooks, device="cpu", seed=0))
    got = spliced_ce_eval(model, sae, batch, exclude_token_ids={BOS})
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=hooks)
        recon = sae.eval().reconstruct(torch.cat([cache[h] for h in hooks], dim=-1))  # from the clean layers
        keep = (batch != BOS)[..., None]

        def put(i):
            return lambda act, hook=None: torch.where(keep, recon[..., 16 * i:16 * (i + 1)], act)

        want = ce_with(model, batch, [(h, put(i)) for i, h in enumerate(hooks)])
    assert got["ce_spliced"] == pytest.approx(want, rel=1e-5)


def test_a_transcoder_without_its_target_hook_asks_for_it():
    sae = create_sae(SAEConfig(d_in=16, d_out=16, d_sae=32, architecture="relu", device="cpu",
                               hook_spec="blocks.0.hook_resid_post"))
    with pytest.raises(ValueError, match="pass target_hook="):
        spliced_ce_eval(make_model(), sae, tokens())
    plain = create_sae(SAEConfig(d_in=16, d_sae=32, architecture="relu", device="cpu"))
    with pytest.raises(ValueError, match="target_hook= is the hook a transcoder writes"):
        sae_hooks(plain, "blocks.0.hook_resid_post", target_hook="blocks.1.hook_resid_pre")
