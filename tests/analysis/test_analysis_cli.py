"""``saefast analyze`` on tiny runs: synthetic default, a model + dataset, an SAE folder alone, bad input."""
import csv
import json
import re

import pytest
import torch

from analysis_helpers import HOOK, make_model, make_texts, write_jsonl
from saefast.analysis.database import ActivationDatabase
from saefast.cli import main
from saefast.io import load_sae

FAST = ["--no-progress-bar", "--no-tensorboard", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    argv = ["train", "--out-dir", str(tmp), "--run-name", "syn", "--train-steps", "20", "--batch-size", "128",
            "--d-in", "16", "--synthetic-features", "24", "--expansion-factor", "3", "--top-k", "3",
            "--log-every", "4", *FAST]
    assert main(argv) == 0
    return tmp / "syn"


def test_analyze_synthetic_run(synthetic_run, capsys):
    run = synthetic_run
    assert main(["analyze", str(run), "--n-tokens", "600", "--features", "4"]) == 0
    assert "saefast analyze: wrote" in capsys.readouterr().out
    out = run / "analysis"
    for name in ("activations.safetensors", "summary.json", "similarity.csv", "density.png", "training_curves.png",
                 "index.html"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    sae = load_sae(str(run / "sae"))
    db = ActivationDatabase.load(out / "activations.safetensors")
    assert db.n_tokens == 600 and db.d_sae == sae.d_sae == 48 and not db.has_token_ids
    assert summary["source"] == "synthetic" and summary["sparsity"]["n_tokens"] == 600
    assert summary["sparsity"]["nnz"] == db.nnz and summary["reconstruction"]["n_rows"] == 600
    assert 0 <= summary["feature_recovery"] <= 1 and "final_eval" in summary
    assert summary["sparsity"]["n_inactive"] == int((db.feature_counts() == 0).sum())
    # one dead count for the SAE: its training counter, the same in the summary and the final eval
    assert summary["sparsity"]["n_dead"] == sae.count_dead_features()
    assert summary["sparsity"]["dead_fraction"] == summary["final_eval"]["dead_fraction"] \
        == summary["reconstruction"]["dead_fraction"] == pytest.approx(sae.count_dead_features() / 48)
    features = summary["report_features"]
    assert len(features) == 4 and all(db.feature_counts()[f] > 0 for f in features)
    index = (out / "index.html").read_text()
    assert '<img src="density.png"' in index and '<img src="training_curves.png"' in index
    # synthetic rows have no tokens: the pages show the planted feature each latent recovers, not contexts
    from saefast.data.synthetic import SyntheticActivations
    planted = SyntheticActivations(16, 24, 8).true_features
    cos = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ planted.T
    assert "planted feature (cos)" in index
    for f in features:
        page = (out / "features" / f"feature_{f:05d}.html").read_text()
        assert f"Feature {f}" in page and "Planted features it recovers" in page
        assert "Max-activating examples" not in page and "\u00b7" not in page and "no token" not in page
        best, ids = cos[f].topk(3)
        table = page.split("Planted features it recovers")[1].split("</table>")[0]
        found = re.findall(r"<tr><td>(\d+)</td><td class=\"num\">([-\d.e]+)</td></tr>", table)
        assert [int(i) for i, _ in found] == ids.tolist()
        assert [float(c) for _, c in found] == pytest.approx(best.tolist(), abs=1e-3)
        assert f"<td>{int(ids[0])} ({float(best[0]):.3f})</td>" in index
    matched = summary["planted"]
    assert matched["n_planted"] == 24 and matched["planted_recovered"] == int((cos.max(0).values > 0.9).sum())
    assert matched["latents_matching_a_planted_feature"] == int((cos.max(1).values > 0.9).sum())
    with open(out / "similarity.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sae.d_sae * 10
    best = {int(r["feature"]): float(r["cosine"]) for r in rows if r["rank"] == "1"}
    unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cos = unit @ unit.T
    cos.fill_diagonal_(-2)
    assert best[7] == pytest.approx(float(cos[7].max()), abs=1e-5)

    # an existing analysis is kept unless --overwrite
    assert main(["analyze", str(run), "--n-tokens", "100"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert ActivationDatabase.load(out / "activations.safetensors").n_tokens == 600
    assert main(["analyze", str(run), "--n-tokens", "100", "--features", "2", "--overwrite"]) == 0
    assert ActivationDatabase.load(out / "activations.safetensors").n_tokens == 100
    assert not [p for p in run.iterdir() if p.name.startswith(".analysis")]  # no temporary folders left


def test_analyze_on_a_model_and_dataset(synthetic_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("datasets")  # absent on the lent GPU machine
    model = make_model()
    monkeypatch.setattr("saefast.data.models.load_model", lambda name, device="cpu", dtype=None: model)
    data = tmp_path / "docs.jsonl"
    write_jsonl(data, make_texts(12, seed=3))
    out = tmp_path / "model_analysis"
    argv = ["analyze", str(synthetic_run / "sae"), "--model", "tiny", "--dataset", str(data), "--hook", HOOK,
            "--context-size", "12", "--n-tokens", "80", "--features", "3", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"] == "model" and summary["hook"] == HOOK
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_loss_recovered", "kl"):
        assert key in summary["ablation"]
    assert [r["feature"] for r in summary["feature_ablation"]] == summary["report_features"]
    db = ActivationDatabase.load(out / "activations.safetensors")
    assert db.n_tokens == 80 and db.has_contexts and 1 not in db.token_ids.tolist()  # BOS (id 1) not stored
    f = summary["report_features"][-1]
    page = (out / "features" / f"feature_{f:05d}.html").read_text()
    assert "Tokens it fires on most" in page and "CE loss increase when ablated" in page
    assert 'class="tok center"' in page and "no token text" not in page

    # the same through an activation cache that kept token ids (no tokenizer: tokens show as ids)
    from saefast.data.cache import cache_activations
    from saefast.data.source import ModelActivationSource
    from saefast.data.tokens import TokenWindows
    source = ModelActivationSource(model, HOOK, TokenWindows(make_texts(12, seed=3), model.tokenizer, 12),
                                   batch_size=16, buffer_tokens=64, background=False, with_tokens=True)
    cache = cache_activations(source, tmp_path / "cache", n_tokens=70, shard_tokens=32, progress=False)
    assert main(["analyze", str(synthetic_run / "sae"), "--cache-dir", str(cache), "--features", "2",
                 "--out", str(tmp_path / "cached")]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    assert summary["source"] == "cache" and summary["sparsity"]["n_tokens"] == 70
    cached_db = ActivationDatabase.load(tmp_path / "cached" / "activations.safetensors")
    assert cached_db.has_contexts and int(cached_db.token_ids.min()) >= 3  # words only: BOS/PAD are not cached
    page = (tmp_path / "cached" / "features" / f"feature_{summary['report_features'][0]:05d}.html").read_text()
    assert 'class="tok center"' in page and "&lt;" in page  # token ids shown as <id>, escaped

    # bad input fails before any output is written
    assert main(["analyze", str(synthetic_run / "sae"), "--model", "tiny", "--dataset", str(data), "--hook",
                 "blocks.0.hook_nope", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown hook" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["analyze", str(synthetic_run / "sae"), "--model", "tiny", "--cache-dir", str(tmp_path)]) == 2
    assert "either --cache-dir or --model" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # options that would have no effect on the source are refused, before any output
    refused = ((synthetic_run, ["--context-size", "16"],
                "--context-size 16 has no effect here: the activations are the run's synthetic data"),
               (synthetic_run, ["--batch-size", "2"], "--batch-size 2 has no effect here"),
               (synthetic_run / "sae", ["--n-tokens", "100"], "--n-tokens 100 has no effect here: there are no "
                                                               "activations"))
    for target, flags, message in refused:
        assert main(["analyze", str(target), *flags, "--out", str(tmp_path / "ignored")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "ignored").exists()


def test_analyze_sae_folder_without_activations(synthetic_run, tmp_path):
    out = tmp_path / "weights"
    assert main(["analyze", str(synthetic_run / "sae"), "--features", "5", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"] == "none" and summary["report_features"] == [0, 1, 2, 3, 4]
    assert not (out / "activations.safetensors").exists() and (out / "similarity.csv").is_file()
    assert "Most similar features" in (out / "features" / "feature_00003.html").read_text()


def test_overwrite_never_deletes_what_saefast_did_not_write(synthetic_run, tmp_path, capsys):
    sae_dir = str(synthetic_run / "sae")
    # a regular file given as --out survives --overwrite
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert main(["analyze", sae_dir, "--features", "2", "--out", str(notes), "--overwrite"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and notes.read_text() == "my notes"
    # a folder of the user's own files survives --overwrite
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "paper.tex").write_text("draft")
    (mine / "sub" / "data.csv").write_text("1,2")
    assert main(["analyze", sae_dir, "--features", "2", "--out", str(mine), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "files saefast did not write" in err and "paper.tex" in err
    assert (mine / "paper.tex").read_text() == "draft" and (mine / "sub" / "data.csv").read_text() == "1,2"
    # saefast's own analysis is replaced, unless a file was added to it since
    out = tmp_path / "analysis"
    assert main(["analyze", sae_dir, "--features", "2", "--out", str(out)]) == 0
    assert main(["analyze", sae_dir, "--features", "3", "--out", str(out), "--overwrite"]) == 0
    assert len(json.loads((out / "summary.json").read_text())["report_features"]) == 3
    (out / "my_comments.md").write_text("keep me")
    assert main(["analyze", sae_dir, "--features", "2", "--out", str(out), "--overwrite"]) == 2
    assert "my_comments.md" in capsys.readouterr().err and (out / "my_comments.md").read_text() == "keep me"
    assert len(json.loads((out / "summary.json").read_text())["report_features"]) == 3
    # an empty folder needs no --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["analyze", sae_dir, "--features", "2", "--out", str(empty)]) == 0
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
