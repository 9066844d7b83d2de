"""Feature patching inside a model forward equals the hand computation; the ablation study; edits of codes."""
import pytest
import torch

from analysis_helpers import BOS, HOOK, PAD, dense_topk_codes, make_model, make_sae, random_windows
from saefast import SAEConfig, TopKSAE, topk_encode
from saefast.analysis.patching import ablation_study, edit_acts, feature_patch_hook, patch_features
from saefast.data.models import run_to_hook
from saefast.evals.model_evals import spliced_ce_eval


def _dense_edit(dense, ablate=(), scale=None, set_values=None, rows=None):
    out = dense.clone()
    rows = torch.ones(dense.shape[0], dtype=torch.bool) if rows is None else rows
    for f in ablate:
        out[rows, f] = 0
    for f, s in (scale or {}).items():
        out[rows, f] *= s
    for f, v in (set_values or {}).items():
        out[rows, f] = v
    return out


def test_edit_acts_matches_dense_edit():
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(9, 6, generator=g), torch.randn(6, 20, generator=g), torch.randn(6, generator=g)
    acts = topk_encode(x, W, b, 4, mode="row")
    rows = torch.tensor([True, False, True, True, False, True, True, False, True])
    dense = acts.to_dense()
    active = torch.nonzero(dense[0]).flatten().tolist()
    edits = dict(ablate=[active[0], 13], scale={active[1]: 3.0}, set_values={5: 2.5, active[2]: -1.0})
    for r in (None, rows):
        edited = edit_acts(acts, rows=r, **edits)
        torch.testing.assert_close(edited.to_dense(), _dense_edit(dense, rows=r, **edits))
        keys = edited.row_ids.long() * 20 + edited.indices.long()
        assert bool((keys[1:] > keys[:-1]).all())                        # still sorted by (row, latent)
        counts = torch.bincount(edited.row_ids.long(), minlength=9)
        assert edited.offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    with pytest.raises(ValueError, match="feature 5 is in both ablate and set_values"):
        edit_acts(acts, ablate=[5], set_values={5: 1.0})
    with pytest.raises(ValueError, match="nothing to patch"):
        edit_acts(acts)
    with pytest.raises(ValueError, match=r"ablate: feature 20 is not in \[0, d_sae=20\)"):
        edit_acts(acts, ablate=[20])
    with pytest.raises(ValueError, match=r"rows must be a bool tensor \[9\]"):
        edit_acts(acts, ablate=[1], rows=torch.ones(3, dtype=torch.bool))


def _logits_with(model, tokens, new_act):
    return model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: new_act)])


