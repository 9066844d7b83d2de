"""Analysis of SAEs that do not read and write one hook: a transcoder (database of its input hook,
ablations at its target hook, online patching) and a crosscoder (database of its layers
concatenated, ablations at every layer, which layers its features write); saefast analyze on such
runs and on a member of a multi-hook run."""
import json

import pytest
import torch

from analysis_helpers import BOS, make_model, make_texts, random_windows, write_jsonl
from saefast import SAEConfig, create_sae
from saefast.analysis import ablation_study, build_database, patch_features
from saefast.cli import main
from saefast.data.models import run_to_hooks

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
LAYERS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def transcoder(skip=True):
    sae = create_sae(SAEConfig(d_in=16, d_out=16, d_sae=40, architecture="topk", top_k=4, skip_connection=skip,
                               device="cpu", seed=0, hook_spec=IN, hook_spec_out=OUT, train_b_enc=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(0.05 * torch.randn(40, generator=g))
        if skip:
            sae.W_skip.copy_(0.1 * torch.randn(16, 16, generator=g))
    return sae.eval()


def crosscoder():
    return create_sae(SAEConfig(d_in=32, d_sae=40, architecture="crosscoder", crosscoder_layers=2,
                                crosscoder_hooks=LAYERS, device="cpu", seed=0)).eval()


def ce(logits, batch):
    logp = logits[:, :-1].log_softmax(-1)
    return float(-logp.gather(-1, batch[:, 1:, None]).mean())


@pytest.mark.parametrize("which", ["transcoder", "crosscoder"])
def test_database_encodes_what_the_sae_reads(which):
    model, sae = make_model(), transcoder() if which == "transcoder" else crosscoder()
    tokens = random_windows(5, 10, seed=2)
    db = build_database(sae, model, tokens, exclude_token_ids={BOS}, progress=False)
    reads = [IN] if which == "transcoder" else LAYERS
    acts = run_to_hooks(model, tokens, reads)
    x = torch.cat([acts[h] for h in reads], dim=-1)[tokens != BOS]
    dense = torch.zeros(db.n_tokens, db.d_sae)
    dense[db.token_index, db.feature_ids.long()] = db.values
    torch.testing.assert_close(dense, sae.encode(x), rtol=1e-5, atol=1e-6)


def test_transcoder_ablations_write_its_target_and_match_online_patching():
    model, sae = make_model(), transcoder()
    tokens = random_windows(4, 12, seed=3)
    features = [int(f) for f in sae.encode(run_to_hooks(model, tokens, [IN])[IN]).sum((0, 1)).topk(3).indices]
    study = ablation_study(model, sae, tokens, features=features, exclude_token_ids={BOS})
    keep = tokens != BOS
    with torch.no_grad():
        x = run_to_hooks(model, tokens, [IN])[IN]
        for row in study["features"]:
            codes = sae.encode(x)
            ablated = codes.clone()
            ablated[..., row["feature"]] = 0
            delta = sae.decode(ablated, x) - sae.decode(codes, x)  # the difference lands at the target hook

            def add(act, hook=None):
                return torch.where(keep[..., None], act + delta, act)

            assert row["ce"] == pytest.approx(ce(model.run_with_hooks(tokens, fwd_hooks=[(OUT, add)]), tokens),
                                              rel=1e-5)
            with patch_features(model, sae, ablate=[row["feature"]], positions=keep):
                assert row["ce"] == pytest.approx(ce(model(tokens), tokens), rel=1e-5)
    assert study["spliced"]["n_tokens"] > 0


def test_crosscoder_ablations_write_every_layer_and_refuse_online_patching():
    model, sae = make_model(), crosscoder()
    tokens = random_windows(4, 12, seed=4)
    with torch.no_grad():
        acts = run_to_hooks(model, tokens, LAYERS)
        x = torch.cat([acts[h] for h in LAYERS], dim=-1)
        codes = sae.encode(x)
    feature = int(codes.sum((0, 1)).argmax())
    study = ablation_study(model, sae, tokens, features=[feature], exclude_token_ids={BOS})
    keep = (tokens != BOS)[..., None]
    with torch.no_grad():
        ablated = codes.clone()
        ablated[..., feature] = 0
        delta = sae.decode(ablated) - sae.decode(codes)

        def add(i):
            return lambda act, hook=None: torch.where(keep, act + delta[..., 16 * i:16 * (i + 1)], act)

        want = ce(model.run_with_hooks(tokens, fwd_hooks=[(h, add(i)) for i, h in enumerate(LAYERS)]), tokens)
    assert study["features"][0]["ce"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="ablation_study encodes the clean activations first"):
        with patch_features(model, sae, ablate=[feature]):
            pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("targets")
    data = tmp / "docs.jsonl"
    write_jsonl(data, make_texts(30, 0))
    return tmp, data


@pytest.mark.parametrize("name,extra", [
    ("tc", ["--hook", IN, "--target-hook", OUT, "--skip-connection"]),
    ("cc", ["--architecture", "crosscoder", "--hooks", "all-resid"]),
    ("multi", ["--hook", LAYERS[0], "--hook", LAYERS[1]]),
])
def test_saefast_analyze_on_transcoder_crosscoder_and_multi_hook_runs(runs, monkeypatch, capsys, name, extra):
    tmp, data = runs
    model = make_model()
    monkeypatch.setattr("saefast.data.models.load_model", lambda name, device="cpu", dtype=None: model)
    argv = ["train", "--model", "tiny", "--dataset", str(data), "--out-dir", str(tmp), "--run-name", name,
            "--context-size", "12", "--batch-size", "32", "--model-batch-size", "4", "--buffer-tokens", "96",
            "--eval-batches", "1", "--eval-ce-batches", "1", "--expansion-factor", "2", "--train-steps", "3",
            "--no-progress-bar", "--no-tensorboard", *extra]
    if name != "cc":  # a crosscoder has no TopK selection: --top-k would be refused
        argv += ["--top-k", "3"]
    assert main(argv) == 0, capsys.readouterr().err
    run = tmp / name / LAYERS[1] if name == "multi" else tmp / name
    assert main(["analyze", str(run), "--n-tokens", "200", "--features", "3"]) == 0, capsys.readouterr().err
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert summary["sparsity"]["n_tokens"] == 200 and "ce_loss_recovered" in summary["ablation"]
    assert len(summary["feature_ablation"]) == 3
    rec = summary["reconstruction"]
    assert rec["n_rows"] > 0 and rec["explained_variance"] == rec["explained_variance"]
    if name == "tc":
        assert summary["hook"] == IN and summary["target_hook"] == OUT
    if name == "cc":
        layers = [f"blocks.{i}.hook_resid_post" for i in range(2)]
        assert summary["hook"] == layers and summary["crosscoder"]["hooks"] == layers
        assert sum(summary["crosscoder"]["n_features_writing_k_layers_above_0.1"].values()) == summary["d_sae"]
    if name == "multi":
        assert summary["hook"] == LAYERS[1]