@torch.no_grad()
@pytest.mark.parametrize("edit", [dict(ablate=[0]), dict(scale={0: 4.0}), dict(set_values={1: 3.0})])
def test_patching_changes_logits_as_computed_by_hand(edit):
    model, sae = make_model(), make_sae(seed=4)
    tokens = random_windows(3, 10, seed=7)
    act = run_to_hook(model, tokens, HOOK)                        # [3, 10, 16]
    x = act.reshape(-1, sae.d_in)
    dense = dense_topk_codes(sae, x)
    # feature 0 / 1 of the edit are the most active feature / an inactive one, so the edit bites
    top = int(dense.gt(0).sum(0).argmax())
    idle = int(dense.gt(0).sum(0).argmin())
    edit = {k: ([top] if k == "ablate" else {(top if k == "scale" else idle): list(v.values())[0]})
            for k, v in edit.items()}
    positions = torch.zeros(3, 10, dtype=torch.bool)
    positions[:, 2:7] = True
    rows = positions.reshape(-1)
    edited = _dense_edit(dense, rows=rows, **edit)
    by_hand = (x + (edited - dense) @ sae.W_dec).reshape(act.shape)
    expected = _logits_with(model, tokens, by_hand)
    clean = model(tokens)

    sae.train()
    with patch_features(model, sae, ablate=edit.get("ablate"), scale=edit.get("scale"),
                        set_values=edit.get("set_values"), positions=positions):
        assert not sae.training
        patched = model(tokens)
    assert sae.training                                           # mode restored
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-4)
    assert (patched - clean).abs().max() > 1e-3                   # the edit changes the logits ...
    torch.testing.assert_close(patched[:, :2], clean[:, :2], rtol=1e-5, atol=1e-5)  # ... only from position 2
    torch.testing.assert_close(model(tokens), clean)              # the hook is gone after the block

    # without the error term the patched positions get the edited reconstruction itself
    replaced = torch.where(rows[:, None], edited @ sae.W_dec + sae.b_dec, x).reshape(act.shape)
    with patch_features(model, sae, HOOK, keep_error=False, positions=positions, **edit):
        torch.testing.assert_close(model(tokens), _logits_with(model, tokens, replaced), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_patch_hook_positions_forms_and_errors():
    model, sae = make_model(), make_sae(seed=5)
    tokens = random_windows(2, 6, seed=1)
    act = run_to_hook(model, tokens, HOOK)
    by_list = feature_patch_hook(sae, scale={3: 0.0}, positions=[1, 4])(act)
    mask = torch.zeros(6, dtype=torch.bool)
    mask[[1, 4]] = True
    torch.testing.assert_close(feature_patch_hook(sae, scale={3: 0.0}, positions=mask)(act), by_list)
    torch.testing.assert_close(feature_patch_hook(sae, ablate=[3], positions=mask[None].expand(2, 6))(act), by_list)
    assert torch.equal(by_list[:, [0, 2, 3, 5]], act[:, [0, 2, 3, 5]])
    with pytest.raises(ValueError, match="outside the sequence of length 6"):
        feature_patch_hook(sae, ablate=[3], positions=[6])(act)
    with pytest.raises(ValueError, match="width 7 but the SAE has d_in=16"):
        feature_patch_hook(sae, ablate=[3])(torch.randn(2, 6, 7))
    with pytest.raises(ValueError, match="unknown hook"):
        with patch_features(model, sae, "blocks.0.hook_nope", ablate=[1]):
            pass
    with pytest.raises(TypeError, match=r"scale must be a dict \{feature id: value\}"):
        feature_patch_hook(sae, scale=[1, 2])


@torch.no_grad()
def test_ablation_study_matches_spliced_eval_and_hand_ablation():
    model, sae = make_model(), make_sae(seed=6)
    tokens = random_windows(5, 9, seed=2, pad_lengths=[9, 6])
    features = [0, 7, 21]
    out = ablation_study(model, sae, tokens, features=features, batch_size=2, exclude_token_ids={BOS},
                         pad_token_id=PAD)
    assert out["spliced"] == pytest.approx(spliced_ce_eval(model, sae, tokens, HOOK, batch_size=2,
                                                           exclude_token_ids={BOS}, pad_token_id=PAD))
    real = tokens != PAD
    patchable = real & (tokens != BOS)
    pred = (real[:, :-1] & real[:, 1:]).float()
    act = run_to_hook(model, tokens, HOOK)
    x = act.reshape(-1, sae.d_in)
    dense = dense_topk_codes(sae, x)
    clean_ce = -model(tokens)[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert out["spliced"]["ce_clean"] == pytest.approx(float((clean_ce * pred).sum() / pred.sum()), rel=1e-5)
    for row, f in zip(out["features"], features):
        edited = _dense_edit(dense, ablate=[f], rows=patchable.reshape(-1))
        logits = _logits_with(model, tokens, (x + (edited - dense) @ sae.W_dec).reshape(act.shape))
        ce = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        expected = float((ce * pred).sum() / pred.sum())
        assert row["feature"] == f and row["ce"] == pytest.approx(expected, rel=1e-5)
        assert row["ce_delta"] == pytest.approx(expected - out["spliced"]["ce_clean"], rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match=r"features: feature 48 is not in \[0, d_sae=48\)"):
        ablation_study(model, sae, tokens, features=[48])


def test_patching_an_sae_with_input_unit_norm_keeps_untouched_features():
    """With the error term kept, editing one feature moves the activation by exactly its own
    (unstandardised) contribution, also for an SAE that standardises its input."""
    sae = TopKSAE(SAEConfig(d_in=16, d_sae=40, top_k=3, architecture="topk", device="cpu", seed=9,
                            input_unit_norm=True, hook_spec=HOOK)).eval()
    g = torch.Generator().manual_seed(3)
    act = torch.randn(2, 5, 16, generator=g)
    x = act.reshape(-1, 16)
    mean = x.mean(-1, keepdim=True)
    std = (x - mean).std(-1, keepdim=True)
    dense = dense_topk_codes(sae, (x - mean) / (std + 1e-5))
    f = int(dense.gt(0).sum(0).argmax())
    out = feature_patch_hook(sae, scale={f: 2.0})(act).reshape(-1, 16)
    torch.testing.assert_close(out, x + (dense[:, f:f + 1] * sae.W_dec[f]) * std, rtol=1e-5, atol=1e-5)
